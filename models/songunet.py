"""The DDPM++ U-Net ("SongUNet") of Song et al. (2021) in the form used by EDM
(Karras et al., 2022) and by the paper's code.

Written for this project; the module names, parameter shapes, initialisation
and the order of operations follow EDM's ``training/networks.py`` so that the
paper's released ``flow_model_*_ema.pth`` files load with ``strict=True`` and
give the same outputs (checked against golden tensors in ``tests/``).

Conventions of this architecture worth knowing:
- the time ``t`` in [0, 1] goes straight into a sinusoidal embedding (no x1000);
- residual branches are scaled by sqrt(1/2); GroupNorm uses eps 1e-6;
- down/up sampling uses a [1, 1] box filter (depthwise conv / conv-transpose);
- the skip of a resampling block is a 1x1 conv ("resample_proj").
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models import amx_conv, fused_norm
from utils.cpu_shards import cast_param, sharded_forward, thread_generator


def _xavier_uniform(shape, fan_in, fan_out, gain=1.0):
    bound = math.sqrt(6.0 / (fan_in + fan_out)) * gain
    return (torch.rand(*shape) * 2 - 1) * bound


class Linear(nn.Module):
    """Fully connected layer with EDM-style xavier-uniform init (bias starts at 0)."""

    def __init__(self, in_features, out_features, gain=1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(_xavier_uniform([out_features, in_features], in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, cast_param(self.weight, x.dtype), cast_param(self.bias, x.dtype))


class Conv2d(nn.Module):
    """Square convolution with an optional 2x box-filter up- or down-sampling in front.

    ``kernel=0`` means no convolution at all (resampling only). The resampling
    filter is a buffer, as in the paper's checkpoints.
    """

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False,
                 resample_filter=(1, 1), gain=1.0):
        super().__init__()
        assert not (up and down)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        if kernel:
            fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
            self.weight = nn.Parameter(_xavier_uniform([out_channels, in_channels, kernel, kernel], fan_in, fan_out, gain))
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.weight = None
            self.bias = None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if (up or down) else None)
        # With the [1, 1] box filter (every config of the paper) resampling is a 2x2 mean going down and a
        # nearest-neighbour repeat going up: the same numbers as the depthwise (transposed) convolutions,
        # whose taps are 1/4 (x4 going up). Measured on CPU (forward + backward, 32x64 channels, 1 thread,
        # docs/speed.md): in bfloat16 the direct ops are 4-20x faster in both memory formats, and in
        # float32 channels_last too; in float32 NCHW the convolutions are about 2x faster, so they stay there.
        self.box = (up or down) and len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]

    def forward(self, x, scale=None):
        """``scale``: a factor folded into the weight and bias (``scale * conv(x)`` at no extra pass)."""
        filt = self.resample_filter
        if self.box and x.dim() == 4 and _direct_resampling(x):
            x = F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2)
        elif filt is not None:
            filt = filt.to(x.dtype)
            pad = (filt.shape[-1] - 1) // 2
            channels = x.shape[1]
            # Depthwise box filter: transpose-conv (x4 keeps the mean) to go up, strided conv to go down.
            if self.up:
                x = F.conv_transpose2d(x, filt.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)
            if self.down:
                x = F.conv2d(x, filt.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)
        if self.weight is not None:
            # the weight cast for the computation, with ``scale`` folded in (a CPU shard step's shared cast, if any)
            weight, bias = cast_param(self.weight, x.dtype, scale), cast_param(self.bias, x.dtype, scale)
            if self.weight.shape[-1] == 1 and fused_norm.applies(x):
                # the fast path's 1x1 convolutions as a matmul over the channels of the NHWC memory: as fast as
                # oneDNN's convolution here, and the weight's gradient comes back in the parameter's own layout
                # (the convolution's is channels_last, which DDP's gradient buckets copy, with a warning)
                return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
            if self.weight.shape[-1] == 3 and amx_conv.applies(x, weight):
                # the fast path's small 3x3 convolutions on AMX tiles (models/amx_conv.py)
                return amx_conv.conv3x3(x, weight, bias)
            x = F.conv2d(x, weight, bias, padding=self.weight.shape[-1] // 2)
        return x


def _direct_resampling(x):
    """Resample a box filter with ``avg_pool2d`` / nearest ``interpolate`` (True) or the depthwise convolutions
    (False: only for float32/float64 NCHW tensors on CPU, where the convolutions measured faster)."""
    if x.device.type != "cpu" or x.dtype in (torch.bfloat16, torch.float16):
        return True
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups and at least 4 channels per group."""

    def __init__(self, num_channels, eps=1e-6, num_groups=32, min_channels_per_group=4):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        if fused_norm.applies(x):
            return fused_norm.group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def act(self, x, p=0.0, training=True, add=None, through=None):
        """``dropout(silu(self(x + add)), p)`` (``add``: None or [N, C], one value per sample and channel): on
        channels_last CPU activations one fused kernel (``models/fused_norm.py``), else PyTorch's operations
        (``x`` is then a fresh convolution output that the addition overwrites in place). ``through`` (a float,
        with no ``add``): also return ``through * x``, the residual path (in the fused kernel's own pass)."""
        p = p if training else 0.0
        if fused_norm.applies(x):
            return fused_norm.group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, silu=True, p=p,
                                             generator=thread_generator(), add=add, through=through)
        if through is not None:
            if add is not None:
                raise ValueError("GroupNorm.act: through and add together are not supported")
            return dropout(F.silu(self(x)), p, training), (x if through == 1.0 else x * through)
        if add is not None:
            x = x.add_(add[:, :, None, None].to(x.dtype))
        return dropout(F.silu(self(x)), p, training)


def dropout(x, p, training=True):
    """``F.dropout``, with a faster random mask on CPU.

    On CPU, ``F.dropout`` draws its mask with ``bernoulli_``, one serial
    Mersenne-Twister draw per element: about 8% of a training step of
    ``configs/mnist_de.json`` on 2 cores. Here one 64-bit draw gives the
    random bits of four elements: element i is kept when its 16-bit word is
    below ``round((1 - p) * 65536)``, and kept elements are scaled by
    ``65536 / round((1 - p) * 65536)`` so that the output's expectation is
    ``x`` exactly (the keep probability is ``1 - p`` rounded to a multiple of
    1/65536, at most 7.7e-6 away). Same seed, same mask. CUDA, and code being
    compiled, use ``F.dropout`` (a fused kernel there).
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1 or torch.compiler.is_compiling():
        return F.dropout(x, p=p, training=training)
    if x.is_contiguous():
        shape, order = x.shape, None
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        (n, c, h, w), order = x.shape, (0, 3, 1, 2)
        shape = (n, h, w, c)
    else:
        return F.dropout(x, p=p, training=training)
    numel = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=x.device,
                          generator=thread_generator())   # a CPU shard's own stream, else the global one
    bits = words.view(torch.int16)[:numel].view(shape)
    if order is not None:
        bits = bits.permute(order)  # same memory layout as x
    kept = round((1 - p) * 65536)
    scale = torch.tensor(65536 / max(kept, 1), dtype=x.dtype, device=x.device)
    mask = torch.where(bits < kept - 32768, scale, torch.zeros((), dtype=x.dtype, device=x.device))
    return x * mask


def attention(q, k, v, use_sdpa=True):
    """Single-head attention over spatial positions.

    q, k, v: [N, C, L] (channels first, L = H * W). Returns [N, C, L].
    The softmax is always computed in float32, as in EDM.
    """
    if use_sdpa:
        dtype = q.dtype
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None].float(), k.transpose(1, 2)[:, None].float(), v.transpose(1, 2)[:, None].float())
        # Contiguous [N, C, L], as the einsum path returns. The transposed view would make the activations
        # of every later block channels_last: slow GroupNorm on CPU, and different dropout masks than the
        # einsum path for the same seed (dropout draws its mask in memory order).
        out = out[:, 0].transpose(1, 2)
        return out.contiguous() if out.dtype == dtype else out.to(dtype, memory_format=torch.contiguous_format)
    weights = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v)


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, add the time embedding, GN-SiLU-dropout-conv, skip, optional attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 dropout=0.0, resample_filter=(1, 1)):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = math.sqrt(0.5)
        self.use_sdpa = True
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x, emb, affine=None):
        """``affine``: this block's ``self.affine(emb)`` when the caller computed it (the fast path computes every
        block's in one matmul)."""
        # The in-place adds and scalings below act only on fresh convolution outputs, which autograd does
        # not keep for the backward pass; they save a memory pass and an allocation each.
        orig = x
        if affine is None:
            affine = self.affine(emb)
        s = self.skip_scale
        fast = fused_norm.applies(x)
        if fast:
            # The bf16 CPU fast path (models/fast_cpu.py). sqrt(1/2) is folded into the convolutions' weights and,
            # for an identity skip, into the residual that norm0's kernel passes through (s x, written in its own
            # pass): the block's output is one addition (a C sweep), and in the backward pass the residual's
            # gradient is added to x's inside norm0's backward kernel, not scaled and accumulated by autograd.
            x, passed = self.norm0.act(x, through=1.0 if self.skip is not None else s)
            x = self.conv0(x)
            x = self.norm1.act(x, self.dropout, self.training, add=affine)
            x = fused_norm.add_(self.conv1(x, scale=s), self.skip(passed, scale=s) if self.skip is not None else passed)
        else:
            x = self.conv0(self.norm0.act(x))
            x = self.norm1.act(x, self.dropout, self.training, add=affine)
            x = self.conv1(x)
            x = x.add_(self.skip(orig) if self.skip is not None else orig).mul_(s)
        if self.attention:
            batch, channels, height, width = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(batch, channels, 3, height * width).unbind(2)
            # the fast path takes the explicit attention: under bf16 autocast on a CPU, scaled_dot_product_attention's
            # kernels measured 1.4-3x slower (forward + backward, 49 to 1,024 positions; docs/speed.md)
            a = attention(q, k, v, use_sdpa=self.use_sdpa and not fast)
            a = a.reshape(batch, channels, height, width)
            x = self.proj(a, scale=s).add_(x, alpha=s) if fast else self.proj(a).add_(x).mul_(s)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/(n/2-1))."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, t):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** freqs
        angles = torch.outer(t, freqs.to(t.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ U-Net. ``forward(x [B, C, H, W], t [B]) -> [B, out_channels, H, W]``."""

    def __init__(self,
                 img_resolution,                # Input/output resolution (square images).
                 in_channels,                   # Channels of the input.
                 out_channels,                  # Channels of the output.
                 model_channels=128,            # Base channel count.
                 channel_mult=(1, 2, 2, 2),     # Channel multiplier per resolution level.
                 channel_mult_emb=4,            # Embedding width = model_channels * this.
                 num_blocks=4,                  # Residual blocks per level.
                 attn_resolutions=(16,),        # Resolutions with self-attention.
                 dropout=0.10,                  # Dropout probability inside blocks.
                 channel_mult_noise=1,          # Time-embedding width = model_channels * this.
                 resample_filter=(1, 1),        # Taps of the resampling filter.
                 ):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels

        # Time embedding.
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder: a stem conv, then per level an optional downsampling block and num_blocks blocks.
        self.enc = nn.ModuleDict()
        skip_channels = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skip_channels.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skip_channels.append(cout)

        # Decoder: mirror image; each "block" consumes one encoder activation by concatenation.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, gain=1e-5)

    channels_last = False   # set_channels_last

    def set_channels_last(self, enabled):
        """Run the activations in channels_last on a CPU (weights and state dict unchanged): the bf16 fast
        path, where oneDNN's convolutions skip their layout reorders and GroupNorm + SiLU + dropout run as
        one kernel (``models/fused_norm.py``). Off by default: fp32 NCHW keeps the golden numbers."""
        self.channels_last = bool(enabled)

    def set_sdpa(self, enabled):
        """Use ``scaled_dot_product_attention`` (default) or the explicit einsum/softmax attention (the bf16 CPU
        fast path takes the explicit one whatever this says: faster there)."""
        for module in self.modules():
            if isinstance(module, UNetBlock):
                module.use_sdpa = enabled

    # Sampling on the fast path with several intra-op threads: a batch shard per thread pays off only with
    # enough work per shard, at least SHARD_MIN_SAMPLES samples or SHARD_MIN_FLOPS (measured on 2 cores of an
    # AMX Xeon, docs/speed.md: with less, two shards of a small network run slower than one thread, whose
    # per-operation costs are lower than with two intra-op threads).
    SHARD_MIN_SAMPLES = 16
    SHARD_MIN_FLOPS = 8e9
    _sample_flops = None

    def sample_flops(self):
        """FLOPs of one sample's forward pass (``FlopCounterMode`` on a batch of 1, counted once)."""
        if self._sample_flops is None:
            from torch.utils.flop_counter import FlopCounterMode
            x = torch.zeros(1, self.in_channels, self.img_resolution, self.img_resolution,
                            device=next(self.parameters()).device)
            with torch.no_grad(), torch.autocast("cpu", enabled=False), FlopCounterMode(display=False) as counter:
                self._forward(x, torch.zeros(1, device=x.device))
            self._sample_flops = counter.get_total_flops()
        return self._sample_flops

    def sampling_shards(self, batch, threads):
        """(shards, one worker thread) for a fast-path sampling forward of ``batch`` samples on ``threads``
        intra-op threads: the most shards with enough work each; with one shard of little work, one thread
        with one intra-op thread (else the calling thread's intra-op threads)."""
        flops = self.sample_flops()
        for shards in range(min(threads, batch), 1, -1):
            per_shard = batch // shards
            if per_shard >= self.SHARD_MIN_SAMPLES or per_shard * flops >= self.SHARD_MIN_FLOPS:
                return shards, False
        return 1, batch * flops < self.SHARD_MIN_FLOPS

    def forward(self, x, t):
        t = _time_vector(t, x)
        if self.channels_last and x.device.type == "cpu" and not torch.is_grad_enabled() and not self.training:
            # fast path, sampling: the batch in shards, one intra-op thread each (utils/cpu_shards.py); inside a
            # shard there is one thread, so this does not recurse
            threads = torch.get_num_threads()
            if threads > 1:
                shards, worker = self.sampling_shards(x.shape[0], threads)
                if shards > 1 or worker:
                    return sharded_forward(self._forward, (x, t), shards)
        return self._forward(x, t)

    def _affine_all(self, emb):
        """{block: its ``affine(emb)``} of every block, from one matmul of the concatenated weights (the fast
        path): the same dot products, in one call instead of one per block, whose per-call costs exceed their
        arithmetic here."""
        blocks = _affine_blocks(self)
        if not blocks:
            return {}
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else emb.dtype
        weight = torch.cat([cast_param(block.affine.weight, dtype) for _, block in blocks])
        bias = torch.cat([cast_param(block.affine.bias, dtype) for _, block in blocks])
        out = F.linear(emb.to(dtype), weight, bias)
        pieces = out.split([block.affine.out_features for _, block in blocks], dim=1)
        return {block: piece for (_, block), piece in zip(blocks, pieces)}   # by module: enc and dec share names

    def _forward(self, x, t):
        emb = self.map_noise(t)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # [sin, cos] order, as the checkpoints expect
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # channels_last: every layer's output is brought to it (a no-op where it already is), which
        # the stem convolution of a 1-channel input and the attention's reshapes do not keep
        layout = self.channels_last and x.device.type == "cpu"
        affine = self._affine_all(emb) if layout else {}
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb, affine.get(layer)) if isinstance(layer, UNetBlock) else layer(x)
            x = x.contiguous(memory_format=torch.channels_last) if layout else x
            skips.append(x)

        out = None
        for name, layer in self.dec.items():
            if name.endswith("_aux_norm"):
                out = layer.act(x)
            elif name.endswith("_aux_conv"):
                out = layer(out)
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb, affine.get(layer))
                x = x.contiguous(memory_format=torch.channels_last) if layout else x
        return out


def _affine_blocks(net):
    return [(name, layer) for part in (net.enc, net.dec) for name, layer in part.items()
            if isinstance(layer, UNetBlock)]


def _time_vector(t, x):
    """Accept t as a Python number, a 0-d tensor, [B] or [B, 1]; return float [B] on x's device."""
    t = torch.as_tensor(t, device=x.device)
    if not torch.is_floating_point(t):
        t = t.float()
    t = t.to(torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries but the batch has {x.shape[0]} images")
    return t
