"""The training losses of Fast-ODE, each written once.

Conventions (the paper's): data ``x`` at t = 0, noise ``z`` at t = 1, ``z_t = t z + (1 - t) x`` and the
velocity target ``z - x`` (``models/flow.py``). Every loss is computed in float32, also under bf16 autocast.

- :func:`flow_matching_loss`: mean squared error of the predicted velocity against ``z - x``.
- :func:`kl_per_dim`: the learned coupling's KL(q(z|x) || prior), summed over dimensions, averaged over the
  batch and divided by the data dimension (the paper's ``get_kl`` for images and ``get_kl_2d`` for the toy).
- :func:`coupled_flow_loss`: the paper's loss for any coupling: flow matching on the coupling's pairs plus the
  coupling's own term (``weight_prior * KL / dim`` for the learned one, nothing for the others). Reflow is
  this loss on fixed (z, x) pairs (``models.couplings.FixedPairs``).
- :func:`distill_loss`: the one-step distillation loss of the paper's ``distill.py``.
"""
from typing import NamedTuple

import torch

from models import flow as flowlib


def velocity_loss(velocity_pred, target):
    """Mean over all elements of (prediction - target)^2, in float32."""
    return (velocity_pred.float() - target.float()).square().mean()


def flow_matching_loss(velocity_pred, x, z):
    """Mean squared error between the predicted velocity and ``z - x`` (mean over all elements)."""
    return velocity_loss(velocity_pred, flowlib.target_velocity(x, z))


def gaussian_kl(mu, logvar, variances=None):
    """KL(N(mu, exp(logvar)) || N(0, variances)) per element; ``variances`` None is N(0, I):
    0.5 * (mu^2 + exp(logvar) - 1 - logvar)."""
    if variances is None:
        return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    return 0.5 * ((mu.square() + logvar.exp()) / variances - 1.0 - logvar + variances.log())


def kl_per_dim(mu, logvar, variances=None):
    """The training loss's KL term: summed over dimensions, averaged over the batch, divided by the
    dimension. ``variances`` (broadcast against one sample, e.g. [2] in 2D) is the diagonal prior's; None: I."""
    per_sample = gaussian_kl(mu, logvar, variances).flatten(1).sum(dim=1)
    return per_sample.mean() / mu[0].numel()


class LossTerms(NamedTuple):
    """One batch's loss and its parts, 0-dim tensors: ``loss`` (what is minimised) = ``flow_loss`` (+
    ``weight_prior * kl`` for the learned coupling); ``kl`` unweighted (0 without an encoder)."""
    loss: torch.Tensor
    flow_loss: torch.Tensor
    kl: torch.Tensor


def coupled_flow_loss(flow,               # velocity network v(z_t, t)
                      coupling,           # a models.couplings.Coupling
                      x,                  # [B, ...] data (t = 0)
                      t,                  # [B] times
                      noise,              # [B, ...] N(0, I) noise after coupling.assign (FixedPairs: the partner z)
                      interpolation="linear"):  # "linear" (the paper's images) or "vp" (the 2D example's --ddpm)
    """The paper's training loss of one batch for any coupling: :class:`LossTerms`."""
    pairing = coupling.pair(x, noise)
    z = pairing.z
    if interpolation == "vp":
        flow_loss = velocity_loss(flow(flowlib.interpolate_vp(x, z, t), t), flowlib.target_velocity_vp(x, z, t))
    elif interpolation == "linear":
        flow_loss = flow_matching_loss(flow(flowlib.interpolate(x, z, t), t), x, z)
    else:
        raise ValueError(f"unknown interpolation {interpolation!r}; known: linear, vp")
    if pairing.kl is None:
        return LossTerms(flow_loss, flow_loss, torch.zeros((), device=x.device))
    return LossTerms(flow_loss + pairing.weight * pairing.kl, flow_loss, pairing.kl)


def distill_loss(net, x, z):
    """The paper's one-step distillation: mean over all elements of (z - v(z, 1) - x)^2."""
    prediction = z - net(z, torch.ones(z.shape[0], device=z.device))
    return velocity_loss(prediction, x)
