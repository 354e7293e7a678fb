"""One-step distillation (the paper's) and reflow, from the (z, x) pairs that ``generate.py --save_z`` writes.

Pairs: image k is ``--im_dir``/k.png (x, the teacher's sample) and its starting
noise is ``--z_dir``/k.npy (z, float32 [C, H, W]); they are matched by the index
in the file name. generate.py writes ``u8 = clip(floor(x * 127.5 + 128), 0, 255)``,
which for x in [-1, 1] is the integer nearest to 127.5 (x + 1) (halves round up);
the exact inverse up to that rounding is ``x = (u8 - 127.5) / 127.5``, within
0.5 / 127.5 = 1/255 of the sampled x (the paper's ToTensor + Normalize(0.5, 0.5)).

Modes (the student always starts from the teacher's weights, --ckpt):

- ``distill`` (the paper's): learn x = z - v(z, 1), one step, with
  loss = mean((z - v(z, 1) - x)^2) over all elements (the paper's MSE on images).
- ``reflow`` (Liu et al.'s k-rectified flow): train a new flow on the same pairs
  with the flow-matching loss along the straight line from x to z: t ~ U(1e-5, 1),
  z_t = t z + (1 - t) x, target z - x. It is a normal flow: sample it with any solver.

The test loss is the mean squared error, over all elements of the --im_dir_test /
--z_dir_test pairs, between x and the student's Euler sample from z with --N
steps (1 in distill mode: z - v(z, 1)). It is evaluated before the first step
(the teacher's error), every --eval_every iterations and at the end.

Writes into --dir: config.json, log.txt, stats.jsonl (iter, loss, test_loss),
pred_{i}.png (a grid of the student's samples from fixed noise, at each test),
flow_model_distilled_{i}.pth or flow_model_reflow_{i}.pth (plain state dicts,
every --save_every and at the last iteration) and training_state_latest.pth
(student, optimizer, iteration, data position, random states; also on SIGTERM /
SIGINT). ``--resume auto`` continues from it.

    python distill.py --gpu 0 --config_de ./configs/mnist_de.json --dir test --im_dir gen/samples \
        --im_dir_test gen_test/samples --z_dir gen/zs --z_dir_test gen_test/zs --batchsize 256 \
        --ckpt runs/mnist-beta20/flow_model_60000_ema.pth
"""
import os
import re

from utils.errors import exit_cleanly_on_signals
from utils.threads import choose_omp_wait_policy

if __name__ == "__main__":
    exit_cleanly_on_signals()   # a signal during the imports and checks below is one line, not a traceback

# Before torch is imported (libgomp reads it once): PASSIVE when other jobs keep the CPUs busy, libgomp's
# default otherwise, unless OMP_WAIT_POLICY is already set (utils/threads.py, docs/speed.md).
OMP_WAIT_POLICY = choose_omp_wait_policy()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import build_network, fast_cpu, load_config  # noqa: E402
from models.config import resolve_image_options  # noqa: E402
from utils import dist  # noqa: E402
from utils import rundir, runlock  # noqa: E402
from utils import train as plumbing  # noqa: E402
from utils.amp import AMP_CHOICES, AMP_HELP, resolve_amp  # noqa: E402
from utils.checkpoint import load_weights  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from training.pairs import ADAM_BETAS, ADAM_EPS, PairTrainer  # noqa: E402
from utils.imagefiles import image_problem, is_image_name, no_images, open_image, to_pixels  # noqa: E402
from utils.io import load_state_dict_strict, not_found  # noqa: E402

MODES = ("distill", "reflow")
IMAGE_FIX = "regenerate or remove it"
IMAGE_MODES = {1: "L", 3: "RGB"}          # PIL mode of the images for each channel count


# ----------------------------------------------------------------------------
# Arguments.

def build_parser():
    parser = ArgumentParser("distill.py",
        description="Distil a trained flow into a one-step generator (--mode distill, the paper's), or train a "
                    "reflow (--mode reflow), from the (z, x) pairs that generate.py --save_z writes.")
    add = parser.add_argument
    add("--gpu", type=str, default=None, help="one GPU id (e.g. 0); omit to run on the CPU")
    add("--dir", type=str, default=None, help="output folder (created if missing)")
    add("--im_dir", type=str, default=None, help="training images x: the samples/ folder of a generate.py run")
    add("--z_dir", type=str, default=None,
        help="starting noise z of those images: the zs/ folder of the same run (generate.py --save_z)")
    add("--im_dir_test", type=str, default=None,
        help="test images: samples/ of another generate.py run (another --seed range, so no overlap)")
    add("--z_dir_test", type=str, default=None, help="zs/ of that test run")
    add("--ckpt", type=str, default=None,
        help="the teacher flow's weights, where the student starts: flow_model_*_ema.pth, a training state "
             "(its EMA weights) or a run folder (its newest EMA file); not needed to resume")
    add("--config_de", type=str, default=None, help="the flow network's config (.json), as for the teacher")
    add("--mode", type=str, default="distill", choices=MODES,
        help="distill: learn x = z - v(z, 1) (MSE); reflow: flow matching along the straight line from x to z")
    add("--iterations", type=int, default=100000, help="last training iteration (steps are numbered from 1)")
    add("--batchsize", type=int, default=8, help="batch size (the paper's default; its README uses 256)")
    add("--learning_rate", type=float, default=3e-5,
        help=f"Adam learning rate (betas {ADAM_BETAS}, eps {ADAM_EPS}, as the paper's distill.py)")
    add("--res", type=int, default=None,
        help="image resolution; must equal img_resolution of --config_de [default: the config's]")
    add("--input_nc", type=int, default=None,
        help="image channels (1 or 3); must equal in_channels of --config_de [default: the config's]")
    add("--N", type=int, default=1,
        help="Euler steps of the test loss and sample grids; must be 1 in distill mode (the student is one-step)")
    add("--seed", type=int, default=0, help="seed of the data order, the training noise and the grid's fixed noise")
    add("--amp", choices=AMP_CHOICES, default="auto", help=AMP_HELP)
    add("--num_workers", type=int, default=dist.default_workers(),
        help="DataLoader worker processes (0: load in the loop); the default is 4, or the CPUs this process may "
             "use when there are fewer")
    add("--log_every", type=int, default=100, help="write a stats.jsonl / log.txt record every this many iterations")
    add("--eval_every", type=int, default=1000,
        help="compute the test loss and write pred_{i}.png every this many iterations")
    add("--save_every", type=int, default=10000,
        help="write flow_model_{distilled,reflow}_{i}.pth and training_state_latest.pth every this many "
             "iterations (and at the last one)")
    add("--resume", type=str, default=None,
        help="a training_state_latest.pth to continue from, or 'auto': --dir/training_state_latest.pth when it "
             "exists, otherwise start fresh")
    add("--config_en", type=str, default=None,
        help="the paper's distill.py accepts an encoder config but never uses it: accepted here too, with a "
             "warning that it has no effect (the student is the flow network alone)")
    add("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------
# Pairs: image k and noise k, matched by the index in their file names.

def file_index(name):
    """The index in a file name: the digits that end its stem (``00042.png`` -> ``"00042"``), or None."""
    match = re.search(r"(\d+)$", os.path.splitext(os.path.basename(name))[0])
    return match.group(1) if match else None


def _listing(folder, option):
    if folder is None:
        raise UserError(f"{option} is required (a folder written by generate.py --save_z)")
    if not os.path.isdir(folder):
        raise UserError(not_found(folder, f"{option} folder", kind="folder"))
    return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))


def match_pairs(im_dir, z_dir, options=("--im_dir", "--z_dir")):
    """``[(image path, z path)]`` sorted by index; every image must have exactly one z with its index."""
    images = [name for name in _listing(im_dir, options[0]) if is_image_name(name)]
    if not images:
        raise no_images(f"{options[0]} {im_dir}", "give the samples/ folder of a generate.py run")
    zs = {}
    for name in _listing(z_dir, options[1]):
        if name.endswith(".npy") and file_index(name) is not None:
            index = int(file_index(name))
            if index in zs:
                raise UserError(f"{options[1]} {z_dir} holds two z files with index {index}: {zs[index]} and {name}")
            zs[index] = name
    pairs, seen = [], {}
    for name in images:
        digits = file_index(name)
        if digits is None:
            raise UserError(f"image {os.path.join(im_dir, name)} has no index in its name (expected e.g. "
                            f"00042.png, paired with 00042.npy); move it out of {options[0]}")
        index = int(digits)
        if index in seen:
            raise UserError(f"{options[0]} {im_dir} holds two images with index {index}: {seen[index]} and {name}")
        seen[index] = name
        if index not in zs:
            raise UserError(f"image {os.path.join(im_dir, name)} has no partner z: expected "
                            f"{os.path.join(z_dir, digits + '.npy')} ({options[1]}); generate the pairs with "
                            f"generate.py --save_z, or remove the image")
        pairs.append((index, os.path.join(im_dir, name), os.path.join(z_dir, zs[index])))
    return [(image, z) for _, image, z in sorted(pairs)]


def _image_problem(image, path, resolution, channels):
    # one channel: any image is converted to grey, as the paper's loader does (its generate.py saves RGB PNGs)
    return image_problem(image, path, size=(resolution, resolution), modes=("RGB",) if channels == 3 else None,
                         size_fix="check --config_de / --res", mode_fix="check --config_de / --input_nc")


def _load_z(path, mmap_mode=None):
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"unreadable z file {path} ({str(error).splitlines()[0][:100]}); regenerate or remove it") \
            from None
    return array


def _z_problem(array, path, shape):
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        return f"z file {path} does not hold a float array"
    if tuple(array.shape) != shape:
        return f"z file {path} has shape {tuple(array.shape)}, expected {shape} [C, H, W]; check --config_de"
    return None


def read_image(path, resolution, channels):
    """One image as float [C, H, W] in [-1, 1]: x = (u8 - 127.5) / 127.5 (the paper's ToTensor + Normalize(0.5,
    0.5), not the datasets' u8 / 127.5 - 1, which differs in the last bit). For one channel, an RGB (or other)
    image is first converted to grey with PIL's convert("L"), as the paper's DatasetWithLatent."""
    with open_image(path, fix=IMAGE_FIX) as image:
        problem = _image_problem(image, path, resolution, channels)
        if problem:
            raise UserError(problem)
        pixels = to_pixels(image, channels)
    return (torch.from_numpy(pixels.copy()).float() - 127.5) / 127.5


# The largest |z| a pair may hold. Starting noises are N(0, I) draws (a draw above 10 has probability 1e-23) or
# the encoder's latents (pulled toward N(0, I) by the KL term); 1e4 leaves room for any of them while a value
# that would overflow the squared error in float32 (about 1e19) stops with the file's name.
Z_LIMIT = 1e4


def read_z(path, shape):
    """One starting noise as float32 [C, H, W]."""
    array = _load_z(path)
    problem = _z_problem(array, path, shape)
    if problem:
        raise UserError(problem)
    if not np.isfinite(array).all():   # read here, once per use: the start-up check reads only the headers
        raise UserError(f"z file {path} holds inf or NaN; regenerate it (generate.py --save_z) or remove the pair")
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > Z_LIMIT:   # would overflow the loss, which would then look like a learning-rate problem
        raise UserError(f"z file {path} holds a value of size {largest:.3g}, not a starting noise (standard normal "
                        f"draws, or the encoder's latents, are a few units; the limit is {Z_LIMIT:g}); regenerate "
                        f"it (generate.py --save_z) or remove the pair")
    return torch.from_numpy(array.astype(np.float32))


class PairDataset(torch.utils.data.Dataset):
    """Item i is ``(x, z)``: image i in [-1, 1] [C, H, W] and its starting noise [C, H, W], by index order.

    Construction checks every file's header (image size and mode, z shape and
    dtype), so a wrong folder or config stops before training starts.
    """

    def __init__(self, im_dir, z_dir, resolution, channels, options=("--im_dir", "--z_dir")):
        self.pairs = match_pairs(im_dir, z_dir, options)
        self.resolution, self.channels = resolution, channels
        shape = (channels, resolution, resolution)
        for image_path, z_path in self.pairs:
            with open_image(image_path, fix=IMAGE_FIX) as image:
                problem = _image_problem(image, image_path, resolution, channels)
            problem = problem or _z_problem(_load_z(z_path, mmap_mode="r"), z_path, shape)
            if problem:
                raise UserError(problem)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, z_path = self.pairs[index]
        shape = (self.channels, self.resolution, self.resolution)
        return read_image(image_path, self.resolution, self.channels), read_z(z_path, shape)


# ----------------------------------------------------------------------------
# Checks before any work: every problem a user can fix is one line.

def check_args(args):
    """Validate ``args`` (filling --res / --input_nc); returns the plan: device, config, the checked pairs,
    the state to resume and the student's weights. Builds no network (:func:`load_student` does)."""
    for option in ("iterations", "batchsize", "log_every", "eval_every", "save_every", "N"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option} must be at least 1, got {getattr(args, option)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    plumbing.check_finite_number(args.learning_rate, "--learning_rate")
    if not args.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    plumbing.check_seed(args.seed)
    if args.mode == "distill" and args.N != 1:
        raise UserError(f"--mode distill trains a one-step student, so --N must be 1 (got {args.N}); "
                        f"--N is for --mode reflow")
    if args.dir is None:
        raise UserError("--dir is required: the output folder")
    runlock.check_folder_name(args.dir)
    rundir.check_apart(args.dir, {option: getattr(args, option.lstrip("-"))
                                  for option in ("--im_dir", "--z_dir", "--im_dir_test", "--z_dir_test")})
    if os.path.isdir(args.dir):
        # One owner per --dir, before anything in it is read (released in main). A folder that does not
        # exist yet is created, and locked, only once the inputs are checked (main).
        runlock.acquire(args.dir)
    gpu_ids = dist.parse_gpu_list(args.gpu)
    if len(gpu_ids) > 1:
        raise UserError(f"distill.py runs in one process on one GPU; give one id, e.g. --gpu {gpu_ids[0]}")
    dist.check_gpus(gpu_ids)
    device = torch.device("cuda", gpu_ids[0]) if gpu_ids else torch.device("cpu")

    if args.config_de is None:
        raise UserError("--config_de is required: the teacher flow's config, e.g. configs/mnist_de.json")
    config = load_config(args.config_de, "--config_de")
    resolve_image_options(args, config, args.config_de)
    if args.input_nc not in IMAGE_MODES:
        raise UserError(f"distill.py reads grayscale or RGB images (1 or 3 channels); --config_de "
                        f"{args.config_de} has in_channels = {args.input_nc}")
    if config["out_channels"] != config["in_channels"]:
        raise UserError(f"--config_de {args.config_de}: a flow network needs out_channels = in_channels")

    # The student's weights: the teacher's, or those of the state to resume (built by load_student).
    state_path, state = find_state(args)
    if state is not None:
        check_state(state, state_path, args, config)
        weights, weights_path, teacher_path = state["model_state_dict"], state_path, state["teacher"]
    elif args.ckpt is None:
        raise UserError("--ckpt is required: the teacher flow's weights (e.g. runs/mnist-beta20/"
                        "flow_model_60000_ema.pth), where the student starts")
    else:
        weights, teacher_path = load_weights(args.ckpt, "flow")
        weights_path = teacher_path

    train_set = PairDataset(args.im_dir, args.z_dir, args.res, args.input_nc, ("--im_dir", "--z_dir"))
    test_set = PairDataset(args.im_dir_test, args.z_dir_test, args.res, args.input_nc,
                           ("--im_dir_test", "--z_dir_test"))
    if len(train_set) < args.batchsize:
        raise UserError(f"--im_dir {args.im_dir} has {len(train_set)} pairs, fewer than one batch "
                        f"(--batchsize {args.batchsize}); lower --batchsize or generate more pairs")
    amp, amp_reason = resolve_amp(args.amp, device)
    warnings = []
    if state is not None:
        line = rundir.resume_changes(state.get("args") or {}, vars(args), RESUME_WARN_ARGS, amp, amp_reason)
        warnings += [line] if line else []
    if args.config_en is not None:
        warnings.append("warning: --config_en has no effect (the paper's distill.py accepts it without using it)")
    shape = (args.input_nc, args.res, args.res)
    if torch.equal(read_z(train_set.pairs[0][1], shape), read_z(test_set.pairs[0][1], shape)):
        warnings.append(f"warning: the first test pair starts from the same z as the first training pair "
                        f"({test_set.pairs[0][1]}): were both sets generated with the same --seed? The test loss "
                        f"is then not measured on unseen pairs")
    return {"device": device, "amp": amp, "amp_reason": amp_reason, "config": config, "train_set": train_set,
            "cpu_fast_path": fast_cpu.choose(device.type, amp),
            "test_set": test_set, "weights": (weights, weights_path), "teacher_path": teacher_path,
            "state_path": state_path, "state": state, "warnings": warnings}


def load_student(args, plan):
    """The student network with the weights the checks found (the teacher's, or the state's)."""
    student = build_network(plan["config"], name=f"--config_de {args.config_de}")
    weights, path = plan.pop("weights")
    load_state_dict_strict(student, weights, path, what="--resume" if plan["state"] is not None else "--ckpt")
    return student


def find_state(args):
    """``(path, state)`` to resume from, or ``(None, None)``; a folder already holding a run needs --resume."""
    existing = rundir.existing_outputs(args.dir, (plumbing.LATEST_NAME, "flow_model_distilled_*.pth",
                                                  "flow_model_reflow_*.pth"))
    names = [os.path.basename(path) for path in existing]
    if args.resume is None and existing:
        found = plumbing.LATEST_NAME if plumbing.LATEST_NAME in names else names[-1]
        raise UserError(f"--dir {args.dir} already holds a run ({found}); pass --resume auto to continue it, "
                        f"or choose another --dir")
    path, state = plumbing.find_resume_state(args.dir, args.resume, warn=lambda text: None)
    if args.resume == "auto" and state is None and existing:
        # weights without a state to continue from (a save that failed, a removed broken state): starting
        # afresh would overwrite them
        raise UserError(f"--resume auto: --dir {args.dir} holds {names[-1]} but no {plumbing.LATEST_NAME} to continue "
                        f"from; choose another --dir (or move those files away to start afresh there)")
    return path, state


# The options a resumed run may change, with a warning in the log: they change what the rest of the run computes.
RESUME_WARN_ARGS = ("learning_rate", "batchsize", "seed", "amp")


def check_state(state, path, args, config):
    """The state must be of this mode and network config; other changed arguments only warn (in the log)."""
    task = state.get("task", "flow")
    if task not in MODES:
        raise UserError(f"--resume {path} is an image flow training state (train_reverse_img_ddp.py), not a "
                        f"distill.py one; give the distill run's {plumbing.LATEST_NAME} or another --dir")
    if task != args.mode:
        raise UserError(f"--resume {path} is a --mode {task} run, not {args.mode}; use the same mode "
                        f"or another --dir")
    if state["config_de"] != config:
        keys = sorted(k for k in set(state["config_de"]) | set(config) if state["config_de"].get(k) != config.get(k))
        raise UserError(f"--resume {path} was trained with a different --config_de (key {keys[0]!r}: "
                        f"{state['config_de'].get(keys[0])!r} in the state vs {config.get(keys[0])!r}); give the "
                        f"run's own config or choose another --dir")


def main(argv=None):
    args = parse_args(argv)
    try:
        plan = check_args(args)
        plan["student"] = load_student(args, plan)
        runlock.acquire(args.dir)
        plumbing.check_writable(args.dir)
        PairTrainer(args, plan).run()
    finally:
        runlock.release(args.dir)


if __name__ == "__main__":
    cli_main(main)
