"""Small MLPs for the 2D two-mode Gaussian example."""
import torch
from torch import nn


class VelocityMLP(nn.Module):
    """v(x, t): concatenates the point [B, D] and the time [B, 1], three tanh layers (paper's ``MLP``)."""

    def __init__(self, dim=2, hidden=100):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
        if t.shape[0] == 1:
            t = t.expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=1))


class EncoderMLP(nn.Module):
    """q(z | x) for 2D points: ``forward(x, noise=None) -> (z, mu, logvar)``."""

    def __init__(self, dim=2, hidden=100):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2 * dim),
        )

    def forward(self, x, noise=None):
        out = self.net(x)
        mu, logvar = out[:, :self.dim], out[:, self.dim:]
        if noise is None:
            noise = torch.randn_like(mu)
        return mu + noise * torch.exp(logvar / 2), mu, logvar
