"""Data parallelism over threads for training steps on a CPU.

PyTorch parallelises a CPU training step inside each operation (OpenMP "intra-op" threads): every one of
the thousands of operations of a U-Net step forks and joins its threads, the small ones (GroupNorm,
SiLU, dropout, additions) scale poorly, and the threads that wait between operations spin. Splitting
the batch instead, into one shard per core, and running each shard's forward and backward in its own
thread with one intra-op thread, keeps every core on its own shard from the first operation to the
last, with no synchronisation until the gradients are added. PyTorch releases the GIL inside its
operations, so the threads run concurrently. On this project's 2-core machine the training step of
``configs/mnist_de.json`` at batch 32 got 11-18% faster (docs/speed.md).

The result is the same computation: the losses of the paper's training (flow-matching MSE and the KL
term) are means of per-sample terms, so the full batch's gradient is the shard gradients weighted by
shard size. The shard gradients are added in a fixed order, and each shard's dropout draws from its own
generator, seeded from the global generator in the calling thread (so a run is reproducible, and a
resumed run, which restores the global generator, continues the same random streams).
"""
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_local = threading.local()


def thread_generator():
    """The generator this thread's CPU dropout masks draw from (None: the global one); ``models.songunet.dropout``
    asks for it at every mask."""
    return getattr(_local, "generator", None)


@contextlib.contextmanager
def dropout_generator(generator):
    """In this thread, the CPU dropout masks of ``models.songunet.dropout`` draw from ``generator`` instead of
    the global generator (the shards run in threads: each needs its own reproducible stream). Outside such a
    block, and in other threads, the masks draw from the global generator as before."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield generator
    finally:
        _local.generator = previous


def auto_shards(device, world_size=1, compiled=False):
    """How many shards a training step should use: the intra-op thread count on a CPU in a single
    process, else 1 (GPUs parallelise within operations; several processes (DDP) already split the cores;
    ``torch.compile`` fuses the small operations that make intra-op threading slow)."""
    if torch.device(device).type != "cpu" or world_size > 1 or compiled:
        return 1
    return max(1, torch.get_num_threads())


def _one_intra_op_thread():
    """One intra-op thread in a shard's thread. Checked at every call: a torch.set_num_threads in the calling
    thread can reach threads that already set theirs."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def shard_sizes(batch, shards):
    """``shards`` sizes that add up to ``batch``, as equal as possible (the first ones larger)."""
    if batch < 1 or shards < 1:
        raise ValueError(f"need a batch and a shard count of at least 1, got batch {batch}, shards {shards}")
    shards = min(shards, batch)
    return [batch // shards + (1 if index < batch % shards else 0) for index in range(shards)]


class ThreadShards:
    """Runs a loss function on shards of a batch in ``shards`` threads and sets the parameters' gradients.

    ``step(loss_fn, tensors, params)``: ``tensors`` share their first (batch) dimension; ``loss_fn(*shard)``
    returns a tuple of 0-dim tensors whose first element is the loss to differentiate, each a mean over the
    shard's samples. Sets ``p.grad`` of every parameter to the full batch's gradient (``None`` for
    parameters the loss does not use) and returns the full batch's values of the tuple (detached).
    ``context`` (optional) is called in each thread to give a context manager the shard runs under:
    autocast and grad mode are per thread in PyTorch, so ``torch.autocast`` must be entered there.
    """

    def __init__(self, shards):
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self.shards = shards
        self.pool = None
        if shards > 1:
            self.pool = ThreadPoolExecutor(shards, thread_name_prefix="shard")

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def step(self, loss_fn, tensors, params, context=None):
        params = list(params)
        batch = tensors[0].shape[0]
        sizes = shard_sizes(batch, self.shards)
        weights = [size / batch for size in sizes]
        pieces = list(zip(*(torch.split(tensor, sizes) for tensor in tensors)))
        # One dropout seed per shard, drawn here (the calling thread) from the global generator.
        seeds = torch.randint(0, 2 ** 62, (len(sizes),)).tolist()

        def run(index):
            generator = torch.Generator(device=tensors[0].device).manual_seed(seeds[index])
            with dropout_generator(generator), (context() if context is not None else contextlib.nullcontext()):
                values = loss_fn(*pieces[index])
            # the shard's loss weighted by its share of the batch: the full batch's gradient is then the plain
            # sum of the shard gradients (one pass over them, not a scaling and a sum)
            grads = torch.autograd.grad(values[0] * weights[index], params, allow_unused=True)
            return [value.detach() for value in values], grads

        def run_in_pool(index):
            _one_intra_op_thread()
            return run(index)

        parallel = self.pool is not None and len(sizes) > 1
        if parallel:
            results = [future.result() for future in [self.pool.submit(run_in_pool, index) for index in range(len(sizes))]]
        else:
            results = [run(index) for index in range(len(sizes))]
        shard_grads = [grads for _, grads in results]
        totals = [None] * len(params)

        def add_up(positions):
            # The shard gradients of these parameters, added in shard order (reproducible), into a tensor laid out
            # like the parameter: autograd.grad returns a gradient in the layout its operation made (a convolution
            # of channels_last activations gives a channels_last weight gradient), and fused Adam reads the
            # gradient's memory as if laid out like the parameter, so the gradient gets the parameter's layout, as
            # .backward() hands gradients over (its "layout contract").
            for k in positions:
                present = [grads[k] for grads in shard_grads if grads[k] is not None]   # None: unused by a shard
                if not present:
                    continue
                total = torch.empty_like(params[k])
                if len(present) == 1:
                    total.copy_(present[0])
                else:
                    torch.add(present[0], present[1], out=total)
                    for grad in present[2:]:
                        total.add_(grad)
                totals[k] = total

        if parallel:   # the additions in the shard threads too, one slice of the parameters each
            chunks = [range(len(params))[index::self.shards] for index in range(self.shards)]
            for future in [self.pool.submit(lambda chunk: (_one_intra_op_thread(), add_up(chunk)), chunk)
                           for chunk in chunks]:
                future.result()
        else:
            add_up(range(len(params)))
        for param, total in zip(params, totals):
            param.grad = total
        return tuple(sum(weight * values[k] for weight, (values, _) in zip(weights, results))
                     for k in range(len(results[0][0])))


_forward_pools = {}
_forward_lock = threading.Lock()


def _autocast_state():
    """(enabled, dtype) of this thread's CPU autocast."""
    try:
        return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:   # torch before 2.4
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


def sharded_forward(fn, tensors, shards):
    """``fn(*tensors)`` of a no-grad forward, computed as ``shards`` batch shards in threads with one
    intra-op thread each and concatenated along the batch: the inference counterpart of ``ThreadShards``
    (for per-sample computations only: eval-mode networks). Each thread runs under the caller's CPU
    autocast, grad and inference mode, which PyTorch keeps per thread. ``shards`` 1: the whole batch in one
    such thread."""
    batch = tensors[0].shape[0]
    sizes = shard_sizes(batch, shards)
    pieces = list(zip(*(torch.split(tensor, sizes) for tensor in tensors)))
    autocast_on, autocast_dtype = _autocast_state()
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    def run(index):
        _one_intra_op_thread()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_on):
            return fn(*pieces[index])

    with _forward_lock:
        pool = _forward_pools.get(len(sizes))
        if pool is None:
            pool = _forward_pools[len(sizes)] = ThreadPoolExecutor(len(sizes), thread_name_prefix="forward-shard")
    outputs = [future.result() for future in [pool.submit(run, index) for index in range(len(sizes))]]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
