"""train_reverse_img_ddp.py end to end on the CPU: DDP with 2 gloo processes, couplings, bf16, compile, errors.

Tiny configs (configs/tiny28_*.json) on real MNIST digits written as PNGs. Runs in
this process (``cli_main(main, argv)``) wherever a subprocess is not the point.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import train_reverse_img_ddp as trainer
from models import build_encoder, build_network, load_config
from utils import train as plumbing
from utils.data import write_mnist_pngs
from utils.errors import cli_main
from utils.io import load_state_dict_strict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_mnist_pngs(str(tmp_path_factory.mktemp("mnist")), 32)


def base_args(data, folder, *extra):
    return ["--dataset", "folder", "--data_path", data, "--dir", folder, "--config_de", CONFIG_DE,
            "--config_en", CONFIG_EN, "--num_workers", "0", "--sample_every", "1000", *map(str, extra)]


def train(argv, capsys=None):
    """Run the script in this process; returns (exit code, stderr) when ``capsys`` is given."""
    try:
        cli_main(trainer.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if capsys is None:
        assert code == 0, f"training failed with exit code {code}"
        return code, ""
    return code, capsys.readouterr().err


def error_lines(stderr):
    """The lines of stderr that are not a progress bar."""
    return [line for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("train:")]


def stats(folder):
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train_reverse_img_ddp.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------
# Two processes under torchrun (gloo), then resumed under torchrun.

@pytest.fixture(scope="module")
def ddp_run(digits, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ddp"))
    common = base_args(digits, folder, "--batchsize", 8, "--log_every", 1, "--snapshot_every", 2,
                       "--save_every", 4, "--sample_every", 4, "--N", 2, "--learning_rate", 1e-3)
    started = time.time()
    first = torchrun(*common, "--iterations", 4)
    assert first.returncode == 0, first.stderr[-3000:]
    first_state = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)
    second = torchrun(*common, "--iterations", 6, "--resume", os.path.join(folder, "training_state_latest.pth"))
    assert second.returncode == 0, second.stderr[-3000:]
    print(f"two torchrun runs: {time.time() - started:.1f} s")
    return folder, first_state, second


def test_ddp_files_load_strictly(ddp_run):
    folder, _, _ = ddp_run
    flow = build_network(load_config(CONFIG_DE))
    encoder = build_encoder(load_config(CONFIG_EN, "--config_en"))
    for iteration in (4, 6):
        load_state_dict_strict(flow, torch.load(os.path.join(folder, f"flow_model_{iteration}_ema.pth"),
                                                weights_only=True), "flow")
        state = torch.load(os.path.join(folder, f"forward_model_{iteration}_ema.pth"), weights_only=True)
        assert all(key.startswith("encoder.") for key in state)
        load_state_dict_strict(encoder, state, "forward")
    assert os.path.isfile(os.path.join(folder, "training_state_4.pth"))
    for name in ("traj_uncond_4.png", "traj_uncond_x0_N4_4.png", "traj_reverse_x0_4.png", "log.txt", "config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_ddp_ranks_hold_identical_weights(ddp_run):
    """Each rank hashes its own weights at every save; rank 0 records all hashes in the state.
    The recorded hash must also be the hash of the weights actually saved."""
    folder, first_state, _ = ddp_run
    for state in (first_state, torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)):
        checksums = state["param_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]
        saved = [state[key] for key in ("model_state_dict", "forward_model_state_dict", "ema_model_state_dict",
                                        "ema_forward_model_state_dict")]
        assert plumbing.state_checksum(saved) == checksums[0]
    assert len(first_state["rng"]["ranks"]) == 2
    # the ranks drew different noise: their random states differ
    assert not torch.equal(first_state["rng"]["ranks"][0]["torch"], first_state["rng"]["ranks"][1]["torch"])


def test_ddp_resume_continues_from_its_iteration(ddp_run):
    folder, first_state, second = ddp_run
    assert first_state["iter"] == 4
    latest = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)
    assert latest["iter"] == 6 and latest["data_order"]["batches_consumed"] == 6
    assert "at iteration 4" in second.stdout and "iterations 5..6" in second.stdout
    assert [record["iter"] for record in stats(folder)] == [1, 2, 3, 4, 5, 6]
    assert latest["args"]["batchsize"] == 8 and latest["rng"]["world_size"] == 2


# ----------------------------------------------------------------------------
# Couplings and options, one process.

def test_independent_run_writes_no_encoder(digits, tmp_path):
    folder = str(tmp_path / "independent")
    train(base_args(digits, folder, "--independent", "--no_ema", "--batchsize", 4, "--iterations", 3,
                    "--save_every", 3, "--sample_every", 3, "--N", 2))
    files = os.listdir(folder)
    assert "flow_model_3_ema.pth" in files and not any(name.startswith("forward_model") for name in files)
    state = torch.load(os.path.join(folder, "training_state_3.pth"), weights_only=True)
    assert "forward_model_state_dict" not in state and state["config_en"] is None
    assert state["args"]["coupling"] == "independent"
    assert not any(name.startswith("traj_reverse") for name in files)
    # --no_ema: the *_ema.pth file holds the raw weights
    raw, saved = state["model_state_dict"], torch.load(os.path.join(folder, "flow_model_3_ema.pth"), weights_only=True)
    assert state["ema_model_state_dict"] is None and all(torch.equal(raw[key], saved[key]) for key in raw)


def test_bf16_ot_coupling_and_grad_clip(digits, tmp_path):
    folder = str(tmp_path / "bf16")
    train(base_args(digits, folder, "--coupling", "ot", "--amp", "bf16", "--grad_clip", 1.0, "--batchsize", 4,
                    "--iterations", 3, "--log_every", 1))
    records = stats(folder)
    assert [record["iter"] for record in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    assert records[-1]["nonfinite_steps"] == 0


def test_sinkhorn_coupling_with_a_tiny_regularisation_trains_as_exact_ot(digits, tmp_path):
    """--coupling sinkhorn (models/couplings.py) on images: with --ot_reg 1e-4 its plan is the exact OT
    permutation, so one step gives bit for bit the weights of --coupling ot (the reference)."""
    weights = {}
    for coupling in ("ot", "sinkhorn"):
        folder = str(tmp_path / coupling)
        train(base_args(digits, folder, "--coupling", coupling, "--ot_reg", 1e-4, "--batchsize", 8,
                        "--iterations", 1, "--no_ema", "--cpu_shards", 1))
        weights[coupling] = torch.load(os.path.join(folder, "training_state_latest.pth"),
                                       weights_only=True)["model_state_dict"]
        with open(os.path.join(folder, "config.json")) as handle:
            record = json.load(handle)
        assert record["coupling"] == coupling and record["ot_reg"] == 1e-4
    assert all(torch.equal(weights["ot"][key], weights["sinkhorn"][key]) for key in weights["ot"])


def check_compiled_run(digits, folder):
    train(base_args(digits, folder, "--compile", "--batchsize", 4, "--iterations", 2, "--log_every", 1))
    state = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)
    assert state["iter"] == 2 and stats(folder)[-1]["nonfinite_steps"] == 0
    for key in ("model_state_dict", "ema_model_state_dict", "forward_model_state_dict"):
        assert not any("_orig_mod" in name or name.startswith("module.") for name in state[key])
    load_state_dict_strict(build_network(load_config(CONFIG_DE)), state["model_state_dict"], "compiled")


def test_compile_with_dynamo(digits, tmp_path, monkeypatch):
    """--compile captured by TorchDynamo, run by its eager backend: inductor's C++ build takes over ten
    minutes on two loaded cores (the slow test below runs it)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager"))
    check_compiled_run(digits, str(tmp_path / "compiled"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FAST_ODE_SLOW_TESTS") != "1",
                    reason="inductor's CPU compile takes > 10 minutes on 2 loaded cores; set FAST_ODE_SLOW_TESTS=1")
def test_compile_with_inductor(digits, tmp_path):
    check_compiled_run(digits, str(tmp_path / "compiled"))


# ----------------------------------------------------------------------------
# Bad input: one line on stderr, no traceback, nothing written.

def write_config(folder, name, changes):
    with open(CONFIG_EN if "_en" in name else CONFIG_DE) as handle:
        config = json.load(handle)
    config.update(changes)
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        json.dump(config, handle)
    return path


@pytest.mark.parametrize("role, changes, expected", [
    ("--config_de", {"sigma_data": 0.5}, "'sigma_data'"),
    ("--config_en", {"out_channels": 1}, "out_channels"),
])
def test_bad_config_is_one_line(digits, tmp_path, capsys, role, changes, expected):
    path = write_config(str(tmp_path), "bad_en.json" if role == "--config_en" else "bad_de.json", changes)
    argv = base_args(digits, str(tmp_path / "run"), "--iterations", 1)
    argv[argv.index(role) + 1] = path
    code, stderr = train(argv, capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("error:") and path in lines[0] and expected in lines[0]
    assert "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_dir_of_another_run_is_refused(digits, tmp_path, capsys):
    folder = str(tmp_path / "run")
    train(base_args(digits, folder, "--batchsize", 4, "--iterations", 1))
    code, stderr = train(base_args(digits, folder, "--batchsize", 4, "--iterations", 1, "--weight_prior", 3), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and "weight_prior" in lines[0] and "--resume" in lines[0], stderr
    # the same configuration again, without --resume: refused too, since it would overwrite the states
    code, stderr = train(base_args(digits, folder, "--batchsize", 4, "--iterations", 1), capsys)
    assert code == 1 and "training_state_latest.pth" in stderr and "--resume auto" in stderr


def test_unwritable_dir_is_one_line(digits, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, stderr = train(base_args(digits, str(blocker / "run"), "--iterations", 1), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and f"cannot be made: {blocker} is a file, not a folder" in lines[0], stderr


def test_batch_that_does_not_split_over_processes(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, stderr = train(base_args(digits, str(tmp_path / "run"), "--batchsize", 8), capsys)
    assert code == 1 and "--batchsize 8" in stderr and "3 processes" in stderr


# ----------------------------------------------------------------------------
# Data that does not fit the config, unreadable images, Windows paths, failed starts.

CONFIG32_DE = os.path.join(ROOT, "configs", "tiny32_de.json")
CONFIG32_EN = os.path.join(ROOT, "configs", "tiny32_en.json")


def first_log_line(folder):
    with open(os.path.join(folder, "log.txt")) as handle:
        return handle.readline()


def test_grey_28_images_with_a_colour_32_config_need_resize(digits, tmp_path, capsys):
    folder = str(tmp_path / "run")
    argv = base_args(digits, folder, "--iterations", 1, "--batchsize", 2, "--N", 2)
    argv[argv.index("--config_de") + 1], argv[argv.index("--config_en") + 1] = CONFIG32_DE, CONFIG32_EN
    code, stderr = train(argv, capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert all(word in lines[0] for word in ("28x28 L", "32x32x3", "resized", "converted to RGB", "--resize"))
    assert not os.path.exists(folder)
    train(argv + ["--resize"])
    line = first_log_line(folder)
    assert digits in line and "28x28 L resized and converted to RGB to 32x32x3" in line, line


def test_the_first_log_line_names_the_data(digits, tmp_path):
    folder = str(tmp_path / "run")
    train(base_args(digits, folder, "--iterations", 1, "--batchsize", 2, "--N", 2, "--independent"))
    line = first_log_line(folder)
    assert f"data {digits}: 32 images, 28x28 L = 28x28x1" in line and "no encoder" in line, line


@pytest.fixture
def digits_and_broken(tmp_path):
    folder = write_mnist_pngs(str(tmp_path / "digits"), 16)
    for name in ("zz_broken.png", "zz_empty.png"):
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(b"not a png" if name == "zz_broken.png" else b"")
    return folder


def test_unreadable_images_stop_before_training(digits_and_broken, tmp_path, capsys):
    folder = str(tmp_path / "run")
    code, stderr = train(base_args(digits_and_broken, folder, "--iterations", 2, "--batchsize", 2), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert "2 unreadable image(s)" in lines[0] and "zz_broken.png" in lines[0] and "--bad_images skip" in lines[0]
    assert not os.path.exists(folder)   # nothing started, nothing left behind


def test_skipped_images_are_counted_and_named(digits_and_broken, tmp_path):
    folder = str(tmp_path / "run")
    train(base_args(digits_and_broken, folder, "--iterations", 2, "--batchsize", 2, "--N", 2, "--bad_images", "skip"))
    line = first_log_line(folder)
    assert "16 images" in line and "2 unreadable skipped (zz_broken.png" in line and "zz_empty.png" in line, line
    assert "(8 steps per epoch)" in line


def test_a_windows_path_gets_a_suggestion(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = base_args(digits, str(tmp_path / "run"), "--iterations", 1)
    argv[argv.index("--config_de") + 1] = "configstiny28_de.json"    # configs\tiny28_de.json after the shell
    code, stderr = train(argv, capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and "did you mean configs/tiny28_de.json?" in lines[0], stderr
    argv = base_args("datamnist_png", str(tmp_path / "run"), "--iterations", 1)
    os.makedirs(tmp_path / "data" / "mnist_png", exist_ok=True)
    monkeypatch.chdir(tmp_path)
    code, stderr = train(argv, capsys)
    assert code == 1 and "did you mean data/mnist_png?" in stderr, stderr


def test_a_failed_download_leaves_nothing_and_says_why(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder, data_root = str(tmp_path / "runs" / "mnist"), str(tmp_path / "data")
    code, stderr = train(["--dataset", "mnist", "--data_root", data_root, "--dir", folder, "--config_de",
                          os.path.join(ROOT, "configs", "mnist_de.json"), "--config_en",
                          os.path.join(ROOT, "configs", "mnist_en.json"), "--iterations", "1"], capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert "train-images-idx3-ubyte.gz" in lines[0] and "simulated: no network" in lines[0]
    assert os.path.join(data_root, "MNIST", "raw") in lines[0]          # where to put the files by hand
    assert not os.path.exists(folder) and not os.path.exists(data_root) and not os.path.exists(tmp_path / "runs")


def test_the_papers_unused_flags_are_accepted_with_a_warning(digits, tmp_path, capsys):
    cli_main(trainer.main, base_args(digits, str(tmp_path / "run"), "--iterations", 1, "--batchsize", 2, "--N", 2,
                                     "--weight_cur", 0.5, "--num_samples", 10))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "--weight_cur has no effect" in warnings[0] and "--num_samples" in warnings[1]


def test_a_fresh_start_over_another_config_names_the_keys_that_differ(digits, tmp_path, capsys):
    folder = str(tmp_path / "run")
    code, _ = train(base_args(digits, folder, "--iterations", 1, "--batchsize", 2, "--N", 2), capsys)
    assert code == 0
    other = dict(load_config(CONFIG_DE), dropout=0.25)
    other_path = tmp_path / "other_de.json"
    other_path.write_text(json.dumps(other))
    argv = base_args(digits, folder, "--iterations", 1, "--batchsize", 2, "--N", 2)
    argv[argv.index("--config_de") + 1] = str(other_path)
    code, stderr = train(argv + ["--learning_rate", "1e-4"], capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    # the config's one changed key, not the two whole configs
    assert lines[0] == (f"error: --dir {folder} holds a run with another configuration (config.json: learning_rate "
                        f"3e-05 vs 0.0001; resolved_config_de.dropout {load_config(CONFIG_DE)['dropout']!r} vs "
                        f"0.25); choose another --dir, or pass --resume auto to continue that run")
    # with --resume auto but no state left to continue, the advice is not --resume auto again
    for name in os.listdir(folder):
        if name.endswith(".pth"):
            os.remove(os.path.join(folder, name))
    code, stderr = train(argv + ["--resume", "auto"], capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].endswith(f"resolved_config_de.dropout {load_config(CONFIG_DE)['dropout']!r} vs 0.25); it holds "
                             f"no training state to continue from, so choose another --dir"), lines[0]


def test_options_the_coupling_ignores_are_named_in_a_warning(digits, tmp_path, capsys):
    cli_main(trainer.main, base_args(digits, str(tmp_path / "run"), "--iterations", 1, "--batchsize", 2, "--N", 2,
                                     "--coupling", "ot", "--ot_reg", 0.3, "--weight_prior", 50))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --weight_prior has no effect with --coupling ot (it is used by learned only)",
                        "warning: --config_en has no effect with --coupling ot (it is used by learned only)",
                        "warning: --ot_reg has no effect with --coupling ot (it is used by sinkhorn only)"]


@pytest.mark.parametrize("script", ["train_reverse_img_ddp", "generate", "distill", "train_reverse_2d_joint"])
def test_help_shows_no_none_defaults(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "--debug" in text


def test_default_workers_fit_the_machine():
    parser = trainer.build_parser()
    default = parser.get_default("num_workers")
    assert 1 <= default <= min(4, len(os.sched_getaffinity(0)))


class RecordingWriter:
    """Stands in for TensorBoard's SummaryWriter (not installed here): records what it is given."""

    def __init__(self):
        self.scalars, self.images = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def add_image(self, tag, array, step, dataformats="CHW"):
        self.images.append((tag, step, array.shape, dataformats))

    def close(self):
        pass


def test_tensorboard_gets_scalars_and_sample_grids(digits, tmp_path, monkeypatch):
    writer = RecordingWriter()
    monkeypatch.setattr(plumbing, "_tensorboard_writer", lambda folder: writer)
    train(base_args(digits, str(tmp_path / "run"), "--iterations", 2, "--batchsize", 2, "--log_every", 1, "--N", 2))
    assert ("loss", 1) in writer.scalars and ("loss", 2) in writer.scalars
    tags = {tag for tag, step, _, _ in writer.images if step == 2}
    assert {"samples/uncond", "samples/uncond_x0", "samples/reverse"} <= tags
    assert all(shape[2] == 1 and layout == "HWC" for _, _, shape, layout in writer.images)
