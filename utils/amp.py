"""Mixed precision (``--amp``): which autocast dtype a device gets, and the autocast context itself.

``--amp auto`` (the default of train, generate, distill and network_speed) picks bfloat16 autocast where the device computes bf16 natively
and it measured faster (docs/speed.md): CUDA devices with bf16 support, and CPUs with AMX-BF16 or
AVX512-BF16 units (``amx_bf16`` / ``avx512_bf16`` in /proc/cpuinfo). Elsewhere, notably CPUs without
those units, where bf16 arithmetic is emulated and slower than fp32, it picks fp32 (``none``).
``--amp none`` and ``--amp bf16`` force the choice. Weights, optimizer state and EMA always stay fp32;
the losses are computed in fp32.
"""
import functools

import torch

AMP_CHOICES = ("auto", "none", "bf16")
AMP_HELP = ("mixed precision: 'auto' = bf16 autocast where the device has native bf16 (CUDA with bf16, CPUs with "
            "AMX-BF16 or AVX512-BF16), else fp32; 'none' = fp32; 'bf16' = bf16 autocast (weights, optimizer and EMA "
            "stay fp32). On a CPU, bf16 also turns on the CPU fast path (channels_last activations, a fused "
            "GroupNorm kernel built with the system C compiler; FAST_ODE_NATIVE=0 turns it off; docs/speed.md)")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags():
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device, flags=None):
    """(True if ``device`` computes bfloat16 natively, the reason in words). ``flags``: CPU flags to judge
    (default: this machine's)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, "this CUDA device has no native bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for {device.type}"
    flags = cpu_flags() if flags is None else frozenset(flags)
    found = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if not flags:
        # no /proc/cpuinfo: ask PyTorch's own CPU probe (private API, so guarded)
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if probe is not None and probe():
            return True, "the CPU supports AVX512-BF16 (PyTorch's CPU probe)"
        return False, "no CPU flags to read; bf16 is not known to be native"
    if found:
        return True, f"the CPU has native bf16 ({', '.join(found)})"
    return False, "the CPU has no native bf16 (no amx_bf16 / avx512_bf16 flag): bf16 would be emulated and slower"


def resolve_amp(requested, device, flags=None):
    """(``"bf16"`` or ``"none"``, why) for ``--amp requested`` on ``device``."""
    if requested not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested, f"--amp {requested} given"
    native, reason = native_bf16(device, flags)
    return ("bf16" if native else "none"), f"auto: {reason}"


def autocast(device, amp):
    """A fresh autocast context for ``amp`` (``"bf16"`` or ``"none"``) on ``device`` (a fresh one each call:
    the threads of ``utils.cpu_shards`` enter one each)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")


def autocast_velocity(net, device, amp):
    """``net`` as a velocity function for the ODE solvers: run under ``amp`` autocast, returned in float32
    (the solver's state stays float32, so only the network evaluations run in bf16)."""
    if amp != "bf16":
        return net

    def velocity(z, t):
        with autocast(device, amp):
            return net(z, t).float()

    return velocity
