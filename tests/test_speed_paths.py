"""The fast paths compute the same function as the plain fp32 path.

Covers: bf16 autocast (close to fp32 within a stated tolerance), SDPA vs
einsum attention, channels_last, the avg-pool downsampling and in-place
residual arithmetic of ``models/songunet.py`` (checked against the plain
formulas and by gradcheck), its CPU dropout (mask statistics, seeding,
gradient), the convolution replay of ``benchmarks/network_speed.py``, ``torch.compile`` (marked ``slow``: a cold
compile takes minutes on a 2-core CPU), and the same checks on a GPU (marked
``cuda``, skipped without one; ``benchmarks/gpu_check.sh`` runs them).

Tolerances:
- fp32 paths that only reorder float operations (SDPA vs einsum,
  channels_last, compile): max abs error 1e-5 on outputs of std ~0.1-0.4
  (compile 1e-4, as the goldens); golden match 1e-4 as in
  ``tests/data`` (``../shared/reference/README.md``).
- bf16 autocast: RMS error <= 5e-2 x the fp32 output's std, and max error
  <= 0.5 x std. bf16 keeps 8 significant bits (relative rounding error up to
  2^-9 ~ 2e-3 per rounding); the ~20 layers of a tiny U-Net round weights and
  activations again at every layer, and these errors add up like a random walk,
  so a few percent RMS is expected: measured 1.1-2.7% on the goldens and on
  three perturbed random tiny28 networks (max error 7-30% of std, in single
  elements). The bounds leave ~2x margin and still catch a layer that is wrong
  in bf16 (errors of order 100% of std).
"""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from models import build_encoder, build_network
from models.losses import flow_matching_loss, kl_per_dim
from models.flow import interpolate
from models import songunet
from models.songunet import Conv2d, SongUNet
from utils.errors import UserError

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_NETWORKS = ("golden_tiny28_de", "golden_tiny32_en")
BF16_RMS_TOLERANCE = 5e-2   # RMS error / std of the fp32 output
BF16_MAX_TOLERANCE = 0.5    # max abs error / std of the fp32 output

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load_golden(name, device="cpu"):
    data = torch.load(os.path.join(DATA, f"{name}.pt"), weights_only=True)
    net = build_network(data["config"])
    net.load_state_dict(data["state_dict"])
    return net.eval().to(device), data


def load_config(name):
    with open(os.path.join(ROOT, "configs", name)) as handle:
        return json.load(handle)


def perturbed(module, seed, scale=0.05):
    """``module`` with every parameter moved by N(0, scale^2), so the zero-initialised output layer is not 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return module


def bf16_errors(reference, bf16_output):
    """(RMS error, max abs error), each divided by the std of the fp32 reference."""
    error = bf16_output.float() - reference
    std = reference.std()
    return (error.square().mean().sqrt() / std).item(), (error.abs().max() / std).item()


@pytest.fixture
def no_tf32():
    """Full fp32 on CUDA for the duration of a test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------
# CPU.

@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
def test_sdpa_and_einsum_attention_agree_on_goldens(name):
    net, data = load_golden(name)
    outputs = {}
    for use_sdpa in (True, False):
        net.set_sdpa(use_sdpa)
        with torch.no_grad():
            outputs[use_sdpa] = net(data["x"], data["t"])
        assert (outputs[use_sdpa] - data["y"]).abs().max().item() < 1e-4
    assert (outputs[True] - outputs[False]).abs().max().item() < 1e-5


def test_sdpa_and_einsum_attention_agree_on_gradients():
    net, data = load_golden("golden_tiny32_en")  # attention at 16x16
    net.train()
    grads = {}
    for use_sdpa in (True, False):
        net.set_sdpa(use_sdpa)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks for both
        net(data["x"], data["t"]).square().mean().backward()
        grads[use_sdpa] = [p.grad.clone() for p in net.parameters()]
    for with_sdpa, with_einsum in zip(grads[True], grads[False]):
        assert (with_sdpa - with_einsum).abs().max().item() <= 1e-4 * with_einsum.abs().max().item() + 1e-9


@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
def test_channels_last_gives_the_same_output(name):
    net, data = load_golden(name)
    with torch.no_grad():
        expected = net(data["x"], data["t"])
        net = net.to(memory_format=torch.channels_last)
        output = net(data["x"].contiguous(memory_format=torch.channels_last), data["t"])
    assert (output - expected).abs().max().item() < 1e-5
    assert (output - data["y"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
def test_bf16_autocast_close_to_fp32_on_goldens(name):
    net, data = load_golden(name)
    with torch.no_grad():
        reference = net(data["x"], data["t"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = net(data["x"], data["t"])
    assert output.dtype == torch.bfloat16
    rms, worst = bf16_errors(reference, output)
    assert rms < BF16_RMS_TOLERANCE, f"RMS error {rms:.4f} x std"
    assert worst < BF16_MAX_TOLERANCE, f"max error {worst:.4f} x std"


@pytest.mark.parametrize("config", ["tiny28_de.json", "tiny28_en.json"])
def test_bf16_autocast_close_to_fp32_on_tiny_configs(config):
    torch.manual_seed(0)
    net = perturbed(build_network(load_config(config)), seed=1).eval()
    generator = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 1, 28, 28, generator=generator), torch.rand(4, generator=generator)
    with torch.no_grad():
        reference = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = net(x, t)
    rms, worst = bf16_errors(reference, output)
    assert rms < BF16_RMS_TOLERANCE, f"RMS error {rms:.4f} x std"
    assert worst < BF16_MAX_TOLERANCE, f"max error {worst:.4f} x std"


def learned_coupling_grads(net, encoder, x, t, noise, amp, device_type="cpu"):
    """Gradients of the learned-coupling loss (weight_prior 20) for both networks, fp32 or bf16 autocast."""
    net.zero_grad(set_to_none=True)
    encoder.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        z, mu, logvar = encoder(x, noise=noise)
        loss = flow_matching_loss(net(interpolate(x, z, t), t), x, z) + 20 * kl_per_dim(mu.float(), logvar.float())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in list(net.parameters()) + list(encoder.parameters())])


def test_bf16_training_step_gradients_follow_fp32():
    torch.manual_seed(0)
    net = perturbed(build_network(dict(load_config("tiny28_de.json"), dropout=0.0)), seed=1).train()
    encoder = perturbed(build_encoder(load_config("tiny28_en.json")), seed=2).train()
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1
    noise, t = torch.randn(4, 1, 28, 28, generator=generator), torch.rand(4, generator=generator)
    loss32, grad32 = learned_coupling_grads(net, encoder, x, t, noise, amp=False)
    loss16, grad16 = learned_coupling_grads(net, encoder, x, t, noise, amp=True)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # fp32 master weights
    assert torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 5e-2 * abs(loss32)
    assert F.cosine_similarity(grad16, grad32, dim=0).item() > 0.99


def box_down(x):
    """The [1, 1] box filter going down, written out: the mean of each 2x2 block."""
    return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4


def box_up(x):
    """The [1, 1] box filter going up (transposed, x4), written out: each pixel repeated into a 2x2 block."""
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_box_resampling_paths_give_the_box_filter(monkeypatch, dtype, channels_last):
    """The [1, 1] filter's resampling: avg_pool2d / nearest interpolation in bf16 and in channels_last, the
    depthwise (transposed) convolutions in float32 NCHW; every path gives the box filter's numbers exactly
    (up to float32 rounding), and a general filter keeps the convolutions."""
    torch.manual_seed(0)
    down = Conv2d(8, 8, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(8, 8, kernel=0, up=True, resample_filter=[1, 1])
    x = torch.randn(2, 8, 14, 14).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    direct = []
    real_pool, real_interpolate = F.avg_pool2d, F.interpolate
    monkeypatch.setattr(F, "avg_pool2d", lambda *a, **k: direct.append("pool") or real_pool(*a, **k))
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: direct.append("nearest") or real_interpolate(*a, **k))
    # float32 sums the four taps in another order than the formula (1 ulp); bfloat16 rounds once, exactly
    tolerance = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(down(x).float(), box_down(x.float()).to(dtype).float(), atol=tolerance, rtol=0)
    torch.testing.assert_close(up(x).float(), box_up(x.float()), atol=0.0, rtol=0)
    expect_direct = dtype == torch.bfloat16 or channels_last
    assert direct == (["pool", "nearest"] if expect_direct else [])
    general = Conv2d(8, 8, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert not general.box  # other filters keep the convolution
    direct.clear()
    general(x)
    assert direct == []


def attention_in_input_dtype(q, k, v, use_sdpa=True):
    """The attention of ``models.songunet`` without its float32 softmax, so that float64 stays float64."""
    weights = torch.einsum("ncq,nck->nqk", q, k / k.shape[1] ** 0.5).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", weights, v)


def test_in_place_residual_arithmetic_keeps_autograd_exact(monkeypatch):
    """gradcheck (float64) through down, up and attention blocks with their in-place residual adds.

    The attention itself computes in float32 by design, too coarse for a float64 gradcheck, so the test
    swaps in the same formula in the input's precision.
    """
    monkeypatch.setattr(songunet, "attention", attention_in_input_dtype)
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0)
    net = perturbed(net, seed=1).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda inp: net(inp, t), (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_training_mode_does_not_change_its_input():
    """The in-place operations act on fresh tensors only: the input and the eval output stay untouched."""
    net, data = load_golden("golden_tiny28_de")
    x = data["x"].clone()
    net.train()
    net(x, data["t"]).sum().backward()
    assert torch.equal(x, data["x"])
    net.eval()
    with torch.no_grad():
        assert (net(x, data["t"]) - data["y"]).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------
# The CPU dropout of models.songunet: a random 16-bit word per element, four words per 64-bit draw.

def dropout_of_ones(p, numel=1 << 20, seed=0):
    torch.manual_seed(seed)
    return songunet.dropout(torch.ones(numel), p)


@pytest.mark.parametrize("p", [0.1, 0.13, 0.5])
def test_cpu_dropout_keeps_with_probability_one_minus_p_in_every_lane(p):
    """Dropped elements are exactly 0, kept ones exactly 65536 / round((1 - p) 65536) (so E[mask] = 1), and
    each of the four 16-bit lanes of a 64-bit draw drops a fraction p: within 6 binomial standard deviations
    (deterministic, seeded). A lane with a biased bit (e.g. a sign bit that is always 0) is off by ~p."""
    y = dropout_of_ones(p)
    kept = round((1 - p) * 65536)
    scale = torch.tensor(65536 / kept, dtype=torch.float32)
    assert bool(((y == 0) | (y == scale)).all())
    assert abs(kept / 65536 * (65536 / kept) - 1) < 1e-12    # the expectation of the mask is exactly 1
    assert abs(kept / 65536 - (1 - p)) <= 0.5 / 65536         # the keep probability, rounded
    dropped = (y == 0).double().reshape(-1, 4)
    tolerance = 6 * (p * (1 - p) / dropped.shape[0]) ** 0.5
    for lane in range(4):
        assert abs(dropped[:, lane].mean().item() - p) < tolerance, lane
    # neighbours are independent: both dropped with probability p^2 (within a draw and across draws)
    flat = (y == 0).double()
    for shift in (1, 4):
        both = (flat[:-shift] * flat[shift:]).mean().item()
        assert abs(both - p * p) < 6 * (p * p * (1 - p * p) / flat.numel()) ** 0.5


def test_cpu_dropout_is_seeded_and_its_gradient_is_the_mask():
    assert torch.equal(dropout_of_ones(0.2, seed=3), dropout_of_ones(0.2, seed=3))
    assert not torch.equal(dropout_of_ones(0.2, seed=3), dropout_of_ones(0.2, seed=4))
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    weights = torch.randn(2, 3, 5, 7)
    y = songunet.dropout(x, 0.3)
    (y * weights).sum().backward()
    scale = torch.tensor(65536 / round(0.7 * 65536), dtype=torch.float32)
    mask = (y.detach() != 0).float() * scale
    assert torch.equal(y.detach(), x.detach() * mask)
    assert torch.equal(x.grad, weights * mask)
    assert x.grad.dtype == torch.float32


def test_cpu_dropout_identity_layouts_and_dtypes():
    x = torch.randn(2, 4, 6, 6)
    assert songunet.dropout(x, 0.2, training=False) is x
    assert songunet.dropout(x, 0.0) is x
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = songunet.dropout(cl, 0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert bool(((out == 0) | (out == 2 * cl)).all())
    half = songunet.dropout(x.to(torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16
    assert bool(((half == 0) | (half == 2 * x.to(torch.bfloat16))).all())
    strided = x[:, :, ::2]  # neither layout: PyTorch's own dropout
    torch.manual_seed(0)
    expected = F.dropout(strided, 0.5)
    torch.manual_seed(0)
    assert torch.equal(songunet.dropout(strided, 0.5), expected)


def test_network_speed_replays_exactly_the_steps_convolutions(tmp_path):
    """benchmarks/network_speed.py: its replay of the training step's convolution layers has the same number
    of layer calls as the U-Net has ``Conv2d`` layers (each runs once per step) and the same FLOPs as
    FlopCounterMode counts for convolution forward and backward inside a real training step."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("network_speed", os.path.join(ROOT, "benchmarks", "network_speed.py"))
    network_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network_speed)
    config = os.path.join(ROOT, "configs", "tiny28_de.json")
    # fp32 (--amp none): the step below is the fp32 eager step whose FLOPs the replay must match
    result = network_speed.main(["--config", config, "--batch", "2", "--iters", "1", "--repeats", "1", "--amp", "none",
                                 "--warmup", "0", "--matmul_size", "128", "--json", str(tmp_path / "speed.json")])
    assert json.loads((tmp_path / "speed.json").read_text())["convolutions"]["count"] == result["convolutions"]["count"]
    assert result["cpu_shards"] == min(2, torch.get_num_threads())   # the training script's default on a CPU
    with pytest.raises(UserError, match="more than the batch"):
        network_speed.main(["--config", config, "--batch", "2", "--cpu_shards", "3"])

    torch.manual_seed(0)
    net = build_network(load_config("tiny28_de.json")).train()
    assert result["convolutions"]["count"] == sum(isinstance(m, Conv2d) for m in net.modules())  # each runs once
    x, noise, t = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28), torch.rand(2)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        flow_matching_loss(net(interpolate(x, noise, t), t), x, noise).backward()
    per_op = counter.get_flop_counts()["Global"]
    conv_flops = sum(n for op, n in per_op.items() if "convolution" in str(op))
    assert conv_flops > 0
    assert result["convolutions"]["gflop"] * 1e9 == conv_flops
    assert result["train_step"]["gflop"] * 1e9 == counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FAST_ODE_SLOW_TESTS") != "1",
                    reason="a cold inductor compile takes minutes on 2 CPU cores; set FAST_ODE_SLOW_TESTS=1")
def test_torch_compile_matches_eager():
    """``torch.compile`` of the U-Net gives the golden output (a cold compile takes ~3 min on 2 CPU cores)."""
    net, data = load_golden("golden_tiny28_de")
    compiled = torch.compile(net)
    with torch.no_grad():
        output = compiled(data["x"], data["t"])
        expected = net(data["x"], data["t"])
    assert (output - expected).abs().max().item() < 1e-4
    assert (output - data["y"]).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------
# CUDA (pytest -m cuda; skipped without a GPU).

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_cuda_golden_match_fp32(name, use_sdpa, no_tf32):
    net, data = load_golden(name, "cuda")
    net.set_sdpa(use_sdpa)
    with torch.no_grad():
        output = net(data["x"].cuda(), data["t"].cuda())
    assert (output.cpu() - data["y"]).abs().max().item() < 1e-4


@pytest.mark.cuda
@needs_cuda
def test_cuda_encoder_golden_match_fp32(no_tf32):
    data = torch.load(os.path.join(DATA, "golden_tiny32_encoder.pt"), weights_only=True)
    encoder = build_encoder(data["config"])
    encoder.load_state_dict(data["state_dict"])
    encoder = encoder.eval().cuda()
    with torch.no_grad():
        z, mu, logvar = encoder(data["x"].cuda(), noise=data["noise"].cuda())
    for got, key in ((z, "z"), (mu, "mu"), (logvar, "logvar")):
        assert (got.cpu() - data[key]).abs().max().item() < 1e-4, key


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
def test_cuda_channels_last_golden_match(name, no_tf32):
    net, data = load_golden(name, "cuda")
    net = net.to(memory_format=torch.channels_last)
    with torch.no_grad():
        output = net(data["x"].cuda().contiguous(memory_format=torch.channels_last), data["t"].cuda())
    assert (output.cpu() - data["y"]).abs().max().item() < 1e-4


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", GOLDEN_NETWORKS)
def test_cuda_bf16_autocast_close_to_fp32(name, no_tf32):
    net, data = load_golden(name, "cuda")
    x, t = data["x"].cuda(), data["t"].cuda()
    with torch.no_grad():
        reference = net(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = net(x, t)
    assert output.dtype == torch.bfloat16
    rms, worst = bf16_errors(reference, output)
    assert rms < BF16_RMS_TOLERANCE, f"RMS error {rms:.4f} x std"
    assert worst < BF16_MAX_TOLERANCE, f"max error {worst:.4f} x std"


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_training_step_gradients_follow_fp32(no_tf32):
    torch.manual_seed(0)
    net = perturbed(build_network(dict(load_config("tiny28_de.json"), dropout=0.0)), seed=1).train().cuda()
    encoder = perturbed(build_encoder(load_config("tiny28_en.json")), seed=2).train().cuda()
    generator = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1).cuda()
    noise, t = torch.randn(4, 1, 28, 28, generator=generator).cuda(), torch.rand(4, generator=generator).cuda()
    loss32, grad32 = learned_coupling_grads(net, encoder, x, t, noise, amp=False, device_type="cuda")
    loss16, grad16 = learned_coupling_grads(net, encoder, x, t, noise, amp=True, device_type="cuda")
    assert torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 5e-2 * abs(loss32)
    assert F.cosine_similarity(grad16, grad32, dim=0).item() > 0.99


@pytest.mark.cuda
@needs_cuda
def test_cuda_torch_compile_matches_eager(no_tf32):
    net, data = load_golden("golden_tiny28_de", "cuda")
    reference = copy.deepcopy(net)
    compiled = torch.compile(net)
    x, t = data["x"].cuda(), data["t"].cuda()
    with torch.no_grad():
        output = compiled(x, t)
        expected = reference(x, t)
    assert (output - expected).abs().max().item() < 1e-4
    assert (output.cpu() - data["y"]).abs().max().item() < 1e-4


@pytest.mark.cuda
@needs_cuda
def test_cuda_dropout_is_pytorchs():
    """On CUDA the model's dropout is F.dropout's fused kernel: the same mask for the same seed."""
    x = torch.randn(4, 8, 16, 16, device="cuda")
    torch.manual_seed(0)
    expected = F.dropout(x, 0.13)
    torch.manual_seed(0)
    assert torch.equal(songunet.dropout(x, 0.13), expected)
