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


def cast_param(param, dtype, scale=None):
    """``(param * scale).to(dtype)``: how a layer casts its weight for the computation (``scale``: None or a float
    folded into the weight). Inside a ``ThreadShards`` step with ``share_casts``, the cast that step made once
    for all its shards instead, a bf16 leaf of its own whose gradient the step adds into ``param``'s."""
    casts = getattr(_local, "casts", None)
    if casts is not None and (scale is None or isinstance(scale, float)):
        if dtype == torch.float32 and param.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")   # what the autocast operation would cast it to
        shared = casts.get(param, dtype, scale)
        if shared is not None:
            return shared
    return (param if scale is None else param * scale).to(dtype)


@contextlib.contextmanager
def _casts_scope(casts):
    previous = getattr(_local, "casts", None)
    _local.casts = casts
    try:
        yield
    finally:
        _local.casts = previous


class _CastRecorder:
    """The first step with shared casts: records which (parameter, dtype, scale) casts the shards ask for, and
    lets them cast as usual."""

    def __init__(self, params):
        self.index = {id(param): k for k, param in enumerate(params)}
        self.seen = set()
        self.lock = threading.Lock()

    def get(self, param, dtype, scale):
        k = self.index.get(id(param))
        if k is not None and dtype != param.dtype:   # only casts that change the dtype: bf16 copies of fp32
            with self.lock:
                self.seen.add((k, dtype, scale))
        return None

    def plan(self):
        return sorted(self.seen, key=lambda entry: (entry[0], str(entry[1]), -1.0 if entry[2] is None else entry[2]))


class _SharedCasts:
    """A step's shared casts: one leaf per recorded (parameter, dtype, scale), made before the shards run."""

    def __init__(self, params, plan, leaves):
        self.leaves = {(id(params[k]), dtype, scale): leaf for (k, dtype, scale), leaf in zip(plan, leaves)}

    def get(self, param, dtype, scale):
        return self.leaves.get((id(param), dtype, scale))


def _make_leaf(param, dtype, scale):
    value = param.detach()
    return (value if scale is None else value * scale).to(dtype)


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

    ``share_casts``: the bf16 casts of the weights (``cast_param``) are made once per step, before the shards
    run, and shared by them, instead of once per shard, each with its own cast back of the gradient; on a CPU
    the shards' per-call costs are a large part of their time (docs/speed.md). Each shared cast is a bf16 leaf;
    its shard gradients, in float32 and times the folded scale, are added in shard order into the parameter's
    gradient: the numbers of per-shard casts. The first step records which casts the shards ask for and casts
    as usual. ``kernels``: an object whose ``cast_many`` and ``sum_many`` make the casts and the sums in one
    call each (``models.fused_norm``'s C kernels; they return None for inputs they do not take), else
    PyTorch's operations per parameter.
    """

    def __init__(self, shards, share_casts=False, kernels=None):
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self.shards = shards
        self.share_casts = share_casts
        self.kernels = kernels
        self._plan = None   # (the parameters' ids, [(parameter index, dtype, scale)]) of the shared casts
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

    def _casts(self, params, parallel):
        """(the casts' scope for the shard threads, [(parameter index, scale)] of its leaves, the leaves)."""
        if not self.share_casts:
            return None, [], []
        key = tuple(map(id, params))
        if self._plan is None or self._plan[0] != key:
            recorder = _CastRecorder(params)
            return recorder, [], []
        plan = self._plan[1]
        leaves = None
        if self.kernels is not None and all(dtype == torch.bfloat16 for _, dtype, _ in plan):   # in one call
            leaves = self.kernels.cast_many([params[k] for k, _, _ in plan],
                                          [1.0 if scale is None else scale for _, _, scale in plan], self.shards)
        if leaves is None:
            leaves = [None] * len(plan)

            def make(positions):
                for e in positions:
                    k, dtype, scale = plan[e]
                    leaves[e] = _make_leaf(params[k], dtype, scale)

            self._in_threads(make, len(plan), parallel)
        for leaf in leaves:
            leaf.requires_grad_()
        return _SharedCasts(params, plan, leaves), [(k, scale) for k, _, scale in plan], leaves

    def _in_threads(self, fn, count, parallel):
        """``fn(positions)`` over range(count): split among the shard threads (one slice each) when parallel."""
        if not parallel:
            fn(range(count))
            return
        chunks = [range(count)[index::self.shards] for index in range(self.shards)]
        for future in [self.pool.submit(lambda chunk: (_one_intra_op_thread(), fn(chunk)), chunk) for chunk in chunks]:
            future.result()

    def step(self, loss_fn, tensors, params, context=None):
        params = list(params)
        batch = tensors[0].shape[0]
        sizes = shard_sizes(batch, self.shards)
        weights = [size / batch for size in sizes]
        pieces = list(zip(*(torch.split(tensor, sizes) for tensor in tensors)))
        # One dropout seed per shard, drawn here (the calling thread) from the global generator.
        seeds = torch.randint(0, 2 ** 62, (len(sizes),)).tolist()

        parallel = self.pool is not None and len(sizes) > 1
        casts, owners, leaves = self._casts(params, parallel)
        inputs = params + leaves

        def run(index):
            generator = torch.Generator(device=tensors[0].device).manual_seed(seeds[index])
            with dropout_generator(generator), _casts_scope(casts), \
                    (context() if context is not None else contextlib.nullcontext()):
                values = loss_fn(*pieces[index])
            # the shard's loss weighted by its share of the batch: the full batch's gradient is then the plain
            # sum of the shard gradients (one pass over them, not a scaling and a sum)
            grads = torch.autograd.grad(values[0] * weights[index], inputs, allow_unused=True)
            return [value.detach() for value in values], grads

        def run_in_pool(index):
            _one_intra_op_thread()
            return run(index)

        if parallel:
            results = [future.result() for future in [self.pool.submit(run_in_pool, index) for index in range(len(sizes))]]
        else:
            results = [run(index) for index in range(len(sizes))]
        if isinstance(casts, _CastRecorder):
            self._plan = (tuple(map(id, params)), casts.plan())
        shard_grads = [grads for _, grads in results]
        totals = [None] * len(params)
        # per parameter: the positions in `inputs` of its gradients (itself, then its shared casts) and their scales
        sources = [[(k, None)] for k in range(len(params))]
        for e, (k, scale) in enumerate(owners):
            sources[k].append((len(params) + e, scale))

        def add_up(positions):
            # The shard gradients of these parameters, added in shard order (reproducible), into a tensor laid out
            # like the parameter: autograd.grad returns a gradient in the layout its operation made (a convolution
            # of channels_last activations gives a channels_last weight gradient), and fused Adam reads the
            # gradient's memory as if laid out like the parameter, so the gradient gets the parameter's layout, as
            # .backward() hands gradients over (its "layout contract"). A shared cast's bf16 gradient is taken to
            # float32 and times its folded scale in each shard before the sum, as autograd does with per-shard
            # casts: the same numbers either way (a run's first step, which records the casts, and a resumed
            # run's agree with the steps that share them).
            for k in positions:
                total = None
                for position, scale in sources[k]:
                    present = [grads[position] for grads in shard_grads if grads[position] is not None]   # None: unused
                    if not present:
                        continue
                    if scale is not None or present[0].dtype != params[k].dtype:
                        present = [grad.float() if scale is None else grad.float() * scale for grad in present]
                    part = torch.empty_like(params[k])
                    if len(present) == 1:
                        part.copy_(present[0])
                    else:
                        torch.add(present[0], present[1], out=part)
                        for grad in present[2:]:
                            part.add_(grad)
                    total = part if total is None else total.add_(part)
                totals[k] = total

        # The parameters whose only gradients are those of one shared bf16 cast: their sums in one call of the
        # kernels (the same numbers as add_up's); the others (and all without kernels) in add_up.
        rest = list(range(len(params)))
        single = [k for k in rest if len(sources[k]) == 2 and all(grads[k] is None for grads in shard_grads)
                  and any(grads[sources[k][1][0]] is not None for grads in shard_grads)]
        if single and self.kernels is not None:
            sums = self.kernels.sum_many([params[k] for k in single],
                                       [[grads[sources[k][1][0]] for grads in shard_grads] for k in single],
                                       [1.0 if sources[k][1][1] is None else sources[k][1][1] for k in single],
                                       self.shards)
            if sums is not None:
                for k, total in zip(single, sums):
                    totals[k] = total
                done = set(single)
                rest = [k for k in rest if k not in done]
        self._in_threads(lambda chunk: add_up([rest[i] for i in chunk]), len(rest), parallel)   # in the shard threads
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
