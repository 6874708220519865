"""The same computations as bench/feature_metrics.cc in plain PyTorch (float64, blocked as any
careful implementation must be at this size), for the side-by-side figures in BENCHMARKS.md:
KID as torch-fidelity computes it (100 subsets of 1000, numpy's RandomState choice), precision,
recall, density and coverage as prdc computes them (torch.cdist in blocks instead of sklearn's
full matrix, which would need 800 MB per pair of 10k sets), and the two nearest training rows
of each sample by torch.cdist in blocks and topk.

usage: /usr/bin/python3 bench/feature_metrics_torch.py [SAMPLES] [TRAIN] [THREADS]
"""
import sys
import time

import numpy as np
import torch


def kid(fake, real, subsets=100, size=1000):
    rng = np.random.RandomState(0)
    size = min(size, len(fake), len(real))
    d = fake.shape[1]
    values = []
    for _ in range(subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), size, replace=False))].double()
        y = real[torch.from_numpy(rng.choice(len(real), size, replace=False))].double()
        k_xx, k_yy, k_xy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        values.append(((k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum())
                       / (size * (size - 1)) - 2 * k_xy.sum() / size ** 2).item())
    return float(np.mean(values))


def radii(points, k, block=1024):
    out = []
    for i in range(0, len(points), block):
        out.append(torch.cdist(points[i:i + block], points).topk(k + 1, largest=False).values[:, k])
    return torch.cat(out)


def prdc(real, fake, block=1024):
    real, fake = real.double(), fake.double()
    real_3, real_5, fake_3 = radii(real, 3), radii(real, 5), radii(fake, 3)
    precision = density = recall = coverage = 0.0
    for i in range(0, len(fake), block):
        d = torch.cdist(fake[i:i + block], real)
        precision += (d < real_3).any(1).sum().item()
        density += (d < real_5).sum().item()
    for i in range(0, len(real), block):
        d = torch.cdist(real[i:i + block], fake)
        recall += (d < fake_3).any(1).sum().item()
        coverage += (d.min(1).values < real_5[i:i + block]).sum().item()
    return precision / len(fake), recall / len(real), density / (5 * len(fake)), coverage / len(real)


def nearest_two(queries, train, block=1000):
    queries = queries.double()
    best_d = torch.full((len(queries), 2), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(queries), 2), dtype=torch.long)
    for i in range(0, len(train), block):
        d = torch.cdist(queries, train[i:i + block].double())
        values, index = d.topk(2, largest=False)
        all_d = torch.cat([best_d, values], 1)
        all_i = torch.cat([best_i, index + i], 1)
        order = all_d.argsort(1)[:, :2]
        best_d, best_i = all_d.gather(1, order), all_i.gather(1, order)
    return best_i


def main():
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    train = int(sys.argv[2]) if len(sys.argv) > 2 else 50000
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fake = torch.randn(samples, 2048).relu()
    real = torch.randn(train, 2048).relu() * 1.05
    sample_pixels = torch.rand(samples, 3072)
    train_pixels = torch.rand(train, 3072)
    times = {}
    start = time.time()
    k = kid(fake, real)
    times["kid_s"] = time.time() - start
    start = time.time()
    p, r, _, _ = prdc(real[:samples], fake)
    times["prd_s"] = time.time() - start
    start = time.time()
    nearest_two(sample_pixels, train_pixels)
    times["pixel_search_s"] = time.time() - start
    start = time.time()
    nearest_two(fake, real)
    times["feature_search_s"] = time.time() - start
    print("impl=torch threads=%d samples=%d train=%d %s kid=%.6g precision=%.4f recall=%.4f" % (
        threads, samples, train, " ".join("%s=%.2f" % kv for kv in times.items()), k, p, r))


if __name__ == "__main__":
    main()
