"""Golden reference run for tests/golden_test.cc.

usage: golden.py IN.pt OUT.pt CONFIG_JSON

IN.pt holds "param.<name>" weights and the inputs "x0", "t", "noise" (and "y", the labels of a
conditional model: CONFIG_JSON's num_classes > 0). The reference computes,
with its own float64 schedule, x_t, the UNet output, the L_simple loss and the gradient of
every parameter, and writes them to OUT.pt.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddpm_ref import UNet, linear_alphas_cumprod, loss_eps_l2  # noqa: E402


def main():
    inputs = torch.load(sys.argv[1])
    config = json.loads(sys.argv[3])
    timesteps = config.pop("timesteps")
    torch.set_num_threads(1)
    model = UNet(**config)
    state = {k[len("param."):]: v for k, v in inputs.items() if k.startswith("param.")}
    model.load_state_dict(state, strict=True)
    model.eval()
    x0, t, noise = inputs["x0"], inputs["t"], inputs["noise"]
    y = inputs.get("y")
    alphas_cumprod = linear_alphas_cumprod(timesteps, 1e-4, 0.02)
    abar = alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
    with torch.no_grad():
        out = model(x_t, t, y)
    loss = loss_eps_l2(lambda x, tt: model(x, tt, y), x0, t, noise, alphas_cumprod)
    loss.backward()
    result = {"x_t": x_t, "out": out, "loss": loss.detach().reshape(())}
    for name, p in model.named_parameters():
        result["grad." + name] = p.grad
    result["num_params"] = torch.tensor(sum(p.numel() for p in model.parameters()))
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
