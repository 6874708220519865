"""Golden reference for learned variances, L_hybrid and L_vlb (tests/golden_test.cc).

usage: golden_vlb.py IN.pt OUT.pt CONFIG_JSON

IN.pt holds "param.<name>" weights of a UNet with learn_sigma and the inputs "x0", "t",
"noise", all float64 (so that the comparison sees the formulas, not float32 rounding that
1/beta-tilde_1 magnifies). For each loss (hybrid with lambda = 0.001, vlb) the reference computes, from the
papers' equations in ddpm_ref.py, the loss and the gradient of every parameter, and writes
"loss_<kind>" and "grad_<kind>.<name>" to OUT.pt.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddpm_ref import Schedule, UNet, loss_hybrid  # noqa: E402


def main():
    inputs = torch.load(sys.argv[1])
    config = json.loads(sys.argv[3])
    sched = Schedule(config.pop("timesteps"))
    torch.set_num_threads(1)
    model = UNet(learn_sigma=True, **config)
    state = {k[len("param."):]: v for k, v in inputs.items() if k.startswith("param.")}
    model.double()
    model.load_state_dict(state, strict=True)
    model.eval()
    result = {}
    for kind in ("hybrid", "vlb"):
        model.zero_grad()
        loss = loss_hybrid(model, inputs["x0"], inputs["t"], inputs["noise"], sched, kind)
        loss.backward()
        result["loss_" + kind] = loss.detach().reshape(())
        for name, p in model.named_parameters():
            result[f"grad_{kind}.{name}"] = p.grad.clone()
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
