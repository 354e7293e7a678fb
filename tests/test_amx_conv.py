"""models/amx_conv.py: the 3x3 convolutions on AMX tiles against a float64 convolution of the same bf16 inputs.

Skipped on CPUs without AMX-BF16 (the kernels are not built there and F.conv2d runs instead)."""
import pytest
import torch
import torch.nn.functional as F

from models import amx_conv, songunet

pytestmark = pytest.mark.skipif(not amx_conv.available()[0], reason="no AMX-BF16 tiles on this CPU")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bf16_ulp(values):
    """The spacing of bfloat16 numbers at ``values`` (float64): 2^(exponent - 7)."""
    return torch.ldexp(torch.ones_like(values), torch.frexp(values.abs().clamp_min(1e-30))[1] - 8)


def check_rounded(result, exact, magnitude, exact_share=0.97):
    """``result`` (bf16) is ``exact`` (float64) rounded to bf16, within one unit in the last place plus what float32
    accumulation may lose on a sum of this ``magnitude`` (the same sum of absolute values; it matters only where
    the sum cancels), and exactly so for most elements."""
    rounded = exact.to(torch.bfloat16)
    difference = (result.double() - exact).abs()
    assert bool((difference <= bf16_ulp(exact) + 2.0 ** -18 * magnitude).all()), difference.max()
    assert (result == rounded).double().mean().item() >= exact_share


def exact_convolution(x, w, b, g):
    """(output, gradients of x, w[, b]) in float64, and the same of the absolute values (the sums' magnitudes)."""
    results = []
    for transform in (lambda t: t.double(), lambda t: t.double().abs()):
        leaves = [transform(t.detach()).requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        y = F.conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, padding=1)
        results.append((y.detach(), *torch.autograd.grad(y, leaves, transform(g))))
    return results


def inputs(n, c, size, out, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=generator).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(out, c, 3, 3, generator=generator) / (3 * c ** 0.5)).to(torch.bfloat16)
    b = torch.randn(out, generator=generator).to(torch.bfloat16)
    g = torch.randn(n, out, size, size, generator=generator).to(torch.bfloat16)
    return x, w, b, g.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n, c, size, out", [(4, 64, 7, 64), (1, 32, 7, 32), (3, 96, 5, 64), (2, 128, 4, 32),
                                             (2, 64, 14, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_are_the_exact_results_rounded(n, c, size, out, with_bias):
    x, w, b, g = inputs(n, c, size, out, seed=n * 1000 + c + size)
    b = b if with_bias else None
    leaves = [x.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if with_bias else [])
    y = amx_conv._Conv3x3.apply(x, w, b)
    grads = torch.autograd.grad(y, leaves, g)
    exact, magnitude = exact_convolution(x, w, b, g)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    for result, value, size in zip((y, *grads), exact, magnitude):
        assert result.dtype == torch.bfloat16 and result.shape == value.shape
        check_rounded(result, value, size)


def test_the_conv_module_takes_the_kernels_only_where_they_apply(monkeypatch):
    calls = []
    real = amx_conv._Conv3x3.apply
    monkeypatch.setattr(amx_conv._Conv3x3, "apply", lambda *args: calls.append(args[0].shape) or real(*args))
    conv = songunet.Conv2d(64, 64, 3)
    x, _, _, _ = inputs(2, 64, 7, 64, seed=1)
    with torch.no_grad():
        y = conv(x.float().contiguous(memory_format=torch.channels_last), scale=None)   # float32: F.conv2d
        assert calls == [] and y.dtype == torch.float32
        with torch.autocast("cpu", torch.bfloat16):
            fast = conv(x)
        assert calls == [x.shape]
        big = inputs(1, 64, 28, 64, seed=2)[0]   # above MAX_PIXELS
        torch.set_num_threads(2)
        with torch.autocast("cpu", torch.bfloat16):
            conv(x)   # two intra-op threads: oneDNN's threaded convolution
        torch.set_num_threads(1)
        with torch.autocast("cpu", torch.bfloat16):
            conv(big)
            conv(x.contiguous())   # NCHW
            songunet.Conv2d(16, 64, 3)(inputs(1, 16, 7, 64, seed=3)[0])   # 16 channels: not a multiple of 32
    assert calls == [x.shape]
    exact, magnitude = exact_convolution(x, conv.weight.to(torch.bfloat16), conv.bias.to(torch.bfloat16),
                                         torch.ones_like(x))
    check_rounded(fast, exact[0], magnitude[0])


def test_the_applies_rule():
    x, w, _, _ = inputs(1, 64, 7, 64, seed=4)
    assert amx_conv.applies(x, w)
    assert not amx_conv.applies(x.float(), w) and not amx_conv.applies(x, w.float())
    assert not amx_conv.applies(x, w, max_pixels=48)
    assert not amx_conv.applies(x[:, :48], w[:, :48]) and not amx_conv.applies(x, w[:48])
    assert not amx_conv.applies(x, w[:, :32])   # the weight's input channels differ from x's
    assert not amx_conv.applies(x[:0], w)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:   # it counts aten operations: F.conv2d there, counted
        y = amx_conv.conv3x3(x, w)
    assert counter.get_total_flops() == 2 * 49 * 64 * 64 * 9 and y.shape == (1, 64, 7, 7)


def test_nonfinite_inputs_stay_nonfinite():
    x, w, b, _ = inputs(1, 32, 4, 32, seed=5)
    x[0, 3, 1, 2] = float("nan")
    x[0, 5, 3, 3] = float("inf")
    y = amx_conv._Conv3x3.apply(x, w, b)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(torch.isnan(y), torch.isnan(exact))
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(y), finite) and 0 < finite.sum() < finite.numel()
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), padding=1)
    check_rounded(y[finite], exact[finite], magnitude[finite])


def test_a_sharded_fast_path_training_run_follows_the_one_without_the_kernels(monkeypatch):
    """A U-Net whose 8x8 and 4x4 layers take the kernels (32 channels), trained 12 Adam steps in 2 batch shards
    on the bf16 fast path with shared weight casts, as the trainer runs it, against the same run on oneDNN's
    convolutions: the losses within 1% (measured: within 0.5%)."""
    from models import fast_cpu
    from models.songunet import SongUNet
    if not fast_cpu.choose("cpu", "bf16")[0]:
        pytest.skip("the bf16 CPU fast path is not available here")
    calls = []
    real = amx_conv._Conv3x3.apply
    monkeypatch.setattr(amx_conv._Conv3x3, "apply", lambda *args: calls.append(1) or real(*args))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    noise = torch.randn(8, 1, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    t = torch.rand(8, generator=generator)
    curves = {}
    for pixels in (amx_conv.MAX_PIXELS, 0):
        monkeypatch.setattr(amx_conv, "MAX_PIXELS", pixels)
        torch.manual_seed(0)
        net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=[1, 1],
                       num_blocks=1, attn_resolutions=[4], dropout=0.0)
        fast_cpu.apply([net], True)
        params = list(net.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
        shards = fast_cpu.thread_shards(2, "bf16")

        def losses(x, noise, t):
            with torch.autocast("cpu", torch.bfloat16):
                xt = t[:, None, None, None] * noise + (1 - t[:, None, None, None]) * x
                return (((net(xt, t).float() - (noise - x)) ** 2).mean(),)

        curve = []
        for _ in range(12):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                curve.append(losses(x, noise, t)[0].item())
            shards.step(losses, (x, noise, t), params)
            optimizer.step()
        curves[pixels] = curve
        if pixels:
            assert calls, "the kernels were not used"
            calls.clear()
        else:
            assert not calls
    first, second = curves.values()
    assert first[-1] < 0.9 * first[0]   # it trains
    for a, b in zip(first, second):
        assert abs(a - b) <= 0.01 * b, curves
