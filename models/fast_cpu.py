"""The bf16 CPU fast path: channels_last activations and the fused GroupNorm + SiLU + dropout kernels.

On a CPU with native bf16 (AMX-BF16 / AVX512-BF16), oneDNN's bf16 convolutions are several times faster
on channels_last activations than on NCHW ones, which they reorder at every call; PyTorch's own
channels_last GroupNorm is slow, so the fast path runs GroupNorm (+ SiLU + dropout) as one C kernel
(``models/fused_norm.py``). It is used where ``--amp`` resolved to bf16 on a CPU and the kernel builds;
fp32 runs, CUDA, and ``torch.compile`` keep the NCHW path (and the golden numbers). ``FAST_ODE_NATIVE=0``
turns it off. Weights and state dicts are unchanged: only activations change layout. On a CPU with AMX-BF16
the small 3x3 convolutions (at most ``models.amx_conv.MAX_PIXELS`` pixels) run on AMX tile kernels of this
project's own in the single-threaded batch shards (``FAST_ODE_AMX_CONV=0`` turns those off).

Measured on 2 cores of an Intel Xeon with AMX-BF16 and on 2 cores of an AMD EPYC (Zen 4) with AVX512-BF16
and no AMX (docs/speed.md).
"""
from models import amx_conv, fused_norm
from models.songunet import SongUNet
from utils.cpu_memory import retain_freed_memory
from utils.cpu_shards import ThreadShards


def choose(device_type, amp, compiled=False):
    """(use the fast path, why) for a run on ``device_type`` ("cpu", "cuda") with ``amp`` ("bf16", "none")."""
    if device_type != "cpu":
        return False, f"not on a CPU ({device_type})"
    if amp != "bf16":
        return False, "fp32 (amp none)"
    if compiled:
        return False, "--compile"
    built, reason = fused_norm.available()
    if not built:
        return False, reason
    reason = "bf16 on a CPU: channels_last activations, fused GroupNorm+SiLU+dropout kernel"
    if amx_conv.available()[0]:
        reason += f", AMX 3x3 convolutions up to {amx_conv.MAX_PIXELS} pixels"
    return True, reason


def apply(modules, enabled):
    """Switch every SongUNet inside ``modules`` to the fast path (or back); keeps freed memory in the
    process's heap when enabled (``utils.cpu_memory``). Returns ``enabled``."""
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, SongUNet):
                sub.set_channels_last(enabled)
    if enabled:
        retain_freed_memory()
    return enabled


def thread_shards(shards, amp):
    """The ``utils.cpu_shards.ThreadShards`` a CPU training step runs its ``shards`` in, for ``--amp`` resolved to
    ``amp`` ("bf16", "none"): in bf16 the weights' casts are made once per step for all shards, and the casts and
    gradient sums run in the fused kernels' C loops where they are loaded (docs/speed.md)."""
    return ThreadShards(shards, share_casts=amp == "bf16", kernels=fused_norm)
