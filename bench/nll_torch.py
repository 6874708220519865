"""The peer of ddpm_nll: the variational bound in bits/dim over all T terms per image, in plain
PyTorch (Python), with the reference UNet and bound of tests/reference/ddpm_ref.py.

For each batch of images and each t: q_sample, the UNet, the KL term (t > 0) or the discretized
decoder (t = 0) in float64; then the prior term. Images are uniform on the 8-bit grid (the
throughput does not depend on them); the UNet has its initial weights. With --world W and
--rank R it computes the share of batches that rank R of ddpm_nll would, so that W processes
started together measure W ranks. Prints images, image-timesteps and seconds.
"""
import argparse
import math
import os
import sys
import time

import torch

import ref_config  # noqa: E402  (puts tests/reference on the path)
from ddpm_ref import Schedule, UNet, normal_kl, vb_terms_bits  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections, model_cfg = ref_config.load(args.config)
    diffusion_cfg = sections["diffusion"]
    timesteps = int(os.environ.get("DDPM_DIFFUSION_TIMESTEPS", diffusion_cfg.get("timesteps", 1000)))
    sched = Schedule(timesteps, diffusion_cfg.get("beta_start", 1e-4),
                     diffusion_cfg.get("beta_end", 0.02))
    torch.manual_seed(0)
    model = UNet(**model_cfg).eval()
    size = model_cfg.get("image_size", 32)
    channels = model_cfg.get("in_channels", 3)
    # ddpm_nll's split: whole batches, contiguous per rank.
    batches = (args.num + args.batch - 1) // args.batch
    first = min(args.num, batches * args.rank // args.world * args.batch)
    last = min(args.num, batches * (args.rank + 1) // args.world * args.batch)
    generator = torch.Generator().manual_seed(1 + args.rank)
    total = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(first, last, args.batch):
            n = min(args.batch, last - begin)
            x0 = torch.randint(0, 256, (n, channels, size, size), generator=generator) / 127.5 - 1
            terms = torch.zeros(n, dtype=torch.float64)
            for step in range(timesteps):
                t = torch.full((n,), step, dtype=torch.long)
                noise = torch.randn(x0.shape, generator=generator)
                abar = sched.abar[t].float()[:, None, None, None]
                x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                terms += vb_terms_bits(model(x_t, t), x0.double(), x_t.double(), t, sched,
                                       model_cfg.get("learn_sigma", False))
            # The prior KL(q(x_T | x_0) || N(0, I)).
            abar_t = sched.abar[-1]
            zero = torch.zeros((), dtype=torch.float64)
            prior = normal_kl(abar_t.sqrt() * x0.double(), torch.log(1 - abar_t), zero, zero)
            total += float((terms + prior.flatten(1).mean(1) / math.log(2.0)).sum())
    seconds = time.perf_counter() - start
    images = last - first
    print(f"images={images} image_timesteps={images * timesteps} seconds={seconds:.3f} "
          f"images_per_second={images / seconds:.4f} bits_sum={total:.4f}")


if __name__ == "__main__":
    main()
