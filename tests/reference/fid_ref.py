"""Independent references for FID and IS, for tests/fid_test.cc (Debian's python3 with torch,
torchvision, numpy and scipy).

  fid_ref.py network DIR      FID Inception on torchvision's Inception3 with pytorch-fid's four
                              block changes, random weights: writes DIR/inception.pt (a state
                              dict in the key layout of pt_inception-2015-12-05-6726825d.pth)
                              and DIR/expected.pt (images, their pool3 and logits).
  fid_ref.py metrics DIR      random features (dimensions 64 and 2048, full rank and rank
                              deficient) and logits in DIR/features.npz; pytorch-fid's Frechet
                              distance (scipy.linalg.sqrtm) and the standard 10-split IS in
                              DIR/expected.npz.
  fid_ref.py gaussian-stats FILE
                              FID reference statistics (mu, sigma) of 3000 standard Gaussian
                              vectors of dimension 2048, and the vectors as float32 (features,
                              for KID and PRD), in numpy's own .npz.
  fid_ref.py npz-write DIR    DIR/plain.npz (numpy.savez) and DIR/compressed.npz
                              (numpy.savez_compressed), with float64, float32 (Fortran order)
                              and int64 arrays.
  fid_ref.py npz-check FILE   checks the arrays of a .npz that the C++ side wrote.
"""
import os
import sys

import numpy as np
from scipy import linalg


def build_model():
    """The FID Inception: torchvision's Inception3 with pytorch-fid's block changes."""
    import torch
    import torch.nn.functional as F
    from torchvision.models import inception

    class FIDInceptionA(inception.InceptionA):
        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            # The TF graph's pools divide by the pixels inside the image only.
            branch_pool = self.branch_pool(
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)

    class FIDInceptionC(inception.InceptionC):
        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            branch_pool = self.branch_pool(
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([branch1x1, branch7x7, d, branch_pool], 1)

    class FIDInceptionE(inception.InceptionE):
        def __init__(self, in_channels, max_pool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            if self.max_pool:  # The last block of the TF graph pools with max.
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                                      count_include_pad=False)
            return torch.cat([branch1x1, b3, d, self.branch_pool(pooled)], 1)

    model = inception.Inception3(num_classes=1008, aux_logits=False, init_weights=True)
    model.Mixed_5b = FIDInceptionA(192, pool_features=32)
    model.Mixed_5c = FIDInceptionA(256, pool_features=64)
    model.Mixed_5d = FIDInceptionA(288, pool_features=64)
    model.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    model.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    model.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    model.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return model


def features(model, images):
    """pool3 and logits of images in [-1, 1], as pytorch-fid's forward computes them."""
    import torch.nn.functional as F
    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                 "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                 "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                 "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
        x = getattr(model, name)(x)
    pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool3, model.fc(pool3)


def network(out_dir):
    import torch
    torch.manual_seed(0)
    model = build_model()
    # Random weights that keep activations in range, and batch-norm statistics that are not
    # the identity, so that every parameter and buffer matters.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.Linear):
                # Logits of a few units, and a bias of the same size, so that leaving the bias
                # out (the unbiased IS) changes every class probability.
                module.weight.normal_(0, 0.02)
                module.bias.normal_(0, 1.0)
    model.eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, os.path.join(out_dir, "inception.pt"))

    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        pool3, logits = features(model, images)
    # The Inception Score of 20 images, in NumPy from the same network's pool3: from the
    # original TF code's logits, pool3 times the fc weights without the bias (openai/improved-
    # gan), and from the fc's output with it.
    is_images = torch.rand(20, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        is_pool3, is_logits = features(model, is_images)
    weight = model.fc.weight.detach().double().numpy()
    unbiased = inception_score(is_pool3.double().numpy() @ weight.T)
    biased = inception_score(is_logits.double().numpy())
    # One dict of several entries: LibTorch's unpickler reads SETITEMS, not a lone SETITEM.
    torch.save({"images": images, "pool3": pool3, "logits": logits, "is_images": is_images,
                "is_unbiased": torch.tensor(unbiased, dtype=torch.float64),
                "is_biased": torch.tensor(biased, dtype=torch.float64)},
               os.path.join(out_dir, "expected.pt"))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def inception_score(logits, splits=10):
    """The original IS: softmax, then exp(mean KL(p(y|x) || p(y))) over 10 contiguous splits."""
    logits = logits - logits.max(1, keepdims=True)
    preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    n = preds.shape[0]
    scores = []
    for i in range(splits):
        part = preds[(i * n // splits):((i + 1) * n // splits)]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def metrics(out_dir):
    rng = np.random.default_rng(7)
    features, expected = {}, {}
    # (name, dimension, samples of each set): full rank, then fewer samples than dimensions.
    for name, dim, n in [("d64", 64, 500), ("d64_deficient", 64, 40), ("d2048", 2048, 2500),
                         ("d2048_deficient", 2048, 300)]:
        mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        a = rng.normal(size=(n, dim)) @ mixing
        b = rng.normal(size=(n, dim)) @ (mixing + 0.1 * rng.normal(size=(dim, dim)) / np.sqrt(dim)) + 0.3
        features[name + "_a"], features[name + "_b"] = a, b
        mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
        mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
        expected[name + "_fid"] = np.array(frechet_distance(mu1, sigma1, mu2, sigma2))
        if dim == 64:  # numpy's mean and covariance, to check the C++ moments against
            expected[name + "_mu"], expected[name + "_sigma"] = mu1, sigma1
    for name, n in [("is250", 250), ("is1003", 1003)]:
        logits = rng.normal(size=(n, 1008)) * 3
        features[name + "_logits"] = logits
        mean, std = inception_score(logits)
        expected[name + "_mean"], expected[name + "_std"] = np.array(mean), np.array(std)
    np.savez(os.path.join(out_dir, "features.npz"), **features)
    np.savez(os.path.join(out_dir, "expected.npz"), **expected)


def gaussian_stats(path):
    a = np.random.default_rng(0).normal(size=(3000, 2048))
    np.savez(path, mu=a.mean(0), sigma=np.cov(a, rowvar=False), features=a.astype(np.float32))


def npz_arrays():
    return {
        "mu": np.linspace(-1, 1, 7),
        "sigma": np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "counts": np.arange(5, dtype=np.int64) * 3,
        # A sample archive's images: uint8 N x H x W x 3, as the OpenAI evaluator reads them.
        "arr_0": (np.arange(2 * 4 * 4 * 3) * 37 % 256).astype(np.uint8).reshape(2, 4, 4, 3),
    }


def npz_write(out_dir):
    np.savez(os.path.join(out_dir, "plain.npz"), **npz_arrays())
    np.savez_compressed(os.path.join(out_dir, "compressed.npz"), **npz_arrays())


def npz_check(path):
    loaded = np.load(path)
    expected = npz_arrays()
    assert sorted(loaded.files) == sorted(expected), loaded.files
    for name, array in expected.items():
        got = loaded[name]
        assert got.dtype == array.dtype, (name, got.dtype, array.dtype)
        assert got.shape == array.shape, (name, got.shape, array.shape)
        assert np.array_equal(got, array), (name, got, array)
    print("npz-check: ok", path)


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    {"network": network, "metrics": metrics, "gaussian-stats": gaussian_stats,
     "npz-write": npz_write,
     "npz-check": npz_check}[command](target)
