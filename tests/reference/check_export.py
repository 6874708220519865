"""Checks a ddpm_export file against raw float32 dumps of the C++ EMA weights.

usage: check_export.py EXPORTED.pt RAW_DIR
RAW_DIR/names.txt lists "name shape..." lines; RAW_DIR/<index>.bin holds that tensor's float32
values, written by the C++ test with plain fwrite (no pickle involved).
"""
import sys

import numpy as np
import torch


def main():
    exported = torch.load(sys.argv[1], map_location="cpu")
    raw_dir = sys.argv[2]
    names = []
    with open(f"{raw_dir}/names.txt") as f:
        for index, line in enumerate(f):
            name, *shape = line.split()
            names.append(name)
            expected = np.fromfile(f"{raw_dir}/{index}.bin", dtype=np.float32).reshape(
                [int(s) for s in shape])
            got = exported[name]
            assert got.dtype == torch.float32, (name, got.dtype)
            assert tuple(got.shape) == expected.shape, (name, got.shape, expected.shape)
            assert np.array_equal(got.numpy(), expected), f"{name}: values differ"
    assert sorted(exported.keys()) == sorted(names), (
        set(exported.keys()) ^ set(names))
    print(f"check_export: {len(names)} tensors equal")


if __name__ == "__main__":
    main()
