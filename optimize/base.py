"""The base of ``optimize``: errors, repository paths and small helpers every layer uses. It imports nothing of the
project, so any module may import it (seed ranges live beside it in ``optimize.seeds``, output names in
``optimize.paths``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


class ConfigError(ValueError):
    """A bad configuration; the message is one sentence for the user."""


class SkipPoint(ConfigError):
    """A configuration that cannot run as asked (e.g. an NFE its solver cannot meet exactly): an error on its
    own, skipped with a note inside a ``-m`` sweep (``-m iia nfe=4,5 base=heun,euler`` runs the other points)."""


def resolve_path(path: str) -> Path:
    """``path`` as given when absolute or present from the working directory, else relative to the repository."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    return REPO / p if (REPO / p).exists() else p


def as_list(value: Any) -> list[Any]:
    """A scalar or (Omega) list as a Python list."""
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [value]
