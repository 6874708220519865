"""The ddpm-train YAML config as the Python peers of the benchmarks read it (bench/*_torch.py):
its sections, and the keyword arguments of the reference UNet (tests/reference/ddpm_ref.py,
which importing this module puts on the path) from the model section."""
import os
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "reference"))

MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "image_size",
              "in_channels", "norm_groups", "learn_sigma", "num_classes")


def load(path):
    """(sections, model_kwargs): every section of the file at path as a dict ({} when absent or
    when path is empty), and the model section's keys that the reference UNet takes."""
    cfg = {}
    if path:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    sections = {name: cfg.get(name) or {} for name in ("model", "diffusion", "train", "data",
                                                       "sample", "eval")}
    model = {k: v for k, v in sections["model"].items() if k in MODEL_KEYS}
    return sections, model
