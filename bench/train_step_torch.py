"""The peer of ddpm_bench: the same DDPM training and sampling steps in plain PyTorch (Python).

Training: L_simple (or, with model.learn_sigma and diffusion.loss hybrid or vlb, the
reference's L_hybrid / L_vlb), backward, grad-norm clip, torch.optim.Adam and an EMA update, on
the reference UNet of tests/reference/ddpm_ref.py built from a ddpm-train YAML config's model
section. DDPM_MODEL_LEARN_SIGMA and DDPM_DIFFUSION_LOSS override the config, as in C++. Sampling: one ancestral (DDPM) step and one DDIM step, as the paper and Song et al.
write them. Prints the same keys as ddpm_bench.
"""
import argparse
import math
import os
import resource
import statistics
import sys
import time

import torch

import ref_config  # noqa: E402  (puts tests/reference on the path)
from ddpm_ref import Schedule, UNet, loss_hybrid  # noqa: E402



def quantile(values, q):
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections, model_cfg = ref_config.load(args.config)
    train_cfg = sections["train"]
    diffusion_cfg = sections["diffusion"]
    sample_cfg = sections["sample"]
    if "DDPM_MODEL_LEARN_SIGMA" in os.environ:
        model_cfg["learn_sigma"] = os.environ["DDPM_MODEL_LEARN_SIGMA"] == "true"
    loss_kind = os.environ.get("DDPM_DIFFUSION_LOSS", diffusion_cfg.get("loss", "l2"))
    timesteps = diffusion_cfg.get("timesteps", 1000)
    model = UNet(**model_cfg)
    size = model_cfg.get("image_size", 32)
    channels = model_cfg.get("in_channels", 3)
    ema = UNet(**model_cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=train_cfg.get("lr", 2e-4))
    betas = torch.linspace(diffusion_cfg.get("beta_start", 1e-4), diffusion_cfg.get("beta_end", 0.02),
                           timesteps, dtype=torch.float64)
    abar64 = torch.cumprod(1 - betas, 0)
    abar = abar64.float()
    images = torch.rand(args.batch, channels, size, size) * 2 - 1
    schedule = Schedule(timesteps, diffusion_cfg.get("beta_start", 1e-4),
                        diffusion_cfg.get("beta_end", 0.02))
    decay = train_cfg.get("ema_decay", 0.9999)

    def train_step():
        model.train()
        opt.zero_grad()
        t = torch.randint(0, timesteps, (args.batch,))
        noise = torch.randn_like(images)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        if loss_kind in ("hybrid", "vlb"):
            loss = loss_hybrid(model, images, t, noise, schedule, loss_kind)
        else:
            loss = ((model(x_t, t)[:, :channels] - noise) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.get("grad_clip", 1.0))
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, params, alpha=1 - decay)
        return loss.item()

    for _ in range(args.warmup):
        train_step()
    step_ms = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step()
        step_ms.append(1000 * (time.perf_counter() - start))

    # Forward and backward alone, on fixed timesteps and noise: the part both sides share.
    torch.manual_seed(0)
    t_fixed = torch.randint(0, timesteps, (args.batch,))
    noise_fixed = torch.randn_like(images)
    a_fixed = abar[t_fixed][:, None, None, None]
    fwd_bwd_ms = []
    for _ in range(args.steps):
        start = time.perf_counter()
        x_t = a_fixed.sqrt() * images + (1 - a_fixed).sqrt() * noise_fixed
        ((model(x_t, t_fixed)[:, :channels] - noise_fixed) ** 2).mean().backward()
        fwd_bwd_ms.append(1000 * (time.perf_counter() - start))

    # Sampler steps, with precomputed buffers as any implementation would hold them.
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar64[:-1]])
    coef1 = (betas * abar_prev.sqrt() / (1 - abar64)).float()
    coef2 = ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar64)).float()
    log_var = torch.log(torch.cat([(betas * (1 - abar_prev) / (1 - abar64))[1:2], betas[1:]])).float()
    sqrt_recip = (1 / abar64).sqrt().float()
    sqrt_recipm1 = (1 / abar64 - 1).sqrt().float()
    ema.eval()
    shape = (args.sample_batch, channels, size, size)

    def ddpm_step(x, i):
        t = torch.full((shape[0],), i, dtype=torch.long)
        eps = ema(x, t)[:, :channels]
        x0 = (sqrt_recip[i] * x - sqrt_recipm1[i] * eps).clamp(-1, 1)
        mean = coef1[i] * x0 + coef2[i] * x
        return mean + torch.exp(0.5 * log_var[i]) * torch.randn(shape)

    def ddim_step(x, i, prev):
        t = torch.full((shape[0],), i, dtype=torch.long)
        eps = ema(x, t)[:, :channels]
        x0 = (sqrt_recip[i] * x - sqrt_recipm1[i] * eps).clamp(-1, 1)
        eps = (sqrt_recip[i] * x - x0) / sqrt_recipm1[i]
        a_prev = float(abar64[prev]) if prev >= 0 else 1.0
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    with torch.no_grad():
        x = torch.randn(shape)
        ddpm_step(x, timesteps - 1)  # warm-up
        start = time.perf_counter()
        for i in range(args.sample_steps):
            x = ddpm_step(x, timesteps - 1 - i)
        ddpm_ms = 1000 * (time.perf_counter() - start) / args.sample_steps
        skip = timesteps // args.sample_steps
        start = time.perf_counter()
        for i in reversed(range(args.sample_steps)):
            x = ddim_step(x, i * skip, (i - 1) * skip)
        ddim_ms = 1000 * (time.perf_counter() - start) / args.sample_steps

    median = statistics.median(step_ms)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"impl=pytorch params={sum(p.numel() for p in params)} batch={args.batch} "
          f"threads={args.threads} train_ms_median={median:.2f} "
          f"train_ms_p10={quantile(step_ms, 0.1):.2f} train_ms_p90={quantile(step_ms, 0.9):.2f} "
          f"fwd_bwd_ms_median={statistics.median(fwd_bwd_ms):.2f} "
          f"images_per_second={args.batch * 1000 / median:.1f} ddpm_step_ms={ddpm_ms:.2f} "
          f"ddim_step_ms={ddim_ms:.2f} "
          f"ddpm_ms_per_image={ddpm_ms * timesteps / args.sample_batch:.1f} "
          f"ddim_ms_per_image={ddim_ms * sample_cfg.get('steps', 100) / args.sample_batch:.1f} "
          f"peak_rss_mb={rss_mb:.0f}")


if __name__ == "__main__":
    main()
