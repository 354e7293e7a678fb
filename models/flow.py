"""The flow itself: interpolation and target, ODE solvers, and curvature.

Conventions (the paper's): data ``x`` sits at t = 0, noise ``z`` at t = 1,
``z_t = t * z + (1 - t) * x`` and the velocity target is ``z - x``. Sampling
integrates dz/dt = v(z, t) from t = 1 down to t = 0.

Every solver has the same signature ``solver(velocity, z, N=..., rtol=...,
atol=..., return_traj=False) -> SolveResult`` where ``velocity(z, t)`` takes
``z`` [B, ...] and ``t`` [B] and returns a tensor shaped like ``z``. The NFE
a solver used is always reported, never implied.
"""
from dataclasses import dataclass, field

import torch

T_EPS = 1e-5          # training times are drawn from U(T_EPS, 1)
ADAPTIVE_T_END = 1e-3  # adaptive solvers stop here, as in the paper's code


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
# Sampling: solvers from t = 1 to t = 0.

@dataclass
class SolveResult:
    """What a solver returns. ``traj`` and ``x0_preds`` are filled only with ``return_traj``."""
    x: torch.Tensor                      # the end point (t = 0, or ADAPTIVE_T_END for adaptive solvers)
    nfe: int                             # velocity evaluations actually used
    traj: list = field(default_factory=list)      # states z at each time, traj[0] = start
    x0_preds: list = field(default_factory=list)  # x0_hat = z - t * v at each step
    times: list = field(default_factory=list)     # the time of each traj entry


def _times(batch, value, like):
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)


@torch.no_grad()
def euler(velocity, z, N=100, rtol=None, atol=None, return_traj=False):
    """Euler's method with N uniform steps from t = 1 to 0 (NFE = N)."""
    if N < 1:
        raise ValueError(f"N must be >= 1 for euler, got {N}")
    batch, dt = z.shape[0], -1.0 / N
    result = SolveResult(x=z, nfe=0)
    if return_traj:
        result.traj.append(z.clone())
        result.times.append(1.0)
    for i in range(N, 0, -1):
        t = i / N
        v = velocity(z, _times(batch, t, z))
        result.nfe += 1
        if return_traj:
            result.x0_preds.append(z - t * v)
        z = z + v * dt
        if return_traj:
            result.traj.append(z.clone())
            result.times.append((i - 1) / N)
    result.x = z
    return result


@torch.no_grad()
def heun(velocity, z, N=101, rtol=None, atol=None, return_traj=False):
    """Heun's 2nd-order method as in the paper: N = NFE (odd), (N + 1) / 2 steps, the last one Euler."""
    if N < 1 or N % 2 == 0:
        raise ValueError(f"N must be odd for heun (it is the NFE: (N + 1) / 2 steps), got {N}")
    steps = (N + 1) // 2
    batch, dt = z.shape[0], -1.0 / steps
    result = SolveResult(x=z, nfe=0)
    if return_traj:
        result.traj.append(z.clone())
        result.times.append(1.0)
    for i in range(steps, 0, -1):
        t, t_next = i / steps, (i - 1) / steps
        # Euler predictor.
        v = velocity(z, _times(batch, t, z))
        result.nfe += 1
        # Trapezoidal corrector, except on the last step (t_next = 0), which stays Euler.
        if i > 1:
            v_next = velocity(z + v * dt, _times(batch, t_next, z))
            result.nfe += 1
            v = (v + v_next) / 2
        if return_traj:
            result.x0_preds.append(z - t * v)
        z = z + v * dt
        if return_traj:
            result.traj.append(z.clone())
            result.times.append(t_next)
    result.x = z
    return result


def _adaptive(method, velocity, z, rtol, atol, return_traj):
    """torchdiffeq's ``method`` from t = 1 to 1e-3 on z's device; reports the NFE used."""
    from torchdiffeq import odeint

    batch = z.shape[0]
    calls = [0]

    def rhs(t, state):
        calls[0] += 1
        return velocity(state, t.to(torch.float32).expand(batch))

    grid = torch.tensor([1.0, ADAPTIVE_T_END], device=z.device, dtype=torch.float32)
    states = odeint(rhs, z.float(), grid, rtol=rtol, atol=atol, method=method)
    result = SolveResult(x=states[-1].to(z.dtype), nfe=calls[0])
    if return_traj:
        result.traj = [states[0], states[-1]]
        result.times = [1.0, ADAPTIVE_T_END]
    return result


@torch.no_grad()
def dopri5(velocity, z, N=None, rtol=1e-5, atol=1e-5, return_traj=False):
    """Adaptive Dormand-Prince 5(4) (scipy's RK45) from t = 1 to 1e-3 on z's device; reports the NFE used."""
    return _adaptive("dopri5", velocity, z, rtol, atol, return_traj)


@torch.no_grad()
def bosh3(velocity, z, N=None, rtol=1e-5, atol=1e-5, return_traj=False):
    """Adaptive Bogacki-Shampine 3(2) (scipy's RK23) from t = 1 to 1e-3 on z's device; reports the NFE used."""
    return _adaptive("bosh3", velocity, z, rtol, atol, return_traj)


@torch.no_grad()
def dopri8(velocity, z, N=None, rtol=1e-5, atol=1e-5, return_traj=False):
    """Adaptive Dormand-Prince 8 (as scipy's DOP853) from t = 1 to 1e-3 on z's device; reports the NFE used."""
    return _adaptive("dopri8", velocity, z, rtol, atol, return_traj)


# the paper's scipy solve_ivp names map to the torchdiffeq methods that run on the device
SOLVERS = {"euler": euler, "heun": heun, "rk45": dopri5, "dopri5": dopri5, "rk23": bosh3, "bosh3": bosh3,
           "dop853": dopri8, "dopri8": dopri8}
ADAPTIVE_METHODS = {"rk45": "dopri5", "dopri5": "dopri5", "rk23": "bosh3", "bosh3": "bosh3",
                    "dop853": "dopri8", "dopri8": "dopri8"}


def get_solver(name):
    """Look up a solver by name; unknown names raise ``ValueError`` listing the known ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def check_nfe(solver, N):
    """Validate N for a fixed-step solver before any work starts (ValueError with the fix)."""
    if solver in ("euler", "heun") and (not isinstance(N, int) or N < 1):
        raise ValueError(f"--N must be a positive integer for {solver}, got {N}")
    if solver == "heun" and N % 2 == 0:
        raise ValueError(f"N must be odd for heun (N is the NFE; try --N {N + 1}), got {N}")


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
