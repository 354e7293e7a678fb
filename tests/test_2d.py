"""The 2D example: models/toy2d.py, utils/metrics2d.py and the couplings on 2D batches against exact answers,
and train_reverse_2d_joint.py end to end on CPU."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_reverse_2d_joint as script
from models import couplings as couplinglib
from models import flow as flowlib
from models import toy2d
from models.losses import gaussian_kl, kl_per_dim
from models.mlp import EncoderMLP, VelocityMLP
from utils import metrics2d
from utils.amp import autocast_velocity
from utils.errors import UserError
from training.train2d import evaluate, training_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_reverse_2d_joint.py")
ITERATIONS = 300
FIGURES = ("data.png", "prior.png", "traj_generative.png", "traj_reconstruction.png", "traj_coupling.png",
           "overview.png", "generated.png")


def start(folder, *options):
    """Start the script in a subprocess (CPU only); returns the Popen."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, SCRIPT, "--dir", str(folder), *options], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A learned and an independent run, same seed and budget, trained side by side."""
    base = tmp_path_factory.mktemp("two_mode")
    common = ("--iterations", str(ITERATIONS), "--eval_N", "1,128", "--seed", "0")
    processes = {"learned": start(base / "learned", *common),
                 "independent": start(base / "independent", "--independent", *common)}
    stdout = {name: finish(process) for name, process in processes.items()}
    return {name: (base / name, stdout[name]) for name in processes}


def read_metrics(folder):
    with open(folder / "metrics.json") as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------
# End to end.

@pytest.mark.parametrize("name", ["learned", "independent"])
def test_run_writes_every_output(runs, name):
    folder, stdout = runs[name]
    assert f"coupling {name}" in stdout and "device cpu" in stdout
    config = json.loads((folder / "config.json").read_text())
    assert config["coupling"] == name and config["iterations"] == ITERATIONS and config["eval_N"] == [1, 128]
    stats = [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines()]
    assert [s["iter"] for s in stats] == [100, 200, 300]
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["loss_fm"]) for s in stats)
    assert all((s["kl"] is not None) == (name == "learned") for s in stats)
    for figure in FIGURES:
        assert (folder / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    flow_model = VelocityMLP()
    flow_model.load_state_dict(torch.load(folder / f"flow_model_{ITERATIONS}.pth", weights_only=True))
    forward = folder / f"forward_model_{ITERATIONS}.pth"
    if name == "learned":
        EncoderMLP().load_state_dict(torch.load(forward, weights_only=True))
    else:
        assert not forward.exists()
    for steps in (1, 128):
        samples = np.load(folder / f"samples_N{steps}.npy")
        assert samples.shape == (4096, 2) and samples.dtype == np.float32 and np.isfinite(samples).all()
    metrics = read_metrics(folder)
    assert {"straightness", "energy_distance", "iterations", "straightness_N"} <= set(metrics)
    assert metrics["iterations"] == ITERATIONS and metrics["straightness_N"] == 128
    assert set(metrics["energy_distance"]) == {"1", "128"}


def test_metrics_match_the_saved_samples_and_checkpoint(runs):
    folder, _ = runs["learned"]
    metrics = read_metrics(folder)
    # The same prior noise and reference that the script draws from --seed 0.
    variances = toy2d.prior_variances(True)
    noise = toy2d.sample_prior(4096, variances, toy2d.make_generator(0, toy2d.STREAM_EVAL))
    reference = toy2d.sample_mixture(4096, toy2d.make_generator(0, toy2d.STREAM_REFERENCE))
    flow_model = VelocityMLP()
    flow_model.load_state_dict(torch.load(folder / f"flow_model_{ITERATIONS}.pth", weights_only=True))
    one_step = flowlib.euler(flow_model, noise, N=1).x
    torch.testing.assert_close(torch.from_numpy(np.load(folder / "samples_N1.npy")), one_step, rtol=1e-5, atol=1e-5)
    assert metrics2d.energy_distance(one_step, reference) == pytest.approx(metrics["energy_distance"]["1"], rel=1e-4)
    traj = flowlib.euler(flow_model, noise, N=128, return_traj=True).traj
    assert flowlib.straightness(traj).item() == pytest.approx(metrics["straightness"], rel=1e-4)


def test_learned_coupling_is_straighter_than_independent(runs):
    # At 300 iterations, seeds 0-3 gave 0.15-0.29 (learned) against 4.2-4.8 (independent).
    learned, independent = read_metrics(runs["learned"][0]), read_metrics(runs["independent"][0])
    assert learned["straightness"] < 0.25 * independent["straightness"]
    assert learned["energy_distance"]["1"] < independent["energy_distance"]["1"]


def test_same_seed_gives_identical_results_and_ot_has_no_encoder(tmp_path):
    # In-process (the subprocess runs above cover the command line); main() pins one thread on CPU.
    threads = torch.get_num_threads()
    try:
        for name in ("a", "b"):
            script.main(["--dir", str(tmp_path / name), "--coupling", "ot", "--iterations", "30", "--eval_N", "1",
                         "--seed", "3"])
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.load(tmp_path / "a" / "samples_N1.npy"), np.load(tmp_path / "b" / "samples_N1.npy"))
    a = torch.load(tmp_path / "a" / "flow_model_30.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "flow_model_30.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not list((tmp_path / "a").glob("forward_model_*.pth"))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["mixed_batches"] is True


def test_sinkhorn_run_trains_on_mixed_batches(tmp_path, capsys):
    threads = torch.get_num_threads()   # in-process: main() pins one thread on CPU
    try:
        script.main(["--dir", str(tmp_path / "sinkhorn"), "--coupling", "sinkhorn", "--iterations", "30",
                     "--batchsize", "256", "--eval_N", "1", "--weight_prior", "3", "--ot_reg", "0.05"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "coupling sinkhorn (ot_reg 0.05, groups of 128)" in out
    # the KL weight is the learned coupling's: said once; --ot_reg, sinkhorn's own, is not
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        "warning: --weight_prior has no effect with --coupling sinkhorn (it is used by learned only)"]
    config = json.loads((tmp_path / "sinkhorn" / "config.json").read_text())
    assert config["mixed_batches"] is True and config["ot_reg"] == 0.05 and config["coupling"] == "sinkhorn"
    metrics = read_metrics(tmp_path / "sinkhorn")
    assert math.isfinite(metrics["straightness"]) and math.isfinite(metrics["energy_distance"]["1"])
    assert not list((tmp_path / "sinkhorn").glob("forward_model_*.pth"))


def train_and_evaluate(amp, seed=0, iterations=1500, batchsize=256):
    """The script's training loop and final metrics for the learned coupling (its run() without the files and
    figures): ``training_step`` under ``amp`` on ``training_batch``es, then Euler at NFE 1 and 128 from the
    evaluation noise, the network evaluated under the same ``amp``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the script on a CPU
    try:
        variances = toy2d.prior_variances(True)
        model = toy2d.build_flow_with_coupling("learned", seed, "cpu", variances, weight_prior=10.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = toy2d.TwoModeData(toy2d.make_generator(seed, toy2d.STREAM_DATA))
        generator = toy2d.make_generator(seed, toy2d.STREAM_TRAIN)
        for iteration in range(1, iterations + 1):
            x, noise = toy2d.training_batch(iteration, data, model.coupling, batchsize, generator)
            training_step(model, optimizer, x, noise, generator, amp)
        noise = toy2d.sample_prior(4096, variances, toy2d.make_generator(seed, toy2d.STREAM_EVAL))
        reference = toy2d.sample_mixture(4096, toy2d.make_generator(seed, toy2d.STREAM_REFERENCE))
        return evaluate(autocast_velocity(model.flow, "cpu", amp), noise, (1, 128), reference)[0]
    finally:
        torch.set_num_threads(threads)


def test_bf16_training_stays_within_a_band_of_fp32():
    """bf16 autocast of the MLPs (training and sampling) against fp32: the learned coupling, 1500 iterations at
    batch 256, seed 0.

    Measured with train_reverse_2d_joint.py --amp none / bf16 (the same loop) on this project's CPU (Xeon with
    AMX-BF16, PyTorch 2.14.1), seeds 0, 1, 2: straightness 0.0886 / 0.0936 / 0.0964 in fp32, bf16 off by 1.6%,
    0.17%, 0.13%; energy distance at NFE 1 0.155 / 0.158 / 0.179, bf16 off by 0.0052, 0.00004, 0.0005 (NFE 128:
    0.0028, 0.0001, 0.0011; two true draws of the mixture give -0.002 to 0.007). Band, with margin for other
    CPUs' bf16 kernels: straightness within 10%, energy distances within 0.025. (bf16 steps were 1.3-1.5x
    slower than fp32 here: these MLPs are too small to gain, hence the script's default --amp none.)
    """
    fp32, bf16 = train_and_evaluate("none"), train_and_evaluate("bf16")
    assert bf16["straightness"] == pytest.approx(fp32["straightness"], rel=0.1)
    for steps in ("1", "128"):
        assert bf16["energy_distance"][steps] == pytest.approx(fp32["energy_distance"][steps], abs=0.025), steps


def test_amp_is_resolved_recorded_and_printed(tmp_path, capsys):
    threads = torch.get_num_threads()   # in-process: main() pins one thread on CPU
    try:
        script.main(["--dir", str(tmp_path / "bf16"), "--amp", "bf16", "--iterations", "2", "--eval_N", "1"])
    finally:
        torch.set_num_threads(threads)
    assert "amp bf16 (--amp bf16 given)" in capsys.readouterr().out.splitlines()[0]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config["amp"], config["amp_used"], config["amp_reason"]) == ("bf16", "bf16", "--amp bf16 given")
    assert math.isfinite(read_metrics(tmp_path / "bf16")["straightness"])


def test_bad_arguments_stop_with_one_line(tmp_path):
    process = start(tmp_path / "run", "--independent", "--coupling", "ot")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and "--independent" in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, words", [
    (["--eval_N", "1,x"], "--eval_N"),
    (["--eval_N", "0,4"], "--eval_N"),
    (["--eval_N", "1,,2"], "--eval_N must be comma-separated positive integers"),
    (["--eval_N", "1,2,"], "--eval_N must be comma-separated positive integers"),
    (["--N", "0"], "--N"),
    (["--iterations", "0"], "--iterations"),
    (["--lr", "0"], "--lr"),
    (["--coupling", "sinkhorn", "--ot_reg", "0"], "--ot_reg must be positive"),
    (["--coupling", "sinkhorn", "--ot_reg", "nan"], "--ot_reg must be a finite number"),
    (["--coupling", "sinkhorn", "--batchsize", "1"], "--coupling sinkhorn needs --batchsize of at least 2"),
    (["--gpu", "0,1"], "one CUDA device"),
    (["--gpu", "x"], "--gpu"),
])
def test_argument_checks(options, words):
    with pytest.raises(UserError, match=words):
        script.resolve(script.parse_args(options))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="omit --gpu"):
        script.resolve(script.parse_args(["--gpu", "0"]))


def test_independent_flag_and_defaults():
    coupling, eval_N, device = script.resolve(script.parse_args(["--independent"]))
    assert (coupling, eval_N, device.type) == ("independent", [1, 2, 4, 8, 128], "cpu")
    assert script.resolve(script.parse_args([]))[0] == "learned"
    args = script.parse_args([])
    assert (args.N, args.lr, args.weight_prior, args.batchsize, args.seed) == (20, 1e-3, 10.0, 512, 0)
    assert (args.iterations, args.dir, args.ot_batch) == (5000, "runs/2d", toy2d.OT_BATCH)
    assert (args.ot_reg, args.amp) == (0.05, "none")   # fp32 by default, whatever the CPU (see --amp's help)
    for other in ("sinkhorn", "learned"):   # learned: the default, but given explicitly it contradicts too
        with pytest.raises(UserError, match=f"--independent contradicts --coupling {other}"):
            script.resolve(script.parse_args(["--independent", "--coupling", other]))
    assert script.resolve(script.parse_args(["--independent", "--coupling", "independent"]))[0] == "independent"


def test_an_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stats.jsonl").write_text("kept\n")
    with pytest.raises(UserError, match="--overwrite"):
        script.prepare_dir(str(tmp_path), overwrite=False)
    assert (tmp_path / "stats.jsonl").read_text() == "kept\n"


def test_overwrite_replaces_the_previous_runs_files_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "run"
    threads = torch.get_num_threads()   # in-process: main() pins one thread on CPU
    try:
        script.main(["--dir", str(folder), "--iterations", "6", "--eval_N", "1,2"])
        first = sorted(os.listdir(folder))
        # every file the first run wrote is one of the script's own (what --overwrite may remove)
        assert [os.path.basename(name) for name in script.run_files(str(folder))] == [
            name for name in first if not name.startswith(".")], first
        assert {"samples_N2.npy", "flow_model_6.pth", "metrics.json"} <= set(first)
        (folder / "notes.txt").write_text("mine")
        (folder / "flow_model_best.pth").write_text("mine")
        with pytest.raises(UserError, match="--overwrite"):
            script.main(["--dir", str(folder), "--iterations", "4", "--eval_N", "1"])
        assert sorted(os.listdir(folder)) == sorted(first + ["notes.txt", "flow_model_best.pth"])   # refused
        script.main(["--dir", str(folder), "--iterations", "4", "--eval_N", "1", "--overwrite"])
    finally:
        torch.set_num_threads(threads)
    names = set(os.listdir(folder))
    assert "samples_N2.npy" not in names and "flow_model_6.pth" not in names and "forward_model_6.pth" not in names
    assert {"samples_N1.npy", "flow_model_4.pth", "notes.txt"} <= names, names
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "metrics.json").read_text())["iterations"] == 4
    # a file of the user's with a name like the script's is not one of them
    assert "flow_model_best.pth" in names
    # another script's run folder is refused, not cleaned
    other = tmp_path / "image-run"
    other.mkdir()
    (other / "config.json").write_text('{"dataset": "mnist"}')
    (other / "flow_model_10_ema.pth").write_text("weights")
    with pytest.raises(UserError, match="not this script's"):
        script.prepare_dir(str(other), overwrite=True)
    assert (other / "flow_model_10_ema.pth").read_text() == "weights"


# ----------------------------------------------------------------------------
# utils/metrics2d.py, models/toy2d.py, and the couplings and KL of models/ on the 2D prior.

def test_energy_distance_exact_values():
    # Point masses at distance 5: 2 * 5 - 0 - 0.
    a, b = torch.zeros(7, 2), torch.tensor([[3.0, 4.0]]).repeat(9, 1)
    assert metrics2d.energy_distance(a, b) == pytest.approx(10.0)
    assert metrics2d.energy_distance(b, b) == pytest.approx(0.0)
    # Two points each: X in {0, 1}, Y in {0, 3} on a line: E|X-Y| = (0 + 3 + 1 + 2) / 4 = 1.5,
    # E|X-X'| over i != j = 1, E|Y-Y'| = 3, so 2 * 1.5 - 1 - 3 = -1 (the unbiased estimate).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert metrics2d.energy_distance(x, y) == pytest.approx(-1.0)
    assert metrics2d.energy_distance(x, y, within_reference=3.0) == pytest.approx(-1.0)


def test_energy_distance_of_two_draws_of_the_mixture_is_near_zero():
    first = toy2d.sample_mixture(2048, toy2d.make_generator(0, 1))
    second = toy2d.sample_mixture(2048, toy2d.make_generator(0, 2))
    shifted = second + torch.tensor([1.0, 0.0])
    assert abs(metrics2d.energy_distance(first, second)) < 0.02
    assert metrics2d.energy_distance(first, shifted) > 0.1


def test_kl_matches_torch_distributions_and_the_papers_normalisation():
    """The 2D KL is models.losses' (gaussian_kl per element, kl_per_dim the loss's term), with the wide prior's
    variances; the learned coupling's Pairing carries that same term."""
    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(16, 2, generator=generator) * 3, torch.randn(16, 2, generator=generator)
    for wide in (True, False):
        variances = toy2d.prior_variances(wide)
        q = torch.distributions.Normal(mu, (logvar / 2).exp())
        p = torch.distributions.Normal(torch.zeros(2), variances.sqrt())
        expected = torch.distributions.kl_divergence(q, p).sum(dim=1)
        torch.testing.assert_close(gaussian_kl(mu, logvar, variances).sum(dim=1), expected)
        assert kl_per_dim(mu, logvar, variances).item() == pytest.approx(expected.mean().item() / 2, rel=1e-5)
    # The paper's get_kl_2d (wide prior) differs from ours by the constant log(36) / 4: same gradients.
    variances = toy2d.prior_variances(True)
    paper = (0.5 * (-1 + math.log(36) - logvar + mu.square() / variances + logvar.exp() / variances).sum(1)).mean() / 2
    assert (paper - kl_per_dim(mu, logvar, variances)).item() == pytest.approx(math.log(36) / 4, rel=1e-5)
    assert gaussian_kl(torch.zeros(1, 2), variances.log()[None], variances).sum(dim=1).item() == pytest.approx(
        0.0, abs=1e-6)
    # the learned coupling's KL term is the same function of the encoder's mu and logvar
    encoder = EncoderMLP()
    x = toy2d.sample_mixture(16, torch.Generator().manual_seed(1))
    pairing = couplinglib.build_coupling("learned", encoder=encoder, weight_prior=10.0,
                                         prior_variances=variances).pair(x, torch.zeros(16, 2))
    _, mu, logvar = encoder(x, noise=torch.zeros(16, 2))
    assert pairing.weight == 10.0
    assert pairing.kl.item() == pytest.approx(kl_per_dim(mu, logvar, variances).item(), rel=1e-6)


def test_data_alternates_between_modes_and_matches_its_moments():
    data = toy2d.TwoModeData(toy2d.make_generator(0, 0), points_per_mode=20_000)
    generator = toy2d.make_generator(0, 1)
    for mode in (0, 1):
        points = data.modes[mode]
        torch.testing.assert_close(points.mean(0), torch.tensor(toy2d.MODE_MEANS[mode]), atol=0.05, rtol=0)
        torch.testing.assert_close(points.var(0), torch.tensor(toy2d.MODE_VARIANCES), atol=0.1, rtol=0.03)
    odd, even = data.batch(1, 256, generator), data.batch(2, 256, generator)
    assert (odd[:, 0] < 0).all() and (even[:, 0] > 0).all()
    mixed = data.batch(1, 256, generator, mixed=True)
    assert (mixed[:128, 0] < 0).all() and (mixed[128:, 0] > 0).all()
    mixture = toy2d.sample_mixture(20_000, generator)
    assert (mixture[:, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_prior_and_streams():
    noise = toy2d.sample_prior(50_000, toy2d.prior_variances(True), toy2d.make_generator(0, 2))
    torch.testing.assert_close(noise.var(0), torch.tensor([36.0, 1.0]), rtol=0.03, atol=0)
    a, b = toy2d.make_generator(0, 1), toy2d.make_generator(0, 1)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert not torch.equal(torch.rand(5, generator=toy2d.make_generator(0, 2)),
                           torch.rand(5, generator=toy2d.make_generator(1, 1)))


def couple(name, x, noise, generator=None, **options):
    """z [B, 2] of coupling ``name`` (wide prior) for data ``x`` and N(0, I) ``noise``: assign, then pair."""
    coupling = couplinglib.build_coupling(name, prior_variances=toy2d.prior_variances(True), **options)
    with torch.no_grad():
        return coupling.pair(x, coupling.assign(x, noise, generator)).z


def test_couplings():
    generator = toy2d.make_generator(0, 3)
    x = toy2d.sample_mixture(64, generator)
    noise = toy2d.randn(x.shape, toy2d.make_generator(0, 4), "cpu")
    independent = couple("independent", x, noise)
    assert couplinglib.build_coupling("independent").pair(x, noise).kl is None
    ot = couple("ot", x, noise)
    # The OT coupling permutes the same noise and lowers the transport cost.
    assert sorted(ot[:, 0].tolist()) == sorted(independent[:, 0].tolist())
    assert (x - ot).square().sum() < (x - independent).square().sum()
    encoder = EncoderMLP()
    z = couple("learned", x, noise, encoder=encoder, weight_prior=10.0)
    _, mu, logvar = encoder(x)
    torch.testing.assert_close(z, mu + noise * (logvar / 2).exp())
    with pytest.raises(ValueError, match="independent"):
        couplinglib.build_coupling("diagonal")


def test_sinkhorn_interpolates_between_exact_ot_and_the_independent_coupling():
    """Sinkhorn on batches of the two-mode data and wide-prior noise, in groups of 128 as the training runs it
    (both modes in every group).

    - Tiny ot_reg: exact OT. On 8 points (4 per mode; few points, so the best assignment beats the others by
      more than the regularisation) ot_reg 1e-4 puts more than 99% of every row's mass on the OT partner, and the
      drawn pairs are the exact OT pairs. On groups of 128, the default ot_reg 0.05 transports within 10% of
      exact OT's squared distance, less than 60% of the independent pairs'.
    - Huge ot_reg: the plan is uniform, so each x draws its z uniformly with replacement, independently of x.
      Closed forms: a fraction 1 - (1 - 1/n)^n = 0.6336 of a group's n = 128 noise samples is drawn at least
      once, and the mean squared distance of the pairs is E|x|^2 + E|z|^2 = (64 + 64 + 3 + 0.1) + (36 + 1)
      = 168.1 (z has mean 0, x and z independent).
    """
    variances = toy2d.prior_variances(True)
    data = toy2d.TwoModeData(toy2d.make_generator(0, 0), points_per_mode=20_000)
    generator = toy2d.make_generator(0, 1)
    x = data.batch(1, 8, generator, mixed=True)
    noise = toy2d.randn(x.shape, generator, "cpu")
    scaled = noise * variances.sqrt()
    exact = couplinglib.ot_assignment(x, scaled)
    plan = couplinglib.sinkhorn_plan(torch.cdist(x.double(), scaled.double()).square(), 1e-4)
    assert torch.equal(plan.argmax(dim=1), exact) and (plan.max(dim=1).values * 8).min().item() > 0.99
    assert torch.equal(couple("sinkhorn", x, noise, toy2d.make_generator(0, 2), ot_reg=1e-4), scaled[exact])

    x = data.batch(1, 512, generator, mixed=True)
    noise = toy2d.randn(x.shape, generator, "cpu")

    def transport(z):
        return (x - z).square().sum(dim=1).mean().item()

    ot = transport(couple("ot", x, noise, group_size=128))
    independent = transport(couple("independent", x, noise))
    sinkhorn = transport(couple("sinkhorn", x, noise, toy2d.make_generator(0, 2), group_size=128))
    assert ot <= sinkhorn < 1.1 * ot and sinkhorn < 0.6 * independent

    squared, distinct = [], []
    for seed in range(16):   # 16 batches of 4 groups of 128 points
        x = data.batch(1, 512, generator, mixed=True)
        noise = toy2d.randn(x.shape, generator, "cpu")
        z = couple("sinkhorn", x, noise, toy2d.make_generator(seed, 2), group_size=128, ot_reg=1e6)
        squared.append((x - z).square().sum(dim=1))
        scaled = noise * variances.sqrt()
        for k in range(4):   # group k holds the points k, k + 4, ...: which of its noise samples were drawn
            drawn = (z[k::4, None, :] == scaled[None, k::4, :]).all(dim=2).any(dim=0)
            distinct.append(drawn.float().mean().item())
    # one group's fraction has std sqrt((e^-1 - 2 e^-2) / 128) = 0.028, the mean of 64 groups 0.0035
    assert np.mean(distinct) == pytest.approx(1 - (1 - 1 / 128) ** 128, abs=0.015)
    # |x - z|^2 has std ~115 ((x1 - z1) ~ N(+-8, 39), (x2 - z2) ~ N(8, 1.1)); the mean of 8192 pairs ~1.3
    assert torch.cat(squared).mean().item() == pytest.approx(168.1, abs=5)


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    variances = toy2d.prior_variances(True)
    model = toy2d.build_flow_with_coupling("learned", 0, "cpu", variances, weight_prior=10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = toy2d.sample_mixture(128, toy2d.make_generator(0, 5))
    losses = []
    for step in range(60):
        noise = toy2d.randn(x.shape, toy2d.make_generator(0, 6), "cpu")
        losses.append(training_step(model, optimizer, x, noise, toy2d.make_generator(0, 7)))
    assert set(losses[0]) == {"loss", "loss_fm", "kl"}
    assert losses[-1]["loss"] < 0.5 * losses[0]["loss"]
    assert losses[0]["loss"] == pytest.approx(losses[0]["loss_fm"] + 10.0 * losses[0]["kl"], rel=1e-5)


def _couplings_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("couplings_2d", os.path.join(ROOT, "benchmarks", "couplings_2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, committed", [
    ([], True), (["--seeds", "3"], True), (["--quick"], False), (["--seeds", "1"], False),
    (["--iterations", "100"], False), (["--methods", "independent,learned"], False), (["--eval_N", "1,2"], False),
    (["--weight_priors", "10"], False), (["--lr", "0.01"], False), (["--batchsize", "256"], False),
    (["--ot_reg", "0.1"], False), (["--reflow_N", "16"], False), (["--ot_batch", "0"], False),
    (["--gpu", ""], True), (["--gpu", " "], True),   # no GPU named: the CPU run
])
def test_only_the_reported_benchmark_run_writes_the_committed_results(argv, committed):
    bench = _couplings_benchmark()
    args = bench.parse_args(argv)
    bench.resolve(args)
    cited = os.path.normpath("benchmarks/results/couplings_2d")    # the folder docs/RESULTS.md cites
    assert (os.path.normpath(args.out) == cited) == committed, args.out


def test_results_json_is_replaced_only_by_a_complete_run(tmp_path, monkeypatch):
    bench = _couplings_benchmark()
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('["the previous results"]')
    argv = ["--out", str(out), "--seeds", "2", "--iterations", "3", "--methods", "independent", "--eval_N", "1,2"]
    real = bench.run_seed

    def stopped_after_seed_0(seed, *args):
        if seed == 1:
            raise KeyboardInterrupt
        return real(seed, *args)

    monkeypatch.setattr(bench, "run_seed", stopped_after_seed_0)
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    assert (out / "results.json").read_text() == '["the previous results"]'
    partial = json.loads((out / "results.partial.json").read_text())
    assert [(row["seed"], row["coupling"]) for row in partial] == [(0, "independent")]
    monkeypatch.setattr(bench, "run_seed", real)
    bench.main(argv)
    rows = json.loads((out / "results.json").read_text())
    assert [(row["seed"], row["coupling"]) for row in rows] == [(0, "independent"), (1, "independent")]
    assert not (out / "results.partial.json").exists() and (out / "results.md").is_file()


def test_a_gpu_run_is_not_the_reported_cpu_run():
    bench = _couplings_benchmark()
    for gpu, reported in ((None, True), ("0", False)):
        args = bench.parse_args([] if gpu is None else ["--gpu", gpu])
        for name, value in bench.FULL.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        assert bench.reported_settings(args) == reported, gpu


def test_a_failed_plot_leaves_the_previous_results_json(tmp_path, monkeypatch):
    bench = _couplings_benchmark()
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('["the previous results"]')

    def broken(*args):
        raise RuntimeError("no display")

    monkeypatch.setattr(bench, "plot_trajectories", broken)
    with pytest.raises(RuntimeError, match="no display"):
        bench.main(["--out", str(out), "--seeds", "1", "--iterations", "3", "--methods", "independent",
                    "--eval_N", "1"])
    assert (out / "results.json").read_text() == '["the previous results"]'
    assert [row["coupling"] for row in json.loads((out / "results.partial.json").read_text())] == ["independent"]


def test_an_out_through_a_file_is_one_line_before_training(tmp_path):
    bench = _couplings_benchmark()
    (tmp_path / "afile").write_text("mine")
    for out, message in ((tmp_path / "afile", "exists and is not a folder"),
                         (tmp_path / "afile" / "run", f"cannot be made: {tmp_path / 'afile'} is a file")):
        with pytest.raises(bench.UserError, match=f"^output folder --out {out} {message}"):
            bench.resolve(bench.parse_args(["--quick", "--out", str(out)]))
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_an_explicit_out_wins_for_a_quick_run(tmp_path):
    bench = _couplings_benchmark()
    args = bench.parse_args(["--quick", "--out", "benchmarks/results/couplings_2d"])
    bench.resolve(args)
    assert os.path.normpath(args.out) == os.path.normpath("benchmarks/results/couplings_2d")


# ----------------------------------------------------------------------------
# The paper's --ddpm: the VP (DDPM-style) interpolation.

def test_vp_alpha_is_the_vp_sde_schedule():
    """alpha(t) = exp(-1/2 int_0^t beta), beta(s) = 0.1 + 19.9 s (beta_min 0.1, beta_max 20), by quadrature."""
    for t in (0.0, 0.1, 0.5, 1.0):
        s = torch.linspace(0, t, 2001, dtype=torch.float64)
        integral = torch.trapezoid(0.1 + 19.9 * s, s) if t > 0 else torch.tensor(0.0, dtype=torch.float64)
        assert flowlib.vp_alpha(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(
            math.exp(-0.5 * integral.item()), rel=1e-9)


def test_vp_target_is_the_time_derivative_of_the_path():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)
    h = 1e-6
    numeric = (flowlib.interpolate_vp(x, z, t + h) - flowlib.interpolate_vp(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(flowlib.target_velocity_vp(x, z, t), numeric, rtol=1e-6, atol=1e-6)
    # the ends: data at t = 0, (almost) pure noise at t = 1
    torch.testing.assert_close(flowlib.interpolate_vp(x, z, torch.zeros(6, dtype=torch.float64)), x)
    alpha_one = math.exp(-19.9 / 4 - 0.05)
    torch.testing.assert_close(flowlib.interpolate_vp(x, z, torch.ones(6, dtype=torch.float64)),
                               alpha_one * x + math.sqrt(1 - alpha_one ** 2) * z)


def test_ddpm_run_trains_on_the_vp_path(tmp_path, capsys):
    threads = torch.get_num_threads()   # in-process: main() pins one thread on CPU
    try:
        script.main(["--dir", str(tmp_path / "ddpm"), "--ddpm", "--iterations", "200", "--eval_N", "1,16"])
    finally:
        torch.set_num_threads(threads)
    assert "interpolation VP (--ddpm)" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "ddpm")
    assert metrics["interpolation"] == "vp" and math.isfinite(metrics["straightness"])
    with open(tmp_path / "ddpm" / "stats.jsonl") as handle:
        losses = [json.loads(line)["loss_fm"] for line in handle]
    assert losses[-1] < losses[0]
    for name in FIGURES:
        assert (tmp_path / "ddpm" / name).is_file(), name


def test_sigterm_stops_at_a_step_boundary_with_that_iterations_checkpoints(tmp_path, signal_when_ready):
    """The 2D script runs on training/loop.py: SIGTERM finishes the step, saves flow_model_{i}.pth of that
    iteration, writes no metrics and exits with 0 and one line saying so."""
    import signal

    out = tmp_path / "stopped"

    def ready():   # two stats.jsonl lines: 200 iterations done
        return (out / "stats.jsonl").is_file() and (out / "stats.jsonl").read_text().count("\n") >= 2

    code, stdout, stderr = signal_when_ready([sys.executable, "train_reverse_2d_joint.py", "--dir", str(out),
                                              "--iterations", "1000000", "--batchsize", "64"], ready, signal.SIGTERM)
    assert code == 0 and "Traceback" not in stderr, stderr
    saved = sorted(out.glob("flow_model_*.pth"))
    assert len(saved) == 1 and not (out / "metrics.json").exists()
    iteration = int(saved[0].stem.split("_")[-1])
    assert 200 <= iteration < 1000000 and (out / f"forward_model_{iteration}.pth").is_file()
    assert f"stopped by SIGTERM at iteration {iteration}; the checkpoints of that iteration are saved" in stdout


def test_the_progress_line_names_the_iteration_of_the_loss_it_shows(tmp_path, capsys, monkeypatch):
    """The loss is read once per LOG_EVERY (100) iterations; a progress line in between shows that one."""
    monkeypatch.setenv("FAST_ODE_PROGRESS_SECONDS", "0")   # a line per iteration (stderr here is not a terminal)
    threads = torch.get_num_threads()
    try:
        script.main(["--dir", str(tmp_path / "run"), "--iterations", "150", "--batchsize", "64", "--eval_N", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = {line.split(":")[1].split()[0]: line for line in capsys.readouterr().err.splitlines()
             if line.startswith("2d learned:")}
    logged = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[0])
    assert logged["iter"] == 100
    assert "loss" not in lines["100/150"]   # counted before that iteration's record
    assert lines["101/150"].endswith(f"loss {logged['loss']:.3f} (it 100)"), lines["101/150"]
    assert lines["149/150"].endswith(f"loss {logged['loss']:.3f} (it 100)"), lines["149/150"]
