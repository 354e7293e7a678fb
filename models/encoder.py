"""The learned forward coupling q(z | x) = N(mu(x), diag(exp(logvar(x)))).

A U-Net with ``2 * C`` output channels evaluated at t = 1 (the paper's choice:
the encoder is a time-conditioned U-Net whose time input is fixed); the first
C channels are ``mu``, the last C are ``logvar``, and ``z = mu + noise *
exp(logvar / 2)`` (reparameterisation). The U-Net is the only child, named
``encoder``, so the state dict matches the paper's ``forward_model_*_ema.pth``.
"""
import torch
from torch import nn

from models.losses import gaussian_kl, kl_per_dim  # noqa: F401  (the KL lives with the losses)


class Encoder(nn.Module):
    """``enc(x, t=None, noise=None) -> (z, mu, logvar)``, each shaped like ``x``."""

    def __init__(self, unet, in_channels):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = unet

    def forward(self, x, t=None, noise=None):
        if t is None:
            t = torch.ones(x.shape[0], device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        out = self.encoder(x, t)
        mu, logvar = out[:, :self.in_channels], out[:, self.in_channels:]
        z = mu + noise * torch.exp(logvar / 2)
        return z, mu, logvar
