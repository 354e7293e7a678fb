"""One owner per run folder (utils/runlock.py): a second process is refused in one line naming the holder, the
holder's own files are left alone, and a kill -9'd holder's folder is free again without any manual step.

Every script that writes a --dir takes the lock: train_reverse_img_ddp.py, distill.py, generate.py and
train_reverse_2d_joint.py. The holder is a separate process (flock is per open file, but a second process
is what the lock is for).
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import distill
import generate
import train_reverse_2d_joint as script_2d
import train_reverse_img_ddp as trainer
from models import build_network, load_config
from tests.conftest import ROOT
from utils import runlock
from utils.data import write_mnist_pngs
from utils.errors import UserError, cli_main

CONFIG_DE = os.path.join(ROOT, "configs", "tiny28_de.json")
CONFIG_EN = os.path.join(ROOT, "configs", "tiny28_en.json")

pytestmark = pytest.mark.usefixtures("one_thread")


def run(main, argv, capsys):
    """A script's main in this process through cli_main: (exit code, stderr lines that are not progress)."""
    try:
        cli_main(main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith(("train:", "distill:", "generate:"))]
    return code, lines


def start_holder(folder):
    """Another process that takes the lock of ``folder``, forks a child that outlives it (as DataLoader workers
    do for a few seconds) and sleeps; returns (process, the child's PID) once the lock is held."""
    code = ("import os, sys, time; from utils import runlock; runlock.acquire(sys.argv[1]); child = os.fork()\n"
            "if child == 0:\n    time.sleep(120); os._exit(0)\n"
            "print(child, flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return process, int(process.stdout.readline())


@pytest.fixture
def holder(tmp_path):
    folder = tmp_path / "held"
    process, child = start_holder(folder)
    yield folder, process
    process.kill()
    process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)


def assert_refused(code, lines, process):
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "in use by another process" in lines[0]
    assert f"PID {process.pid} on host {socket.gethostname()}" in lines[0], lines[0]


def test_a_held_folder_is_refused_and_a_kill_9_frees_it(holder):
    folder, process = holder
    with pytest.raises(UserError, match=f"PID {process.pid} on host"):
        runlock.acquire(str(folder))
    process.kill()
    process.wait(timeout=60)
    assert os.path.isfile(folder / runlock.LOCK_NAME)     # the stale file stays; it does not block anyone
    # the holder's forked child still runs: the lock was the holder's alone, so it is free at once
    with runlock.locked(str(folder)):
        pass
    with open(folder / runlock.LOCK_NAME) as handle:   # read once released: a close would drop a POSIX lock
        assert handle.read().split()[0] == str(os.getpid())


def test_killed_writes_temporaries_go_once_the_lock_is_held(holder):
    """Temporary files of killed atomic writes (in --dir and one level down, e.g. generate.py's samples/) are
    removed by the next owner of the lock, and only by it: a process refused by the lock leaves them."""
    folder, process = holder
    stale = [folder / ".training_state_latest.pth.k2j4.tmp", folder / "samples" / ".00000.png.x8q1.tmp",
             folder / "..write_probe.a1b2.tmp"]
    kept = [folder / "samples" / "00000.png", folder / "notes.tmp", folder / "samples" / "deeper" / ".x.png.q.tmp",
            # a run folder inside this one (its own lock file): maybe live, its owner cleans it
            folder / "child" / runlock.LOCK_NAME, folder / "child" / ".training_state_latest.pth.z9y8.tmp"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    with pytest.raises(UserError):
        runlock.acquire(str(folder))
    assert all(path.exists() for path in stale + kept)   # the holder may still be writing them
    process.kill()
    process.wait(timeout=60)
    with runlock.locked(str(folder)):
        assert not any(path.exists() for path in stale)
        assert all(path.read_bytes() == b"partial" for path in kept)


def test_distill_generate_and_2d_refuse_a_held_folder(holder, tmp_path, capsys):
    folder, process = holder
    assert_refused(*run(distill.main, ["--dir", str(folder)], capsys), process)
    assert_refused(*run(script_2d.main, ["--dir", str(folder), "--iterations", "1", "--eval_N", "1"], capsys),
                   process)
    checkpoint = tmp_path / "flow.pth"
    torch.save(build_network(load_config(CONFIG_DE)).state_dict(), checkpoint)
    assert_refused(*run(generate.main, ["--dir", str(folder), "--ckpt", str(checkpoint), "--config_de", CONFIG_DE,
                                        "--num_samples", "1", "--N", "1"], capsys), process)
    assert sorted(os.listdir(folder)) == [runlock.LOCK_NAME]   # nothing written next to the holder's lock


@pytest.mark.parametrize("main", [trainer.main, distill.main, script_2d.main], ids=["train", "distill", "2d"])
def test_a_non_utf8_dir_is_one_line_before_anything_is_written(main, tmp_path, capsys):
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    folder = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"run-\xff"))
    argv = {trainer.main: ["--dataset", "folder", "--data_path", digits, "--config_de", CONFIG_DE, "--config_en",
                           CONFIG_EN, "--num_workers", "0", "--batchsize", "2", "--iterations", "1"],
            distill.main: [],
            script_2d.main: ["--iterations", "1", "--eval_N", "1"]}[main]
    code, lines = run(main, ["--dir", folder, *argv], capsys)
    assert code == 1 and len(lines) == 1 and "UTF-8" in lines[0] and "\\xff" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["digits"]


def test_a_windows_path_is_refused_before_a_folder_with_backslashes_is_made(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    for main, argv in ((trainer.main, ["--dataset", "folder", "--data_path", digits, "--config_de", CONFIG_DE,
                                       "--config_en", CONFIG_EN, "--num_workers", "0", "--iterations", "1"]),
                       (script_2d.main, ["--iterations", "1", "--eval_N", "1"])):
        code, lines = run(main, ["--dir", ".\\runs\\x", *argv], capsys)
        assert (code, lines) == (1, ["error: --dir .\\runs\\x holds a backslash, which is not a folder separator on "
                                     "this system; write the path with forward slashes (./runs/x)"]), main
    assert sorted(os.listdir(tmp_path)) == ["digits"]
    (tmp_path / "a\\b").mkdir()   # a folder that exists with such a name is the user's own: used as it is
    runlock.acquire("a\\b")
    runlock.release("a\\b")


def test_backslashes_are_refused_only_in_the_folders_still_to_be_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a\\b").mkdir()   # the user's own folder with a backslash in its name
    runlock.acquire("a\\b/sub")   # only "sub" is made, and it has none
    runlock.release("a\\b/sub")
    assert (tmp_path / "a\\b" / "sub").is_dir()
    with pytest.raises(UserError, match=r"^--dir a\\b/new\\x holds a backslash, .* \(a\\b/new/x\)$"):
        runlock.acquire("a\\b/new\\x")
    with pytest.raises(UserError, match=r"^--dir C:\\runs\\x is a Windows path \(a drive letter and backslashes\)"):
        runlock.acquire("C:\\runs\\x")
    assert sorted(os.listdir(tmp_path)) == ["a\\b"] and os.listdir(tmp_path / "a\\b") == ["sub"]


def test_a_path_through_a_missing_folder_and_up_to_a_file_is_named_before_anything_is_made(tmp_path):
    # os.makedirs("missing/../afile/x") would make "missing", step out of it and then fail on the file "afile"
    (tmp_path / "afile").write_text("mine")
    folder = f"{tmp_path}/missing/../afile/x"
    with pytest.raises(UserError) as error:
        runlock.acquire(folder)
    assert str(error.value) == (f"output folder --dir {folder} cannot be made: {tmp_path / 'afile'} is a file, not a "
                                f"folder; choose another --dir")
    with pytest.raises(UserError, match="exists and is not a folder"):
        runlock.acquire(f"{tmp_path}/missing/../afile")
    assert sorted(os.listdir(tmp_path)) == ["afile"] and (tmp_path / "afile").read_text() == "mine"
    runlock.acquire(f"{tmp_path}/missing/../run")   # a good path of that form still works (and makes "missing")
    runlock.release(f"{tmp_path}/missing/../run")
    assert (tmp_path / "run" / runlock.LOCK_NAME).is_file()


@pytest.mark.parametrize("kind", ["file", "broken link", "under a file", "file with a slash", "through a file",
                                  "under a broken link"])
def test_a_dir_that_is_a_file_or_a_broken_link_is_named_so_by_every_script(kind, tmp_path, capsys):
    folder = tmp_path / "out"
    blocked = "folder; choose another --dir"
    if kind == "file":
        folder.write_text("mine")
        expected = f"error: output folder --dir {folder} exists and is not a folder; choose another --dir"
    elif kind == "file with a slash":   # stat("out/") fails with ENOTDIR: the file must still be found
        folder.write_text("mine")
        folder = f"{folder}/"
        expected = f"error: output folder --dir {folder} exists and is not a folder; choose another --dir"
    elif kind in ("under a file", "through a file"):
        (tmp_path / "out").write_text("mine")
        # "out/../run" would be "run" after os.path.normpath, but the system walks through the file "out"
        folder = tmp_path / "out" / "sub" / "run" if kind == "under a file" else f"{tmp_path / 'out'}/../run"
        expected = f"error: output folder --dir {folder} cannot be made: {tmp_path / 'out'} is a file, not a {blocked}"
    elif kind == "under a broken link":
        (tmp_path / "out").symlink_to(tmp_path / "gone")
        folder = tmp_path / "out" / "run"
        expected = (f"error: output folder --dir {folder} cannot be made: {tmp_path / 'out'} is a broken symbolic "
                    f"link (to {tmp_path / 'gone'}); choose another --dir")
    else:
        folder.symlink_to(tmp_path / "gone" / "run")
        expected = (f"error: output folder --dir {folder} is a broken symbolic link (to {tmp_path / 'gone' / 'run'}); "
                    f"choose another --dir")
    checkpoint = tmp_path / "flow.pth"
    torch.save(build_network(load_config(CONFIG_DE)).state_dict(), checkpoint)
    digits = write_mnist_pngs(str(tmp_path / "digits"), 4)
    for main, argv in ((generate.main, ["--ckpt", str(checkpoint), "--config_de", CONFIG_DE, "--num_samples", "1",
                                        "--N", "1"]),
                       (trainer.main, ["--dataset", "folder", "--data_path", digits, "--config_de", CONFIG_DE,
                                       "--config_en", CONFIG_EN, "--num_workers", "0", "--iterations", "1"]),
                       (script_2d.main, ["--iterations", "1", "--eval_N", "1"])):
        code, lines = run(main, ["--dir", str(folder), *argv], capsys)
        assert (code, lines) == (1, [expected]), main
    if kind in ("broken link", "under a broken link"):
        assert not (tmp_path / "gone").exists()
    else:
        assert (tmp_path / "out").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["digits", "flow.pth", "out"]


# ----------------------------------------------------------------------------
# Two trainers on one folder: the second is refused, the first finishes with its own files.

def stats_iterations(folder):
    with open(os.path.join(folder, "stats.jsonl")) as handle:
        return [json.loads(line)["iter"] for line in handle]


def test_a_second_trainer_is_refused_and_the_first_finishes_untouched(tmp_path, capsys):
    digits = write_mnist_pngs(str(tmp_path / "digits"), 8)
    folder = str(tmp_path / "run")
    common = ["--dataset", "folder", "--data_path", digits, "--dir", folder, "--config_de", CONFIG_DE, "--config_en",
              CONFIG_EN, "--num_workers", "0", "--batchsize", "2", "--learning_rate", "1e-3", "--log_every", "1",
              "--sample_every", "100000", "--snapshot_every", "3", "--save_every", "100000"]
    argv = common + ["--iterations", "100000"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_reverse_img_ddp.py"), *argv], cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (os.path.isfile(os.path.join(folder, "training_state_latest.pth"))
                   and len(stats_iterations(folder)) >= 4):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.1)
        with open(os.path.join(folder, "config.json"), "rb") as handle:
            config = handle.read()
        # the same fresh command, and a resume next to the running job, are both refused in one line
        assert_refused(*run(trainer.main, argv, capsys), first)
        assert_refused(*run(trainer.main, common + ["--iterations", "1", "--resume", "auto"], capsys), first)
        with open(os.path.join(folder, "config.json"), "rb") as handle:
            assert handle.read() == config
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)     # the first run saves where it is and exits 0
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
    assert first.returncode == 0, stderr
    assert json.loads(config)["iterations"] == 100000
    reached = torch.load(os.path.join(folder, "training_state_latest.pth"), weights_only=True)["iter"]
    assert stats_iterations(folder) == list(range(1, reached + 1))   # every iteration logged once
    # the folder is free again: the run continues with --resume auto
    code, lines = run(trainer.main, common + ["--iterations", str(reached + 1), "--resume", "auto"], capsys)
    assert code == 0, lines
    assert stats_iterations(folder) == list(range(1, reached + 2))
