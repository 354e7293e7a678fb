"""utils/cpu_shards.py: a CPU training step split into shards that run in threads gives the full batch's
gradients, reproducibly, each shard with one intra-op thread and its own dropout stream."""
import json
import os
import threading

import pytest
import torch

from models import build_network, fast_cpu, fused_norm
from models.flow import interpolate
from models.losses import flow_matching_loss
from models.songunet import Conv2d, Linear, dropout
from utils.cpu_shards import ThreadShards, auto_shards, dropout_generator, shard_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(dropout_rate, seed=0):
    with open(os.path.join(ROOT, "configs", "tiny28_de.json")) as handle:
        config = dict(json.load(handle), dropout=dropout_rate)
    torch.manual_seed(seed)
    return build_network(config)


def flow_losses(net):
    def losses(x, t, noise):
        loss = flow_matching_loss(net(interpolate(x, noise, t), t), x, noise)
        return loss, 2 * loss
    return losses


def batch(size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 1, 28, 28, generator=generator), torch.rand(size, generator=generator),
            torch.randn(size, 1, 28, 28, generator=generator))


def test_shard_sizes_add_up_and_differ_by_at_most_one():
    assert shard_sizes(7, 2) == [4, 3]
    assert shard_sizes(7, 3) == [3, 2, 2]
    assert shard_sizes(32, 2) == [16, 16]
    assert shard_sizes(2, 4) == [1, 1]          # never an empty shard
    with pytest.raises(ValueError):
        shard_sizes(0, 2)
    with pytest.raises(ValueError):
        ThreadShards(0)


def test_auto_shards_only_for_one_cpu_process():
    assert auto_shards("cpu") == torch.get_num_threads()
    assert auto_shards("cuda") == 1
    assert auto_shards("cpu", world_size=2) == 1
    assert auto_shards("cpu", compiled=True) == 1


def test_linear_model_gradient_matches_the_closed_form():
    # loss = mean_i (w . x_i - y_i)^2  =>  grad = 2 / N * sum_i (w . x_i - y_i) x_i, whatever the shards
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(9, generator=generator, dtype=torch.float64)
    w = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = 2.0 / 9 * ((x @ w.detach() - y)[:, None] * x).sum(0)
    for shards in (1, 2, 3, 4):
        with ThreadShards(shards) as runner:
            (loss,) = runner.step(lambda xs, ys: ((xs @ w - ys).square().mean(),), (x, y), [w])
        assert torch.allclose(w.grad, expected, rtol=1e-12, atol=1e-14), shards
        assert abs(loss.item() - (x @ w.detach() - y).square().mean().item()) < 1e-12


@pytest.mark.parametrize("shards", [2, 3])
def test_unet_gradients_equal_the_full_batch_ones(shards):
    net = tiny_net(0.0)   # no dropout: the same function of the batch
    params = list(net.parameters())
    x, t, noise = batch(7)   # unequal shards: 4 + 3, 3 + 2 + 2
    full = flow_losses(net)(x, t, noise)
    expected = torch.autograd.grad(full[0], params)
    with ThreadShards(shards) as runner:
        values = runner.step(flow_losses(net), (x, t, noise), params)
    assert abs(values[0].item() - full[0].item()) < 1e-6 * full[0].item()
    assert abs(values[1].item() - full[1].item()) < 1e-6 * full[1].item()
    # float32 sums in another order: equal to ~1e-7 of the gradient's scale
    got = torch.cat([p.grad.flatten() for p in params])
    want = torch.cat([g.flatten() for g in expected])
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 1 - 1e-6


def test_each_shard_runs_in_its_own_thread_with_one_intra_op_thread():
    seen = []
    w = torch.ones(3, requires_grad=True)

    def losses(xs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return ((xs @ w).sum(),)

    before = torch.get_num_threads()
    with ThreadShards(2) as runner:
        runner.step(losses, (torch.ones(4, 3),), [w])
        torch.set_num_threads(before)   # a caller that sets its own count again ...
        runner.step(losses, (torch.ones(4, 3),), [w])   # ... does not give the shards more
    assert len(seen) == 4
    assert all(name.startswith("shard") and threads == 1 for name, threads in seen)
    assert torch.get_num_threads() == before


def test_unused_parameters_get_no_gradient():
    used = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    with ThreadShards(2) as runner:
        runner.step(lambda xs: ((xs * used).sum(),), (torch.ones(4, 2),), [used, unused])
    assert unused.grad is None
    # each shard (2 rows of ones) has gradient [2, 2]; shards are weighted by size (1/2 each)
    assert torch.equal(used.grad, torch.full((2,), 2.0))


def test_dropout_is_reproducible_and_differs_between_seeds():
    def grads(seed):
        net = tiny_net(0.3)
        params = list(net.parameters())
        torch.manual_seed(seed)   # the shards' dropout seeds come from the global generator
        with ThreadShards(2) as runner:
            runner.step(flow_losses(net), batch(6), params)
        return torch.cat([p.grad.flatten() for p in params])

    first, again, other = grads(5), grads(5), grads(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_context_is_entered_in_each_shard_thread():
    dtypes = []
    w = torch.ones(3, 3, requires_grad=True)

    def losses(xs):
        out = xs @ w
        dtypes.append(out.dtype)
        return (out.float().sum(),)

    with ThreadShards(2) as runner:
        runner.step(losses, (torch.ones(4, 3),), [w],
                    context=lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16))
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_dropout_generator_replaces_the_global_stream_in_its_thread_only():
    x = torch.ones(4, 64, 8, 8)
    state = torch.get_rng_state()
    with dropout_generator(torch.Generator().manual_seed(11)):
        first = dropout(x, 0.5)
    with dropout_generator(torch.Generator().manual_seed(11)):
        second = dropout(x, 0.5)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)   # the global generator was not used
    kept = (first != 0).float().mean().item()
    assert abs(kept - 0.5) < 0.02   # 16,384 elements: 6 standard deviations is 0.023
    assert set(first.unique().tolist()) == {0.0, 2.0}
    dropout(x, 0.5)   # outside: the global generator again
    assert not torch.equal(torch.get_rng_state(), state)


def test_gradients_get_the_parameters_layout_so_fused_adam_steps_as_after_backward():
    """A convolution of channels_last activations returns a channels_last weight gradient from autograd.grad;
    fused Adam reads a gradient's memory as if laid out like its parameter, so the shards must hand the
    parameter's layout over (as .backward() does). Found when the bf16 fast path trained far slower."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(6, 8, 5, 5).contiguous(memory_format=torch.channels_last)

    def loss_fn(x):
        return (conv(x).square().mean(),)

    raw = torch.autograd.grad(loss_fn(x)[0], [conv.weight])[0]
    assert raw.stride() != conv.weight.stride()   # the situation this test is about
    after = {}
    for mode in ("backward", "shards"):
        model = torch.nn.Conv2d(8, 16, 3, padding=1)
        model.load_state_dict(conv.state_dict())
        params = list(model.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)

        def shard_loss(x, model=model):
            return (model(x).square().mean(),)

        if mode == "backward":
            shard_loss(x)[0].backward()
        else:
            with ThreadShards(2) as shards:
                shards.step(shard_loss, (x,), params)
        assert all(p.grad.stride() == p.stride() for p in params)
        optimizer.step()
        after[mode] = [p.detach().clone() for p in params]
    for a, b in zip(after["backward"], after["shards"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_shared_casts_give_the_gradients_of_per_shard_casts(fast):
    """``share_casts``: the bf16 weight casts made once per step and shared by the shards give the gradients
    the per-shard casts give, bit for bit: the same bf16 shard gradients, each times the scale folded into the
    weight (the fast path folds sqrt(1/2) into three convolutions per block), added in float32."""
    if fast and not fused_norm.available()[0]:
        pytest.skip("the fast path's kernel does not build here")
    net = tiny_net(0.1)   # with dropout: each step reseeds the global generator, so the masks are the same
    fast_cpu.apply([net], fast)
    params = list(net.parameters())
    x, t, noise = batch(6)
    x, noise = (v.contiguous(memory_format=torch.channels_last) if fast else v for v in (x, noise))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def step(runner):
        torch.manual_seed(5)
        values = runner.step(flow_losses(net), (x, t, noise), params, context=autocast)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return values, grads

    with ThreadShards(2) as runner:
        want_values, want = step(runner)
    kernels = fused_norm if fused_norm.available()[0] else None
    with ThreadShards(2, share_casts=True, kernels=kernels) as runner:
        first_values, first = step(runner)       # records the casts, casts as usual: the same numbers
        shared_values, shared = step(runner)     # the shared casts
        plan = runner._plan[1]
    if kernels is not None:   # the casts and the sums in C (above) and with PyTorch's operations: equal
        with ThreadShards(2, share_casts=True) as runner:
            step(runner)
            _, in_torch = step(runner)
        for a, b in zip(shared, in_torch):
            assert torch.equal(a, b)
    layers = [m for m in net.modules() if isinstance(m, (Conv2d, Linear)) and m.weight is not None]
    cast = {k for k, _, _ in plan}
    assert cast == {k for k, p in enumerate(params) if any(p is m.weight or p is m.bias for m in layers)}
    assert all(dtype == torch.bfloat16 for _, dtype, _ in plan)
    assert any(scale is not None for _, _, scale in plan) == fast
    for a, b in zip(want, first):
        assert torch.equal(a, b)
    assert [v.item() for v in shared_values] == [v.item() for v in want_values]
    for p, a, b in zip(params, want, shared):
        assert b.dtype == p.dtype and b.stride() == p.stride()
        # the same bf16 gradients, scaled and added in float32 in the same order: the same numbers, so a run's
        # first step (which records the casts) and a resumed run's agree with the steps that share them
        assert torch.equal(a, b)
