"""models/solvers.py against exact answers: closed-form flows on uniform and non-uniform time grids, the
paper's arithmetic on the default grid bit for bit, NFE counts, time grids and the registry; then
generate.py's use of the registry (--schedule, tolerances of a fixed-step solver, checks that only check).
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

import generate
from models import build_network, flow, load_config, solvers
from tests.test_flow import Counted
from tests.test_generate import CONFIG_DE, CONFIG_EN, perturbed, results_of, samples_of, to_grey, zs_of
from utils.data import write_mnist_pngs
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

K = 1.3                                               # v = K * z
A = torch.tensor([3.0, -1.0], dtype=torch.float64)   # v = A * t
B = torch.tensor([2.0, -0.5], dtype=torch.float64)   # v = B * t^2
GRID = [1.0, 0.7, 0.2, 0.05, 0.0]                    # a non-uniform grid, by hand


def _column(t, z):
    return t.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))


def linear_in_state(z, t):
    return K * z


def linear_in_time(z, t):
    return A * _column(t, z)


def quadratic_in_time(z, t):
    return B * _column(t, z) ** 2


T_ATOL = 1e-6   # the solvers hand the velocity float32 times (as the networks take), so t is rounded to ~6e-8


def nonlinear(z, t):
    """A field with no closed form, for bit-for-bit comparisons."""
    weight = torch.linspace(-1, 1, z.shape[1] ** 2, dtype=z.dtype).reshape(z.shape[1], z.shape[1])
    return torch.tanh(z @ weight) * (1 + _column(t, z)) - z * _column(t, z) ** 2


@pytest.fixture
def z1():
    return torch.tensor([[0.5, -1.0], [2.0, 0.25], [-3.0, 1.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------
# Closed forms on a given grid.

def test_euler_on_a_non_uniform_grid_is_the_hand_computed_product(z1):
    # v = K z: each step multiplies by (1 + K dt), dt = -0.3, -0.5, -0.15, -0.05.
    result = solvers.euler(linear_in_state, z1, times=torch.tensor(GRID, dtype=torch.float64), return_traj=True)
    expected = z1 * (1 - 0.3 * K) * (1 - 0.5 * K) * (1 - 0.15 * K) * (1 - 0.05 * K)
    torch.testing.assert_close(result.x, expected, rtol=0, atol=1e-12)
    assert result.nfe == 4 and result.times == pytest.approx(GRID) and len(result.traj) == 5


def test_heun_on_a_non_uniform_grid_is_the_hand_computed_product(z1):
    # v = K z: a trapezoidal step multiplies by 1 + K dt + (K dt)^2 / 2; the last (Euler) one by 1 + K dt.
    result = solvers.heun(linear_in_state, z1, times=GRID)
    expected = z1.clone()
    for dt in (-0.3, -0.5, -0.15):
        expected = expected * (1 + K * dt + (K * dt) ** 2 / 2)
    expected = expected * (1 - 0.05 * K)
    torch.testing.assert_close(result.x, expected, rtol=0, atol=1e-12)
    assert result.nfe == 2 * 4 - 1


@pytest.mark.parametrize("name", ["uniform", "quadratic"])
def test_solvers_approach_the_exponential_flow_with_their_order(name):
    # v = K z has the exact flow z(t) = z(1) exp(K (t - 1)); doubling the steps divides the error by 2^order.
    z = torch.ones(4, 2, dtype=torch.float64)
    exact = z * math.exp(-K)
    for solver, order in ((solvers.euler, 1), (solvers.heun, 2)):
        errors = [(solver(linear_in_state, z, times=solvers.time_grid(name, steps)).x - exact).abs().max().item()
                  for steps in (32, 64, 128)]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(0.85 * 2 ** order < r < 1.15 * 2 ** order for r in ratios), (solver.__name__, ratios)


def test_heun_is_exact_for_linear_in_time_on_any_grid_until_its_last_euler_step(z1):
    # The trapezoidal rule integrates a linear-in-t velocity exactly; the last step, from h to 0, is Euler
    # and adds -A h^2 / 2.
    grid = solvers.quadratic_grid(5)
    result = solvers.heun(linear_in_time, z1, times=grid, return_traj=True)
    for state, t in zip(result.traj[:-1], result.times[:-1]):
        torch.testing.assert_close(state, z1 + A * (t * t - 1) / 2, rtol=0, atol=T_ATOL)
    h = grid[-2].item()
    torch.testing.assert_close(result.x, z1 - A / 2 - A * h * h / 2, rtol=0, atol=T_ATOL)


def test_heun_on_a_quadratic_in_time_field_errs_by_the_trapezoidal_rule(z1):
    # For v = B t^2 each trapezoidal step of length h overshoots the exact integral by B h^3 / 6 (towards
    # t = 0, i.e. the state is B h^3 / 6 too low); the last step is Euler: v(t) dt = -B t^3 against -B t^3 / 3.
    result = solvers.heun(quadratic_in_time, z1, times=GRID, return_traj=True)
    error = torch.zeros(2, dtype=torch.float64)
    for k, (state, t) in enumerate(zip(result.traj[:-1], result.times[:-1])):
        torch.testing.assert_close(state, z1 + B * (t ** 3 - 1) / 3 + error, rtol=0, atol=T_ATOL)
        error = error - B * (GRID[k] - GRID[k + 1]) ** 3 / 6
    last = GRID[-2]
    torch.testing.assert_close(result.x, result.traj[-2] - B * last ** 3, rtol=0, atol=T_ATOL)


# ----------------------------------------------------------------------------
# The default grid is the paper's arithmetic, bit for bit.

def paper_euler(velocity, z, N):
    for i in range(N, 0, -1):
        z = z + velocity(z, torch.full((z.shape[0],), i / N)) * (-1.0 / N)
    return z


def paper_heun(velocity, z, N):
    steps = (N + 1) // 2
    dt = -1.0 / steps
    for i in range(steps, 0, -1):
        v = velocity(z, torch.full((z.shape[0],), i / steps))
        if i > 1:
            v = (v + velocity(z + v * dt, torch.full((z.shape[0],), (i - 1) / steps))) / 2
        z = z + v * dt
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 3, 7, 33, 101])
def test_default_grid_is_the_papers_loop_bit_for_bit(dtype, N):
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(N)).to(dtype)
    assert torch.equal(solvers.euler(nonlinear, z, N=N).x, paper_euler(nonlinear, z, N))
    assert torch.equal(solvers.heun(nonlinear, z, N=N).x, paper_heun(nonlinear, z, N))


@pytest.mark.parametrize("steps", [1, 4, 10, 64, 128])
def test_an_explicit_uniform_grid_equals_the_default_in_float32(steps):
    # float32 states round each step -1 / steps to the same float32 however it was computed.
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(steps))
    grid = solvers.uniform_grid(steps)
    assert torch.equal(solvers.euler(nonlinear, z, times=grid).x, solvers.euler(nonlinear, z, N=steps).x)
    assert torch.equal(solvers.heun(nonlinear, z, times=grid).x, solvers.heun(nonlinear, z, N=2 * steps - 1).x)


def test_defaults_are_the_old_ones(z1):
    assert solvers.euler(Counted(linear_in_state), z1).nfe == 100
    assert solvers.heun(Counted(linear_in_state), z1).nfe == 101


# ----------------------------------------------------------------------------
# NFE and arguments.

@pytest.mark.parametrize("steps", [1, 2, 5])
def test_nfe_on_a_grid_is_counted_calls(steps, z1):
    grid = solvers.quadratic_grid(steps)
    for solver, nfe in ((solvers.euler, steps), (solvers.heun, 2 * steps - 1)):
        counted = Counted(linear_in_state)
        result = solver(counted, z1, times=grid)
        assert result.nfe == counted.calls == nfe
        assert solver(linear_in_state, z1, times=grid, N=nfe).nfe == nfe   # N may be given if it agrees


def test_N_that_disagrees_with_the_grid_is_refused(z1):
    with pytest.raises(ValueError, match="disagrees with the grid"):
        solvers.euler(linear_in_state, z1, times=GRID, N=5)
    with pytest.raises(ValueError, match="disagrees with the grid"):
        solvers.heun(linear_in_state, z1, times=GRID, N=4)


def test_tolerances_are_only_for_adaptive_solvers_and_grids_only_for_fixed_step(z1):
    for solver in (solvers.euler, solvers.heun):
        with pytest.raises(TypeError, match="rtol"):
            solver(linear_in_state, z1, N=3, rtol=1e-3)
        with pytest.raises(TypeError):
            solver(linear_in_state, z1, 3)             # N is keyword-only: a positional 3 is not a grid
    with pytest.raises(TypeError, match="times"):
        solvers.dopri5(linear_in_state, z1, times=GRID)
    assert all(spec.takes_tolerances == spec.adaptive != spec.fixed_step for spec in solvers.SOLVERS.values())


@pytest.mark.parametrize("times, message", [
    ([1.0], "at least two"),
    ([[1.0, 0.0]], "1-D"),
    ([0.0, 0.5, 1.0], "decrease"),
    ([1.0, 0.5, 0.5, 0.0], "decrease"),
    ([1.5, 0.0], r"\[0, 1\]"),
    ([1.0, float("nan"), 0.0], r"\[0, 1\]"),
])
def test_bad_grids_are_refused(times, message, z1):
    for solver in (solvers.euler, solvers.heun):
        with pytest.raises(ValueError, match=message):
            solver(linear_in_state, z1, times=times)


def test_adaptive_solvers_reach_the_exponential_flow_under_every_name(z1):
    for name, spec in solvers.SOLVERS.items():
        if spec.adaptive:
            result = solvers.get_solver(name)(linear_in_state, z1, rtol=1e-7, atol=1e-7)
            expected = z1 * math.exp(K * (solvers.ADAPTIVE_T_END - 1))
            torch.testing.assert_close(result.x.double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Time grids.

def test_uniform_and_quadratic_grids_by_hand():
    assert solvers.uniform_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert solvers.quadratic_grid(4).tolist() == [1.0, 9 / 16, 1 / 4, 1 / 16, 0.0]
    assert solvers.uniform_grid(3).dtype == torch.float64
    assert torch.equal(solvers.time_grid("quadratic", 4), solvers.quadratic_grid(4))
    torch.testing.assert_close(solvers.power_grid(5, 1.0), solvers.uniform_grid(5), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(solvers.TIME_GRIDS))
@pytest.mark.parametrize("t_end", [0.0, 1e-3])
def test_grids_run_from_one_to_their_end_and_decrease(name, t_end):
    grid = solvers.time_grid(name, 7, t_end=t_end)
    assert grid.shape == (8,) and grid[0].item() == 1.0 and grid[-1].item() == t_end
    assert bool((grid[1:] < grid[:-1]).all())


def test_quadratic_grid_takes_smaller_steps_near_the_data():
    steps = -torch.diff(solvers.quadratic_grid(6))
    assert bool((steps[1:] < steps[:-1]).all())
    assert solvers.power_grid(6, 0.5)[1] > solvers.power_grid(6, 2.0)[1]   # rho < 1: small steps near t = 1


def test_bad_grid_requests_are_refused():
    with pytest.raises(ValueError, match="uniform, quadratic"):
        solvers.time_grid("cosine", 4)
    with pytest.raises(ValueError, match="at least one step"):
        solvers.uniform_grid(0)
    with pytest.raises(ValueError, match="rho"):
        solvers.power_grid(4, 0.0)
    with pytest.raises(ValueError, match="t_end"):
        solvers.quadratic_grid(4, t_end=1.0)


# ----------------------------------------------------------------------------
# The registry.

def test_unknown_solver_is_a_value_error_listing_every_known_name():
    for lookup in (solvers.solver_spec, solvers.get_solver, flow.get_solver):
        with pytest.raises(ValueError) as error:
            lookup("midpoint")
        assert all(name in str(error.value) for name in solvers.SOLVERS), str(error.value)


def test_registry_names_aliases_and_specs():
    assert list(solvers.SOLVERS) == ["euler", "heun", "rk45", "dopri5", "rk23", "bosh3", "dop853", "dopri8"]
    for alias, name in (("rk45", "dopri5"), ("rk23", "bosh3"), ("dop853", "dopri8")):
        assert solvers.SOLVERS[alias] is solvers.SOLVERS[name] and solvers.SOLVERS[alias].name == name
        assert solvers.aliases(solvers.SOLVERS[name]) == [alias]
    assert [name for name, spec in solvers.SOLVERS.items() if spec.fixed_step] == ["euler", "heun"]
    for name, spec in solvers.SOLVERS.items():
        assert solvers.get_solver(name) is spec.function
    with pytest.raises(dataclasses.FrozenInstanceError):
        solvers.SOLVERS["euler"].adaptive = True


@pytest.mark.parametrize("name, valid, invalid", [("euler", [1, 2, 7, 100], []), ("heun", [1, 3, 121], [2, 100])])
def test_fixed_step_specs_relate_N_and_steps(name, valid, invalid):
    spec = solvers.solver_spec(name)
    for N in valid:
        assert spec.nfe_for_steps(spec.steps_for_nfe(N)) == N
        solvers.check_nfe(name, N)
    for N in invalid:
        with pytest.raises(ValueError, match=f"try --N {N + 1}"):
            solvers.check_nfe(name, N)
    with pytest.raises(ValueError, match="positive integer"):
        solvers.check_nfe(name, 0)
    solvers.check_nfe("rk45", 0)   # adaptive: N is ignored


def test_models_flow_re_exports_the_same_objects():
    for name in ("SolveResult", "euler", "heun", "dopri5", "get_solver", "check_nfe", "ADAPTIVE_T_END"):
        assert getattr(flow, name) is getattr(solvers, name), name


# ----------------------------------------------------------------------------
# generate.py reads the registry.

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = perturbed(build_network(load_config(CONFIG_DE)), seed=1)
    torch.save(net.state_dict(), folder / "flow_model_1_ema.pth")
    return {"flow": str(folder / "flow_model_1_ema.pth"), "flow_net": net}


def run(out, weights, *options):
    generate.main(["--dir", str(out), "--ckpt", weights["flow"], "--config_de", CONFIG_DE, "--amp", "none",
                   *map(str, options)])
    return str(out)


def test_generate_choices_are_the_registry():
    actions = {action.dest: action for action in generate.build_parser()._actions}
    assert tuple(actions["solver"].choices) == tuple(solvers.SOLVERS)
    assert tuple(actions["schedule"].choices) == tuple(solvers.TIME_GRIDS)


@pytest.mark.parametrize("solver, N", [("euler", 3), ("heun", 5)])
def test_generate_with_the_quadratic_schedule(tmp_path, weights, solver, N):
    out = run(tmp_path, weights, "--solver", solver, "--N", N, "--schedule", "quadratic", "--num_samples", 2,
              "--save_z", "--save_traj")
    z = torch.from_numpy(zs_of(out, 2))
    grid = solvers.quadratic_grid(N if solver == "euler" else (N + 1) // 2).tolist()
    with torch.no_grad():   # the solve written out: Euler, or trapezoidal steps with a last Euler one
        x, net = z, weights["flow_net"]
        for k, (t, t_next) in enumerate(zip(grid, grid[1:])):
            v = net(x, torch.full((2,), t))
            if solver == "heun" and k < len(grid) - 2:
                v = (v + net(x + (t_next - t) * v, torch.full((2,), t_next))) / 2
            x = x + (t_next - t) * v
    assert np.abs(samples_of(out, 2) - to_grey(x)).max() <= 1
    results = results_of(out)
    assert results["schedule"] == "quadratic" and results["nfes_mean"] == N
    assert results["straightness_mean"] is None            # flow.straightness assumes equal steps
    with open(os.path.join(out, "config_sampling.json")) as handle:
        assert json.load(handle)["schedule"] == "quadratic"
    assert samples_of(out, 2, "trajs").shape[2] == 28 * (len(grid) - 1)


def test_tolerances_given_to_a_fixed_step_solver_warn_and_change_nothing(tmp_path, weights, capsys):
    plain = run(tmp_path / "plain", weights, "--N", 2, "--num_samples", 2)
    capsys.readouterr()
    tolerant = run(tmp_path / "tolerant", weights, "--N", 2, "--num_samples", 2, "--rtol", 1e-3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert lines == ["warning: --rtol has no effect with euler, a fixed-step solver (--N sets its NFE); "
                     "tolerances apply to the adaptive solvers"]
    assert np.array_equal(samples_of(plain, 2), samples_of(tolerant, 2))
    assert results_of(plain)["schedule"] == "uniform" and results_of(plain)["straightness_mean"] is not None
    with open(os.path.join(plain, "config_sampling.json")) as handle:
        assert json.load(handle)["rtol"] == solvers.DEFAULT_RTOL    # the default is recorded, as before


def test_a_schedule_for_an_adaptive_solver_is_refused(tmp_path, weights):
    with pytest.raises(UserError, match="--schedule quadratic is the time grid of a fixed-step solver"):
        run(tmp_path / "out", weights, "--solver", "rk45", "--schedule", "quadratic")
    assert not (tmp_path / "out").exists()


def test_a_run_recorded_before_schedule_existed_is_the_same_run(tmp_path, weights):
    out = run(tmp_path, weights, "--N", 2, "--num_samples", 1)
    path = os.path.join(out, "config_sampling.json")
    with open(path) as handle:
        record = json.load(handle)
    del record["schedule"]
    with open(path, "w") as handle:
        json.dump(record, handle)
    run(tmp_path, weights, "--N", 2, "--num_samples", 1)   # no "other arguments" refusal
    with pytest.raises(UserError, match="schedule 'uniform' vs 'quadratic'"):
        run(tmp_path, weights, "--N", 2, "--num_samples", 1, "--schedule", "quadratic")


def test_check_args_only_checks(tmp_path, weights, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check_args built a network, read weights or built a dataset")

    for name in ("build_network", "build_encoder", "load_weights", "build_dataset"):
        monkeypatch.setattr(generate, name, refuse)
    digits = write_mnist_pngs(str(tmp_path / "digits"), 2)
    # --encoder names a file of the wrong network: only loading it (not checking) could tell
    args = generate.parse_args(["--dir", str(tmp_path / "out"), "--ckpt", weights["flow"], "--config_de", CONFIG_DE,
                                "--encoder", weights["flow"], "--config_en", CONFIG_EN, "--dataset", "folder",
                                "--data_path", digits, "--num_samples", "2"])
    plan = generate.check_args(args)
    assert plan["ckpt_file"] == weights["flow"] and plan["config_en"] == load_config(CONFIG_EN)
    assert (args.rtol, args.atol, args.res, args.input_nc) == (solvers.DEFAULT_RTOL, solvers.DEFAULT_ATOL, 28, 1)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="built a network"):   # building is a separate step
        generate.load_networks(args, plan, torch.device("cpu"))
