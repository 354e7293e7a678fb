"""The flow itself: interpolation and target, and curvature.

Conventions (the paper's): data ``x`` sits at t = 0, noise ``z`` at t = 1,
``z_t = t * z + (1 - t) * x`` and the velocity target is ``z - x``. Sampling
integrates dz/dt = v(z, t) from t = 1 down to t = 0 with the solvers of
models/solvers.py (re-exported here for the callers that import them from this module).
"""
import torch

from models.solvers import ADAPTIVE_T_END, SolveResult, check_nfe, dopri5, euler, get_solver, heun  # noqa: F401

T_EPS = 1e-5          # training times are drawn from U(T_EPS, 1)


# ----------------------------------------------------------------------------
# Training: interpolation and target.

def sample_time(batch, device=None, eps=T_EPS, generator=None):
    """t ~ U(eps, 1), shape [batch]."""
    u = torch.rand(batch, device=device, generator=generator)
    return u * (1 - eps) + eps


def _expand(t, like):
    """Reshape a per-sample [B] time so it broadcasts against ``like`` [B, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x, z, t):
    """z_t = t * z + (1 - t) * x, with t [B] broadcast over the other dimensions."""
    t = _expand(t, x)
    return t * z + (1 - t) * x


def target_velocity(x, z):
    """d z_t / dt along the straight path: z - x."""
    return z - x


# ----------------------------------------------------------------------------
# The paper's VP (DDPM-style) interpolation, for the 2D example's --ddpm.
#
# alpha(t) = exp(-(1/2) integral_0^t beta(s) ds) with the VP-SDE's beta(s) = 0.1 + 19.9 s, so
# alpha(t) = exp(-19.9 t^2 / 4 - 0.1 t / 2); z_t = alpha(t) x + sqrt(1 - alpha(t)^2) z runs from the
# data (t = 0) to nearly pure noise (alpha(1) = 0.0066), and the velocity target is d z_t / dt.

VP_BETA_MIN, VP_BETA_SPAN = 0.1, 19.9


def vp_alpha(t):
    """alpha(t) of the VP schedule (tensor in, tensor out)."""
    return torch.exp(-0.25 * VP_BETA_SPAN * t * t - 0.5 * VP_BETA_MIN * t)


def vp_alpha_derivative(t):
    """d alpha / dt = -(beta(t) / 2) alpha(t)."""
    return -0.5 * (VP_BETA_SPAN * t + VP_BETA_MIN) * vp_alpha(t)


def interpolate_vp(x, z, t):
    """z_t = alpha(t) x + sqrt(1 - alpha(t)^2) z, with t [B] broadcast over the other dimensions."""
    alpha = vp_alpha(_expand(t, x))
    return alpha * x + torch.sqrt(1 - alpha * alpha) * z


def target_velocity_vp(x, z, t):
    """d z_t / dt of :func:`interpolate_vp`: alpha' x - alpha alpha' / sqrt(1 - alpha^2) z (t > 0)."""
    t = _expand(t, x)
    alpha, derivative = vp_alpha(t), vp_alpha_derivative(t)
    return derivative * x - alpha * derivative / torch.sqrt(1 - alpha * alpha) * z


INTERPOLATIONS = ("linear", "vp")


# ----------------------------------------------------------------------------
# Curvature.

def straightness(traj, per_sample=False):
    """Curvature of a discrete trajectory traj[0] = z (t = 1) ... traj[N] = x (t = 0), dt = 1 / N.

    S = mean_i mean((traj[i-1] - traj[i]) / dt - (traj[0] - traj[N]))^2, i = 1..N.
    Zero for a path travelled at constant velocity along a straight line.
    With ``per_sample`` the inner mean runs over each sample's own elements ([B]).
    """
    if len(traj) < 2:
        raise ValueError("a trajectory needs at least two points")
    steps = len(traj) - 1
    dt = 1.0 / steps
    base = (traj[0] - traj[-1]).float()
    total = 0.0
    for i in range(1, len(traj)):
        deviation = ((traj[i - 1] - traj[i]).float() / dt - base).square()
        total = total + (deviation.flatten(1).mean(dim=1) if per_sample else deviation.mean())
    return total / steps
