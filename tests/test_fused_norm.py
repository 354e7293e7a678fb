"""models/fused_norm.py and models/native/groupnorm_act.c, the bf16 CPU fast path's GroupNorm + SiLU + dropout
kernel, and the SongUNet channels_last path that uses it (models/fast_cpu.py, models/songunet.py,
utils/cpu_shards.sharded_forward).

Every kernel result is compared with an exact answer or with float64 references computed by
torch.nn.functional with autograd from the same input values. Tolerances (relative to the reference's
largest magnitude) are stated where they are used: float32 storage 1e-5; bfloat16 storage 1e-2 (its
rounding is 2^-9 relative per stored value).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import build_network, fast_cpu, fused_norm, songunet
from utils.cpu_shards import dropout_generator, sharded_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_TINY = os.path.join(ROOT, "configs", "tiny28_de.json")
GOLDEN_TINY = os.path.join(ROOT, "tests", "data", "golden_tiny28_de.pt")

_BUILT, _WHY = fused_norm.available()
pytestmark = pytest.mark.skipif(not _BUILT, reason=f"the fused GroupNorm kernel is not available: {_WHY}")

EPS = 1e-6
F32_TOL = 1e-5
BF16_TOL = 1e-2


# ---------------------------------------------------------------------------------------------- helpers

def channels_last(tensor):
    return tensor.contiguous(memory_format=torch.channels_last)


def make_inputs(shape, dtype, seed, scale=1.0, offset=0.0):
    """x (channels_last, requires grad), weight, bias (float32, require grad), grad_y (NCHW, x's dtype)."""
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)
    x = channels_last(x).requires_grad_()
    weight = (1 + 0.5 * torch.randn(c, generator=generator)).requires_grad_()
    bias = (0.5 * torch.randn(c, generator=generator)).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to(dtype)
    return x, weight, bias, grad_y


def reference(x, weight, bias, groups, silu, grad_y, mask=None):
    """(y, dx, dweight, dbias) of ``silu(group_norm(x)) * mask`` in float64 by F.group_norm and autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y = F.group_norm(x64, groups, w64, b64, EPS)
    if silu:
        y = F.silu(y)
    if mask is not None:
        y = y * mask.double()
    y.backward(grad_y.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


def rel_err(got, ref):
    """max |got - ref| / max |ref| (got converted to float64)."""
    return ((got.detach().double() - ref).abs().max() / ref.abs().max()).item()


def errors_of(got, ref):
    """rel_err of each of (y, dx, dweight, dbias) against its float64 reference, by name."""
    return {name: rel_err(g, r) for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, ref)}


def fused(x, weight, bias, groups, silu, grad_y, p=0.0, generator=None):
    """(y, dx, dweight, dbias) of the fused kernel (fresh gradients)."""
    for tensor in (x, weight, bias):
        tensor.grad = None
    y = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=silu, p=p, generator=generator)
    y.backward(grad_y)
    return y.detach(), x.grad, weight.grad, bias.grad


def mask_of(shape, p, keys):
    """The fused dropout's factors for an NCHW ``shape``, laid out in channels_last memory order."""
    n, c, h, w = shape
    return fused_norm.dropout_factors(n * c * h * w, p, keys).view(n, h, w, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------- 1. forward/backward vs float64

SHAPES = [  # (N, C, H, W), groups
    ((1, 8, 5, 5), 2),
    ((3, 12, 7, 7), 3),
    ((2, 24, 10, 10), 6),      # 1024 / 24 rows per tile: a partial last tile
    ((2, 64, 28, 28), 16),
    ((2, 128, 14, 14), 32),    # 196 pixels, 8 per tile: a partial last tile
    ((1, 1280, 3, 3), 32),     # more channels than a tile holds
    ((2, 48, 5, 7), 12),       # AVX-512 passes: no block of 64 channels, a tail of 3 registers
    ((1, 80, 3, 5), 20),       # one block of 64, a tail of 1 register; an odd pixel count (15)
]


@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}x{s[3]}g{g}" for s, g in SHAPES])
def test_forward_and_backward_match_float64_group_norm(shape, groups, dtype, tol, silu):
    x, weight, bias, grad_y = make_inputs(shape, dtype, seed=sum(shape) + groups)
    assert fused_norm.applies(x)
    y, dx, dw, db = fused(x, weight, bias, groups, silu, grad_y)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert dx.dtype == dtype and dw.dtype == torch.float32 and db.dtype == torch.float32
    errors = errors_of((y, dx, dw, db), reference(x, weight, bias, groups, silu, grad_y))
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
def test_large_common_offset_does_not_cancel_the_variance_fp32(silu):
    # randn * 0.01 + 100 in float32: one ulp of 100 is 7.6e-6, i.e. 7.6e-4 of the spread, so that is the
    # floor of any float32 GroupNorm here (the rounding of the input, of the mean, of x a + b). A variance
    # computed as E[x^2] - E[x]^2 in float32 would be off by ~1e4 * 6e-8 = 6e-4 against a variance of 1e-4.
    shape, groups = (2, 32, 9, 9), 8
    x, weight, bias, grad_y = make_inputs(shape, torch.float32, seed=11, scale=0.01, offset=100.0)
    y, dx, dw, db = fused(x, weight, bias, groups, silu, grad_y)
    errors = errors_of((y, dx, dw, db), reference(x, weight, bias, groups, silu, grad_y))
    assert max(errors.values()) <= 4e-3, errors
    # the normalised values of each group (weight 1, bias 0, no SiLU) have the variance var / (var + eps)
    ones, zeros = torch.ones(shape[1]), torch.zeros(shape[1])
    normalised = fused_norm.group_norm_act(x.detach(), ones, zeros, groups, EPS).double()
    per_group = normalised.reshape(shape[0], groups, -1)
    var = x.detach().double().reshape(shape[0], groups, -1).var(dim=2, unbiased=False)
    assert (per_group.var(dim=2, unbiased=False) - var / (var + EPS)).abs().max().item() < 2e-3
    assert per_group.mean(dim=2).abs().max().item() < 2e-3


def test_large_common_offset_bf16():
    # bfloat16 around 100 is quantised to steps of 0.5: a spread of 4 keeps the values distinct
    shape, groups = (2, 32, 9, 9), 8
    x, weight, bias, grad_y = make_inputs(shape, torch.bfloat16, seed=12, scale=4.0, offset=100.0)
    y, dx, dw, db = fused(x, weight, bias, groups, True, grad_y)
    errors = errors_of((y, dx, dw, db), reference(x, weight, bias, groups, True, grad_y))
    assert max(errors.values()) <= BF16_TOL, errors


@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
def test_bf16_outputs_are_the_float64_results_rounded_to_nearest(silu):
    # float32 arithmetic inside, then one round-to-nearest-even to bfloat16: (almost) every stored value is
    # the float64 result rounded, and none is more than one bf16 ulp away (truncation would fail both)
    shape, groups = (2, 64, 12, 12), 16
    x, weight, bias, grad_y = make_inputs(shape, torch.bfloat16, seed=13)
    y, dx, _, _ = fused(x, weight, bias, groups, silu, grad_y)
    y_ref, dx_ref, _, _ = reference(x, weight, bias, groups, silu, grad_y)
    rounded = y_ref.to(torch.bfloat16)
    ulp = torch.exp2(torch.floor(torch.log2(rounded.double().abs().clamp_min(1e-30))) - 7)
    assert (y == rounded).double().mean().item() >= 0.99
    assert ((y.double() - y_ref).abs() <= ulp).all()
    if not silu:   # with SiLU, dx takes the coarse (2 Newton steps) bf16 sigmoid: see the float64 test above
        assert (dx == dx_ref.to(torch.bfloat16)).double().mean().item() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_of_very_negative_pre_activations_is_zero_not_nan(dtype):
    # weight 0: the pre-activation of channel c is exactly bias[c]; silu(v) = v / (1 + e^-v) ~ -0 here
    x = channels_last(torch.randn(1, 8, 2, 2, generator=torch.Generator().manual_seed(0)).to(dtype))
    x.requires_grad_()
    weight = torch.zeros(8, requires_grad=True)
    bias = torch.tensor([-50.0, -87.0, -87.98, -88.0, -89.0, -100.0, -1e3, -1e30], requires_grad=True)
    y = fused_norm.group_norm_act(x, weight, bias, 2, EPS, silu=True)
    y.sum().backward()
    expected = F.silu(bias.detach().double())[None, :, None, None].expand(y.shape)
    assert torch.isfinite(y).all(), y[0, :, 0, 0]
    assert (y.double() - expected).abs().max().item() < 1e-20
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all() and torch.isfinite(bias.grad).all()


def test_groupnorm_module_takes_the_fused_path_and_its_threads_generator():
    norm = songunet.GroupNorm(32)   # 8 groups
    assert norm.num_groups == 8
    shape = (2, 32, 6, 6)
    x, weight, bias, _ = make_inputs(shape, torch.float32, seed=17)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    zeros = torch.zeros(shape)
    plain_ref = reference(x, weight, bias, 8, False, zeros)[0]
    silu_ref = reference(x, weight, bias, 8, True, zeros)[0]
    state = torch.get_rng_state()
    with torch.no_grad():
        assert rel_err(norm(x), plain_ref) <= F32_TOL
        assert rel_err(norm.act(x, P, training=False), silu_ref) <= F32_TOL   # eval: no dropout
        with dropout_generator(torch.Generator().manual_seed(3)):
            dropped = norm.act(x, P, training=True)
    assert torch.equal(torch.get_rng_state(), state)   # the mask came from the thread's generator
    mask = mask_of(shape, P, fused_norm.draw_seed(torch.Generator().manual_seed(3)))
    assert rel_err(dropped, silu_ref * mask.double()) <= F32_TOL


def test_bad_arguments_are_refused():
    x, weight, bias, _ = make_inputs((1, 8, 3, 3), torch.float32, seed=0)
    with pytest.raises(ValueError, match="dropout rate"):
        fused_norm.group_norm_act(x, weight, bias, 2, EPS, p=1.0)
    with pytest.raises(ValueError, match="dropout rate"):
        fused_norm.group_norm_act(x, weight, bias, 2, EPS, p=-0.1)
    with pytest.raises(ValueError, match="groups"):
        fused_norm.group_norm_act(x, weight, bias, 3, EPS)


# ------------------------------------------------------------------------------------------- 2. dropout

P = 0.3


def test_dropout_threshold_is_the_rounded_keep_probability():
    assert fused_norm.dropout_threshold(P) == (45875, 65536 / 45875)
    assert fused_norm.dropout_threshold(0.5) == (32768, 2.0)
    assert fused_norm.dropout_threshold(0.0) == (65536, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
def test_dropout_output_is_the_plain_output_times_the_memory_order_mask(silu, dtype):
    shape, groups = (2, 16, 6, 5), 4
    x, weight, bias, _ = make_inputs(shape, dtype, seed=21)
    keys = fused_norm.draw_seed(torch.Generator().manual_seed(1234))
    mask = mask_of(shape, P, keys)
    with torch.no_grad():
        plain = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=silu)
        dropped = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=silu, p=P,
                                            generator=torch.Generator().manual_seed(1234))
    kept, scale = fused_norm.dropout_threshold(P)
    assert mask.unique().tolist() == [0.0, pytest.approx(scale)]
    assert torch.equal(dropped == 0, (mask == 0) | (plain == 0))
    if dtype == torch.float32:   # one float32 product, as the kernel's: bit-identical
        assert torch.equal(dropped, plain * mask)
    else:                        # the kernel rounds to bf16 once, after the product
        assert rel_err(dropped, plain.double() * mask.double()) <= BF16_TOL
    y_ref = reference(x, weight, bias, groups, silu, torch.zeros(shape), mask=mask)[0]
    assert rel_err(dropped, y_ref) <= (F32_TOL if dtype == torch.float32 else BF16_TOL)


def test_dropout_mask_statistics():
    count = 2 ** 20
    kept, scale = fused_norm.dropout_threshold(P)
    q = kept / 65536
    factors = fused_norm.dropout_factors(count, P, fused_norm.draw_seed(torch.Generator().manual_seed(7)))
    keep = factors > 0
    assert factors.unique().tolist() == [0.0, pytest.approx(scale)]
    sigma = (count * q * (1 - q)) ** 0.5
    assert abs(keep.sum().item() - count * q) < 5 * sigma
    # the mean factor is 1 up to the binomial spread of the keep count
    assert abs(factors.double().mean().item() - 1) < 5 * scale * sigma / count
    # keep decisions of neighbours in memory (next channel, next pixel of a 64-channel tensor, next row of
    # a 64-channel 28-wide one) are uncorrelated: the standard error of each estimate is ~1e-3
    indicator = keep.double()
    for lag in (1, 2, 64, 64 * 28):
        corr = torch.corrcoef(torch.stack([indicator[:-lag], indicator[lag:]]))[0, 1].item()
        assert abs(corr) < 0.01, (lag, corr)


def test_dropout_masks_follow_the_seed():
    count = 2 ** 16
    q = fused_norm.dropout_threshold(P)[0] / 65536
    seed_a = fused_norm.draw_seed(torch.Generator().manual_seed(1))
    seed_b = fused_norm.draw_seed(torch.Generator().manual_seed(2))
    assert seed_a == fused_norm.draw_seed(torch.Generator().manual_seed(1))
    assert seed_a != seed_b
    mask_a = fused_norm.dropout_factors(count, P, seed_a) > 0
    assert torch.equal(mask_a, fused_norm.dropout_factors(count, P, seed_a) > 0)
    mask_b = fused_norm.dropout_factors(count, P, seed_b) > 0
    # independent masks agree on a fraction q^2 + (1-q)^2 of the elements (std 0.002 here)
    agreement = (mask_a == mask_b).double().mean().item()
    assert abs(agreement - (q * q + (1 - q) * (1 - q))) < 0.01

    # through group_norm_act: same generator seed, same mask; another seed, another; the global generator
    x, weight, bias, _ = make_inputs((2, 16, 8, 8), torch.float32, seed=3)
    with torch.no_grad():
        def run(generator):
            return fused_norm.group_norm_act(x, weight, bias, 4, EPS, silu=True, p=P, generator=generator)
        first = run(torch.Generator().manual_seed(5))
        assert torch.equal(first, run(torch.Generator().manual_seed(5)))
        assert not torch.equal(first == 0, run(torch.Generator().manual_seed(6)) == 0)
        torch.manual_seed(5)
        global_first = run(None)
        torch.manual_seed(5)
        assert torch.equal(global_first, run(None))
        assert torch.equal(global_first, first)   # the global generator seeded as the explicit one


@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
def test_dropout_backward_matches_float64_with_the_same_mask(silu):
    shape, groups = (3, 32, 7, 7), 8
    x, weight, bias, grad_y = make_inputs(shape, torch.float32, seed=31)
    mask = mask_of(shape, P, fused_norm.draw_seed(torch.Generator().manual_seed(99)))
    y, dx, dw, db = fused(x, weight, bias, groups, silu, grad_y, p=P, generator=torch.Generator().manual_seed(99))
    errors = errors_of((y, dx, dw, db), reference(x, weight, bias, groups, silu, grad_y, mask=mask))
    assert max(errors.values()) <= F32_TOL, errors


# ------------------------------------------------------------------------------------- 3. thread count

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_do_not_depend_on_the_thread_count(dtype):
    shape, groups = (3, 32, 12, 12), 8   # 3 samples: an uneven split over 2 threads
    x, weight, bias, grad_y = make_inputs(shape, dtype, seed=41)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = fused(x, weight, bias, groups, True, grad_y, p=0.2,
                                     generator=torch.Generator().manual_seed(8))
    finally:
        torch.set_num_threads(previous)
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2) = results[1], results[2]
    assert torch.equal(y1, y2)
    assert torch.equal(dx1, dx2)
    # the parameter gradients add the per-sample sums in another order with more threads
    for one, two in ((dw1, dw2), (db1, db2)):
        torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6 * one.abs().max().item())


# ----------------------------------------------------------------------------------------- 4. applies()

def test_applies_only_to_channels_last_cpu_float32_and_bfloat16():
    base = torch.randn(2, 8, 5, 5)
    assert fused_norm.applies(channels_last(base))
    assert fused_norm.applies(channels_last(base.bfloat16()))
    assert not fused_norm.applies(base)                                 # NCHW
    assert not fused_norm.applies(channels_last(base.double()))         # float64
    assert not fused_norm.applies(channels_last(base.half()))           # float16
    assert not fused_norm.applies(channels_last(torch.randn(2, 1, 5, 5)))   # also NCHW-contiguous
    assert not fused_norm.applies(channels_last(torch.randn(2, 8, 1, 1)))   # also NCHW-contiguous
    assert not fused_norm.applies(channels_last(base)[:, :, ::2])       # a strided view
    assert not fused_norm.applies(torch.randn(8, 5, 5))                 # 3-D
    assert not fused_norm.applies(torch.randn(1, 2, 8, 5, 5).contiguous(memory_format=torch.channels_last_3d))
    assert not fused_norm.applies(torch.empty(2, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last))


# --------------------------------------------------------------------------------------- 5. SongUNet

def tiny_config(**changes):
    with open(CONFIG_TINY) as handle:
        return dict(json.load(handle), **changes)


def tiny_net(seed=0, **changes):
    """A tiny SongUNet whose parameters are all random at unit gain (the init's gain-1e-5 output
    convolutions and the unit GroupNorm weights would hide most of what the blocks compute)."""
    torch.manual_seed(seed)
    net = build_network(tiny_config(**changes))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.dim() > 1:
                param.normal_(0, param[0].numel() ** -0.5)
            elif name.endswith("norm0.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("aux_norm.weight"):
                param.normal_(1, 0.2)
            else:
                param.normal_(0, 0.2)
    return net


def tiny_batch(size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 28, 28, generator=generator), torch.rand(size, generator=generator)


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the calls of fused_norm.group_norm_act (the network must really take the fused path)."""
    calls = []
    original = fused_norm.group_norm_act

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_norm, "group_norm_act", counting)
    return calls


def norms_of(net):
    """GroupNorm modules of ``net``: each runs once per forward."""
    return sum(isinstance(module, songunet.GroupNorm) for module in net.modules())


def run_net(net, x, t, fast, autocast=False):
    net.set_channels_last(fast)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return net._forward(x, t)   # in one piece (net(x, t) would shard on several threads)


def test_unet_channels_last_fp32_matches_nchw(count_fused):
    net = tiny_net().eval()
    x, t = tiny_batch(2)
    nchw = run_net(net, x, t, False)
    assert not count_fused
    fast = run_net(net, x, t, True)
    assert len(count_fused) == norms_of(net) and set(count_fused) == {torch.float32}   # every GroupNorm
    assert fast.dtype == nchw.dtype == torch.float32
    assert rel_err(fast, nchw.double()) <= 1e-4


def test_unet_channels_last_fp32_reproduces_golden():
    data = torch.load(GOLDEN_TINY, weights_only=True)
    net = build_network(data["config"])
    net.load_state_dict(data["state_dict"], strict=True)
    out = run_net(net.eval(), data["x"], data["t"], True)
    assert rel_err(out, data["y"].double()) <= 1e-4


def test_unet_channels_last_bf16_autocast_matches_nchw(count_fused):
    # the golden network's trained weights (random unit-gain ones amplify bf16 rounding to ~2.5e-2 in either
    # layout); measured: fast vs NCHW bf16 1.5e-2, each 1.2-1.3e-2 from the float32 golden output
    data = torch.load(GOLDEN_TINY, weights_only=True)
    net = build_network(data["config"])
    net.load_state_dict(data["state_dict"], strict=True)
    net.eval()
    x, t = data["x"], data["t"]
    nchw = run_net(net, x, t, False, autocast=True)
    reference_fp32 = data["y"]
    assert not count_fused
    fast = run_net(net, x, t, True, autocast=True)
    assert len(count_fused) == norms_of(net) and set(count_fused) == {torch.bfloat16}
    assert fast.dtype == nchw.dtype
    assert rel_err(fast, nchw.double()) <= 3e-2
    assert rel_err(fast, reference_fp32.double()) <= 3e-2


def test_unet_channels_last_training_gradients_match_nchw(count_fused):
    x, t = tiny_batch(2)
    target = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    grads = {}
    for fast in (False, True):
        net = tiny_net(dropout=0.0).train()
        net.set_channels_last(fast)
        loss = ((net(x, t) - target) ** 2).mean()
        loss.backward()
        grads[fast] = {name: param.grad.clone() for name, param in net.named_parameters()}
    assert len(count_fused) == norms_of(net) and set(count_fused) == {torch.float32}
    assert grads[False].keys() == grads[True].keys()
    for name, ref in grads[False].items():
        scale = ref.abs().max().item()
        assert scale > 0, name
        assert (grads[True][name] - ref).abs().max().item() <= 1e-4 * scale, name


def test_set_channels_last_leaves_the_state_dict_alone():
    net = tiny_net()
    before = {key: (value.shape, value.dtype) for key, value in net.state_dict().items()}
    values = {key: value.clone() for key, value in net.state_dict().items()}
    assert fast_cpu.apply([None, net], True) is True
    assert net.channels_last
    x, t = tiny_batch(2)
    run_net(net.eval(), x, t, True)
    after = net.state_dict()
    assert list(after) == list(before)
    assert {key: (value.shape, value.dtype) for key, value in after.items()} == before
    assert all(torch.equal(after[key], values[key]) for key in values)
    assert all(value.is_contiguous() for value in after.values() if value is not None)
    fast_cpu.apply([net], False)
    assert not net.channels_last


# ---------------------------------------------------------------------------------- 6. sharded_forward

@pytest.mark.parametrize("fast", [False, True], ids=["nchw", "channels_last"])
def test_sharded_forward_equals_one_piece(fast):
    net = tiny_net().eval()
    net.set_channels_last(fast)
    x, t = tiny_batch(3)   # shards of 2 and 1
    previous = torch.get_num_threads()
    with torch.no_grad():
        whole = net._forward(x, t)
        sharded = sharded_forward(net._forward, (x, t), 2)
    assert torch.get_num_threads() == previous
    assert sharded.shape == whole.shape and sharded.dtype == whole.dtype
    torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_sharded_forward_keeps_autocast():
    net = tiny_net().eval()
    net.set_channels_last(True)
    x, t = tiny_batch(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = net._forward(x, t)
        sharded = sharded_forward(net._forward, (x, t), 2)
    assert whole.dtype == torch.bfloat16
    assert sharded.dtype == whole.dtype
    assert rel_err(sharded, whole.double()) <= 3e-2


def test_eval_forward_on_two_threads_shards_and_matches(monkeypatch):
    calls = []
    original = songunet.sharded_forward

    def counting(fn, tensors, shards):
        calls.append(shards)
        return original(fn, tensors, shards)

    monkeypatch.setattr(songunet, "sharded_forward", counting)
    net = tiny_net().eval()
    net.set_channels_last(True)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for batch, shards in ((2 * net.SHARD_MIN_SAMPLES, 2), (2, 1)):   # a small network: 2 shards of 16, or
            x, t = tiny_batch(batch)                                      # one worker thread for 2 samples
            calls.clear()
            with torch.no_grad():
                out = net(x, t)
                whole = net._forward(x, t)
            assert calls == [shards]
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    finally:
        torch.set_num_threads(previous)


def test_sampling_shards_need_enough_work_per_shard():
    net = tiny_net().eval()
    flops = net.sample_flops()
    x, t = tiny_batch(3)
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t)
    assert counter.get_total_flops() == 3 * flops   # per-sample work, counted on a batch of 1
    assert flops * 2 * net.SHARD_MIN_SAMPLES < net.SHARD_MIN_FLOPS   # the tiny network: the sample count decides
    assert net.sampling_shards(32, 2) == (2, False)
    assert net.sampling_shards(31, 2) == (1, True)    # 15 per shard: one worker thread
    assert net.sampling_shards(64, 4) == (4, False)
    assert net.sampling_shards(40, 4) == (2, False)   # 20 per shard on 2 of the 4 threads
    net._sample_flops = 10e9   # a large network (cifar10_de: 42 GFLOP per sample): the work decides
    assert net.sampling_shards(2, 2) == (2, False)
    assert net.sampling_shards(1, 2) == (1, False)    # one sample, enough work: the intra-op threads


# ---------------------------------------------------------------------------- 7. choose() and the switch

def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_choose():
    assert fast_cpu.choose("cpu", "bf16")[0] is True   # the kernel is available (else this module skips)
    assert fast_cpu.choose("cpu", "none")[0] is False
    assert fast_cpu.choose("cuda", "bf16")[0] is False
    assert fast_cpu.choose("cpu", "bf16", compiled=True)[0] is False


def test_fast_ode_native_0_turns_the_fast_path_off():
    lines = run_python(
        "import torch\n"
        "from models import fast_cpu, fused_norm\n"
        "print(fast_cpu.choose('cpu', 'bf16'))\n"
        "print(fused_norm.available())\n"
        "print(fused_norm.applies(torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)))\n",
        FAST_ODE_NATIVE="0")
    assert lines == ["(False, 'FAST_ODE_NATIVE=0')", "(False, 'FAST_ODE_NATIVE=0')", "False"]


# ----------------------------------------------------------------------------------------- 8. the cache

def test_build_cache_holds_one_library_and_no_partial_file(tmp_path):
    cache = tmp_path / "cache" / "fast_ode"   # not there yet
    code = "from models import fused_norm\nprint(fused_norm.available())\n"
    first = run_python(code, FAST_ODE_CACHE=str(cache))
    assert first[0].startswith(f"(True, 'compiled {cache / 'groupnorm_act-'}"), first
    files = sorted(path.name for path in cache.iterdir())
    libraries = [name for name in files if name.startswith("groupnorm_act-") and name.endswith(".so")]
    assert len(libraries) == 1, files
    assert not [name for name in files if name.endswith(".part")], files
    assert files == libraries
    assert libraries[0] in first[0]
    # a second process loads the library it finds instead of building it again
    stat = (cache / libraries[0]).stat()
    second = run_python(code, FAST_ODE_CACHE=str(cache))
    assert second == [first[0].replace("'compiled ", "'loaded ", 1)], (first, second)
    assert sorted(path.name for path in cache.iterdir()) == files
    again = (cache / libraries[0]).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


# ------------------------------------------------------ the residual pass-through and the C addition

THROUGH_SHAPES = [((2, 64, 7, 9), 16), ((2, 24, 5, 5), 6)]   # AVX-512 passes (C % 16 == 0); portable loops


@pytest.mark.parametrize("through", [0.5 ** 0.5, 1.0], ids=["scaled", "identity"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,groups", THROUGH_SHAPES, ids=[f"C{s[1]}" for s, _ in THROUGH_SHAPES])
def test_pass_through_output_and_its_gradient_match_float64(shape, groups, dtype, tol, through):
    # y = silu(GN(x)), r = through * x; the loss <y, gy> + <r, gr>: dx = dGN + through * gr
    x, weight, bias, grad_y = make_inputs(shape, dtype, seed=61)
    grad_r = torch.randn(shape, generator=torch.Generator().manual_seed(62)).to(dtype)
    y, r = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=True, through=through)
    if through == 1.0:
        assert r.data_ptr() == x.data_ptr()   # x itself, no copy
    else:   # the float32 product (of x and float32(through)), rounded to the storage type
        assert torch.equal(r.detach(), (x.detach().float() * torch.tensor(through, dtype=torch.float32)).to(dtype))
    torch.autograd.backward((y, r), (grad_y, grad_r))
    x64 = x.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = F.silu(F.group_norm(x64, groups, w64, b64, EPS))
    torch.autograd.backward((y64, x64 * through), (grad_y.double(), grad_r.double()))
    errors = errors_of((y, x.grad, weight.grad, bias.grad), (y64.detach(), x64.grad, w64.grad, b64.grad))
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("shape,groups", THROUGH_SHAPES, ids=[f"C{s[1]}" for s, _ in THROUGH_SHAPES])
def test_pass_through_alone_has_the_scaled_gradient(shape, groups):
    x, weight, bias, _ = make_inputs(shape, torch.float32, seed=63)
    _, r = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=True, through=0.25)
    grad_r = torch.randn(shape, generator=torch.Generator().manual_seed(64))
    r.backward(grad_r)
    assert torch.allclose(x.grad, 0.25 * grad_r, rtol=0, atol=1e-7)
    assert weight.grad.abs().max().item() == 0 and bias.grad.abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 64, 7, 9), (1, 8, 3, 3), (3, 48, 11, 13)], ids=["C64", "C8", "C48"])
def test_add_in_place_equals_torch_add_and_passes_the_gradient_to_both(shape, dtype):
    generator = torch.Generator().manual_seed(65)
    a = channels_last(torch.randn(shape, generator=generator).to(dtype))
    b = channels_last(torch.randn(shape, generator=generator).to(dtype) * 3)
    expected = a + b   # float32 arithmetic, rounded once: what the kernel does
    leaf_a, leaf_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    target = leaf_a * 1   # a non-leaf to add into
    out = fused_norm.add_(target, leaf_b)
    assert out.data_ptr() == target.data_ptr()
    assert torch.equal(out.detach(), expected)
    grad = torch.randn(shape, generator=generator).to(dtype)
    out.backward(grad)
    assert torch.equal(leaf_a.grad, grad) and torch.equal(leaf_b.grad, grad)


def test_add_in_place_falls_back_to_torch_for_other_layouts():
    a = torch.randn(2, 16, 4, 4)
    b = channels_last(torch.randn(2, 16, 4, 4))
    expected = a + b
    assert torch.equal(fused_norm.add_(a, b), expected)   # NCHW target: PyTorch's add_


@pytest.mark.parametrize("scale", [None, 0.5 ** 0.5], ids=["plain", "scaled"])
def test_fast_path_1x1_convolution_is_the_convolution_with_the_parameters_gradient_layout(scale):
    conv = songunet.Conv2d(48, 32, 1)
    with torch.no_grad():   # a non-zero bias (it starts at zero)
        conv.bias.normal_(generator=torch.Generator().manual_seed(70))
    generator = torch.Generator().manual_seed(71)
    x = channels_last(torch.randn(2, 48, 5, 7, generator=generator, dtype=torch.float64)).float().requires_grad_()
    grad = torch.randn(2, 32, 5, 7, generator=generator)
    out = conv(x, scale=scale)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    s = 1.0 if scale is None else scale
    ref = F.conv2d(x64, w64 * s, b64 * s)
    ref.backward(grad.double())
    assert rel_err(out, ref.detach()) <= F32_TOL
    assert rel_err(x.grad, x64.grad) <= F32_TOL and rel_err(conv.weight.grad, w64.grad) <= F32_TOL
    assert rel_err(conv.bias.grad, b64.grad) <= F32_TOL
    assert conv.weight.grad.stride() == conv.weight.stride()   # what DDP's buckets expect


# ---------------------------------------------------- the portable loops, built without AVX-512

@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):
    """The kernel source built for x86-64-v3 (AVX2, no AVX-512): the portable C loops for every channel count,
    as on CPUs without AVX-512. Warnings are errors (GCC 14 rejects implicit declarations outright)."""
    import ctypes
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is checked on x86")
    target = tmp_path_factory.mktemp("portable") / "groupnorm_act_portable.so"
    flags = [flag for flag in fused_norm.FLAGS if not flag.startswith(("-march", "-mprefer"))]
    result = subprocess.run([os.environ.get("CC", "cc"), "-march=x86-64-v3", "-Wall", "-Wextra", "-Werror", *flags,
                             str(fused_norm.SOURCE), "-o", str(target), "-lm"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return fused_norm._bind(ctypes.CDLL(str(target)))


def test_portable_loops_match_the_native_build_and_float64(portable_library, monkeypatch):
    shape, groups = (2, 64, 7, 9), 16   # C % 16 == 0: the native build takes its AVX-512 passes here
    results = {}
    for name in ("native", "portable"):
        if name == "portable":
            monkeypatch.setattr(fused_norm, "_load", lambda: (portable_library, "portable build"))
        outputs = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, weight, bias, grad_y = make_inputs(shape, dtype, seed=81)
            grad_r = torch.randn(shape, generator=torch.Generator().manual_seed(82)).to(dtype)
            add = (0.3 * torch.randn(2, 64, generator=torch.Generator().manual_seed(83))).requires_grad_()
            y = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=True, p=P, add=add,
                                          generator=torch.Generator().manual_seed(84))
            h, r = fused_norm.group_norm_act(x, weight, bias, groups, EPS, silu=True, through=0.5)
            total = fused_norm.add_(h * 1, r)
            torch.autograd.backward((y, total), (grad_y, grad_r))
            outputs[dtype] = [t.detach().clone() for t in (y, total, x.grad, weight.grad, bias.grad, add.grad)]
        results[name] = outputs
    for dtype, tol in ((torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)):
        native, portable = results["native"][dtype], results["portable"][dtype]
        assert torch.equal(native[0] == 0, portable[0] == 0)   # the same dropout mask
        for got, ref in zip(portable, native):
            assert rel_err(got, ref.double()) <= tol
    # and the portable build against float64 (float32 storage)
    x, weight, bias, grad_y = make_inputs(shape, torch.float32, seed=85)
    monkeypatch.setattr(fused_norm, "_load", lambda: (portable_library, "portable build"))
    y, dx, dw, db = fused(x, weight, bias, groups, True, grad_y)
    assert max(errors_of((y, dx, dw, db), reference(x, weight, bias, groups, True, grad_y)).values()) <= F32_TOL


# ------------------------------------------------------------------ many tensors at once (the shard steps)

def test_cast_many_equals_torch_scaled_casts_bit_for_bit():
    """``cast_many``: ``(t * s).to(bf16)`` of every tensor, in one C call: the float32 product and the
    round-to-nearest-even conversion are torch's, so the bits are equal (infinities included; NaN stays NaN). Enough
    elements to split among two threads, and tensors of a few elements."""
    generator = torch.Generator().manual_seed(11)
    tensors = [torch.randn(64, 64, 3, 3, generator=generator) * 10.0 ** e for e in (-30, 0, 30)]
    tensors += [torch.randn(3, generator=generator), torch.randn(200000, generator=generator),
                torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, 1.0e-40, -0.0])]
    scales = [0.5 ** 0.5, 1.0, 3.0, 1.0, 0.7, 1.0]
    for threads in (1, 2, 3):
        got = fused_norm.cast_many(tensors, scales, threads)
        for t, s, g in zip(tensors, scales, got):
            want = (t * s).to(torch.bfloat16)
            assert g.dtype == torch.bfloat16 and g.shape == t.shape
            number = ~want.isnan()   # NaN stays NaN (its sign and payload bits are not specified)
            assert torch.equal(g.isnan(), want.isnan())
            assert torch.equal(g[number].view(torch.int16), want[number].view(torch.int16)), (threads, t.shape)
    assert fused_norm.cast_many([tensors[0].transpose(0, 1)], [1.0]) is None   # not contiguous: the caller's job
    assert fused_norm.cast_many([tensors[0].double()], [1.0]) is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_sum_many_equals_torch_float32_sums_bit_for_bit(layout):
    """``sum_many``: each parameter's bf16 shard gradients, each in float32 times its scale, added in order into
    the parameter's own (contiguous) layout: equal to ``g0.float() * s + g1.float() * s + ...`` bit for bit (what
    autograd gives with per-shard casts), whatever layout each gradient came in (a convolution of channels_last
    activations returns channels_last weight gradients), with absent (None) gradients skipped."""
    generator = torch.Generator().manual_seed(12)
    likes = [torch.empty(64, 32, 3, 3), torch.empty(16, 8, 1, 1), torch.empty(64), torch.empty(96, 64, 3, 3)]
    scales = [0.5 ** 0.5, 1.0, 2.0, 1.0]

    def grad(like, index):
        g = torch.randn(like.shape, generator=generator).to(torch.bfloat16)
        cl = like.dim() == 4 and (layout == "channels_last" or (layout == "mixed" and index == 1))
        return g.contiguous(memory_format=torch.channels_last) if cl else g

    sources = [[grad(like, 0), grad(like, 1), grad(like, 2)] for like in likes]
    sources[2][1] = None
    if layout == "channels_last":
        assert not sources[0][0].is_contiguous()   # the case this is about
    got = fused_norm.sum_many(likes, sources, scales, 2)
    for like, grads, s, g in zip(likes, sources, scales, got):
        present = [x.float() * s for x in grads if x is not None]
        want = torch.empty_like(like).copy_(present[0])
        for x in present[1:]:
            want.add_(x)
        assert g.is_contiguous() and g.dtype == torch.float32
        assert torch.equal(g, want)
    assert fused_norm.sum_many([likes[0]], [[sources[0][0].float(), None, None]], [1.0]) is None   # not bf16


def test_fast_path_computes_every_blocks_affine_in_one_matmul_with_the_same_numbers():
    """The fast path computes all blocks' time-embedding projections (``affine(emb)``) in one matmul of the
    concatenated weights: each block gets the numbers its own ``affine`` gives (float32: the same dot products,
    to rounding; bf16 autocast: within bf16's rounding), in its own slot, and the gradients reach each block's
    weights as through its own layer."""
    with open(CONFIG_TINY) as handle:
        torch.manual_seed(3)
        net = build_network(dict(json.load(handle), dropout=0.0))
    blocks = songunet._affine_blocks(net)
    assert len(blocks) > 3
    generator = torch.Generator().manual_seed(4)
    for block in (b for _, b in blocks):   # distinct biases, so that a block given another's slot shows
        block.affine.bias.data.normal_(generator=generator)
    emb = torch.randn(3, blocks[0][1].affine.in_features, generator=generator)
    together = net._affine_all(emb)
    assert list(together) == [block for _, block in blocks]   # the encoder and decoder reuse block names
    for _, block in blocks:
        alone = block.affine(emb)
        torch.testing.assert_close(together[block], alone, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        together = net._affine_all(emb.bfloat16())
        for _, block in blocks:
            alone = block.affine(emb.bfloat16()).float()
            assert together[block].dtype == torch.bfloat16
            assert (together[block].float() - alone).abs().max() <= BF16_TOL * alone.abs().max()
    weights = [block.affine.weight for _, block in blocks]
    probe = [torch.randn(3, block.affine.out_features, generator=generator) for _, block in blocks]
    loss = sum((out * p).sum() for out, p in zip(net._affine_all(emb).values(), probe))
    got = torch.autograd.grad(loss, weights)
    loss = sum((block.affine(emb) * p).sum() for (_, block), p in zip(blocks, probe))
    want = torch.autograd.grad(loss, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fast_path_network_output_is_the_same_with_the_affines_in_one_matmul(monkeypatch):
    """The whole network on the fast path (float32 storage, so that rounding stays far below a mix-up): the
    outputs with the blocks' projections in one matmul equal those with each block's own ``affine``, so every
    block (the encoder's and decoder's reuse names) is handed its own slot."""
    with open(CONFIG_TINY) as handle:
        torch.manual_seed(5)
        net = build_network(dict(json.load(handle), dropout=0.0))
    generator = torch.Generator().manual_seed(6)
    for _, block in songunet._affine_blocks(net):
        block.affine.bias.data.normal_(generator=generator)
        block.conv1.weight.data.normal_(std=0.05, generator=generator)   # initialised ~1e-5: the branch would not show
    net.dec["28x28_aux_conv"].weight.data.normal_(generator=generator)   # an output that is not ~0
    fast_cpu.apply([net], True)
    net.eval()
    x = channels_last(torch.randn(3, 1, 28, 28, generator=generator))
    t = torch.rand(3, generator=generator)
    with torch.no_grad():
        together = net(x, t)
        monkeypatch.setattr(songunet.SongUNet, "_affine_all", lambda self, emb: {})
        alone = net(x, t)
    assert together.abs().max() > 0.1
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keep_masks_stored_by_the_forward_give_the_recomputed_masks_results(dtype, monkeypatch):
    """Where the AVX-512 passes run, the forward stores each 16 elements' dropout keep mask (16 bits) and the
    backward reads it instead of hashing again: the outputs and every gradient equal, bit for bit, those of the
    backward that recomputes the masks (the portable loops' way)."""
    library = fused_norm._load()[0]
    if not library.fo_mask_ok(64):
        pytest.skip("no AVX-512 passes in this build: the masks are always recomputed")
    results = []
    for stored in (True, False):
        if not stored:
            monkeypatch.setattr(library, "fo_mask_ok", lambda channels: 0)
        x, weight, bias, grad_y = make_inputs((3, 64, 9, 7), dtype, seed=91)
        add = (0.3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(92))).requires_grad_()
        y = fused_norm.group_norm_act(x, weight, bias, 16, EPS, silu=True, p=0.3, add=add,
                                      generator=torch.Generator().manual_seed(93))
        y.backward(grad_y)
        results.append([t.detach().clone() for t in (y, x.grad, weight.grad, bias.grad, add.grad)])
    assert (results[0][0] == 0).float().mean() > 0.2   # dropout did drop
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fast_path_attention_takes_the_explicit_softmax_and_matches_sdpa():
    """On the fast path an attention block computes the explicit (einsum + float32 softmax) attention, faster
    than ``scaled_dot_product_attention`` under bf16 autocast on a CPU: its output is exactly that path's, and
    within bf16 rounding of the sdpa path's."""
    torch.manual_seed(7)
    block = songunet.UNetBlock(64, 64, 128, attention=True, dropout=0.0).eval()
    block.proj.weight.data.normal_(std=0.05)   # initialised ~1e-5: the attention would not show in the output
    x = channels_last(torch.randn(2, 64, 7, 7)).bfloat16()
    emb = torch.randn(2, 128)
    outputs = {}
    captured = []
    original = songunet.attention

    def spy(q, k, v, use_sdpa=True):
        captured.append(use_sdpa)
        return original(q, k, v, use_sdpa=use_sdpa)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        songunet.attention = spy
        try:
            outputs["fast"] = block(x, emb).float()
        finally:
            songunet.attention = original
        for sdpa in (True, False):
            def forced(q, k, v, use_sdpa=True, sdpa=sdpa):
                return original(q, k, v, use_sdpa=sdpa)
            songunet.attention = forced
            try:
                outputs[sdpa] = block(x, emb).float()
            finally:
                songunet.attention = original
    assert captured == [False]
    assert torch.equal(outputs["fast"], outputs[False])
    assert (outputs[True] - outputs[False]).abs().max() <= BF16_TOL * outputs[False].abs().max()
    assert (outputs[True] - outputs[False]).abs().max() > 0   # the two paths are distinguishable here
