"""Reference values for the variational bound's pieces (tests/likelihood_test.cc), by numerical
integration with SciPy rather than by their closed forms.

usage: bound_ref.py OUT.pt

Writes inputs and expected values in float64:
- "kl.*": pairs of Gaussians and KL(p || q) = integral of p log(p / q), by quadrature;
- "dgll.*": points x on the 8-bit grid of [-1, 1] (edges included), Gaussians (mean,
  log_scale), and log P(bin of x) = log of the integral of the density over the bin of width
  2/255 around x, the first and last bins open to -inf and +inf.
"""
import sys

import numpy as np
import torch
from scipy import integrate, stats

rng = np.random.default_rng(7)

# KL: means in [-2, 2], log-variances in [-6, 1].
n = 24
m1, m2 = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n)
lv1, lv2 = rng.uniform(-6, 1, n), rng.uniform(-6, 1, n)
kl = []
for a, la, b, lb in zip(m1, lv1, m2, lv2):
    p = stats.norm(a, np.exp(0.5 * la))
    q = stats.norm(b, np.exp(0.5 * lb))
    sd = np.exp(0.5 * la)
    value, _ = integrate.quad(lambda y: p.pdf(y) * (p.logpdf(y) - q.logpdf(y)),
                              a - 12 * sd, a + 12 * sd, epsabs=0, epsrel=1e-11, limit=200)
    kl.append(value)

# Discretized Gaussian: x on the grid, means near x, scales from a tenth of a bin to 1.
levels = np.arange(256) / 127.5 - 1.0
x = np.concatenate([[-1.0, 1.0, -1.0, 1.0], rng.choice(levels, 40)])
mean = np.clip(x + rng.normal(0, 0.05, x.size), -1.2, 1.2)
log_scale = rng.uniform(np.log(0.0005), np.log(1.0), x.size)
half = 1.0 / 255
dgll = []
for xi, mi, si in zip(x, mean, np.exp(log_scale)):
    lower = -np.inf if xi < -0.999 else xi - half
    upper = np.inf if xi > 0.999 else xi + half
    d = stats.norm(mi, si)
    # The density over the bin, integrated piecewise around the mean for accuracy.
    if np.isinf(lower):
        mass, _ = integrate.quad(d.pdf, -np.inf, upper, epsabs=0, epsrel=1e-12,
                                 points=None, limit=200)
    elif np.isinf(upper):
        mass, _ = integrate.quad(d.pdf, lower, np.inf, epsabs=0, epsrel=1e-12, limit=200)
    else:
        mass, _ = integrate.quad(d.pdf, lower, upper, epsabs=0, epsrel=1e-12, limit=200)
    dgll.append(np.log(max(mass, 1e-12)))

t = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
torch.save({"kl.mean1": t(m1), "kl.logvar1": t(lv1), "kl.mean2": t(m2), "kl.logvar2": t(lv2),
            "kl.expected": t(kl), "dgll.x": t(x), "dgll.mean": t(mean),
            "dgll.log_scale": t(log_scale), "dgll.expected": t(dgll)}, sys.argv[1])
