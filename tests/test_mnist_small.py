"""The pure-Python parts of benchmarks/mnist_small.py: FID from features, its bootstrap, arguments."""
import importlib.util
import os
import re

import numpy as np
import pytest

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("mnist_small_bench", "benchmarks/mnist_small.py")
fid = load("fid_for_bench_tests", "fid.py")


def random_features(rng, count, dim, shift=0.0):
    mixing = rng.normal(size=(dim, dim))
    return rng.normal(size=(count, dim)) @ mixing + shift


def test_fast_fid_equals_fid_py_formula():
    rng = np.random.default_rng(0)
    generated = random_features(rng, 50, 8, shift=0.5)
    mu_ref, sigma_ref = bench.feature_statistics(random_features(rng, 300, 8))
    mu, sigma = bench.feature_statistics(generated)
    expected = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    fast = bench.FixedReferenceFID(generated, mu_ref, sigma_ref)(np.ones(len(generated)))
    assert expected > 1.0
    assert fast == pytest.approx(expected, rel=1e-6)


def test_fast_fid_of_a_resample_equals_fid_of_the_repeated_rows():
    rng = np.random.default_rng(1)
    generated = random_features(rng, 30, 5)
    mu_ref, sigma_ref = bench.feature_statistics(random_features(rng, 200, 5, shift=1.0))
    counts = np.bincount(rng.integers(0, 30, 30), minlength=30)
    assert (counts == 0).any() and (counts > 1).any()
    repeated = np.repeat(generated, counts, axis=0)
    expected = fid.frechet_distance(*bench.feature_statistics(repeated), mu_ref, sigma_ref)
    assert bench.FixedReferenceFID(generated, mu_ref, sigma_ref)(counts) == pytest.approx(expected, rel=1e-6)


def test_fast_fid_one_dimension_closed_form():
    # In one dimension FID = (m_g - m_r)^2 + (s_g - s_r)^2.
    generated = np.array([[0.0], [1.0], [2.0], [5.0]])
    mu, sigma = bench.feature_statistics(generated)
    mu_ref, sigma_ref = np.array([1.0]), np.array([[4.0]])
    expected = (2.0 - 1.0) ** 2 + (np.sqrt(sigma[0, 0]) - 2.0) ** 2
    assert bench.FixedReferenceFID(generated, mu_ref, sigma_ref)(np.ones(4)) == pytest.approx(expected, rel=1e-10)


def test_bootstrap_of_a_mean_matches_the_standard_error():
    # Known case: the bootstrap s.d. of a sample mean is s / sqrt(n) (up to resampling noise).
    rng = np.random.default_rng(2)
    data = rng.normal(3.0, 2.0, size=400)
    mean = lambda counts: float(counts @ data / counts.sum())  # noqa: E731
    interval = bench.bootstrap_interval(mean, len(data), resamples=2000, seed=0)
    standard_error = data.std(ddof=1) / np.sqrt(len(data))
    assert interval["point"] == pytest.approx(data.mean())
    assert interval["std"] == pytest.approx(standard_error, rel=0.08)
    assert interval["low"] == pytest.approx(data.mean() - 1.96 * interval["std"], rel=1e-3)
    assert interval["pct_low"] < data.mean() < interval["pct_high"]
    assert interval["high"] - interval["low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.08)


def test_bootstrap_is_deterministic_and_depends_on_the_seed():
    data = np.arange(20.0)
    mean = lambda counts: float(counts @ data / counts.sum())  # noqa: E731
    first = bench.bootstrap_interval(mean, 20, resamples=50, seed=3)
    assert first == bench.bootstrap_interval(mean, 20, resamples=50, seed=3)
    assert first != bench.bootstrap_interval(mean, 20, resamples=50, seed=4)


def test_quick_writes_to_a_scratch_folder_and_moves_the_model():
    quick = bench.parse_args(["--quick"])
    full = bench.parse_args([])
    assert os.path.abspath(quick.out) != os.path.abspath(full.out)
    assert os.path.abspath(quick.out) == os.path.abspath(bench.QUICK_OUT)
    assert not os.path.abspath(quick.out).startswith(os.path.join(ROOT, "benchmarks", "results"))
    # Warm-up shorter than the run and an EMA window (1 / (1 - decay)) well inside it.
    assert quick.warmup_steps < quick.iterations / 4
    assert 1 / (1 - quick.ema_decay) < quick.iterations / 4
    assert bench.parse_args(["--quick", "--out", "x"]).out == "x"


def test_couplings_and_arguments_are_checked():
    assert bench.coupling_beta("learned", 20.0) == ("learned", 20.0)
    assert bench.coupling_beta("learned-beta5", 20.0) == ("learned", 5.0)
    assert bench.coupling_beta("ot", 20.0) == ("ot", None)
    with pytest.raises(SystemExit):
        bench.coupling_beta("learnt", 20.0)
    with pytest.raises(UserError, match="--heun_nfe must be odd"):
        bench.parse_args(["--heun_nfe", "4"])
    with pytest.raises(UserError, match="--teacher_nfe 64 must be one of --euler_nfe"):
        bench.parse_args(["--teacher_nfe", "64"])


@pytest.mark.parametrize("shape", ["file", "file/", "file/../out"])
def test_an_out_that_is_a_file_is_one_line(tmp_path, shape):
    taken = tmp_path / "results.txt"
    taken.write_text("kept")
    out = shape.replace("file", str(taken))
    expected = (f"--out {out} exists and is not a folder" if shape != "file/../out" else
                f"--out {out} cannot be made: {taken} is a file, not a folder")
    with pytest.raises(UserError, match=re.escape(expected)):
        bench.parse_args(["--out", out])
    assert taken.read_text() == "kept" and os.listdir(tmp_path) == ["results.txt"]


def writer(path, needs=()):
    """A step command that fails unless every path in ``needs`` exists, then writes ``path``."""
    import sys
    code = (f"import os, sys; sys.exit(3) if not all(os.path.exists(p) for p in {[str(n) for n in needs]!r}) "
            f"else open({str(path)!r}, 'w').write('x')")
    return [sys.executable, "-c", code]


def test_runner_respects_needs_skips_finished_steps_and_stops_on_a_failure(tmp_path):
    first = bench.Step("first", writer(tmp_path / "a"), str(tmp_path / "a"))
    second = bench.Step("second", writer(tmp_path / "b", [tmp_path / "a"]), str(tmp_path / "b"), [first])
    # Listed before its need: it must still wait for it.
    runner = bench.Runner([second, first], jobs=2, threads=1, log_dir=str(tmp_path / "logs"), report_only=False)
    runner.run()
    assert (tmp_path / "b").exists() and second.state == "finished"
    assert set(runner.timings) == {"first", "second"}

    (tmp_path / "b").unlink()
    again = bench.Step("first", ["false"], str(tmp_path / "a"))   # its output exists: never run
    assert again.state == "finished"
    redo = bench.Step("second", writer(tmp_path / "b", [tmp_path / "a"]), str(tmp_path / "b"), [again])
    bench.Runner([again, redo], 1, 1, str(tmp_path / "logs"), False).run()
    assert (tmp_path / "b").exists()

    broken = bench.Step("broken", writer(tmp_path / "c", [tmp_path / "missing"]), str(tmp_path / "c"))
    after = bench.Step("after", writer(tmp_path / "d"), str(tmp_path / "d"), [broken])
    with pytest.raises(SystemExit, match="broken"):
        bench.Runner([broken, after], 1, 1, str(tmp_path / "logs"), False).run()
    assert not (tmp_path / "d").exists() and after.state == "waiting"


def test_a_stopped_runner_stops_its_steps_and_exits_as_the_signal_does(tmp_path, capsys):
    import signal
    import sys
    import threading
    import time
    slow = bench.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "never"))
    later = bench.Step("later", writer(tmp_path / "later"), str(tmp_path / "later"), [slow])
    runner = bench.Runner([slow, later], 1, 1, str(tmp_path / "logs"), False)

    def stop_when_running():
        while "slow" not in runner.processes:
            time.sleep(0.05)
        runner.stop(signal.SIGTERM, None)

    threading.Thread(target=stop_when_running, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        runner.run()
    assert exit_info.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 30
    assert capsys.readouterr().err.endswith("error: stopped by SIGTERM: re-run the same command to continue\n")
    assert slow.state == "failed" and later.state == "waiting" and not (tmp_path / "later").exists()


def test_continuing_with_other_run_defining_arguments_is_refused(tmp_path):
    path = tmp_path / "args.json"
    first = bench.parse_args(["--out", str(tmp_path)])
    path.write_text(__import__("json").dumps(vars(first)))
    bench.check_same_run(bench.parse_args(["--out", str(tmp_path), "--jobs", "1", "--bootstrap", "50"]), str(path))
    with pytest.raises(SystemExit, match="--iterations 3000 -> 4000"):
        bench.check_same_run(bench.parse_args(["--out", str(tmp_path), "--iterations", "4000"]), str(path))
