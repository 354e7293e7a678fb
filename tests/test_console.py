"""The console side: a closed pipe (``| tee`` ended by Ctrl-C) never costs work; logs show progress.

Subprocesses on the tiny config; stdout and stderr go into a pipe whose read end the test closes, as a
dying ``tee`` does, before the scripts write to it.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT
from utils.console import LineProgress, SafeStream, progress_bar
from utils.data import write_mnist_pngs

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMP_WAIT_POLICY="PASSIVE")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_mnist_pngs(str(tmp_path_factory.mktemp("mnist")), 16)


def start_piped(script, *argv):
    """The script with stdout and stderr into one pipe, whose read end is closed at once (tee has died)."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.stdout.close()
    return process


def wait_for_record(path, iteration, process, timeout=180):
    """Until ``path`` (a stats.jsonl) holds a record of ``iteration`` or later; returns the last one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the process ended (code {process.returncode}) before iteration {iteration}")
        if os.path.isfile(path):
            with open(path) as handle:
                done = [json.loads(line)["iter"] for line in handle if line.endswith("\n")]
            if done and done[-1] >= iteration:
                return done[-1]
        time.sleep(0.05)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def stats_iterations(folder):
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        return [json.loads(line)["iter"] for line in handle]


def test_sigint_through_a_closed_pipe_saves_the_reached_iteration(digits, tmp_path):
    folder = str(tmp_path / "run")
    process = start_piped("train_reverse_img_ddp.py", "--dataset", "folder", "--data_path", digits, "--dir", folder,
                          "--config_de", CONFIG_DE, "--config_en", CONFIG_EN, "--num_workers", 0, "--batchsize", 2,
                          "--iterations", 10000, "--log_every", 1, "--snapshot_every", 1000, "--save_every", 1000,
                          "--sample_every", 1000)
    try:
        # log lines have gone into the closed pipe for several iterations: training goes on
        wait_for_record(os.path.join(folder, "stats.jsonl"), 4, process)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    state = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)
    reached = stats_iterations(folder)[-1]
    assert 4 <= state["iter"] == reached < 10000
    with open(os.path.join(folder, "log.txt")) as handle:
        assert f"stopped by SIGINT at iteration {reached}" in handle.read()


def test_generate_finishes_into_a_closed_pipe(tmp_path):
    from models import build_network, load_config
    weights = str(tmp_path / "flow.pth")
    torch.save(build_network(load_config(CONFIG_DE)).state_dict(), weights)
    out = str(tmp_path / "out")
    process = start_piped("generate.py", "--dir", out, "--ckpt", weights, "--config_de", CONFIG_DE, "--N", 2,
                          "--num_samples", 3)
    assert process.wait(timeout=180) == 0
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00000.png", "00001.png", "00002.png"]
    assert os.path.isfile(os.path.join(out, "result_sampling.json"))


class ChannelMeans(torch.nn.Module):
    """A stand-in detector: per-channel means of [B, 3, H, W] images as [B, 3] features."""

    def forward(self, images):
        return images.mean(dim=(2, 3))


def write_colour_images(folder, count, seed=0):
    os.makedirs(folder, exist_ok=True)
    colours = np.random.RandomState(seed).randint(20, 200, size=(count, 3))
    for index, colour in enumerate(colours):
        Image.fromarray(np.full((6, 8, 3), colour, np.uint8)).save(os.path.join(folder, f"{index:03d}.png"))
    return folder


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("detector") / "means.pt")
    torch.jit.script(ChannelMeans()).save(path)
    return path


def test_fid_finishes_into_a_closed_pipe(tmp_path, detector):
    images = write_colour_images(str(tmp_path / "images"), 6)
    dest = str(tmp_path / "ref.npz")
    process = start_piped("fid.py", "ref", f"--data={images}", f"--dest={dest}", f"--detector={detector}",
                          "--device=cpu")
    assert process.wait(timeout=120) == 0
    with np.load(dest) as data:
        assert data["mu"].shape == (3,)


def test_fid_ref_reports_progress_in_a_redirected_log(tmp_path, detector, capsys, monkeypatch):
    import fid
    images = write_colour_images(str(tmp_path / "images"), 12)
    monkeypatch.setenv("FAST_ODE_PROGRESS_SECONDS", "0")
    with pytest.raises(SystemExit) as stop:   # stderr is captured here: not a terminal, like a log file
        fid.main(["ref", f"--data={images}", f"--dest={tmp_path / 'ref.npz'}", f"--detector={detector}",
                  "--device=cpu", "--batch=4"])
    assert stop.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("Reference statistics of 12 images")
    assert captured.out.splitlines()[-1].startswith("Saved")
    # one line per batch of 4 (the interval is 0 s), each saying how far it is, no carriage returns
    lines = captured.err.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["4/12", "8/12", "12/12"], lines
    assert "\r" not in captured.err


def test_safe_stream_swallows_a_broken_pipe_and_silences_the_descriptor():
    read_end, write_end = os.pipe()
    stream = io.TextIOWrapper(os.fdopen(write_end, "wb"), line_buffering=True)
    os.close(read_end)
    safe = SafeStream(stream)
    assert safe.write("lost\n") == 5       # BrokenPipeError inside, swallowed
    assert safe.broken
    safe.write("also lost\n")
    safe.flush()
    stream.write("straight to the descriptor\n")   # it now points at /dev/null
    stream.flush()


def test_line_progress_prints_plain_lines_at_the_interval():
    out = io.StringIO()
    progress = LineProgress(total=10, desc="work", unit="img", file=out, interval=0)
    for _ in range(2):
        progress.update(5)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["work: 5/10 img (50%)", "work: 10/10 img (100%)"]
    quiet = io.StringIO()
    progress = LineProgress(total=10, file=quiet, interval=3600)
    progress.update(3)
    progress.close()
    assert quiet.getvalue() == ""          # work shorter than the interval is not worth a line


def test_progress_bar_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=3), LineProgress)
