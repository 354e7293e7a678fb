"""Metrics of the 2D example: the energy distance of samples to the true mixture, and ``evaluate`` (Euler
samples from fixed prior noise at several NFE, their energy distances and the straightness)."""
import torch

from models import flow as flowlib


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
def evaluate(velocity,              # v(z, t): the flow MLP, or utils.amp.autocast_velocity of it
             noise,                 # [n, 2] prior noise, the same for every NFE
             eval_N,                # Euler step counts, e.g. (1, 2, 4, 8, 128)
             reference):            # [m, 2] fresh samples of the true mixture
    """Euler samples from ``noise`` for each N, their energy distances, and the straightness at max N.

    Returns ``(metrics, samples)``: metrics has ``straightness`` (Euler, N = max(eval_N)),
    ``straightness_N`` and ``energy_distance`` {N: value}; samples maps N to [n, 2] tensors.
    """
    longest = max(eval_N)
    within_reference = mean_pairwise_distance(reference)
    result = flowlib.euler(velocity, noise, N=longest, return_traj=True)
    samples = {longest: result.x}
    for steps in eval_N:
        if steps != longest:
            samples[steps] = flowlib.euler(velocity, noise, N=steps).x
    metrics = {
        "straightness": flowlib.straightness(result.traj).item(),
        "straightness_N": longest,
        "energy_distance": {str(steps): energy_distance(samples[steps], reference, within_reference)
                            for steps in eval_N},
    }
    return metrics, samples
