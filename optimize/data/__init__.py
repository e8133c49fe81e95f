"""Data, the second layer (imports base; ``folder`` reads image folders, ``models`` turns a model config into a
denoiser): the datasets of the offline pipeline: real digits, natural-image patches, a 2-D toy, procedural shapes and the
analytic GMM; ``captioned`` the captioned digits of the text-to-image testbed.

Every loader is deterministic (fixed split or explicit seed) and returns float32 CPU tensors; image
data lies in [-1, 1] with shape ``[N, C, R, R]`` (C = 1, or 3 for the RGB patches).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samplers.denoisers import GaussianMixture

from optimize.data.captioned import captioned_digits
from optimize.data.digit_split import HELDOUT_PER_CLASS, SPLIT_SEED, digits, digits_split_indices  # noqa: F401 - re-exported

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


# --- natural-image patches (the CIFAR-sized testbed) ------------------------------------------------
# RGB photographs that ship inside the scikit-image wheel (read from its data folder: no download).
# (name, area-downscale factor): the large, mostly dark hubble and retina images are shrunk so they do not dominate.
PATCH_IMAGES: tuple[tuple[str, int], ...] = (
    ("astronaut", 1), ("coffee", 1), ("chelsea", 1), ("rocket", 1), ("motorcycle_left", 1),
    ("hubble_deep_field", 2), ("immunohistochemistry", 1), ("retina", 3),
)
PATCH_RES = 32
PATCH_BLOCK = 64         # the split assigns whole 64x64 blocks of each photograph to one region
PATCH_SPLITS = ("train", "validation", "heldout")
PATCH_FRACTIONS = {"heldout": 0.15, "validation": 0.15}  # of each photograph's blocks; the rest is train
PATCH_EVAL_N = 2000      # fixed validation and held-out sets
PATCH_SPLIT_SEED = 0


def _photo(name: str) -> np.ndarray:
    """One photograph of the scikit-image wheel as uint8 [H, W, 3] (bundled files only, never a pooch download)."""
    import skimage.data  # heavy: only when the photographs are asked for
    from skimage.io import imread

    files = {"motorcycle_left": "motorcycle_left.png", "immunohistochemistry": "ihc.png", "hubble_deep_field": "hubble_deep_field.jpg",
             "retina": "retina.jpg", "rocket": "rocket.jpg"}
    path = os.path.join(skimage.data.data_dir, files.get(name, f"{name}.png"))
    img = np.asarray(imread(path))
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"scikit-image photograph {name} is not uint8 RGB (shape {img.shape}, dtype {img.dtype}).")
    return img


@functools.lru_cache(maxsize=1)
def _patch_sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images float32 [3, H, W] in [-1, 1], region maps int8 [H, W]: 0 train, 1 validation, 2 held-out, -1 unused).

    Each photograph (area-downscaled by its factor, cropped to whole blocks) is cut into PATCH_BLOCK x PATCH_BLOCK
    blocks; a fixed permutation per photograph gives 15% of its blocks to held-out, 15% to validation and the rest to
    train, so every region has every photograph and a patch inside one region shares no pixel with another region."""
    images, regions = [], []
    for k, (name, factor) in enumerate(PATCH_IMAGES):
        img = _photo(name).astype(np.float64)
        if factor > 1:
            h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
            img = img[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
        bh, bw = img.shape[0] // PATCH_BLOCK, img.shape[1] // PATCH_BLOCK
        img = img[: bh * PATCH_BLOCK, : bw * PATCH_BLOCK]
        nb = bh * bw
        perm = np.random.default_rng([PATCH_SPLIT_SEED, k]).permutation(nb)
        n_ho = max(1, round(PATCH_FRACTIONS["heldout"] * nb))
        n_val = max(1, round(PATCH_FRACTIONS["validation"] * nb))
        label = np.zeros(nb, dtype=np.int8)
        label[perm[:n_ho]] = 2
        label[perm[n_ho:n_ho + n_val]] = 1
        region = np.repeat(np.repeat(label.reshape(bh, bw), PATCH_BLOCK, axis=0), PATCH_BLOCK, axis=1)
        images.append((img / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1).copy())
        regions.append(region)
    return images, regions


@functools.lru_cache(maxsize=3)
def _patch_positions(split: str) -> np.ndarray:
    """Every top-left corner ``(image, y, x)`` [P, 3] int64 whose PATCH_RES window lies wholly inside ``split``'s region."""
    code = PATCH_SPLITS.index(split)
    out = []
    for k, region in enumerate(_patch_sources()[1]):
        inside = np.pad((region == code).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # integral image
        r = PATCH_RES
        count = inside[r:, r:] - inside[:-r, r:] - inside[r:, :-r] + inside[:-r, :-r]  # [H-r+1, W-r+1]
        ys, xs = np.nonzero(count == r * r)
        out.append(np.stack([np.full_like(ys, k), ys, xs], axis=1))
    return np.concatenate(out).astype(np.int64)


def patch_region(split: str) -> list[np.ndarray]:
    """Per photograph, the boolean pixel mask [H, W] of ``split``'s region (for tests and plots)."""
    if split not in PATCH_SPLITS:
        raise ValueError(f"unknown patches split {split!r}; valid splits are {', '.join(map(repr, PATCH_SPLITS))}.")
    return [r == PATCH_SPLITS.index(split) for r in _patch_sources()[1]]


def _crop(pos: np.ndarray, flip: np.ndarray | None = None) -> torch.Tensor:
    """The PATCH_RES crops at ``pos`` [n, 3] (optionally mirrored left-right where ``flip``) as [n, 3, R, R] float32."""
    images = _patch_sources()[0]
    out = np.empty((len(pos), 3, PATCH_RES, PATCH_RES), dtype=np.float32)
    for k, img in enumerate(images):
        sel = np.flatnonzero(pos[:, 0] == k)
        if len(sel):
            view = np.lib.stride_tricks.sliding_window_view(img, (PATCH_RES, PATCH_RES), axis=(1, 2))  # [3, H', W', R, R]
            out[sel] = view[:, pos[sel, 1], pos[sel, 2]].transpose(1, 0, 2, 3)
    if flip is not None:
        out[flip] = out[flip][..., ::-1]
    return torch.from_numpy(out)


def patch_positions(split: str, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The crops ``patches`` returns: ``(positions [n, 3] (image, y, x), hflip [n] bool)``."""
    if split not in PATCH_SPLITS:
        raise ValueError(f"unknown patches split {split!r}; valid splits are {', '.join(map(repr, PATCH_SPLITS))}.")
    allpos = _patch_positions(split)
    if split == "train":
        if n is None or int(n) < 0:
            raise ValueError("patches('train') draws random crops: give their number n >= 0.")
        u = np.random.default_rng([PATCH_SPLIT_SEED, 1, int(seed)]).random((int(n), 2))  # row i: sample i only
        idx = np.minimum((u[:, 0] * len(allpos)).astype(np.int64), len(allpos) - 1)
        return allpos[idx], u[:, 1] < 0.5
    if seed != 0:
        raise ValueError(f"the {split} patches are a fixed set; seed must be 0, got {seed}.")
    rng = np.random.default_rng([PATCH_SPLIT_SEED, 2 + PATCH_SPLITS.index(split)])
    fixed = rng.choice(len(allpos), PATCH_EVAL_N, replace=False)
    flip = rng.random(PATCH_EVAL_N) < 0.5  # fixed flips: every set comes from the same mirror-symmetric distribution
    m = PATCH_EVAL_N if n is None else int(n)
    if not 0 <= m <= PATCH_EVAL_N:
        raise ValueError(f"the {split} set has {PATCH_EVAL_N} patches; n must be in 0..{PATCH_EVAL_N}, got {n}.")
    return allpos[fixed[:m]], flip[:m]


def patch_cells(pos: np.ndarray, flip: np.ndarray, grid: int = 4) -> np.ndarray:
    """Where each crop's centre lies in its photograph: the cell ``row * grid + col`` [n] of a grid x grid partition
    (a mirrored crop gets the column of the mirrored photograph, where its content would be)."""
    shapes = np.array([img.shape[1:] for img in _patch_sources()[0]])  # [images, 2] (H, W)
    h, w = shapes[pos[:, 0], 0], shapes[pos[:, 0], 1]
    cy, cx = pos[:, 1] + PATCH_RES / 2, pos[:, 2] + PATCH_RES / 2
    cx = np.where(flip, w - cx, cx)
    row = np.minimum((cy * grid / h).astype(np.int64), grid - 1)
    col = np.minimum((cx * grid / w).astype(np.int64), grid - 1)
    return row * grid + col


def patches(split: str = "train", n: int | None = None, seed: int = 0, resolution: int = 32) -> torch.Tensor:
    """RGB patches of the scikit-image photographs ``[n, 3, R, R]`` float32 in [-1, 1].

    ``split``: "train" gives ``n`` random 32x32 crops of the training region, each mirrored left-right with
    probability 1/2 (sample i depends only on (seed, i)); "validation" and "heldout" are fixed sets of
    PATCH_EVAL_N = 2,000 crops of their own regions, with fixed flips (``n`` takes the first n). The three regions share
    no pixel. ``resolution`` 16 or 8 gives the same patches area-averaged (2x2 or 4x4 pixel means)."""
    if resolution not in (32, 16, 8):
        raise ValueError(f"patches resolution must be 32, 16 or 8, got {resolution}.")
    pos, flip = patch_positions(split, n, seed)
    x = _crop(pos, flip) if len(pos) else torch.empty(0, 3, PATCH_RES, PATCH_RES)
    if resolution < PATCH_RES:
        x = torch.nn.functional.avg_pool2d(x.to(torch.float64), PATCH_RES // resolution).to(torch.float32)
    return x


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
    "patches": patches,
    "gmm": _gmm_data,
    "captioned-digits": captioned_digits,
}


def training_data(mcfg: Any) -> torch.Tensor | None:
    """The training set a model config's teacher learns from: the digits train split, or ``teacher.n_data`` draws
    (seed 0) of toy2d / shapes / patches at the teacher's resolution; None for a model without one."""
    if mcfg.data == "digits":
        return digits("train")[0]
    if mcfg.data not in ("toy2d", "shapes", "patches"):
        return None
    n = int(mcfg.teacher.n_data)
    if mcfg.data == "toy2d":
        return toy2d(n, seed=0)
    if mcfg.data == "shapes":
        return shapes(n, seed=0, resolution=int(mcfg.teacher.net.resolution))
    return patches("train", n, seed=0, resolution=int(mcfg.teacher.net.resolution))


def get(name: str) -> Callable[..., object]:
    """The loader registered under ``name``; ValueError naming the valid ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets are {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]
