"""models/flow.py against exact answers: closed-form flows, hand-computed curvature, brute-force OT."""
import itertools
import math

import pytest
import torch
from torch import nn

from models import flow, losses
from models.couplings import MinibatchOT

FIXED_STEP = ("euler", "heun")


class Counted:
    """Wraps a velocity field and counts its evaluations."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, z, t):
        self.calls += 1
        return self.velocity(z, t)


def _column(t, z):
    return t.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))


# Velocity fields with closed-form flows, integrated from z(1) = z1 down to time t.
C = torch.tensor([1.5, -2.0], dtype=torch.float64)   # constant velocity
A = torch.tensor([3.0, -1.0], dtype=torch.float64)   # v = A * t
K = 1.3                                               # v = K * z


def constant_velocity(z, t):
    return C.expand_as(z)


def linear_in_time(z, t):
    return A * _column(t, z)


def linear_in_state(z, t):
    return K * z


def constant_flow(z1, t):
    return z1 + C * (t - 1)


def linear_in_time_flow(z1, t):
    return z1 + A * (t * t - 1) / 2


def linear_in_state_flow(z1, t):
    return z1 * math.exp(K * (t - 1))


@pytest.fixture
def z1():
    return torch.tensor([[0.5, -1.0], [2.0, 0.25], [-3.0, 1.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------
# Solvers.

@pytest.mark.parametrize("solver, N", [("euler", 1), ("euler", 7), ("heun", 1), ("heun", 7)])
def test_fixed_step_solvers_are_exact_for_constant_velocity(solver, N, z1):
    result = flow.get_solver(solver)(constant_velocity, z1, N=N)
    torch.testing.assert_close(result.x, constant_flow(z1, 0.0), rtol=0, atol=1e-12)
    assert result.nfe == N


def test_dopri5_is_exact_for_constant_velocity(z1):
    result = flow.dopri5(constant_velocity, z1)
    expected = constant_flow(z1, flow.ADAPTIVE_T_END).float()
    torch.testing.assert_close(result.x.float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N", [1, 4, 10])
def test_euler_error_for_linear_in_time_matches_the_left_riemann_sum(N, z1):
    # Euler evaluates v at the start of each step (t = i / N): sum_i A * (i / N) * (-1 / N)
    # = -A (N + 1) / (2N), i.e. the exact -A / 2 plus an error of -A / (2N).
    result = flow.euler(linear_in_time, z1, N=N)
    torch.testing.assert_close(result.x, linear_in_time_flow(z1, 0.0) - A / (2 * N), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_heun_is_exact_for_linear_in_time_until_its_last_euler_step(steps, z1):
    # The trapezoidal rule integrates a linear-in-t velocity exactly, so every state before
    # the final step is exact; the last step (from t = h to 0, h = 1 / steps) is Euler by
    # design and adds exactly -A * h^2 / 2 (v(h) * h = A h^2 against the exact A h^2 / 2).
    h = 1.0 / steps
    result = flow.heun(linear_in_time, z1, N=2 * steps - 1, return_traj=True)
    assert result.times == pytest.approx([1.0 - i * h for i in range(steps + 1)])
    for state, t in zip(result.traj[:-1], result.times[:-1]):
        torch.testing.assert_close(state, linear_in_time_flow(z1, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.x, linear_in_time_flow(z1, 0.0) - A * h * h / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dopri5", "rk45", "bosh3", "rk23", "dopri8", "dop853"])
def test_adaptive_solvers_match_the_exponential_flow(z1, name):
    counted = Counted(linear_in_state)
    # tight tolerances: bosh3's local error control lets 3e-4 through at 1e-5 on this flow
    result = flow.get_solver(name)(counted, z1, rtol=1e-7, atol=1e-7)
    expected = linear_in_state_flow(z1, flow.ADAPTIVE_T_END)
    torch.testing.assert_close(result.x.double(), expected, rtol=1e-4, atol=1e-4)
    assert result.nfe == counted.calls > 0


def _errors(solver, step_counts, nfe_of_steps):
    z1 = torch.ones(4, 2, dtype=torch.float64)
    exact = linear_in_state_flow(z1, 0.0)
    return [(solver(linear_in_state, z1, N=nfe_of_steps(s)).x - exact).abs().max().item() for s in step_counts]


def test_euler_converges_with_order_one():
    errors = _errors(flow.euler, [16, 32, 64, 128], lambda steps: steps)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_heun_converges_with_order_two():
    errors = _errors(flow.heun, [16, 32, 64, 128], lambda steps: 2 * steps - 1)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), ratios


@pytest.mark.parametrize("solver", FIXED_STEP)
@pytest.mark.parametrize("N", [1, 3, 9, 101])
def test_fixed_step_nfe_is_counted_calls(solver, N, z1):
    counted = Counted(linear_in_state)
    result = flow.get_solver(solver)(counted, z1, N=N)
    assert result.nfe == counted.calls == N


@pytest.mark.parametrize("N", [0, 2, 10])
def test_heun_rejects_even_or_zero_N(N, z1):
    with pytest.raises(ValueError, match="odd"):
        flow.heun(constant_velocity, z1, N=N)
    with pytest.raises(ValueError):
        flow.check_nfe("heun", N)


def test_euler_rejects_zero_steps_and_unknown_solvers_are_named(z1):
    with pytest.raises(ValueError):
        flow.euler(constant_velocity, z1, N=0)
    with pytest.raises(ValueError, match="euler"):
        flow.get_solver("midpoint")


def test_trajectory_and_x0_predictions(z1):
    result = flow.euler(constant_velocity, z1, N=4, return_traj=True)
    assert len(result.traj) == 5 and len(result.x0_preds) == 4
    assert result.times == [1.0, 0.75, 0.5, 0.25, 0.0]
    for state, t in zip(result.traj, result.times):
        torch.testing.assert_close(state, constant_flow(z1, t), rtol=0, atol=1e-12)
    # x0_hat = z_t - t * v lands on the end point for a constant velocity.
    for prediction in result.x0_preds:
        torch.testing.assert_close(prediction, constant_flow(z1, 0.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_backward_through_a_no_grad_solver_raises(solver):
    torch.manual_seed(0)
    network = nn.Linear(2, 2)
    z = torch.randn(3, 2, requires_grad=True)
    result = flow.get_solver(solver)(lambda state, t: network(state), z, N=3)
    assert not result.x.requires_grad
    with pytest.raises(RuntimeError):
        result.x.sum().backward()


# ----------------------------------------------------------------------------
# Curvature.

def test_straightness_is_zero_for_a_straight_constant_speed_path():
    start, end = torch.tensor([[2.0, -1.0]]), torch.tensor([[-1.0, 3.0]])
    traj = [start + (end - start) * i / 8 for i in range(9)]
    assert flow.straightness(traj).item() == pytest.approx(0.0, abs=1e-10)


def test_straightness_of_bent_and_uneven_paths_by_hand():
    # Bent: (2, 0) -> (1, 1) -> (0, 0), dt = 1/2, chord traj[0] - traj[2] = (2, 0).
    # Step velocities (2, -2) and (2, 2) deviate by (0, -2) and (0, 2): mean squares 2 and 2, S = 2.
    bent = [torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])]
    assert flow.straightness(bent).item() == pytest.approx(2.0)
    # Straight but uneven speed: (2, 0) -> (1.5, 0) -> (0, 0): velocities (1, 0), (3, 0) against (2, 0).
    uneven = [torch.tensor([[2.0, 0.0]]), torch.tensor([[1.5, 0.0]]), torch.tensor([[0.0, 0.0]])]
    assert flow.straightness(uneven).item() == pytest.approx(0.5)
    both = [torch.cat([a, b]) for a, b in zip(bent, uneven)]
    torch.testing.assert_close(flow.straightness(both, per_sample=True), torch.tensor([2.0, 0.5]))
    assert flow.straightness(both).item() == pytest.approx(1.25)


def test_straightness_of_an_euler_solve_with_constant_velocity_is_zero(z1):
    result = flow.euler(constant_velocity, z1, N=6, return_traj=True)
    assert flow.straightness(result.traj).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        flow.straightness(result.traj[:1])


# ----------------------------------------------------------------------------
# Training: interpolation, target, time sampling.

@pytest.mark.parametrize("shape", [(4, 2), (4, 3, 5, 5)])
def test_interpolation_matches_its_formula(shape):
    generator = torch.Generator().manual_seed(1)
    x, z = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    for value in (0.0, 1.0, 0.3):
        t = torch.full((shape[0],), value)
        torch.testing.assert_close(flow.interpolate(x, z, t), value * z + (1 - value) * x)
    torch.testing.assert_close(flow.interpolate(x, z, torch.zeros(shape[0])), x, rtol=0, atol=0)
    torch.testing.assert_close(flow.interpolate(x, z, torch.ones(shape[0])), z, rtol=0, atol=0)
    # A different time per sample broadcasts over the other dimensions.
    t = torch.tensor([0.0, 0.3, 1.0, 0.5])
    for i in range(shape[0]):
        torch.testing.assert_close(flow.interpolate(x, z, t)[i], t[i] * z[i] + (1 - t[i]) * x[i])


def test_target_and_loss():
    generator = torch.Generator().manual_seed(2)
    x, z = torch.randn(5, 2, generator=generator), torch.randn(5, 2, generator=generator)
    torch.testing.assert_close(flow.target_velocity(x, z), z - x)
    assert losses.flow_matching_loss(z - x, x, z).item() == 0.0
    assert losses.flow_matching_loss(z - x + 0.5, x, z).item() == pytest.approx(0.25)


def test_sample_time_range_and_determinism():
    t = flow.sample_time(200_000, generator=torch.Generator().manual_seed(3))
    assert t.shape == (200_000,)
    assert t.min().item() >= flow.T_EPS and t.max().item() <= 1.0
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    again = flow.sample_time(200_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


# ----------------------------------------------------------------------------
# Minibatch optimal transport.

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minibatch_ot_pairing_is_the_brute_force_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    x, z = torch.randn(6, 2, generator=generator), torch.randn(6, 2, generator=generator) * 3
    costs = {perm: sum(((x[i] - z[j]) ** 2).sum().item() for i, j in enumerate(perm))
             for perm in itertools.permutations(range(6))}
    best = min(costs, key=costs.get)
    paired = MinibatchOT().assign(x, z)
    assert torch.equal(paired, z[list(best)])
    assert ((x - paired) ** 2).sum().item() == pytest.approx(costs[best])


def test_minibatch_ot_pairing_flattens_images():
    generator = torch.Generator().manual_seed(4)
    x, z = torch.randn(5, 1, 2, 2, generator=generator), torch.randn(5, 1, 2, 2, generator=generator)
    paired = MinibatchOT().assign(x, z)
    assert paired.shape == z.shape
    # A permutation of z, and no worse than the identity pairing.
    assert sorted(paired.flatten(1).sum(1).tolist()) == pytest.approx(sorted(z.flatten(1).sum(1).tolist()))
    assert ((x - paired) ** 2).sum() <= ((x - z) ** 2).sum() + 1e-6
