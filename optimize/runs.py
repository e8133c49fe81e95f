"""Lightning pieces every training command shares: CSV (and optional offline wandb) logs, checkpoints, time cap."""

from __future__ import annotations

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
