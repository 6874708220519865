"""The peer of ddpm_bench: the same DDPM training step in plain PyTorch (Python).

Loss (L_simple), backward, grad-norm clip, Adam and an EMA update, on the reference UNet of
tests/reference/ddpm_ref.py, with the model section of a ddpm-train YAML config.
"""
import argparse
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "reference"))
from ddpm_ref import UNet, linear_alphas_cumprod  # noqa: E402

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "image_size",
              "in_channels", "norm_groups")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = {}
    train_cfg = {}
    if args.config:
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        model_cfg = {k: v for k, v in (cfg.get("model") or {}).items() if k in MODEL_KEYS}
        train_cfg = cfg.get("train") or {}
    model = UNet(**model_cfg)
    size = model_cfg.get("image_size", 32)
    channels = model_cfg.get("in_channels", 3)
    ema = UNet(**model_cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=train_cfg.get("lr", 2e-4))
    abar = linear_alphas_cumprod(1000, 1e-4, 0.02).float()
    images = torch.rand(args.batch, channels, size, size) * 2 - 1
    decay = train_cfg.get("ema_decay", 0.9999)

    def step():
        model.train()
        opt.zero_grad()
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(images)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        loss = ((model(x_t, t) - noise) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.get("grad_clip", 1.0))
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, params, alpha=1 - decay)
        return loss.item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - start
    print(f"impl=pytorch params={sum(p.numel() for p in params)} batch={args.batch} "
          f"threads={args.threads} steps={args.steps} ms_per_step={1000 * seconds / args.steps:.1f} "
          f"images_per_second={args.batch * args.steps / seconds:.1f} last_loss={loss:.4f}")


if __name__ == "__main__":
    main()
