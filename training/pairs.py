"""Training on fixed (z, x) pairs, one process: one-step distillation and reflow (distill.py's run).

- distill: the paper's ``distill.py``: the student v starts from the teacher's weights and minimises
  ``(z - v(z, 1) - x)^2`` (``models.losses.distill_loss``), so one Euler step maps z to x.
- reflow (Liu et al.): flow matching on the pairs, the coupling ``models.couplings.FixedPairs``.

Driven by the one loop of ``training/loop.py``; the state is the trainer's format (``utils/checkpoint.py``)
with ``task`` = the mode, so one resume search (``utils.train.find_resume_state``) serves both scripts.
"""
import math
import os
import time

import torch
from tqdm import tqdm

from models import fast_cpu
from models import flow as flowlib
from models.couplings import FixedPairs
from models.losses import coupled_flow_loss, distill_loss
from models.solvers import euler
from training import loop
from utils import train as plumbing
from utils.amp import autocast, autocast_velocity
from utils.checkpoint import TRAINING_STATE_FORMAT
from utils.errors import UserError
from utils.images import save_grid
from utils.io import atomic_write, save_json, save_torch_all

GRID_SIZE = 64                            # most samples in a pred_{i}.png (the paper: one batch)
ADAM_BETAS, ADAM_EPS = (0.9, 0.9999), 1e-8  # the paper's distill.py
FIXED_PAIRS = FixedPairs()                # reflow's coupling: each x with its own z (holds no state)


def pair_loss(mode, net, x, z):
    """The loss of one batch of pairs: ``distill`` or ``reflow`` (t ~ U(1e-5, 1) drawn here)."""
    if mode == "distill":
        return distill_loss(net, x, z)
    t = flowlib.sample_time(x.shape[0], device=x.device)
    return coupled_flow_loss(net, FIXED_PAIRS, x, t, z).loss


@torch.no_grad()
def sample(net, z, N):
    """Euler from t = 1 to 0 with N steps (N = 1: z - v(z, 1))."""
    return euler(net, z, N=N).x


@torch.no_grad()
def mean_sample_error(net, loader, N, device):
    """Mean squared error, over all elements of all pairs, between ``sample(net, z, N)`` and x."""
    total, count = 0.0, 0
    for x, z in loader:
        x, z = x.to(device), z.to(device)
        total += (sample(net, z, N).float() - x.float()).square().sum().item()
        count += x.numel()
    return total / count


def model_path(folder, mode, iteration):
    return os.path.join(folder, f"flow_model_{'distilled' if mode == 'distill' else 'reflow'}_{iteration}.pth")


class PairTrainer:
    """The student, its optimizer and data; the hooks of training/loop.py."""

    def __init__(self, args, plan):
        self.args, self.plan = args, plan
        self.device = device = plan["device"]
        self.log = plumbing.RunLog(args.dir, True, echo=tqdm.write)
        self.student = student = plan["student"].to(device)
        fast_cpu.apply([student], plan["cpu_fast_path"][0])
        state = plan["state"]
        self.optimizer = torch.optim.Adam(student.parameters(), lr=args.learning_rate, betas=ADAM_BETAS,
                                          eps=ADAM_EPS)
        plumbing.seed_everything(args.seed)
        if state is None:
            self.start, batches_consumed = 0, 0
            with atomic_write(os.path.join(args.dir, "stats.jsonl"), "w"):
                pass
        else:
            self.start, batches_consumed = self.restore(state)
        plan["state"] = state = None
        student.train()
        for group in self.optimizer.param_groups:   # the learning rate of this command, also after a resume
            group["lr"] = args.learning_rate
        sampler = plumbing.ResumableBatchSampler(len(plan["train_set"]), args.batchsize, 0, 1, args.seed)
        self.stream = plumbing.DataStream(plan["train_set"], sampler, args.num_workers,
                                          pin_memory=device.type == "cuda", batches_consumed=batches_consumed)
        self.test_loader = torch.utils.data.DataLoader(plan["test_set"], batch_size=args.batchsize, shuffle=False,
                                                       num_workers=args.num_workers,
                                                       persistent_workers=args.num_workers > 0)
        self.grid_noise = torch.randn(min(GRID_SIZE, args.batchsize), args.input_nc, args.res, args.res,
                                      generator=torch.Generator().manual_seed(args.seed)).to(device)
        self.velocity = autocast_velocity(student, device, plan["amp"])   # evaluation and grids, same autocast
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0
        self.timer, self.pending = (time.time(), self.start), {}
        if self.start == 0 or self.start < args.iterations:   # a resume with nothing left keeps the record of the state
            save_json({**vars(args), "resolved_config_de": plan["config"], "amp_used": plan["amp"],
                       "amp_reason": plan["amp_reason"], "cpu_fast_path_used": plan["cpu_fast_path"][0],
                       "cpu_fast_path_reason": plan["cpu_fast_path"][1]}, os.path.join(args.dir, "config.json"))
        parameters = sum(p.numel() for p in student.parameters())
        iterations = (f"iterations {self.start + 1}..{args.iterations}" if self.start < args.iterations
                      else "no iterations left")
        self.log.line(f"distill: mode {args.mode}, {device}, {len(plan['train_set'])} training pairs, "
                      f"{len(plan['test_set'])} test pairs, batch {args.batchsize}, lr {args.learning_rate:g}, "
                      f"{iterations}, student {parameters / 1e6:.3f}M parameters from {plan['teacher_path']}, "
                      f"test loss with {args.N} Euler step(s), amp {plan['amp']} ({plan['amp_reason']}), CPU fast path "
                      f"{'on' if plan['cpu_fast_path'][0] else 'off'} -> {args.dir}")
        for warning in plan["warnings"]:
            self.log.line(warning)

    def restore(self, state):
        args, plan = self.args, self.plan
        try:
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
        except (ValueError, KeyError) as error:
            raise UserError(f"--resume {plan['state_path']}: the optimizer state does not fit the network "
                            f"({error})") from None
        order = state["data_order"]
        if (order["global_batch"], order["seed"], order["dataset_size"]) != (args.batchsize, args.seed,
                                                                             len(plan["train_set"])):
            self.log.line("warning: the pairs, --batchsize or --seed changed since the state was saved: the data "
                          "order continues but differs from an uninterrupted run")
        plumbing.restore_rng_state(state["rng"]["ranks"][0], self.device)
        plumbing.truncate_stats(args.dir, state["iter"])
        self.log.line(f"resumed from {plan['state_path']} at iteration {state['iter']}")
        return state["iter"], order["batches_consumed"]

    def next_batch(self):
        # A DataLoader draws its workers' base seed from the global CPU generator whenever it starts an
        # iterator (each epoch, and after a resume): keep that away from the training noise (t, dropout),
        # so that a resumed run continues exactly.
        with torch.random.fork_rng(devices=[]):
            x, z = self.stream.next()
        return x.to(self.device, non_blocking=True), z.to(self.device, non_blocking=True)

    # The hooks of training/loop.py.
    def step(self, iteration):
        x, z = self.next_batch()
        with autocast(self.device, self.plan["amp"]):
            loss = pair_loss(self.args.mode, self.student, x, z)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plumbing.step_or_stop(self.optimizer, "--learning_rate")
        self.loss_sum += loss.detach()
        self.loss_count += 1

    def test_error(self, iteration):
        """Test loss and the fixed-noise grid, with dropout off."""
        self.student.eval()
        with torch.random.fork_rng(devices=[]):
            error = mean_sample_error(self.velocity, self.test_loader, self.args.N, self.device)
        save_grid(sample(self.velocity, self.grid_noise, self.args.N),
                  os.path.join(self.args.dir, f"pred_{iteration}.png"))
        self.student.train()
        self.log.line(f"iteration {iteration}: test loss {error:.6f}")
        return error

    def evaluate(self, iteration):
        self.pending = {"test_loss": self.test_error(iteration)}

    def check(self, iteration):
        """Before the iteration's grid, record or save: the student's weights and the window's loss are finite."""
        if not plumbing.all_finite(self.student.state_dict().values()):
            raise UserError(f"stopped at iteration {iteration}: the student's weights hold inf or NaN, so nothing "
                            f"was saved (the files of earlier iterations are kept); lower --learning_rate")
        mean_loss = self.loss_sum.item() / max(self.loss_count, 1)
        if not math.isfinite(mean_loss):
            raise UserError(f"the training loss is {mean_loss} at iteration {iteration}; lower --learning_rate "
                            f"(the last saved state is kept)")

    def write_stats(self, iteration, progress):
        mean_loss = self.loss_sum.item() / max(self.loss_count, 1)   # finite: check() comes first
        now = time.time()
        self.log.stats({"iter": iteration, "loss": mean_loss, "test_loss": self.pending.pop("test_loss", None),
                        "sec_per_iter": (now - self.timer[0]) / max(iteration - self.timer[1], 1)})
        self.log.line(f"iteration {iteration}: loss {mean_loss:.6f}")
        # the progress line shows the last logged loss: say which iteration it is
        progress.set_postfix(loss=f"{mean_loss:.5f} (it {iteration})")
        self.loss_sum.zero_()
        self.loss_count, self.timer = 0, (time.time(), iteration)

    def save(self, iteration, numbered, final):
        args, student = self.args, self.student   # weights finite: check() comes first
        files = []   # written all or none (a full disk half-way leaves the folder as it was)
        if numbered or final:
            files.append((student.state_dict(), model_path(args.dir, args.mode, iteration)))
        files.append(({
            "format": TRAINING_STATE_FORMAT,
            "task": args.mode,
            "mode": args.mode,   # distill.py's v1 key, kept for readers of the state
            "iter": iteration,
            "teacher": self.plan["teacher_path"],
            "model_state_dict": student.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "args": {**vars(args), "amp_used": self.plan["amp"]},   # the option, and the precision it gave
            "config_de": self.plan["config"],
            "rng": {"world_size": 1, "ranks": [plumbing.capture_rng_state(self.device)]},
            "data_order": self.stream.state_dict(),
        }, os.path.join(args.dir, plumbing.LATEST_NAME)))
        save_torch_all(files)
        self.log.line(f"iteration {iteration}: saved {', '.join(os.path.basename(path) for _, path in files)}")

    def run(self):
        args = self.args
        if self.start == 0 and args.iterations > 0:
            self.log.stats({"iter": 0, "loss": None, "test_loss": self.test_error(0)})
        schedule = loop.Schedule(log_every=args.log_every, evaluate_every=args.eval_every,
                                 save_every=args.save_every, snapshot_every=args.save_every,
                                 log_with_evaluation=True)
        loop.run(self, self.start + 1, args.iterations, schedule, desc=args.mode)
