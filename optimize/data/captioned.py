"""Captioned digits (``captioned-digits``): the text-to-image testbed's data. A scikit-learn digit upsampled into a
32x32 RGB image, drawn in one of 6 named colours on one of 5 named backgrounds, with the caption that says so:
"a red seven on a gravel background".

- **Images** ``[N, 3, 32, 32]`` float32 in [-1, 1]: ``x = bg * (1 - a) + fg * a``, where ``a`` is the digit's 8x8
  intensity (0..16 -> 0..1) resampled bilinearly into a square box of side ``DIGIT_SIZE`` (20..26 px, uniform) whose
  centre is moved by up to ``MAX_SHIFT`` (3) px in x and y, less where needed to keep the ink (the box widened by
  half a source pixel, the reach of bilinear sampling) 1 px inside the image: the outer ring is pure background.
- **Digit images** come from the fixed split of ``optimize.data.digits``: ``images="train"`` draws only from its 1,497
  training digits, ``images="heldout"`` only from its 300 held-out ones.
- **Colours** (foreground): red, green, blue, yellow, magenta, white, saturated or bright (``COLOURS``).
- **Backgrounds**: plain ``black`` and ``gray``, and the ``brick``, ``grass`` and ``gravel`` textures of the
  scikit-image wheel (area-downscaled 2x to 256x256, 32x32 crops at random positions). Every background pixel is
  gray with a value in [0, ``BG_MAX`` = 0.45] (of [0, 1]); every colour is at RGB distance >= ``MIN_CONTRAST`` (0.5,
  of [0, 1] units) from every such gray, so the digit never blends into its background. The textures are split by
  rows like the patches' photographs: rows 0..191 of each texture feed ``images="train"``, rows 192..255
  ``images="heldout"``, so held-out images share no background pixel with training images.
- **Prompt split** of the 10 x 6 x 5 = 300 (digit, colour, background) combinations, by the fixed rule
  ``k = (digit + colour + 2 * background) mod 10`` (colour and background as indices into ``COLOURS`` and
  ``BACKGROUNDS``): ``k in {0, 5}`` held-out (60 prompts), ``k == 1`` selection (30), the rest training (210). For
  every (colour, background) pair 7 of the 10 digits are training prompts, and every pair of words (digit-colour,
  digit-background, colour-background) occurs in some training prompt, so a held-out prompt is a new combination of
  words that all appear, pairwise too, in training.

Sample i of ``captioned_digits(n, seed, images, prompts)`` depends only on (seed, i, images, prompts), not on n.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from optimize.data.digit_split import digits
from optimize.base import ConfigError

RES = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.80, 0.15), "blue": (0.25, 0.55, 1.00),
    "yellow": (1.00, 0.90, 0.10), "magenta": (0.95, 0.20, 0.95), "white": (1.00, 1.00, 1.00),
}
PLAIN = {"black": 0.02, "gray": 0.30}  # gray value in [0, 1]
TEXTURES = {"brick": (0.26, 0.08), "grass": (0.22, 0.09), "gravel": (0.28, 0.09)}  # (mean, std) of the gray in [0, 1]
BACKGROUNDS = ("black", "gray", "brick", "grass", "gravel")
BG_MAX = 0.45  # every background pixel is a gray in [0, BG_MAX]
MIN_CONTRAST = 0.5  # every colour is at least this far (RGB, [0, 1] units) from every background gray
DIGIT_SIZE = (20.0, 26.0)  # side of the digit's box in pixels, uniform
MAX_SHIFT = 3.0  # the box centre moves by up to this many pixels in x and y
TEXTURE_FACTOR = 2  # area downscale of the 512x512 textures
TEXTURE_TRAIN_ROWS = 192  # of the downscaled 256 rows; the rest is the held-out region
IMAGE_SPLITS = ("train", "heldout")
PROMPT_SPLITS = ("train", "selection", "heldout")
CAPTION_SEED = 25  # first word of every random stream of this module
N_UNIFORMS = 7  # per sample: prompt, digit image, size, shift x, shift y, crop y, crop x


class Captioned(NamedTuple):
    """Images ``x [N, 3, 32, 32]`` float32 in [-1, 1], ``labels [N, 3]`` int64 (digit, colour, background as indices
    into DIGIT_WORDS, COLOURS and BACKGROUNDS) and their captions."""

    x: torch.Tensor
    labels: torch.Tensor
    captions: list[str]


def caption(digit: int, colour: int, background: int) -> str:
    """The caption of one combination: ``caption(7, 0, 4) == "a red seven on a gravel background"``."""
    return f"a {list(COLOURS)[colour]} {DIGIT_WORDS[digit]} on a {BACKGROUNDS[background]} background"


_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")


def parse_caption(text: str) -> tuple[int, int, int]:
    """(digit, colour, background) of a caption written by ``caption``; ConfigError for any other text."""
    m = _CAPTION.fullmatch(text.strip().lower())
    if not m or m[2] not in DIGIT_WORDS or m[1] not in COLOURS or m[3] not in BACKGROUNDS:
        raise ConfigError(f"{text!r} is not a captioned-digits prompt (\"a <colour> <digit word> on a <background> "
                          f"background\", colours {', '.join(COLOURS)}, backgrounds {', '.join(BACKGROUNDS)}).")
    return DIGIT_WORDS.index(m[2]), list(COLOURS).index(m[1]), BACKGROUNDS.index(m[3])


def all_combinations() -> torch.Tensor:
    """Every (digit, colour, background) ``[300, 3]`` int64, digit-major."""
    d, c, b = np.meshgrid(np.arange(len(DIGIT_WORDS)), np.arange(len(COLOURS)), np.arange(len(BACKGROUNDS)), indexing="ij")
    return torch.from_numpy(np.stack([d.ravel(), c.ravel(), b.ravel()], axis=1).astype(np.int64))


def prompt_split(split: str) -> torch.Tensor:
    """The combinations ``[K, 3]`` (digit, colour, background) of a prompt split, digit-major: "train" (210),
    "selection" (30), "heldout" (60) or "all" (300); the rule is in the module docstring."""
    combos = all_combinations()
    if split == "all":
        return combos
    if split not in PROMPT_SPLITS:
        raise ConfigError(f"unknown prompt split {split!r}; valid: {', '.join(map(repr, PROMPT_SPLITS))} and 'all'.")
    k = (combos[:, 0] + combos[:, 1] + 2 * combos[:, 2]) % 10
    keep = {"heldout": (k == 0) | (k == 5), "selection": k == 1, "train": (k != 0) & (k != 5) & (k != 1)}[split]
    return combos[keep]


@functools.lru_cache(maxsize=1)
def _textures() -> torch.Tensor:
    """The TEXTURES as gray levels in [0, BG_MAX] ``[3, 256, 256]`` float64 (standardised, then given their mean and
    std and clipped), area-downscaled by TEXTURE_FACTOR from the bundled 512x512 files (no download)."""
    import skimage.data  # heavy: only when the textures are asked for
    from skimage.io import imread

    out = []
    for name, (mean, std) in TEXTURES.items():
        img = np.asarray(imread(os.path.join(skimage.data.data_dir, f"{name}.png")), dtype=np.float64)
        if img.ndim != 2:
            raise ValueError(f"scikit-image texture {name} is not a gray image (shape {img.shape}).")
        f = TEXTURE_FACTOR
        h, w = img.shape[0] // f, img.shape[1] // f
        img = img[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
        out.append(np.clip(mean + std * (img - img.mean()) / img.std(), 0.0, BG_MAX))
    return torch.from_numpy(np.stack(out))


def _backgrounds(background: torch.Tensor, u: torch.Tensor, images: str) -> torch.Tensor:
    """Gray backgrounds ``[n, 32, 32]`` float64 in [0, BG_MAX]: plain values, or texture crops whose top-left corner
    ``(u[:, 0], u[:, 1])`` is uniform over the windows inside ``images``' rows of the texture."""
    n = len(background)
    out = torch.empty((n, RES, RES), dtype=torch.float64)
    for k, value in enumerate(PLAIN.values()):
        out[background == k] = value
    tex = _textures()
    lo, hi = (0, TEXTURE_TRAIN_ROWS - RES) if images == "train" else (TEXTURE_TRAIN_ROWS, tex.shape[1] - RES)
    y = lo + torch.clamp((u[:, 0] * (hi - lo + 1)).long(), max=hi - lo)
    x = torch.clamp((u[:, 1] * (tex.shape[2] - RES + 1)).long(), max=tex.shape[2] - RES)
    view = tex.unfold(1, RES, 1).unfold(2, RES, 1)  # [3, H-31, W-31, 32, 32]
    sel = torch.nonzero(background >= len(PLAIN)).squeeze(1)
    out[sel] = view[background[sel] - len(PLAIN), y[sel], x[sel]]
    return out


@functools.lru_cache(maxsize=2)
def _digit_pool(images: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(digit intensities ``[M, 8, 8]`` float64 in [0, 1] of an image split, per digit the indices of its images)."""
    x, y = digits(images)
    alpha = ((x[:, 0].to(torch.float64) + 1.0) / 2.0).clamp(0, 1)  # -1..1 -> 0..1 (0..16 / 16)
    return alpha, [torch.nonzero(y == d).squeeze(1) for d in range(len(DIGIT_WORDS))]


def _render(labels: torch.Tensor, u: torch.Tensor, images: str) -> torch.Tensor:
    """The images of ``labels [n, 3]`` with uniforms ``u [n, N_UNIFORMS]`` (column 0, the prompt, unused here)."""
    alpha8, pools = _digit_pool(images)
    n = len(labels)
    if n == 0:
        return torch.empty((0, 3, RES, RES))
    src = torch.empty((n, 1, 8, 8), dtype=torch.float64)
    for d, pool in enumerate(pools):
        sel = torch.nonzero(labels[:, 0] == d).squeeze(1)
        pick = torch.clamp((u[sel, 1] * len(pool)).long(), max=len(pool) - 1)
        src[sel, 0] = alpha8[pool[pick]]
    size = DIGIT_SIZE[0] + (DIGIT_SIZE[1] - DIGIT_SIZE[0]) * u[:, 2]
    room = torch.clamp((RES - size * 9 / 8) / 2 - 1.0, max=MAX_SHIFT)  # the ink stays 1 px inside the image
    shift = (2 * u[:, 3:5] - 1) * room[:, None]  # [n, 2] (x, y) in pixels
    # output pixel p (normalised to [-1, 1]) reads the digit at (p - centre) * RES / size
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = RES / size
    theta[:, :, 2] = -(2 * shift / RES) * (RES / size)[:, None]
    grid = F.affine_grid(theta, [n, 1, RES, RES], align_corners=False)
    a = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)  # [n,1,R,R]
    bg = _backgrounds(labels[:, 2], u[:, 5:7], images)[:, None]  # [n, 1, R, R] gray
    fg = torch.tensor(list(COLOURS.values()), dtype=torch.float64)[labels[:, 1]][:, :, None, None]  # [n, 3, 1, 1]
    rgb = bg * (1 - a) + fg * a
    return (2 * rgb - 1).to(torch.float32)


def _check_images(images: str) -> None:
    if images not in IMAGE_SPLITS:
        raise ConfigError(f"unknown image split {images!r}; valid: {', '.join(map(repr, IMAGE_SPLITS))} "
                          f"(the digits split of optimize.data.digits).")


def _uniforms(n: int, seed: int, images: str, prompts: str) -> torch.Tensor:
    """``[n, N_UNIFORMS]`` float64; row i depends only on (seed, i, images, prompts)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"the number of captioned digits n must be an integer >= 0, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}.")
    key = [CAPTION_SEED, IMAGE_SPLITS.index(images), ("all", *PROMPT_SPLITS, "given").index(prompts), int(seed)]
    return torch.from_numpy(np.random.default_rng(key).random((int(n), N_UNIFORMS)))


def _checked_labels(labels: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 2 or t.shape[1] != 3 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ConfigError(f"labels must be integer rows (digit, colour, background) of shape [n, 3], got "
                          f"{t.dtype} {list(t.shape)}.")
    t = t.to(torch.int64)
    high = torch.tensor([len(DIGIT_WORDS), len(COLOURS), len(BACKGROUNDS)])
    if len(t) and ((t < 0) | (t >= high)).any():
        raise ConfigError(f"labels must lie in 0..9 (digit), 0..{len(COLOURS) - 1} (colour) and "
                          f"0..{len(BACKGROUNDS) - 1} (background); got min {t.min(0).values.tolist()}, "
                          f"max {t.max(0).values.tolist()}.")
    return t


def render_captioned(labels: torch.Tensor | Sequence[Sequence[int]], seed: int = 0, images: str = "train") -> Captioned:
    """Images of the given combinations ``labels [n, 3]`` (digit, colour, background): row i shows a random
    ``images``-split digit of class ``labels[i, 0]`` with random jitter and texture crop, depending only on
    (seed, i, images) and the row's labels."""
    _check_images(images)
    t = _checked_labels(labels)
    u = _uniforms(len(t), seed, images, "given")
    return Captioned(_render(t, u, images), t, [caption(*map(int, row)) for row in t])


def captioned_digits(n: int, seed: int = 0, images: str = "train", prompts: str = "train") -> Captioned:
    """``n`` captioned digits: each a uniform prompt of the ``prompts`` split ("train", "selection", "heldout" or
    "all") drawn with a digit image of the ``images`` split ("train" or "heldout"); see the module docstring."""
    _check_images(images)
    combos = prompt_split(prompts)
    u = _uniforms(n, seed, images, prompts)
    labels = combos[torch.clamp((u[:, 0] * len(combos)).long(), max=len(combos) - 1)]
    return Captioned(_render(labels, u, images), labels, [caption(*map(int, row)) for row in labels])
