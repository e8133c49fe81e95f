"""The scikit-learn digits and their fixed split (1,497 training digits, 300 held out, 30 per class), shared by the
digits datasets (``optimize.data``) and the captioned digits (``optimize.data.captioned``)."""

from __future__ import annotations

import functools

import numpy as np
import torch

HELDOUT_PER_CLASS = 30  # 10 classes x 30 = 300 held-out digits; the other 1,497 are for training
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All 1,797 scikit-learn digits as ([N,1,8,8] float32 in [-1,1], labels int64, heldout mask)."""
    from sklearn.datasets import load_digits  # heavy (about 1 s): only when the digits are asked for

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)  # 0..16 -> -1..1
    y = torch.from_numpy(data.target.astype(np.int64))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    heldout = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified: the first 30 of each class in the fixed permutation
        heldout[perm[data.target[perm] == c][:HELDOUT_PER_CLASS]] = True
    return x, y, heldout


def digits_split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into ``load_digits()`` of the fixed split: (train [1497], heldout [300]), ascending."""
    heldout = _digits_all()[2]
    return torch.from_numpy(np.flatnonzero(~heldout)), torch.from_numpy(np.flatnonzero(heldout))


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits ``(x [N,1,8,8] float32 in [-1,1], y [N] int64)``; split "train" (1,497),
    "heldout" (300, 30 per class) or "all" (1,797), in the original order."""
    x, y, heldout = _digits_all()
    if split == "all":
        return x.clone(), y.clone()
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown digits split {split!r}; valid splits are 'train', 'heldout' and 'all'.")
    idx = digits_split_indices()[split == "heldout"]
    return x[idx], y[idx]
