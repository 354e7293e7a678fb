"""Metrics of the 2D example: the energy distance of samples to the true mixture (``training.train2d.evaluate``
samples a flow and scores it with them)."""
import torch


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
