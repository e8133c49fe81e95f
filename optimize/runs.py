"""Pieces every training command shares: Lightning CSV (and optional offline wandb) logs, checkpoints, an optional
time cap, step-seeded batches, safe resuming (checkpoints are read with ``torch.load(weights_only=True)``: nothing is
ever unpickled), and the classic solvers a learner is compared with (``compare`` entries ``SOLVER[:END]``)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import time
import warnings
from typing import Any, Iterable

import lightning as L
import torch

from samplers import baselines
from samplers.baselines import ENDS
from samplers.nets import load_net

from .base import ConfigError, resolve_path
from .evaluate import load_model

KEEP_CHECKPOINTS = 2  # step checkpoints kept beside last.ckpt (the fallback when last.ckpt is truncated)


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
    batches the uninterrupted run would (the rule of ``optimize.teacher.TeacherModule.step_batch``)."""
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


def _flag(value: Any) -> bool:
    return value not in (None, False, "", "null", "false", "False")


def _is_true(resume: Any) -> bool:
    return resume is True or str(resume).lower() == "true"


def resume_path(resume: Any, out_dir: str | None = None) -> str | None:
    """The Lightning checkpoint of ``resume=``: None when unset; PATH (a .ckpt, or a run folder holding
    lightning/last.ckpt) as a file; ``true``: the newest lightning/last.ckpt in ``out_dir`` or in its sibling
    run folders (the earlier runs of the same method, model and nfe; None while ``out_dir`` is unknown).
    Only looks the path up; ``pick_resume`` reads and checks it."""
    if not _flag(resume):
        return None
    if _is_true(resume):
        if out_dir is None:
            return None
        candidates = _run_candidates(out_dir)
        if not candidates:
            raise ConfigError(f"resume=true found no lightning/last.ckpt in {out_dir} or its sibling run folders; "
                              f"give resume=PATH.")
        return candidates[0]
    return _explicit_path(resume)


def _explicit_path(resume: Any) -> str:
    p = resolve_path(str(resume))
    return str(p / "lightning" / "last.ckpt") if p.is_dir() else str(p)


def _run_candidates(out_dir: str) -> list[str]:
    """lightning/last.ckpt of ``out_dir`` first, then of its sibling run folders, newest first."""
    own = glob.glob(os.path.join(out_dir, "lightning", "last.ckpt"))
    siblings = glob.glob(os.path.join(os.path.dirname(os.path.abspath(out_dir)), "*", "lightning", "last.ckpt"))
    siblings = [p for p in siblings if p not in own]
    return own + sorted(siblings, key=os.path.getmtime, reverse=True)


# --- reading checkpoints safely -------------------------------------------------------------------
class CheckpointUnreadable(Exception):
    """A checkpoint that cannot be used; the message is one sentence naming the file."""


def load_checkpoint(path: str) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (tensors and plain data only; a pickle that needs
    code is refused, never run). Raises CheckpointUnreadable with one sentence naming the file."""
    if not os.path.isfile(path):
        raise CheckpointUnreadable(f"resume checkpoint {path} does not exist.")
    if not os.access(path, os.R_OK):
        raise CheckpointUnreadable(f"resume checkpoint {path} is not readable (permission denied).")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the outcome is reported below
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointUnreadable(f"resume checkpoint {path} is not readable (permission denied).") from None
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointUnreadable(f"resume checkpoint {path} holds Python objects beyond tensors and plain data "
                                       f"(a pickle that could run code); it was refused, not loaded.") from None
        raise CheckpointUnreadable(f"resume checkpoint {path} is truncated or corrupt ({_first_line(err)}).") from None
    except Exception as err:  # noqa: BLE001 - any other unreadable file is one sentence
        raise CheckpointUnreadable(f"resume checkpoint {path} is truncated or corrupt ({_first_line(err)}).") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointUnreadable(f"resume checkpoint {path} is not a Lightning checkpoint (no state_dict).")
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:120] if text else type(err).__name__


def _step_of(path: str) -> int:
    stem = os.path.basename(path)[len("step-"):-len(".ckpt")]
    return int(stem) if stem.isdigit() else -1


def readable_checkpoint(path: str) -> tuple[str, dict[str, Any]]:
    """``(path, checkpoint)`` of ``path``; a truncated ``last.ckpt`` falls back to the newest readable
    ``step-*.ckpt`` beside it, with a note on stderr. Raises CheckpointUnreadable when nothing is usable."""
    try:
        return path, load_checkpoint(path)
    except CheckpointUnreadable as err:
        if os.path.basename(path) != "last.ckpt" or not os.path.isfile(path) or "refused" in str(err):
            raise
        for older in sorted(glob.glob(os.path.join(os.path.dirname(path), "step-*.ckpt")), key=_step_of, reverse=True):
            try:
                ckpt = load_checkpoint(older)
            except CheckpointUnreadable:
                continue
            print(f"note: {err} Falling back to {older} (step {ckpt.get('global_step', '?')}).", file=sys.stderr)
            return older, ckpt
        raise


# --- does a checkpoint belong to this run? ---------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, ints that are floats compare equal) for comparing settings."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, default=str))
    except (TypeError, ValueError):
        return str(value)


def settings_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings of a checkpoint: Lightning's hyper_parameters plus our ``run_settings``."""
    hp = ckpt.get("hyper_parameters") or {}
    extra = ckpt.get("run_settings") or {}
    return {**(dict(hp) if isinstance(hp, dict) else {}), **(dict(extra) if isinstance(extra, dict) else {})}


def first_difference(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> str | None:
    """The first key of ``current`` whose value differs in ``saved`` (or is missing there), as a phrase; None if all match."""
    skip = set(ignore)
    for key, value in current.items():
        if key in skip:
            continue
        if key not in saved:
            return f"{key} is not recorded in the checkpoint (this run has {key}={value})"
        if _plain(saved[key]) != _plain(value):
            return f"it was trained with {key}={saved[key]}, but this run has {key}={value}"
    return None


def nonfinite_entry(ckpt: dict[str, Any], may_be_inf: Iterable[str] = ()) -> str | None:
    """The first module tensor (``state_dict``) or optimiser-state tensor of a checkpoint that holds NaN, or +-inf
    (allowed in the ``may_be_inf`` state_dict keys, e.g. a best score not yet set); None when all are finite."""
    allowed = set(may_be_inf)

    def bad(value: torch.Tensor, inf_ok: bool) -> bool:
        if not value.is_floating_point():
            return False
        return bool(torch.isnan(value).any()) if inf_ok else not bool(torch.isfinite(value).all())

    for key, value in (ckpt.get("state_dict") or {}).items():
        if isinstance(value, torch.Tensor) and bad(value, key in allowed):
            return str(key)
    for i, opt in enumerate(ckpt.get("optimizer_states") or []):
        for param, state in ((opt.get("state") or {}) if isinstance(opt, dict) else {}).items():
            for name, value in (state.items() if isinstance(state, dict) else ()):
                if isinstance(value, torch.Tensor) and bad(value, False):
                    return f"the optimiser state ({name} of parameter {param} of optimiser {i})"
    return None


def _check_finite(path: str, ckpt: dict[str, Any], may_be_inf: Iterable[str]) -> None:
    key = nonfinite_entry(ckpt, may_be_inf)
    if key is not None:
        raise ConfigError(f"resume checkpoint {path} (step {ckpt.get('global_step', '?')}) holds NaN or infinite values "
                          f"in {key}; it cannot be continued: resume from an earlier checkpoint or drop resume.")


def pick_resume(resume: Any, out_dir: str, current: dict[str, Any], ignore: Iterable[str] = (),
                may_be_inf: Iterable[str] = ()) -> str | None:
    """The checkpoint to resume from, read safely and checked against this run's settings.

    ``resume=PATH``: that checkpoint (a truncated last.ckpt falls back to the previous good one, with a note);
    its settings must match ``current`` or it is a ConfigError naming the first differing key.
    ``resume=true``: the run folder's own checkpoint, else the newest sibling run whose settings match; none
    matching is a ConfigError naming the first difference of the newest one. Never unpickles code.
    The chosen checkpoint must hold finite weights and optimiser state (``nonfinite_entry``), or it is a ConfigError
    naming the tensor: a NaN run is not continued.
    """
    if not _flag(resume):
        return None
    ignore = tuple(ignore)
    if not _is_true(resume):
        try:
            path, ckpt = readable_checkpoint(_explicit_path(resume))
        except CheckpointUnreadable as err:
            raise ConfigError(str(err)) from None
        diff = first_difference(settings_of(ckpt), current, ignore)
        if diff:
            raise ConfigError(f"resume checkpoint {path} belongs to another run: {diff}.")
        _check_finite(path, ckpt, may_be_inf)
        return path
    candidates = _run_candidates(out_dir)
    if not candidates:
        raise ConfigError(f"resume=true found no lightning/last.ckpt in {out_dir} or its sibling run folders; give resume=PATH.")
    first_reason = None
    for candidate in candidates:
        try:
            path, ckpt = readable_checkpoint(candidate)
        except CheckpointUnreadable as err:
            if "refused" in str(err):
                raise ConfigError(str(err)) from None
            first_reason = first_reason or str(err).rstrip(".")
            continue
        diff = first_difference(settings_of(ckpt), current, ignore)
        if diff is None:
            _check_finite(path, ckpt, may_be_inf)
            return path
        first_reason = first_reason or f"{path}: {diff}"
    raise ConfigError(f"resume=true found no earlier run with the same settings to continue ({first_reason}); "
                      f"give resume=PATH or drop resume.")
