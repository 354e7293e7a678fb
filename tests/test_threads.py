"""utils/threads.py: the OpenMP wait policy chosen before torch is imported."""
import os

from utils import threads


def test_an_explicit_setting_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(threads, "busy_cpus", lambda: 5.0)  # would choose PASSIVE
    assert threads.choose_omp_wait_policy() == ("ACTIVE", "set in the environment")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_busy_machine_gets_passive_and_idle_machine_the_default(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.5)
    policy, reason = threads.choose_omp_wait_policy()
    assert policy == "PASSIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "0.5 CPUs busy" in reason
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.2)
    policy, reason = threads.choose_omp_wait_policy()
    assert policy == "default" and "OMP_WAIT_POLICY" not in os.environ
    assert "0.2 CPUs busy" in reason


def test_busy_cpus_is_between_zero_and_the_cpu_count():
    busy = threads.busy_cpus(interval=0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
