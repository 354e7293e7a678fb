"""generate.py end to end on the tiny config: exact integration, per-image seeds, NFE, checkpoint formats,
reconstruction, two processes, and the one-line errors.

Sampling runs in this process (``generate.main``) except for the torchrun test. A checkpoint is made
here: the tiny U-Net with a fixed seed plus a small random perturbation (its last layer starts at zero,
so without it the velocity would be zero and every test trivial), saved as the paper's plain state dict.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import train_reverse_img_ddp as trainer
from models import build_encoder, build_network, load_config
from tests.conftest import ROOT
from utils.data import write_mnist_pngs
from utils.errors import UserError, cli_main

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")
CONFIG_OTHER = os.path.join(ROOT, "configs", "tiny32_de.json")


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(network, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return network.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A run folder with a paper-format flow EMA state dict and an encoder EMA state dict."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    flow = perturbed(build_network(load_config(CONFIG_DE)), seed=1)
    encoder = perturbed(build_encoder(load_config(CONFIG_EN)), seed=2)
    torch.save(flow.state_dict(), folder / "flow_model_100_ema.pth")
    torch.save(encoder.state_dict(), folder / "forward_model_100_ema.pth")
    return {"folder": str(folder), "flow": str(folder / "flow_model_100_ema.pth"),
            "encoder": str(folder / "forward_model_100_ema.pth"), "flow_net": flow, "encoder_net": encoder}


def sample(out, ckpt, *options):
    """Run generate in this process on the tiny config; returns the output folder. fp32 (``--amp none``) unless
    ``options`` say otherwise: the tests compare with fp32 reference solves."""
    generate.main(["--dir", str(out), "--ckpt", ckpt, "--config_de", CONFIG_DE, "--amp", "none", *map(str, options)])
    return str(out)


def read_png(path):
    return np.asarray(Image.open(path), dtype=np.int64)


def samples_of(out, count, folder="samples"):
    return np.stack([read_png(os.path.join(out, folder, f"{k:05d}.png")) for k in range(count)])


def zs_of(out, count):
    return np.stack([np.load(os.path.join(out, "zs", f"{k:05d}.npy")) for k in range(count)])


def results_of(out):
    with open(os.path.join(out, "result_sampling.json")) as handle:
        return json.load(handle)


def to_grey(x):
    """[-1, 1] floats [B, 1, H, W] -> grey levels [B, H, W], as EDM rounds."""
    return np.clip(np.floor(x.numpy()[:, 0] * 127.5 + 128), 0, 255).astype(np.int64)


def reference_solve(net, z, solver, N):
    """The paper's fixed-step samplers, written out: time 1 -> 0; returns the end point and the states."""
    states = [z]
    with torch.no_grad():
        if solver == "euler":
            for i in range(N, 0, -1):
                t = torch.full((z.shape[0],), i / N)
                z = z - net(z, t) / N
                states.append(z)
        else:  # heun: N evaluations, (N + 1) / 2 steps, predictor-corrector except the last step
            steps = (N + 1) // 2
            h = 1.0 / steps
            for i in range(steps, 0, -1):
                v = net(z, torch.full((z.shape[0],), i * h))
                if i > 1:
                    v = (v + net(z - h * v, torch.full((z.shape[0],), (i - 1) * h))) / 2
                z = z - h * v
                states.append(z)
    return z, states


def reference_straightness(states):
    """Mean over samples of mean_i mean(((x_{i-1} - x_i) / dt - (x_0 - x_N))^2), dt = 1 / steps."""
    steps = len(states) - 1
    base = states[0] - states[-1]
    per_sample = sum((((states[i - 1] - states[i]) * steps - base) ** 2).flatten(1).mean(1)
                     for i in range(1, steps + 1)) / steps
    return per_sample.mean().item()


# ----------------------------------------------------------------------------
# Numbers.

@pytest.mark.parametrize("solver, N", [("euler", 4), ("heun", 5)])
def test_samples_equal_independent_integration_of_saved_z(tmp_path, weights, solver, N):
    out = sample(tmp_path, weights["flow"], "--solver", solver, "--N", N, "--num_samples", 3, "--batchsize", 2,
                 "--save_z", "--save_traj")
    z = torch.from_numpy(zs_of(out, 3))
    assert z.dtype == torch.float32 and z.shape == (3, 1, 28, 28)
    x, states = reference_solve(weights["flow_net"], z, solver, N)
    assert np.abs(samples_of(out, 3) - to_grey(x)).max() <= 1
    results = results_of(out)
    assert results["nfes_mean"] == N and results["solver"] == solver and results["N"] == N
    assert results["num_samples"] == 3 and results["seconds"] > 0
    assert results["straightness_mean"] == pytest.approx(reference_straightness(states), rel=1e-3)
    assert results["z_norms"] == pytest.approx(z.flatten(1).norm(dim=1).tolist(), rel=1e-5)
    steps = N if solver == "euler" else (N + 1) // 2
    assert samples_of(out, 3, "trajs").shape == (3, 28, 28 * min(8, steps))


def test_start_and_image_do_not_depend_on_batch_size(tmp_path, weights):
    outs = [sample(tmp_path / f"batch{b}", weights["flow"], "--N", 2, "--num_samples", 5, "--batchsize", b,
                   "--seed", 7, "--save_z") for b in (3, 4)]
    zs = [zs_of(out, 5) for out in outs]
    assert np.array_equal(zs[0], zs[1])
    for k in range(5):
        expected = torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(7 + k)).numpy()
        assert np.array_equal(zs[0][k], expected)
    assert np.abs(samples_of(outs[0], 5) - samples_of(outs[1], 5)).max() <= 1


@pytest.mark.parametrize("solver, N", [("euler", 3), ("heun", 5), ("rk45", 20), ("RK23", 20), ("DOP853", 20)])
def test_reported_nfe_equals_counted_network_calls(tmp_path, weights, monkeypatch, solver, N):
    calls = []

    def counting_build_network(config, name="config"):
        net = build_network(config, name)

        def count(module, inputs):
            assert torch.is_inference_mode_enabled() and not module.training
            calls.append(inputs[0].shape[0])
        net.register_forward_pre_hook(count)
        return net

    monkeypatch.setattr(generate, "build_network", counting_build_network)
    out = sample(tmp_path, weights["flow"], "--solver", solver, "--N", N, "--num_samples", 3, "--batchsize", 2,
                 "--rtol", 1e-3, "--atol", 1e-3)
    results = results_of(out)
    assert results["num_batches"] == 2
    assert results["nfes_mean"] == pytest.approx(len(calls) / 2)
    if solver.lower() in ("rk45", "rk23", "dop853"):   # the paper's scipy names, run by torchdiffeq
        assert results["method"] == {"rk45": "dopri5", "rk23": "bosh3", "dop853": "dopri8"}[solver.lower()]
        assert results["straightness_mean"] is None and results["nfes_mean"] > 0
    else:
        assert results["nfes_mean"] == N and len(calls) == 2 * N


@pytest.mark.parametrize("solver, N", [("euler", 1), ("heun", 1), ("heun", 3)])
def test_small_fixed_step_counts(tmp_path, weights, solver, N):
    out = sample(tmp_path, weights["flow"], "--solver", solver, "--N", N, "--num_samples", 2, "--save_z")
    x, _ = reference_solve(weights["flow_net"], torch.from_numpy(zs_of(out, 2)), solver, N)
    assert np.abs(samples_of(out, 2) - to_grey(x)).max() <= 1
    assert results_of(out)["nfes_mean"] == N


def test_paper_command_with_128_euler_steps(tmp_path, weights):
    # The paper's first README command, on the CPU (no --gpu) and with the tiny config.
    out = sample(tmp_path / "test", weights["flow"], "--N", 128, "--res", 28, "--input_nc", 1,
                 "--num_samples", 1, "--save_z")
    x, _ = reference_solve(weights["flow_net"], torch.from_numpy(zs_of(out, 1)), "euler", 128)
    assert np.abs(samples_of(out, 1) - to_grey(x)).max() <= 1
    assert results_of(out)["nfes_mean"] == 128


# ----------------------------------------------------------------------------
# Checkpoints.

def test_checkpoint_formats_all_load_the_same_weights(tmp_path, weights):
    other = perturbed(build_network(load_config(CONFIG_DE)), seed=3).state_dict()
    state = {"model_state_dict": other, "ema_model_state_dict": weights["flow_net"].state_dict(),
             "optimizer_state_dict": {}, "iter": 100}
    torch.save(state, tmp_path / "training_state_100.pth")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    torch.save(other, run_folder / "flow_model_50_ema.pth")          # older: must not be chosen
    torch.save(weights["flow_net"].state_dict(), run_folder / "flow_model_100_ema.pth")
    outs = [sample(tmp_path / name, ckpt, "--N", 2, "--num_samples", 2)
            for name, ckpt in (("paper", weights["flow"]), ("state", str(tmp_path / "training_state_100.pth")),
                               ("folder", str(run_folder)))]
    reference = samples_of(outs[0], 2)
    for out in outs[1:]:
        assert np.array_equal(samples_of(out, 2), reference)


@pytest.mark.parametrize("kind", ["keys", "shapes"])
def test_mismatched_checkpoint_is_one_line_naming_keys(tmp_path, capsys, kind):
    if kind == "keys":  # a 32x32 network: its layers have other names
        other, expected = load_config(CONFIG_OTHER), ["missing keys", "enc.28x28_conv.weight", "unexpected keys"]
    else:               # the same layers with fewer channels
        other, expected = dict(load_config(CONFIG_DE), model_channels=8), ["shape mismatch", "map_layer0.weight"]
    torch.save(build_network(other).state_dict(), tmp_path / "flow_model_1_ema.pth")
    with pytest.raises(SystemExit) as stop:
        cli_main(generate.main, ["--dir", str(tmp_path / "out"), "--ckpt", str(tmp_path / "flow_model_1_ema.pth"),
                                 "--config_de", CONFIG_DE])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert "does not match" in error and all(text in error for text in expected), error
    assert not os.path.exists(tmp_path / "out")  # nothing written


# ----------------------------------------------------------------------------
# Reconstruction through the learned coupling.

def test_reconstruction_of_folder_dataset(tmp_path, weights):
    digits = write_mnist_pngs(str(tmp_path / "digits"), 3)
    out = sample(tmp_path / "out", weights["flow"], "--N", 2, "--num_samples", 3, "--batchsize", 2, "--seed", 5,
                 "--encoder", weights["encoder"], "--config_en", CONFIG_EN, "--dataset", "folder",
                 "--data_path", digits, "--save_data", "--save_z")
    real = np.stack([read_png(os.path.join(digits, f"{k:05d}.png")) for k in range(3)])
    assert np.abs(samples_of(out, 3, "data") - real).max() <= 1
    x = torch.from_numpy(real).float()[:, None] / 127.5 - 1
    noise = torch.stack([torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(5 + k)) for k in range(3)])
    with torch.no_grad():
        z, _, _ = weights["encoder_net"](x, noise=noise)
    assert np.allclose(zs_of(out, 3), z.numpy(), atol=1e-5)
    x0, _ = reference_solve(weights["flow_net"], z, "euler", 2)
    assert np.abs(samples_of(out, 3) - to_grey(x0)).max() <= 1


# ----------------------------------------------------------------------------
# Several processes.

def test_rank_indices_cover_each_index_once():
    for count, world in ((5, 2), (3, 4), (8, 8), (1, 3)):
        shares = [generate.rank_indices(count, rank, world) for rank in range(world)]
        assert sorted(sum(shares, [])) == list(range(count))


def test_two_cpu_processes_match_one(tmp_path, weights):
    options = ["--N", 2, "--num_samples", 5, "--batchsize", 2, "--save_z"]
    single = sample(tmp_path / "one", weights["flow"], *options)
    # CPU processes with gloo even where a GPU exists (two ranks cannot share one GPU under NCCL).
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "generate.py", "--dir", str(tmp_path / "two"), "--ckpt", weights["flow"], "--config_de", CONFIG_DE,
               "--amp", "none", *map(str, options)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = str(tmp_path / "two")
    assert sorted(os.listdir(os.path.join(two, "samples"))) == [f"{k:05d}.png" for k in range(5)]
    assert sorted(os.listdir(os.path.join(two, "zs"))) == [f"{k:05d}.npy" for k in range(5)]
    assert np.array_equal(zs_of(two, 5), zs_of(single, 5))
    assert np.abs(samples_of(two, 5) - samples_of(single, 5)).max() <= 1
    results, reference = results_of(two), results_of(single)
    assert results["world_size"] == 2 and results["nfes_mean"] == 2
    assert results["z_norms"] == pytest.approx(reference["z_norms"], rel=1e-6)
    assert results["straightness_mean"] == pytest.approx(reference["straightness_mean"], rel=1e-3)


# ----------------------------------------------------------------------------
# Errors before any work, and other runs' outputs.

def _error_cases(weights, tmp_path):
    base = ["--ckpt", weights["flow"], "--config_de", CONFIG_DE, "--num_samples", "2"]
    encoder = ["--encoder", weights["encoder"]]
    cases = [
        (["--solver", "heun", "--N", "4"], "N must be odd for heun"),
        (["--ckpt", str(tmp_path / "missing.pth")], "not found"),
        (["--config_de", str(tmp_path / "missing.json")], "not found"),
        (encoder + ["--dataset", "folder"], "--config_en"),
        (encoder + ["--config_en", CONFIG_EN], "--dataset"),
        (["--num_samples", "0"], "at least 1"),
        (["--res", "32"], "disagrees"),
        (["--input_nc", "3"], "disagrees"),
        (["--save_data"], "--encoder"),
        (["--solver", "rk45", "--save_traj"], "euler or heun"),
        (["--N", "0"], "positive"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--gpu", "0"], "no CUDA"))
    return [(base + extra, message) for extra, message in cases]


def test_errors_come_before_any_work(tmp_path, weights):
    for argv, message in _error_cases(weights, tmp_path):
        out = tmp_path / "out"
        with pytest.raises(UserError, match=message):
            generate.main(argv + ["--dir", str(out)])
        assert not out.exists(), argv


def test_error_is_one_line_and_exit_code(tmp_path, weights, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(generate.main, ["--dir", str(tmp_path), "--ckpt", weights["flow"], "--config_de", CONFIG_DE,
                                 "--solver", "heun", "--N", "100"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: N must be odd for heun (N is the NFE; try --N 101), got 100"]


def test_unwritable_output_dir(tmp_path, weights):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=re.escape(f"cannot be made: {blocker} is a file, not a folder")):
        sample(blocker / "out", weights["flow"], "--num_samples", 1)


def test_other_runs_outputs_are_not_overwritten_silently(tmp_path, weights):
    out = sample(tmp_path, weights["flow"], "--N", 2, "--num_samples", 3)
    before = samples_of(out, 3)
    with pytest.raises(UserError, match="other arguments.*N 2 vs 3"):
        sample(tmp_path, weights["flow"], "--N", 3, "--num_samples", 2)
    assert np.array_equal(samples_of(out, 3), before)
    sample(tmp_path, weights["flow"], "--N", 2, "--num_samples", 3, "--batchsize", 1)  # same run: allowed
    sample(tmp_path, weights["flow"], "--N", 3, "--num_samples", 2, "--overwrite")
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00000.png", "00001.png"]  # stale files gone
    assert results_of(out)["N"] == 3


def test_help_documents_every_option_with_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        generate.parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--gpu", "--dir", "--ckpt", "--batchsize", "--res", "--input_nc", "--N", "--num_samples",
                   "--encoder", "--config_en", "--config_de", "--dataset", "--data_path", "--data_root",
                   "--no_scale", "--save_traj", "--save_z", "--save_data", "--solver", "--seed", "--rtol",
                   "--atol", "--debug", "--overwrite"):
        assert option in text
    for default in ("(default: 0)", "(default: 1e-05)", "(default: euler)", "(default: 4)"):
        assert default in text


# ----------------------------------------------------------------------------
# A training run's folder or state carries its config; EDM-style seeds, --outdir and --grid.

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Three iterations of the trainer on the tiny configs: a run folder with config.json, EMA files, states."""
    digits = write_mnist_pngs(str(tmp_path_factory.mktemp("digits")), 8)
    folder = str(tmp_path_factory.mktemp("trained") / "run")
    trainer.main(["--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", CONFIG_DE,
                  "--config_en", CONFIG_EN, "--num_workers", "0", "--batchsize", "2", "--iterations", "3",
                  "--learning_rate", "1e-2", "--ema_decay", "0.5", "--sample_every", "1000", "--N", "2"])
    return folder


def generate_only(*argv):
    generate.main([*map(str, argv)])


def test_run_folder_needs_no_config_and_writes_a_labelled_grid(tmp_path, trained_run, capsys):
    out = tmp_path / "out"
    generate_only("--ckpt", trained_run, "--N", 20, "--dir", out, "--grid", "--seeds", "0-15")
    # the first line names the file the folder resolved to (its newest EMA file)
    first = capsys.readouterr().out.splitlines()[0]
    assert f"parameters (from {os.path.join(trained_run, 'flow_model_3_ema.pth')})" in first, first
    assert sorted(os.listdir(out / "samples")) == [f"{k:05d}.png" for k in range(16)]
    grid = read_png(out / "grid.png")
    sample_image = read_png(out / "samples" / "00000.png")
    assert grid.ndim == 3 and grid.shape[2] == 3
    # 8 columns of (enlarged) samples side by side, two rows: wider than 8 samples, taller than 2
    assert grid.shape[1] > 8 * sample_image.shape[1] and grid.shape[0] > 2 * sample_image.shape[0]
    assert results_of(out)["seeds"] == list(range(16))
    with open(out / "config_sampling.json") as handle:
        assert json.load(handle)["resolved_config_de"] == load_config(CONFIG_DE)


def test_training_state_needs_no_config_and_uses_its_ema_weights(tmp_path, trained_run):
    state = os.path.join(trained_run, "training_state_latest.pth")
    generate_only("--ckpt", state, "--N", 3, "--num_samples", 2, "--dir", tmp_path / "state")
    bare = str(tmp_path / "alone.pth")
    shutil.copy(os.path.join(trained_run, "flow_model_3_ema.pth"), bare)
    generate_only("--ckpt", bare, "--config_de", CONFIG_DE, "--N", 3, "--num_samples", 2, "--dir", tmp_path / "bare")
    assert np.array_equal(samples_of(str(tmp_path / "state"), 2), samples_of(str(tmp_path / "bare"), 2))


def test_a_bare_ema_file_without_config_asks_for_one(tmp_path, trained_run, capsys):
    bare = str(tmp_path / "alone.pth")
    shutil.copy(os.path.join(trained_run, "flow_model_3_ema.pth"), bare)
    with pytest.raises(SystemExit):
        cli_main(generate.main, ["--ckpt", bare, "--dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--config_de is required" in lines[0] and bare in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_config_that_disagrees_with_the_saved_one_is_named(tmp_path, trained_run):
    with open(CONFIG_DE) as handle:
        other = dict(json.load(handle), model_channels=8, dropout=0.1)
    path = tmp_path / "other_de.json"
    path.write_text(json.dumps(other))
    for ckpt in (trained_run, os.path.join(trained_run, "training_state_latest.pth")):
        with pytest.raises(UserError, match=r"disagrees with the config saved in .*dropout 0\.1 vs 0\.0; "
                                            r"model_channels 8 vs 16"):
            generate_only("--ckpt", ckpt, "--config_de", path, "--dir", tmp_path / "out")
    generate_only("--ckpt", trained_run, "--config_de", CONFIG_DE, "--N", 2, "--num_samples", 1,
                  "--dir", tmp_path / "same")   # the same config: fine


def test_each_seed_gives_the_image_of_that_seed(tmp_path, weights):
    listed = sample(tmp_path / "listed", weights["flow"], "--N", 2, "--seeds", "3,1-2")
    assert sorted(os.listdir(os.path.join(listed, "samples"))) == ["00001.png", "00002.png", "00003.png"]
    offset = sample(tmp_path / "offset", weights["flow"], "--N", 2, "--seed", 1, "--num_samples", 3)
    for k, seed in enumerate((1, 2, 3)):   # --seed 1: sample k from seed 1 + k
        assert np.array_equal(read_png(os.path.join(listed, "samples", f"{seed:05d}.png")),
                              read_png(os.path.join(offset, "samples", f"{k:05d}.png")))
    assert results_of(listed)["seeds"] == [3, 1, 2]


@pytest.mark.parametrize("options, message", [
    (["--seeds", "5-3"], "goes down"),
    (["--seeds", "1,0-2"], "seed 1 more than once"),
    (["--seeds", "a"], "comma-separated"),
    (["--seeds", "-1"], "comma-separated"),
    (["--seeds", "-3"], r"cannot be negative \(--seed S takes any start"),
    (["--seeds", "0,,1"], "comma-separated"),
    (["--seeds", "0-3", "--num_samples", "5"], "disagrees with the 4 seeds"),
    (["--seeds", "0-3", "--seed", "7"], "only one of them"),
])
def test_bad_seeds_are_one_line(tmp_path, weights, options, message):
    with pytest.raises(UserError, match=message):
        sample(tmp_path / "out", weights["flow"], *options)
    assert not (tmp_path / "out").exists()


def test_outdir_is_an_alias_of_dir(tmp_path, weights):
    generate.main(["--outdir", str(tmp_path / "edm"), "--ckpt", weights["flow"], "--config_de", CONFIG_DE, "--N", "2",
                   "--num_samples", "1"])
    assert os.listdir(tmp_path / "edm" / "samples") == ["00000.png"]


def test_help_shows_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "--outdir" in text
    for name in ("RK45", "RK23", "DOP853", "dopri5", "bosh3", "dopri8"):
        assert name in text


def test_trainer_writes_sample_grids_at_the_last_iteration(trained_run):
    # --sample_every 1000 does not divide --iterations 3: the final grids are still written
    for name in ("traj_uncond_3.png", "traj_uncond_x0_3.png", "traj_reverse_3.png"):
        assert os.path.isfile(os.path.join(trained_run, name)), name


def test_a_huge_sample_count_is_one_line_not_a_full_memory():
    """A --num_samples or --seeds range beyond 10,000,000 stops in the checks (it used to build a seed list
    that filled the memory of a 24 GB machine)."""
    for options, message in ((["--num_samples", str(10 ** 12)], "at most 10,000,000 per run"),
                             (["--seeds", f"0-{10 ** 12}"], "more than 10,000,000 images")):
        args = generate.parse_args(["--dir", "unused", "--ckpt", "unused.pth", *options])
        with pytest.raises(UserError, match=message):
            generate.resolve_seeds(args)
    args = generate.parse_args(["--dir", "unused", "--ckpt", "unused.pth", "--num_samples", str(10 ** 7)])
    assert len(generate.resolve_seeds(args)) == 10 ** 7   # the bound itself is allowed


def test_samples_never_go_into_a_run_folder_or_a_dataset(tmp_path, weights):
    digits = write_mnist_pngs(str(tmp_path / "digits"), 3)
    before = sorted(os.listdir(digits)), sorted(os.listdir(weights["folder"]))
    with pytest.raises(UserError, match=r"holds images of its own \(00000.png, ...\), as a dataset does"):
        sample(digits, weights["flow"], "--N", 1, "--num_samples", 1)
    with pytest.raises(UserError, match=r"holds a training run \(forward_model_100_ema.pth\); write samples into a "
                                        r"folder of their own, e.g. --dir .*samples-euler"):
        sample(weights["folder"], weights["flow"], "--N", 1, "--num_samples", 1)
    with pytest.raises(UserError, match="is inside --data_path .* which this run reads"):
        sample(os.path.join(digits, "recon"), weights["flow"], "--N", 1, "--num_samples", 1, "--encoder",
               weights["encoder"], "--config_en", CONFIG_EN, "--dataset", "folder", "--data_path", digits)
    assert (sorted(os.listdir(digits)), sorted(os.listdir(weights["folder"]))) == before
    # a folder of the run's own, inside it, is fine
    out = sample(os.path.join(weights["folder"], "samples-euler"), weights["flow"], "--N", 1, "--num_samples", 1)
    assert os.listdir(os.path.join(out, "samples")) == ["00000.png"]
    shutil.rmtree(out)
