"""How fast is the velocity U-Net, compared with what this machine's matmul can do?

Times, for one network config and batch size, on CPU or one GPU:

- a training step: forward, flow-matching loss, backward, Adam step; on a CPU, as the training script
  runs it: the batch split into one shard per thread, each shard's forward and backward in its own
  thread with one intra-op thread (``utils/cpu_shards.py``; ``--cpu_shards 1``: PyTorch's intra-op
  threads only); with shards, the same step without them is timed in the same rounds too;
- a no-grad forward (what sampling costs per function evaluation);
- large square fp32 and bf16 ``torch.mm``, timed the same way in the same run and
  with the same thread count: the machine's practical fp32 and bf16 peaks;
- the plain PyTorch step and forward of the same network as a baseline: fp32, no autocast, no shards,
  intra-op threads, ``torch.optim.Adam`` with its defaults (how the paper's code runs it); the report
  says how many times faster the default step and forward are.

``--amp`` (default ``auto``, as the training script: bf16 autocast on a CPU with AMX-BF16 or
AVX512-BF16 and on CUDA with bf16, fp32 elsewhere; ``utils/amp.py``) sets the precision of the measured
default step and forward.

FLOPs are counted once per measured function with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and
attention, forward and backward; elementwise work and the Adam update count as
zero). The headline figure is ``train GFLOP/s / matmul GFLOP/s``: since both
are measured in the same run, the load other processes put on the machine
partly cancels out. The measurements take turns for ``--repeats`` rounds,
after ``--warmup`` untimed calls of each; in a round, each measurement makes
``--round_warmup`` untimed calls (the one before it, e.g. the matmul, has
evicted its data from the caches; in training, steps follow each other) and
then the timed ones: ``--iters`` training steps, and of each other
measurement as many calls as fill about the same time. Each figure is the
median over rounds.

A fourth measurement replays, in isolation, every convolution layer of the
training step (forward and backward, the full batch's shapes and code path, intra-op
threads) on random tensors: the convolutions' own GFLOP/s, which bounds what the
whole step can reach without shards (convolutions are nearly all of its FLOPs). ``OMP_WAIT_POLICY``: libgomp's
default when the machine is idle, PASSIVE when other jobs keep its CPUs busy,
unless set in the environment (``utils/threads.py``, docs/speed.md).

Example (issue 2's target, >= 0.65 on CPU):

    python benchmarks/network_speed.py --config_de configs/mnist_de.json --batch 32 --device cpu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import exit_cleanly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_cleanly_on_signals()   # SIGINT/SIGTERM: one line and temporary files removed, not a traceback

# Before torch is imported (libgomp reads it once): libgomp's default on an idle machine, PASSIVE when
# other jobs keep the CPUs busy (see utils/threads.py and docs/speed.md). Set OMP_WAIT_POLICY to override.
from utils.threads import choose_omp_wait_policy  # noqa: E402

OMP_POLICY = choose_omp_wait_policy()

import copy  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models import build_encoder, build_network, check_encoder_decoder, fast_cpu  # noqa: E402
from models.couplings import FlowWithCoupling, build_coupling  # noqa: E402
from models.songunet import Conv2d  # noqa: E402
from models.flow import sample_time  # noqa: E402
from utils.amp import AMP_CHOICES, AMP_HELP, autocast, resolve_amp  # noqa: E402
from utils.cpu_shards import auto_shards  # noqa: E402
from utils.dist import physical_cores  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.io import load_json, save_json  # noqa: E402


WEIGHT_PRIOR = 20.0   # beta of the learned coupling's step (the paper's MNIST / CIFAR-10 value)


def parse_args(argv):
    parser = ArgumentParser("benchmarks/network_speed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_de", "--config", dest="config", metavar="CONFIG_DE", default="configs/mnist_de.json",
                        help="network config (JSON) of the velocity U-Net to time (--config: the older name)")
    parser.add_argument("--config_en", default=None,
                        help="encoder config (JSON): time the learned coupling's step (encoder, KL, U-Net), as the "
                             "training script runs it, e.g. configs/mnist_en.json; default: the U-Net alone")
    parser.add_argument("--batch", type=int, default=32, help="images per training step / forward")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--iters", type=int, default=2,
                        help="timed training steps per repeat; the other measurements make as many calls as "
                             "fill about the same time (a short matmul window is at the mercy of noise)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (allocator, autotuning)")
    parser.add_argument("--round_warmup", type=int, default=1,
                        help="untimed calls of each measurement at the start of every round (steady state)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeats of (matmul, training step, forward, [training step without shards,] "
                             "convolutions), interleaved; "
                             "medians are reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for every measurement (0: the number of physical cores)")
    parser.add_argument("--matmul_size", type=int, default=0,
                        help="side of the square fp32 matmul that measures the machine (0: 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--cpu_shards", type=int, default=0,
                        help="CPU training step: split the batch into this many shards that run in as many threads, "
                             "one intra-op thread each, as the training script does (0: its default, the thread "
                             "count on a CPU, 1 on a GPU; 1: PyTorch's intra-op threads only)")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="memory format of the U-Net and its input; 'auto': on for CUDA, off for CPU "
                             "(on this project's CPU measurements channels_last was slower)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help=AMP_HELP)
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the plain fp32 PyTorch step and forward (the baseline of the speed-up figures)")
    parser.add_argument("--attention", choices=("sdpa", "einsum"), default="sdpa",
                        help="attention kernel of the U-Net (numerically equivalent; the bf16 CPU fast path always "
                             "takes einsum, faster there)")
    parser.add_argument("--tf32", action="store_true",
                        help="on CUDA, allow TF32 in matmuls and convolutions (off by default: fp32 figures)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="diagnostic: override the config's dropout (e.g. 0 to see what dropout costs; "
                             "on CPU its random mask is drawn serially)")
    parser.add_argument("--no_convolutions", action="store_true",
                        help="skip the fourth measurement (the step's convolutions replayed alone)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    for name in ("batch", "iters", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.round_warmup < 0 or args.threads < 0 or args.matmul_size < 0 or args.cpu_shards < 0:
        raise UserError("--warmup, --round_warmup, --threads, --matmul_size and --cpu_shards must be >= 0")
    return args


def resolve_device(name):
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was given but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters, warmup):
    """(wall seconds, process CPU seconds) per call of ``fn``, over ``iters`` calls after ``warmup`` calls.

    Wall time (``perf_counter``) is the figure the benchmark reports; CPU time
    (``process_time``) is kept beside it because on a machine shared with other
    jobs it shows how much of the wall time this process actually ran.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def count_flops(fn):
    """FLOPs of one call of ``fn`` as counted by ``FlopCounterMode`` (matmul-like operations only). Counted
    with one intra-op thread, so that the fast path's sampling forward runs in this thread unsharded (the
    counter sees only its own thread's operations)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.set_num_threads(threads)
    return counter.get_total_flops()


def build_matmul(size, device, dtype=torch.float32):
    """A [size, size] @ [size, size] matmul in ``dtype`` (2 * size^3 FLOPs) as a zero-argument function."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def build_convolution_replay(net, step, device, seed):
    """A zero-argument function running, in isolation, the forward and backward of every convolution
    layer (``models.songunet.Conv2d``: resampling and convolution) that one call of ``step`` runs: same
    shapes, memory format and code path, random inputs. Returns it and the number of layer calls."""
    calls = []

    def record(module, inputs):
        x = inputs[0]
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        calls.append((module, tuple(x.shape), x.dtype, x.requires_grad, channels_last))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, Conv2d)]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    replays = []
    for module, shape, dtype, needs_grad, channels_last in calls:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device).contiguous(memory_format=memory_format)
        x.requires_grad_(needs_grad)
        with torch.no_grad():
            out = module(x)
        grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(device)
        grad_out = grad_out.contiguous(memory_format=memory_format)
        leaves = ([x] if needs_grad else []) + [p for p in module.parameters() if p.requires_grad]
        replays.append((module, x, grad_out, leaves))

    def replay():
        for module, x, grad_out, leaves in replays:
            if leaves:
                # backward() rather than autograd.grad(): FlopCounterMode's module hooks need it
                torch.autograd.backward(module(x), grad_out, inputs=leaves)
                for leaf in leaves:
                    leaf.grad = None
            else:
                module(x)

    return replay, len(replays)


def build_step(model, batch, device, channels_last, in_shape, seed, shards=None, amp="none", plain=False):
    """A training step and a no-grad eval-mode forward, as zero-argument functions on fixed random inputs.
    ``model``: a ``models.couplings.FlowWithCoupling`` (with an encoder: the learned coupling's step, KL
    weight ``WEIGHT_PRIOR``; the forward is the flow's alone); ``shards``: a ``utils.cpu_shards.ThreadShards`` that runs the step's forward and backward (None: in
    this thread); ``amp``: ``"bf16"`` autocasts the forward passes; ``plain``: ``torch.optim.Adam`` with
    its defaults instead of the fused Adam of the training script."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, *in_shape, generator=generator).to(device).contiguous(memory_format=memory_format)
    noise = torch.randn(batch, *in_shape, generator=generator).to(device).contiguous(memory_format=memory_format)
    t = sample_time(batch, generator=generator).to(device)
    # fused Adam, as the training script uses (utils.train)
    params = model.optimizer_params()
    optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=not plain)

    def losses(x, noise, t):
        with autocast(device, amp):
            return (model(x, t, noise).loss,)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        if shards is None:
            losses(x, noise, t)[0].backward()
        else:
            shards.step(losses, (x, noise, t), params)
        optimizer.step()

    def forward():
        model.flow.eval()  # what sampling runs: the flow alone, no dropout, no autograd
        with torch.no_grad(), autocast(device, amp):
            model.flow(x, t)
        model.flow.train()

    return train_step, forward


def machine_summary(device, threads):
    summary = {"device": str(device), "threads": threads, "torch": torch.__version__,
               "omp_wait_policy": OMP_POLICY[0], "omp_wait_policy_reason": OMP_POLICY[1],
               "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    summary["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        summary["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    return summary


def main(argv):
    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)

    config = load_json(args.config, "network config")
    if args.dropout is not None:
        if not 0 <= args.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
        config = dict(config, dropout=args.dropout)
    torch.manual_seed(args.seed)
    net = build_network(config, args.config)
    encoder = None
    if args.config_en is not None:
        config_en = load_json(args.config_en, "encoder config")
        check_encoder_decoder(config, config_en,
                              names=(f"--config_de {args.config}", f"--config_en {args.config_en}"))
        encoder = build_encoder(config_en, args.config_en)
    coupling = build_coupling("learned" if encoder is not None else "independent", encoder=encoder,
                              weight_prior=WEIGHT_PRIOR)
    net = FlowWithCoupling(net, coupling).to(device)
    for module in net.modules():
        if hasattr(module, "set_sdpa"):
            module.set_sdpa(args.attention == "sdpa")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    in_shape = (net.flow.in_channels, net.flow.img_resolution, net.flow.img_resolution)
    params = sum(p.numel() for p in net.parameters())
    summary = machine_summary(device, threads)
    what = f"{args.config} + {args.config_en} (learned coupling)" if encoder is not None else args.config
    print(f"network_speed: {what} ({params / 1e6:.2f}M params, dropout {config['dropout']}), "
          f"batch {args.batch}, {device}, {threads} threads, channels_last {'on' if channels_last else 'off'}, "
          f"attention {args.attention}, OMP_WAIT_POLICY {summary['omp_wait_policy']}, "
          f"load average {summary.get('load_average_1min', 'n/a')}", flush=True)
    print(f"OMP_WAIT_POLICY {OMP_POLICY[0]}: {OMP_POLICY[1]}", flush=True)

    amp, amp_reason = resolve_amp(args.amp, device)
    print(f"amp {amp} ({amp_reason})", flush=True)
    fast, fast_reason = fast_cpu.choose(device.type, amp)
    fast_cpu.apply([net], fast)
    print(f"CPU fast path {'on' if fast else 'off'} ({fast_reason})", flush=True)
    shards = args.cpu_shards or auto_shards(device)
    if shards > args.batch:
        raise UserError(f"--cpu_shards {shards} is more than the batch ({args.batch})")
    if shards > 1 and device.type != "cpu":
        raise UserError("--cpu_shards above 1 is for CPU training steps")
    # FLOPs are counted on the step without shards (the same computation: FlopCounterMode only sees the
    # operations of its own thread), and the replay records that step's convolutions.
    plain_step, forward = build_step(net, args.batch, device, channels_last, in_shape, args.seed, amp=amp)
    train_step = plain_step
    if shards > 1:
        # as the trainer: in bf16 the weights' casts shared by the shards (utils/cpu_shards.py)
        pool = fast_cpu.thread_shards(shards, amp)
        train_step, _ = build_step(net, args.batch, device, channels_last, in_shape, args.seed, pool, amp=amp)
    layout = (f"{shards} shards in {shards} threads, 1 intra-op thread each" if shards > 1
              else f"{threads} intra-op threads, no shards")
    print(f"training step: {layout}", flush=True)
    matmul = build_matmul(matmul_size, device)
    flops = {"train": count_flops(plain_step), "forward": count_flops(forward), "matmul": 2.0 * matmul_size ** 3,
             "matmul_bf16": 2.0 * matmul_size ** 3}
    functions = {"matmul": matmul, "matmul_bf16": build_matmul(matmul_size, device, torch.bfloat16),
                 "train": train_step, "forward": forward}
    if not args.no_baseline:   # the same network as plain PyTorch runs it: fp32, NCHW, no shards, default Adam
        baseline = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        fast_cpu.apply([baseline], False)
        functions["train_baseline"], functions["forward_baseline"] = build_step(
            baseline, args.batch, device, False, in_shape, args.seed, plain=True)
        flops["train_baseline"], flops["forward_baseline"] = flops["train"], flops["forward"]
    if shards > 1:   # the same step without shards, timed in the same rounds: what the shards gain
        functions["train_intra_op"] = plain_step
        flops["train_intra_op"] = flops["train"]
    if not args.no_convolutions:
        functions["convolutions"], n_convolutions = build_convolution_replay(net, plain_step, device, args.seed)
        flops["convolutions"] = count_flops(functions["convolutions"])

    # The measurements interleave (matmul, train, forward, [convolutions,] matmul, ...) so that load from
    # other processes hits them alike; ratios are taken within each repeat, then the median over repeats.
    # Warm-up, then one timed call of each sets how many calls fill about the training step's window.
    single = {name: time_calls(fn, device, 1, args.warmup)[0] for name, fn in functions.items()}
    calls = {name: args.iters if name == "train" else
             max(1, round(args.iters * single["train"] / max(single[name], 1e-9))) for name in functions}
    runs = {name: {"wall": [], "cpu": []} for name in flops}
    for repeat in range(args.repeats):
        for name, fn in functions.items():
            wall, cpu = time_calls(fn, device, calls[name], args.round_warmup)
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)

    def gflops(name, clock):
        return [flops[name] / seconds / 1e9 for seconds in runs[name][clock]]

    ratio = [tr / mm for tr, mm in zip(gflops("train", "wall"), gflops("matmul", "wall"))]
    ratio_cpu = [tr / mm for tr, mm in zip(gflops("train", "cpu"), gflops("matmul", "cpu"))]
    median = statistics.median
    result = {
        "config": args.config, "config_en": args.config_en, "batch": args.batch, "cpu_shards": shards, "params": params, "dropout": config["dropout"],
        "channels_last": channels_last, "attention": args.attention, "cpu": summary["cpu"],
        "tf32": bool(args.tf32 and device.type == "cuda"), "machine": summary,
        "iters": args.iters, "calls_per_repeat": calls, "warmup": args.warmup,
        "round_warmup": args.round_warmup, "repeats": args.repeats,
    }
    for name, per in (("train_step", "train"), ("forward", "forward")):
        seconds = median(runs[per]["wall"])
        result[name] = {"seconds": seconds, "images_per_s": args.batch / seconds, "gflop": flops[per] / 1e9,
                        "gflops": median(gflops(per, "wall")), "cpu_seconds": median(runs[per]["cpu"])}
    result["matmul"] = {"size": matmul_size, "gflops": median(gflops("matmul", "wall")),
                        "gflops_repeats": [round(g, 2) for g in gflops("matmul", "wall")]}
    result["train_over_matmul"] = median(ratio)
    result["train_over_matmul_repeats"] = [round(r, 4) for r in ratio]
    result["forward_over_matmul"] = median(
        [fw / mm for fw, mm in zip(gflops("forward", "wall"), gflops("matmul", "wall"))])
    result["train_over_matmul_cpu_time"] = median(ratio_cpu)
    result["amp"], result["amp_reason"] = amp, amp_reason
    result["cpu_fast_path"], result["cpu_fast_path_reason"] = fast, fast_reason
    result["matmul_bf16"] = {"size": matmul_size, "gflops": median(gflops("matmul_bf16", "wall"))}
    result["train_over_matmul_bf16"] = median(
        [tr / mm for tr, mm in zip(gflops("train", "wall"), gflops("matmul_bf16", "wall"))])
    result["forward_over_matmul_bf16"] = median(
        [fw / mm for fw, mm in zip(gflops("forward", "wall"), gflops("matmul_bf16", "wall"))])
    if "train_baseline" in flops:
        # per round: plain fp32 time / default time (both in the same round)
        result["baseline"] = {
            "train_seconds": median(runs["train_baseline"]["wall"]),
            "forward_seconds": median(runs["forward_baseline"]["wall"]),
            "train_speedup": median([b / a for a, b in zip(runs["train"]["wall"], runs["train_baseline"]["wall"])]),
            "forward_speedup": median([b / a for a, b in zip(runs["forward"]["wall"],
                                                             runs["forward_baseline"]["wall"])])}
    if "train_intra_op" in flops:
        result["train_step_without_shards"] = {
            "seconds": median(runs["train_intra_op"]["wall"]),
            "over_matmul": median([tr / mm for tr, mm in zip(gflops("train_intra_op", "wall"), gflops("matmul", "wall"))]),
            # per round: time with shards / time without (both in the same round)
            "time_ratio_with_shards": median([a / b for a, b in zip(runs["train"]["wall"], runs["train_intra_op"]["wall"])])}
    if "convolutions" in flops:
        result["convolutions"] = {
            "count": n_convolutions, "gflop": flops["convolutions"] / 1e9,
            "share_of_train_flops": flops["convolutions"] / flops["train"],
            "seconds": median(runs["convolutions"]["wall"]), "gflops": median(gflops("convolutions", "wall")),
            "over_matmul": median([cv / mm for cv, mm in zip(gflops("convolutions", "wall"),
                                                            gflops("matmul", "wall"))]),
            # the step's FLOPs in the convolutions' time: train/matmul without shards if all other work were free
            "train_over_matmul_ceiling": median([flops["train"] / sec / 1e9 / mm for sec, mm in zip(
                runs["convolutions"]["wall"], gflops("matmul", "wall"))])}
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)

    train, fwd = result["train_step"], result["forward"]
    print(f"train step : {train['seconds'] * 1e3:9.1f} ms  {train['images_per_s']:9.1f} images/s  "
          f"{train['gflop']:8.2f} GFLOP  {train['gflops']:8.1f} GFLOP/s")
    print(f"forward    : {fwd['seconds'] * 1e3:9.1f} ms  {fwd['images_per_s']:9.1f} images/s  "
          f"{fwd['gflop']:8.2f} GFLOP  {fwd['gflops']:8.1f} GFLOP/s  (eval mode, no grad)")
    print(f"matmul     : fp32 {matmul_size}x{matmul_size}, {result['matmul']['gflops']:.1f} GFLOP/s "
          f"(repeats: {', '.join(f'{g:.1f}' for g in gflops('matmul', 'wall'))})")
    print(f"matmul     : bf16 {matmul_size}x{matmul_size}, {result['matmul_bf16']['gflops']:.1f} GFLOP/s")
    print(f"amp {amp}: train GFLOP/s / bf16 matmul GFLOP/s = {result['train_over_matmul_bf16']:.3f}; forward / bf16 "
          f"matmul = {result['forward_over_matmul_bf16']:.3f}")
    if "baseline" in result:
        base = result["baseline"]
        print(f"plain PyTorch fp32 step (NCHW, no shards, default Adam): {base['train_seconds'] * 1e3:.1f} ms, forward "
              f"{base['forward_seconds'] * 1e3:.1f} ms; the default step is {base['train_speedup']:.2f}x as fast, the "
              f"default forward {base['forward_speedup']:.2f}x (median over rounds)")
    print(f"train GFLOP/s / fp32 matmul GFLOP/s = {result['train_over_matmul']:.3f} "
          f"(repeats: {', '.join(f'{r:.3f}' for r in ratio)}); forward / matmul = "
          f"{result['forward_over_matmul']:.3f}")
    print(f"same ratio from process CPU time = {result['train_over_matmul_cpu_time']:.3f} "
          f"(less sensitive to other jobs; with several threads it also counts their spin-waiting)")
    if "train_step_without_shards" in result:
        plain = result["train_step_without_shards"]
        print(f"train step without shards ({threads} intra-op threads, same rounds): {plain['seconds'] * 1e3:.1f} ms, "
              f"{plain['over_matmul']:.3f} of matmul; step time with / without shards = "
              f"{plain['time_ratio_with_shards']:.3f} (median over rounds)")
    if "convolutions" in result:
        conv = result["convolutions"]
        print(f"convolutions: the step's {conv['count']} alone (forward + backward, full batch, {threads} intra-op "
              f"threads): {conv['seconds'] * 1e3:.1f} ms, {conv['gflop']:.2f} GFLOP ({conv['share_of_train_flops']:.1%} "
              f"of the step's), {conv['gflops']:.1f} GFLOP/s = {conv['over_matmul']:.3f} of matmul; train / matmul "
              f"without shards if everything else took no time: {conv['train_over_matmul_ceiling']:.3f}")
    print(f"load average (1 min): {summary.get('load_average_1min', 'n/a')} at start, "
          f"{result['machine'].get('load_average_1min_end', 'n/a')} at end, on {os.cpu_count()} CPUs")
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    cli_main(main)
