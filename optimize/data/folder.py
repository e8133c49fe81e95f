"""Reference data from a folder of images: ``data=folder:PATH`` (FD/KID for a user's own model and data).

``PATH`` is a folder (or one .npy/.npz file). A folder with ``train/`` (and optionally ``heldout/``) subfolders gives
those splits; any other folder is the ``train`` split only (then there is no held-out column: nothing of the user's
data is set aside without being asked). Files, in sorted name order:

- ``.png``: 8-bit grey or colour (converted to the model's 1 or 3 channels, alpha dropped); values ``v / 127.5 - 1``;
- ``.npy``: one image ``[C, H, W]`` / ``[H, W, C]`` / ``[H, W]`` or a stack ``[N, C, H, W]`` / ``[N, H, W, C]``;
- ``.npz``: every array in it, each read like a ``.npy`` (``allow_pickle=False``: object arrays are refused).

Integer arrays are 8-bit images (``v / 127.5 - 1``); float arrays must already lie in the model's data range
[-1, 1]. Every image must have the model's sample shape; anything else is one ConfigError sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from optimize.base import ConfigError, resolve_path

SUFFIXES = (".png", ".npy", ".npz")
SPLITS = (("train", "train"), ("heldout", "heldout"))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def _layout(path: Path) -> dict[str, list[Path]]:
    if path.is_file():
        return {"train": [path]}
    if (path / "train").is_dir():
        out = {"train": _files(path / "train")}
        if (path / "heldout").is_dir():
            out["heldout"] = _files(path / "heldout")
        return out
    return {"train": _files(path)}


def check_folder(spec: str, key: str = "data") -> dict[str, list[Path]]:
    """The image files of each split of ``folder:PATH``; ConfigError when the path is missing or holds none."""
    path = resolve_path(spec)
    if not spec:
        raise ConfigError(f"{key}=folder:PATH needs a PATH.")
    if not path.exists():
        raise ConfigError(f"{key}=folder:{spec}: {path} does not exist.")
    if path.is_file() and path.suffix.lower() not in (".npy", ".npz"):
        raise ConfigError(f"{key}=folder:{spec}: a single file must be .npy or .npz, got {path.name}.")
    layout = _layout(path)
    for split, files in layout.items():
        if not files:
            where = path / split if (path / split).is_dir() else path
            raise ConfigError(f"{key}=folder:{spec}: no .png, .npy or .npz images in {where}.")
    return layout


def _to_images(a: np.ndarray, shape: Sequence[int], name: str) -> np.ndarray:
    """An array as ``[N, C, H, W]`` float32 in the data range."""
    if len(shape) == 3:
        c, h, w = (int(v) for v in shape)
        if a.ndim == 2 and c == 1:
            a = a[None, None]
        elif a.ndim == 3:
            if a.shape == (c, h, w):
                a = a[None]
            elif a.shape == (h, w, c):
                a = a.transpose(2, 0, 1)[None]
            elif c == 1 and a.shape[1:] == (h, w):  # a stack of grey images
                a = a[:, None]
        elif a.ndim == 4 and a.shape[1:] != (c, h, w) and a.shape[1:] == (h, w, c):
            a = a.transpose(0, 3, 1, 2)
    elif a.ndim == len(shape):
        a = a[None]
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != tuple(int(v) for v in shape):
        raise ConfigError(f"data: {name} holds shape {tuple(a.shape)}, but the model's samples are {tuple(shape)}.")
    if a.dtype.kind in "iub":
        if a.min() < 0 or a.max() > 255:
            raise ConfigError(f"data: {name} holds integers outside 0..255 (8-bit images expected).")
        return a.astype(np.float32) / 127.5 - 1.0
    if a.dtype.kind != "f":
        raise ConfigError(f"data: {name} has dtype {a.dtype}; images must be 8-bit integers or floats in [-1, 1].")
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < -1.001 or a.max() > 1.001:
        raise ConfigError(f"data: {name}: float images must be finite and lie in [-1, 1] (the model's data range), "
                          f"got [{a.min():.3g}, {a.max():.3g}].")
    return a


def _read(path: Path, shape: Sequence[int]) -> list[np.ndarray]:
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image  # only for PNG folders

            with Image.open(path) as im:
                if im.mode not in ("L", "RGB", "RGBA", "LA", "P"):
                    raise ConfigError(f"data: {path} is a {im.mode} PNG; 8-bit grey or colour PNGs are read.")
                if len(shape) == 3 and shape[0] in (1, 3):  # the model's channels: grey or RGB (alpha dropped)
                    im = im.convert("L" if shape[0] == 1 else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
            return [_to_images(arr, shape, path.name)]
        if path.suffix.lower() == ".npy":
            return [_to_images(np.load(path, allow_pickle=False), shape, path.name)]
        with np.load(path, allow_pickle=False) as z:
            return [_to_images(z[k], shape, f"{path.name}[{k}]") for k in z.files]
    except ConfigError:
        raise
    except Exception as err:  # unreadable file, pickled object array, bad PNG
        raise ConfigError(f"data: cannot read {path} ({type(err).__name__}: {' '.join(str(err).split())[:150]}).") from None


def load_folder(spec: str, shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """``{"train": [N, *shape], ("heldout": ...)}`` float32 CPU tensors of ``folder:PATH`` (see the module docstring)."""
    out = {}
    for split, files in check_folder(spec).items():
        arrays = [a for f in files for a in _read(f, shape)]
        x = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, *shape)
        if len(x) < 2:
            raise ConfigError(f"data=folder:{spec}: the {split} split holds {len(x)} image(s); FD and KID need at least 2.")
        out[split] = x.contiguous()
    return out
