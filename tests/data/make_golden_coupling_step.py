"""Before the method-core refactor: one training step's loss and gradients for each coupling on a fixed batch."""
# Made at commit e55c422 (before the method-core refactor), with that commit's models/coupling.py and models/flow.py.
import sys, torch
sys.path.insert(0, '.')
from models import build_network, build_encoder, load_config
from models.coupling import FlowWithCoupling
from models import flow as flowlib
torch.manual_seed(0)
de, en = load_config('configs/tiny28_de.json'), load_config('configs/tiny28_en.json')
flow, encoder = build_network(de), build_encoder(en)
flow.eval(); encoder.eval()
with torch.no_grad():  # the U-Nets' last layers start at zero: perturb every weight so the KL and all gradients are non-trivial
    pg = torch.Generator().manual_seed(2)
    for p in list(flow.parameters()) + list(encoder.parameters()):
        p.add_(torch.randn(p.shape, generator=pg) * 0.02)
g = torch.Generator().manual_seed(1)
x = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
t = flowlib.sample_time(6, generator=g)
noise = torch.randn(x.shape, generator=g)
out = {"config_de": de, "config_en": en, "flow_state": {k: v.clone() for k, v in flow.state_dict().items()},
       "encoder_state": {k: v.clone() for k, v in encoder.state_dict().items()}, "x": x, "t": t, "noise": noise,
       "weight_prior": 20.0}
for coupling in ("learned", "independent", "ot"):
    model = FlowWithCoupling(flow, encoder if coupling == "learned" else None)
    model.zero_grad(set_to_none=True)
    n = flowlib.minibatch_ot_pairing(x, noise) if coupling == "ot" else noise
    flow_loss, kl = model(x, t, n)
    loss = flow_loss + 20.0 * kl
    loss.backward()
    grads = {f"flow.{k}": p.grad.clone() for k, p in flow.named_parameters()}
    if coupling == "learned":
        grads.update({f"encoder.{k}": p.grad.clone() for k, p in encoder.named_parameters()})
    out[coupling] = {"loss": loss.detach(), "flow_loss": flow_loss.detach(), "kl": kl.detach(), "grads": grads,
                     "noise_used": n.clone()}
    print(coupling, loss.item(), flow_loss.item(), kl.item())
torch.save(out, sys.argv[1])
