"""Judges the shape kind of the shapes dataset's images from their pixels alone, knowing nothing
of how they are made: the background is the border's median colour and the shape the pixels far
from it (over half the largest distance); an upright triangle's rows widen downward, a square
fills its bounding box and a circle fills about pi/4 of it.

    shape_kind.py check                      the classifier on shapes it draws itself
    shape_kind.py judge DIR CLASSES MIN_ACC  DIR's PNGs, in CLASSES equal contiguous blocks

Kinds: 0 circle, 1 square, 2 triangle; -1 no shape.
"""
import glob
import sys

import numpy as np
from PIL import Image


def classify(img):
    img = img.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.abs(img - np.median(border, axis=0)).sum(axis=2)
    if dist.max() < 60:
        return -1
    mask = dist > 0.5 * dist.max()
    if mask.sum() < 4:
        return -1
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    rows = [mask[y].sum() for y in range(ys.min(), ys.max() + 1)]
    third = max(1, len(rows) // 3)
    if np.mean(rows[-third:]) > 1.8 * np.mean(rows[:third]) and fill < 0.75:
        return 2
    return 1 if fill > 0.88 else 0


def draw(rng, kind, n=16):
    """A shape as the dataset's README describes them: random colours at least 180 apart,
    radius 0.18-0.32 of the side, 4x4 supersampled edges."""
    background = rng.integers(0, 256, 3)
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= 180:
            break
    r = n * (0.18 + 0.14 * rng.random())
    cx, cy = r + (n - 2 * r) * rng.random(), r + (n - 2 * r) * rng.random()
    sub = (np.arange(n * 4) + 0.5) / 4
    dx, dy = sub[None, :] - cx, sub[:, None] - cy
    if kind == 0:
        inside = dx * dx + dy * dy <= r * r
    elif kind == 1:
        inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    else:
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= r * (dy + r) / (2 * r))
    coverage = inside.reshape(n, 4, n, 4).mean(axis=(1, 3))
    return np.round(background + coverage[..., None] * (colour - background)).astype(np.uint8)


def main():
    if sys.argv[1] == "check":
        rng = np.random.default_rng(0)
        right = sum(classify(draw(rng, i % 3)) == i % 3 for i in range(600))
        print("shape_kind: %d of 600 drawn shapes judged right" % right)
        assert right >= 570, right
        return
    folder, classes, min_accuracy = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    files = sorted(glob.glob(folder + "/*.png"))
    confusion = np.zeros((classes, classes + 1), int)
    for i, path in enumerate(files):
        confusion[i * classes // len(files), classify(np.asarray(Image.open(path).convert("RGB")))] += 1
    accuracy = np.trace(confusion[:, :classes]) / len(files)
    print("shape_kind: asked (rows) against judged (columns, the last: no shape):")
    print(confusion)
    print("shape_kind: %.3f of %d samples are the kind asked for (chance 1/%d)" % (
        accuracy, len(files), classes))
    assert accuracy >= min_accuracy, "accuracy %.3f < %.3f" % (accuracy, min_accuracy)
    for k in range(classes):
        share = confusion[k, k] / confusion[k].sum()
        assert share > 1.0 / classes, "class %d: only %.3f of its row, chance %.3f" % (
            k, share, 1.0 / classes)


if __name__ == "__main__":
    main()
