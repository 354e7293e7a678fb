"""The paper's 2D example, a two-mode Gaussian: its data, its prior, its random streams and its networks.

Shared by ``train_reverse_2d_joint.py`` and ``benchmarks/couplings_2d.py`` (scripts never import each
other). The couplings and the loss are the images' own (``models/couplings.py``, ``models/losses.py``),
with the wide prior as their ``prior_variances``; the metrics are in ``utils/metrics2d.py``, the figures'
helpers in ``utils/plot2d.py`` and the training step in ``training/train2d.py``.

Data (as in the paper's ``train_reverse_2d_joint.py``): two Gaussians with means
(-8, 8) and (8, 8), covariance diag(3, 0.1) and equal weights. The paper draws a
fixed set of 100,000 points per mode and alternates training batches between the
modes: every batch holds points of one mode only.

Prior: "wide" N(0, diag(36, 1)) by default (it covers both modes horizontally),
or N(0, I).
"""
import numpy as np
import torch

from models import couplings as couplinglib
from models.mlp import EncoderMLP, VelocityMLP

MODE_MEANS = ((-8.0, 8.0), (8.0, 8.0))
MODE_VARIANCES = (3.0, 0.1)        # diagonal of each mode's covariance
WIDE_PRIOR_VARIANCES = (36.0, 1.0)
UNIT_PRIOR_VARIANCES = (1.0, 1.0)
POINTS_PER_MODE = 100_000          # the paper's fixed training set per mode
COUPLINGS = tuple(couplinglib.COUPLINGS)
OT_BATCH = 128                     # points per exact OT assignment (512 costs ~25x more per step)


# ----------------------------------------------------------------------------
# Randomness: one independent stream per purpose, so drawing figures never changes
# training and every number depends on --seed alone. The streams: the training set;
# training batches, noise and times; evaluation prior noise; the reference draw of the
# mixture; a second draw (the energy distance's noise floor); figure noise; reflow pairs.
STREAM_DATA, STREAM_TRAIN, STREAM_EVAL, STREAM_REFERENCE, STREAM_FLOOR, STREAM_PLOT, STREAM_REFLOW = range(7)


def make_generator(seed, stream):
    """A CPU ``torch.Generator`` for (seed, stream); different pairs give unrelated streams."""
    # SeedSequence takes non-negative integers: a negative seed maps to its 64-bit two's complement
    state = np.random.SeedSequence([int(seed) % 2**64, int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def randn(shape, generator, device):
    """Standard normal noise drawn on the CPU generator, then moved to ``device``."""
    return torch.randn(shape, generator=generator).to(device)


# ----------------------------------------------------------------------------
# Data and prior.

def sample_mode(mode,               # 0: mean (-8, 8); 1: mean (8, 8)
                count,              # number of points
                generator,          # CPU torch.Generator
                device="cpu"):
    """``count`` points [count, 2] from one mode of the mixture."""
    mean = torch.tensor(MODE_MEANS[mode])
    std = torch.tensor(MODE_VARIANCES).sqrt()
    return (mean + torch.randn(count, 2, generator=generator) * std).to(device)


def sample_mixture(count, generator, device="cpu"):
    """``count`` points [count, 2] from the equal-weight mixture (a fresh draw, not the training set)."""
    modes = torch.randint(0, 2, (count,), generator=generator)
    means = torch.tensor(MODE_MEANS)[modes]
    std = torch.tensor(MODE_VARIANCES).sqrt()
    return (means + torch.randn(count, 2, generator=generator) * std).to(device)


class TwoModeData:
    """The training set: a fixed draw of ``points_per_mode`` points for each mode."""

    def __init__(self, generator, points_per_mode=POINTS_PER_MODE, device="cpu"):
        self.modes = [sample_mode(mode, points_per_mode, generator, device) for mode in (0, 1)]
        self.points_per_mode = points_per_mode

    def batch(self,
              iteration,            # 1-based training iteration
              batchsize,            # points in the batch
              generator,            # CPU torch.Generator
              mixed=False):         # False: one mode per batch (the paper); True: half of each
        """A training batch [batchsize, 2].

        The paper alternates: odd iterations (counting from 1) draw mode 0, even ones
        mode 1. Indices are drawn with replacement (the paper uses ``randperm[:batchsize]``,
        which costs a millisecond per step; for 512 of 100,000 points the difference is
        negligible).
        """
        if not mixed:
            mode = (iteration - 1) % 2
            index = torch.randint(0, self.points_per_mode, (batchsize,), generator=generator)
            return self.modes[mode][index.to(self.modes[mode].device)]
        halves = (batchsize // 2, batchsize - batchsize // 2)
        parts = []
        for mode, count in zip((0, 1), halves):
            index = torch.randint(0, self.points_per_mode, (count,), generator=generator)
            parts.append(self.modes[mode][index.to(self.modes[mode].device)])
        return torch.cat(parts)

    def plot_batch(self, count):
        """The first ``count`` points of each mode, concatenated [2 * count, 2] (fixed, for figures)."""
        return torch.cat([self.modes[0][:count], self.modes[1][:count]])


def prior_variances(wide=True, device="cpu"):
    """Variances [2] of the prior: diag(36, 1) when ``wide``, else the identity."""
    return torch.tensor(WIDE_PRIOR_VARIANCES if wide else UNIT_PRIOR_VARIANCES, device=device)


def prior_name(wide):
    return "N(0, diag(36, 1))" if wide else "N(0, I)"


def sample_prior(count, variances, generator):
    """``count`` prior samples [count, 2] on the device of ``variances``."""
    return randn((count, 2), generator, variances.device) * variances.sqrt()


# ----------------------------------------------------------------------------
# Training batches and networks.

def mixed_batches(coupling):
    """True for a coupling that re-pairs a whole batch (minibatch OT, Sinkhorn): pairing a batch of one mode
    with prior noise would not couple the modes, so its batches hold half of each (the others alternate
    between the modes, as in the paper)."""
    return isinstance(coupling, couplinglib.Grouped)


def training_batch(iteration,       # 1-based
                   data,            # TwoModeData
                   coupling,        # a models.couplings.Coupling
                   batchsize,
                   generator):      # CPU torch.Generator for the batch and the noise, in that order
    """(x [B, 2], noise [B, 2]): a training batch (see :func:`mixed_batches`) and its N(0, I) noise, before
    the coupling's ``assign`` and ``pair``."""
    x = data.batch(iteration, batchsize, generator, mixed=mixed_batches(coupling))
    return x, randn(x.shape, generator, x.device)


def build_models(coupling, seed, device):
    """(flow_model, encoder): a VelocityMLP, and an EncoderMLP for the learned coupling (else None),
    both initialised from ``seed`` in that order, so the same seed gives the same networks everywhere."""
    torch.manual_seed(seed)
    flow_model = VelocityMLP().to(device)
    encoder = EncoderMLP().to(device) if coupling == "learned" else None
    return flow_model, encoder


def build_flow_with_coupling(coupling,              # a name of models.couplings.COUPLINGS
                             seed,                  # initialises the MLPs (build_models)
                             device,
                             variances,             # [2] prior variances (prior_variances)
                             weight_prior=0.0,      # beta of the learned coupling
                             ot_batch=OT_BATCH,     # points per OT / Sinkhorn group, 0: the whole batch
                             ot_reg=0.05,           # Sinkhorn's entropic regularisation
                             interpolation="linear"):  # "linear" or "vp" (the paper's --ddpm)
    """The 2D example's :class:`models.couplings.FlowWithCoupling`: the velocity MLP and the coupling
    ``coupling`` with the prior N(0, diag(variances)). Its ``parameters()`` are the flow's, then the encoder's."""
    flow_model, encoder = build_models(coupling, seed, device)
    chosen = couplinglib.build_coupling(coupling, encoder=encoder, weight_prior=weight_prior,
                                        prior_variances=variances, group_size=ot_batch, ot_reg=ot_reg)
    return couplinglib.FlowWithCoupling(flow_model, chosen, interpolation).to(device)
