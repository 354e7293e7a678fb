"""GroupNorm + SiLU + dropout as one CPU kernel for channels_last activations (the bf16 CPU fast path).

In a bf16 step on a CPU with AMX, oneDNN's channels_last convolutions run several times faster than its
NCHW ones (they skip the layout reorders), but PyTorch's channels_last GroupNorm is 5-10x slower than its
NCHW one, and GroupNorm, SiLU and dropout each make their own passes over memory (docs/speed.md). The C
kernels in ``models/native/groupnorm_act.c`` do the U-Net block's "GN -> SiLU -> dropout" in two passes
forward and two backward, float32 arithmetic on float32 or bfloat16 storage.

The library is compiled on first use with the system C compiler (``$CC``, default ``cc``; flags
``-O3 -march=native``) into ``$FAST_ODE_CACHE`` (default ``~/.cache/fast_ode``), keyed by the source, the
compiler and the CPU, and loaded with ctypes. Without a compiler, or with ``FAST_ODE_NATIVE=0``, nothing
is compiled and the networks use PyTorch's own operations (``available()`` says why).

The dropout of the fused path keeps element e (memory order) when the top 16 bits of a hash of (e, seed)
are below ``round((1 - p) 65536)``: the same keep rate and scale as ``models.songunet.dropout``, but other
masks than its random stream, so a bf16 fast-path run and an fp32 run draw different masks.
"""
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "native" / "groupnorm_act.c"
# -ffp-contract=fast: fused multiply-adds (ISO C modes turn them off); on x86, 512-bit vectors where the CPU
# has them (gcc's -march=native prefers 256)
FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()),
         "-ffp-contract=fast", "-std=c11", "-fPIC", "-shared", "-pthread")
_MAX_ELEMENTS = 2 ** 32   # the dropout hash indexes elements with 32 bits


def _cache_dir():
    root = os.environ.get("FAST_ODE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fast_ode"


def _cpu_identity():
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(compiler, target, source=SOURCE):
    """Compile ``source`` into ``target`` (atomically: a half-written library is never loaded)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.part")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", partial, "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def build_native(source, bind, what):
    """(the ctypes library of the C file ``source``, compiled for this CPU and cached, with ``bind(library)``
    applied; or None, why). ``what`` names the kernel in the reasons."""
    if os.environ.get("FAST_ODE_NATIVE", "1") == "0":
        return None, "FAST_ODE_NATIVE=0"
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"no C compiler ({compiler}: {error})"
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version, _cpu_identity()]).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    built = not target.exists()
    try:
        if built:
            _compile(compiler, target, source)
        library = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as error:
        lines = (error.stderr or "").strip().splitlines()
        return None, (f"the {what} did not build with {compiler} (exit status {error.returncode}"
                      f"{': ' + lines[-1] if lines else ''})")
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"the {what} did not build or load: {error}"
    return bind(library), f"{'compiled' if built else 'loaded'} {target}"


@functools.lru_cache(maxsize=1)
def _load():
    """(the ctypes library or None, why)."""
    return build_native(SOURCE, _bind, "fused GroupNorm kernel")


def _bind(library):
    """Declare the C functions' argument types on a loaded ``library``; returns it."""
    i64, u32, f32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p
    library.fo_group_norm_act_forward.argtypes = [ptr, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64,
                                                  i64, f32, ctypes.c_int, u32, f32, u32, u32, ptr, f32, ctypes.c_int,
                                                  ptr]
    library.fo_group_norm_act_backward.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                                   ptr, i64, i64, i64, i64, ctypes.c_int, u32, f32, u32, u32, ptr,
                                                   f32, ctypes.c_int, ptr]
    library.fo_add_inplace.argtypes = [ptr, ptr, ctypes.c_int, i64, ctypes.c_int]
    library.fo_add_inplace.restype = None
    library.fo_dropout_factors.argtypes = [ptr, i64, u32, f32, u32, u32]
    library.fo_dropout_factors.restype = None
    library.fo_mask_ok.argtypes = [i64]
    library.fo_mask_ok.restype = ctypes.c_int
    library.fo_cast_many.argtypes = [i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    library.fo_cast_many.restype = None
    library.fo_sum_many.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    library.fo_sum_many.restype = None
    return library


def available():
    """(True if the fused kernels are loaded, why not / where from)."""
    library, reason = _load()
    return library is not None, reason


def applies(x):
    """Whether ``x`` takes the fused path: a 4-D channels_last (not also NCHW-contiguous) float32 or bfloat16
    CPU tensor, with the kernels available."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and x.numel() < _MAX_ELEMENTS and _load()[0] is not None)


def dropout_threshold(p):
    """(kept, scale) of dropout rate ``p`` on 16 bits, as ``models.songunet.dropout``."""
    kept = round((1 - p) * 65536)
    return kept, 65536 / max(kept, 1)


def draw_seed(generator=None):
    """Two 32-bit keys for one dropout mask, drawn from ``generator`` (None: the global CPU generator)."""
    words = torch.randint(0, 2 ** 32, (2,), dtype=torch.int64, generator=generator)
    return int(words[0]), int(words[1])


def dropout_factors(count, p, keys):
    """The fused path's dropout factors (0 or the scale) of elements 0..count-1 under ``keys``: for tests."""
    library = _load()[0]
    kept, scale = dropout_threshold(p)
    out = torch.empty(count, dtype=torch.float32)
    library.fo_dropout_factors(out.data_ptr(), count, kept, scale, *keys)
    return out


def _status(code, what):
    if code:
        raise RuntimeError(f"the fused GroupNorm {what} failed (code {code}: out of memory or bad shape)")


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, add, groups, eps, silu, kept, scale, keys, through):
        library = _load()[0]
        n, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        weight32 = weight.detach().float().contiguous()
        bias32 = bias.detach().float().contiguous()
        add32 = None if add is None else add.detach().float().reshape(n, c).contiguous()
        y = torch.empty_like(x, memory_format=torch.channels_last)
        # the pass-through output (``through`` not None): ``through * x``, written in the same pass (or x itself)
        xs = None if through is None or through == 1.0 else torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n, groups, dtype=torch.float32)
        rstd = torch.empty(n, groups, dtype=torch.float32)
        # with dropout, where the AVX-512 passes run: the keep masks (16 bits per 16 elements) for the backward
        mask = torch.empty(x.numel() // 16, dtype=torch.int16) if scale > 0 and library.fo_mask_ok(c) else None
        _status(library.fo_group_norm_act_forward(
            x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), weight32.data_ptr(), bias32.data_ptr(),
            None if add32 is None else add32.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, h * w, c, groups, eps,
            int(silu), kept, scale, *keys, None if xs is None else xs.data_ptr(), 0.0 if through is None else through,
            torch.get_num_threads(), None if mask is None else mask.data_ptr()), "forward")
        ctx.save_for_backward(x, weight32, bias32, add32, mean, rstd)
        ctx.mask = mask
        ctx.settings = (groups, silu, kept, scale, keys, weight.dtype, bias.dtype,
                        None if add is None else (add.dtype, add.shape), through)
        if through is None:
            return y
        return y, (x if xs is None else xs)

    @staticmethod
    def backward(ctx, grad_y, grad_through=None):
        library = _load()[0]
        x, weight32, bias32, add32, mean, rstd = ctx.saved_tensors
        groups, silu, kept, scale, keys, weight_dtype, bias_dtype, add_like, through = ctx.settings
        n, c, h, w = x.shape
        if grad_y is None:   # only the pass-through output was used
            grad_y = torch.zeros_like(x, memory_format=torch.channels_last)
        grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
        if grad_through is not None:
            grad_through = grad_through.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_weight = torch.empty(c, dtype=torch.float32)
        grad_bias = torch.empty(c, dtype=torch.float32)
        grad_add = None if add32 is None else torch.empty(n, c, dtype=torch.float32)
        _status(library.fo_group_norm_act_backward(
            x.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(), int(x.dtype == torch.bfloat16), weight32.data_ptr(),
            bias32.data_ptr(), None if add32 is None else add32.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            grad_weight.data_ptr(), grad_bias.data_ptr(), None if grad_add is None else grad_add.data_ptr(),
            n, h * w, c, groups, int(silu), kept, scale, *keys,
            None if grad_through is None else grad_through.data_ptr(), 0.0 if through is None else through,
            torch.get_num_threads(), None if ctx.mask is None else ctx.mask.data_ptr()), "backward")
        if grad_add is not None:
            grad_add = grad_add.to(add_like[0]).reshape(add_like[1])
        return (grad_x, grad_weight.to(weight_dtype), grad_bias.to(bias_dtype), grad_add,
                None, None, None, None, None, None, None)


class _AddInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, other):
        library = _load()[0]
        library.fo_add_inplace(target.data_ptr(), other.data_ptr(), int(target.dtype == torch.bfloat16),
                               target.numel(), torch.get_num_threads())
        ctx.mark_dirty(target)
        return target

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def add_(target, other):
    """``target.add_(other)`` (autograd-aware): with the same shape, dtype and channels_last layout, on a CPU
    where the fused kernels are loaded, one C sweep (PyTorch's bfloat16 addition runs at about half the memory's
    speed on activations not in cache); otherwise PyTorch's ``add_``."""
    if (applies(target) and other.dtype == target.dtype and other.shape == target.shape
            and other.is_contiguous(memory_format=torch.channels_last) and other.data_ptr() != target.data_ptr()):
        return _AddInPlace.apply(target, other)
    return target.add_(other)


def group_norm_act(x, weight, bias, groups, eps, silu=False, p=0.0, generator=None, add=None, through=None):
    """``dropout(silu(group_norm(x + add)), p)`` (SiLU if ``silu``; dropout if ``p > 0``; ``add``: None or one
    value per sample and channel, [N, C] or [N, C, 1, 1]) in one fused kernel, for an ``x`` that ``applies``.
    ``generator``: where the dropout seed is drawn from (None: the global one).

    ``through`` (a float): also return ``through * x`` (x itself when 1), written in the same pass, for the
    block's residual path. Its gradient is then added to x's in the backward kernel's last pass, instead of
    autograd scaling it and adding it in two more passes over memory."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if add is not None and add.numel() != x.shape[0] * x.shape[1]:
        raise ValueError(f"add must hold one value per sample and channel ({x.shape[0]} x {x.shape[1]}), "
                         f"got shape {tuple(add.shape)}")
    kept, scale = dropout_threshold(p) if p > 0 else (0, 0.0)   # scale 0: no dropout
    keys = draw_seed(generator) if p > 0 else (0, 0)
    return _GroupNormAct.apply(x, weight, bias, add, groups, float(eps), bool(silu), kept, float(scale), keys,
                               None if through is None else float(through))


def _pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def cast_many(tensors, scales, threads=None):
    """``[(t * s).to(torch.bfloat16) for t, s in zip(tensors, scales)]`` (``s`` a float; the same numbers) in
    one C call, for contiguous float32 CPU tensors; None where the kernels are not loaded or a tensor is not
    such. The CPU shard steps' shared weight casts (``utils/cpu_shards.py``): one call instead of one or two
    PyTorch operations per parameter."""
    library = _load()[0]
    if library is None or not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                  for t in tensors):
        return None
    out = [torch.empty(t.shape, dtype=torch.bfloat16) for t in tensors]
    count = (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])
    factors = (ctypes.c_float * len(tensors))(*[float(s) for s in scales])
    library.fo_cast_many(len(tensors), _pointers(tensors), _pointers(out), count, factors,
                         threads or torch.get_num_threads())
    return out


def _sum_layout(grad):
    """0: ``grad`` is contiguous (laid out like its contiguous parameter); 1: a channels_last 4-D gradient;
    None: another layout."""
    if grad.is_contiguous():
        return 0
    if grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last):
        return 1
    return None


def sum_many(likes, sources, scales, threads=None):
    """For each ``like`` (a contiguous float32 CPU parameter), its bfloat16 gradients ``sources[k]`` (a list, None
    for absent ones, each contiguous or channels_last), each times ``scales[k]`` in float32, added in list order:
    ``g0.float() * s + g1.float() * s + ...`` in the parameter's layout, the same numbers, in one C call. None
    where the kernels are not loaded or an input is not such (the caller adds them with PyTorch)."""
    library = _load()[0]
    if library is None or not likes:
        return None
    width = len(sources[0])
    layouts = []
    for like, grads in zip(likes, sources):
        if not (like.dtype == torch.float32 and like.is_contiguous() and len(grads) == width):
            return None
        for grad in grads:
            code = None if grad is None else _sum_layout(grad)
            if grad is not None and (code is None or grad.dtype != torch.bfloat16 or grad.shape != like.shape):
                return None
            layouts.append(0 if code is None else code)
    out = [torch.empty_like(like) for like in likes]
    flat = [grad for grads in sources for grad in grads]
    dims = [d for like in likes for d in (tuple(like.shape) if like.dim() == 4 else (0, 0, 0, 0))]
    library.fo_sum_many(len(likes), width, _pointers(flat), (ctypes.c_int8 * len(layouts))(*layouts),
                        (ctypes.c_int64 * len(dims))(*dims), _pointers(out),
                        (ctypes.c_int64 * len(likes))(*[like.numel() for like in likes]),
                        (ctypes.c_float * len(likes))(*[float(s) for s in scales]), threads or torch.get_num_threads())
    return out
