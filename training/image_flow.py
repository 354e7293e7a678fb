"""Image flow training, one rank: the networks, the coupling's loss step, EMA, sample grids, saves and resume.

Driven by the one loop of ``training/loop.py``; ``train_reverse_img_ddp.py`` is the command line that checks the
arguments and launches the ranks. The run's description is the frozen ``training.run.ImageRun``.
"""
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from models import build_encoder, build_network, fast_cpu
from models import flow as flowlib
from models.couplings import FlowWithCoupling, build_coupling
from models.solvers import euler
from training import loop
from utils import dist, rundir
from utils import train as plumbing
from utils.amp import autocast as amp_autocast
from utils.amp import autocast_velocity
from utils.checkpoint import TRAINING_STATE_FORMAT
from utils.console import progress_bar
from utils.data import ImageFolderDataset, build_dataset, conversions, describe_images
from utils.errors import UserError
from utils.images import make_grid, save_png
from utils.io import load_state_dict_strict, save_torch_all

SAMPLE_COUNT = 4          # images per sample grid, as in the paper
# changed on resume: allowed, but worth a warning
RESUME_WARN_ARGS = ("dataset", "weight_prior", "learning_rate", "batchsize", "optimizer", "warmup_steps",
                    "ema_decay", "ema_after_steps", "no_ema", "seed", "grad_clip", "amp", "ot_reg")

# config.json entries that define a run: another run with other values must not share its --dir.
RUN_DEFINING_ARGS = ("dataset", "coupling", "ot_reg", "weight_prior", "learning_rate", "batchsize", "optimizer",
                     "warmup_steps", "ema_decay", "ema_after_steps", "no_ema", "seed", "grad_clip",
                     "resolved_config_de", "resolved_config_en")


def check_output_dir(run, resuming):
    """A fresh run must not share --dir with another run's config.json or overwrite a run's checkpoints."""
    if resuming:
        return
    previous = rundir.previous_record(run.dir, "config.json")
    if previous == rundir.UNREADABLE:
        raise UserError(f"--dir {run.dir} holds an unreadable config.json; choose another --dir")
    changed = rundir.differences(previous, run.record(), RUN_DEFINING_ARGS) if previous else []
    if changed:
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        fix = ("it holds no training state to continue from, so choose another --dir" if run.resume else
               "choose another --dir, or pass --resume auto to continue that run")
        raise UserError(f"--dir {run.dir} holds a run with another configuration (config.json: "
                        f"{'; '.join(changed[:3])}{more}); {fix}")
    existing = rundir.existing_outputs(run.dir, ("training_state_*.pth", "flow_model_*_ema.pth"))
    if existing:
        fix = ("it holds no training state to continue from" if run.resume else
               "pass --resume auto to continue that run")
        raise UserError(f"--dir {run.dir} already holds {os.path.basename(existing[-1])}; {fix}, or choose "
                        f"another --dir")


def check_resume_state(state, path, run, warn):
    """A training state must match this run's coupling and network configs (one line naming the difference)."""
    for key in ("model_state_dict", "ema_model_state_dict", "forward_model_state_dict", "ema_forward_model_state_dict"):
        bad = plumbing.first_nonfinite(state.get(key) or {})
        if bad is not None:
            raise UserError(f"--resume {path} holds inf or NaN weights ({key} {bad}); resume from an earlier "
                            f"training_state_{{i}}.pth with --resume PATH")
    if state.get("task", "flow") != "flow":
        raise UserError(f"--resume {path} is a distill.py --mode {state['task']} state, not an image flow training "
                        f"state; give this run's own training_state_*.pth or another --dir")
    if state.get("format") is None:
        has_encoder = state.get("forward_model_state_dict") is not None
        if has_encoder != (run.coupling == "learned"):
            raise UserError(f"--resume {path} is a paper-format state {'with' if has_encoder else 'without'} an "
                            f"encoder, but --coupling is {run.coupling}")
        warn(f"warning: --resume {path} is a paper-format training state: networks, optimizer, EMA and "
             f"iteration are restored; data order and random states start afresh")
        return
    saved_args = state.get("args") or {}
    if saved_args.get("coupling", run.coupling) != run.coupling:
        raise UserError(f"--resume {path} was trained with --coupling {saved_args['coupling']}, not "
                        f"{run.coupling}; use the same coupling or another --dir")
    for role, key, given in (("--config_de", "config_de", run.flow_config),
                             ("--config_en", "config_en", run.encoder_config)):
        saved = state.get(key)
        if saved != given:
            if saved is None or given is None:
                detail = f"{'no' if saved is None else 'an'} {role} in the state"
            else:
                keys = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
                detail = f"key {keys[0]!r}: {saved.get(keys[0])!r} in the state vs {given.get(keys[0])!r}"
            raise UserError(f"--resume {path} was trained with a different {role} ({detail}); "
                            f"give the run's own configs or choose another --dir")
    # the options as given (run.amp is what --amp resolved to; the state holds the option and, since
    # 2026-12-07, the precision it resolved to: --amp auto gives other precisions on other machines)
    line = rundir.resume_changes(saved_args, run.options, RESUME_WARN_ARGS, run.amp, run.amp_reason)
    if line:
        warn(line)


def check_image_dataset(dataset, name, resolution, channels, data_path, data_root, bad_images, resize, config_name):
    """Read every header of a --data_path dataset before training: unreadable images (``bad_images`` stop: one
    line naming them; skip: left out and reported), and images that the config's shape would resize or convert
    (a --dataset folder needs --resize for that). Returns (names to leave out, the data's description)."""
    wanted = f"{resolution}x{resolution}x{channels}"
    if not isinstance(dataset, ImageFolderDataset):   # torchvision's mnist / cifar10: checked by check_dataset_config
        return [], f"data {name} in {data_root}: {len(dataset)} images, {wanted}"
    with progress_bar(total=len(dataset), desc="checking images", unit="images") as progress:
        report = dataset.scan(progress=lambda done: progress.update(done - progress.n))
    bad = report["bad"]
    shown = ", ".join(f"{item} ({reason})" for item, reason in bad[:3]) + (", ..." if len(bad) > 3 else "")
    if bad and bad_images == "stop":
        raise UserError(f"{len(bad)} unreadable image(s) in --data_path {data_path}: {shown}; remove them or "
                        f"pass --bad_images skip")
    if len(bad) == len(dataset):
        raise UserError(f"no readable image in --data_path {data_path} ({shown})")
    found = describe_images(report)
    resized, converted = conversions(report, resolution, channels)
    changes = [word for word, done in (("resized", resized),
                                       (f"converted to {'grey' if channels == 1 else 'RGB'}", converted)) if done]
    if changes and name == "folder" and not resize:
        raise UserError(f"--data_path {data_path} holds {found} images but {config_name} is for {wanted}: they "
                        f"would be {' and '.join(changes)}; pass --resize to allow that, or use a config for the "
                        f"images' size and channels")
    summary = (f"data {data_path}: {len(dataset) - len(bad)} images, {found}"
               + (f" {' and '.join(changes)} to {wanted}" if changes else f" = {wanted}"))
    if bad:
        summary += f", {len(bad)} unreadable skipped ({shown})"
    return [item for item, _ in bad], summary


# ----------------------------------------------------------------------------
# The networks and the loss.

def count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# ----------------------------------------------------------------------------
# Sample grids.

@torch.no_grad()
def sample_grids(nets, test_images, args, iteration, device, arrays=None, amp="none"):
    """The paper's grids from fixed noise (same at every call): trajectories and x0 predictions with N = --N
    and N = 4 from prior noise, and, for the learned coupling, from encoded test images. Returns statistics;
    ``arrays`` (a dict), when given, receives each grid as uint8 [H, W, C] under its name."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn(test_images.shape, generator=generator, device=device)
    stats = {}

    def grids(start, N, name, name_x0):
        result = euler(autocast_velocity(nets.flow, device, amp), start, N=N, return_traj=True)
        for images, grid_name in ((result.traj, name), (result.x0_preds, name_x0)):
            grid = make_grid(torch.cat(images), nrow=SAMPLE_COUNT)
            save_png(grid, os.path.join(args.dir, f"traj_{grid_name}_{iteration}.png"))
            if arrays is not None:
                arrays[grid_name] = grid
        stats[f"straightness_{name}"] = flowlib.straightness(result.traj).item()
        return result

    grids(noise, args.N, "uncond", "uncond_x0")
    grids(noise, 4, "uncond_N4", "uncond_x0_N4")
    if nets.encoder is not None:
        encoder_noise = torch.randn(test_images.shape, generator=generator, device=device)
        with amp_autocast(device, amp):
            z, _, _ = nets.encoder(test_images, noise=encoder_noise)
        z = z.float()
        result = grids(z, args.N, "reverse", "reverse_x0")
        stats["reconstruction_mse"] = (result.x - test_images).square().mean().item()
    return stats


# ----------------------------------------------------------------------------
# The training loop.

class Trainer:
    """One rank's training run: networks, optimizer, EMA, data stream, and the loop over iterations."""

    def __init__(self, info, run, state=None):
        """``run``: the training.run.ImageRun; ``state``: the loaded training state (or None: read
        ``run.resume_path`` when there is one)."""
        self.info, self.args = info, run
        args = run
        self.device = device = info.device
        self.log = plumbing.RunLog(args.dir, info.is_main, echo=tqdm.write)
        self.config_de, self.config_en = run.flow_config, run.encoder_config
        resolution, channels = self.config_de["img_resolution"], self.config_de["in_channels"]

        # Data (downloaded by prepare() on rank 0); fixed test images for the reconstruction grids.
        def dataset(train):
            return build_dataset(args.dataset, resolution, channels, data_path=args.data_path,
                                 data_root=args.data_root, train=train, bad_images=args.bad_images, download=False)
        self.dataset, test_set = dataset(True), dataset(False)
        if run.excluded_images:   # unreadable images found by check_images (--bad_images skip)
            self.dataset.exclude(list(run.excluded_images))
            test_set.exclude(list(run.excluded_images))
        self.test_images = torch.stack([test_set[k][0] for k in range(min(SAMPLE_COUNT, len(test_set)))]).to(device)

        # Networks: the same initial weights on every rank.
        plumbing.seed_everything(args.seed)
        flow = build_network(self.config_de, name=f"--config_de {args.config_de}")
        encoder = (build_encoder(self.config_en, name=f"--config_en {args.config_en}")
                   if self.config_en is not None else None)
        coupling = build_coupling(args.coupling, encoder=encoder, weight_prior=args.weight_prior, ot_reg=args.ot_reg)
        self.model = FlowWithCoupling(flow, coupling).to(device)
        fast_cpu.apply([self.model], run.cpu_fast_path[0])   # before the EMA copy, which inherits it
        self.params = self.model.optimizer_params()
        self.optimizer = plumbing.build_optimizer(self.params, args.optimizer, args.learning_rate)
        self.ema = None if args.no_ema else plumbing.EMA(self.model, args.ema_decay, args.ema_after_steps)

        self.start_iteration, batches_consumed, nonfinite_total = 1, 0, 0
        plumbing.seed_everything(plumbing.rank_seed(args.seed, info.rank))   # each rank draws its own noise
        if run.resume_path is not None:
            batches_consumed, nonfinite_total = self.resume(state)
        self.train_model = self.model
        if args.compile:
            self.train_model = torch.compile(self.train_model)
        if info.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = plumbing.ResumableBatchSampler(len(self.dataset), args.batchsize, info.rank, info.world_size,
                                                 args.seed)
        self.stream = plumbing.DataStream(self.dataset, sampler, args.num_workers, pin_memory=device.type == "cuda",
                                          batches_consumed=batches_consumed)
        self.agreement = plumbing.RankAgreement(info.distributed)
        # bf16: the weights' casts made once per step for all shards (utils/cpu_shards.py)
        self.shards = fast_cpu.thread_shards(run.cpu_shards, run.amp) if run.cpu_shards > 1 else None

        # Running sums on the device, read by the host only at log and save steps.
        self.window = torch.zeros(5, device=device)   # loss, flow loss, KL, grad norm, finite steps
        self.bad_in_a_row = torch.zeros((), device=device)
        self.longest_bad_run = torch.zeros((), device=device)
        self.bad_total = torch.full((), float(nonfinite_total), device=device)
        self.pending_samples = {}
        self.timer = (time.time(), self.start_iteration - 1)

        backend = f" ({torch.distributed.get_backend()})" if info.distributed else ""
        encoder = (f"encoder {count(self.model.encoder) / 1e6:.2f}M" if self.model.encoder is not None
                   else "no encoder")
        iterations = (f"iterations {self.start_iteration}..{args.iterations}" if self.start_iteration <= args.iterations
                      else "no iterations left")
        self.log.line(
            f"train: {device} x {info.world_size} process(es){backend}, global batch {args.batchsize} = "
            f"{info.world_size} x {args.batchsize // info.world_size}, flow network "
            f"{count(self.model.flow) / 1e6:.2f}M parameters, {encoder}, coupling {args.coupling}, "
            f"{run.data_summary or f'{len(self.dataset)} images'} ({sampler.steps_per_epoch} steps per "
            f"epoch), {f'{self.shards.shards} batch shards in threads, ' if self.shards else ''}{iterations}, "
            f"amp {run.amp} ({run.amp_reason}), CPU fast path {'on' if run.cpu_fast_path[0] else 'off'} "
            f"({run.cpu_fast_path[1]}){', compiled' if args.compile else ''} -> {args.dir}")

    def resume(self, state):
        """Restore from the run's training state; returns (batches consumed, non-finite steps so far)."""
        info, path = self.info, self.args.resume_path
        state = state or plumbing.load_training_state(path)
        restore(state, path, self.model, self.ema, self.optimizer)
        self.start_iteration = state["iter"] + 1
        batches_consumed, nonfinite_total, rng_restored = state["iter"], 0, False
        if state.get("format") == TRAINING_STATE_FORMAT:
            batches_consumed = check_data_order(state["data_order"], len(self.dataset), self.args, self.log)
            nonfinite_total = state["counters"]["nonfinite_total"]
            rng = state["rng"]
            if rng["world_size"] == info.world_size:
                plumbing.restore_rng_state(rng["ranks"][info.rank], self.device)
                rng_restored = True
            else:
                self.log.line(f"warning: the state was saved by {rng['world_size']} processes, this run has "
                              f"{info.world_size}: random streams are reseeded")
        if not rng_restored:
            plumbing.seed_everything(plumbing.rank_seed(self.args.seed + state["iter"], info.rank))
        if info.is_main:
            plumbing.truncate_stats(self.args.dir, state["iter"])
        self.log.line(f"resumed from {path} at iteration {state['iter']}")
        return batches_consumed, nonfinite_total

    def autocast(self):   # a fresh context each time: the shards of a CPU step enter one per thread
        return amp_autocast(self.device, self.args.amp)

    def step(self, iteration):
        """One optimizer step; a step whose gradient is not finite is skipped on the device."""
        args, autocast = self.args, self.autocast
        lr = plumbing.warmup_lr(args.learning_rate, iteration, args.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, _ = self.stream.next()
        x = x.to(self.device, non_blocking=True)
        t = flowlib.sample_time(x.shape[0], device=self.device)
        noise = self.model.coupling.assign(x, torch.randn_like(x))   # batch-level re-pairing (OT), else as drawn
        losses = self.train_model   # (loss, flow loss, KL) of models/losses.py

        self.optimizer.zero_grad(set_to_none=True)
        if self.shards is None:
            with autocast():
                loss, flow_loss, kl = losses(x, t, noise)
            loss.backward()
        else:
            # CPU: shards of the batch in threads (utils/cpu_shards.py); autocast is per thread, so each
            # shard enters its own.
            loss, flow_loss, kl = self.shards.step(losses, (x, t, noise), self.params, context=autocast)
        if args.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, args.grad_clip)
        else:
            grad_norm = plumbing.gradient_norm(self.params)
        # Gradients are all-reduced, so the norm is the same on every rank: all ranks skip the same steps.
        bad = (~torch.isfinite(grad_norm)).float()
        plumbing.optimizer_step(self.optimizer, bad)
        if self.ema is not None:
            self.ema.update(self.model, iteration, 1.0 - bad)
        terms = torch.stack([loss.detach(), flow_loss.detach(), kl.detach().float(), grad_norm.detach()])
        self.window[:4] += torch.where(bad == 0, terms, torch.zeros_like(terms))
        self.window[4] += 1.0 - bad
        self.bad_in_a_row.mul_(bad).add_(bad)
        torch.maximum(self.longest_bad_run, self.bad_in_a_row, out=self.longest_bad_run)
        self.bad_total.add_(bad)
        self.lr = lr

    def write_stats(self, iteration, progress):
        """Average the window over steps and ranks (the one host read of the losses), then log it."""
        world, lr = self.info.world_size, self.lr
        totals = dist.all_reduce_sum(self.window.clone()).tolist()
        finite_steps = totals[4] / world
        now = time.time()
        steps = iteration - self.timer[1]
        record = {"iter": iteration, "epoch": self.stream.epoch}
        for key, value in zip(("loss", "flow_loss", "kl", "grad_norm"), totals[:4]):
            record[key] = value / finite_steps / world if finite_steps else None   # null: every step skipped
        record.update(lr=lr, nonfinite_steps=int(self.bad_total.item()),
                      images_per_s=steps * self.args.batchsize / max(now - self.timer[0], 1e-9),
                      sec_per_iter=(now - self.timer[0]) / max(steps, 1), **self.pending_samples)
        self.timer, self.pending_samples = (now, iteration), {}
        self.window.zero_()
        self.log.stats(record)
        shown = {key: "nan" if record[key] is None else f"{record[key]:.6f}" for key in ("loss", "flow_loss", "kl")}
        # the progress line shows the last logged loss: say which iteration it is
        progress.set_postfix(loss=f"{shown['loss']} (it {iteration})", lr=f"{lr:.3g}")
        self.log.line(f"iteration {iteration}: loss {shown['loss']}, flow_loss {shown['flow_loss']}, "
                      f"kl {shown['kl']}, lr {lr:.3g}, {record['images_per_s']:.1f} img/s")

    def check_nonfinite(self, iteration):
        """Stop, on every rank alike, after --max_nonfinite skipped steps in a row."""
        longest = int(self.longest_bad_run.item())
        if longest >= self.args.max_nonfinite:
            latest = os.path.join(self.args.dir, plumbing.LATEST_NAME)
            kept = f"the last good snapshot is {latest}" if os.path.isfile(latest) else "no snapshot was written"
            raise UserError(f"stopped at iteration {iteration}: {longest} consecutive steps had a non-finite loss "
                            f"or gradient (each was skipped); {kept}. Lower --learning_rate, set --grad_clip, "
                            f"or use --amp none")

    def sample(self, iteration):
        nets = self.ema.module if self.ema is not None else self.model
        self.model.eval()
        grids = {}
        self.pending_samples = sample_grids(nets, self.test_images, self.args, iteration, self.device, grids,
                                            self.args.amp)
        self.model.train()
        self.log.images(grids, iteration)
        self.log.line(f"iteration {iteration}: samples, " + ", ".join(
            f"{key} {value:.5g}" for key, value in self.pending_samples.items()))

    def save(self, iteration, numbered, final):
        """Gather every rank's random state and weight checksum; rank 0 writes the files (the weights are
        finite: :meth:`check` comes first)."""
        args, model, ema = self.args, self.model, self.ema
        weights = model.state_dicts()
        averaged = ema.module.state_dicts() if ema is not None else weights   # --no_ema: raw weights
        rng = plumbing.gather_objects(plumbing.capture_rng_state(self.device))
        checksums = plumbing.gather_objects(plumbing.state_checksum(
            [d for d in (*weights.values(), *averaged.values()) if d is not None]))
        if len(set(checksums)) > 1:
            raise RuntimeError(f"the ranks hold different weights at iteration {iteration} (checksums {checksums})")
        if not self.info.is_main:
            return
        files = []   # (what, name), written all or none (a full disk half-way leaves the folder as it was)
        if final or numbered:
            files.append((averaged["flow"], f"flow_model_{iteration}_ema.pth"))
            if averaged["encoder"] is not None:
                files.append((averaged["encoder"], f"forward_model_{iteration}_ema.pth"))
        state = {
            "format": TRAINING_STATE_FORMAT,
            "iter": iteration,
            "model_state_dict": weights["flow"],
            "optimizer_state_dict": self.optimizer.state_dict(),
            "ema_model_state_dict": averaged["flow"] if ema is not None else None,
            "args": {**args.options, "amp_used": args.amp},   # the option, and the precision it gave
            "config_de": self.config_de,
            "config_en": self.config_en,
            "rng": {"world_size": self.info.world_size, "ranks": rng},
            "data_order": self.stream.state_dict(),
            "counters": {"nonfinite_total": int(self.bad_total.item())},
            "param_checksums": checksums,
        }
        if weights["encoder"] is not None:
            state["forward_model_state_dict"] = weights["encoder"]
            state["ema_forward_model_state_dict"] = averaged["encoder"] if ema is not None else None
        for name in ([f"training_state_{iteration}.pth"] if numbered else []) + [plumbing.LATEST_NAME]:
            files.append((state, name))
        save_torch_all([(obj, os.path.join(args.dir, name)) for obj, name in files])
        self.log.line(f"iteration {iteration}: saved {', '.join(name for _, name in files)} "
                      f"(weights checksum {checksums[0]})")

    # The hooks of training/loop.py.
    def check(self, iteration):
        """Before the iteration's samples, record or save (every rank alike)."""
        self.check_nonfinite(iteration)
        self.check_weights(iteration)

    def check_weights(self, iteration):
        """Weights or an EMA that are not finite are never sampled from or written: every rank (they hold the
        same weights) stops with one line, and the files of earlier iterations stay as they are."""
        weights = self.model.state_dicts()
        averaged = self.ema.module.state_dicts() if self.ema is not None else {}
        if not plumbing.all_finite([tensor for d in (*weights.values(), *averaged.values()) if d is not None
                                    for tensor in d.values()]):
            latest = os.path.join(self.args.dir, plumbing.LATEST_NAME)
            kept = (f"the files of earlier iterations are kept (latest state: {latest})" if os.path.isfile(latest)
                    else "no state was saved before")
            raise UserError(f"stopped at iteration {iteration}: the weights or their EMA hold inf or NaN after a "
                            f"step with a finite gradient, so nothing was saved; {kept}. Lower --learning_rate or "
                            f"set --grad_clip")

    def evaluate(self, iteration):
        self.sample(iteration)

    def run(self):
        args = self.args
        schedule = loop.Schedule(log_every=args.log_every, evaluate_every=args.sample_every,
                                 save_every=args.save_every, snapshot_every=args.snapshot_every)
        loop.run(self, self.start_iteration, args.iterations, schedule, desc="train", is_main=self.info.is_main,
                 agreement=self.agreement, closing=[self.shards] if self.shards is not None else [])


def restore(state, path, model, ema, optimizer):
    """Load networks, EMA and optimizer from a training state (this project's or the paper's)."""
    what = f"--resume {path}"
    load_state_dict_strict(model.flow, state["model_state_dict"], path, what=what)
    if model.encoder is not None:
        load_state_dict_strict(model.encoder, state["forward_model_state_dict"], path, what=what)
    optimizer_state = state["optimizer_state_dict"]
    # The paper's EMA lives in the optimizer's per-parameter state under 'ema'.
    paper_ema = {index: entry.pop("ema") for index, entry in optimizer_state["state"].items() if "ema" in entry}
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise UserError(f"{what}: the optimizer state does not fit these networks ({error})") from None
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)   # fused, for skipping bad steps on the device
    if ema is None:
        return
    averaged = ema.module
    if state.get("ema_model_state_dict") is not None:
        load_state_dict_strict(averaged.flow, state["ema_model_state_dict"], path, what=what)
        if averaged.encoder is not None:
            load_state_dict_strict(averaged.encoder, state["ema_forward_model_state_dict"], path, what=what)
    else:
        averaged.load_state_dict(model.state_dict())
        with torch.no_grad():
            for index, parameter in enumerate(averaged.optimizer_params()):
                if index in paper_ema:
                    parameter.copy_(paper_ema[index])


def check_data_order(data_order, dataset_size, args, log):
    """The saved data position, with a warning when the dataset or the global batch changed."""
    if data_order["dataset_size"] != dataset_size or data_order["global_batch"] != args.batchsize \
            or data_order["seed"] != args.seed:
        log.line(f"warning: the data order was saved for {data_order['dataset_size']} images, global batch "
                 f"{data_order['global_batch']}, seed {data_order['seed']}; this run has {dataset_size}, "
                 f"{args.batchsize}, {args.seed}: the order continues but is not the same as an uninterrupted run")
    return data_order["batches_consumed"]
