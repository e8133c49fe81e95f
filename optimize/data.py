"""Datasets of the offline pipeline: real digits, a 2-D toy, procedural shapes and the analytic GMM.

Every loader is deterministic (fixed split or explicit seed) and returns float32 CPU tensors; image
data lies in [-1, 1] with shape ``[N, 1, R, R]``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from samplers.denoisers import GaussianMixture

HELDOUT_PER_CLASS = 30  # 10 classes x 30 = 300 held-out digits; the other 1,497 are for training
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All 1,797 scikit-learn digits as ([N,1,8,8] float32 in [-1,1], labels int64, heldout mask)."""
    from sklearn.datasets import load_digits

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


RING_STD = 0.05
RING_RADIUS = math.sqrt(2.0 * (1.0 - RING_STD**2))  # per-coordinate variance r^2/2 + std^2 = 1


def toy2d(n: int, seed: int = 0, kind: str = "checkerboard") -> torch.Tensor:
    """n float32 points ``[n, 2]`` with unit per-coordinate std: "checkerboard" (uniform on the 8 dark
    cells of a 4x4 board over [-2,2]^2, scaled by sqrt(3)/2) or "ring" (8 Gaussians, see ring_model)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ring":
        return ring_model().sample(n, generator=gen).to(torch.float32)
    if kind != "checkerboard":
        raise ValueError(f"unknown toy2d kind {kind!r}; valid kinds are 'checkerboard' and 'ring'.")
    u = torch.rand((n, 2), generator=gen, dtype=torch.float64)
    col = torch.floor(u[:, 0] * 4)  # column 0..3, uniform
    row = 2 * torch.floor(u[:, 1] * 2) + (col % 2)  # rows with (row + col) even
    frac = torch.rand((n, 2), generator=gen, dtype=torch.float64)
    pts = torch.stack([col + frac[:, 0], row + frac[:, 1]], dim=1) - 2.0  # in [-2, 2]^2
    return (pts * (math.sqrt(3.0) / 2.0)).to(torch.float32)  # x marginal uniform on [-2,2]: var 4/3


def ring_model() -> GaussianMixture:
    """The exact GaussianMixture of ``toy2d(kind="ring")``: 8 components, radius RING_RADIUS, std RING_STD."""
    return GaussianMixture.ring(8, radius=RING_RADIUS, std=RING_STD)


SHAPES_RES = 32
SUPERSAMPLE = 4
SHAPE_KINDS = ("disc", "square", "triangle")


def _render_shapes(params: torch.Tensor) -> torch.Tensor:
    """Coverage-weighted render of params rows ``(kind, cx, cy, radius, angle, intensity)`` at 32x32
    (4x4 supersamples per pixel averaged), background -1, shape value -1 + 2 intensity."""
    hi = SHAPES_RES * SUPERSAMPLE
    t = (torch.arange(hi, dtype=torch.float64) + 0.5) / hi
    py, px = torch.meshgrid(t, t, indexing="ij")
    dx = px[None] - params[:, 1, None, None]
    dy = py[None] - params[:, 2, None, None]
    r, angle, kind = params[:, 3, None, None], params[:, 4], params[:, 0]
    inside = torch.empty((len(params), hi, hi), dtype=torch.bool)
    disc = torch.nonzero(kind == 0).squeeze(1)
    inside.index_copy_(0, disc, dx[disc] ** 2 + dy[disc] ** 2 <= r[disc] ** 2)
    for k, sides in ((1, 4), (2, 3)):  # regular polygon: max_j <p - c, n_j> <= r cos(pi / sides)
        sel = torch.nonzero(kind == k).squeeze(1)
        a = angle[sel, None] + torch.arange(sides, dtype=torch.float64) * (2 * math.pi / sides)
        proj = dx[sel, None] * a.cos()[..., None, None] + dy[sel, None] * a.sin()[..., None, None]
        inside.index_copy_(0, sel, proj.amax(dim=1) <= r[sel] * math.cos(math.pi / sides))
    cover = torch.nn.functional.avg_pool2d(inside[:, None].to(torch.float64), SUPERSAMPLE)
    return -1.0 + 2.0 * params[:, 5, None, None, None] * cover


def shapes(n: int, seed: int = 0, resolution: int = 32) -> torch.Tensor:
    """n anti-aliased random shapes ``[n,1,R,R]`` float32 in [-1,1] (disc, square or triangle; random
    centre, size, rotation, intensity); R in (32, 16, 8), lower R = average pooling of the 32x32 render.
    Sample i depends only on (seed, i), not on n."""
    if resolution not in (32, 16, 8):
        raise ValueError(f"shapes resolution must be 32, 16 or 8, got {resolution}.")
    u = torch.rand((n, 6), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # row i: sample i
    params = torch.stack(
        [
            torch.floor(u[:, 0] * len(SHAPE_KINDS)),  # kind
            0.3 + 0.4 * u[:, 1],  # centre x (unit square)
            0.3 + 0.4 * u[:, 2],  # centre y
            0.12 + 0.16 * u[:, 3],  # circumradius
            2 * math.pi * u[:, 4],  # rotation
            0.4 + 0.6 * u[:, 5],  # intensity
        ],
        dim=1,
    )
    out = torch.cat([_render_shapes(chunk) for chunk in params.split(256)]) if n else torch.empty(0, 1, 32, 32)
    if resolution < SHAPES_RES:
        out = torch.nn.functional.avg_pool2d(out, SHAPES_RES // resolution)
    return out.to(torch.float32)


def gmm_model(shape: Sequence[int] = (1, 8, 8), components: int = 6, seed: int = 0) -> GaussianMixture:
    """The analytic GMM model: ``GaussianMixture.random(shape, components, seed)`` (for shape (2,) use ring_model)."""
    return GaussianMixture.random(tuple(shape), components=components, seed=seed)


def _gmm_data(n: int, seed: int = 0, shape: Sequence[int] = (1, 8, 8), components: int = 6, model_seed: int = 0) -> torch.Tensor:
    """n float32 draws from gmm_model(shape, components, model_seed) with sampling seed ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return gmm_model(shape, components, model_seed).sample(n, generator=gen).to(torch.float32)


DATASETS: dict[str, Callable[..., object]] = {
    "digits": digits,
    "toy2d": toy2d,
    "shapes": shapes,
    "gmm": _gmm_data,
}


def get(name: str) -> Callable[..., object]:
    """The loader registered under ``name``; ValueError naming the valid ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets are {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]
