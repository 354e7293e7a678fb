"""Hostile files and hostile moments: a pickle that runs code, a really full disk, bytes with terminal escapes,
signals during start-up, a bad --dest, torchrun ranks, seeds out of range. Each is one clean line, and
nothing the user already has is damaged.
"""
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fid
import generate
import train_reverse_2d_joint as script_2d
import train_reverse_img_ddp as trainer
from models import toy2d
from tests.conftest import ROOT
from tests.test_fid import ChannelMeans, assert_one_line_error, offline, run_fid, save_torchscript  # noqa: F401
from tests.test_fid import write_constant_images
from utils.errors import UserError, cli_main
from utils.io import append_text, load_torch, save_json, save_torch, save_torch_all

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")


# ----------------------------------------------------------------------------
# fid.py never unpickles a detector.

class MakesAFolder:
    """Unpickling this object creates ``path``: what a hostile pickle would do, made visible."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture
def fid_inputs(tmp_path):
    images = write_constant_images(tmp_path / "images", np.random.default_rng(0).integers(20, 200, (4, 3)))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    return images, str(tmp_path / "ref.npz")


@pytest.mark.parametrize("name", ["detector.pkl", "detector.pt"])
def test_a_crafted_detector_pickle_never_runs(tmp_path, fid_inputs, capsys, name):
    images, ref = fid_inputs
    marker = tmp_path / "marker"
    with open(tmp_path / name, "wb") as handle:
        pickle.dump(MakesAFolder(str(marker)), handle)
    for command in (["calc", f"--images={images}", f"--ref={ref}", "--num=4"],
                    ["ref", f"--data={images}", f"--dest={tmp_path / 'out.npz'}"]):
        status, _, err = run_fid(capsys, *command, f"--detector={tmp_path / name}", "--device=cpu")
        assert_one_line_error(status, err, "pickle" if name.endswith(".pkl") else "not a TorchScript file")
        assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()


def test_a_pickle_url_is_refused_before_any_download(capsys, fid_inputs):
    images, ref = fid_inputs
    status, _, err = run_fid(capsys, "calc", f"--images={images}", f"--ref={ref}", "--num=4", "--device=cpu",
                             "--detector=https://example.invalid/inception-2015-12-05.pkl")
    assert_one_line_error(status, err, "is a pickle", fid.DETECTOR_URL)


@pytest.mark.parametrize("kind", ["empty", "folder", "under a file"])
def test_ref_checks_dest_before_the_statistics_pass(tmp_path, fid_inputs, capsys, monkeypatch, kind):
    images, _ = fid_inputs
    (tmp_path / "a-file").write_text("x")
    dest = {"empty": "", "folder": str(tmp_path), "under a file": str(tmp_path / "a-file" / "ref.npz")}[kind]
    standin = tmp_path / "means.pt"
    save_torchscript(ChannelMeans(), standin)

    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics pass started first")
    monkeypatch.setattr(fid, "compute_statistics", no_pass)
    status, _, err = run_fid(capsys, "ref", f"--data={images}", f"--dest={dest}", f"--detector={standin}",
                             "--device=cpu")
    assert_one_line_error(status, err, "--dest")


# ----------------------------------------------------------------------------
# A full disk names the file, also when torch.save wraps the OSError; the previous file survives.

@contextlib.contextmanager
def small_filesystem(folder, size):
    """A tmpfs of ``size`` mounted on ``folder`` (needs root and mount rights; skipped otherwise)."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    with small_filesystem(tmp_path / "small", "64k") as folder:
        yield folder


def test_a_real_full_disk_stops_training_in_one_line_naming_the_state(tmp_path, capsys):
    """The issue's case: torch.save of a training state (about 7 MB here) into a 2 MiB filesystem."""
    from utils.data import write_mnist_pngs
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    with small_filesystem(tmp_path / "small", "2m") as folder:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(trainer.main, ["--dataset", "folder", "--data_path", digits, "--dir", str(folder / "run"),
                                    "--config_de", CONFIG_DE, "--config_en", CONFIG_EN, "--batchsize", "2",
                                    "--num_workers", "0", "--iterations", "2", "--snapshot_every", "2",
                                    "--save_every", "1000", "--sample_every", "1000"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert exit_info.value.code == 1 and len(lines) == 1, lines
        assert f"no space left on device writing {folder / 'run' / 'training_state_latest.pth'}" in lines[0]
        assert not [name for name in os.listdir(folder / "run") if name.endswith(".tmp")]
        with open(folder / "run" / "config.json") as handle:
            assert json.load(handle)["iterations"] == 2


def test_a_full_disk_during_a_save_leaves_no_weights_ahead_of_the_state_and_the_same_command_restarts(tmp_path,
                                                                                                      capsys):
    """The model files fit and the training state does not: none of them may land (weights of an iteration with no
    state to continue from made both a fresh start and --resume auto refuse the folder); after space is freed the
    same command runs."""
    from utils.data import write_mnist_pngs
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    argv = ["--dataset", "folder", "--data_path", digits, "--config_de", CONFIG_DE, "--config_en", CONFIG_EN,
            "--batchsize", "2", "--num_workers", "0", "--iterations", "2", "--snapshot_every", "2",
            "--save_every", "1000", "--sample_every", "1000"]
    with small_filesystem(tmp_path / "small", "4m") as folder:
        run = folder / "run"
        with pytest.raises(SystemExit) as exit_info:
            cli_main(trainer.main, argv + ["--dir", str(run)])
        assert exit_info.value.code == 1
        # the weights were staged first and fitted: the state is what did not
        assert f"no space left on device writing {run / 'training_state_latest.pth'}" in capsys.readouterr().err
        left = sorted(os.listdir(run))
        assert not [name for name in left if name.endswith((".pth", ".tmp"))], left
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        cli_main(trainer.main, argv + ["--dir", str(run)])
        assert {"flow_model_2_ema.pth", "forward_model_2_ema.pth", "training_state_latest.pth"} <= set(os.listdir(run))


def test_save_torch_all_writes_all_or_none(full_disk):
    first, second = full_disk / "first.pth", full_disk / "second.pth"
    save_torch({"old": torch.zeros(4)}, first)
    with pytest.raises(UserError, match=f"no space left on device writing {second}"):
        save_torch_all([({"new": torch.ones(16)}, first), ({"big": torch.zeros(1 << 16)}, second)])
    assert torch.equal(load_torch(first)["old"], torch.zeros(4)) and not second.exists()
    assert sorted(os.listdir(full_disk)) == ["first.pth"]
    save_torch_all([({"new": torch.ones(16)}, first), ({"small": torch.zeros(8)}, second)])
    assert torch.equal(load_torch(first)["new"], torch.ones(16)) and torch.equal(load_torch(second)["small"], torch.zeros(8))


def test_a_real_full_disk_names_the_file_and_keeps_the_previous_one(full_disk):
    path = full_disk / "state.pth"
    save_torch({"weights": torch.arange(10.0)}, path)
    with pytest.raises(UserError, match=f"no space left on device writing {path}"):
        save_torch({"weights": torch.zeros(1 << 16)}, path)                  # 256 KiB into 64 KiB
    with pytest.raises(UserError, match=f"no space left on device writing {full_disk / 'big.json'}"):
        save_json(list(range(1 << 15)), full_disk / "big.json")
    with pytest.raises(UserError, match=f"no space left on device writing {full_disk / 'log.txt'}"):
        append_text(full_disk / "log.txt", "x" * (1 << 17))
    assert torch.equal(load_torch(path)["weights"], torch.arange(10.0))
    assert not [name for name in os.listdir(full_disk) if name.endswith(".tmp")]


def test_a_simulated_full_disk_inside_torch_save_names_the_file(tmp_path, monkeypatch):
    """What torch.save raises on a real ENOSPC: a RuntimeError whose context is the OSError."""
    path = tmp_path / "state.pth"

    def save_and_fail(obj, handle, *args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", save_and_fail)
    with pytest.raises(UserError, match=f"no space left on device writing {path}"):
        save_torch({"weights": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# A corrupt checkpoint is one printable line.

def test_a_corrupt_checkpoint_line_holds_no_terminal_escapes(tmp_path, capsys):
    path = tmp_path / "flow_model_1_ema.pth"
    # a pickle naming a "global" with a colour escape in it (torch's refusal adds bold escapes of its own),
    # and random bytes
    noise = bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8))
    for content, reason in ((b"\x80\x02c\x1b[31mevil\nname\n.", "truncated or corrupt"),
                            (b"PK\x03\x04" + noise, "truncated or corrupt"),     # a broken zip archive
                            (noise, "is not a PyTorch file"),
                            (b"2026-12-07 iteration 1: loss 1.9\n", "is not a PyTorch file")):   # a log.txt
        path.write_bytes(content)
        with pytest.raises(SystemExit):
            cli_main(generate.main, ["--dir", str(tmp_path / "out"), "--ckpt", str(path), "--config_de", CONFIG_DE])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and reason in lines[0], err
        assert all(char.isprintable() for char in lines[0]), repr(lines[0])
        assert "weights_only" not in lines[0]    # the reason, not torch's advice to load it unsafely


# ----------------------------------------------------------------------------
# SIGTERM / SIGINT during start-up: one line and 128 + the signal number, never a traceback or -15.

def catches_sigterm(pid):
    """Whether process ``pid`` has a handler for SIGTERM (the SigCgt mask of /proc/<pid>/status)."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("script, number", [("train_reverse_img_ddp.py", signal.SIGTERM),
                                            ("train_reverse_img_ddp.py", signal.SIGINT),
                                            ("generate.py", signal.SIGTERM), ("distill.py", signal.SIGTERM),
                                            ("train_reverse_2d_joint.py", signal.SIGTERM),
                                            ("fid.py", signal.SIGINT)])
def test_a_signal_during_start_up_is_a_clean_exit(tmp_path, script, number):
    argv = {"fid.py": ["calc", f"--images={tmp_path}", f"--ref={tmp_path / 'ref.npz'}"],
            "train_reverse_2d_joint.py": ["--dir", str(tmp_path / "run")]}.get(script, ["--dir", str(tmp_path / "run")])
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # the scripts install their handlers before the slow imports; signal them as soon as they have
        while not catches_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.005)
        process.send_signal(number)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 128 + number, stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {signal.Signals(number).name}"), stderr


def test_a_signal_after_the_imports_stops_cleanly_and_frees_the_folder(tmp_path, capsys, monkeypatch):
    """In the checks after the imports (here: while the dataset is read) the signal raises where the program
    is: one line, 143, the new --dir not even created, no lock held."""
    from utils import errors, runlock
    from utils.data import write_mnist_pngs
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    folder = tmp_path / "run"
    real_build = trainer.build_dataset

    def build_then_get_sigterm(*args, **kwargs):
        dataset = real_build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler runs before this returns
        return dataset
    monkeypatch.setattr(trainer, "build_dataset", build_then_get_sigterm)
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    errors.exit_cleanly_on_signals()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(trainer.main, ["--dataset", "folder", "--data_path", digits, "--dir", str(folder),
                                    "--config_de", CONFIG_DE, "--config_en", CONFIG_EN, "--batchsize", "2"])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), lines
    # a new --dir is made only once the run can start (the dataset is read before): nothing is left behind
    assert not folder.exists()
    with runlock.locked(str(folder)):   # and nothing holds it
        pass


SIGNAL_WHILE_EXITING = """
import atexit, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from utils import errors
late = sys.argv[2:] == ["late"]

def teardown():   # what a finished run's teardown may meet: a supervisor's SIGTERM while workers shut down
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    print("teardown went on", flush=True)

if late:   # registered first, so it runs last: as the interpreter's own teardown after every atexit handler
    atexit.register(teardown)
errors.exit_cleanly_on_signals()

def main(argv):
    print("done", flush=True)
    if argv == ["exit"]:
        sys.exit(0)
    if argv == ["fail"]:
        raise errors.UserError("bad input")

if not late:
    atexit.register(teardown)
errors.cli_main(main, [] if late else sys.argv[2:])
"""


@pytest.mark.parametrize("how", ["return", "exit", "fail", "late"])
def test_a_signal_after_the_work_ends_the_process_quietly(how):
    """SIGTERM in the seconds after a program's work (its teardown) used to print 'Exception ignored in ...
    Stopped: SIGTERM' with a traceback; now one note, and the program's status (0, or 1 after an error)."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_EXITING, ROOT, *([] if how == "return" else [how])],
                            capture_output=True, text=True, timeout=60)
    if how == "late":   # in the interpreter's teardown the signal is ignored: the process ends as it would have
        assert (result.returncode, result.stdout, result.stderr) == (0, "done\nteardown went on\n", "")
        return
    assert result.stdout == "done\n"
    if how == "fail":   # the error's line and status are kept
        assert (result.returncode, result.stderr) == (
            1, "error: bad input\nnote: SIGTERM while exiting; the error above was the outcome\n")
    else:
        assert (result.returncode, result.stderr) == (0, "note: SIGTERM while exiting; its files were already written (a stopped run had saved its state)\n")


@pytest.mark.parametrize("script, argv", [("train_reverse_img_ddp.py", ["--bogus"]),
                                          ("fid.py", ["calc", "--bogus"])])
def test_a_usage_error_under_torchrun_is_one_line_not_one_per_rank(script, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(lines) == 1 and "--bogus" in lines[0], done.stdout + done.stderr


def test_sigterm_stops_a_benchmark_with_one_line(tmp_path):
    """The benchmarks install the scripts' signal handling: one line and status 143, no traceback, no .tmp file."""
    out = tmp_path / "bench"
    process = subprocess.Popen([sys.executable, "benchmarks/couplings_2d.py", "--quick", "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("couplings_2d: device")   # training has started
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["error: stopped by SIGTERM (files are written atomically: none is left half-written)"]
    assert not [name for name in os.listdir(out) if ".tmp" in name], os.listdir(out)


USAGE_ON_A_RANK = """
import sys
sys.path.insert(0, sys.argv[1])
from utils import errors
errors.exit_cleanly_on_signals()
errors.USAGE_WAIT_SECONDS = float(sys.argv[2])

def main(argv):
    parser = errors.ArgumentParser("x.py")
    parser.parse_args(argv)

errors.cli_main(main, ["--bogus"])
"""


@pytest.mark.parametrize("local_rank", [0, 1])
def test_a_usage_error_on_a_later_rank_waits_quietly_for_torchruns_signal(local_rank):
    env = dict(os.environ, WORLD_SIZE="2", RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", USAGE_ON_A_RANK, ROOT, "30"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if local_rank == 1:   # waits (local rank 0 prints); torchrun's SIGTERM, once rank 0 exited, ends it quietly
        time.sleep(2.0)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 1 and out == ""
    if local_rank == 0:
        assert err == "error: unrecognized arguments: --bogus (see python x.py --help)\n"
        assert time.monotonic() - started < 15   # no wait on the rank that prints
    else:
        assert err == ""
    # without a signal it ends by itself after its wait
    done = subprocess.run([sys.executable, "-c", USAGE_ON_A_RANK, ROOT, "0.5"],
                          env=dict(env, RANK="1", LOCAL_RANK="1"), capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


WAIT_FOR_A_MISSING_RANK = """
import datetime, os, sys
sys.path.insert(0, sys.argv[1])
from utils import dist, errors
errors.exit_cleanly_on_signals()
errors.stop_by_exception()   # what cli_main sets up: a signal raises where the program is
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
print("waiting", flush=True)
if sys.argv[3] == "project":   # rank 1 of 2; rank 0 never comes (as when it stopped on a bad --data_path)
    dist._init_group("gloo", 1, 2)
else:
    dist.torch_dist.init_process_group("gloo", rank=1, world_size=2, timeout=datetime.timedelta(minutes=30))
"""


def test_sigterm_ends_a_rank_waiting_for_the_others_at_once():
    """torchrun sends SIGTERM to the other ranks when one fails before the rendezvous; a rank waiting inside
    init_process_group (C++) used to run its Python handler only at torchrun's SIGKILL, 30 s later. Now it
    ends at once with one line (nothing from c10d) and 143. The control: the bare init_process_group, the same wait, is still
    running 3 s after the SIGTERM."""
    from utils.dist import free_port
    processes = {how: subprocess.Popen([sys.executable, "-c", WAIT_FOR_A_MISSING_RANK, ROOT, str(free_port()), how],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for how in ("project", "bare")}
    try:
        for process in processes.values():
            assert process.stdout.readline().strip() == "waiting", process.stderr.read()
        time.sleep(1.0)   # inside the wait
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = processes["project"].communicate(timeout=10)
        ended_after = time.monotonic() - signalled
        time.sleep(max(0.0, 3.0 - ended_after))
        still_waiting = processes["bare"].poll() is None
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=60)
    assert processes["project"].returncode == 128 + signal.SIGTERM, stderr
    assert ended_after < 3.0, ended_after
    # only our line: the main thread blocks the signal, so c10d's connect is not interrupted (it used to log a
    # retry warning with a C++ stack trace, "Interrupted system call")
    assert stderr.splitlines() == ["error: stopped by SIGTERM"], stderr
    assert still_waiting


# ----------------------------------------------------------------------------
# torchrun: a bad --batchsize is printed once per node, not once per rank.

@pytest.mark.parametrize("rank, printed", [(0, True), (1, False)])
def test_torchrun_ranks_print_an_argument_error_once(tmp_path, capsys, monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(trainer.main, ["--dataset", "folder", "--data_path", str(tmp_path), "--dir", str(tmp_path / "run"),
                                "--config_de", CONFIG_DE, "--config_en", CONFIG_EN, "--batchsize", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    if printed:
        assert len(err.strip().splitlines()) == 1 and "--batchsize 3" in err, err
    else:
        assert err == ""
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# Seeds: out of range is one line everywhere; negative seeds work in every script.

def test_negative_seeds_give_the_2d_streams_and_out_of_range_seeds_are_one_line(capsys):
    assert not torch.equal(toy2d.randn(4, toy2d.make_generator(-1, 0), "cpu"),
                           toy2d.randn(4, toy2d.make_generator(1, 0), "cpu"))
    script_2d.resolve(script_2d.parse_args(["--seed", "-1"]))
    for seed in (2**64, -(2**64), 2**32):
        with pytest.raises(UserError, match="--seed must be an integer between"):
            script_2d.resolve(script_2d.parse_args(["--seed", str(seed)]))


# ----------------------------------------------------------------------------
# argparse's usage errors are the same one line and exit 1 as every other check.

def _bench(name):
    import importlib
    return importlib.import_module(f"benchmarks.{name}")


USAGE_CASES = [
    ("generate.py", lambda: generate, ["--dir", "x", "--solver", "bogus"], "argument --solver: invalid choice"),
    ("generate.py", lambda: generate, [], "the following arguments are required: --dir"),
    ("train_reverse_img_ddp.py", lambda: trainer, ["--coupling", "curved"], "argument --coupling: invalid choice"),
    ("train_reverse_2d_joint.py", lambda: script_2d, ["--resume", "auto"], "unrecognized arguments: --resume auto"),
    ("distill.py", lambda: __import__("distill"), ["--N", "two"], "argument --N: invalid int value: 'two'"),
    ("benchmarks/throughput.py", lambda: _bench("throughput"), ["--modes"], "argument --modes: expected one argument"),
    ("benchmarks/couplings_2d.py", lambda: _bench("couplings_2d"), ["--quik"], "unrecognized arguments: --quik"),
    ("benchmarks/network_speed.py", lambda: _bench("network_speed"), ["--repeats", "x"], "invalid int value: 'x'"),
    ("benchmarks/stack_images.py", lambda: _bench("stack_images"), ["out.png"], "arguments are required: images"),
    ("benchmarks/mnist_small.py", lambda: _bench("mnist_small"), ["--quik"], "unrecognized arguments: --quik"),
    ("generate.py", lambda: generate, ["--dir", "a", "--outdir", "b"],
     "argument --dir/--outdir: given twice with different values (--dir a, then --outdir b); give it once"),
    ("generate.py", lambda: generate, ["--outdir=a", "--dir", "a", "--dir", "b"],
     "argument --dir/--outdir: given twice with different values (--outdir a, then --dir b); give it once"),
]


def test_an_option_repeated_under_one_name_keeps_the_last_and_aliases_may_agree():
    from utils.errors import ArgumentParser
    parser = ArgumentParser("x.py")
    parser.add_argument("--dir", "--outdir", dest="dir")
    parser.add_argument("--n", type=int, default=3)
    args = parser.parse_args(["--dir", "a", "--outdir", "a", "--n", "4", "--n", "5"])
    assert vars(args) == {"dir": "a", "n": 5}   # argparse's last-wins for a repeated name; no bookkeeping left


def test_stack_images_refuses_to_write_over_an_image_it_stacks(tmp_path, capsys):
    import PIL.Image
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    PIL.Image.new("RGB", (4, 4), "red").save(first)
    PIL.Image.new("RGB", (4, 4), "blue").save(second)
    kept = first.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_bench("stack_images").main, [str(first), str(second), str(first)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: the PNG to write") and len(err.splitlines()) == 1
    assert first.read_bytes() == kept
    cli_main(_bench("stack_images").main, [str(tmp_path / "both.png"), str(first), str(second)])
    with PIL.Image.open(tmp_path / "both.png") as image:
        assert image.size == (4, 8) and image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((0, 7)) == (0, 0, 255)
    # the order mixed up (destination last, as a rerun finds it): the existing first image is kept
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_bench("stack_images").main, [str(first), str(second), str(tmp_path / "both.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "exists" in err and "--overwrite" in err
    assert first.read_bytes() == kept
    cli_main(_bench("stack_images").main, [str(tmp_path / "both.png"), str(second), str(first), "--overwrite"])
    with PIL.Image.open(tmp_path / "both.png") as image:   # replaced, in the new order
        assert image.size == (4, 8) and image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((0, 7)) == (255, 0, 0)
    (tmp_path / "folder").mkdir()   # a folder as the destination is named as one, with or without --overwrite
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(_bench("stack_images").main, [str(tmp_path / "folder"), str(first), *extra])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == f"error: the PNG to write, {tmp_path / 'folder'}, is a folder; give a file name\n"
    assert os.listdir(tmp_path / "folder") == []


@pytest.mark.parametrize("prog, module, argv, message", USAGE_CASES,
                         ids=[f"{case[0]}:{' '.join(case[2])}" for case in USAGE_CASES])
def test_a_usage_error_is_one_line_pointing_at_help(capsys, prog, module, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(module().main, argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ") and message in captured.err
    assert captured.err.strip().endswith(f"(see python {prog} --help)")


def test_help_still_exits_0_and_a_real_process_exits_1_on_a_usage_error():
    run = [sys.executable, os.path.join(ROOT, "generate.py")]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--solver" in shown.stdout and shown.stderr == ""
    bad = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: the following arguments are required: --dir/--outdir "
                                       "(see python generate.py --help)"]


def test_network_speed_takes_the_other_scripts_config_de_and_its_older_config():
    bench = _bench("network_speed")
    assert bench.parse_args(["--config_de", "configs/tiny28_de.json"]).config == "configs/tiny28_de.json"
    assert bench.parse_args(["--config", "configs/tiny28_de.json"]).config == "configs/tiny28_de.json"
    assert bench.parse_args([]).config == "configs/mnist_de.json"
    with pytest.raises(UserError, match="given twice with different values"):
        bench.parse_args(["--config_de", "configs/tiny28_de.json", "--config", "configs/mnist_de.json"])
