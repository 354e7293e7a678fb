"""Resuming image training: exact continuation, kill -9, SIGTERM, broken files, failed saves, non-finite steps.

CPU, one process, tiny configs (configs/tiny28_*.json) on real MNIST digits.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import train_reverse_img_ddp as trainer
from models import build_encoder, build_network, load_config
from utils.checkpoint import load_weights
from utils.data import write_mnist_pngs
from utils.errors import cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_mnist_pngs(str(tmp_path_factory.mktemp("mnist")), 16)   # 8 steps per epoch at batch 2


def base_args(data, folder, *extra):
    return ["--dataset", "folder", "--data_path", data, "--dir", folder, "--config_de", CONFIG_DE,
            "--config_en", CONFIG_EN, "--num_workers", "0", "--batchsize", "2", "--learning_rate", "1e-3",
            "--sample_every", "1000", *map(str, extra)]


def train(argv, capsys=None):
    """Run the script in this process; returns (exit code, stdout, stderr) when ``capsys`` is given."""
    try:
        cli_main(trainer.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if capsys is None:
        assert code == 0, f"training failed with exit code {code}"
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("train:")]


def stats_iterations(folder):
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        return [json.loads(line)["iter"] for line in handle]


def load(path):
    return torch.load(path, weights_only=True)


def max_difference(first, second):
    assert first.keys() == second.keys()
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


# ----------------------------------------------------------------------------
# 30 iterations straight == 15, then resume to 30.

def test_resume_matches_uninterrupted_run(digits, tmp_path):
    # EMA from the first step with a decay that moves; warmup and an epoch boundary (8 steps) inside both
    # halves; sample grids in between must not disturb the training noise.
    options = ["--ema_after_steps", 0, "--ema_decay", 0.9, "--warmup_steps", 10, "--snapshot_every", 5,
               "--save_every", 1000, "--log_every", 5, "--sample_every", 10, "--N", 2]
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    train(base_args(digits, straight, "--iterations", 30, *options))
    train(base_args(digits, halves, "--iterations", 15, *options))
    assert load(os.path.join(halves, "training_state_latest.pth"))["data_order"]["step_in_epoch"] == 7
    train(base_args(digits, halves, "--iterations", 30, "--resume", "auto", *options))

    for name in ("flow_model_30_ema.pth", "forward_model_30_ema.pth"):
        difference = max_difference(load(os.path.join(straight, name)), load(os.path.join(halves, name)))
        assert difference < 1e-6, (name, difference)
    one, two = (load(os.path.join(folder, "training_state_latest.pth")) for folder in (straight, halves))
    assert max_difference(one["model_state_dict"], two["model_state_dict"]) < 1e-6
    assert one["iter"] == two["iter"] == 30
    # the EMA really moved away from the weights, so the comparison above is not trivial
    assert max_difference(one["model_state_dict"], one["ema_model_state_dict"]) > 1e-4
    assert stats_iterations(halves) == stats_iterations(straight) == [5, 10, 15, 20, 25, 30]


def test_resume_with_cpu_shards_matches_uninterrupted_run(digits, tmp_path):
    # the batch in 2 shards run by 2 threads (utils/cpu_shards.py), with dropout: each shard's dropout
    # stream is seeded from the global generator, which the training state restores
    config = str(tmp_path / "tiny28_de_dropout.json")
    with open(CONFIG_DE) as handle:
        dropped = dict(json.load(handle), dropout=0.2)
    with open(config, "w") as handle:
        json.dump(dropped, handle)
    options = ["--cpu_shards", 2, "--config_de", config, "--ema_after_steps", 0, "--ema_decay", 0.9,
               "--snapshot_every", 3, "--save_every", 1000, "--log_every", 3]
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    train(base_args(digits, straight, "--iterations", 12, *options))
    train(base_args(digits, halves, "--iterations", 6, *options))
    train(base_args(digits, halves, "--iterations", 12, "--resume", "auto", *options))
    for name in ("flow_model_12_ema.pth", "forward_model_12_ema.pth"):
        difference = max_difference(load(os.path.join(straight, name)), load(os.path.join(halves, name)))
        assert difference < 1e-6, (name, difference)
    with open(os.path.join(straight, "config.json")) as handle:
        assert json.load(handle)["cpu_shards_used"] == 2
    with open(os.path.join(straight, "log.txt")) as handle:
        assert "2 batch shards in threads" in handle.read()


@pytest.mark.parametrize("extra, message", [
    (["--cpu_shards", -1], "--cpu_shards must be >= 0"),
    (["--cpu_shards", 2, "--compile"], "--cpu_shards above 1 is for training on a CPU in one process"),
    (["--cpu_shards", 3], "--cpu_shards 3 is more than the batch per process (2)"),
])
def test_bad_cpu_shards_is_one_line(digits, tmp_path, capsys, extra, message):
    code, _, stderr = train(base_args(digits, str(tmp_path / "run"), "--iterations", 2, *extra), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and message in lines[0], stderr


# ----------------------------------------------------------------------------
# Preemption.

def wait_for_iteration(folder, iteration, process=None, timeout=180):
    """Block until stats.jsonl reaches ``iteration``; returns the last iteration logged."""
    deadline = time.time() + timeout
    path = os.path.join(folder, "stats.jsonl")
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training ended (code {process.returncode}) before iteration {iteration}")
        if os.path.isfile(path):
            with open(path) as handle:
                done = [json.loads(line)["iter"] for line in handle if line.endswith("\n")]
            if done and done[-1] >= iteration:
                return done[-1]
        time.sleep(0.02)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def test_kill_9_then_resume_auto_redoes_at_most_one_snapshot_interval(digits, tmp_path):
    folder = str(tmp_path / "killed")
    argv = base_args(digits, folder, "--iterations", 16, "--snapshot_every", 4, "--save_every", 1000,
                     "--log_every", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_reverse_img_ddp.py"), *argv], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        logged = wait_for_iteration(folder, 7, process)
        process.kill()
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    logged = max(logged, stats_iterations(folder)[-1])
    resumed_from = load(os.path.join(folder, "training_state_latest.pth"))["iter"]
    assert resumed_from % 4 == 0 and logged - resumed_from <= 4, (logged, resumed_from)
    # the killed run's lock file stays behind; the kernel released its lock, so nothing blocks the resume
    assert os.path.isfile(os.path.join(folder, ".run.lock"))

    train(argv + ["--resume", "auto"])
    assert load(os.path.join(folder, "training_state_latest.pth"))["iter"] == 16
    assert stats_iterations(folder) == list(range(1, 17))   # the redone iterations are logged once
    with open(os.path.join(folder, "log.txt")) as handle:
        assert f"at iteration {resumed_from}" in handle.read()


def test_sigterm_saves_the_reached_iteration(digits, tmp_path):
    folder = str(tmp_path / "terminated")
    argv = base_args(digits, folder, "--iterations", 200, "--snapshot_every", 1000, "--save_every", 1000,
                     "--log_every", 1)

    def terminate_at_iteration_3():
        wait_for_iteration(folder, 3)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda number, frame: None)   # never let it end pytest
    sender = threading.Thread(target=terminate_at_iteration_3, daemon=True)
    try:
        sender.start()
        train(argv)
        sender.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = load(os.path.join(folder, "training_state_latest.pth"))
    reached = stats_iterations(folder)[-1]
    assert 3 <= state["iter"] == reached < 200
    with open(os.path.join(folder, "log.txt")) as handle:
        assert f"stopped by SIGTERM at iteration {reached}" in handle.read()
    weights, _ = load_weights(os.path.join(folder, "training_state_latest.pth"), "flow")
    assert all(torch.isfinite(value).all() for value in weights.values())


# ----------------------------------------------------------------------------
# Broken files and failed saves.

@pytest.fixture(scope="module")
def short_run(digits, tmp_path_factory):
    """4 iterations with training states at 2 and 4; tests copy it before changing anything."""
    folder = str(tmp_path_factory.mktemp("short") / "run")
    train(base_args(digits, folder, "--iterations", 4, "--snapshot_every", 2, "--save_every", 2))
    return folder


def copy_run(short_run, tmp_path):
    return shutil.copytree(short_run, str(tmp_path / "run"))


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def test_truncated_state_given_to_resume_is_one_line(digits, short_run, tmp_path, capsys):
    broken = str(tmp_path / "broken.pth")
    shutil.copy(os.path.join(short_run, "training_state_latest.pth"), broken)
    truncate(broken)
    code, _, stderr = train(base_args(digits, str(tmp_path / "new"), "--iterations", 6, "--resume", broken), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert broken in lines[0] and "truncated or corrupt" in lines[0] and "Traceback" not in stderr


def test_resume_auto_falls_back_to_newest_intact_state(digits, short_run, tmp_path, capsys):
    folder = copy_run(short_run, tmp_path)
    truncate(os.path.join(folder, "training_state_latest.pth"))
    truncate(os.path.join(folder, "training_state_4.pth"))
    code, out, err = train(base_args(digits, folder, "--iterations", 5, "--snapshot_every", 2, "--save_every", 2,
                                     "--resume", "auto"), capsys)
    assert code == 0, err
    assert "warning:" in out and f"falling back to {os.path.join(folder, 'training_state_2.pth')}" in out
    assert load(os.path.join(folder, "training_state_latest.pth"))["iter"] == 5


def test_resume_warns_about_what_changed_and_nothing_else(digits, short_run, tmp_path, capsys, monkeypatch):
    """The same command again (the default --amp auto included) resumes without a warning; changed options are
    named as given; --amp auto that now resolves to another precision (another machine) is named too."""
    from utils.amp import resolve_amp
    folder = copy_run(short_run, tmp_path)
    code, out, err = train(base_args(digits, folder, "--iterations", 5, "--resume", "auto"), capsys)
    assert code == 0, err
    assert "changed arguments" not in out + err, out + err

    resolved = resolve_amp("auto", "cpu")[0]
    other = "none" if resolved == "bf16" else "bf16"
    argv = base_args(digits, folder, "--iterations", 6, "--resume", "auto", "--amp", other)
    argv[argv.index("--learning_rate") + 1] = "2e-3"
    code, out, err = train(argv, capsys)
    assert code == 0, err
    warning = [line for line in out.splitlines() if "changed arguments" in line]
    assert len(warning) == 1, out
    assert f"--amp auto -> {other}" in warning[0] and "--learning_rate 0.001 -> 0.002" in warning[0], warning

    # back to --amp auto and the first learning rate, on a machine where auto gives the other precision
    monkeypatch.setattr(trainer, "resolve_amp", lambda amp, device: (other, "pretend machine"))
    code, out, err = train(base_args(digits, folder, "--iterations", 7, "--resume", "auto"), capsys)
    assert code == 0, err
    warning = [line for line in out.splitlines() if "changed arguments" in line]
    assert len(warning) == 1, out
    assert f"--amp {other} -> auto" in warning[0] and "--learning_rate 0.002 -> 0.001" in warning[0], warning

    # the same command on this machine again: only the precision that --amp auto resolved to differs
    monkeypatch.undo()
    code, out, err = train(base_args(digits, folder, "--iterations", 8, "--resume", "auto"), capsys)
    assert code == 0, err
    warning = [line for line in out.splitlines() if "changed arguments" in line]
    assert len(warning) == 1 and f"--amp auto now computes in {resolved}, not {other}" in warning[0], out
    assert "--learning_rate" not in warning[0], warning


def test_a_finished_run_resumed_with_changed_options_keeps_its_config_json(digits, short_run, tmp_path, capsys):
    """Nothing left to train: the changed options take no effect, so config.json must still describe the run."""
    folder = copy_run(short_run, tmp_path)
    with open(os.path.join(folder, "config.json"), "rb") as handle:
        before = handle.read()
    argv = base_args(digits, folder, "--iterations", 4, "--resume", "auto", "--weight_prior", 3)
    argv[argv.index("--learning_rate") + 1] = "2e-3"
    code, out, err = train(argv, capsys)
    assert code == 0, err
    assert "nothing to do" in out + err and "--weight_prior 10.0 -> 3.0" in out, out
    with open(os.path.join(folder, "config.json"), "rb") as handle:
        assert handle.read() == before
    # with iterations left, the record follows the options the run now continues with
    code, out, err = train(base_args(digits, folder, "--iterations", 5, "--resume", "auto", "--weight_prior", 3), capsys)
    assert code == 0, err
    with open(os.path.join(folder, "config.json")) as handle:
        record = json.load(handle)
    assert record["weight_prior"] == 3.0 and record["iterations"] == 5


def test_resume_with_another_config_is_refused(digits, short_run, tmp_path, capsys):
    folder = copy_run(short_run, tmp_path)
    with open(CONFIG_DE) as handle:
        config = json.load(handle)
    config["model_channels"] = 8
    other = str(tmp_path / "other_de.json")
    with open(other, "w") as handle:
        json.dump(config, handle)
    argv = base_args(digits, folder, "--iterations", 6, "--resume", "auto")
    argv[argv.index("--config_de") + 1] = other
    code, _, stderr = train(argv, capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and "'model_channels'" in lines[0] and "--config_de" in lines[0], stderr


def test_failed_save_leaves_previous_state_loadable(digits, short_run, tmp_path, capsys, monkeypatch):
    folder = copy_run(short_run, tmp_path)
    real_save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "format" in obj:    # a training state: die mid-write
            handle.write(b"PK\x03\x04 partial bytes")
            raise OSError(28, "No space left on device (simulated)")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    code, _, stderr = train(base_args(digits, folder, "--iterations", 6, "--snapshot_every", 2, "--save_every", 1000,
                                      "--resume", "auto"), capsys)
    monkeypatch.undo()
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr
    assert f"no space left on device writing {os.path.join(folder, 'training_state_latest.pth')}" in lines[0]
    state = load(os.path.join(folder, "training_state_latest.pth"))
    assert state["iter"] == 4
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    # and the run continues from it once saving works again
    train(base_args(digits, folder, "--iterations", 6, "--snapshot_every", 2, "--save_every", 1000,
                    "--resume", "auto"))
    assert load(os.path.join(folder, "training_state_latest.pth"))["iter"] == 6


def test_nonfinite_steps_are_skipped_then_stop(digits, tmp_path, capsys):
    folder = str(tmp_path / "diverged")
    code, _, stderr = train(base_args(digits, folder, "--iterations", 30, "--learning_rate", 1e8,
                                      "--max_nonfinite", 3, "--log_every", 1, "--snapshot_every", 2), capsys)
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1 and "non-finite" in lines[0] and "training_state_latest.pth" in lines[0]
    state = load(os.path.join(folder, "training_state_latest.pth"))
    assert state["iter"] < 30
    # skipped steps leave the weights finite (the first step, at lr 1e8, made them huge but finite)
    assert all(torch.isfinite(value).all() for value in state["model_state_dict"].values())
    assert all(torch.isfinite(value).all() for value in state["ema_model_state_dict"].values())
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    # the stop comes before the stopped iteration's record: the one before it shows the first two skipped steps
    stopped = int(lines[0].split("stopped at iteration ")[1].split(":")[0])
    assert [record["iter"] for record in records] == list(range(1, stopped))
    assert records[-1]["nonfinite_steps"] == 2 and records[-1]["loss"] is None


def test_resume_from_a_paper_format_state(digits, short_run, tmp_path, capsys):
    """The paper's training state: networks, optimizer with the EMA inside its per-parameter state, iter."""
    ours = load(os.path.join(short_run, "training_state_latest.pth"))
    optimizer = ours["optimizer_state_dict"]
    # the paper's optimizer order: encoder parameters, then the flow's; its EMA is stored as state['ema']
    encoder_names = [name for name, _ in build_encoder(load_config(CONFIG_EN, "--config_en")).named_parameters()]
    flow_names = [name for name, _ in build_network(load_config(CONFIG_DE)).named_parameters()]
    parameters = [ours["forward_model_state_dict"][name] for name in encoder_names] + \
                 [ours["model_state_dict"][name] for name in flow_names]
    assert len(parameters) == len(optimizer["state"])
    for index, parameter in enumerate(parameters):
        optimizer["state"][index]["ema"] = parameter + 1.0
    paper = {"model_state_dict": ours["model_state_dict"], "forward_model_state_dict": ours["forward_model_state_dict"],
             "optimizer_state_dict": optimizer, "iter": 4}
    path = str(tmp_path / "paper_state.pth")
    torch.save(paper, path)
    folder = str(tmp_path / "continued")
    code, out, err = train(base_args(digits, folder, "--iterations", 5, "--resume", path), capsys)
    assert code == 0, err
    assert "paper-format training state" in out
    state = load(os.path.join(folder, "training_state_latest.pth"))
    assert state["iter"] == 5
    # one step of decay 0.9999 keeps the restored EMA (weights + 1) within 1e-3 of it
    for name in flow_names:
        assert (state["ema_model_state_dict"][name] - (ours["model_state_dict"][name] + 1.0)).abs().max() < 1e-3
