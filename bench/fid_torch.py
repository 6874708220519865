"""The Python side of bench/fid.sh: the same FID Inception (torchvision's Inception3 with
pytorch-fid's blocks, from tests/reference/fid_ref.py) in images/s, and pytorch-fid's Frechet
distance (scipy.linalg.sqrtm) at dimension 2048. One line of key=value pairs.
usage: fid_torch.py [--batch N] [--batches K] [--threads T]"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
import fid_ref  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=25)
parser.add_argument("--batches", type=int, default=3)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

torch.manual_seed(0)
model = fid_ref.build_model().eval()  # the speed does not depend on the weights' values
images = torch.rand(args.batch, 3, 32, 32) * 2 - 1
times = []
with torch.no_grad():
    fid_ref.features(model, images[:2])
    for _ in range(args.batches):
        start = time.perf_counter()
        fid_ref.features(model, images)
        times.append(1000 * (time.perf_counter() - start))
rng = np.random.default_rng(0)
a = rng.normal(size=(4096, 2048))
b = rng.normal(size=(4096, 2048)) * 1.1 + 0.1
mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
fid_times = []
for _ in range(3):
    start = time.perf_counter()
    fid = fid_ref.frechet_distance(mu1, s1, mu2, s2)
    fid_times.append(1000 * (time.perf_counter() - start))
batch_ms = statistics.median(times)
print(f"impl=pytorch batch={args.batch} threads={torch.get_num_threads()} "
      f"images_per_second={args.batch * 1000 / batch_ms:.2f} batch_ms_median={batch_ms:.1f} "
      f"fid2048_ms_median={statistics.median(fid_times):.1f} fid={fid:.6f}")
