"""Models of the offline pipeline: a denoiser with the shape, fingerprint and dtype evaluation needs.

``load_model(cfg.model)`` turns a ``conf/model/*.yaml`` config into a Model: a network checkpoint (built by
``samplers.nets`` from the config stored beside its weights) or the analytic Gaussian mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import data as datasets
from .cli import ConfigError, resolve_path


@dataclass
class Model:
    """A denoiser with what evaluation needs to know about it."""

    name: str
    denoiser: Any
    shape: tuple[int, ...]
    fingerprint: str
    dtype: torch.dtype


def load_model(mcfg: Any, device: str = "cpu") -> Model:
    """The model of a ``conf/model/*.yaml`` config (a network checkpoint or the analytic GMM)."""
    dtype = getattr(torch, str(mcfg.get("dtype", "float32")))
    if mcfg.kind == "gmm":
        gmm = datasets.gmm_model(tuple(mcfg.shape), int(mcfg.components), int(mcfg.model_seed))
        return Model(str(mcfg.name), gmm, tuple(gmm.shape), gmm.fingerprint(), dtype)
    if mcfg.kind != "net":
        raise ConfigError(f"model {mcfg.name}: unknown kind {mcfg.kind!r}; valid kinds: net, gmm.")
    from samplers.nets import load_denoiser

    path = resolve_path(str(mcfg.checkpoint))
    if not path.is_file():
        raise ConfigError(f"model {mcfg.name}: checkpoint file {path} does not exist.")
    den = load_denoiser(str(path), device=device).to(dtype)
    return Model(str(mcfg.name), den, tuple(den.shape), den.fingerprint(), dtype)
