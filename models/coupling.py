"""The flow and its coupling as one module: the paper's training losses for images.

``FlowWithCoupling(flow, encoder)`` returns (flow-matching MSE, KL per dimension) for a batch; the total
loss of the paper is ``flow_loss + weight_prior * kl``. Without an encoder (the independent and minibatch
OT couplings) the noise is the prior sample itself and the KL is 0.
"""
import torch
from torch import nn

from models import flow as flowlib
from models.encoder import kl_per_dim


class FlowWithCoupling(nn.Module):
    """The velocity network ``flow`` and, for the learned coupling, the ``encoder``; ``forward`` gives the losses.

    One module, so that one DDP wrapper synchronises both networks' gradients.
    """

    def __init__(self, flow, encoder=None):
        super().__init__()
        self.flow = flow
        self.encoder = encoder

    def forward(self, x, t, noise):
        """(flow-matching MSE, KL per dimension) for images ``x`` [B, C, H, W], times ``t`` [B] and
        N(0, I) ``noise`` shaped like x (the prior sample itself, or the encoder's reparameterisation noise)."""
        if self.encoder is not None:
            z, mu, logvar = self.encoder(x, noise=noise)
            kl = kl_per_dim(mu.float(), logvar.float())
        else:
            z, kl = noise, torch.zeros((), device=x.device)
        velocity = self.flow(flowlib.interpolate(x, z, t), t)
        return flowlib.flow_matching_loss(velocity, x, z), kl

    def optimizer_params(self):
        """Encoder parameters first, then the flow's: the paper's order, so optimizer states line up."""
        encoder = list(self.encoder.parameters()) if self.encoder is not None else []
        return encoder + list(self.flow.parameters())

    def state_dicts(self):
        return {"flow": self.flow.state_dict(),
                "encoder": self.encoder.state_dict() if self.encoder is not None else None}
