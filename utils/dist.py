"""Devices and processes: ``--gpu`` parsing, torchrun, one process per listed GPU.

Three ways to run, one code path (nanoGPT's plain DDP recipe):
- no ``--gpu`` and no launcher: one CPU process, no process group;
- ``--gpu 0,1,...`` from a plain ``python`` command: one spawned process per
  listed GPU on this machine (NCCL), on a free port chosen at run time;
- under ``torchrun`` (single or multi node): the launcher's RANK / LOCAL_RANK /
  WORLD_SIZE; GPUs with NCCL when CUDA is present, otherwise CPU with gloo.
Scripts with a ``--device`` option instead of ``--gpu`` (fid.py) start with
:func:`setup_device`. The collectives are no-ops in a single process, and
:func:`fail_together` runs a step so that one rank's error stops them all.
"""
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from utils.errors import AlreadyReported, UserError, first_line, signals_end_blocking_wait


@dataclass
class DistInfo:
    """Where this process runs and who it is."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def parse_gpu_list(spec):
    """``"0,1"`` -> [0, 1]; ``None`` / ``""`` -> []. Bad syntax is a :class:`UserError`."""
    if spec is None or str(spec).strip() == "":
        return []
    try:
        ids = [int(part) for part in str(spec).split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"--gpu must be a comma-separated list of GPU ids like 0 or 0,1; got {spec!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--gpu ids must be distinct and non-negative; got {spec!r}")
    return ids


def check_gpus(ids):
    """Stop with one line when ``--gpu`` names GPUs this machine does not have."""
    if not ids:
        return
    if not torch.cuda.is_available():
        raise UserError(f"--gpu {','.join(map(str, ids))} was given but no CUDA device is available; "
                        f"omit --gpu to run on the CPU")
    count = torch.cuda.device_count()
    missing = [i for i in ids if i >= count]
    if missing:
        raise UserError(f"--gpu names GPU(s) {missing} but this machine has {count} (ids 0..{count - 1})")


def under_launcher():
    """True when started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def free_port():
    """A TCP port that is free right now on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_group(backend, rank, world_size):
    try:
        # waits for every rank: a signal (torchrun's SIGTERM after another rank failed) ends it at once
        with signals_end_blocking_wait():
            torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                          timeout=datetime.timedelta(minutes=30))
    except (RuntimeError, ValueError) as error:
        raise UserError(f"cannot start {backend} with WORLD_SIZE={world_size} ({first_line(error)}); "
                        f"launch with torchrun") from None


def device_type(gpu_ids):
    """'cuda' or 'cpu': the kind of device :func:`setup` gives this process for ``gpu_ids``."""
    return "cuda" if gpu_ids or (under_launcher() and torch.cuda.is_available()) else "cpu"


def setup(gpu_ids, spawn_rank=None):
    """Initialise this process; returns its :class:`DistInfo`.

    ``spawn_rank`` is the index of a process started by :func:`launch` for
    ``--gpu`` lists; under torchrun the environment decides.
    """
    if under_launcher():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if gpu_ids:
            check_gpus(gpu_ids)
            device = torch.device("cuda", gpu_ids[local % len(gpu_ids)])
        elif torch.cuda.is_available():
            device = torch.device("cuda", local % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world > 1:
            _init_group("nccl" if device.type == "cuda" else "gloo", rank, world)
        return DistInfo(rank, world, local, device)
    if spawn_rank is not None:
        device = torch.device("cuda", gpu_ids[spawn_rank])
        torch.cuda.set_device(device)
        _init_group("nccl", spawn_rank, len(gpu_ids))
        return DistInfo(spawn_rank, len(gpu_ids), spawn_rank, device)
    if gpu_ids:
        check_gpus(gpu_ids)
        device = torch.device("cuda", gpu_ids[0])
        torch.cuda.set_device(device)
        return DistInfo(0, 1, 0, device)
    return DistInfo()


def pick_device(name, local_rank=0):
    """The torch device for a ``--device`` choice: auto (CUDA when present), cpu, cuda or cuda:N; a bare
    ``cuda`` is cuda:LOCAL_RANK under torchrun. Selects a CUDA device for this process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no GPU is visible; use --device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank if under_launcher() else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def setup_device(name):
    """Like :func:`setup`, for scripts that take ``--device`` (see :func:`pick_device`) instead of ``--gpu``:
    one process, or one rank of a torchrun job (gloo on CPUs, NCCL on GPUs)."""
    rank, world, local = 0, 1, 0
    if under_launcher():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(name, local)
    if world > 1:
        _init_group("nccl" if device.type == "cuda" else "gloo", rank, world)
    return DistInfo(rank, world, local, device)


def _spawned(index, worker, gpu_ids, port, payload):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = setup(gpu_ids, spawn_rank=index)
    try:
        worker(info, *payload)
        finished()
    finally:
        cleanup()


def launch(worker, gpu_ids, *payload):
    """Run ``worker(info, *payload)`` in this process, or once per GPU for a ``--gpu`` list.

    Checks the GPUs before anything starts. Under torchrun this process is one
    rank and the launcher started the others.
    """
    if not under_launcher():
        check_gpus(gpu_ids)
    if len(gpu_ids) > 1 and not under_launcher():
        import torch.multiprocessing as mp
        mp.spawn(_spawned, args=(worker, gpu_ids, free_port(), payload), nprocs=len(gpu_ids), join=True)
        return
    info = setup(gpu_ids)
    try:
        worker(info, *payload)
        finished()
    finally:
        cleanup()


def finished():
    """After a rank's worker returned normally: wait for the others before the group is torn down, so that no
    rank destroys its process group (and exits) while a peer is still working or communicating (rank 0
    samples and saves after the last step). Not on the error path: a rank that failed skips it, and the
    launcher (torchrun, mp.spawn) stops the others."""
    barrier()


def cleanup():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    """Element-wise maximum over ranks in place (no-op in a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


class PeerFailed(AlreadyReported):
    """Another rank's step failed and that rank printed the error; this one exits quietly."""


def fail_together(step, info, main_only=False):
    """Run ``step()`` (on rank 0 only with ``main_only``) so that a failure stops every rank instead of a hang.

    A rank that raised while the others wait in a collective would hang the job, so
    every rank first says whether its step failed; the lowest failing rank re-raises
    its error (one line for the user), the others raise :class:`PeerFailed`.
    Returns ``step()``'s result (None on the ranks that did not run it).
    """
    result, error = None, None
    if not main_only or info.is_main:
        try:
            result = step()
        except Exception as caught:  # noqa: BLE001 - re-raised below, once the other ranks know
            error = caught
    if not info.distributed:
        if error is not None:
            raise error
        return result
    failed = torch.zeros(info.world_size, dtype=torch.int32, device=info.device)
    failed[info.rank] = int(error is not None)
    failed_ranks = torch.nonzero(all_reduce_sum(failed)).flatten().tolist()
    if not failed_ranks:
        return result
    if error is not None and info.rank == failed_ranks[0]:
        raise error
    raise PeerFailed()


def any_rank(flag, device):
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def default_workers(most=4):
    """DataLoader workers by default: ``most``, or the CPUs this process may use when fewer (PyTorch warns
    about more workers than that)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(most, available))


def physical_cores():
    """Physical CPU cores available to this process (hyper-threads count once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as core, \
                    open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as package:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("0", str(cpu)))
    return max(1, len(cores))


def launch_layout(gpu_ids):
    """(world size, whether this process spawns the workers, whether this process is rank 0)."""
    if under_launcher():
        return int(os.environ["WORLD_SIZE"]), False, int(os.environ["RANK"]) == 0
    return max(1, len(gpu_ids)), len(gpu_ids) > 1, True
