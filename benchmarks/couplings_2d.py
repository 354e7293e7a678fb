"""Which coupling gives the straightest flow on the paper's two-mode Gaussian, and how good is it at few NFE?

Trains, with the same velocity MLP, optimiser, batch size and number of iterations:

- independent: z ~ prior regardless of x (1-rectified flow);
- learned: the paper's encoder q(z | x) with the KL towards the prior, for each --weight_priors;
- ot: minibatch optimal-transport pairing of data and prior noise within each batch;
- sinkhorn: entropic (Sinkhorn) minibatch OT with regularisation --ot_reg, in the same groups;
- reflow: 2-rectified flow. The trained independent flow maps prior noise z to x by
  Euler with --reflow_N steps; a new flow, initialised from the independent one, is then
  trained for --iterations more on those (z, x) pairs with the same straight-line
  flow-matching loss (so its total budget is twice the others').

All use the wide prior N(0, diag(36, 1)), the couplings and loss of models/couplings.py and
models/losses.py (reflow: their fixed-pairs coupling), and the data, seeds, training step and
evaluation of ``train_reverse_2d_joint.py`` (models/toy2d.py, training/train2d.py, utils/metrics2d.py):
a row reproduces that script's metrics for the same coupling, seed and iterations (the learned
row with weight_prior 10 the script's default run). For each run:
straightness (Euler, N = max NFE, from prior noise), the energy distance of Euler samples
to a fresh draw of the true mixture at each NFE, and the training time (wall and CPU
seconds of the training loop; reflow's includes generating its pairs).

Writes into --out: results.json (one row per run), results.md (mean +- std over seeds),
quality_vs_nfe.png and trajectories.png (first seed).

    python benchmarks/couplings_2d.py --quick     # ~2 CPU-minutes (80 s of it sinkhorn), 1 seed -> runs/benchmarks/
    python benchmarks/couplings_2d.py --seeds 3   # the reported run -> benchmarks/results/couplings_2d/

Only the reported configuration (FULL below, every other option that changes the results at its
default) writes into the committed benchmarks/results/couplings_2d/ by default; a --quick, shortened
or otherwise changed run goes to runs/benchmarks/couplings_2d-quick/ unless --out says where. While
a run goes, its rows so far are in results.partial.json; results.json and the rest are replaced
only when it completes.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import exit_cleanly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_cleanly_on_signals()   # SIGINT/SIGTERM: one line and temporary files removed, not a traceback

from models import couplings as couplinglib  # noqa: E402
from models import flow as flowlib  # noqa: E402
from models import toy2d  # noqa: E402
from utils import metrics2d, plot2d, runlock  # noqa: E402
from utils.console import progress_bar  # noqa: E402
from utils.dist import check_gpus, parse_gpu_list  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.io import atomic_write, save_json  # noqa: E402
from utils.train import check_finite_number  # noqa: E402
from training.train2d import evaluate, training_step  # noqa: E402

EVAL_POINTS = 4096          # as in train_reverse_2d_joint.py
METHODS = ("independent", "learned", "ot", "sinkhorn", "reflow")
FULL = {"iterations": 4000, "seeds": 3, "reflow_pairs": 50000}
COMMITTED_OUT = "benchmarks/results/couplings_2d/"      # what docs/RESULTS.md cites: only the FULL run
SMOKE_OUT = "runs/benchmarks/couplings_2d-quick/"
QUICK = {"iterations": 1000, "seeds": 1, "reflow_pairs": 10000}
TRAJECTORY_N = 128          # Euler steps of the trajectories drawn


def parse_args(argv):
    parser = ArgumentParser("benchmarks/couplings_2d.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help=f"folder for results.json, results.md and the plots [default: {COMMITTED_OUT} for the "
                             f"reported settings ({FULL['seeds']} seeds, {FULL['iterations']} iterations, "
                             f"{FULL['reflow_pairs']} reflow pairs, every other option at its default), else {SMOKE_OUT}, so "
                             f"that a quick or changed run never replaces the committed results]")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short check: {QUICK['iterations']} iterations, {QUICK['seeds']} seed, "
                             f"{QUICK['reflow_pairs']} reflow pairs (explicit options still win)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds, 0 .. seeds-1 [default: {FULL['seeds']}, with --quick {QUICK['seeds']}]")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"training iterations of every run [default: {FULL['iterations']}, "
                             f"with --quick {QUICK['iterations']}]")
    parser.add_argument("--reflow_pairs", type=int, default=None,
                        help=f"(z, x) pairs generated for reflow [default: {FULL['reflow_pairs']}, "
                             f"with --quick {QUICK['reflow_pairs']}]")
    parser.add_argument("--reflow_N", type=int, default=128,
                        help="Euler steps of the independent flow that generate the reflow pairs")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (reflow needs independent)")
    parser.add_argument("--weight_priors", default="1,5,10,20",
                        help="comma-separated KL weights (beta) of the learned coupling")
    parser.add_argument("--eval_N", default="1,2,4,8,128", help="comma-separated Euler NFEs to evaluate")
    parser.add_argument("--ot_batch", type=int, default=toy2d.OT_BATCH,
                        help="ot and sinkhorn: points per assignment (groups of the batch holding both modes); "
                             "0: the whole batch, ~25x slower per step")
    parser.add_argument("--ot_reg", type=float, default=0.05,
                        help="sinkhorn: the entropic regularisation, as a fraction of the mean squared distance "
                             "between a group's data points and noise samples (train_reverse_2d_joint.py --ot_reg)")
    parser.add_argument("--batchsize", type=int, default=512, help="points per training batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--gpu", default=None, help="CUDA device id, e.g. 0 (omit to run on the CPU)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def _numbers(text, option, kind):
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--{option} must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0 or (kind is int and min(values) < 1):
        raise UserError(f"--{option} must be comma-separated {'positive integers' if kind is int else 'numbers >= 0'}, "
                        f"got {text!r}")
    return values


# The options that change the results (not --out, --debug): the committed folder holds the run with FULL and
# every other one of them at its default. --gpu too: the committed numbers are the CPU's (a GPU's kernels round
# differently), so a GPU run goes to the smoke folder unless --out says otherwise.
RESULT_OPTIONS = ("methods", "weight_priors", "eval_N", "reflow_N", "ot_batch", "ot_reg", "batchsize", "lr", "gpu")


def reported_settings(args):
    """True when ``args`` (with the preset filled in) are the reported run's: FULL, and the other options that change
    the results at their defaults."""
    defaults = parse_args([])
    return (all(getattr(args, name) == value for name, value in FULL.items())
            and all(getattr(args, name) == getattr(defaults, name) for name in RESULT_OPTIONS))


def resolve(args):
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    ids = parse_gpu_list(args.gpu)
    if not ids:
        args.gpu = None   # --gpu "" is the CPU run, the committed one when the rest is at its defaults
    if args.out is None:
        args.out = COMMITTED_OUT if reported_settings(args) else SMOKE_OUT
    # a file, a broken link, a path through a file, a Windows path: one line, before any training
    runlock.check_folder_name(args.out, "--out")
    runlock.check_is_folder(args.out, "--out")
    for name in ("seeds", "iterations", "reflow_pairs", "reflow_N", "batchsize"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.ot_batch < 0:
        raise UserError(f"--ot_batch must be >= 0 (0: the whole batch), got {args.ot_batch}")
    check_finite_number(args.ot_reg, "--ot_reg")
    if not args.ot_reg > 0:
        raise UserError(f"--ot_reg must be positive, got {args.ot_reg}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if "reflow" in methods and "independent" not in methods:
        raise UserError("--methods: reflow starts from the independent flow; add independent")
    if len(ids) > 1:
        raise UserError(f"--gpu takes one CUDA device id such as 0, got {args.gpu!r}")
    check_gpus(ids)
    device = torch.device("cuda", ids[0]) if ids else torch.device("cpu")
    weight_priors = _numbers(args.weight_priors, "weight_priors", float)
    eval_N = sorted(set(_numbers(args.eval_N, "eval_N", int)))
    return methods, weight_priors, eval_N, device


def train(model, label, data, seed, args, pairs=None):
    """Train ``model`` (a FlowWithCoupling) in place for --iterations; returns (wall seconds, CPU seconds) of
    the loop. ``pairs`` = (z, x) tensors: reflow, random minibatches of the fixed pairs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = toy2d.make_generator(seed, toy2d.STREAM_TRAIN)
    wall, cpu = time.perf_counter(), time.process_time()
    progress = progress_bar(total=args.iterations, desc=f"seed {seed} {label}", leave=False, mininterval=2.0,
                            dynamic_ncols=True)   # plain lines every 30 s in a redirected log
    for iteration in range(1, args.iterations + 1):
        progress.update(1)
        if pairs is None:
            x, noise = toy2d.training_batch(iteration, data, model.coupling, args.batchsize, generator)
        else:
            index = torch.randint(0, pairs[0].shape[0], (args.batchsize,), generator=generator)
            index = index.to(pairs[0].device)
            x, noise = pairs[1][index], pairs[0][index]
        training_step(model, optimizer, x, noise, generator)
    progress.close()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_seed(seed, methods, weight_priors, eval_N, device, args, record):
    """Every method for one seed; ``record(row, flow_model, label)`` receives each result."""
    variances = toy2d.prior_variances(True, device)
    data = toy2d.TwoModeData(toy2d.make_generator(seed, toy2d.STREAM_DATA), device=device)
    noise = toy2d.sample_prior(EVAL_POINTS, variances, toy2d.make_generator(seed, toy2d.STREAM_EVAL))
    reference = toy2d.sample_mixture(EVAL_POINTS, toy2d.make_generator(seed, toy2d.STREAM_REFERENCE))

    def finish(coupling, weight_prior, flow_model, seconds, label, extra=None):
        metrics, samples = evaluate(flow_model, noise, eval_N, reference)
        row = {"coupling": coupling, "weight_prior": weight_prior, "seed": seed,
               "straightness": metrics["straightness"], "energy_distance": metrics["energy_distance"],
               "train_seconds": round(seconds[0], 2), "train_cpu_seconds": round(seconds[1], 2),
               "iterations": args.iterations, **(extra or {})}
        record(row, flow_model, label, noise, samples, reference)

    runs = []
    if "independent" in methods:
        runs.append(("independent", None))
    if "learned" in methods:
        runs.extend(("learned", beta) for beta in weight_priors)
    runs.extend((name, None) for name in ("ot", "sinkhorn") if name in methods)
    independent_flow = None
    for coupling, weight_prior in runs:
        model = toy2d.build_flow_with_coupling(coupling, seed, device, variances, weight_prior or 0.0, args.ot_batch,
                                               args.ot_reg)
        label = label_of({"coupling": coupling, "weight_prior": weight_prior, "ot_reg": args.ot_reg})
        seconds = train(model, label, data, seed, args)
        finish(coupling, weight_prior, model.flow, seconds, label,
               {"ot_reg": args.ot_reg} if coupling == "sinkhorn" else None)
        if coupling == "independent":
            independent_flow = model.flow

    if "reflow" in methods:
        wall, cpu = time.perf_counter(), time.process_time()
        z = toy2d.sample_prior(args.reflow_pairs, variances, toy2d.make_generator(seed, toy2d.STREAM_REFLOW))
        x = flowlib.euler(independent_flow, z, N=args.reflow_N).x
        pair_seconds = (time.perf_counter() - wall, time.process_time() - cpu)
        flow_model, _ = toy2d.build_models("reflow", seed, device)
        flow_model.load_state_dict(independent_flow.state_dict())
        model = couplinglib.FlowWithCoupling(flow_model, couplinglib.FixedPairs())
        seconds = train(model, "reflow", data, seed, args, pairs=(z, x))
        total = (seconds[0] + pair_seconds[0], seconds[1] + pair_seconds[1])
        finish("reflow", None, flow_model, total, "reflow (2-rectified)",
               {"initialised_from": "independent", "reflow_pairs": args.reflow_pairs, "reflow_N": args.reflow_N})


def label_of(row):
    if row["coupling"] == "learned":
        return f"learned β={row['weight_prior']:g}"
    if row["coupling"] == "sinkhorn":
        return f"sinkhorn ot_reg={row['ot_reg']:g}"
    return {"reflow": "reflow (2-rectified)"}.get(row["coupling"], row["coupling"])


def summarise(rows, eval_N):
    """{label: {"straightness": (mean, std), "energy_distance": {n: (mean, std)}, ...}} in run order."""
    groups = {}
    for row in rows:
        groups.setdefault(label_of(row), []).append(row)

    def stats(values):
        values = np.asarray(values, dtype=float)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    summary = {}
    for label, group in groups.items():
        summary[label] = {
            "seeds": len(group),
            "straightness": stats([r["straightness"] for r in group]),
            "energy_distance": {n: stats([r["energy_distance"][str(n)] for r in group]) for n in eval_N},
            "train_seconds": stats([r["train_seconds"] for r in group]),
            "train_cpu_seconds": stats([r["train_cpu_seconds"] for r in group]),
        }
    return summary


def _cell(mean_std, seeds, digits=3):
    mean, std = mean_std
    return f"{mean:.{digits}g} ± {std:.2g}" if seeds > 1 else f"{mean:.{digits}g}"


def write_markdown(path, summary, eval_N, args, command, floor, device):
    seeds = max(s["seeds"] for s in summary.values())
    lines = [
        "# Couplings on the two-mode Gaussian",
        "",
        f"Command: `{command}`",
        "",
        f"{args.iterations} iterations per run (reflow: {args.iterations} more, starting from the independent flow, "
        f"on {args.reflow_pairs} pairs from Euler {args.reflow_N} steps), batch {args.batchsize}, Adam lr {args.lr:g}, "
        f"wide prior N(0, diag(36, 1)), OT and Sinkhorn assignments within groups of {args.ot_batch or args.batchsize} "
        f"points (Sinkhorn's ot_reg {args.ot_reg:g} of the mean squared distance), "
        f"{seeds} seed(s)" + (" (mean ± std)" if seeds > 1 else "") + ". "
        f"Straightness: Euler N={max(eval_N)} from {EVAL_POINTS} prior samples (0 = straight, constant speed). "
        f"Energy distance of {EVAL_POINTS} Euler samples to a fresh draw of the mixture, by NFE; two true draws "
        f"give {floor:.4f}. Training time: the training loop's wall and CPU seconds on {device} (wall time "
        f"grows with other load on the machine; CPU time less so).",
        "",
        "| coupling | straightness | " + " | ".join(f"ED NFE {n}" for n in eval_N)
        + " | train s (wall) | train s (CPU) |",
        "|---|---|" + "---|" * len(eval_N) + "---|---|",
    ]
    for label, s in summary.items():
        cells = [label, _cell(s["straightness"], s["seeds"])]
        cells += [_cell(s["energy_distance"][n], s["seeds"]) for n in eval_N]
        cells += [_cell(s["train_seconds"], s["seeds"], 3), _cell(s["train_cpu_seconds"], s["seeds"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def _figure(columns, rows=1, width=3.6, height=3.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path):
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=130)
    plt.close(fig)


def plot_quality(path, summary, eval_N):
    plt, fig, axes = _figure(1, width=6.0, height=4.2)
    ax = axes[0, 0]
    floor = 1e-3
    for label, s in summary.items():
        means = np.array([max(s["energy_distance"][n][0], floor) for n in eval_N])
        stds = np.array([s["energy_distance"][n][1] for n in eval_N])
        style = "--" if label.startswith("learned") else "-"
        ax.errorbar(eval_N, means, yerr=np.minimum(stds, means - floor / 2) if s["seeds"] > 1 else None,
                    marker="o", markersize=3, linestyle=style, capsize=2,
                    label=f"{label} (straightness {s['straightness'][0]:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(eval_N)
    ax.set_xticklabels([str(n) for n in eval_N])
    ax.set_xlabel("NFE (Euler steps)")
    ax.set_ylabel(f"energy distance to the true mixture (clipped at {floor:g})")
    ax.set_title("Sample quality vs NFE on the two-mode Gaussian", fontsize=10)
    ax.grid(True, which="both", color="0.9")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_trajectories(path, drawn, data_points):
    """Row 1: Euler trajectories from prior noise; row 2: one-step samples over the data."""
    plt, fig, axes = _figure(len(drawn), rows=2, width=3.0, height=2.6)
    for column, (label, traj, one_step) in enumerate(drawn):
        plot2d.setup_axes(axes[0, column], f"{label}\nEuler N={TRAJECTORY_N} from prior")
        plot2d.plot_trajectories(axes[0, column], traj, plot2d.NOISE_COLOR, 30, linewidth=0.7)
        plot2d.plot_points(axes[0, column], traj[-1][:2048], plot2d.NOISE_COLOR, size=2, alpha=0.15)
        plot2d.setup_axes(axes[1, column], "one Euler step (NFE 1)")
        plot2d.plot_points(axes[1, column], data_points, "0.6", size=2, alpha=0.2)
        plot2d.plot_points(axes[1, column], one_step[:2048], plot2d.NOISE_COLOR, size=2, alpha=0.25)
    fig.tight_layout()
    _save(plt, fig, path)


def main(argv):
    args = parse_args(argv)
    methods, weight_priors, eval_N, device = resolve(args)
    os.makedirs(args.out, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(1)   # tiny MLPs: one thread is faster than several
    command = "python benchmarks/couplings_2d.py " + " ".join(argv)
    runs_per_seed = sum(name in methods for name in ("independent", "ot", "sinkhorn", "reflow")) \
        + len(weight_priors) * ("learned" in methods)
    print(f"couplings_2d: device {device}, methods {','.join(methods)}, weight_priors "
          f"{','.join(f'{b:g}' for b in weight_priors)}, {args.seeds} seed(s) x {runs_per_seed} runs x "
          f"{args.iterations} iterations, batch {args.batchsize}, eval NFE {','.join(map(str, eval_N))}, "
          f"out {args.out}", flush=True)

    rows, drawn = [], []
    start = time.perf_counter()

    # the rows so far go to results.partial.json; results.json is replaced only when the run is complete, so an
    # interrupted run leaves the previous results (the committed ones, in the default folder) as they were
    partial = os.path.join(args.out, "results.partial.json")

    def record(row, flow_model, label, noise, samples, reference):
        rows.append(row)
        save_json(rows, partial)
        print(f"  seed {row['seed']} {label:22s} straightness {row['straightness']:8.4f}  ED "
              + " ".join(f"{n}:{row['energy_distance'][str(n)]:.4f}" for n in eval_N)
              + f"  ({row['train_seconds']:.0f} s)", flush=True)
        if row["seed"] == 0:
            traj = flowlib.euler(flow_model, noise[:2048], N=TRAJECTORY_N, return_traj=True).traj
            one_step = samples[1] if 1 in samples else flowlib.euler(flow_model, noise, N=1).x
            drawn.append((label, traj, one_step))

    for seed in range(args.seeds):
        run_seed(seed, methods, weight_priors, eval_N, device, args, record)

    floor_reference = toy2d.sample_mixture(EVAL_POINTS, toy2d.make_generator(0, toy2d.STREAM_REFERENCE))
    floor = metrics2d.energy_distance(
        toy2d.sample_mixture(EVAL_POINTS, toy2d.make_generator(0, toy2d.STREAM_FLOOR)), floor_reference)
    summary = summarise(rows, eval_N)
    device_name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    # the plots first (matplotlib is what most often fails), results.json last: until it is replaced, the folder's
    # results.json and results.partial.json say which run is the complete one
    plot_quality(os.path.join(args.out, "quality_vs_nfe.png"), summary, eval_N)
    plot_trajectories(os.path.join(args.out, "trajectories.png"), drawn, floor_reference[:2048])
    write_markdown(os.path.join(args.out, "results.md"), summary, eval_N, args, command, floor, device_name)
    save_json(rows, os.path.join(args.out, "results.json"))
    os.remove(partial)
    print(f"done in {time.perf_counter() - start:.0f} s; wrote results.json, results.md, quality_vs_nfe.png, "
          f"trajectories.png in {args.out}", flush=True)


if __name__ == "__main__":
    cli_main(main)
