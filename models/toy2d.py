"""The paper's 2D example, a two-mode Gaussian: data, prior, couplings, training step, metrics, plots.

Shared by ``train_reverse_2d_joint.py`` and ``benchmarks/couplings_2d.py`` (scripts
never import each other).

Data (as in the paper's ``train_reverse_2d_joint.py``): two Gaussians with means
(-8, 8) and (8, 8), covariance diag(3, 0.1) and equal weights. The paper draws a
fixed set of 100,000 points per mode and alternates training batches between the
modes: every batch holds points of one mode only.

Prior: "wide" N(0, diag(36, 1)) by default (it covers both modes horizontally),
or N(0, I).

Couplings of data x (t = 0) and noise z (t = 1):
  independent  z ~ prior, regardless of x (1-rectified flow);
  learned      z ~ q(z | x) = N(mu(x), diag(exp(logvar(x)))) from an encoder MLP,
               trained jointly with a KL term towards the prior (the paper);
  ot           z ~ prior, then permuted to the minibatch optimal-transport
               assignment (Tong et al. / Pooladian et al.), within groups of
               ``ot_batch`` points of the batch (the exact solve costs O(n^3)).
"""
import numpy as np
import torch

from models import flow as flowlib
from models.couplings import ot_assignment
from models.losses import flow_matching_loss
from models.mlp import EncoderMLP, VelocityMLP

MODE_MEANS = ((-8.0, 8.0), (8.0, 8.0))
MODE_VARIANCES = (3.0, 0.1)        # diagonal of each mode's covariance
WIDE_PRIOR_VARIANCES = (36.0, 1.0)
UNIT_PRIOR_VARIANCES = (1.0, 1.0)
POINTS_PER_MODE = 100_000          # the paper's fixed training set per mode
COUPLINGS = ("independent", "learned", "ot")
OT_BATCH = 128                     # points per exact OT assignment (512 costs ~25x more per step)
MODE_COLORS = ("tab:red", "tab:green")
NOISE_COLOR = "tab:blue"
X_LIMITS = (-18.0, 18.0)           # the paper's plot window
Y_LIMITS = (-9.0, 18.0)


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
# Couplings and the loss.

def kl_to_prior(mu,                 # [B, 2] encoder means
                logvar,             # [B, 2] encoder log-variances
                variances):         # [2] prior variances
    """Exact KL(N(mu, diag(exp(logvar))) || N(0, diag(variances))) per sample [B], summed over dimensions."""
    log_variances = variances.log()
    return 0.5 * ((mu.square() + logvar.exp()) / variances - 1.0 - logvar + log_variances).sum(dim=1)


def prior_loss(mu, logvar, variances):
    """The KL term of the 2D loss: per-sample KL, averaged over the batch, divided by the dimension (2).

    This is the normalisation of the paper's ``get_kl_2d`` (``mean(kl) / 2``). Two
    differences from that function, neither of which changes a gradient of the wide-prior
    run: it adds log(36) inside the sum over *both* coordinates, so its value exceeds the
    exact KL by log(36) / 4 after the division; and it always measures the KL against the
    wide prior, even with ``--no_wide_prior``. Here the KL is exact and is taken against
    the prior that sampling actually starts from.
    """
    return kl_to_prior(mu, logvar, variances).mean() / mu.shape[1]


def ot_pairing_in_groups(x, z, ot_batch):
    """Minibatch OT within groups of about ``ot_batch`` points (0: the whole batch).

    Group k holds the points k, k + G, k + 2G, ... (G groups), so a batch made of one
    mode's points followed by the other's gives every group both modes.
    """
    groups = 1 if ot_batch <= 0 else max(1, x.shape[0] // ot_batch)
    paired = torch.empty_like(z)
    for k in range(groups):
        paired[k::groups] = z[k::groups][ot_assignment(x[k::groups], z[k::groups])]
    return paired


def pair_noise(coupling,            # "independent", "learned" or "ot"
               x,                   # [B, 2] data batch
               variances,           # [2] prior variances
               generator,           # CPU torch.Generator for the noise
               encoder=None,        # EncoderMLP, needed for "learned"
               ot_batch=OT_BATCH):  # points per exact OT assignment, 0: the whole batch ("ot")
    """Noise z [B, 2] coupled to ``x``; returns (z, mu, logvar), mu and logvar None unless learned."""
    noise = randn(x.shape, generator, x.device)
    if coupling == "learned":
        return encoder(x, noise=noise)
    z = noise * variances.sqrt()
    if coupling == "ot":
        z = ot_pairing_in_groups(x, z, ot_batch)
    elif coupling != "independent":
        raise ValueError(f"unknown coupling {coupling!r}; known: {', '.join(COUPLINGS)}")
    return z, None, None


def training_step(flow_model,       # VelocityMLP v(z_t, t)
                  optimizer,        # over the flow (and the encoder, if learned)
                  x,                # [B, 2] data (t = 0)
                  z,                # [B, 2] coupled noise (t = 1); may carry the encoder's graph
                  generator,        # CPU torch.Generator for the times
                  mu=None,          # [B, 2] encoder means (learned coupling only)
                  logvar=None,      # [B, 2] encoder log-variances (learned coupling only)
                  variances=None,   # [2] prior variances (learned coupling only)
                  weight_prior=0.0,  # beta, the KL weight
                  interpolation="linear"):  # "linear" (z_t = t z + (1 - t) x) or "vp" (the paper's --ddpm)
    """One optimiser step on flow matching (+ weight_prior * KL / dim); returns the loss terms as floats."""
    t = flowlib.sample_time(x.shape[0], generator=generator).to(x.device)
    if interpolation == "vp":
        z_t = flowlib.interpolate_vp(x, z, t)
        target = flowlib.target_velocity_vp(x, z, t)
        loss_fm = (flow_model(z_t, t).float() - target.float()).square().mean()
    else:
        z_t = flowlib.interpolate(x, z, t)
        loss_fm = flow_matching_loss(flow_model(z_t, t), x, z)
    loss = loss_fm
    kl = None
    if mu is not None:
        kl = prior_loss(mu, logvar, variances)
        loss = loss + weight_prior * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "loss_fm": loss_fm.item(), "kl": None if kl is None else kl.item()}


def build_models(coupling, seed, device):
    """(flow_model, encoder): a VelocityMLP, and an EncoderMLP for the learned coupling (else None),
    both initialised from ``seed`` in that order, so the same seed gives the same networks everywhere."""
    torch.manual_seed(seed)
    flow_model = VelocityMLP().to(device)
    encoder = EncoderMLP().to(device) if coupling == "learned" else None
    return flow_model, encoder


def coupled_training_step(iteration,      # 1-based
                          data,           # TwoModeData
                          coupling,       # "independent", "learned" or "ot"
                          flow_model,
                          encoder,        # EncoderMLP or None
                          optimizer,
                          variances,      # [2] prior variances
                          generator,      # CPU torch.Generator for batches, noise and times
                          batchsize,
                          weight_prior,
                          ot_batch=OT_BATCH,
                          interpolation="linear"):
    """Draw a batch, couple it with noise and take one optimiser step; returns the loss terms.

    Batches alternate between the modes (the paper), except for minibatch OT: pairing a
    batch of one mode with prior noise would not couple the modes, so its batches hold
    half of each.
    """
    x = data.batch(iteration, batchsize, generator, mixed=coupling == "ot")
    z, mu, logvar = pair_noise(coupling, x, variances, generator, encoder, ot_batch)
    return training_step(flow_model, optimizer, x, z, generator, mu, logvar, variances, weight_prior,
                         interpolation)


# ----------------------------------------------------------------------------
# Metrics.

def _mean_distance(a, b, exclude_diagonal, chunk=1024):
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        block = torch.cdist(a[start:start + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")
        total += block.sum().item()
    pairs = a.shape[0] * (b.shape[0] - 1 if exclude_diagonal else b.shape[0])
    return total / pairs


@torch.no_grad()
def energy_distance(samples,        # [n, D]
                    reference,      # [m, D]
                    within_reference=None):  # E|Y - Y'| of the reference, if already known
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean norms), in float64.

    The within-set means leave out the pairs i = j (unbiased U-statistics), so two
    independent draws of the same distribution give a value near 0 (of either sign).
    """
    a = samples.detach().flatten(1).double().cpu()
    b = reference.detach().flatten(1).double().cpu()
    if within_reference is None:
        within_reference = mean_pairwise_distance(b)
    return 2.0 * _mean_distance(a, b, exclude_diagonal=False) - mean_pairwise_distance(a) - within_reference


@torch.no_grad()
def mean_pairwise_distance(points):
    """E|Y - Y'| over the pairs i != j of ``points`` [m, D], in float64."""
    points = points.detach().flatten(1).double().cpu()
    return _mean_distance(points, points, exclude_diagonal=True)


@torch.no_grad()
def evaluate(flow_model,            # v(z, t)
             noise,                 # [n, 2] prior noise, the same for every NFE
             eval_N,                # Euler step counts, e.g. (1, 2, 4, 8, 128)
             reference):            # [m, 2] fresh samples of the true mixture
    """Euler samples from ``noise`` for each N, their energy distances, and the straightness at max N.

    Returns ``(metrics, samples)``: metrics has ``straightness`` (Euler, N = max(eval_N)),
    ``straightness_N`` and ``energy_distance`` {N: value}; samples maps N to [n, 2] tensors.
    """
    longest = max(eval_N)
    within_reference = mean_pairwise_distance(reference)
    result = flowlib.euler(flow_model, noise, N=longest, return_traj=True)
    samples = {longest: result.x}
    for steps in eval_N:
        if steps != longest:
            samples[steps] = flowlib.euler(flow_model, noise, N=steps).x
    metrics = {
        "straightness": flowlib.straightness(result.traj).item(),
        "straightness_N": longest,
        "energy_distance": {str(steps): energy_distance(samples[steps], reference, within_reference)
                            for steps in eval_N},
    }
    return metrics, samples


# ----------------------------------------------------------------------------
# Figures (matplotlib is imported lazily: only runs that draw need it).

def setup_axes(ax, title=None):
    """The paper's window (x in [-18, 18], y in [-9, 18]), equal aspect, light grid."""
    ax.set_xlim(*X_LIMITS)
    ax.set_ylim(*Y_LIMITS)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("$x_1$", fontsize=8)
    ax.set_ylabel("$x_2$", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)


def plot_points(ax, points, color, size=3, alpha=0.25, label=None):
    points = points.detach().cpu().numpy()
    ax.scatter(points[:, 0], points[:, 1], s=size, alpha=alpha, color=color, linewidths=0, label=label)


def plot_trajectories(ax,
                      traj,         # list of [B, 2] states, traj[0] at t = 1
                      colors,       # one color for all, or a list per sample
                      count=30,     # how many paths to draw
                      linewidth=0.8):
    """Draw ``count`` paths (spread over the batch), a hollow marker at the start and a dot at the end."""
    path = torch.stack([state.detach().cpu() for state in traj]).numpy()   # [steps + 1, B, 2]
    picks = np.linspace(0, path.shape[1] - 1, min(count, path.shape[1])).round().astype(int)
    for j in picks:
        color = colors[j] if isinstance(colors, (list, tuple)) else colors
        ax.plot(path[:, j, 0], path[:, j, 1], color=color, linewidth=linewidth, alpha=0.8)
        ax.plot(path[0, j, 0], path[0, j, 1], marker="o", markersize=2.5, markerfacecolor="none",
                markeredgecolor=color, markeredgewidth=0.6)
    return picks


def mode_colors(count_per_mode):
    """Per-sample colors for a batch made of ``count_per_mode`` points of mode 0, then of mode 1."""
    return [MODE_COLORS[0]] * count_per_mode + [MODE_COLORS[1]] * count_per_mode
