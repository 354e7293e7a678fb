"""The 2D example's training step and evaluation, shared by ``train_reverse_2d_joint.py`` and
``benchmarks/couplings_2d.py``.

The coupling and the loss are ``models/couplings.py`` and ``models/losses.py``; the batch and its noise come
from ``models.toy2d.training_batch``. The random draws of a step, all from the training generator, in order:
the batch, its noise, the coupling's own draws (Sinkhorn), the times.
"""
import torch

from models import flow as flowlib
from utils import metrics2d
from utils.amp import autocast
from utils.train import step_or_stop


def training_step(model,            # models.couplings.FlowWithCoupling (velocity MLP + coupling)
                  optimizer,        # over model.parameters()
                  x,                # [B, 2] data (t = 0)
                  noise,            # [B, 2] N(0, I) noise (FixedPairs: each x's own z)
                  generator,        # CPU torch.Generator for the coupling's draws and the times
                  amp="none"):      # "none" or "bf16" (utils.amp.resolve_amp)
    """One optimiser step on the coupled flow-matching loss; returns {"loss", "loss_fm", "kl"} as floats
    ("kl" None without an encoder)."""
    noise = model.coupling.assign(x, noise, generator)
    t = flowlib.sample_time(x.shape[0], generator=generator).to(x.device)
    with autocast(x.device, amp):
        terms = model(x, t, noise)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    step_or_stop(optimizer, "--lr")
    return {"loss": terms.loss.item(), "loss_fm": terms.flow_loss.item(),
            "kl": terms.kl.item() if model.encoder is not None else None}


@torch.no_grad()
def evaluate(velocity,              # v(z, t): the flow MLP, or utils.amp.autocast_velocity of it
             noise,                 # [n, 2] prior noise, the same for every NFE
             eval_N,                # Euler step counts, e.g. (1, 2, 4, 8, 128)
             reference):            # [m, 2] fresh samples of the true mixture
    """Euler samples from ``noise`` for each N, their energy distances, and the straightness at max N.

    Returns ``(metrics, samples)``: metrics has ``straightness`` (Euler, N = max(eval_N)),
    ``straightness_N`` and ``energy_distance`` {N: value}; samples maps N to [n, 2] tensors.
    """
    longest = max(eval_N)
    within_reference = metrics2d.mean_pairwise_distance(reference)
    result = flowlib.euler(velocity, noise, N=longest, return_traj=True)
    samples = {longest: result.x}
    for steps in eval_N:
        if steps != longest:
            samples[steps] = flowlib.euler(velocity, noise, N=steps).x
    metrics = {
        "straightness": flowlib.straightness(result.traj).item(),
        "straightness_N": longest,
        "energy_distance": {str(steps): metrics2d.energy_distance(samples[steps], reference, within_reference)
                            for steps in eval_N},
    }
    return metrics, samples
