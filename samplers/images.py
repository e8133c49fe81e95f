"""PNG grids of image batches with only the standard library (zlib + struct) and numpy."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np

from .artifact import atomic_write_bytes


def to_uint8(images: Any) -> np.ndarray:
    """``[B, C, H, W]`` floats in [-1, 1] -> uint8 ``[B, H, W, C]`` (clipped, rounded)."""
    arr = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3, got shape {arr.shape}.")
    arr = np.nan_to_num(arr, nan=0.0)
    return np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: Any, nrow: int | None = None, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile a batch into one uint8 ``[H', W', C]`` image: ``nrow`` per row (default ~sqrt(B)),
    each image upscaled ``scale`` x by pixel repetition, ``pad`` black pixels between and around."""
    tiles = to_uint8(images)
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}.")
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, c = tiles.shape
    cols = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / cols)
    grid = np.zeros((pad + rows * (h + pad), pad + cols * (w + pad), c), dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = tiles[k]
    return grid


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W]``, ``[H, W, 1]`` (greyscale) or ``[H, W, 3]`` (RGB) array."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    h, w, c = image.shape
    if c not in (1, 3):
        raise ValueError(f"encode_png takes 1 or 3 channels, got {c}.")
    color_type = 0 if c == 1 else 2
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)  # filter 0 per row
    idat = zlib.compress(raw.tobytes(), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write_png_grid(images: Any, path: str, nrow: int | None = None, scale: int | None = None, pad: int = 1) -> str:
    """Write a PNG grid of ``images`` [B, C, H, W] in [-1, 1] atomically; ``scale`` defaults to the
    smallest factor making each image at least 32 px tall (8x8 digits become 32x32)."""
    height = np.shape(images)[2] if np.ndim(images) == 4 else 1
    scale = scale if scale is not None else max(1, math.ceil(32 / max(1, height)))
    return atomic_write_bytes(path, encode_png(make_grid(images, nrow=nrow, scale=scale, pad=pad)))
