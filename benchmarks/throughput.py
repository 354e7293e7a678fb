"""Training and sampling throughput of the learned-coupling model: fp32 vs bf16 vs torch.compile.

For one pair of configs (velocity U-Net ``--config_de`` and encoder
``--config_en``), on CPU or one GPU, and for each mode of ``--modes``:

- training images/s of the full learned-coupling step: encoder forward
  (z, mu, logvar), t ~ U(1e-5, 1), z_t = t z + (1 - t) x, U-Net forward,
  loss = ||v - (z - x)||^2 + weight_prior * KL / dim, backward, Adam step;
- sampling images/s with Euler steps under ``torch.inference_mode`` (U-Net
  only, eval mode), timed per function evaluation (NFE) at ``--sample_batch``
  and extrapolated to ``--num_samples`` samples at NFE ``--nfe``;
- GFLOP/s from ``FlopCounterMode`` counts (fp32 eager, once; the same count is
  used for every mode) and, on a GPU, the fraction of the device's dense peak
  for the mode's arithmetic (bf16, TF32 or fp32).

Modes: ``fp32`` (eager), ``bf16`` (``torch.autocast`` bf16, fp32 master
weights and optimizer), ``compile`` (``torch.compile``, fp32) and
``bf16+compile``. On a GPU, TF32 matmuls/convolutions are on (``--no_tf32``
turns them off) and channels_last is on. Each mode that fails is recorded and
the others still run; the JSON and markdown table are rewritten after every
mode, so a run cut short by a timeout keeps what it measured.

    python benchmarks/throughput.py --quick                 # CPU smoke run, tiny configs, < 1 min
    python benchmarks/throughput.py --device cuda --out runs/throughput
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import exit_cleanly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_cleanly_on_signals()   # SIGINT/SIGTERM: one line and temporary files removed, not a traceback

# Before torch is imported (libgomp reads it once), the same choice as the training script: libgomp's
# default on an idle machine, PASSIVE when other jobs keep the CPUs busy (utils/threads.py, docs/speed.md).
from utils.threads import choose_omp_wait_policy  # noqa: E402

OMP_POLICY = choose_omp_wait_policy()

import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models import build_encoder, build_network, fast_cpu  # noqa: E402
from models.couplings import FlowWithCoupling, build_coupling  # noqa: E402
from models.flow import euler, sample_time  # noqa: E402
from utils.amp import autocast as amp_autocast  # noqa: E402
from utils.cpu_shards import auto_shards  # noqa: E402
from utils.dist import physical_cores  # noqa: E402
from utils.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from utils.io import atomic_write, load_json, save_json  # noqa: E402

MODES = {  # name: (bf16 autocast, torch.compile)
    "fp32": (False, False),
    "bf16": (True, False),
    "compile": (False, True),
    "bf16+compile": (True, True),
}

# Dense peak TFLOP/s per GPU: (fp32, tf32, bf16), from the vendors' data sheets. Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", (51.2, 378.0, 756.0)),
    ("H100", (66.9, 494.7, 989.4)),      # SXM
    ("H200", (66.9, 494.7, 989.4)),      # same compute as H100 SXM
    ("A100", (19.5, 156.0, 312.0)),
)

QUICK_CONFIGS = ("configs/tiny28_de.json", "configs/tiny28_en.json")


def parse_args(argv):
    parser = ArgumentParser("benchmarks/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_de", default="configs/cifar10_de.json", help="velocity U-Net config (JSON)")
    parser.add_argument("--config_en", default="configs/cifar10_en.json", help="encoder U-Net config (JSON)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated modes among {', '.join(MODES)} (default: all four; on CPU with "
                             f"--quick only fp32,bf16, since torch.compile takes minutes on a small CPU)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 128 on GPU, 8 on CPU)")
    parser.add_argument("--sample_batch", type=int, default=None,
                        help="sampling batch; on GPU halved until it fits in memory (default: 1024 on GPU, 16 on CPU)")
    parser.add_argument("--sample_steps", type=int, default=4, help="Euler steps (NFE) per timed sampling call")
    parser.add_argument("--nfe", type=int, default=128, help="NFE of the extrapolated sampling run")
    parser.add_argument("--num_samples", type=int, default=50000, help="samples of the extrapolated sampling run")
    parser.add_argument("--weight_prior", type=float, default=20.0, help="beta, the weight of the KL term")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per repeat (default: 10 on GPU, 2 on CPU, 1 with --quick on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first, compilation included (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of --iters calls; the median is reported")
    parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                        help="memory format of networks and inputs; 'auto': on for GPU, off for CPU "
                             "(slower for CPU training here)")
    parser.add_argument("--no_tf32", action="store_true", help="on GPU, keep fp32 matmuls/convolutions in full fp32")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode ('default', 'reduce-overhead', 'max-autotune', ...)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s, for devices missing from the built-in table (applies "
                             "to every mode); without it, CPU runs report no fraction of peak")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the number of physical cores)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_CONFIGS[0]} + {QUICK_CONFIGS[1]}, small batches, few repeats")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--out", default="runs/throughput", help="folder for throughput.json and throughput.md")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    if args.quick:
        args.config_de, args.config_en = QUICK_CONFIGS
    return args


def resolve_settings(args):
    """Device, modes and the defaults that depend on the device; bad values stop here, before any work."""
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    name = "cpu" if name == "auto" else name
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} was given but no CUDA device is available; use --device cpu")
    gpu = device.type == "cuda"
    if args.modes is None:
        modes = ["fp32", "bf16"] if (args.quick and not gpu) else list(MODES)
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise UserError(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    # (GPU, CPU) defaults; a quick CPU run times single calls
    defaults = {"batch": (128, 8), "sample_batch": (1024, 16), "iters": (10, 1 if args.quick else 2),
                "warmup": (3, 1)}
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    for key in ("batch", "sample_batch", "sample_steps", "nfe", "num_samples", "iters", "repeats"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or args.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and gpu)
    return device, modes, channels_last


def peak_for(device_name, amp, tf32, override):
    """(peak TFLOP/s, what it is the peak of) for a mode, or (None, reason)."""
    if override:
        return override, "--peak_tflops"
    for key, (fp32, tf32_peak, bf16) in PEAK_TFLOPS:
        if key in device_name:
            if amp:
                return bf16, f"{key} dense bf16"
            return (tf32_peak, f"{key} dense TF32") if tf32 else (fp32, f"{key} fp32")
    return None, "unknown device (give --peak_tflops)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters, warmup, repeats):
    """Median seconds per call over ``repeats`` of ``iters`` calls, and the seconds of the first warmup call."""
    first = None
    for index in range(warmup):
        start = time.perf_counter()
        fn()
        synchronize(device)
        if index == 0:
            first = time.perf_counter() - start
    per_call = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / iters)
    return statistics.median(per_call), first


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build_models(config_de, config_en, device, channels_last, seed):
    torch.manual_seed(seed)
    net = build_network(config_de, "--config_de").to(device)
    encoder = build_encoder(config_en, "--config_en").to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        encoder = encoder.to(memory_format=torch.channels_last)
    return net, encoder


def make_train_step(net, encoder, batch, device, channels_last, amp, weight_prior, seed, shards=1):
    """One learned-coupling training step on a fixed random batch, as a zero-argument function, computed as
    the training script computes it (``models.couplings.FlowWithCoupling``; on a CPU, ``shards`` > 1 splits
    the batch into shards in threads, ``utils/cpu_shards.py``). Returns (step, the ThreadShards or None)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, net.in_channels, net.img_resolution, net.img_resolution)
    x = torch.rand(shape, generator=generator).mul(2).sub(1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    coupling = build_coupling("learned" if encoder is not None else "independent", encoder=encoder,
                              weight_prior=weight_prior)
    model = FlowWithCoupling(net, coupling)
    params = model.optimizer_params()
    optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)  # as utils.train
    mode = "bf16" if amp else "none"
    # as the trainer: in bf16 the weights' casts shared by the shards
    pool = fast_cpu.thread_shards(shards, mode) if shards > 1 else None

    def losses(x, t, noise):
        with amp_autocast(device, mode):
            return (model(x, t, noise).loss,)

    def step():
        t = sample_time(batch, device=device)
        noise = torch.randn_like(x)
        optimizer.zero_grad(set_to_none=True)
        if pool is None:
            losses(x, t, noise)[0].backward()
        else:
            pool.step(losses, (x, t, noise), params)
        optimizer.step()

    return step, pool


def make_sampler(net, batch, steps, device, channels_last, amp, seed):
    """``steps`` Euler steps from fixed noise, eval mode, inference_mode, as a zero-argument function."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    noise = torch.randn(batch, net.in_channels, net.img_resolution, net.img_resolution, generator=generator)
    noise = noise.to(device)
    if channels_last:
        noise = noise.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def velocity(z, t):
        with autocast:
            return net(z, t).float()

    def sample():
        with torch.inference_mode():
            euler(velocity, noise, N=steps)

    return sample


def sampling_batch_that_fits(make, batch, device, log):
    """On GPU, halve the batch until one call runs without running out of memory; returns (sampler, batch)."""
    while True:
        sampler = make(batch)
        if device.type != "cuda":
            return sampler, batch
        try:
            sampler()
            synchronize(device)
            return sampler, batch
        except torch.cuda.OutOfMemoryError:
            del sampler
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            log(f"  sampling batch {batch} does not fit in GPU memory; trying {batch // 2}")
            batch //= 2


def run_mode(name, args, device, channels_last, configs, flops, device_name, tf32, log):
    """Measure one mode; returns its row of the table (errors are recorded by the caller)."""
    amp, compiled = MODES[name]
    net, encoder = build_models(*configs, device, channels_last, args.seed)
    net.train()
    encoder.train()
    if compiled:
        # Fresh compile caches per mode: both networks share SongUNet.forward, whose recompilations
        # (train/eval, encoder/decoder, fp32/bf16) would otherwise pile up against dynamo's cache limit.
        torch._dynamo.reset()
        net = torch.compile(net, mode=args.compile_mode)
        encoder = torch.compile(encoder, mode=args.compile_mode)
    shards = min(auto_shards(device, compiled=compiled), args.batch)   # the training script's default
    fast = fast_cpu.apply([net, encoder], fast_cpu.choose(device.type, "bf16" if amp else "none", compiled)[0])
    row = {"mode": name, "bf16": amp, "compile": compiled, "cpu_shards": shards, "cpu_fast_path": fast}

    train_step, pool = make_train_step(net, encoder, args.batch, device, channels_last, amp, args.weight_prior,
                                       args.seed, shards)
    with pool if pool is not None else contextlib.nullcontext():
        seconds, first = time_calls(train_step, device, args.iters, max(args.warmup, 1 if compiled else 0),
                                    args.repeats)
    row["train"] = {"batch": args.batch, "seconds_per_step": seconds, "images_per_s": args.batch / seconds,
                    "first_step_s": first, "tflops": flops["train"] / seconds / 1e12}
    log(f"  train: {row['train']['images_per_s']:.1f} images/s ({seconds * 1e3:.1f} ms/step, "
        f"first step {first:.1f} s)" if first is not None else
        f"  train: {row['train']['images_per_s']:.1f} images/s ({seconds * 1e3:.1f} ms/step)")
    del train_step
    if device.type == "cuda":
        torch.cuda.empty_cache()

    net.eval()
    sampler, batch = sampling_batch_that_fits(
        lambda b: make_sampler(net, b, args.sample_steps, device, channels_last, amp, args.seed),
        args.sample_batch, device, log)
    seconds, first = time_calls(sampler, device, args.iters, max(args.warmup, 1 if compiled else 0), args.repeats)
    per_nfe = seconds / args.sample_steps
    forward_flops = flops["forward_per_image"] * batch
    row["sample"] = {
        "batch": batch, "seconds_per_nfe": per_nfe, "nfe_images_per_s": batch / per_nfe,
        f"images_per_s_at_nfe{args.nfe}": batch / (per_nfe * args.nfe),
        "first_call_s": first, "tflops": forward_flops / per_nfe / 1e12,
        "extrapolated_seconds": args.num_samples / batch * args.nfe * per_nfe,
    }
    log(f"  sample: {row['sample']['nfe_images_per_s']:.1f} images x NFE / s at batch {batch}; "
        f"{args.num_samples} samples at NFE {args.nfe} ~ {format_duration(row['sample']['extrapolated_seconds'])}")

    peak, peak_of = peak_for(device_name, amp, tf32 and not amp, args.peak_tflops)
    if device.type == "cpu" and not args.peak_tflops:
        peak, peak_of = None, ""
    row["peak_tflops"], row["peak_of"] = peak, peak_of
    if peak:
        row["train"]["fraction_of_peak"] = row["train"]["tflops"] / peak
        row["sample"]["fraction_of_peak"] = row["sample"]["tflops"] / peak
    return row


def format_duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


def markdown_table(result):
    nfe = result["settings"]["nfe"]
    unit = "TFLOP/s" if result["device"]["type"] == "cuda" else "GFLOP/s"
    scale = 1.0 if unit == "TFLOP/s" else 1e3
    lines = [
        f"Throughput on {result['device']['name']} ({result['settings']['threads']} CPU threads), "
        f"{result['date']}; U-Net {result['configs']['de']}, encoder {result['configs']['en']}; "
        f"train batch {result['settings']['batch']}, channels_last {result['settings']['channels_last']}, "
        f"TF32 {result['settings']['tf32']}.",
        "",
        f"| mode | train images/s | train {unit} | train % peak | sample images x NFE/s (batch) | "
        f"sample images/s @ NFE {nfe} | {result['settings']['num_samples']} samples @ NFE {nfe} | "
        f"first step / call (s) | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["modes"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | - | - | - | - | - | - | - | {row['error']} |")
            continue
        train, sample = row["train"], row["sample"]

        def percent(part):
            return f"{100 * part['fraction_of_peak']:.1f}%" if "fraction_of_peak" in part else "-"

        first = "/".join("-" if v is None else f"{v:.1f}" for v in (train["first_step_s"], sample["first_call_s"]))
        lines.append(
            f"| {row['mode']} | {train['images_per_s']:.1f} | {train['tflops'] * scale:.2f} | {percent(train)} | "
            f"{sample['nfe_images_per_s']:.1f} ({sample['batch']}) | {sample[f'images_per_s_at_nfe{nfe}']:.2f} | "
            f"{format_duration(sample['extrapolated_seconds'])} | {first} | "
            f"{row.get('peak_of', '')} |")
    lines.append("")
    lines.append(f"FLOPs per training step {result['flops']['train'] / 1e9:.2f} GFLOP, per image and NFE "
                 f"{result['flops']['forward_per_image'] / 1e9:.3f} GFLOP (FlopCounterMode, fp32 eager). "
                 f"Sampling figures are measured over {result['settings']['sample_steps']} Euler steps and "
                 f"extrapolated linearly.")
    return "\n".join(lines) + "\n"


def write_outputs(result, out):
    os.makedirs(out, exist_ok=True)
    save_json(result, os.path.join(out, "throughput.json"))
    with atomic_write(os.path.join(out, "throughput.md"), "w") as handle:
        handle.write(markdown_table(result))


def main(argv):
    args = parse_args(argv)
    device, modes, channels_last = resolve_settings(args)
    configs = (load_json(args.config_de, "--config_de"), load_json(args.config_en, "--config_en"))
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    tf32 = device.type == "cuda" and not args.no_tf32
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}"
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        device_name = f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
                        break

    def log(message):
        print(message, flush=True)

    # FLOPs once, on fp32 eager networks (the count does not depend on the mode).
    net, encoder = build_models(*configs, device, False, args.seed)
    net.train()
    encoder.train()
    flops = {"train": count_flops(make_train_step(net, encoder, args.batch, device, False, False,
                                                  args.weight_prior, args.seed)[0])}
    net.eval()
    probe = torch.zeros(1, net.in_channels, net.img_resolution, net.img_resolution, device=device)
    with torch.no_grad():
        flops["forward_per_image"] = count_flops(functools.partial(net, probe, torch.ones(1, device=device)))
    params = {"de": sum(p.numel() for p in net.parameters()), "en": sum(p.numel() for p in encoder.parameters())}
    del net, encoder, probe

    result = {
        "date": datetime.date.today().isoformat(),
        "device": {"type": device.type, "name": device_name, "torch": torch.__version__,
                   "omp_wait_policy": OMP_POLICY[0], "omp_wait_policy_reason": OMP_POLICY[1],
                   "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "configs": {"de": args.config_de, "en": args.config_en}, "params": params,
        "settings": {"batch": args.batch, "sample_batch": args.sample_batch, "sample_steps": args.sample_steps,
                     "nfe": args.nfe, "num_samples": args.num_samples, "weight_prior": args.weight_prior,
                     "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats, "threads": threads,
                     "channels_last": channels_last, "tf32": tf32, "compile_mode": args.compile_mode},
        "flops": flops, "modes": [],
    }
    log(f"throughput: {device_name}, U-Net {args.config_de} ({params['de'] / 1e6:.2f}M), encoder {args.config_en} "
        f"({params['en'] / 1e6:.2f}M), train batch {args.batch}, sample batch {args.sample_batch}, modes "
        f"{', '.join(modes)}, channels_last {channels_last}, TF32 {tf32}, {threads} threads, "
        f"OMP_WAIT_POLICY {OMP_POLICY[0]} ({OMP_POLICY[1]})")
    for name in modes:
        log(f"[{name}]")
        try:
            row = run_mode(name, args, device, channels_last, configs, flops, device_name, tf32, log)
        except Exception as error:  # noqa: BLE001 - a failing mode is a result; the others still run
            if args.debug:
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            row = {"mode": name, "error": f"{type(error).__name__}: {first_line}"}
            log(f"  failed: {row['error']}")
        result["modes"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_outputs(result, args.out)
    if not modes:
        write_outputs(result, args.out)
    print()
    print(markdown_table(result), end="")
    log(f"wrote {os.path.join(args.out, 'throughput.json')} and throughput.md")
    return result


if __name__ == "__main__":
    cli_main(main)
