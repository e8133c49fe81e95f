"""The base layer of ``optimize``: errors, repository paths and small helpers every layer uses. It imports nothing of
``optimize`` above it (only the runtime's path rule), so any module may import it. Beside it: seed ranges
(``base.seeds``), the per-sample conds that follow them (``base.conds``), safe output names (``base.paths``) and
typed configuration keys (``base.keys``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from samplers.models import REPO, resolve_path  # noqa: F401 - the runtime's rule for paths, shared

CONF_DIR = REPO / "conf"
TABLE_PREFIX = "table:"  # a method key naming a table file as its start: DDSS init=table:PATH, IIA base=table:PATH


def methods() -> list[str]:
    """The methods with a config in conf/method/."""
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def models() -> list[str]:
    """The models with a config in conf/model/."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


class ConfigError(ValueError):
    """A bad configuration; the message is one sentence for the user."""


class SkipPoint(ConfigError):
    """A configuration that cannot run as asked (e.g. an NFE its solver cannot meet exactly): an error on its
    own, skipped with a note inside a ``-m`` sweep (``-m iia nfe=4,5 base=heun,euler`` runs the other points)."""


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repository when it lies inside it (what files and tables record, so a checkout can
    move), else as given."""
    p = Path(path).absolute()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def as_list(value: Any) -> list[Any]:
    """A scalar or (Omega) list as a Python list."""
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [value]
