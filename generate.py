"""Sample from a trained flow: integrate dz/dt = v(z, t) from noise (t = 1) to images (t = 0).

Solvers (the registry models.solvers.SOLVERS): ``euler`` (N steps, NFE = N), ``heun`` (N = NFE,
odd: (N + 1) / 2 steps, the last one Euler), both on the time grid of --schedule (uniform by default,
the paper's), and the adaptive ``rk45`` / ``rk23`` / ``dop853`` (the paper's scipy names, run on the
device as torchdiffeq's dopri5 / bosh3 / dopri8, from t = 1 to t = 1e-3 with --rtol / --atol; the NFE
used is reported).

Sample k always starts from the noise drawn by ``torch.Generator().manual_seed(seed + k)``
on the CPU, whatever the batch size or the number of processes, so image k is
the same in every run (EDM's one-seed-per-image rule). With ``--encoder`` the
start is instead the learned coupling applied to image k of ``--dataset``
(reconstruction), with the encoder's noise drawn from the same seed.

Writes into --dir: samples/%05d.png, trajs/%05d.png (--save_traj), zs/%05d.npy
(--save_z), data/%05d.png (--save_data), config_sampling.json, result_sampling.json.

    python generate.py --gpu 0 --dir test --N 100 --res 28 --input_nc 1 --num_samples 10 \
        --ckpt runs/mnist-beta20/flow_model_60000_ema.pth --config_de configs/mnist_de.json
    python generate.py --gpu 0,1,2,3,4,5,6,7 --dir runs/ffhq-independent/200000-heun-N121/ --solver heun \
        --N 121 --res 64 --input_nc 3 --num_samples 100 --ckpt runs/ffhq-independent/flow_model_200000_ema.pth \
        --config_de configs/ffhq_de.json --batchsize 128 --save_traj
"""
import glob
import math
import os
import re
import tempfile
import time

from utils.errors import exit_cleanly_on_signals
from utils.threads import choose_omp_wait_policy

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports and checks below is one line, not a traceback

# Before torch is imported (libgomp reads it once): PASSIVE when other jobs keep the CPUs busy, libgomp's
# default otherwise, unless OMP_WAIT_POLICY is already set (utils/threads.py, docs/speed.md).
OMP_WAIT_POLICY = choose_omp_wait_policy()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models import build_encoder, build_network, check_encoder_decoder, fast_cpu, load_config  # noqa: E402
from models import flow as flowlib  # noqa: E402
from models import solvers  # noqa: E402
from models.config import config_differences, resolve_image_options, validate_config  # noqa: E402
from utils import dist  # noqa: E402
from utils.amp import AMP_CHOICES, AMP_HELP, autocast, autocast_velocity, resolve_amp  # noqa: E402
from utils import rundir, runlock  # noqa: E402
from utils import train as plumbing  # noqa: E402
from utils.console import progress_bar  # noqa: E402
from utils.checkpoint import load_weights, resolve_weights_path, saved_configs  # noqa: E402
from utils.data import DATASETS, build_dataset, check_dataset_config  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.images import save_labelled_grid, save_png, to_uint8  # noqa: E402
from utils.imagefiles import is_image_name  # noqa: E402
from utils.io import atomic_write, load_state_dict_strict, save_json  # noqa: E402

TRAJ_COLUMNS = 8  # x0 predictions drawn per trajectory strip (evenly spaced steps)
# Arguments that change how a run is executed but not what it writes; a rerun may differ in them.
RERUN_FREE_ARGS = ("gpu", "debug", "overwrite", "batchsize", "dir", "grid", "amp_used", "amp_reason",   # amp_*: from --amp
                   "cpu_fast_path_used", "cpu_fast_path_reason")
# Arguments added after runs were recorded: a config_sampling.json without one means the default.
LATER_ARGS = {"schedule": "uniform"}
# Arguments holding paths; compared as absolute paths so "./x" and "x" are the same run.
PATH_ARGS = ("ckpt", "encoder", "config_de", "config_en", "data_path", "data_root")
OUTPUT_PATTERNS = ("samples/*.png", "trajs/*.png", "zs/*.npy", "data/*.png", "result_sampling.json", "grid.png")
GRID_IMAGES = 64          # most samples in --grid's grid.png


# ----------------------------------------------------------------------------
# Arguments.

def fixed_step_solvers():
    """The names of the fixed-step solvers (euler, heun), from the registry."""
    return [name for name, spec in solvers.SOLVERS.items() if spec.fixed_step]


def solver_help():
    """--solver's help, from the registry: each solver once, adaptive ones with the paper's scipy names."""
    own = [spec for name, spec in solvers.SOLVERS.items() if name == spec.name]
    fixed = [f"{spec.name} ({spec.summary})" for spec in own if spec.fixed_step]
    adaptive = [f"{spec.name} ({spec.summary}; the paper's {'/'.join(a.upper() for a in solvers.aliases(spec))})"
                for spec in own if spec.adaptive]
    return (f"ODE solver: {', '.join(fixed)} on the --schedule grid; or an adaptive one from t = 1 to "
            f"{solvers.ADAPTIVE_T_END:g} on the device (torchdiffeq, --rtol / --atol): {', '.join(adaptive)}. "
            f"Names in any case: the paper's scipy names run as the torchdiffeq methods")


def build_parser():
    parser = ArgumentParser("generate.py",
        description="Sample images from a trained flow with Euler, Heun or adaptive RK45; optionally save "
                    "trajectories and the starting z of each sample (for distillation).")
    parser.add_argument("--gpu", type=str, default=None,
                        help="comma-separated GPU ids, one process each (e.g. 0 or 0,1,2,3); omit to run on the CPU. "
                             "Under torchrun the launcher decides")
    parser.add_argument("--dir", "--outdir", dest="dir", type=str, required=True,
                        help="output folder (--outdir: EDM's name for it)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help=AMP_HELP)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="flow network weights: a paper-format EMA state dict (flow_model_*_ema.pth), a "
                             "training state (its EMA weights are used) or a run folder (its newest EMA file)")
    parser.add_argument("--config_de", type=str, default=None,
                        help="flow (decoder) network config, a .json file [default: the config saved with --ckpt: "
                             "in a training state or the run folder's config.json; a bare EMA file needs it]")
    parser.add_argument("--batchsize", type=int, default=4,
                        help="global batch size, divided over the processes (does not change the images)")
    parser.add_argument("--res", type=int, default=None,
                        help="image resolution; must equal img_resolution of --config_de [default: the config's]")
    parser.add_argument("--input_nc", type=int, default=None,
                        help="image channels; must equal in_channels of --config_de [default: the config's]")
    parser.add_argument("--N", type=int, default=20,
                        help="NFE of the fixed-step solvers: euler steps, or heun evaluations (odd); "
                             "ignored by the adaptive solvers")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="number of images to generate [default: 64, or as many as --seeds]")
    parser.add_argument("--solver", type=str.lower, choices=tuple(solvers.SOLVERS), default="euler",
                        metavar="SOLVER", help=solver_help())
    parser.add_argument("--schedule", type=str, choices=tuple(solvers.TIME_GRIDS), default="uniform",
                        help=f"time grid of the fixed-step solvers ({', '.join(fixed_step_solvers())}): uniform "
                             f"(equal steps, the paper's) or quadratic (t = (j / steps)^2 for j = steps..0: smaller "
                             f"steps near the data at t = 0); straightness_mean is reported for uniform only. The "
                             f"adaptive solvers choose their own steps")
    parser.add_argument("--rtol", type=float, default=None,
                        help=f"relative tolerance of the adaptive solvers (default: {solvers.DEFAULT_RTOL:g}); a "
                             f"fixed-step solver ignores it, with a warning")
    parser.add_argument("--atol", type=float, default=None,
                        help=f"absolute tolerance of the adaptive solvers (default: {solvers.DEFAULT_ATOL:g}); a "
                             f"fixed-step solver ignores it, with a warning")
    parser.add_argument("--seed", type=int, default=0,
                        help="sample k starts from noise seeded with seed + k (same image whatever the batch "
                             "size or number of processes)")
    parser.add_argument("--seeds", type=str, default=None,
                        help="EDM-style list of seeds, e.g. 0-63,100: one image per seed, started from noise seeded "
                             "with it and named by it (samples/00100.png); replaces --seed and --num_samples")
    parser.add_argument("--grid", action="store_true",
                        help=f"also write grid.png: the first {GRID_IMAGES} samples in one image, each labelled "
                             f"with its seed")
    parser.add_argument("--encoder", type=str, default=None,
                        help="encoder weights (forward_model_*_ema.pth, a training state or a run folder): "
                             "reconstruct dataset images, starting from z ~ q(z | x) instead of prior noise; "
                             "needs --dataset, and --config_en for a bare EMA file (a state or run folder "
                             "carries its config)")
    parser.add_argument("--config_en", type=str, default=None,
                        help="encoder config (.json), with --encoder (default: the one a state or run folder holds)")
    parser.add_argument("--dataset", type=str, default=None, choices=DATASETS,
                        help="dataset whose images are reconstructed with --encoder (image k is sample k)")
    parser.add_argument("--data_path", type=str, default=None,
                        help="folder or zip of images for --dataset ffhq / afhq / celebahq / celebahq256 / folder")
    parser.add_argument("--data_root", type=str, default="./data",
                        help="where torchvision keeps (or downloads) mnist / cifar10")
    parser.add_argument("--split", type=str, choices=("test", "train"), default="test",
                        help="which split of mnist / cifar10 --encoder reconstructs (folders have one)")
    parser.add_argument("--no_scale", action="store_true",
                        help="the network works on images in [0, 1] instead of [-1, 1]: outputs are saved as "
                             "x * 255 and dataset images are given to the encoder in [0, 1]")
    parser.add_argument("--save_traj", action="store_true",
                        help=f"save trajs/%%05d.png: for each sample a strip of the predicted clean image "
                             f"x0 = z - t v(z, t) at up to {TRAJ_COLUMNS} evenly spaced steps (euler / heun)")
    parser.add_argument("--save_z", action="store_true",
                        help="save zs/%%05d.npy: the starting z of each sample (float32 [C, H, W]), for distill.py")
    parser.add_argument("--save_data", action="store_true",
                        help="save data/%%05d.png: the real image each reconstruction starts from (with --encoder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a --dir that holds the outputs of a run with other arguments "
                             "(its samples, trajs, zs, data and results are deleted first)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------
# Checks before any work: every problem a user can fix is one line.

MAX_SAMPLES = 10_000_000   # per run (EDM's FID uses 50,000); each sample's seed and statistics are kept in memory


def parse_seeds(text):
    """EDM's seed list: ``"0-3,10"`` -> [0, 1, 2, 3, 10]; bad syntax, descending ranges and repeats are errors."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            negative = "; a seed here names its file, so it cannot be negative (--seed S takes any start: " \
                       "S, S + 1, ...)" if part.strip().startswith("-") else ""
            raise UserError(f"--seeds must be comma-separated non-negative seeds and ranges like 0-63,100; "
                            f"got {text!r}{negative}")
        low = int(match.group(1))
        high = low if match.group(2) is None else int(match.group(2))
        if high < low:
            raise UserError(f"--seeds range {part.strip()} goes down; write it as {high}-{low}")
        if len(seeds) + high - low + 1 > MAX_SAMPLES:
            raise UserError(f"--seeds names more than {MAX_SAMPLES:,} images; sample in several runs")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        repeated = min(seed for seed in set(seeds) if seeds.count(seed) > 1)
        raise UserError(f"--seeds names seed {repeated} more than once; each seed is one image")
    return seeds


def resolve_seeds(args):
    """Each sample's seed: --seeds as given, else --seed + k for k < --num_samples (default 64)."""
    if args.seeds is None:
        args.num_samples = 64 if args.num_samples is None else args.num_samples
        if args.num_samples < 1:
            raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
        if args.num_samples > MAX_SAMPLES:
            raise UserError(f"--num_samples must be at most {MAX_SAMPLES:,} per run, got {args.num_samples}; "
                            f"sample in several runs (--seed)")
        return [args.seed + k for k in range(args.num_samples)]
    seeds = parse_seeds(args.seeds)
    if args.num_samples is not None and args.num_samples != len(seeds):
        raise UserError(f"--num_samples {args.num_samples} disagrees with the {len(seeds)} seeds of --seeds "
                        f"{args.seeds}; give only --seeds")
    if args.seed != 0:
        raise UserError("--seed and --seeds both choose the noise; give only one of them")
    args.num_samples = len(seeds)
    return seeds


def flow_config(args, ckpt_file):
    """The flow network's config and how messages name it: the one saved with --ckpt, or --config_de.

    Both given: they must agree (one line naming the keys that differ)."""
    saved, _, where = saved_configs(ckpt_file)
    given = load_config(args.config_de, "--config_de") if args.config_de is not None else None
    if saved is None:
        if given is None:
            raise UserError(f"--config_de is required: --ckpt {args.ckpt} holds bare weights and no config.json "
                            f"lies beside it; give the flow network's config, e.g. configs/mnist_de.json")
        return given, f"--config_de {args.config_de}"
    saved = validate_config(saved, f"the config in {where}")
    if given is not None and given != saved:
        changed = config_differences(given, saved)
        raise UserError(f"--config_de {args.config_de} disagrees with the config saved in {where} "
                        f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}); omit --config_de to use "
                        f"the saved one")
    return saved, (f"--config_de {args.config_de}" if given is not None else f"the config in {where}")


def encoder_config(args, encoder_file):
    """The encoder's config: --config_en, or the one saved with --encoder (they must agree)."""
    _, saved, where = saved_configs(encoder_file)
    given = load_config(args.config_en, "--config_en") if args.config_en is not None else None
    if saved is None:
        if given is None:
            raise UserError("--encoder needs --config_en, the encoder's config (e.g. configs/mnist_en.json)")
        return given, f"--config_en {args.config_en}"
    saved = validate_config(saved, f"the encoder config in {where}")
    if given is not None and given != saved:
        changed = config_differences(given, saved)
        raise UserError(f"--config_en {args.config_en} disagrees with the encoder config saved in {where} "
                        f"({'; '.join(changed[:4])}); omit --config_en to use the saved one")
    return saved, (f"--config_en {args.config_en}" if given is not None else f"the encoder config in {where}")


def check_solver(args):
    """--solver with --N, --schedule, --rtol / --atol and --save_traj (filling the tolerances' defaults);
    returns the warnings: tolerances given to a fixed-step solver have no effect."""
    spec = solvers.solver_spec(args.solver)
    try:
        solvers.check_nfe(args.solver, args.N)
    except ValueError as error:
        raise UserError(str(error)) from None
    given = [f"--{name}" for name in ("rtol", "atol") if getattr(args, name) is not None]
    args.rtol = solvers.DEFAULT_RTOL if args.rtol is None else args.rtol
    args.atol = solvers.DEFAULT_ATOL if args.atol is None else args.atol
    plumbing.check_finite_number(args.rtol, "--rtol")
    plumbing.check_finite_number(args.atol, "--atol")
    fixed = " or ".join(fixed_step_solvers())
    if spec.adaptive:
        if not (args.rtol > 0 and args.atol > 0):
            raise UserError(f"--rtol and --atol must be positive, got {args.rtol} and {args.atol}")
        if args.save_traj:
            raise UserError(f"--save_traj draws x0 predictions at fixed steps; use --solver {fixed} "
                            f"(got {args.solver})")
        if args.schedule != "uniform":
            raise UserError(f"--schedule {args.schedule} is the time grid of a fixed-step solver; {args.solver} "
                            f"chooses its own steps: use --solver {fixed} or drop --schedule")
        return []
    if given:
        return [f"warning: {' and '.join(given)} {'have' if len(given) > 1 else 'has'} no effect with "
                f"{args.solver}, a fixed-step solver (--N sets its NFE); tolerances apply to the adaptive solvers"]
    return []


def check_args(args):
    """Check ``args`` before anything is loaded or written; returns the plan (seeds, configs, resolved weight
    files, warnings). Fills --res / --input_nc from the config and the tolerances' defaults.

    Only checks: the arguments, the files they name and the network configs (a training state is read for
    its config). Whether the weights fit is :func:`load_networks`'s job, and --dir is
    :func:`prepare_output_dir`'s; main runs both after this, before anything is written.
    """
    seeds = resolve_seeds(args)
    if args.batchsize < 1:
        raise UserError(f"--batchsize must be at least 1, got {args.batchsize}")
    warnings = check_solver(args)
    plumbing.check_seed(args.seed)
    dist.check_gpus(dist.parse_gpu_list(args.gpu))

    if args.ckpt is None:
        raise UserError("--ckpt is required: a flow_model_*_ema.pth file, a training state or a run folder")
    ckpt_file = resolve_weights_path(args.ckpt, "flow")
    config_de, config_de_name = flow_config(args, ckpt_file)
    resolve_image_options(args, config_de, args.config_de, where=config_de_name)
    plan = {"config_de": config_de, "config_de_name": config_de_name, "config_en": None, "config_en_name": None,
            "ckpt_file": ckpt_file, "encoder_file": None, "seeds": seeds, "warnings": warnings}

    if args.encoder is not None:
        if args.dataset is None:
            raise UserError(f"--encoder reconstructs dataset images and needs --dataset ({', '.join(DATASETS)})")
        plan["encoder_file"] = resolve_weights_path(args.encoder, "forward")
        plan["config_en"], plan["config_en_name"] = encoder_config(args, plan["encoder_file"])
        check_encoder_decoder(config_de, plan["config_en"], names=(config_de_name, plan["config_en_name"]))
        check_dataset_config(args.dataset, config_de, name=config_de_name)
    elif args.save_data:
        raise UserError("--save_data saves the real images that --encoder reconstructs; give --encoder "
                        "(with --config_en and --dataset) or drop --save_data")
    return plan


def run_record(args, plan):
    """What config_sampling.json holds: the arguments, plus the weight files they resolved to."""
    record = dict(vars(args))
    record["ckpt_file"] = os.path.abspath(plan["ckpt_file"])
    record["encoder_file"] = os.path.abspath(plan["encoder_file"]) if plan["encoder_file"] else None
    record["resolved_config_de"] = plan["config_de"]
    record["resolved_config_en"] = plan["config_en"]
    if "amp" in plan:   # what --amp resolved to on this device, and why
        record["amp_used"], record["amp_reason"] = plan["amp"], plan["amp_reason"]
        record["cpu_fast_path_used"], record["cpu_fast_path_reason"] = plan["cpu_fast_path"]
    return record


def _comparable(record):
    """The part of a run record that decides what the run writes."""
    record = {**LATER_ARGS, **record}
    keys = [key for key in record if key not in RERUN_FREE_ARGS]
    return {key: (os.path.abspath(record[key]) if key in PATH_ARGS and record[key] else record[key]) for key in keys}


def differences(previous, current):
    """Names (with both values) of the arguments in which two run records differ."""
    old, new = _comparable(previous), _comparable(current)
    return [text for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
            for text in rundir.change(key, old.get(key), new.get(key))]


def check_not_an_input(args):
    """--dir must not be a training run's folder or a folder of images (a dataset): generate.py's samples
    there would mix with the run's files, or become training data (a data folder is read recursively)."""
    rundir.check_apart(args.dir, {"--data_path": args.data_path} if args.dataset else {})
    if not os.path.isdir(args.dir):
        return
    runs = rundir.existing_outputs(args.dir, ("training_state_*.pth", "flow_model_*.pth", "forward_model_*.pth"))
    if runs:
        raise UserError(f"--dir {args.dir} holds a training run ({os.path.basename(runs[-1])}); write samples "
                        f"into a folder of their own, e.g. --dir {os.path.join(args.dir, 'samples-' + args.solver)}")
    images = [name for name in os.listdir(args.dir) if is_image_name(name) and name != "grid.png"]
    if images:
        raise UserError(f"--dir {args.dir} holds images of its own ({sorted(images)[0]}, ...), as a dataset does; "
                        f"generate.py writes its samples into --dir/samples: choose another --dir")


def prepare_output_dir(args, plan):
    """Take --dir's lock and create it; it must be writable and must not hold a different run's outputs
    (unless --overwrite, which marks them to be deleted just before sampling)."""
    check_not_an_input(args)
    if not dist.under_launcher() or int(os.environ["RANK"]) == 0:
        runlock.acquire(args.dir)   # one writer per --dir (released in main); rank 0 writes it
    try:
        os.makedirs(args.dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.dir):
            pass
    except OSError as error:
        raise UserError(f"output folder --dir {args.dir} is not writable ({error.strerror or error}); "
                        f"choose another --dir") from None
    problem = None
    previous = rundir.previous_record(args.dir, "config_sampling.json")
    if previous is not None:
        changed = (["its config_sampling.json is unreadable"] if previous == rundir.UNREADABLE
                   else differences(previous, run_record(args, plan)))
        if changed:
            problem = (f"--dir {args.dir} holds the outputs of a run with other arguments ({'; '.join(changed[:3])})")
    elif rundir.existing_outputs(args.dir, ("samples/*.png",)):
        problem = f"--dir {args.dir} already holds samples/ but no config_sampling.json"
    # With --overwrite the other run's outputs are deleted (by rank 0, just before sampling).
    plan["clear_outputs"] = problem is not None
    if problem and not args.overwrite:
        raise UserError(f"{problem}; choose another --dir or pass --overwrite to replace them")


# ----------------------------------------------------------------------------
# Networks and data.

def load_flow_network(args, plan, device):
    """The velocity network v(z, t) with the --ckpt weights, in eval mode on ``device``."""
    net = build_network(plan["config_de"], name=plan["config_de_name"])
    state_dict, path = load_weights(plan["ckpt_file"], "flow")
    refuse_nonfinite(state_dict, path, "--ckpt")
    load_state_dict_strict(net, state_dict, path, what="--ckpt")
    return net.eval().requires_grad_(False).to(device)


def refuse_nonfinite(state_dict, path, option):
    """Weights holding inf or NaN (a diverged run) cannot give images: one line naming a tensor."""
    key = plumbing.first_nonfinite(state_dict)
    if key is not None:
        raise UserError(f"{option} {path} holds non-finite weights (inf or NaN, e.g. in {key}): the run it comes "
                        f"from diverged; use a checkpoint of an earlier iteration")


def load_encoder(args, plan, device):
    """The learned coupling q(z | x) with the --encoder weights, in eval mode on ``device``."""
    encoder = build_encoder(plan["config_en"], name=plan["config_en_name"])
    state_dict, path = load_weights(plan["encoder_file"], "forward")
    refuse_nonfinite(state_dict, path, "--encoder")
    load_state_dict_strict(encoder, state_dict, path, what="--encoder")
    return encoder.eval().requires_grad_(False).to(device)


def load_encoder_dataset(args):
    """The images --encoder reconstructs, in a fixed order (test split or sorted file names), no flips."""
    dataset = build_dataset(args.dataset, args.res, args.input_nc, data_path=args.data_path,
                            data_root=args.data_root, train=args.split == "train")
    dataset.flip = False  # image k must be the same image in every run
    if len(dataset) < args.num_samples:
        raise UserError(f"--num_samples {args.num_samples} exceeds the {len(dataset)} images of --dataset "
                        f"{args.dataset}; lower --num_samples")
    return dataset


def load_networks(args, plan, device):
    """What sampling runs, built on ``device``: ``(flow network, encoder, dataset)``, the last two None without
    --encoder. Weights that do not fit their config, or hold inf / NaN, stop here in one line."""
    net = load_flow_network(args, plan, device)
    encoder = dataset = None
    if args.encoder is not None:
        dataset = load_encoder_dataset(args)
        encoder = load_encoder(args, plan, device)
    return net, encoder, dataset


def rank_indices(num_samples, rank, world_size):
    """Sample indices of one process: rank, rank + world_size, ... (each index on exactly one rank)."""
    return list(range(rank, num_samples, world_size))


def starting_noise(seeds, shape):
    """Noise [B, *shape] on the CPU, each sample from its own generator seeded with its seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def sample_name(args, seed, k):
    """File stem of sample k: its seed with --seeds (EDM), else its index."""
    return f"{seed:05d}" if args.seeds is not None else f"{k:05d}"


def starting_points(indices,                # sample indices of this batch
                    seeds,                  # every sample's seed (plan["seeds"])
                    args,                   # parsed arguments (res, input_nc, no_scale)
                    device,                 # where the networks run
                    encoder=None,           # the learned coupling, or None to start from prior noise
                    dataset=None,           # images to reconstruct (with ``encoder``)
                    amp="none"):            # autocast of the encoder ("bf16" or "none")
    """z at t = 1 for a batch [B, C, H, W], and the real images encoded (or None)."""
    noise = starting_noise([seeds[k] for k in indices], (args.input_nc, args.res, args.res)).to(device)
    if encoder is None:
        return noise, None
    data = torch.stack([dataset[k][0] for k in indices]).to(device)
    if args.no_scale:
        data = data * 0.5 + 0.5
    with autocast(device, amp):
        z, _, _ = encoder(data, noise=noise)
    return z.float(), data


def sample_batch(net,                       # velocity network, called as net(z, t) with t [B]
                 z,                         # starting points at t = 1, [B, C, H, W]
                 solver="euler",            # a name in models.solvers.SOLVERS
                 N=20,                      # NFE of the fixed-step solvers
                 rtol=solvers.DEFAULT_RTOL,  # tolerances of the adaptive solvers (fixed-step ones ignore them)
                 atol=solvers.DEFAULT_ATOL,
                 schedule="uniform",        # time grid of the fixed-step solvers, a name in models.solvers.TIME_GRIDS
                 return_traj=False):        # keep states and x0 predictions (fixed-step solvers)
    """Integrate one batch from t = 1 to 0; returns models.solvers.SolveResult (x, nfe, traj, x0_preds, times)."""
    spec = solvers.solver_spec(solver)

    def velocity(state, t):
        return net(state, t)

    if spec.adaptive:
        return spec.function(velocity, z, rtol=rtol, atol=atol, return_traj=return_traj)
    # uniform is the solvers' own default grid: steps of exactly -1 / steps, the paper's arithmetic
    times = None if schedule == "uniform" else solvers.time_grid(schedule, spec.steps_for_nfe(N))
    return spec.function(velocity, z, times=times, N=N, return_traj=return_traj)


def to_images(x, no_scale=False):
    """Network-scale images [B, C, H, W] -> uint8 [B, H, W, C]."""
    return to_uint8(x * 2 - 1 if no_scale else x)


def trajectory_strip(x0_preds, columns=TRAJ_COLUMNS):
    """x0 predictions at up to ``columns`` evenly spaced steps, side by side: [B, C, H, W * columns]."""
    count = min(columns, len(x0_preds))
    steps = sorted(set(np.linspace(0, len(x0_preds) - 1, count).round().astype(int).tolist()))
    return torch.cat([x0_preds[i] for i in steps], dim=3)


def save_npy(array, path):
    with atomic_write(path) as handle:
        np.save(handle, array)


def clear_outputs(folder):
    """Delete what a previous run wrote into ``folder`` (only with --overwrite)."""
    for pattern in OUTPUT_PATTERNS:
        for path in glob.glob(os.path.join(folder, pattern)):
            os.remove(path)


# ----------------------------------------------------------------------------
# The loop.

def worker(info, args, plan):
    """Sample this process's share of the indices, write its files, combine the statistics on rank 0."""
    device = info.device
    amp, amp_reason = resolve_amp(args.amp, device)
    if args.amp == "auto" and amp == "bf16" and solvers.solver_spec(args.solver).adaptive:
        # bf16's rounding noise in the velocity drives an adaptive solver's error control to far smaller steps
        # (docs/sampling.md: rk45 302 vs 116 NFE on the MNIST-small weights), so auto keeps them in fp32
        amp, amp_reason = "none", f"auto: fp32 for the adaptive solver {args.solver}, whose NFE bf16 noise inflates"
    cpu_fast_path = fast_cpu.choose(device.type, amp)
    plan = dict(plan, amp=amp, amp_reason=amp_reason, cpu_fast_path=cpu_fast_path)
    net, encoder, dataset = load_networks(args, plan, device)
    fast_cpu.apply([net, encoder], cpu_fast_path[0])
    velocity = autocast_velocity(net, device, amp)
    spec = solvers.solver_spec(args.solver)
    folders = ["samples"] + ["trajs"] * args.save_traj + ["zs"] * args.save_z + ["data"] * args.save_data

    if info.is_main:
        if plan["clear_outputs"]:
            clear_outputs(args.dir)
        for folder in folders:
            os.makedirs(os.path.join(args.dir, folder), exist_ok=True)
        save_json(run_record(args, plan), os.path.join(args.dir, "config_sampling.json"))
        parameters = sum(p.numel() for p in net.parameters()) / 1e6
        extra = f", encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M" if encoder is not None else ""
        # a run folder as --ckpt / --encoder: say which of its files was loaded
        chosen = [plan[key] for key, given in (("ckpt_file", args.ckpt), ("encoder_file", args.encoder))
                  if given is not None and plan[key] is not None and os.path.isdir(given)]
        extra += f" (from {', '.join(chosen)})" if chosen else ""
        nfe = (f"NFE {args.N}, {args.schedule} grid" if spec.fixed_step
               else f"adaptive (rtol {args.rtol}, atol {args.atol})")
        print(f"generate: {device} x {info.world_size} process(es), global batch {args.batchsize}, "
              f"{args.num_samples} samples, solver {args.solver}, {nfe}, flow network {parameters:.2f}M "
              f"parameters{extra}, start {'encoder(' + args.dataset + ')' if encoder is not None else 'noise'}, "
              f"amp {amp} ({amp_reason}), CPU fast path {'on' if cpu_fast_path[0] else 'off'} ({cpu_fast_path[1]})",
              flush=True)
        for warning in plan["warnings"]:
            print(warning, flush=True)
    dist.barrier()

    indices = rank_indices(args.num_samples, info.rank, info.world_size)
    batch = max(1, math.ceil(args.batchsize / info.world_size))
    batches = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    fixed_step = spec.fixed_step
    # flowlib.straightness assumes equal steps (dt = 1 / steps): not defined here for another grid
    measure_straightness = fixed_step and args.schedule == "uniform"

    # Per-sample statistics in global-index slots; summing over ranks fills every slot once.
    straightness = torch.zeros(args.num_samples, dtype=torch.float64, device=device)
    z_norms = torch.zeros(args.num_samples, dtype=torch.float64, device=device)
    written = torch.zeros(args.num_samples, dtype=torch.float64, device=device)
    nfe_total = torch.zeros(2, dtype=torch.float64, device=device)  # velocity evaluations, batches
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # samples holding inf or NaN

    start = time.time()
    progress = progress_bar(total=len(indices), disable=not info.is_main, unit="img",
                            desc="sampling" if info.world_size == 1 else f"sampling (rank 0 of {info.world_size})")
    with torch.inference_mode():
        for batch_indices in batches:
            z, data = starting_points(batch_indices, plan["seeds"], args, device, encoder, dataset, amp)
            result = sample_batch(velocity, z, args.solver, args.N, args.rtol, args.atol, args.schedule,
                                  return_traj=fixed_step)
            slots = torch.as_tensor(batch_indices, device=device)
            z_norms[slots] = z.flatten(1).double().norm(dim=1)
            if measure_straightness:
                straightness[slots] = flowlib.straightness(result.traj, per_sample=True).double()
            written[slots] += 1
            nfe_total += torch.tensor([result.nfe, 1.0], dtype=torch.float64, device=device)
            nonfinite += (~torch.isfinite(result.x.flatten(1))).any(dim=1).sum()

            samples = to_images(result.x, args.no_scale)
            strips = to_images(trajectory_strip(result.x0_preds), args.no_scale) if args.save_traj else None
            originals = to_images(data, args.no_scale) if args.save_data else None
            zs = z.float().cpu().numpy() if args.save_z else None
            for row, k in enumerate(batch_indices):
                name = sample_name(args, plan["seeds"][k], k)
                save_png(samples[row], os.path.join(args.dir, "samples", f"{name}.png"))
                if strips is not None:
                    save_png(strips[row], os.path.join(args.dir, "trajs", f"{name}.png"))
                if zs is not None:
                    save_npy(zs[row], os.path.join(args.dir, "zs", f"{name}.npy"))
                if originals is not None:
                    save_png(originals[row], os.path.join(args.dir, "data", f"{name}.png"))
            progress.update(len(batch_indices))
    progress.close()

    for tensor in (straightness, z_norms, written, nfe_total, nonfinite):
        dist.all_reduce_sum(tensor)
    seconds = time.time() - start
    # The same sums on every rank, so every rank stops alike: no NaN is ever reported as a result.
    if nonfinite.item() or not bool(torch.isfinite(straightness).all() & torch.isfinite(z_norms).all()):
        raise UserError(f"{int(nonfinite.item())} of {args.num_samples} samples (or their statistics) are inf or "
                        f"NaN: the network's outputs overflow; result_sampling.json was not written. Use a "
                        f"checkpoint of an earlier iteration")
    if info.is_main:
        if not bool((written == 1).all()):
            raise RuntimeError("some sample indices were not written exactly once")
        norms = z_norms.cpu()
        results = {
            "num_samples": args.num_samples,
            "solver": args.solver,
            "method": spec.name,
            "N": args.N,
            "schedule": args.schedule if fixed_step else None,
            "nfes_mean": nfe_total[0].item() / nfe_total[1].item(),
            "straightness_mean": straightness.mean().item() if measure_straightness else None,
            "z_norm_mean": norms.mean().item(),
            "z_norm_std": norms.std().item() if args.num_samples > 1 else 0.0,
            "z_norms": norms.tolist(),
            "seeds": plan["seeds"],
            "num_batches": int(nfe_total[1].item()),
            "world_size": info.world_size,
            "seconds": seconds,
        }
        save_json(results, os.path.join(args.dir, "result_sampling.json"))
        if args.grid:
            write_grid(args, plan, results)
        straight = f"{results['straightness_mean']:.6g}" if measure_straightness else "n/a"
        print(f"generate: {args.num_samples} samples in {seconds:.1f} s, nfes_mean {results['nfes_mean']:.2f}, "
              f"straightness_mean {straight}, z_norm_mean {results['z_norm_mean']:.4g} -> {args.dir}", flush=True)
    dist.barrier()


def write_grid(args, plan, results):
    """grid.png: the first GRID_IMAGES samples read back from samples/, each labelled with its seed."""
    count = min(GRID_IMAGES, args.num_samples)
    names = [sample_name(args, plan["seeds"][k], k) for k in range(count)]
    images = [np.asarray(Image.open(os.path.join(args.dir, "samples", f"{name}.png"))) for name in names]
    if solvers.solver_spec(args.solver).fixed_step:
        nfe = f"NFE {args.N}" + (f", {args.schedule} grid" if args.schedule != "uniform" else "")
    else:
        nfe = f"NFE {results['nfes_mean']:.0f} (adaptive)"
    title = f"{args.solver}, {nfe}, {os.path.basename(os.path.normpath(plan['ckpt_file']))}"
    save_labelled_grid(images, [f"seed {plan['seeds'][k]}" for k in range(count)], title,
                       os.path.join(args.dir, "grid.png"))


def main(argv=None):
    args = parse_args(argv)
    try:
        plan = check_args(args)                            # the arguments: nothing loaded, nothing written
        load_networks(args, plan, torch.device("cpu"))     # the weights must fit, before --dir is touched
        prepare_output_dir(args, plan)                     # the lock, then --dir
        dist.launch(worker, dist.parse_gpu_list(args.gpu), args, plan)
    finally:
        runlock.release(args.dir)


if __name__ == "__main__":
    cli_main(main)
