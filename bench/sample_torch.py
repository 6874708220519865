"""The peer of ddpm_sample for bench/sample.sh: the paper's ancestral sampler over all T steps
as a plain PyTorch loop (Python), the way single-file DDPM implementations write it, on the
reference UNet of tests/reference/ddpm_ref.py built from a ddpm-train YAML config's model
section (random weights: the time does not depend on them). Samples --num images in batches
of --batch under torch.inference_mode, quantizes them to 8 bits and writes one PNG each with
PIL, as ddpm_sample does. Prints the seconds from start to the last file.
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image

import ref_config  # noqa: E402  (puts tests/reference on the path)
from ddpm_ref import Schedule, UNet  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    sections, model_cfg = ref_config.load(args.config)
    diffusion_cfg = sections["diffusion"]
    timesteps = diffusion_cfg.get("timesteps", 1000)
    s = Schedule(timesteps, diffusion_cfg.get("beta_start", 1e-4),
                 diffusion_cfg.get("beta_end", 0.02))
    model = UNet(**model_cfg).eval()
    channels = model_cfg.get("in_channels", 3)
    size = model_cfg.get("image_size", 32)
    # fixedlarge: the variance beta_t (the paper's CIFAR-10 choice), beta-tilde at t = 0.
    log_var = torch.log(torch.cat([s.beta_tilde[1:2], s.betas[1:]])).float()
    sqrt_recip = (1 / s.abar).sqrt().float()
    sqrt_recipm1 = (1 / s.abar - 1).sqrt().float()
    coef_x0, coef_xt = s.coef_x0.float(), s.coef_xt.float()
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for first in range(0, args.num, args.batch):
            n = min(args.batch, args.num - first)
            x = torch.randn((n, channels, size, size), generator=generator)
            for i in reversed(range(timesteps)):
                t = torch.full((n,), i, dtype=torch.long)
                eps = model(x, t)[:, :channels]
                x0 = (sqrt_recip[i] * x - sqrt_recipm1[i] * eps).clamp(-1, 1)
                mean = coef_x0[i] * x0 + coef_xt[i] * x
                x = mean + (torch.exp(0.5 * log_var[i]) * torch.randn(x.shape, generator=generator)
                            if i > 0 else 0)
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            for k in range(n):
                image = pixels[k].permute(1, 2, 0).numpy()
                Image.fromarray(image[:, :, 0] if channels == 1 else image).save(
                    os.path.join(args.out, "%06d.png" % (first + k)))
    seconds = time.perf_counter() - start
    print(f"impl=pytorch images={args.num} batch={args.batch} threads={args.threads} "
          f"seconds={seconds:.1f} images_per_second={args.num / seconds:.4f}")


if __name__ == "__main__":
    main()
