"""Checkpoints of training runs, read safely: ``torch.load(weights_only=True)`` (a pickle that needs code is refused,
never run), the run's settings compared with the current ones, a truncated last.ckpt falling back to the previous good
one, NaN weights refused. No Lightning here, so the CLI's pre-check imports it cheaply."""

from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import warnings
from typing import Any, Iterable

import torch

from optimize.base import ConfigError, resolve_path

KEEP_CHECKPOINTS = 2  # step checkpoints kept beside last.ckpt (the fallback when last.ckpt is truncated)


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
