"""Training-loop plumbing: seeding, RNG capture, EMA, optimizer and warmup, data order, signals, logging.

Nothing here knows about flows or U-Nets; ``train_reverse_img_ddp.py`` holds the
loss and the loop. Everything is written for a loop that never waits on the
device between steps: skipping a bad step, counting it and averaging the EMA
are done with tensors, and the host reads them only at log and save steps.
"""
import copy
import glob
import hashlib
import json
import math
import os
import random
import re
import signal
import time

import numpy as np
import torch
import torch.distributed as torch_dist

from utils import runlock
from utils.checkpoint import TRAINING_STATE_FORMAT, upgrade_state
from utils.errors import UserError
from utils.io import append_text, atomic_write, json_line, load_torch

# ----------------------------------------------------------------------------
# Seeds and random states.


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every CUDA device) with one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


SEED_LIMIT = 2**32   # |--seed| below this: every seed derived from it (ranks, epochs, items) fits torch's 64 bits


def check_seed(seed, option="--seed"):
    """A seed the scripts can use: an integer with ``|seed| < 2**32`` (negative seeds are fine)."""
    if not -SEED_LIMIT < seed < SEED_LIMIT:
        raise UserError(f"{option} must be an integer between -{SEED_LIMIT - 1} and {SEED_LIMIT - 1}, got {seed}")


def check_finite_number(value, option):
    """A float option must be a finite number (``inf`` and ``nan`` parse as floats)."""
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}")


def all_finite(tensors):
    """Whether every floating-point tensor in ``tensors`` holds only finite values: one reduction on their
    device and one host read, cheap enough before every save."""
    flags = [torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def first_nonfinite(state_dict):
    """The first key of ``state_dict`` whose tensor holds inf or NaN, or None."""
    for key, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def rank_seed(seed, rank):
    """The seed of one rank's training noise: ranks must draw different t, z and dropout masks."""
    return seed + 1_000_003 * (rank + 1)


def capture_rng_state(device):
    """This process's random states (torch CPU, the CUDA ``device``, numpy, python), as loadable plain data."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's key array is stored as a tensor: files stay loadable with weights_only=True
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng_state(state, device):
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_objects(obj):
    """A list holding ``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def state_checksum(state_dicts):
    """SHA-256 (hex, 16 digits) over the bytes of every tensor of the given state dicts, keys sorted.

    Two processes holding bitwise-identical weights get the same checksum.
    """
    digest = hashlib.sha256()
    for state_dict in state_dicts:
        for key in sorted(state_dict):
            tensor = state_dict[key].detach().to("cpu", torch.float32).contiguous()
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------
# Optimizer, learning rate, EMA.

def build_optimizer(params, name, learning_rate):
    """The paper's optimizers. ``fused`` so that a step can be skipped on the device (``found_inf``).

    adam: betas (0.9, 0.999), eps 1e-8; adamw: weight decay 0.1, betas (0.9, 0.9999).
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.1, betas=(0.9, 0.9999), fused=True)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, adamw")


def warmup_lr(learning_rate, iteration, warmup_steps):
    """Linear warmup: ``learning_rate * min(iteration / warmup_steps, 1)`` (iterations count from 1)."""
    if warmup_steps <= 0:
        return learning_rate
    return learning_rate * min(iteration / warmup_steps, 1.0)


def gradient_norm(params):
    """The global L2 norm of the parameters' gradients, as a device tensor (no host sync)."""
    norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
    return torch.linalg.vector_norm(torch.stack(norms))


def step_or_stop(optimizer, option):
    """``optimizer.step()``; an update too large for float32 (torch's Adam turns ``lr / (1 - beta1^t)`` into a
    float32 scalar, and a learning rate near 1e38 overflows it) stops the run in one line naming ``option``.
    Nothing is saved after it: the weights were not all updated."""
    try:
        optimizer.step()
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        rate = optimizer.param_groups[0]["lr"]
        raise UserError(f"the optimizer's update overflows float32 (learning rate {rate:g}); lower {option}; "
                        f"nothing of this step was saved") from None


def optimizer_step(optimizer, skip):
    """``optimizer.step()`` that leaves parameters and moments untouched where ``skip`` (a 0-dim float
    tensor on the device, 1 = skip) is set, without the host reading it (fused Adam's ``found_inf``)."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class EMA:
    """Exponential moving average of a module's parameters, in float32 (buffers are copied).

    As in the paper's code, averaging starts after ``start_after`` steps: until step
    ``start_after + 1`` the average is the weights themselves, then
    ``ema <- decay * ema + (1 - decay) * weights`` each step.
    """

    def __init__(self, module, decay=0.9999, start_after=1):
        self.decay, self.start_after = decay, start_after
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module, step, keep):
        """Average in ``module``'s weights after optimizer step ``step``; ``keep`` (0-dim float tensor)
        is 0 for a skipped step, which leaves the average unchanged."""
        weight = keep if step <= self.start_after + 1 else keep * (1.0 - self.decay)
        averaged = list(self.module.parameters())
        current = [p.detach().float() for p in module.parameters()]
        differences = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(differences, weight)
        torch._foreach_add_(averaged, differences)
        for mine, theirs in zip(self.module.buffers(), module.buffers()):
            mine.copy_(theirs)


# ----------------------------------------------------------------------------
# Data order that a resumed run can continue exactly.

class ResumableBatchSampler(torch.utils.data.Sampler):
    """Per-rank batches of a seeded shuffle that restart at any (epoch, step).

    Epoch ``e`` shuffles the dataset with a generator seeded by (seed, e); global
    batch ``s`` is ``perm[s * G:(s + 1) * G]`` and rank ``r`` takes its ``r``-th
    slice of ``G / world_size`` images. So the global batches depend only on the
    seed and the global batch size, never on the number of processes. Each item
    comes with its own seed (see :class:`SeededItems`), so random augmentation is
    the same whichever worker loads it. The tail of each epoch (fewer than G
    images) is dropped.
    """

    def __init__(self, dataset_size, global_batch, rank, world_size, seed):
        self.dataset_size, self.global_batch = dataset_size, global_batch
        self.rank, self.per_rank = rank, global_batch // world_size
        self.seed = seed
        self.steps_per_epoch = dataset_size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch, step):
        self.epoch, self.start_step = epoch, step

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * self.per_rank
            yield [(order[position], self._item_seed(position)) for position in range(first, first + self.per_rank)]

    def _item_seed(self, position):
        """The seed of the item at ``position`` of this epoch's order."""
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + position) % 2**63


class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is loaded with the CPU generator seeded by ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class DataStream:
    """Endless batches from a :class:`ResumableBatchSampler`; its position is the number of global
    batches consumed, which :meth:`state_dict` records and ``batches_consumed`` restores."""

    def __init__(self, dataset, sampler, num_workers, pin_memory, batches_consumed=0):
        self.sampler = sampler
        # Its own generator: a DataLoader draws a seed from it for every new iterator, which must not
        # shift the global random stream (a resumed run starts an extra iterator mid-epoch).
        generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.rank)
        self.loader = torch.utils.data.DataLoader(
            SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0, generator=generator)
        self.batches_consumed = batches_consumed
        self.iterator = None

    @property
    def epoch(self):
        return self.batches_consumed // self.sampler.steps_per_epoch

    def next(self):
        """The next batch ``(images, indices)`` of this rank."""
        while True:
            if self.iterator is None:
                self.sampler.set_position(*divmod(self.batches_consumed, self.sampler.steps_per_epoch))
                self.iterator = iter(self.loader)
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.iterator = None
                continue
            self.batches_consumed += 1
            return batch

    def state_dict(self):
        epoch, step = divmod(self.batches_consumed, self.sampler.steps_per_epoch)
        return {"batches_consumed": self.batches_consumed, "epoch": epoch, "step_in_epoch": step,
                "steps_per_epoch": self.sampler.steps_per_epoch, "global_batch": self.sampler.global_batch,
                "dataset_size": self.sampler.dataset_size, "seed": self.sampler.seed}


# ----------------------------------------------------------------------------
# Stopping: signals and agreement between ranks.

class StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks at step boundaries (restores handlers on exit).

    A second signal is handled as if this object were not there (e.g. Ctrl-C twice ends a stuck step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handle(self, number, frame):
        if self.received is not None:   # a second signal: stop now, the usual way
            signal.signal(number, self._previous[number])
            signal.raise_signal(number)
            return
        self.received = signal.Signals(number).name

    def __enter__(self):
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


class RankAgreement:
    """``any(flag)``: true on every rank when true on one. Uses a CPU (gloo) group, so asking at every
    step never waits for the GPU; with NCCL as the main backend a gloo side group is created."""

    def __init__(self, distributed):
        self.group = None
        self.distributed = distributed
        if distributed and torch_dist.get_backend() != "gloo":
            self.group = torch_dist.new_group(backend="gloo")

    def any(self, flag):
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0])
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM, group=self.group)
        return bool(value.item() > 0)


def forward_signals_to_children():
    """In a parent that spawned workers: pass SIGTERM / SIGINT on to them, so they save and stop."""
    import multiprocessing

    def forward(number, frame):
        for child in multiprocessing.active_children():
            if child.pid is not None:
                try:
                    os.kill(child.pid, number)
                except ProcessLookupError:
                    pass

    for number in StopSignals.SIGNALS:
        signal.signal(number, forward)


# ----------------------------------------------------------------------------
# Finding the state to resume from.

LATEST_NAME = "training_state_latest.pth"
NUMBERED_PATTERN = re.compile(r"training_state_(\d+)\.pth$")


def numbered_states(folder):
    """``training_state_{i}.pth`` files in ``folder``, newest (largest i) first."""
    found = []
    for path in glob.glob(os.path.join(folder, "training_state_*.pth")):
        match = NUMBERED_PATTERN.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def load_training_state(path, what="--resume"):
    """Load a training state file; a truncated, corrupt or foreign file is one :class:`UserError` line."""
    state = upgrade_state(load_torch(path, what=f"{what} training state"))
    if not isinstance(state, dict) or "iter" not in state or "model_state_dict" not in state:
        raise UserError(f"{what} {path} is not a training state (no 'iter' / 'model_state_dict'); "
                        f"give a training_state_*.pth file")
    if state.get("format") not in (None, TRAINING_STATE_FORMAT):
        raise UserError(f"{what} {path} has unknown format {state.get('format')!r}; "
                        f"expected {TRAINING_STATE_FORMAT!r}")
    return state


def find_resume_state(folder, resume, warn=print):
    """``(path, state)`` to resume from, or ``(None, None)`` to start fresh.

    ``resume`` is None (fresh), a file, or ``"auto"``: ``training_state_latest.pth``
    in ``folder`` when it exists; when it is unreadable, the newest intact
    ``training_state_{i}.pth`` (with a warning); no state at all starts fresh.
    """
    if resume is None:
        return None, None
    if resume != "auto":
        if os.path.isdir(resume):
            raise UserError(f"--resume {resume} is a folder; give a training_state_*.pth file, or --resume auto "
                            f"to continue the run in --dir")
        return resume, load_training_state(resume)
    latest = os.path.join(folder, LATEST_NAME)
    candidates = ([latest] if os.path.exists(latest) else []) + numbered_states(folder)
    problems = []
    for path in candidates:
        try:
            state = load_training_state(path, what="--resume auto:")
        except UserError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            problem = problem.removesuffix("; use another file")   # the fallback is that other file
            warn(f"warning: {problem}; falling back to {path}")
        return path, state
    if problems:
        raise UserError(f"--resume auto: no intact training state in {folder} ({problems[0]}); "
                        f"remove the broken files to start fresh")
    return None, None


# ----------------------------------------------------------------------------
# Logging.

class RunLog:
    """Rank 0's records: ``log.txt`` (human lines), ``stats.jsonl`` (one JSON object per line) and,
    when installed, TensorBoard scalars and sample grids. Other ranks get a log that writes nothing."""

    def __init__(self, folder, enabled, echo=print):
        self.enabled, self.echo = enabled, echo
        self.folder = folder
        self.writer = None
        if enabled:
            self.writer = _tensorboard_writer(folder)

    def line(self, text):
        if not self.enabled:
            return
        # the file first: the console may be a pipe that is gone (utils/console.py)
        append_text(os.path.join(self.folder, "log.txt"), f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.echo(text)

    def stats(self, record):
        if not self.enabled:
            return
        append_text(os.path.join(self.folder, "stats.jsonl"), json_line(record))
        if self.writer is not None:
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["iter"])

    def images(self, grids, iteration):
        """TensorBoard images (when installed): ``grids`` maps a name to a uint8 [H, W, C] array."""
        if not self.enabled or self.writer is None:
            return
        for name, array in grids.items():
            self.writer.add_image(f"samples/{name}", array, iteration, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder):
    """A TensorBoard SummaryWriter when ``tensorboard`` (or ``tensorboardX``) is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(log_dir=folder)


def check_can_create(folder):
    """Stop with one line, creating nothing, when ``folder`` could not be made or written: it is not a
    folder, or its nearest existing parent is not writable. (:func:`check_writable` makes it later.)"""
    runlock.check_is_folder(folder)
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder --dir {folder} is not writable ({existing} cannot be written); "
                        f"choose another --dir")


def check_writable(folder):
    """Create ``folder`` and write a probe file in it; any failure is one :class:`UserError` line."""
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, ".write_probe")):
            pass
        os.unlink(os.path.join(folder, ".write_probe"))
    except OSError as error:
        raise UserError(f"output folder --dir {folder} is not writable ({error.strerror or error}); "
                        f"choose another --dir") from None


def truncate_stats(folder, iteration):
    """Keep only the stats.jsonl records up to ``iteration``: the resumed run redoes the later ones."""
    path = os.path.join(folder, "stats.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = [line for line in lines if record_iteration(line) <= iteration]
    if len(kept) != len(lines):
        with atomic_write(path, "w") as handle:
            handle.writelines(kept)


def record_iteration(line):
    """The ``iter`` of one stats.jsonl line; infinity for a line cut short by a kill (so it is dropped)."""
    try:
        return int(json.loads(line)["iter"])
    except (ValueError, KeyError, TypeError):
        return math.inf
