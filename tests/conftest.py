"""Shared test settings: CPU only, deterministic, offline; CUDA tests skipped without a GPU."""
import os
import sys

# Idle OpenMP threads sleep instead of spinning: the suite starts several processes (torchrun tests) on
# few cores, where spinning threads steal the CPU from the ones with work (see docs/speed.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a few shared cores, competing threads make the tiny
    networks of the tests many times slower. Modules opt in with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def signal_when_ready():
    """The function below, for tests of how a script stops on a signal."""
    return _signal_when_ready


def _signal_when_ready(argv, ready, signal_number, timeout=90):
    """Start ``argv`` (a script of the project, run from its root with one OpenMP thread), wait until
    ``ready()`` is true, send ``signal_number``; returns (exit code, stdout, stderr). Fails when the process
    ends before it is ready."""
    import subprocess
    import time

    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stdout, stderr
