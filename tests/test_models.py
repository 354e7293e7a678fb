"""The U-Net and encoder against the paper's reference data: manifest, goldens, registry, shapes, KL."""
import json
import math
import os

import pytest
import torch

from models import ConfigError, build_encoder, build_network, kl_per_dim, load_config
from models.encoder import gaussian_kl
from tests.conftest import DATA, ROOT

PAPER_CONFIGS = ["mnist_de", "mnist_en", "cifar10_de", "cifar10_en", "ffhq_de", "ffhq_en",
                 "afhq_de", "afhq_en", "celebahq256_de", "celebahq256_en"]


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(DATA, "songunet_state_dict_manifest.json")) as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_state_dict_matches_manifest(name, manifest):
    config = load_config(os.path.join(ROOT, "configs", f"{name}.json"))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        network = build_encoder(config) if name.endswith("_en") else build_network(config)
    state = network.state_dict()
    if name.endswith("_en"):
        # the manifest lists the U-Net's keys; an encoder checkpoint holds them under "encoder."
        assert all(key.startswith("encoder.") for key in state)
        state = {key[len("encoder."):]: value for key, value in state.items()}
    reference = manifest[name]
    assert list(state) == list(reference["state_dict"])  # keys and their order
    assert {k: list(v.shape) for k, v in state.items()} == reference["state_dict"]
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith("resample_filter"))
    assert parameters == reference["num_params"]


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("golden", ["golden_tiny28_de", "golden_tiny32_en"])
def test_unet_reproduces_golden(golden, sdpa):
    data = torch.load(os.path.join(DATA, f"{golden}.pt"), weights_only=True)
    net = build_network(data["config"])
    net.load_state_dict(data["state_dict"], strict=True)
    net.eval().set_sdpa(sdpa)
    with torch.no_grad():
        out = net(data["x"], data["t"])
    assert out.shape == data["y"].shape
    assert (out - data["y"]).abs().max().item() < 1e-4


def test_encoder_reproduces_golden():
    data = torch.load(os.path.join(DATA, "golden_tiny32_encoder.pt"), weights_only=True)
    encoder = build_encoder(data["config"])
    encoder.load_state_dict(data["state_dict"], strict=True)
    encoder.eval()
    with torch.no_grad():
        z, mu, logvar = encoder(data["x"], noise=data["noise"])
    for ours, key in ((z, "z"), (mu, "mu"), (logvar, "logvar")):
        assert (ours - data[key]).abs().max().item() < 1e-4, key


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = build_network(load_config(os.path.join(ROOT, "configs", "tiny28_de.json"))).eval()
    with torch.no_grad():  # make the zero-ish output layer non-trivial
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("make_t", [
    lambda b: torch.full((b,), 0.3),
    lambda b: torch.full((b, 1), 0.3),
    lambda b: 0.3,
    lambda b: torch.tensor(0.3),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_time_shapes_and_batch_one(tiny, make_t, batch):
    torch.manual_seed(1)
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        out = tiny(x, make_t(batch))
        reference = tiny(x, torch.full((batch,), 0.3))
    assert out.shape == x.shape
    assert torch.equal(out, reference)


def test_batch_elements_are_independent(tiny):
    torch.manual_seed(2)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        together = tiny(x, t)
        alone = torch.cat([tiny(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    assert (together - alone).abs().max().item() < 1e-5


def test_wrong_time_length_is_rejected(tiny):
    with pytest.raises(ValueError, match="t has 2 entries"):
        tiny(torch.randn(3, 1, 28, 28), torch.rand(2))


def _mnist_config():
    with open(os.path.join(ROOT, "configs", "mnist_de.json")) as handle:
        return json.load(handle)


def test_registry_rejects_unknown_type():
    config = dict(_mnist_config(), unet_type="transformer")
    with pytest.raises(ValueError, match="unknown unet_type 'transformer'.*songunet"):
        build_network(config)


def test_registry_says_adm_is_not_supported():
    with pytest.raises(ValueError, match="ADM.*not supported"):
        build_network(dict(_mnist_config(), unet_type="adm"))


def test_unknown_key_is_named_with_the_accepted_ones():
    with pytest.raises(ConfigError, match="unknown key.*'num_blokcs'.*accepted keys.*num_blocks"):
        build_network(dict(_mnist_config(), num_blokcs=2))


def test_num_params_is_ignored():
    config = dict(_mnist_config(), num_params=123.0)
    assert sum(p.numel() for p in build_network(config).parameters()) == 2155201


def test_ill_typed_value_is_named():
    with pytest.raises(ConfigError, match="'model_channels' must be"):
        build_network(dict(_mnist_config(), model_channels="32"))


def test_encoder_needs_twice_the_channels():
    with pytest.raises(ConfigError, match="out_channels must be 2 x in_channels = 2"):
        build_encoder(_mnist_config())


def test_kl_matches_closed_form():
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2 per dimension
    mu = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    sigma = torch.tensor([[1.0, 0.5, 2.0, 1.5]])
    logvar = 2 * sigma.log()
    expected = [math.log(1 / s) + (s * s + m * m) / 2 - 0.5 for m, s in zip(mu[0].tolist(), sigma[0].tolist())]
    assert torch.allclose(gaussian_kl(mu, logvar)[0], torch.tensor(expected), atol=1e-6)
    # batch of two: summed over dims, averaged over batch, divided by the dimension
    mu2 = torch.cat([mu, torch.zeros_like(mu)])
    logvar2 = torch.cat([logvar, torch.zeros_like(logvar)])
    assert abs(kl_per_dim(mu2, logvar2).item() - sum(expected) / 2 / 4) < 1e-6
    assert kl_per_dim(torch.zeros(5, 1, 4, 4), torch.zeros(5, 1, 4, 4)).item() == 0.0


def test_encoder_reparameterisation():
    torch.manual_seed(0)
    config = load_config(os.path.join(ROOT, "configs", "tiny28_en.json"))
    encoder = build_encoder(config).eval()
    x, noise = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z, mu, logvar = encoder(x, noise=noise)
        out = encoder.encoder(x, torch.ones(2))
    assert torch.equal(mu, out[:, :1]) and torch.equal(logvar, out[:, 1:])
    assert torch.allclose(z, mu + noise * torch.exp(logvar / 2))
