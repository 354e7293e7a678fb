"""The U-Net's small 3x3 convolutions on Intel AMX tiles (the bf16 CPU fast path).

oneDNN's bf16 convolutions pay 100-200 us per call outside their kernels and reach only 0.2-0.5 of the matrix
units' speed on the 7x7 and 14x14 layers of the MNIST U-Net, where the arithmetic is small
(docs/speed.md). ``models/native/conv3x3_amx.c`` runs those convolutions (forward, input gradient, weight and
bias gradients) as plain loops of AMX tile operations; it is compiled like the fused GroupNorm kernel
(``models.fused_norm.build_native``), only where the compiler targets AMX-BF16, and used where it measured
faster: bf16 channels_last activations, channel counts that are multiples of 32, at most ``MAX_PIXELS``
pixels per image, and one intra-op thread (the batch shards' threads; the kernels are single-threaded).
Elsewhere ``F.conv2d`` runs as before. ``FAST_ODE_AMX_CONV=0`` turns them off.

Numbers: float32 accumulation, outputs rounded to bfloat16 to nearest even, like oneDNN's, in another order
of summation (tests/test_amx_conv.py compares both with a float32 convolution). The weight gradient is
summed over the whole batch in float32 before its rounding, where oneDNN's rounds per block.
"""
import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from models import fused_norm

SOURCE = Path(__file__).resolve().parent / "native" / "conv3x3_amx.c"
# 7x7 and 14x14 (the MNIST U-Net's lower resolutions): faster than oneDNN there, slower at 28x28 (measured on
# 2 cores of a Xeon with AMX, lscpu model 207, docs/speed.md)
MAX_PIXELS = 64


def _bind(library):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.fo_amx_ready.argtypes = []
    library.fo_amx_ready.restype = ctypes.c_int
    library.fo_conv3x3_pack.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
    library.fo_conv3x3_pack.restype = None
    library.fo_conv3x3_forward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    library.fo_conv3x3_forward.restype = ctypes.c_int
    library.fo_conv3x3_weight_grad.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    library.fo_conv3x3_weight_grad.restype = ctypes.c_int
    return library


@functools.lru_cache(maxsize=1)
def _load():
    """(the library, if the tiles can be used, or None; why)."""
    if os.environ.get("FAST_ODE_AMX_CONV", "1") == "0":
        return None, "FAST_ODE_AMX_CONV=0"
    library, reason = fused_norm.build_native(SOURCE, _bind, "AMX convolution kernel")
    if library is None:
        return None, reason
    if not library.fo_amx_ready():
        return None, "no AMX-BF16 tiles (not compiled for them, or the kernel refused them to this process)"
    return library, reason


def available():
    """(True if the AMX convolutions are loaded and usable, why not / where from)."""
    library, reason = _load()
    return library is not None, reason


def applies(x, weight, max_pixels=None):
    """Whether ``F.conv2d(x, weight, padding=1)`` takes the AMX kernels: bf16 channels_last CPU activations and
    a bf16 3x3 weight, both channel counts multiples of 32, at most ``max_pixels`` pixels, one intra-op thread,
    no dispatch mode active."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and x.shape[1] % 32 == 0
            and weight.shape[0] % 32 == 0 and weight.shape[1] == x.shape[1]
            and x.shape[2] * x.shape[3] <= max_pixels and x.shape[0] > 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and torch.get_num_threads() == 1 and not _dispatch_mode_active() and _load()[0] is not None)


def _dispatch_mode_active():
    """Whether a TorchDispatchMode is on (FlopCounterMode, fake tensors, ...): it sees aten operations only, so
    there the convolution stays F.conv2d (counted, traceable)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:   # a torch without it: no mode to see
        return False
    return _get_current_dispatch_mode() is not None


def _address(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


def _packed(weight, transpose):
    library = _load()[0]
    packed = torch.empty(weight.numel(), dtype=torch.bfloat16)
    weight = weight.contiguous()
    library.fo_conv3x3_pack(_address(weight), _address(packed), weight.shape[0], weight.shape[1], int(transpose))
    return packed


def _convolve(x, packed, bias, out_channels):
    library = _load()[0]
    n, c, h, w = x.shape
    y = torch.empty((n, out_channels, h, w), dtype=torch.bfloat16, memory_format=torch.channels_last)
    status = library.fo_conv3x3_forward(_address(x), _address(packed), None if bias is None else _address(bias),
                                        _address(y), n, h, w, c, out_channels)
    if status != 0:
        raise MemoryError("the AMX convolution could not allocate its scratch memory")
    return y


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _convolve(x, _packed(weight, False), None if bias is None else bias.contiguous(), weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _convolve(grad, _packed(weight, True), None, x.shape[1])
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            n, c, h, w = x.shape
            grad_w = torch.empty(weight.shape, dtype=torch.bfloat16)
            grad_b = torch.empty(weight.shape[0], dtype=torch.bfloat16) if ctx.has_bias else None
            x_nchw = x.contiguous()   # held until the call returns: _address does not keep the tensor alive
            status = _load()[0].fo_conv3x3_weight_grad(_address(x_nchw), _address(grad), _address(grad_w),
                                                      None if grad_b is None else _address(grad_b), n, h, w, c,
                                                      weight.shape[0])
            if status != 0:
                raise MemoryError("the AMX convolution could not allocate its scratch memory")
        return grad_x, grad_w, grad_b


def conv3x3(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=1)`` on the AMX kernels where :func:`applies`, else ``F.conv2d``."""
    if not applies(x, weight) or (bias is not None and bias.dtype != torch.bfloat16):
        return F.conv2d(x, weight, bias, padding=1)
    return _Conv3x3.apply(x, weight, bias)
