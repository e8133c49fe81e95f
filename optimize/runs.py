"""Lightning pieces every training command shares: CSV (and optional offline wandb) logs, checkpoints, time cap."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L


def trainer_parts(cfg: Any, out_dir: str) -> dict[str, Any]:
    """``logger``, ``callbacks`` and ``max_time`` for ``L.Trainer``: CSV logs in ``<out_dir>/logs`` (plus wandb
    when ``logger=wandb``), checkpoints every ``cfg.checkpoint_every`` steps in ``<out_dir>/lightning``
    (``last.ckpt``, what ``resume=`` reads), and the ``cfg.max_minutes`` wall-clock cap."""
    loggers: list[Any] = [L.pytorch.loggers.CSVLogger(out_dir, name="logs", version="")]
    if cfg.logger.name == "wandb":
        loggers.append(L.pytorch.loggers.WandbLogger(project=str(cfg.logger.project), offline=cfg.logger.mode == "offline",
                                                     save_dir=out_dir))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "lightning"), save_last=True, save_top_k=0,
                                               every_n_train_steps=int(cfg.checkpoint_every))
    return {"logger": loggers, "callbacks": [ckpt],
            "max_time": {"minutes": float(cfg.max_minutes)} if cfg.max_minutes else None}


def _flag(value: Any) -> bool:
    return value not in (None, False, "", "null", "false", "False")


def resume_path(resume: Any, out_dir: str | None = None) -> str | None:
    """The Lightning checkpoint of ``resume=``: None when unset; PATH (a .ckpt, or a run folder holding
    lightning/last.ckpt) as a file; ``true``: the newest lightning/last.ckpt in ``out_dir`` or in its sibling
    run folders (the earlier runs of the same method, model and nfe; None while ``out_dir`` is unknown)."""
    from .cli import ConfigError, resolve_path

    if not _flag(resume):
        return None
    if resume is True or str(resume).lower() == "true":
        if out_dir is None:
            return None
        candidates = glob.glob(os.path.join(out_dir, "lightning", "last.ckpt")) or \
            glob.glob(os.path.join(os.path.dirname(os.path.abspath(out_dir)), "*", "lightning", "last.ckpt"))
        if not candidates:
            raise ConfigError(f"resume=true found no lightning/last.ckpt in {out_dir} or its sibling run folders; "
                              f"give resume=PATH.")
        return max(candidates, key=os.path.getmtime)
    p = resolve_path(str(resume))
    return str(p / "lightning" / "last.ckpt") if p.is_dir() else str(p)
