"""ODE solvers for sampling: integrate dz/dt = v(z, t) from noise at t = 1 down to data at t = 0.

Conventions (the paper's; see models/flow.py for the path itself): ``velocity(z, t)`` takes ``z``
[B, ...] and ``t`` [B] (float32) and returns a tensor shaped like ``z``. Every solver returns a
:class:`SolveResult` whose ``nfe`` counts the velocity evaluations it made: the NFE is reported,
never implied.

Two kinds of solver, one registry (:data:`SOLVERS`, name -> :class:`SolverSpec`):

- fixed-step, ``solver(velocity, z, *, times=None, N=None, return_traj=False)``: ``times`` is a
  time grid (a 1-D decreasing tensor, e.g. ``time_grid("quadratic", 8)``); without it the grid is
  uniform and ``N`` is the NFE, as in the paper's code. They take no tolerances.
- adaptive, ``solver(velocity, z, *, N=None, rtol=1e-5, atol=1e-5, return_traj=False)``:
  torchdiffeq's steps from t = 1 to ``ADAPTIVE_T_END``, chosen by ``rtol`` / ``atol``; ``N`` is
  accepted (so any solver can be called alike) and ignored.

A new discretisation is a new grid function in :data:`TIME_GRIDS`, not a new solver.
"""
import itertools
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ADAPTIVE_T_END = 1e-3              # adaptive solvers stop here, as in the paper's code
DEFAULT_RTOL = DEFAULT_ATOL = 1e-5  # tolerances of the adaptive solvers
DEFAULT_EULER_N = 100              # NFE of euler and heun without a grid or N
DEFAULT_HEUN_N = 101


@dataclass
class SolveResult:
    """What a solver returns. ``traj``, ``x0_preds`` and ``times`` are filled only with ``return_traj``."""
    x: torch.Tensor                      # the end point (t = times[-1]: 0, or ADAPTIVE_T_END for adaptive solvers)
    nfe: int                             # velocity evaluations actually used
    traj: list = field(default_factory=list)      # states z at each time, traj[0] = start
    x0_preds: list = field(default_factory=list)  # x0_hat = z - t * v at each step
    times: list = field(default_factory=list)     # the time of each traj entry


# ----------------------------------------------------------------------------
# Time grids: ``steps + 1`` times from 1 down to ``t_end``, float64.

def _check_grid_request(steps, t_end):
    steps = operator.index(steps)
    if steps < 1:
        raise ValueError(f"a time grid needs at least one step, got {steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"a time grid ends at a time in [0, 1), got t_end = {t_end}")
    return steps


def uniform_grid(steps, t_end=0.0):
    """Equal steps from 1 to ``t_end``: t_k = 1 - k / steps (k = 0..steps) for t_end = 0, the paper's grid."""
    steps = _check_grid_request(steps, t_end)
    fraction = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    return fraction if t_end == 0 else t_end + (1 - t_end) * fraction


def power_grid(steps, rho, t_end=0.0):
    """EDM's rho-spacing applied to t: t_k = (1 + k / steps (t_end^(1/rho) - 1))^rho, k = 0..steps.

    rho = 1 is uniform; rho > 1 takes smaller steps near ``t_end`` (the data), rho < 1 near t = 1.
    """
    steps = _check_grid_request(steps, t_end)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    fraction = torch.arange(steps + 1, dtype=torch.float64) / steps
    times = (1 + fraction * (t_end ** (1 / rho) - 1)) ** rho
    times[0], times[-1] = 1.0, t_end   # exact end points, whatever the rounding of the power
    return times


def quadratic_grid(steps, t_end=0.0):
    """:func:`power_grid` with rho = 2: t_k = (1 - k / steps)^2 for t_end = 0, smaller steps near the data."""
    return power_grid(steps, 2.0, t_end)


TIME_GRIDS = {"uniform": uniform_grid, "quadratic": quadratic_grid}


def time_grid(name, steps, t_end=0.0):
    """The grid named ``name`` in :data:`TIME_GRIDS` with ``steps`` steps; unknown names raise ``ValueError``."""
    if name not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {name!r}; known: {', '.join(TIME_GRIDS)}")
    return TIME_GRIDS[name](steps, t_end=t_end)


def _grid_values(times):
    """A solver's ``times`` as Python floats, after checking it is a usable grid."""
    grid = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"times must be a 1-D grid of at least two times, got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()) or grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"times must lie in [0, 1], got {grid.tolist()}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"times must decrease strictly (sampling runs from t = 1 to 0), got {grid.tolist()}")
    return grid.tolist()


def _steps(times, uniform_steps):
    """(t, t_next, dt) of every step: those of the grid ``times``, or without one, ``uniform_steps`` equal
    steps from 1 to 0 of exactly dt = -1 / uniform_steps (the paper's arithmetic, bit for bit; the differences
    of an explicit uniform grid can be off in the last bit of a float64)."""
    if times is None:
        return [(i / uniform_steps, (i - 1) / uniform_steps, -1.0 / uniform_steps) for i in range(uniform_steps, 0, -1)]
    values = _grid_values(times)
    return [(t, t_next, t_next - t) for t, t_next in zip(values, values[1:])]


def _times(batch, value, like):
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)


# ----------------------------------------------------------------------------
# Fixed-step solvers.

def euler_nfe(steps):
    """NFE of Euler's method with ``steps`` steps."""
    return steps


def euler_steps(nfe):
    """Steps of Euler's method that use ``nfe`` evaluations."""
    return nfe


def heun_nfe(steps):
    """NFE of Heun's method with ``steps`` steps: two per step, one on the last (Euler) step."""
    return 2 * steps - 1


def heun_steps(nfe):
    """Steps of Heun's method that use ``nfe`` evaluations (exact for odd ``nfe``)."""
    return (nfe + 1) // 2


def _fixed_step_plan(name, times, N, default_N, nfe_of_steps, steps_of_nfe, check_N):
    """The steps of a fixed-step solve: from ``times`` (N, if given, must be its NFE) or the uniform grid of NFE N."""
    if times is None:
        N = default_N if N is None else operator.index(N)
        check_N(N)
        return _steps(None, steps_of_nfe(N))
    steps = _steps(times, None)
    if N is not None and operator.index(N) != nfe_of_steps(len(steps)):
        raise ValueError(f"N = {N} disagrees with the grid: {len(steps)} {name} steps use NFE "
                         f"{nfe_of_steps(len(steps))}; give times or N, not both")
    return steps


def _check_euler_N(N):
    if N < 1:
        raise ValueError(f"N must be >= 1 for euler, got {N}")


def _check_heun_N(N):
    if N < 1 or N % 2 == 0:
        raise ValueError(f"N must be odd for heun (it is the NFE: (N + 1) / 2 steps), got {N}")


def _start(z, t, return_traj):
    result = SolveResult(x=z, nfe=0)
    if return_traj:
        result.traj.append(z.clone())
        result.times.append(t)
    return result


def _advance(result, z, v, t, t_next, dt, return_traj):
    """One step z -> z + v dt from t to t_next, recording x0_hat = z - t v and the new state if asked."""
    if return_traj:
        result.x0_preds.append(z - t * v)
    z = z + v * dt
    if return_traj:
        result.traj.append(z.clone())
        result.times.append(t_next)
    return z


@torch.no_grad()
def euler(velocity,             # v(z, t): z [B, ...], t [B] float32 -> a tensor like z
          z,                    # start at t = times[0] (1 on the default grid), [B, ...]
          *,
          times=None,           # time grid, 1-D strictly decreasing in [0, 1]; None: uniform from 1 to 0
          N=None,               # NFE = steps on the uniform grid [default 100]; with times, its steps if given
          return_traj=False):   # also keep the state at each time and x0_hat at each step
    """Euler's method, z <- z + v(z, t) (t_next - t) on each step of the grid (NFE = number of steps)."""
    steps = _fixed_step_plan("euler", times, N, DEFAULT_EULER_N, euler_nfe, euler_steps, _check_euler_N)
    batch = z.shape[0]
    result = _start(z, steps[0][0], return_traj)
    for t, t_next, dt in steps:
        v = velocity(z, _times(batch, t, z))
        result.nfe += 1
        z = _advance(result, z, v, t, t_next, dt, return_traj)
    result.x = z
    return result


@torch.no_grad()
def heun(velocity,              # v(z, t): z [B, ...], t [B] float32 -> a tensor like z
         z,                     # start at t = times[0] (1 on the default grid), [B, ...]
         *,
         times=None,            # time grid, 1-D strictly decreasing in [0, 1]; None: uniform from 1 to 0
         N=None,                # NFE (odd) on the uniform grid: (N + 1) / 2 steps [default 101]; with times, if given,
                                #   2 * steps - 1
         return_traj=False):    # also keep the state at each time and x0_hat at each step
    """Heun's 2nd-order method as in the paper: trapezoidal steps, the last one Euler (NFE = 2 steps - 1)."""
    steps = _fixed_step_plan("heun", times, N, DEFAULT_HEUN_N, heun_nfe, heun_steps, _check_heun_N)
    batch = z.shape[0]
    result = _start(z, steps[0][0], return_traj)
    for index, (t, t_next, dt) in enumerate(steps):
        # Euler predictor.
        v = velocity(z, _times(batch, t, z))
        result.nfe += 1
        # Trapezoidal corrector, except on the last step (to t = 0 on the default grid), which stays Euler.
        if index < len(steps) - 1:
            v_next = velocity(z + v * dt, _times(batch, t_next, z))
            result.nfe += 1
            v = (v + v_next) / 2
        z = _advance(result, z, v, t, t_next, dt, return_traj)
    result.x = z
    return result


# ----------------------------------------------------------------------------
# Adaptive solvers (torchdiffeq, on z's device).

def _adaptive(method, velocity, z, rtol, atol, return_traj):
    """torchdiffeq's ``method`` from t = 1 to ADAPTIVE_T_END on z's device; reports the NFE used."""
    from torchdiffeq import odeint

    batch = z.shape[0]
    calls = [0]

    def rhs(t, state):
        calls[0] += 1
        return velocity(state, t.to(torch.float32).expand(batch))

    # The grid is only where states are returned: the steps in between are the method's own.
    grid = torch.tensor([1.0, ADAPTIVE_T_END], device=z.device, dtype=torch.float32)
    states = odeint(rhs, z.float(), grid, rtol=rtol, atol=atol, method=method)
    result = SolveResult(x=states[-1].to(z.dtype), nfe=calls[0])
    if return_traj:
        result.traj = [states[0], states[-1]]
        result.times = [1.0, ADAPTIVE_T_END]
    return result


@torch.no_grad()
def dopri5(velocity, z, *, N=None, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, return_traj=False):
    """Adaptive Dormand-Prince 5(4) (scipy's RK45) from t = 1 to 1e-3 on z's device; N is ignored."""
    return _adaptive("dopri5", velocity, z, rtol, atol, return_traj)


@torch.no_grad()
def bosh3(velocity, z, *, N=None, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, return_traj=False):
    """Adaptive Bogacki-Shampine 3(2) (scipy's RK23) from t = 1 to 1e-3 on z's device; N is ignored."""
    return _adaptive("bosh3", velocity, z, rtol, atol, return_traj)


@torch.no_grad()
def dopri8(velocity, z, *, N=None, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, return_traj=False):
    """Adaptive Dormand-Prince 8 (as scipy's DOP853) from t = 1 to 1e-3 on z's device; N is ignored."""
    return _adaptive("dopri8", velocity, z, rtol, atol, return_traj)


# ----------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class SolverSpec:
    """What callers need to know about a solver, besides calling it."""
    name: str                                        # its own name (torchdiffeq's for the adaptive ones)
    function: Callable                               # the solver: function(velocity, z, **options) -> SolveResult
    adaptive: bool                                   # steps chosen by rtol / atol (True) or by a time grid
    summary: str                                     # one line for --help and the docs
    nfe_rule: Optional[str] = None                   # fixed-step: which N are valid NFEs, in words
    steps_for_nfe: Optional[Callable[[int], int]] = None   # fixed-step: grid steps that use NFE N
    nfe_for_steps: Optional[Callable[[int], int]] = None   # fixed-step: NFE of a grid of that many steps

    @property
    def fixed_step(self):
        return not self.adaptive

    @property
    def takes_tolerances(self):
        """Whether ``rtol`` / ``atol`` mean something (only adaptive solvers accept them)."""
        return self.adaptive


EULER = SolverSpec("euler", euler, adaptive=False, summary="N steps, NFE = N",
                   nfe_rule="a positive integer", steps_for_nfe=euler_steps, nfe_for_steps=euler_nfe)
HEUN = SolverSpec("heun", heun, adaptive=False,
                  summary="2nd order, N = NFE (odd): (N + 1) / 2 steps, the last one Euler",
                  nfe_rule="odd", steps_for_nfe=heun_steps, nfe_for_steps=heun_nfe)
DOPRI5 = SolverSpec("dopri5", dopri5, adaptive=True, summary="Dormand-Prince 5(4)")
BOSH3 = SolverSpec("bosh3", bosh3, adaptive=True, summary="Bogacki-Shampine 3(2)")
DOPRI8 = SolverSpec("dopri8", dopri8, adaptive=True, summary="Dormand-Prince 8")

# The paper's scipy solve_ivp names are aliases of the torchdiffeq methods that run on the device.
SOLVERS = {"euler": EULER, "heun": HEUN, "rk45": DOPRI5, "dopri5": DOPRI5, "rk23": BOSH3, "bosh3": BOSH3,
           "dop853": DOPRI8, "dopri8": DOPRI8}


def solver_spec(name):
    """The :class:`SolverSpec` registered as ``name``; unknown names raise ``ValueError`` listing the known ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def get_solver(name):
    """The solver function registered as ``name``; unknown names raise ``ValueError`` listing the known ones."""
    return solver_spec(name).function


def aliases(spec):
    """The other names ``spec`` is registered under (the paper's scipy names)."""
    return [name for name, registered in SOLVERS.items() if registered is spec and name != spec.name]


def check_nfe(solver, N):
    """Validate N for a fixed-step solver before any work starts (ValueError with the fix); adaptive: nothing."""
    spec = solver_spec(solver)
    if spec.adaptive:
        return
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"--N must be a positive integer for {solver}, got {N}")
    if spec.nfe_for_steps(spec.steps_for_nfe(N)) != N:
        valid = next(M for M in itertools.count(N + 1) if spec.nfe_for_steps(spec.steps_for_nfe(M)) == M)
        raise ValueError(f"N must be {spec.nfe_rule} for {solver} (N is the NFE; try --N {valid}), got {N}")
