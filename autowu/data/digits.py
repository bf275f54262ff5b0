"""A small real dataset for the CPU default and the tests: scikit-learn's bundled handwritten digits.

1,797 real 8x8 scans of the digits 0-9, upscaled to ``size`` px and saved as RGB JPEGs in torchvision's
ImageFolder layout (``<root>/train/<digit>/*.JPEG``, ``<root>/val/<digit>/*.JPEG``), ready for the beton writer.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

_DONE = ".complete"


def build_digits_folder(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write the digits as JPEG folders under ``root`` (once: a finished folder is reused); return ``root``."""
    if os.path.exists(os.path.join(root, _DONE)):
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    num_val = int(round(val_fraction * len(order)))
    for rank, index in enumerate(order):
        split = "val" if rank < num_val else "train"
        label = int(digits.target[index])
        folder = os.path.join(root, split, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = (digits.images[index] / 16.0 * 255.0).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        image.save(os.path.join(folder, f"digit_{index:04d}.JPEG"), quality=95)
    open(os.path.join(root, _DONE), "w").close()
    return root
