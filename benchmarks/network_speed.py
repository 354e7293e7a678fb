"""How fast is the velocity U-Net, compared with what this machine's matmul can do?

Times, for one network config and batch size, on CPU or one GPU:

- a training step: forward, flow-matching loss, backward, Adam step;
- a no-grad forward (what sampling costs per function evaluation);
- a large square fp32 ``torch.mm``, timed the same way in the same run and
  with the same thread count: the machine's practical fp32 peak.

FLOPs are counted once per measured function with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and
attention, forward and backward; elementwise work and the Adam update count as
zero). The headline figure is ``train GFLOP/s / matmul GFLOP/s``: since both
are measured in the same run, the load other processes put on the machine
partly cancels out. Each figure is the median over ``--repeats`` repeats of
``--iters`` timed calls, after ``--warmup`` untimed calls.

Example (issue 2's target, >= 0.65 on CPU):

    python benchmarks/network_speed.py --config configs/mnist_de.json --batch 32 --device cpu
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_network  # noqa: E402
from models.flow import flow_matching_loss, interpolate, sample_time  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402
from utils.io import load_json, save_json  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_de.json", help="network config (JSON) of the U-Net to time")
    parser.add_argument("--batch", type=int, default=32, help="images per training step / forward")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (allocator, autotuning)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of --iters calls; the median is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for every measurement (0: the number of physical cores)")
    parser.add_argument("--matmul_size", type=int, default=0,
                        help="side of the square fp32 matmul that measures the machine (0: 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="memory format of the U-Net and its input; 'auto': on for CUDA, off for CPU "
                             "(on this project's CPU measurements channels_last was slower)")
    parser.add_argument("--attention", choices=("sdpa", "einsum"), default="sdpa",
                        help="attention kernel of the U-Net (numerically equivalent)")
    parser.add_argument("--tf32", action="store_true",
                        help="on CUDA, allow TF32 in matmuls and convolutions (off by default: fp32 figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    for name in ("batch", "iters", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0 or args.matmul_size < 0:
        raise UserError("--warmup, --threads and --matmul_size must be >= 0")
    return args


def physical_cores():
    """Physical CPU cores available to this process (hyper-threads count once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id"
        package = f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"
        try:
            with open(path) as handle, open(package) as handle2:
                cores.add((handle2.read().strip(), handle.read().strip()))
        except OSError:
            cores.add(("0", str(cpu)))
    return max(1, len(cores))


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


def time_calls(fn, device, iters, warmup, repeats):
    """Seconds per call: the median over ``repeats`` of (time of ``iters`` calls) / ``iters``, and all repeats."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / iters)
    return statistics.median(per_call), per_call


def count_flops(fn):
    """FLOPs of one call of ``fn`` as counted by ``FlopCounterMode`` (matmul-like operations only)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_benchmark(size, device, iters, warmup, repeats):
    """GFLOP/s of an fp32 [size, size] @ [size, size] matmul (2 * size^3 FLOPs per call)."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)

    def call():
        torch.mm(a, b, out=out)

    seconds, per_call = time_calls(call, device, iters, warmup, repeats)
    flops = 2.0 * size ** 3
    return {"size": size, "seconds": seconds, "gflops": flops / seconds / 1e9,
            "gflops_repeats": [flops / s / 1e9 for s in per_call]}


def build_step(net, batch, device, channels_last, in_shape, seed):
    """A training step and a no-grad forward as zero-argument functions on fixed random inputs."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, *in_shape, generator=generator).to(device).contiguous(memory_format=memory_format)
    noise = torch.randn(batch, *in_shape, generator=generator).to(device).contiguous(memory_format=memory_format)
    t = sample_time(batch, generator=generator).to(device)
    # foreach is the default multi-tensor Adam on both CPU and CUDA; fused=True exists for CPU too but
    # measured no faster here, and foreach keeps the same update as the training scripts.
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, foreach=True)

    def train_step():
        z_t = interpolate(x, noise, t)
        loss = flow_matching_loss(net(z_t, t), x, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward():
        with torch.no_grad():
            net(x, t)

    return train_step, forward


def machine_summary(device, threads):
    summary = {"device": str(device), "threads": threads, "torch": torch.__version__,
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
    torch.manual_seed(args.seed)
    net = build_network(config, args.config).to(device)
    net.set_sdpa(args.attention == "sdpa")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    in_shape = (net.in_channels, net.img_resolution, net.img_resolution)
    params = sum(p.numel() for p in net.parameters())
    summary = machine_summary(device, threads)
    print(f"network_speed: {args.config} ({params / 1e6:.2f}M params), batch {args.batch}, {device}, "
          f"{threads} threads, channels_last {'on' if channels_last else 'off'}, attention {args.attention}, "
          f"load average {summary.get('load_average_1min', 'n/a')}", flush=True)

    train_step, forward = build_step(net, args.batch, device, channels_last, in_shape, args.seed)
    train_flops = count_flops(train_step)
    forward_flops = count_flops(forward)

    # The three measurements interleave (matmul, train, forward, matmul, ...) so that a burst of load from
    # other processes hits them alike; each entry of a list is one repeat.
    matmul_runs, train_runs, forward_runs = [], [], []
    for repeat in range(args.repeats):
        warmup = args.warmup if repeat == 0 else 1
        matmul_runs.append(matmul_benchmark(matmul_size, device, args.iters, warmup, 1)["seconds"])
        train_runs.append(time_calls(train_step, device, args.iters, warmup, 1)[0])
        forward_runs.append(time_calls(forward, device, args.iters, warmup, 1)[0])
    matmul_flops = 2.0 * matmul_size ** 3
    matmul_gflops = [matmul_flops / s / 1e9 for s in matmul_runs]
    train_gflops = [train_flops / s / 1e9 for s in train_runs]
    ratios = [tr / mm for tr, mm in zip(train_gflops, matmul_gflops)]

    result = {
        "config": args.config, "batch": args.batch, "params": params,
        "channels_last": channels_last, "attention": args.attention, "tf32": bool(args.tf32 and device.type == "cuda"),
        "machine": summary,
        "train_step": {
            "seconds": statistics.median(train_runs),
            "images_per_s": args.batch / statistics.median(train_runs),
            "gflop_per_step": train_flops / 1e9,
            "gflops": statistics.median(train_gflops),
        },
        "forward": {
            "seconds": statistics.median(forward_runs),
            "images_per_s": args.batch / statistics.median(forward_runs),
            "gflop_per_call": forward_flops / 1e9,
            "gflops": forward_flops / statistics.median(forward_runs) / 1e9,
        },
        "matmul": {"size": matmul_size, "gflops": statistics.median(matmul_gflops)},
        "train_over_matmul": statistics.median(ratios),
        "train_over_matmul_repeats": [round(r, 4) for r in ratios],
        "forward_over_matmul": (forward_flops / statistics.median(forward_runs) / 1e9) / statistics.median(matmul_gflops),
        "repeats": args.repeats, "iters": args.iters, "warmup": args.warmup,
    }
    result["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    train, fwd = result["train_step"], result["forward"]
    print(f"train step : {train['seconds'] * 1e3:8.1f} ms  {train['images_per_s']:9.1f} images/s  "
          f"{train['gflop_per_step']:7.2f} GFLOP  {train['gflops']:8.1f} GFLOP/s")
    print(f"forward    : {fwd['seconds'] * 1e3:8.1f} ms  {fwd['images_per_s']:9.1f} images/s  "
          f"{fwd['gflop_per_call']:7.2f} GFLOP  {fwd['gflops']:8.1f} GFLOP/s")
    print(f"matmul     : fp32 {matmul_size}x{matmul_size}  {result['matmul']['gflops']:8.1f} GFLOP/s")
    print(f"train GFLOP/s / matmul GFLOP/s = {result['train_over_matmul']:.3f} "
          f"(repeats: {', '.join(f'{r:.3f}' for r in ratios)}); forward / matmul = {result['forward_over_matmul']:.3f}")
    print(f"load average (1 min) at start {summary.get('load_average_1min', 'n/a')}, "
          f"at end {result['machine']['load_average_1min_end']}")
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    cli_main(main)
