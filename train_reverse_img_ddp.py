"""Train an image flow with a learned forward coupling (the paper's method), on the CPU, one GPU or many.

Each step draws images x, pairs them with noise z, and minimises

    loss = || v(z_t, t) - (z - x) ||^2  +  weight_prior * KL(q(z|x) || N(0, I)) / dim,

with z_t = t z + (1 - t) x and t ~ U(1e-5, 1). The coupling is ``learned`` (the
paper: z ~ q(z|x) from an encoder trained jointly; the KL term is summed over
dimensions, averaged over the batch, divided by the data dimension, as in the
paper's ``get_kl``), ``independent`` (z ~ N(0, I), rectified flow), ``ot`` or ``sinkhorn``
(N(0, I) noise re-paired by exact or entropic minibatch optimal transport on each rank): models/couplings.py.

Processes: no --gpu = one CPU process; --gpu 0,1 = one process per GPU (NCCL);
under torchrun the launcher's ranks (NCCL on GPUs, gloo on CPUs). --batchsize is
global and split over the processes.

Writes into --dir: config.json, log.txt, stats.jsonl (one JSON object per
--log_every), sample grids (traj_uncond*_{i}.png, traj_reverse*_{i}.png),
flow_model_{i}_ema.pth / forward_model_{i}_ema.pth (paper-format EMA state
dicts, every --save_every and at the end), training_state_{i}.pth (every
--save_every) and training_state_latest.pth (every --snapshot_every, at the
end, and on SIGTERM / SIGINT). ``--resume auto`` continues from the latter.

    python train_reverse_img_ddp.py --gpu 0,1 --dir ./runs/cifar10-beta20/ --weight_prior 20 \
        --learning_rate 2e-4 --dataset cifar10 --warmup_steps 5000 --optimizer adam --batchsize 128 \
        --iterations 500000 --config_en configs/cifar10_en.json --config_de configs/cifar10_de.json
"""
import argparse
import os
import sys
import traceback

from utils.errors import exit_cleanly_on_signals
from utils.threads import choose_omp_wait_policy

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports and checks below is one line, not a traceback

# Before torch is imported (libgomp reads it once): PASSIVE when other jobs keep the CPUs busy, libgomp's
# default otherwise, unless OMP_WAIT_POLICY is already set (utils/threads.py, docs/speed.md).
OMP_WAIT_POLICY = choose_omp_wait_policy()


from models import check_encoder_decoder, fast_cpu, load_config  # noqa: E402
from models.couplings import COUPLINGS, DESCRIPTIONS, unused_option_warnings  # noqa: E402
from utils import dist  # noqa: E402
from utils.amp import AMP_CHOICES, AMP_HELP, resolve_amp  # noqa: E402
from utils import runlock  # noqa: E402
from utils.console import protect_console  # noqa: E402
from utils.cpu_shards import auto_shards  # noqa: E402
from utils.data import DATASETS, FOLDER_DATASETS, build_dataset, check_dataset_config  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.io import atomic_write, save_json  # noqa: E402
from utils import train as plumbing  # noqa: E402
from training.image_flow import Trainer, check_image_dataset, check_output_dir, check_resume_state  # noqa: E402
from training.run import ImageRun  # noqa: E402

PAPER_ONLY_ARGS = ("weight_cur", "num_samples")   # in the paper's parser, used nowhere in its code

# ----------------------------------------------------------------------------
# Arguments.

def build_parser():
    parser = ArgumentParser("train_reverse_img_ddp.py",
        description="Train a flow U-Net on images with the learned forward coupling of 'Minimizing Trajectory "
                    "Curvature of ODE-based Generative Models' (or the independent / minibatch-OT coupling).")
    add = parser.add_argument
    add("--gpu", type=str, default=None,
        help="comma-separated GPU ids, one process each (e.g. 0 or 0,1); omit to train on the CPU. "
             "Under torchrun the launcher decides the processes")
    add("--dataset", type=str, default=None, choices=DATASETS,
        help="mnist / cifar10 (torchvision, from --data_root) or a folder / zip of images in --data_path")
    add("--dir", type=str, default=None, help="output folder (created if missing)")
    add("--iterations", type=int, default=1000000, help="last training iteration (steps are numbered from 1)")
    add("--batchsize", type=int, default=4, help="global batch size, divided over the processes")
    add("--learning_rate", type=float, default=3e-5, help="peak learning rate (after warmup)")
    add("--independent", action="store_true",
        help="the paper's flag for the independent coupling q(x, z) = p(x) p(z): same as --coupling independent")
    add("--coupling", type=str, default=None, choices=tuple(COUPLINGS),
        help="how x and z are paired (models/couplings.py): " + "; ".join(
            f"{name}: {text}" for name, text in DESCRIPTIONS.items()) + " (OT within each rank's batch) [default: learned]")
    add("--ot_reg", type=float, default=0.05,
        help="--coupling sinkhorn: entropic regularisation, relative to the batch's mean squared distance "
             "(small: close to exact OT; large: close to independent)")
    add("--resume", type=str, default=None,
        help="training_state_*.pth to continue from, or 'auto': --dir/training_state_latest.pth when it "
             "exists (else the newest intact training_state_{i}.pth), otherwise start fresh")
    add("--N", type=int, default=20, help="Euler steps of the sample grids (a second grid always uses 4)")
    add("--no_ema", action="store_true",
        help="keep no EMA: sample grids and the *_ema.pth files use the raw weights")
    add("--ema_after_steps", type=int, default=1, help="the EMA starts averaging after this many steps")
    add("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    add("--optimizer", type=str, default="adamw", choices=("adam", "adamw"),
        help="adam: betas (0.9, 0.999), eps 1e-8; adamw: weight decay 0.1, betas (0.9, 0.9999)")
    add("--warmup_steps", type=int, default=0, help="linear learning-rate warmup over this many steps")
    add("--weight_prior", type=float, default=10.0, help="beta: weight of the KL term (learned coupling)")
    add("--config_en", type=str, default=None, help="encoder config (.json); needed by the learned coupling")
    add("--config_de", type=str, default=None, help="flow (decoder) network config (.json)")
    add("--seed", type=int, default=0,
        help="seed of the initial weights, the data order and the training noise (rank r adds an offset)")
    add("--data_path", type=str, default=None,
        help="folder or zip of images for --dataset ffhq / afhq / celebahq / celebahq256 / folder "
             "[default: --data_root/<dataset>, e.g. ./data/ffhq; --dataset folder needs it]")
    add("--data_root", type=str, default="./data", help="where torchvision keeps (or downloads) mnist / cifar10")
    add("--save_every", type=int, default=50000,
        help="write flow_model_{i}_ema.pth, forward_model_{i}_ema.pth and training_state_{i}.pth every this "
             "many iterations (the EMA files also at the last iteration)")
    add("--snapshot_every", type=int, default=5000,
        help="write training_state_latest.pth every this many iterations (and at the last one)")
    add("--sample_every", type=int, default=1000, help="write sample grids every this many iterations")
    add("--log_every", type=int, default=100, help="write a stats.jsonl / log.txt record every this many iterations")
    add("--num_workers", type=int, default=dist.default_workers(),
        help="DataLoader worker processes per rank (0: load in the loop); the default is 4, or the CPUs this "
             "process may use when there are fewer")
    add("--amp", type=str, default="auto", choices=AMP_CHOICES, help=AMP_HELP)
    add("--compile", action="store_true", help="torch.compile the networks for training")
    add("--cpu_shards", type=int, default=0,
        help="CPU training: split each batch into this many shards whose forward and backward run concurrently "
             "in as many threads, one intra-op thread each (same gradients, 11-18%% faster than PyTorch's "
             "intra-op threads on 2 cores; docs/speed.md). 0: the intra-op thread count on a CPU with one "
             "process and no --compile, else 1")
    add("--grad_clip", type=float, default=0.0, help="clip the global gradient norm to this value (0: off)")
    add("--bad_images", type=str, default="stop", choices=("stop", "skip"),
        help="unreadable images in --data_path (every header is read before training starts): stop with their "
             "names, or leave them out (their count and first names go into the first log line)")
    add("--resize", action="store_true",
        help="let --dataset folder images of another size, or grey images for a colour config (and the reverse), "
             "be resized (bilinear, as the paper) and converted to the config's shape; said in the first log line. "
             "The paper's ffhq / afhq / celebahq datasets are resized without it, as in the paper")
    add("--max_nonfinite", type=int, default=10,
        help="stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)")
    add("--weight_cur", type=float, default=None,
        help="the paper's 'curvature regularization weight', which its code parses but never uses: accepted for "
             "its command lines, with a warning that it has no effect")
    add("--num_samples", type=int, default=None,
        help="the paper's 'number of samples to generate', which its training code parses but never uses: "
             "accepted, with a warning that it has no effect (the sample grids show 4 images)")
    add("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------
# Checks before any work: every problem a user can fix is one line.

def check_args(args):
    """Validate the arguments; returns the :class:`ImageRun` they describe (``args`` itself is not changed)."""
    args = argparse.Namespace(**vars(args))   # resolved below
    if args.independent and args.coupling not in (None, "independent"):
        raise UserError(f"--independent contradicts --coupling {args.coupling}; pass only one of them")
    args.coupling = "independent" if args.independent else (args.coupling or "learned")
    args.independent = args.coupling == "independent"
    for name in ("iterations", "batchsize", "N", "save_every", "snapshot_every", "sample_every", "log_every",
                 "max_nonfinite"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("warmup_steps", "ema_after_steps", "num_workers"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    plumbing.check_finite_number(args.learning_rate, "--learning_rate")
    plumbing.check_finite_number(args.weight_prior, "--weight_prior")
    plumbing.check_finite_number(args.grad_clip, "--grad_clip")
    if not args.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    if not args.weight_prior >= 0:
        raise UserError(f"--weight_prior must be >= 0, got {args.weight_prior}")
    plumbing.check_seed(args.seed)
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not args.grad_clip >= 0:
        raise UserError(f"--grad_clip must be >= 0 (0 turns clipping off), got {args.grad_clip}")
    if args.dataset is None:
        raise UserError(f"--dataset is required ({', '.join(DATASETS)})")
    if args.dir is None:
        raise UserError("--dir is required: the output folder, e.g. ./runs/cifar10-beta20/")
    if args.data_path is None and args.dataset in FOLDER_DATASETS and args.dataset != "folder":
        args.data_path = os.path.join(args.data_root, args.dataset)   # the paper's commands name no path
    gpu_ids = dist.parse_gpu_list(args.gpu)
    if not dist.under_launcher():
        dist.check_gpus(gpu_ids)
    world_size, spawn, is_main = dist.launch_layout(gpu_ids)
    if args.batchsize % world_size:
        raise UserError(f"--batchsize {args.batchsize} is global and must divide evenly over {world_size} "
                        f"processes; use a multiple of {world_size}")
    if COUPLINGS[args.coupling].min_batch > args.batchsize // world_size:
        raise UserError(f"--coupling {args.coupling} pairs images and noise within a batch: it needs at least "
                        f"{COUPLINGS[args.coupling].min_batch} images per process")
    plumbing.check_finite_number(args.ot_reg, "--ot_reg")
    if not args.ot_reg > 0:
        raise UserError(f"--ot_reg must be positive, got {args.ot_reg}")
    if args.cpu_shards < 0:
        raise UserError(f"--cpu_shards must be >= 0 (0: automatic), got {args.cpu_shards}")
    device_type = dist.device_type(gpu_ids)
    if args.cpu_shards > 1 and not (device_type == "cpu" and world_size == 1 and not args.compile):
        raise UserError("--cpu_shards above 1 is for training on a CPU in one process without --compile")
    if args.cpu_shards > args.batchsize // world_size:
        raise UserError(f"--cpu_shards {args.cpu_shards} is more than the batch per process "
                        f"({args.batchsize // world_size}); every shard needs at least one image")
    cpu_shards = min(args.cpu_shards or auto_shards(device_type, world_size, args.compile),
                     args.batchsize // world_size)
    amp, amp_reason = resolve_amp(args.amp, "cuda" if device_type == "cuda" else "cpu")
    cpu_fast_path = fast_cpu.choose(device_type, amp, args.compile)

    if args.config_de is None:
        raise UserError("--config_de is required: the flow network's config, e.g. configs/cifar10_de.json")
    config_de = load_config(args.config_de, "--config_de")
    config_en = None
    if args.coupling == "learned":
        if args.config_en is None:
            raise UserError("the learned coupling needs --config_en, the encoder's config (e.g. "
                            "configs/cifar10_en.json); or pass --independent")
        config_en = load_config(args.config_en, "--config_en")
        check_encoder_decoder(config_de, config_en,
                              names=(f"--config_de {args.config_de}", f"--config_en {args.config_en}"))
    check_dataset_config(args.dataset, config_de)
    return ImageRun(options=vars(args), flow_config=config_de, encoder_config=config_en, gpu_ids=tuple(gpu_ids),
                    world_size=world_size, spawn=spawn, is_main=is_main, cpu_shards=cpu_shards, amp=amp,
                    amp_reason=amp_reason, omp_wait_policy=tuple(OMP_WAIT_POLICY),
                    cpu_fast_path=cpu_fast_path)


def check_args_once(args):
    """:func:`check_args`; under torchrun only each node's first process prints a problem (all see the same)."""
    try:
        return check_args(args)
    except UserError:
        if dist.under_launcher() and int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) != 0:
            sys.exit(1)
        raise


def prepare(args):
    """Everything that can fail because of the user's input, before any process group or long work; returns
    (the :class:`ImageRun`, the loaded training state or None).

    --dir is created only once the run can start: a failed start leaves nothing behind."""
    run = check_args_once(args)
    warn = print if run.is_main else (lambda text: None)
    for name in PAPER_ONLY_ARGS:
        if getattr(run, name) is not None:
            warn(f"warning: --{name} has no effect (the paper's script accepts it without using it)")
    for line in unused_option_warnings(run.coupling, vars(args), build_parser().defaults(vars(args))):
        warn(line)
    if run.is_main:
        plumbing.check_can_create(run.dir)
        # One owner per --dir: an existing folder is locked before anything in it is read (released in main);
        # a new one only once the checks below pass, so that a failed start leaves nothing behind.
        if os.path.isdir(run.dir):
            runlock.acquire(run.dir)
    resume_path, state = plumbing.find_resume_state(run.dir, run.resume, warn=warn)
    if state is not None:
        check_resume_state(state, resume_path, run, warn)
    elif run.resume == "auto":
        warn(f"--resume auto: no training state in {run.dir}; starting fresh")
    shape = run.flow_config["img_resolution"], run.flow_config["in_channels"]
    if run.is_main:
        check_output_dir(run, resuming=state is not None)
        # the datasets download here, once, before the workers start
        dataset = build_dataset(run.dataset, *shape, data_path=run.data_path, data_root=run.data_root,
                                bad_images=run.bad_images)
        excluded, summary = check_image_dataset(dataset, run.dataset, *shape, data_path=run.data_path,
                                                data_root=run.data_root, bad_images=run.bad_images,
                                                resize=run.resize, config_name=f"--config_de {run.config_de}")
        run = run.replace(excluded_images=tuple(excluded), data_summary=summary)
        usable = len(dataset) - len(excluded)
        if usable < run.batchsize:
            raise UserError(f"--dataset {run.dataset} has {usable} images, fewer than one global batch "
                            f"(--batchsize {run.batchsize}); lower --batchsize")
        build_dataset(run.dataset, *shape, data_path=run.data_path, data_root=run.data_root, train=False,
                      bad_images=run.bad_images)
        runlock.acquire(run.dir)   # creates --dir if need be (a no-op when already held)
        plumbing.check_writable(run.dir)
    elif run.bad_images == "skip" and run.dataset in FOLDER_DATASETS:
        # another torchrun rank: it must leave out the same images as rank 0, so it reads the headers too
        dataset = build_dataset(run.dataset, *shape, data_path=run.data_path, bad_images="skip", download=False)
        run = run.replace(excluded_images=tuple(name for name, _ in dataset.scan()["bad"]))
    run = run.replace(resume_path=resume_path)
    if run.is_main:
        if state is None:   # a fresh run starts a fresh stats.jsonl
            with atomic_write(os.path.join(run.dir, "stats.jsonl"), "w"):
                pass
        if state is None or state["iter"] < run.iterations:
            # a resume with nothing left to do keeps the record of the run that made the state (the changed
            # options it warned about took no effect)
            save_json(run.record(), os.path.join(run.dir, "config.json"))
    # a spawned worker re-reads the file; in this process the loaded state is handed over as is
    return run, None if run.spawn else state


def worker(info, run, state=None):
    """One rank's training."""
    Trainer(info, run, state).run()


def spawned_worker(info, run, state=None):
    """A worker started by --gpu a,b: its errors are one line on stderr (rank 0) and exit code 1."""
    try:
        with protect_console():   # a closed pipe must not stop the save (utils/console.py)
            worker(info, run, state)
    except Exception as error:  # noqa: BLE001 - the parent only sees the exit code
        if run.debug:
            traceback.print_exc()
        if info.is_main or run.debug:
            kind = "" if isinstance(error, UserError) else f"{type(error).__name__}: "
            first = (str(error).strip().splitlines() or [""])[0]
            print(f"error: {kind}{first}", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    args = parse_args(argv)
    try:
        run, state = prepare(args)
        if not run.spawn:
            dist.launch(worker, list(run.gpu_ids), run, state)
            return
        import torch.multiprocessing as mp
        plumbing.forward_signals_to_children()
        try:
            dist.launch(spawned_worker, list(run.gpu_ids), run)
        except mp.ProcessExitedException:
            sys.exit(1)   # the worker has printed the error
    finally:
        runlock.release(args.dir)


if __name__ == "__main__":
    cli_main(main)
