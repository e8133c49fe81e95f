"""Pieces every training command shares: Lightning CSV (and optional offline wandb) logs, checkpoints, an optional
time cap, step-seeded batches, the Lightning base of the training modules, and the classic solvers a learner is
compared with (``compare`` entries ``SOLVER[:END]``). Safe resuming lives in ``optimize.training.checkpoints``."""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import lightning as L
import torch

from samplers import baselines
from samplers.baselines import ENDS
from samplers.nets import load_net

from optimize.base import ConfigError, resolve_path
from optimize.training.checkpoints import KEEP_CHECKPOINTS, pick_resume
from optimize.data.models import load_model


def fit_student(cfg: Any, module: L.LightningModule, out_dir: str) -> float:
    """Train a student (DSNO, CD) on one device for ``cfg.steps``: ``resume=`` is read with weights_only (never unpickles
    code) and continues only a run with the same settings (``module.hparams`` and ``module.run_settings``; steps may
    differ, to extend a run); a NaN loss is one ConfigError. Returns the training seconds."""
    ckpt_path = pick_resume(cfg.get("resume"), out_dir, {**dict(module.hparams), **module.run_settings}, ignore=("steps",))
    trainer = L.Trainer(accelerator=str(cfg.accelerator), devices=1, max_steps=int(cfg.steps), **trainer_parts(cfg, out_dir),
                        gradient_clip_val=float(cfg.grad_clip) or None, log_every_n_steps=max(1, min(10, int(cfg.steps) // 2)),
                        enable_model_summary=False, default_root_dir=out_dir, enable_progress_bar=bool(cfg.progress_bar))
    t1 = time.perf_counter()
    try:
        trainer.fit(module, ticks(), ckpt_path=ckpt_path, weights_only=True)
    except NaNLossError as err:
        raise ConfigError(str(err)) from None
    return module.train_seconds() if module.global_step else time.perf_counter() - t1


def start_distillation(cfg: Any) -> tuple[str, Any, Any, dict[str, Any]]:
    """The preamble of a student's run (DSNO, PaGoDA): torch threads (``num_threads``), seeds, the run folder, and the
    teacher twice, as the model the judges sample and as its raw network file (the student's initialisation).
    Returns ``(out_dir, model, teacher_net, teacher_config)``."""
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = load_model(cfg.model, "cpu")
    teacher_net, teacher_config = load_net(str(resolve_path(str(cfg.model.checkpoint))))
    return out_dir, model, teacher_net, teacher_config


class NaNLossError(RuntimeError):
    """Training stopped on a non-finite loss (the message names the method and the step)."""


def ema_update(ema: Iterable[torch.Tensor], live: Iterable[torch.Tensor], t: int, decay: float) -> None:
    """``w_ema <- beta w_ema + (1 - beta) w`` with the warmed-up ``beta = min(decay, (1 + t) / (10 + t))``, t the steps
    done (Karras et al. 2022's EMA with the usual warm-up)."""
    beta = min(float(decay), (1 + t) / (10 + t))
    with torch.no_grad():
        for pe, p in zip(ema, live):
            pe.lerp_(p.detach(), 1 - beta)


class TrainingModule(L.LightningModule):
    """What every training method's LightningModule shares, so the method's module holds only its method:

    - ``history`` (the loss curve, ``new_history()``), ``run_settings`` (what ``resume=`` checks besides the
      hyper-parameters) and the training seconds are kept in checkpoints, so a resumed run reports its whole run;
    - ``check_loss`` stops on a non-finite loss (NaNLossError naming the method and the step);
    - the EMA of ``ema_pairs()`` (``(ema parameters, live parameters)``, or None) is updated in ``optimizer_step``,
      i.e. before Lightning writes the step's checkpoint, so a resumed EMA equals the uninterrupted one;
    - ``on_train_start`` starts the clock and re-applies each learning-rate schedule at the restored step (a resume
      that changes ``steps`` takes the new schedule's rate, not the one the restored optimiser holds).
    """

    method = "training"  # named in messages

    def __init__(self) -> None:
        super().__init__()
        self.history: Any = self.new_history()
        self.run_settings: dict[str, Any] = {}
        self.seconds_before = 0.0  # training time of the runs this one resumed (from the checkpoint)

    def new_history(self) -> Any:
        return []

    def ema_pairs(self) -> tuple[Iterable[torch.Tensor], Iterable[torch.Tensor]] | None:
        return None

    def check_loss(self, loss: torch.Tensor, where: str = "", hint: str = "") -> None:
        if not torch.isfinite(loss):
            raise NaNLossError(f"{self.method} training stopped: non-finite loss ({loss.item()}) at "
                               f"{where or f'global step {self.global_step}'}{f' ({hint})' if hint else ''}.")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        pairs = self.ema_pairs()
        if pairs is not None:  # Lightning counts the step once this hook returns: t = global_step + 1 steps done
            ema_update(*pairs, int(self.global_step) + 1, float(self.hparams.ema_decay))

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            lambdas = getattr(sched, "lr_lambdas", None)
            if lambdas is not None:
                for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, lambdas):
                    group["lr"] = base * factor(sched.last_epoch)

    def train_seconds(self) -> float:
        """Training wall time of this run plus that of the runs it resumed."""
        return self.seconds_before + (time.perf_counter() - getattr(self, "_fit_start", time.perf_counter()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["history"] = self.history
        checkpoint["run_settings"] = dict(self.run_settings)
        checkpoint["train_seconds"] = self.train_seconds()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = checkpoint.get("history", self.new_history())
        self.seconds_before = float(checkpoint.get("train_seconds", 0.0))


class Ticks(torch.utils.data.IterableDataset):
    """Training 'batches' that are only step ticks: a module that draws each step's batch itself from (seed, step)
    continues a resumed run exactly (a shuffling loader would restart its permutation)."""

    def __iter__(self):
        while True:
            yield torch.zeros(1)


def ticks() -> torch.utils.data.DataLoader:
    """An endless loader of step ticks for ``trainer.fit``."""
    return torch.utils.data.DataLoader(Ticks(), batch_size=None)


def step_batch_index(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of training step ``step``'s batch among ``n`` items: batch ``step mod E`` of epoch ``step // E``'s
    permutation seeded by (seed, epoch), E = n // batch_size. A pure function of the step, so a resumed run sees the
    batches the uninterrupted run would (the rule of ``optimize.methods.teacher.TeacherModule.step_batch``)."""
    batch_size = min(int(batch_size), int(n))
    epoch, j = divmod(int(step), max(1, int(n) // batch_size))
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % 2**63)
    return torch.randperm(int(n), generator=gen)[j * batch_size:(j + 1) * batch_size]


def compare_entry(entry: Any, end: str = "zero") -> tuple[str, str, str]:
    """``(solver, end, label)`` of a solver entry ``SOLVER`` (convention ``end``) or ``SOLVER:END`` (END: zero, EDM's
    last evaluation at sigma_min then a step to 0; sigma_min, landing there unevaluated as DPM-Solver and LD3 do). The
    label is the solver, with ``(end=sigma_min)`` for that convention (the results' row names)."""

    solver, sep, tail = str(entry).partition(":")
    end = tail if sep else str(end)
    if end not in ENDS:
        raise ConfigError(f"compare entry {str(entry)!r}: the end convention after ':' must be one of {', '.join(ENDS)}, "
                          f"got {end!r}.")
    return solver, end, solver if end == "zero" else f"{solver}(end={end})"


def compare_tables(cfg: Any, entries: Iterable[Any], nfe: int) -> list[tuple[str, Any]]:
    """``(label, table)`` of each classic ``compare`` entry (``compare_entry``; a bare solver is EDM's ``end=zero``
    whatever the run's ``end``, so ``SOLVER:sigma_min`` always means the other convention) at ``nfe`` on the run's
    schedule (``schedule``, ``rho``, ``sigma_min``, ``sigma_max``), once per label. A bad entry is one ConfigError."""

    out: dict[str, Any] = {}
    for entry in entries:
        solver, end, label = compare_entry(entry)
        if label in out:
            continue
        try:
            out[label] = baselines.build(solver, int(nfe), sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max),
                                         schedule=str(cfg.get("schedule", "karras")), rho=float(cfg.get("rho", 7.0)), end=end)
        except ValueError as err:
            raise ConfigError(f"compare: {err}") from None
    return list(out.items())


def trainer_parts(cfg: Any, out_dir: str) -> dict[str, Any]:
    """``logger``, ``callbacks`` and ``max_time`` for ``L.Trainer``: CSV logs in ``<out_dir>/logs`` (plus wandb
    when ``logger=wandb``), checkpoints every ``cfg.checkpoint_every`` steps in ``<out_dir>/lightning``
    (``last.ckpt``, what ``resume=`` reads, and the last KEEP_CHECKPOINTS ``step-NNNNNN.ckpt`` to fall back on),
    and a wall-clock cap only when ``cfg.max_minutes`` is set (off by default: the result must not depend on load)."""
    loggers: list[Any] = [L.pytorch.loggers.CSVLogger(out_dir, name="logs", version="")]
    if cfg.logger.name == "wandb":
        loggers.append(L.pytorch.loggers.WandbLogger(project=str(cfg.logger.project), offline=cfg.logger.mode == "offline",
                                                     save_dir=out_dir))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "lightning"), save_last=True,
                                               save_top_k=KEEP_CHECKPOINTS, monitor="step", mode="max",
                                               filename="step-{step:06d}", auto_insert_metric_name=False,
                                               every_n_train_steps=int(cfg.checkpoint_every))
    return {"logger": loggers, "callbacks": [ckpt],
            "max_time": {"minutes": float(cfg.max_minutes)} if cfg.max_minutes else None}
