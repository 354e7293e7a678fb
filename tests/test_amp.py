"""``--amp``: the auto rule (bf16 only where the CPU or GPU has it natively), what the scripts record, and
that bf16 training and sampling follow fp32 (tolerances stated in each test).

The numerics tests run on any CPU: without native bf16 the arithmetic is emulated (slower, same numbers).
"""
import json
import os

import numpy as np
import pytest
import torch

import generate
import train_reverse_img_ddp as trainer
from models import fast_cpu
from utils.amp import autocast_velocity, native_bf16, resolve_amp
from utils.data import write_mnist_pngs
from utils.errors import cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")

pytestmark = pytest.mark.usefixtures("one_thread")

# /proc/cpuinfo flags of the two kinds of machine this project has run on (abridged)
AMX_XEON = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8".split()
EPYC_AVX2 = "fpu sse sse2 avx avx2 fma bmi2 sha_ni".split()


def test_auto_picks_bf16_only_with_native_cpu_units():
    assert resolve_amp("auto", "cpu", AMX_XEON)[0] == "bf16"
    assert resolve_amp("auto", "cpu", ["avx512f", "avx512_bf16"])[0] == "bf16"   # AVX512-BF16 without AMX
    assert resolve_amp("auto", "cpu", EPYC_AVX2)[0] == "none"                   # emulated bf16: slower
    mode, reason = resolve_amp("auto", "cpu", EPYC_AVX2)
    assert "no native bf16" in reason
    assert "amx_bf16" in resolve_amp("auto", "cpu", AMX_XEON)[1]                 # the reason names the unit


def test_explicit_amp_is_kept_and_bad_values_are_refused():
    assert resolve_amp("none", "cpu", AMX_XEON) == ("none", "--amp none given")
    assert resolve_amp("bf16", "cpu", EPYC_AVX2) == ("bf16", "--amp bf16 given")
    with pytest.raises(ValueError, match="auto, none, bf16"):
        resolve_amp("fp16", "cpu")


def test_this_machine_is_judged_from_its_own_flags():
    with open("/proc/cpuinfo") as handle:
        flags = next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split()
    expected = "amx_bf16" in flags or "avx512_bf16" in flags
    assert native_bf16("cpu")[0] == expected


def test_autocast_velocity_returns_float32_and_leaves_fp32_alone():
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    z = torch.randn(2, 1, 8, 8)
    assert autocast_velocity(net, "cpu", "none") is net
    v = autocast_velocity(lambda z, t: net(z), "cpu", "bf16")(z, torch.ones(2))
    assert v.dtype == torch.float32
    # the bf16 evaluation is the fp32 one up to bf16 rounding of the inputs and weights (~2^-8 relative)
    assert (v - net(z)).abs().max().item() < 0.02 * net(z).abs().max().item() + 1e-3


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_mnist_pngs(str(tmp_path_factory.mktemp("mnist")), 64)


def train_run(folder, digits, amp, iterations):
    cli_main(trainer.main, [
        "--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", CONFIG_DE, "--config_en",
        CONFIG_EN, "--num_workers", "0", "--batchsize", "16", "--iterations", str(iterations), "--learning_rate",
        "2e-3", "--warmup_steps", "20", "--ema_decay", "0.9", "--log_every", "20", "--sample_every", str(iterations),
        "--snapshot_every", str(iterations), "--save_every", str(iterations), "--N", "4", "--seed", "3", "--amp", amp])
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        losses = [json.loads(line)["loss"] for line in handle]
    with open(os.path.join(folder, "config.json")) as handle:
        return losses, json.load(handle)


def test_bf16_training_follows_fp32(tmp_path, digits):
    """200 iterations of the learned coupling (tiny configs, batch 16, bundled digits, one thread), fp32 vs
    bf16 autocast: every 20-iteration mean of the loss within 10% of fp32's, and both curves fall (the last
    window at most 30% of the first). Weights stay fp32 in both.

    Measured: on an AMX Xeon, 120 iterations, within 3.7%; on a Zen 4 EPYC (AVX512-BF16), 200 iterations,
    within 3.5% (last / first window 0.175 and 0.173). The two runs part ways like runs of two seeds: with
    2 threads (so 2 batch shards, other roundings) the same seed gave 12% in the steep first 60 iterations
    and 4-5% after, while fp32 runs of seeds 3, 4 and 5 (2 threads) differ by up to 20% there."""
    fp32, record32 = train_run(str(tmp_path / "fp32"), digits, "none", 200)
    bf16, record16 = train_run(str(tmp_path / "bf16"), digits, "bf16", 200)
    assert record32["amp_used"] == "none" and record16["amp_used"] == "bf16"
    assert len(fp32) == len(bf16) == 10
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.10 * a, (fp32, bf16)
    assert fp32[-1] <= 0.3 * fp32[0] and bf16[-1] <= 0.3 * bf16[0], (fp32, bf16)
    weights = torch.load(os.path.join(tmp_path, "bf16", "flow_model_200_ema.pth"), weights_only=True)
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


def test_default_amp_is_auto_and_recorded(tmp_path, digits):
    folder = str(tmp_path / "auto")
    cli_main(trainer.main, [
        "--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", CONFIG_DE, "--config_en",
        CONFIG_EN, "--num_workers", "0", "--batchsize", "4", "--iterations", "2", "--sample_every", "2",
        "--N", "2"])
    with open(os.path.join(folder, "config.json")) as handle:
        record = json.load(handle)
    expected, reason = resolve_amp("auto", "cpu")
    assert record["amp"] == "auto" and record["amp_used"] == expected and record["amp_reason"] == reason
    with open(os.path.join(folder, "log.txt")) as handle:
        first = handle.readline()
    assert f"amp {expected} ({reason})" in first

    # generate.py on that run's weights: bf16 samples are the fp32 ones up to bf16 rounding of the network
    ckpt = os.path.join(folder, "flow_model_2_ema.pth")
    outs = {}
    for amp in ("none", "bf16"):
        outs[amp] = str(tmp_path / f"samples-{amp}")
        generate.main(["--dir", outs[amp], "--ckpt", ckpt, "--config_de", CONFIG_DE, "--N", "4", "--num_samples", "4",
                       "--amp", amp])
        with open(os.path.join(outs[amp], "config_sampling.json")) as handle:
            assert json.load(handle)["amp_used"] == amp
    from PIL import Image
    images = {amp: np.stack([np.asarray(Image.open(os.path.join(outs[amp], "samples", f"{k:05d}.png")), dtype=float)
                             for k in range(4)]) for amp in outs}
    # 8-bit images: at most a few levels apart, on average well under one
    assert np.abs(images["none"] - images["bf16"]).max() <= 8
    assert np.abs(images["none"] - images["bf16"]).mean() <= 1.0


def test_auto_keeps_adaptive_solvers_in_fp32(tmp_path, monkeypatch):
    """bf16 noise in the velocity makes an adaptive solver take far more steps; auto gives them fp32, fixed-step
    solvers bf16 (on a device with native bf16: made so here), and an explicit --amp bf16 is kept."""
    from models import build_network, load_config
    ckpt = str(tmp_path / "flow.pth")
    torch.manual_seed(0)
    torch.save(build_network(load_config(CONFIG_DE)).state_dict(), ckpt)
    native = lambda requested, device: resolve_amp(requested, device, ["avx512f", "avx512_bf16"])  # noqa: E731
    monkeypatch.setattr(generate, "resolve_amp", native)
    used = {}
    for solver, amp in (("rk45", "auto"), ("euler", "auto"), ("rk45", "bf16")):
        out = str(tmp_path / f"{solver}-{amp}")
        generate.main(["--dir", out, "--ckpt", ckpt, "--config_de", CONFIG_DE, "--N", "2", "--num_samples", "1",
                       "--solver", solver, "--amp", amp])
        with open(os.path.join(out, "config_sampling.json")) as handle:
            record = json.load(handle)
        used[solver, amp] = record["amp_used"], record["amp_reason"]
    assert used["rk45", "auto"] == ("none", "auto: fp32 for the adaptive solver rk45, whose NFE bf16 noise inflates")
    assert used["euler", "auto"][0] == "bf16" and used["rk45", "bf16"] == ("bf16", "--amp bf16 given")


@pytest.mark.skipif(not fast_cpu.choose("cpu", "bf16")[0], reason="the bf16 CPU fast path is not available here")
def test_fast_path_training_follows_the_plain_bf16_path(tmp_path, digits, monkeypatch):
    """The bf16 CPU fast path (channels_last, fused GroupNorm kernel, batch shards) against plain bf16 (NCHW,
    PyTorch's operations), dropout 0 so that both draw the same numbers: 20 iterations, the loss every 5
    within 1.5% (measured: within 0.4%; the two drift apart later, as bf16 runs do). A gradient handed to fused Adam in the wrong memory layout (found
    once) made the fast path's losses 3-5% higher from the second iteration on."""
    configs = []
    for path in (CONFIG_DE, CONFIG_EN):
        with open(path) as handle:
            config = dict(json.load(handle), dropout=0.0)
        configs.append(str(tmp_path / os.path.basename(path)))
        with open(configs[-1], "w") as handle:
            json.dump(config, handle)
    curves = {}
    for name in ("fast", "plain"):
        if name == "plain":
            monkeypatch.setattr(fast_cpu, "choose", lambda *args, **kwargs: (False, "test: plain bf16"))
        folder = str(tmp_path / name)
        cli_main(trainer.main, [
            "--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", configs[0], "--config_en",
            configs[1], "--num_workers", "0", "--batchsize", "16", "--iterations", "20", "--learning_rate", "1e-3",
            "--warmup_steps", "5", "--log_every", "5", "--sample_every", "1000", "--save_every", "20", "--no_ema",
            "--seed", "5", "--amp", "bf16", "--cpu_shards", "2"])
        with open(os.path.join(folder, "stats.jsonl")) as handle:
            curves[name] = [json.loads(line)["loss"] for line in handle]
        with open(os.path.join(folder, "config.json")) as handle:
            assert json.load(handle)["cpu_fast_path_used"] == (name == "fast")
    assert len(curves["fast"]) == len(curves["plain"]) == 4
    for a, b in zip(curves["plain"], curves["fast"]):
        assert abs(a - b) <= 0.015 * a, curves
