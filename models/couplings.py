"""Couplings: which noise z (t = 1) each data point x (t = 0) is trained with.

A coupling has two stages, both taking standard normal ``noise`` shaped like ``x``:

- ``assign(x, noise, generator=None) -> noise``: a batch-level re-pairing without gradients (minibatch OT,
  Sinkhorn), run once on a whole (per-process) batch, before a CPU step splits it into shards. The others
  return ``noise`` unchanged.
- ``pair(x, noise) -> Pairing``: per example, differentiable: ``z`` from the noise (scaled to the prior, or
  through the learned encoder), and for the learned coupling the KL term and its weight.

The loss on a pairing is ``models.losses.coupled_flow_loss``. Couplings are ``nn.Module``s so that the
learned encoder trains (and is synchronised by DDP) with the flow. The prior is N(0, diag(prior_variances))
(None: N(0, I), the images'; the 2D example's wide prior is diag(36, 1)).

Registry: ``COUPLINGS`` maps a name to its class; ``build_coupling(name, **options)`` builds one (unknown
names raise ``ValueError`` listing the known ones). A new coupling is one class plus one entry there.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from models.losses import coupled_flow_loss, kl_per_dim


class Pairing(NamedTuple):
    """``z`` [B, ...]: the noise end of each pair; ``kl``: the learned coupling's KL per dimension (0-dim,
    float32) or None; ``weight``: its weight in the loss (beta, ``--weight_prior``)."""
    z: torch.Tensor
    kl: Optional[torch.Tensor] = None
    weight: float = 0.0


class Coupling(nn.Module):
    """Base class: the independent coupling, z = the prior sample itself."""

    name = "independent"
    needs_encoder = False      # holds a network trained with the flow (the learned coupling)
    min_batch = 1              # images per batch (per process) the coupling needs
    fixed_pairs = False        # z comes with the data (reflow, distillation), not from the prior

    def __init__(self, prior_variances=None):
        super().__init__()
        variances = None if prior_variances is None else torch.as_tensor(prior_variances, dtype=torch.float32)
        # not a persistent buffer: the state dicts of the networks stay the paper's
        self.register_buffer("prior_variances", variances, persistent=False)

    def prior_scale(self, noise):
        """N(0, I) noise scaled to the prior."""
        return noise if self.prior_variances is None else noise * self.prior_variances.sqrt()

    def assign(self, x, noise, generator=None):
        return noise

    def pair(self, x, noise):
        return Pairing(self.prior_scale(noise))

    def extra_repr(self):
        return "" if self.prior_variances is None else f"prior_variances={self.prior_variances.tolist()}"


class Independent(Coupling):
    """q(x, z) = p(x) p(z): 1-rectified flow (Liu et al.), the paper's ``--independent``."""


class Learned(Coupling):
    """The paper's coupling: z ~ q(z|x) = N(mu(x), diag(exp(logvar(x)))) from ``encoder``, trained jointly with
    the flow under ``weight_prior * KL(q(z|x) || prior) / dim``. ``encoder(x, noise=noise) -> (z, mu, logvar)``."""

    name = "learned"
    needs_encoder = True

    def __init__(self, encoder, weight_prior, prior_variances=None):
        super().__init__(prior_variances)
        self.encoder = encoder
        self.weight_prior = float(weight_prior)

    def pair(self, x, noise):
        z, mu, logvar = self.encoder(x, noise=noise)
        return Pairing(z, kl_per_dim(mu.float(), logvar.float(), self.prior_variances), self.weight_prior)


def ot_assignment(x, z):
    """Exact minibatch OT (Tong et al.; Pooladian et al.): the order of ``z`` that minimises
    sum_i ||x_i - z_order[i]||^2, by the Hungarian algorithm (scipy) on squared Euclidean distances."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).square()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[rows.argsort()], device=z.device)


class Grouped(Coupling):
    """A batch-level re-pairing run within groups: group k holds points k, k + G, k + 2G, ... (G groups of
    about ``group_size``; 0 or None: the whole batch), so a batch of one mode followed by another gives
    every group both. Subclasses give ``order(x, z, generator)``: for each x_i the index of its z."""

    min_batch = 2

    def __init__(self, group_size=None, prior_variances=None):
        super().__init__(prior_variances)
        self.group_size = group_size or 0

    @torch.no_grad()
    def assign(self, x, noise, generator=None):
        groups = 1 if self.group_size <= 0 else max(1, x.shape[0] // self.group_size)
        scaled = self.prior_scale(noise)
        paired = torch.empty_like(noise)
        for k in range(groups):
            paired[k::groups] = noise[k::groups][self.order(x[k::groups], scaled[k::groups], generator)]
        return paired


class MinibatchOT(Grouped):
    """Noise re-paired by exact minibatch optimal transport within each group."""

    name = "ot"

    def order(self, x, z, generator):
        return ot_assignment(x, z)


def sinkhorn_plan(cost, reg, iterations=2000, tolerance=1e-9):
    """The entropic OT plan between uniform marginals: argmin <P, C> - eps H(P), eps = ``reg`` x the mean
    cost (scale-free), by Sinkhorn's iterations (float64; in the log domain when exp(-C / eps) would
    underflow). Returns P [n, m] (rows sum to 1/n, columns to 1/m, up to ``tolerance``)."""
    cost = cost.double()
    epsilon = reg * cost.mean().clamp_min(1e-300)
    n, m = cost.shape
    log_a, log_b = -math.log(n), -math.log(m)
    kernel = -cost / epsilon
    if kernel.min() > -300:
        # exp(kernel) and the scalings u, v stay far inside float64's range: the same iteration by matrix-vector
        # products, several times faster than the log domain's logsumexps
        gibbs = kernel.exp()
        gibbs_v = gibbs @ torch.ones(m, dtype=torch.float64, device=cost.device)   # gibbs @ v for v = 1
        for _ in range(iterations):
            u = (1.0 / n) / gibbs_v
            v = (1.0 / m) / (gibbs.T @ u)
            gibbs_v = gibbs @ v      # the row sums' check now, and the next u
            if (u * gibbs_v - 1.0 / n).abs().max() < tolerance:
                break
        return u[:, None] * gibbs * v[None, :]
    f = torch.zeros(n, dtype=torch.float64, device=cost.device)
    g = torch.zeros(m, dtype=torch.float64, device=cost.device)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(kernel + g[None, :], dim=1)
        g = log_b - torch.logsumexp(kernel + f[:, None], dim=0)
        rows = torch.logsumexp(kernel + f[:, None] + g[None, :], dim=1).exp()
        if (rows - 1.0 / n).abs().max() < tolerance:
            break
    return (kernel + f[:, None] + g[None, :]).exp()


class SinkhornOT(Grouped):
    """Entropic minibatch OT (Cuturi's Sinkhorn; the ``sinkhorn`` plan of Tong et al.'s torchcfm): the plan P of
    :func:`sinkhorn_plan` with ``ot_reg`` on squared distances, and each x_i draws its z from the row P[i] / sum.
    ``ot_reg`` -> 0 gives exact OT; large ``ot_reg`` the independent coupling. A noise sample may be drawn for
    several data points, or none."""

    name = "sinkhorn"

    def __init__(self, ot_reg=0.05, group_size=None, prior_variances=None):
        super().__init__(group_size, prior_variances)
        if not (ot_reg > 0 and math.isfinite(ot_reg)):
            raise ValueError(f"the Sinkhorn coupling needs ot_reg > 0, got {ot_reg}")
        self.ot_reg = float(ot_reg)

    def order(self, x, z, generator):
        cost = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).square()
        plan = sinkhorn_plan(cost, self.ot_reg)
        device = "cpu" if generator is None else generator.device
        return torch.multinomial(plan.to(device), 1, generator=generator).squeeze(1).to(z.device)


class FixedPairs(Coupling):
    """Pairs that come with the data: reflow (Liu et al.) and distillation train on (z, x) generated by a
    teacher; the trainer passes each x's own z as ``noise``."""

    name = "fixed"
    fixed_pairs = True

    def pair(self, x, noise):
        return Pairing(noise)


COUPLINGS = {cls.name: cls for cls in (Learned, Independent, MinibatchOT, SinkhornOT)}
# what each coupling is, for --help texts
DESCRIPTIONS = {
    "learned": "encoder q(z|x), trained jointly under weight_prior * KL (the paper)",
    "independent": "z ~ prior, regardless of x (rectified flow)",
    "ot": "prior noise re-paired by exact minibatch optimal transport",
    "sinkhorn": "prior noise re-paired by entropic (Sinkhorn) minibatch OT, regularisation --ot_reg",
}


# The trainers' options that only some couplings use; an option given another value than its default for a
# coupling that ignores it gets a warning (:func:`unused_options`).
OPTION_USERS = {
    "weight_prior": ("learned",),
    "config_en": ("learned",),
    "ot_reg": ("sinkhorn",),
    "ot_batch": ("ot", "sinkhorn"),
}


def unused_options(coupling, values, defaults):
    """(option, couplings that use it) for each option of :data:`OPTION_USERS` in ``values`` (a dict) that
    ``coupling`` ignores although it is set to something other than its entry in ``defaults``."""
    return [(name, users) for name, users in OPTION_USERS.items()
            if name in values and coupling not in users and values[name] != defaults.get(name)]


def unused_option_warnings(coupling, values, defaults):
    """One warning line per option of :func:`unused_options`."""
    return [f"warning: --{name} has no effect with --coupling {coupling} (it is used by "
            f"{' and '.join(users)} only)" for name, users in unused_options(coupling, values, defaults)]


def build_coupling(name, encoder=None, weight_prior=0.0, prior_variances=None, group_size=None, ot_reg=0.05):
    """The coupling ``name`` of :data:`COUPLINGS`; options a coupling does not use are ignored."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; known: {', '.join(COUPLINGS)}")
    cls = COUPLINGS[name]
    if cls is Learned:
        if encoder is None:
            raise ValueError("the learned coupling needs an encoder")
        return Learned(encoder, weight_prior, prior_variances)
    if cls is SinkhornOT:
        return SinkhornOT(ot_reg, group_size, prior_variances)
    if issubclass(cls, Grouped):
        return cls(group_size, prior_variances)
    return cls(prior_variances)


class FlowWithCoupling(nn.Module):
    """The velocity network ``flow`` and its ``coupling``; ``forward(x, t, noise)`` gives the
    :class:`models.losses.LossTerms`. One module, so that one DDP wrapper synchronises the flow's and the
    encoder's gradients."""

    def __init__(self, flow, coupling, interpolation="linear"):
        super().__init__()
        self.flow = flow
        self.coupling = coupling
        self.interpolation = interpolation

    @property
    def encoder(self):
        return getattr(self.coupling, "encoder", None)

    def forward(self, x, t, noise):
        return coupled_flow_loss(self.flow, self.coupling, x, t, noise, self.interpolation)

    def optimizer_params(self):
        """Encoder parameters first, then the flow's: the paper's order, so optimizer states line up."""
        encoder = list(self.encoder.parameters()) if self.encoder is not None else []
        return encoder + list(self.flow.parameters())

    def state_dicts(self):
        return {"flow": self.flow.state_dict(),
                "encoder": self.encoder.state_dict() if self.encoder is not None else None}
