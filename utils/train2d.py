"""The 2D example's training step, shared by ``train_reverse_2d_joint.py`` and ``benchmarks/couplings_2d.py``.

The coupling and the loss are ``models/couplings.py`` and ``models/losses.py``; the batch and its noise come
from ``models.toy2d.training_batch``. The random draws of a step, all from the training generator, in order:
the batch, its noise, the coupling's own draws (Sinkhorn), the times.
"""
from models import flow as flowlib
from utils.amp import autocast


def training_step(model,            # models.couplings.FlowWithCoupling (velocity MLP + coupling)
                  optimizer,        # over model.parameters()
                  x,                # [B, 2] data (t = 0)
                  noise,            # [B, 2] N(0, I) noise (FixedPairs: each x's own z)
                  generator,        # CPU torch.Generator for the coupling's draws and the times
                  amp="none"):      # "none" or "bf16" (utils.amp.resolve_amp)
    """One optimiser step on the coupled flow-matching loss; returns {"loss", "loss_fm", "kl"} as floats
    ("kl" None without an encoder)."""
    noise = model.coupling.assign(x, noise, generator)
    t = flowlib.sample_time(x.shape[0], generator=generator).to(x.device)
    with autocast(x.device, amp):
        terms = model(x, t, noise)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()
    return {"loss": terms.loss.item(), "loss_fm": terms.flow_loss.item(),
            "kl": terms.kl.item() if model.encoder is not None else None}
