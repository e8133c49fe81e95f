"""Typed configuration keys: each method declares its own (``KEYS`` in its module, next to its code); keys that
several methods share are declared once here (``SHARED``). ``optimize.cli`` checks every key a composed configuration
has against the spec its method gives, before any work, and prints them in ``python -m optimize <method> --help``.
A base module: imports nothing of the project but ``optimize.base``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from optimize.base import CONF_DIR, ConfigError


@dataclass(frozen=True)
class Key:
    """``kind`` "int" (a true integer, not a bool) or "num" (a finite int or float); inclusive bounds ``low`` /
    ``high`` (None: open); ``nullable``: null allowed; ``positive``: strictly above 0 (for rates and scales)."""

    kind: str
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    positive: bool = False

    def check(self, name: str, value: Any) -> None:
        """ConfigError naming the key, the value and what is expected."""
        if value is None and self.nullable:
            return
        what = {"int": "an integer", "num": "a number"}[self.kind]
        ok_type = not isinstance(value, bool) and (isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float)))
        if not ok_type or (self.kind == "num" and not math.isfinite(float(value))):
            raise ConfigError(f"{name} must be {'a finite number' if self.kind == 'num' else what}"
                              f"{' or null' if self.nullable else ''}, got {value!r}.")
        if self.positive and value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigError(f"{name} must {self.span()}, got {value!r}.")

    def span(self) -> str:
        """The allowed range in words: "be a positive integer", "lie in [0, 1]", ..."""
        if self.kind == "num" and self.low is not None and self.high is not None:
            return f"lie in [{self.low}, {self.high}]"
        what = {"int": "integer", "num": "number"}[self.kind]
        if self.positive:
            head = f"be a positive {what}"
        elif self.low is not None:
            head = {1: f"be a positive {what}", 0: f"be a non-negative {what}"}.get(self.low, f"be {'an' if what == 'integer' else 'a'} {what} >= {self.low}")
        else:
            head = f"be a {what}"
        return head + (f" (at most {self.high})" if self.high is not None else "")


def count(high: float | None = None, low: int = 1, nullable: bool = False) -> Key:
    """An integer count in [low, high]."""
    return Key("int", low, high, nullable)


def rate(high: float | None = None, nullable: bool = False) -> Key:
    """A strictly positive number (a learning rate, a scale, minutes)."""
    return Key("num", 0, high, nullable, positive=True)


# keys that several methods (or conf/config.yaml) have: one spec each
SHARED: dict[str, Key] = {
    "n": count(10**8), "seed": count(low=0), "fit_seed": count(low=0), "steps": count(10**8),
    "batch_size": count(10**6), "eval_batch_size": count(10**6), "data_batch_size": count(10**6), "n_data": count(10**9),
    "ref_nfe": count(100_000), "teacher_nfe": count(100_000), "checkpoint_every": count(), "warmup_steps": count(low=0),
    "grid": count(100_000, low=0), "n_boot": count(10**6, low=0), "num_threads": count(4096, nullable=True),
    "lr": rate(), "sigma_data": rate(), "rho": rate(), "ema": Key("num", 0, 1), "min_lr_ratio": Key("num", 0, 1),
    "grad_clip": Key("num", 0), "max_minutes": rate(nullable=True),
}


def inherited(name: str) -> list[str]:
    """The methods whose conf/method file ``name``'s file includes in its defaults list (iia, ld3: evaluate), then
    ``name`` itself: the methods whose keys its composed configuration holds."""
    defaults = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml").get("defaults") or []
    parents = [str(d) for d in defaults if isinstance(d, str) and (CONF_DIR / "method" / f"{d}.yaml").is_file()]
    return [m for p in parents for m in inherited(p)] + [name]
