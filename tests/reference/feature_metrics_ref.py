"""Independent NumPy/SciPy references for KID, precision/recall/density/coverage and the exact
nearest-neighbour search, for tests/feature_metrics_test.cc (Debian's python3 with numpy and
scipy). Written from the papers and the authors' reference code, not from ours:

  kid IN.npz OUT.npz SUBSETS SIZE SEED
      Binkowski et al. 2018's unbiased MMD^2 with the kernel (x.y / d + 1)^3 (torch-fidelity's
      mmd2 of polynomial_kernel), over SUBSETS subsets of SIZE rows of `fake` and of `real`,
      drawn by a partial Fisher-Yates shuffle on SplitMix64(SEED) (fake, then real, per subset).
      Writes the per-subset values (`mmds`), their mean and population std.
  prdc IN.npz OUT.npz
      Naeem et al. 2020's prdc.compute_prdc (scipy cdist, np.partition) with k = 3 for
      precision and recall and k = 5 for density and coverage.
  nearest IN.npz OUT.npz
      brute force: the two smallest scipy cdist distances of each `queries` row to `train`,
      ties to the lower index (a stable argsort).
"""
import sys

import numpy as np
from scipy.spatial.distance import cdist

MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, bound):
        # Lemire's rejection of the low values that bias the modulo.
        threshold = ((1 << 64) - bound) % bound
        while True:
            r = self.next()
            if r >= threshold:
                return r % bound


def draw_subset(rng, n, m):
    order = list(range(n))
    for i in range(m):
        j = i + rng.below(n - i)
        order[i], order[j] = order[j], order[i]
    return np.array(order[:m])


def polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return (off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)


def kid(arrays, subsets, size, seed):
    fake = arrays["fake"].astype(np.float64)
    real = arrays["real"].astype(np.float64)
    rng = SplitMix64(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        f = fake[draw_subset(rng, len(fake), size)]
        r = real[draw_subset(rng, len(real), size)]
        mmds[s] = mmd2_unbiased(f, r)
    return {"mmds": mmds, "mean": np.array(mmds.mean()), "std": np.array(mmds.std())}


def nearest_neighbour_distances(features, k):
    distances = cdist(features, features)
    return np.partition(distances, k + 1, axis=-1)[:, : k + 1].max(axis=-1)


def prdc(arrays):
    real = arrays["real"].astype(np.float64)
    fake = arrays["fake"].astype(np.float64)
    real_3 = nearest_neighbour_distances(real, 3)
    fake_3 = nearest_neighbour_distances(fake, 3)
    real_5 = nearest_neighbour_distances(real, 5)
    d = cdist(real, fake)
    precision = (d < real_3[:, None]).any(axis=0).mean()
    recall = (d < fake_3[None, :]).any(axis=1).mean()
    density = (1.0 / 5) * (d < real_5[:, None]).sum(axis=0).mean()
    coverage = (d.min(axis=1) < real_5).mean()
    return {k: np.array(v) for k, v in
            dict(precision=precision, recall=recall, density=density, coverage=coverage).items()}


def nearest(arrays):
    d = cdist(arrays["queries"].astype(np.float64), arrays["train"].astype(np.float64))
    order = np.argsort(d, axis=1, kind="stable")[:, :2]
    return {"index": order.astype(np.int64), "distance": np.take_along_axis(d, order, axis=1)}


def main():
    command, source, target = sys.argv[1:4]
    arrays = dict(np.load(source))
    if command == "kid":
        out = kid(arrays, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif command == "prdc":
        out = prdc(arrays)
    elif command == "nearest":
        out = nearest(arrays)
    else:
        raise SystemExit("unknown command " + command)
    np.savez(target, **out)


if __name__ == "__main__":
    main()
