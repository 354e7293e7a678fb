"""The OpenMP wait policy of CPU benchmarks, chosen before torch is imported.

libgomp (PyTorch's OpenMP runtime) reads ``OMP_WAIT_POLICY`` once, when torch
is imported. Its default lets a thread that runs out of work spin for a while
before it sleeps. On an idle machine that is the fastest setting (no wake-up
latency at the thousands of parallel regions of a training step); on a machine
where other jobs want the cores, the spinning threads take CPU from the threads
that have work, and ``PASSIVE`` (sleep at once) was about 5x faster on this
project's 2-core machine (docs/speed.md). This module does not import torch.
"""
import os
import time


def busy_cpus(interval=0.3):
    """How many CPUs' worth of work other processes ran during ``interval`` seconds (from /proc/stat).

    Falls back to the 1-minute load average where /proc/stat does not exist.
    """
    def snapshot():
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = snapshot()
        time.sleep(interval)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cpus = os.cpu_count() or 1
    elapsed = max(total1 - total0, 1)
    return cpus * (1.0 - (idle1 - idle0) / elapsed)


def choose_omp_wait_policy(threshold=0.5):
    """Set ``OMP_WAIT_POLICY`` for this process unless the environment already does.

    Leaves libgomp's default (spin, then sleep) when the machine is idle, and
    sets ``PASSIVE`` when other processes keep at least ``threshold`` CPUs busy.
    Returns ``(policy, reason)`` for the benchmark's report. Call it before
    ``import torch``.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return os.environ["OMP_WAIT_POLICY"], "set in the environment"
    busy = busy_cpus()
    if busy >= threshold:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE", f"other jobs kept {busy:.1f} CPUs busy: idle threads sleep instead of spinning"
    return "default", f"machine idle ({busy:.1f} CPUs busy): libgomp's default (spin, then sleep)"
