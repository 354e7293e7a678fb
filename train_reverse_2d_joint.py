"""The paper's 2D example: a flow between a two-mode Gaussian and a wide prior, with a learned coupling.

Trains a velocity MLP v(z_t, t) by flow matching on z_t = t * z + (1 - t) * x (``--ddpm``: the
paper's VP / DDPM-style path z_t = alpha(t) x + sqrt(1 - alpha(t)^2) z instead). With the
learned coupling (the default) an encoder MLP gives q(z | x) = N(mu(x), diag(exp(logvar(x))))
and is trained jointly, with loss = flow-matching MSE + weight_prior * KL(q || prior) / 2;
``--independent`` draws z from the prior regardless of x (1-rectified flow), ``--coupling ot``
pairs x and prior noise by minibatch optimal transport, ``--coupling sinkhorn`` by entropic
(Sinkhorn) minibatch OT. The couplings and the loss are those of the image trainer
(models/couplings.py, models/losses.py), with the wide prior as their prior_variances.

Writes into --dir: figures (PNG, refreshed every 1000 iterations and at the end),
flow_model_{i}.pth / forward_model_{i}.pth (state dicts), stats.jsonl, config.json and, at the
end, samples_N{n}.npy and metrics.json (straightness, energy distance per NFE).

    python train_reverse_2d_joint.py --dir runs/2d
    python train_reverse_2d_joint.py --dir runs/2d-independent --independent
"""
import json
import os
import re
import time

from utils.errors import ArgumentParser, UserError, cli_main, exit_cleanly_on_signals

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports below or a run is one line, not a traceback

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import couplings as couplinglib  # noqa: E402
from models import flow as flowlib  # noqa: E402
from models import toy2d  # noqa: E402
from utils import metrics2d, plot2d, runlock  # noqa: E402
from utils.amp import AMP_CHOICES, autocast, autocast_velocity, resolve_amp  # noqa: E402
from utils.dist import check_gpus, parse_gpu_list  # noqa: E402
from utils.io import append_text, atomic_write, json_line, save_json, save_torch  # noqa: E402
from utils.train import all_finite, check_finite_number, check_seed  # noqa: E402
from training import loop  # noqa: E402
from training.train2d import evaluate, training_step  # noqa: E402

LOG_EVERY = 100          # iterations per stats.jsonl line
FIGURE_EVERY = 1000      # the paper refreshes its figures every 1000 iterations
SAVE_EVERY = 10000       # and saves the flow every 10000
EVAL_POINTS = 4096       # prior samples for metrics and samples_N{n}.npy
PLOT_POINTS = 512        # data points per mode in the figures (the paper's batch)
PATHS_DRAWN = 30         # trajectories drawn per figure, as in the paper


def build_parser():
    parser = ArgumentParser("train_reverse_2d_joint.py",
        description="Two-mode Gaussian example of 'Minimizing Trajectory Curvature of ODE-based "
                    "Generative Models': the learned coupling against the independent and minibatch-OT ones.")
    parser.add_argument("--dir", type=str, default="runs/2d",
                        help="output folder for figures, checkpoints, stats and metrics")
    parser.add_argument("--coupling", choices=toy2d.COUPLINGS, default=None,
                        help="how data x and noise z are paired: "
                             + "; ".join(f"'{name}': {couplinglib.DESCRIPTIONS[name]}" for name in toy2d.COUPLINGS)
                             + " (ot and sinkhorn re-pair whole batches, so their batches hold both modes) "
                               "[default: learned]")
    parser.add_argument("--independent", action="store_true",
                        help="the paper's flag for the independent coupling: same as --coupling independent")
    parser.add_argument("--ot_batch", type=int, default=toy2d.OT_BATCH,
                        help="--coupling ot and sinkhorn: points per assignment; the batch is split into groups "
                             "of this size, each holding both modes (the Hungarian solve costs O(n^3): a whole "
                             "batch of 512 takes ~25x longer per step); 0: the whole batch")
    parser.add_argument("--ot_reg", type=float, default=0.05,
                        help="--coupling sinkhorn: the entropic regularisation, as a fraction of the mean squared "
                             "distance between a group's data points and noise samples; towards 0 the plan "
                             "approaches exact OT (and needs more Sinkhorn iterations), large values approach the "
                             "independent coupling")
    parser.add_argument("--ddpm", action="store_true",
                        help="the paper's VP (DDPM-style) interpolation z_t = alpha(t) x + sqrt(1 - alpha(t)^2) z, "
                             "alpha(t) = exp(-19.9 t^2 / 4 - 0.1 t / 2) (the VP-SDE's beta from 0.1 to 20), with "
                             "the velocity target d z_t / dt, instead of the straight line t z + (1 - t) x")
    parser.add_argument("--no_wide_prior", action="store_true",
                        help="use the prior N(0, I) instead of the wide N(0, diag(36, 1))")
    parser.add_argument("--N", type=int, default=20,
                        help="Euler steps for the trajectories drawn in the figures")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--weight_prior", type=float, default=10.0,
                        help="beta, the weight of the KL term (learned coupling only)")
    parser.add_argument("--batchsize", type=int, default=512, help="points per training batch")
    parser.add_argument("--iterations", type=int, default=5000, help="training iterations")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, initialisation, training noise and evaluation noise")
    parser.add_argument("--eval_N", type=str, default="1,2,4,8,128",
                        help="comma-separated Euler step counts (NFE) for the final samples and metrics")
    parser.add_argument("--gpu", type=str, default=None,
                        help="CUDA device id, e.g. 0 (omit to run on the CPU)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none",
                        help="mixed precision: 'none' = fp32; 'bf16' = bf16 autocast of the MLPs' evaluations "
                             "(weights, optimizer and losses stay fp32); 'auto' = bf16 where the device has native "
                             "bf16 (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16), else fp32. Default none, "
                             "unlike the image scripts: these MLPs (100 hidden units) are too small to run faster "
                             "in bf16, and fp32 keeps the documented numbers on every machine")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run a --dir already holds: that run's files of this script (config.json, "
                             "stats.jsonl, metrics.json, checkpoints, samples_N*.npy, figures) are removed first, so "
                             "none of them can be mistaken for the new run's; other files are kept")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def resolve(args):
    """Check every argument before any work starts; returns (coupling, eval_N, device)."""
    if args.independent and args.coupling not in (None, "independent"):
        raise UserError(f"--independent contradicts --coupling {args.coupling}; pass only one of them")
    coupling = "independent" if args.independent else args.coupling or "learned"
    for name in ("N", "batchsize", "iterations"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    min_batch = couplinglib.COUPLINGS[coupling].min_batch
    if args.batchsize < min_batch:
        raise UserError(f"--coupling {coupling} needs --batchsize of at least {min_batch}")
    if args.ot_batch < 0:
        raise UserError(f"--ot_batch must be >= 0 (0: the whole batch), got {args.ot_batch}")
    check_finite_number(args.lr, "--lr")
    check_finite_number(args.weight_prior, "--weight_prior")
    check_finite_number(args.ot_reg, "--ot_reg")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not args.ot_reg > 0:
        raise UserError(f"--ot_reg must be positive, got {args.ot_reg}")
    if not args.weight_prior >= 0:
        raise UserError(f"--weight_prior must be >= 0, got {args.weight_prior}")
    check_seed(args.seed)
    try:
        eval_N = [int(part) for part in args.eval_N.split(",")]   # an empty part (1,,2) is an error too
    except ValueError:
        raise UserError(f"--eval_N must be comma-separated positive integers like 1,2,4,8,128, "
                        f"got {args.eval_N!r}") from None
    if not eval_N or min(eval_N) < 1:
        raise UserError(f"--eval_N must be comma-separated positive integers like 1,2,4,8,128, "
                        f"got {args.eval_N!r}")
    eval_N = sorted(set(eval_N))
    return coupling, eval_N, resolve_device(args.gpu)


def resolve_device(gpu):
    """--gpu omitted: the CPU; otherwise one CUDA id, checked against the machine."""
    ids = parse_gpu_list(gpu)
    if len(ids) > 1:
        raise UserError(f"--gpu takes one CUDA device id such as 0 (this example runs on one device), got {gpu!r}")
    check_gpus(ids)
    return torch.device("cuda", ids[0]) if ids else torch.device("cpu")


# Every file a run of this script writes into its --dir (what --overwrite removes of the previous run).
# The names of the files a run writes, exactly (flow_model_<iteration>.pth, not flow_model_best.pth or the
# image trainer's *_ema.pth): what --overwrite removes from a previous 2D run's folder.
RUN_FILE_NAMES = (r"(flow|forward)_model_\d+\.pth|samples_N\d+\.npy|config\.json|stats\.jsonl|metrics\.json|"
                  r"data\.png|prior\.png|traj_(coupling|generative|reconstruction)\.png|overview\.png|generated\.png")


def run_files(path):
    """The files in ``path`` whose names are those of a 2D run's own, sorted."""
    return sorted(os.path.join(path, name) for name in os.listdir(path)
                  if re.fullmatch(RUN_FILE_NAMES, name) and os.path.isfile(os.path.join(path, name)))


def prepare_dir(path, overwrite):
    # one owner per --dir, before it is read or written (released in main); it must be a folder or not exist
    runlock.acquire(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        if not overwrite:
            raise UserError(f"--dir {path} already holds a run (config.json); choose another --dir "
                            f"or pass --overwrite to replace it")
        # the previous run's results (metrics.json, samples of other NFEs, checkpoints of other iterations)
        # would otherwise sit beside the new run's files, or stand in for them if it is stopped
        try:
            with open(os.path.join(path, "config.json")) as handle:
                previous = json.load(handle)
        except (OSError, ValueError):
            previous = None
        if not (isinstance(previous, dict) and "prior" in previous and "mixed_batches" in previous):
            raise UserError(f"--dir {path} holds a config.json that is not this script's (another script's run?); "
                            f"--overwrite replaces only a 2D run: choose another --dir")
        for name in run_files(path):
            os.remove(name)
    os.makedirs(path, exist_ok=True)
    # A new run starts a new log; everything else is replaced file by file, atomically.
    with atomic_write(os.path.join(path, "stats.jsonl"), "w"):
        pass


def save_figure(fig, path):
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=150)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


class Figures:
    """The paper's figures, drawn from fixed noise so that successive refreshes are comparable."""

    def __init__(self, folder, data, model, coupling, eval_noise, N, wide_prior, seed, amp="none"):
        self.folder, self.model, self.coupling, self.N, self.seed = folder, model, coupling, N, seed
        self.amp = amp
        self.x = data.plot_batch(PLOT_POINTS)
        self.colors = plot2d.mode_colors(PLOT_POINTS)
        self.noise = eval_noise[:2048]
        self.prior_label = toy2d.prior_name(wide_prior)

    def _new(self, columns=1):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.6), squeeze=False)
        return plt, fig, axes[0]

    def data_and_prior(self, data):
        """data.png (the two modes) and prior.png (the prior), drawn once."""
        plt, fig, (ax,) = self._new()
        plot2d.setup_axes(ax, "data: two Gaussians")
        for mode in (0, 1):
            plot2d.plot_points(ax, data.modes[mode][:2048], plot2d.MODE_COLORS[mode], label=f"mode {mode}")
        ax.legend(fontsize=7, markerscale=3, loc="lower right")
        fig.tight_layout()
        save_figure(fig, os.path.join(self.folder, "data.png"))
        plt.close(fig)
        plt, fig, (ax,) = self._new()
        plot2d.setup_axes(ax, f"prior {self.prior_label}")
        plot2d.plot_points(ax, self.noise, plot2d.NOISE_COLOR, label="prior samples")
        ax.legend(fontsize=7, markerscale=3, loc="lower right")
        fig.tight_layout()
        save_figure(fig, os.path.join(self.folder, "prior.png"))
        plt.close(fig)

    @torch.no_grad()
    def refresh(self, iteration, one_step=None, metrics=None):
        """traj_generative.png, traj_reconstruction.png, traj_coupling.png and overview.png."""
        coupling, device = self.model.coupling, self.x.device
        generator = toy2d.make_generator(self.seed, toy2d.STREAM_PLOT)   # the same coupling noise at every refresh
        noise = coupling.assign(self.x, toy2d.randn(self.x.shape, generator, device), generator)
        with autocast(device, self.amp):
            z = coupling.pair(self.x, noise).z.float()
        velocity = autocast_velocity(self.model.flow, device, self.amp)
        generative = flowlib.euler(velocity, self.noise, N=self.N, return_traj=True)
        reconstruction = flowlib.euler(velocity, z, N=self.N, return_traj=True)
        if self.model.interpolation == "vp":   # the path z_t of --ddpm, drawn from t = 1 to t = 0
            straight = [flowlib.interpolate_vp(self.x, z, torch.full((len(z),), t)) for t in np.linspace(1, 0, 30)]
        else:
            straight = [z, self.x]   # the coupling's straight path, drawn from t = 1 to t = 0
        if one_step is None:
            one_step = flowlib.euler(velocity, self.noise, N=1).x
        suffix = f"({self.coupling}, iteration {iteration})"

        panels = {
            "traj_coupling.png": f"coupling x - z {suffix}",
            "traj_generative.png": f"from prior noise, Euler N={self.N} {suffix}",
            "traj_reconstruction.png": f"from coupled z, Euler N={self.N} {suffix}",
        }
        for name, title in panels.items():
            plt, fig, (ax,) = self._new()
            self._draw(ax, name, title, z, straight, generative, reconstruction)
            fig.tight_layout()
            save_figure(fig, os.path.join(self.folder, name))
            plt.close(fig)

        plt, fig, axes = self._new(3)
        self._draw(axes[0], "traj_coupling.png", f"{self.coupling}: coupling x - z", z, straight,
                   generative, reconstruction)
        self._draw(axes[1], "traj_generative.png", f"{self.coupling}: Euler N={self.N} from prior", z,
                   straight, generative, reconstruction)
        plot2d.setup_axes(axes[2], f"{self.coupling}: one Euler step (NFE 1)")
        plot2d.plot_points(axes[2], self.x, "0.6", alpha=0.2, label="data")
        plot2d.plot_points(axes[2], one_step[:2048], plot2d.NOISE_COLOR, alpha=0.25, label="samples")
        axes[2].legend(fontsize=7, markerscale=3, loc="lower right")
        headline = f"{self.coupling} coupling, iteration {iteration}"
        if metrics is not None:
            headline += (f": straightness {metrics['straightness']:.3g} (Euler N={metrics['straightness_N']})"
                         + (f", energy distance at NFE 1 {metrics['energy_distance']['1']:.3g}"
                            if "1" in metrics["energy_distance"] else ""))
        fig.suptitle(headline, fontsize=9)
        fig.tight_layout()
        save_figure(fig, os.path.join(self.folder, "overview.png"))
        plt.close(fig)

    def _draw(self, ax, name, title, z, straight, generative, reconstruction):
        plot2d.setup_axes(ax, title)
        if name == "traj_coupling.png":
            for mode in (0, 1):
                plot2d.plot_points(ax, self.x[mode * PLOT_POINTS:(mode + 1) * PLOT_POINTS],
                                  plot2d.MODE_COLORS[mode], alpha=0.15, label=f"data, mode {mode}")
            plot2d.plot_trajectories(ax, straight, self.colors, PATHS_DRAWN)
            plot2d.plot_points(ax, z, "0.4", alpha=0.25, label="coupled z")
        elif name == "traj_generative.png":
            plot2d.plot_trajectories(ax, generative.traj, plot2d.NOISE_COLOR, PATHS_DRAWN)
            plot2d.plot_points(ax, generative.x, plot2d.NOISE_COLOR, alpha=0.2, label="samples (o: start)")
        else:
            plot2d.plot_trajectories(ax, reconstruction.traj, self.colors, PATHS_DRAWN)
            for mode in (0, 1):
                plot2d.plot_points(ax, reconstruction.x[mode * PLOT_POINTS:(mode + 1) * PLOT_POINTS],
                                  plot2d.MODE_COLORS[mode], alpha=0.2, label=f"reconstructed mode {mode}")
        ax.legend(fontsize=6, markerscale=3, loc="lower right")

    def generated(self, samples, metrics, reference):
        """generated.png: the final samples for every NFE in --eval_N, with their energy distances."""
        steps = sorted(samples)
        plt, fig, axes = self._new(len(steps))
        for ax, n in zip(axes, steps):
            plot2d.setup_axes(ax, f"NFE {n}: energy distance {metrics['energy_distance'][str(n)]:.3f}")
            plot2d.plot_points(ax, reference[:2048], "0.6", alpha=0.2, label="true mixture")
            plot2d.plot_points(ax, samples[n][:2048], plot2d.NOISE_COLOR, alpha=0.25, label="samples")
            ax.legend(fontsize=6, markerscale=3, loc="lower right")
        fig.suptitle(f"{self.coupling}: Euler samples (blue) vs true mixture (gray)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, os.path.join(self.folder, "generated.png"))
        plt.close(fig)


def save_checkpoints(folder, iteration, model):
    """The networks' state dicts; weights holding inf or NaN are never written (one line instead)."""
    networks = [model.flow] + ([model.encoder] if model.encoder is not None else [])
    if not all_finite([tensor for network in networks for tensor in network.state_dict().values()]):
        raise UserError(f"stopped at iteration {iteration}: the weights hold inf or NaN, so nothing was saved "
                        f"(the files of earlier iterations are kept); lower --lr")
    save_torch(model.flow.state_dict(), os.path.join(folder, f"flow_model_{iteration}.pth"))
    if model.encoder is not None:
        save_torch(model.encoder.state_dict(), os.path.join(folder, f"forward_model_{iteration}.pth"))


def main(argv):
    args = parse_args(argv)
    coupling, eval_N, device = resolve(args)
    for line in couplinglib.unused_option_warnings(coupling, vars(args), build_parser().defaults(vars(args))):
        print(line, flush=True)
    try:
        run(args, coupling, eval_N, device)
    finally:
        runlock.release(args.dir)


class Training2D:
    """The 2D run as a task of training/loop.py: a step, a stats.jsonl line every LOG_EVERY iterations, the
    figures every FIGURE_EVERY and the checkpoints every SAVE_EVERY and at the end."""

    def __init__(self, args, model, optimizer, data, generator, amp, figures):
        self.args, self.model, self.optimizer, self.data = args, model, optimizer, data
        self.generator, self.amp, self.figures = generator, amp, figures
        self.schedule = loop.Schedule(log_every=LOG_EVERY, evaluate_every=FIGURE_EVERY, save_every=SAVE_EVERY,
                                      snapshot_every=args.iterations)   # the end (and a stop) as well
        self.log = loop.ConsoleLog()
        self.stats_path = os.path.join(args.dir, "stats.jsonl")
        self.sums, self.count, self.train_seconds, self.start = {}, 0, 0.0, time.time()

    def step(self, iteration):
        step_start = time.time()
        x, noise = toy2d.training_batch(iteration, self.data, self.model.coupling, self.args.batchsize,
                                        self.generator)
        losses = training_step(self.model, self.optimizer, x, noise, self.generator, self.amp)
        self.train_seconds += time.time() - step_start
        for key, value in losses.items():
            if value is not None:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def check(self, iteration):
        pass   # the final metrics are checked for inf / NaN before they are written; checkpoints in save

    def evaluate(self, iteration):
        if iteration != self.args.iterations:   # the final figures come with the metrics
            self.figures.refresh(iteration)

    def write_stats(self, iteration, progress):
        means = {key: value / self.count for key, value in self.sums.items()}
        record = {"iter": iteration, "loss": means["loss"], "loss_fm": means["loss_fm"], "kl": means.get("kl"),
                  "seconds": round(time.time() - self.start, 3)}
        append_text(self.stats_path, json_line(record))
        # the progress line shows the last logged loss: say which iteration it is
        progress.set_postfix(loss=f"{means['loss']:.3f} (it {iteration})", refresh=False)
        self.sums, self.count = {}, 0

    def save(self, iteration, numbered, final):
        save_checkpoints(self.args.dir, iteration, self.model)


def run(args, coupling, eval_N, device):
    prepare_dir(args.dir, args.overwrite)
    if device.type == "cpu":
        # These MLPs are tiny: one thread is faster than several (measured 6.6 vs 10.3 ms per step).
        torch.set_num_threads(1)
    wide_prior = not args.no_wide_prior
    amp, amp_reason = resolve_amp(args.amp, device)
    interpolation = "vp" if args.ddpm else "linear"

    # Everything random comes from --seed: the networks' initialisation and one stream per purpose.
    variances = toy2d.prior_variances(wide_prior, device)
    model = toy2d.build_flow_with_coupling(coupling, args.seed, device, variances, args.weight_prior, args.ot_batch,
                                           args.ot_reg, interpolation)
    flow_model, encoder = model.flow, model.encoder
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)   # the flow's, then the encoder's
    data = toy2d.TwoModeData(toy2d.make_generator(args.seed, toy2d.STREAM_DATA), device=device)
    train_generator = toy2d.make_generator(args.seed, toy2d.STREAM_TRAIN)
    eval_noise = toy2d.sample_prior(EVAL_POINTS, variances, toy2d.make_generator(args.seed, toy2d.STREAM_EVAL))
    reference = toy2d.sample_mixture(EVAL_POINTS, toy2d.make_generator(args.seed, toy2d.STREAM_REFERENCE))

    config = dict(vars(args), coupling=coupling, eval_N=eval_N, device=str(device),
                  prior=toy2d.prior_name(wide_prior), mixed_batches=toy2d.mixed_batches(model.coupling),
                  interpolation=interpolation, amp_used=amp, amp_reason=amp_reason)
    save_json(config, os.path.join(args.dir, "config.json"))
    encoder_params = f" + encoder {count_parameters(encoder):,}" if encoder is not None else ""
    pairing = {"ot": f" (groups of {args.ot_batch or args.batchsize})",
               "sinkhorn": f" (ot_reg {args.ot_reg:g}, groups of {args.ot_batch or args.batchsize})"}
    print(f"train_reverse_2d_joint: device {device}, amp {amp} ({amp_reason}), coupling {coupling}"
          f"{pairing.get(coupling, '')}, prior {toy2d.prior_name(wide_prior)}, "
          f"interpolation {'VP (--ddpm)' if args.ddpm else 'linear'}, "
          f"weight_prior {args.weight_prior if coupling == 'learned' else 'n/a'}, iterations {args.iterations}, "
          f"batch {args.batchsize}, params flow {count_parameters(flow_model):,}{encoder_params}, "
          f"eval NFE {','.join(map(str, eval_N))}, seed {args.seed}, dir {args.dir}", flush=True)

    figures = Figures(args.dir, data, model, coupling, eval_noise, args.N, wide_prior, args.seed, amp)
    figures.data_and_prior(data)

    task = Training2D(args, model, optimizer, data, train_generator, amp, figures)
    start = time.time()
    stopped = loop.run(task, 1, args.iterations, task.schedule, desc=f"2d {coupling}", mininterval=1.0,
                       stop_hint="the checkpoints of that iteration are saved, no metrics; run the command again "
                                 "(with --overwrite) to train from the start")
    if stopped:
        return
    train_seconds = task.train_seconds

    # Final metrics and samples, all from the same prior noise (the final checkpoints are saved by the loop).
    metrics, samples = evaluate(autocast_velocity(flow_model, device, amp), eval_noise, eval_N, reference)
    floor = metrics2d.energy_distance(
        toy2d.sample_mixture(EVAL_POINTS, toy2d.make_generator(args.seed, toy2d.STREAM_FLOOR)), reference)
    measured = [metrics["straightness"], floor, *metrics["energy_distance"].values()]
    if not all(np.isfinite(measured)):
        raise UserError(f"the trained flow's samples or straightness are inf or NaN (straightness "
                        f"{metrics['straightness']}); metrics.json was not written. Lower --lr")
    for steps in eval_N:
        with atomic_write(os.path.join(args.dir, f"samples_N{steps}.npy")) as handle:
            np.save(handle, samples[steps].cpu().numpy().astype(np.float32))
    metrics = {"coupling": coupling, "interpolation": interpolation,
               "weight_prior": args.weight_prior if coupling == "learned" else None,
               "seed": args.seed, "iterations": args.iterations, **metrics,
               "energy_distance_floor": floor, "train_seconds": round(train_seconds, 3)}
    save_json(metrics, os.path.join(args.dir, "metrics.json"))
    figures.refresh(args.iterations, one_step=samples.get(1), metrics=metrics)
    figures.generated(samples, metrics, reference)

    distances = ", ".join(f"N={n}: {metrics['energy_distance'][str(n)]:.4f}" for n in eval_N)
    print(f"done in {time.time() - start:.0f} s: straightness {metrics['straightness']:.4f} "
          f"(Euler N={metrics['straightness_N']}), energy distance {distances} "
          f"(two true draws: {floor:.4f}); files in {args.dir}", flush=True)


if __name__ == "__main__":
    cli_main(main)
