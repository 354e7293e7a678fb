"""The couplings of models/couplings.py and the losses of models/losses.py.

The golden step (tests/data/golden_coupling_step.pt) was computed before the method-core refactor, with the
code of commit e55c422 (tests/data/make_golden_coupling_step.py): a fixed batch, fixed perturbed weights, and
each coupling's loss terms and gradients. The refactored classes must reproduce them.

On the Intel Xeon that made the file they do so bit for bit. Other CPUs pick other fp32 kernels (oneDNN and
MKL dispatch by instruction set and model), which round differently: on a 2-core AMD EPYC (Zen 4, AVX-512,
2026-12-07) every gradient tensor differs in its last bits, by at most 7.7e-6 of that tensor's largest
entry (1 and 2 threads), and one loss by one float32 ulp. So the losses are compared to 4 ulp and each
gradient tensor to 5e-5 of its own scale: rounding passes, any change to the method does not (a KL weight
off by 1% moves an encoder gradient by 4.8e-2 of its scale; test_the_tolerance_sees_a_small_change).
"""
import math
import os

import pytest
import torch

from models import build_encoder, build_network
from models import couplings as couplinglib
from models.losses import coupled_flow_loss, kl_per_dim

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(DATA, "golden_coupling_step.pt"), weights_only=True)


GRAD_TOL = 5e-5   # of each gradient tensor's largest entry (module docstring)


def _scaled_error(grad, expected):
    """max |grad - expected| over max |expected| (0 where both are zero)."""
    scale = expected.abs().max()
    error = (grad - expected).abs().max()
    return (error / scale).item() if scale > 0 else error.item()


def _golden_step(golden, name, weight_prior=None):
    """One step of coupling ``name`` on the golden batch and weights (KL weight: the golden's unless given):
    (the noise it paired with the batch, the loss terms, the flow, the encoder), gradients set by backward."""
    flow, encoder = build_network(golden["config_de"]), build_encoder(golden["config_en"])
    flow.load_state_dict(golden["flow_state"])
    encoder.load_state_dict(golden["encoder_state"])
    flow.eval()
    encoder.eval()
    prior = golden["weight_prior"] if weight_prior is None else weight_prior
    coupling = couplinglib.build_coupling(name, encoder=encoder, weight_prior=prior)
    model = couplinglib.FlowWithCoupling(flow, coupling)
    noise = coupling.assign(golden["x"], golden["noise"])
    terms = model(golden["x"], golden["t"], noise)
    terms.loss.backward()
    # the optimizer gets the coupling's parameters, then the flow's, the same objects
    expected_params = list(coupling.parameters()) + list(flow.parameters())
    optimizer_params = list(model.optimizer_params())
    assert len(optimizer_params) == len(expected_params)
    assert all(p is q for p, q in zip(optimizer_params, expected_params))
    return noise, terms, flow, encoder


def test_the_tolerance_sees_a_small_change(golden):
    """The gradient tolerance is far below what a 1% change of the KL weight does to the encoder's gradients."""
    _, _, _, encoder = _golden_step(golden, "learned", weight_prior=golden["weight_prior"] * 1.01)
    grads = {f"encoder.{k}": p.grad for k, p in encoder.named_parameters()}
    worst = max(_scaled_error(grads[key], golden["learned"]["grads"][key]) for key in grads)
    assert worst > 20 * GRAD_TOL


@pytest.mark.parametrize("name", ["learned", "independent", "ot"])
def test_one_step_matches_the_pre_refactor_values(golden, name):
    noise, terms, flow, encoder = _golden_step(golden, name)
    expected = golden[name]
    assert torch.equal(noise, expected["noise_used"])
    for key in ("loss", "flow_loss", "kl"):
        torch.testing.assert_close(getattr(terms, key).detach(), expected[key], rtol=4 * 2.0 ** -23, atol=0)
    grads = {f"flow.{k}": p.grad for k, p in flow.named_parameters()}
    if name == "learned":
        grads.update({f"encoder.{k}": p.grad for k, p in encoder.named_parameters()})
    else:
        assert all(p.grad is None for p in encoder.parameters())
    assert sorted(grads) == sorted(expected["grads"])
    for key, grad in grads.items():
        assert _scaled_error(grad, expected["grads"][key]) <= GRAD_TOL, key


def test_registry_names_the_known_couplings():
    with pytest.raises(ValueError, match="unknown coupling 'diagonal'; known: learned, independent, ot, sinkhorn"):
        couplinglib.build_coupling("diagonal")
    with pytest.raises(ValueError, match="needs an encoder"):
        couplinglib.build_coupling("learned")
    with pytest.raises(ValueError, match="ot_reg > 0"):
        couplinglib.build_coupling("sinkhorn", ot_reg=0.0)


def test_kl_against_the_closed_form_with_a_diagonal_prior():
    # KL(N(m, s^2) || N(0, v)) = 0.5 * (log(v / s^2) + (s^2 + m^2) / v - 1), one sample, two dimensions.
    mu, logvar, variances = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([36.0, 1.0])
    expected = sum(0.5 * (math.log(v) - lv + (math.exp(lv) + m * m) / v - 1)
                   for m, lv, v in zip([1.0, -2.0], [0.5, -1.0], [36.0, 1.0]))
    assert kl_per_dim(mu, logvar, variances).item() == pytest.approx(expected / 2, rel=1e-6)
    assert kl_per_dim(torch.zeros(3, 2), variances.log().expand(3, 2), variances).item() == pytest.approx(0, abs=1e-7)


def test_prior_scaling_and_grouped_ot():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(8, 2, generator=generator) + torch.tensor([-8.0, 8.0]),
                   torch.randn(8, 2, generator=generator) + torch.tensor([8.0, 8.0])])
    noise = torch.randn(16, 2, generator=generator)
    variances = torch.tensor([36.0, 1.0])
    independent = couplinglib.build_coupling("independent", prior_variances=variances)
    torch.testing.assert_close(independent.pair(x, noise).z, noise * torch.tensor([6.0, 1.0]), rtol=0, atol=0)
    ot = couplinglib.build_coupling("ot", prior_variances=variances, group_size=8)
    paired = ot.assign(x, noise)
    assert sorted(paired[:, 0].tolist()) == sorted(noise[:, 0].tolist())   # a permutation of the noise
    z = ot.pair(x, paired).z
    for k in range(2):   # group k = points k, k + 2, ...: each group's assignment is the cheapest permutation
        xs, zs = x[k::2], z[k::2]
        best = couplinglib.ot_assignment(xs, zs)
        assert torch.equal(best, torch.arange(8))


def test_sinkhorn_plan_two_points_closed_form():
    # For 2 x 2 with uniform marginals the plan is [[a, 1/2 - a], [1/2 - a, a]] with
    # a / (1/2 - a) = exp(-(C11 + C22 - C12 - C21) / (2 eps)).
    cost = torch.tensor([[0.0, 4.0], [2.0, 1.0]], dtype=torch.float64)
    reg = 0.5
    epsilon = reg * cost.mean().item()
    r = math.exp(-(0.0 + 1.0 - 4.0 - 2.0) / (2 * epsilon))
    a = r / (2 * (1 + r))
    plan = couplinglib.sinkhorn_plan(cost, reg)
    torch.testing.assert_close(plan, torch.tensor([[a, 0.5 - a], [0.5 - a, a]], dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_sinkhorn_limits_exact_ot_and_independence():
    generator = torch.Generator().manual_seed(3)
    x, z = torch.randn(12, 5, generator=generator), torch.randn(12, 5, generator=generator)
    cost = torch.cdist(x.double(), z.double()).square()
    sharp = couplinglib.sinkhorn_plan(cost, 1e-3, iterations=20000)
    assert torch.equal(sharp.argmax(dim=1), couplinglib.ot_assignment(x, z))
    plan = couplinglib.sinkhorn_plan(cost, 0.1)   # converged: both marginals uniform
    torch.testing.assert_close(plan.sum(dim=1), torch.full((12,), 1 / 12, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(plan.sum(dim=0), torch.full((12,), 1 / 12, dtype=torch.float64), rtol=0, atol=1e-12)
    flat = couplinglib.sinkhorn_plan(cost, 1e4)
    torch.testing.assert_close(flat, torch.full((12, 12), 1 / 144, dtype=torch.float64), rtol=1e-3, atol=0)
    coupling = couplinglib.build_coupling("sinkhorn", ot_reg=1e-3)
    draws = coupling.assign(x, z, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, z[couplinglib.ot_assignment(x, z)], rtol=0, atol=0)


def test_fixed_pairs_use_the_given_partner():
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    coupling = couplinglib.FixedPairs()
    assert coupling.fixed_pairs and coupling.pair(x, z).z is z

    def flow(zt, t):
        return zt * 0
    terms = coupled_flow_loss(flow, coupling, x, torch.full((4,), 0.5), z)
    assert terms.loss.item() == pytest.approx((z - x).square().mean().item(), rel=1e-6)
    assert terms.kl.item() == 0.0


def test_only_options_set_for_a_coupling_that_ignores_them_are_unused():
    defaults = {"weight_prior": 10.0, "config_en": None, "ot_reg": 0.05, "ot_batch": 128, "lr": 1e-3}
    given = dict(defaults, weight_prior=20.0, config_en="en.json", ot_reg=0.1, ot_batch=64, lr=1.0)
    assert couplinglib.unused_options("learned", given, defaults) == [("ot_reg", ("sinkhorn",)),
                                                                    ("ot_batch", ("ot", "sinkhorn"))]
    assert couplinglib.unused_options("sinkhorn", given, defaults) == [("weight_prior", ("learned",)),
                                                                     ("config_en", ("learned",))]
    assert [name for name, _ in couplinglib.unused_options("independent", given, defaults)] == [
        "weight_prior", "config_en", "ot_reg", "ot_batch"]
    for name in couplinglib.COUPLINGS:   # defaults left alone, or options a script does not have: nothing
        assert couplinglib.unused_options(name, defaults, defaults) == []
        assert couplinglib.unused_options(name, {"lr": 1.0}, defaults) == []
    assert couplinglib.unused_option_warnings("ot", {"ot_reg": 0.1}, defaults) == [
        "warning: --ot_reg has no effect with --coupling ot (it is used by sinkhorn only)"]
