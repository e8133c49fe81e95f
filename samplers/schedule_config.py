"""A diffusers scheduler config as noise levels in EDM sigma-space: ``alphas_cumprod_of`` for the DDPM family
(betas: ``sigma_t = sqrt((1 - abar_t) / abar_t)``), ``flow_sigmas_of`` for flow matching (FlowMatchEuler's shifted
times, ``sigma = t / (1 - t)``), with every key checked before diffusers sees it (one ValueError sentence naming the
key). Used by ``samplers.models`` (diffusers folders), ``samplers.t2i`` (text-to-image pipelines),
``samplers.diffusers_scheduler`` and ``samplers.export``. diffusers is imported inside the functions that need it."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np
import torch

from .denoisers import check_alphas_cumprod, finite_alphas_cumprod

# keys of a diffusers (DDPM-family) scheduler config that define the training noise schedule
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")  # DDPMScheduler's
MAX_TRAIN_TIMESTEPS = 100_000  # a sanity bound before diffusers allocates the schedule


def alphas_cumprod_of(config: Any) -> torch.Tensor:
    """float64 ``abar_t`` of a DDPM-family scheduler config, as ``load_diffusers`` makes it
    (a zero-terminal-SNR schedule's 0 becomes ``finite_alphas_cumprod``'s small positive value). A config diffusers
    cannot build, or whose ``abar_t`` is not in (0, 1) and strictly decreasing, is a ValueError naming the key; so is a
    flow-matching config (``is_flow_config``: no betas, see ``flow_sigmas_of``)."""
    if is_flow_config(config):
        raise ValueError("scheduler config: a flow-matching schedule (x_t = (1-t) x0 + t n) has no alphas_cumprod; "
                         "its noise levels are flow_sigmas_of(config).")
    keys = _schedule_keys(config)
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    try:
        abar = finite_alphas_cumprod(DDPMScheduler(**keys).alphas_cumprod)
    except Exception as err:  # noqa: BLE001 - diffusers/torch reject a value we did not foresee: one sentence
        raise ValueError(f"scheduler config: diffusers cannot build this noise schedule "
                         f"({' '.join(str(err).split())[:200]}).") from None
    try:
        check_alphas_cumprod(abar)  # VPDenoiser's rule: in (0, 1) (NaN fails), sigma_t strictly increasing
    except ValueError:
        used = ("trained_betas" if keys.get("trained_betas") is not None else
                f"beta_schedule={keys.get('beta_schedule', 'linear')!r}, "
                f"beta_start={keys.get('beta_start', 0.0001)!r}, "
                f"beta_end={keys.get('beta_end', 0.02)!r}")
        raise ValueError(f"scheduler config: {used} gives alphas_cumprod outside (0, 1) or not strictly decreasing; "
                         f"every beta must lie in (0, 1), with a product that stays above 0 in float32.") from None
    return abar


FLOW_PREDICTION = "flow_prediction"  # diffusers' name for a rectified-flow velocity model (v = n - x0)


def is_flow_config(config: Any) -> bool:
    """A flow-matching scheduler config: a ``FlowMatch*`` class, ``prediction_type`` flow_prediction or
    ``use_flow_sigmas`` (DPMSolver/UniPC for flow models), or a ``shift`` with no betas (a FlowMatchEuler config
    dict, which carries no class name until saved)."""
    name = str(config.get("_class_name", "") or "")
    betas = any(k in config for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas"))
    return (name.startswith("FlowMatch") or config.get("prediction_type") == FLOW_PREDICTION
            or config.get("use_flow_sigmas") is True or ("shift" in config and not betas))


def flow_shift_of(config: Any) -> float:
    """The static time shift of a flow config (``shift``, or ``flow_shift`` of DPMSolver/UniPC; 1 without one)."""
    shift = config.get("shift", config.get("flow_shift", 1.0))
    shift = 1.0 if shift is None else shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating, np.integer)) or not 0 < shift < math.inf:
        raise ValueError(f"scheduler config: shift must be a positive finite number, got {shift!r}.")
    return float(shift)


def flow_sigmas_of(config: Any) -> torch.Tensor:
    """float64 EDM sigmas ``s = t / (1 - t)`` of a flow-matching config's training times, increasing: FlowMatchEuler's
    grid ``t_k = k / N`` (k = 1..N-1; t = 1 is pure noise, sigma infinite), shifted ``shift t / (1 + (shift - 1) t)``
    unless ``use_dynamic_shifting`` (then the shift depends on the resolution at sampling time). A flow sample is
    ``x_t = x / (1 + s)`` and the net takes timestep ``t N``. ValueError naming the key for a bad value."""
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"scheduler config: num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], "
                         f"got {steps!r}.")
    for key in ("use_dynamic_shifting", "invert_sigmas"):
        if not isinstance(config.get(key, False), (bool, np.bool_)):
            raise ValueError(f"scheduler config: {key} must be true or false, got {config[key]!r}.")
    if config.get("invert_sigmas", False):
        raise ValueError("scheduler config: invert_sigmas=true (a model that reads t = 1 - sigma) is not supported.")
    t = torch.arange(1, int(steps), dtype=torch.float64) / int(steps)
    if not config.get("use_dynamic_shifting", False):
        shift = flow_shift_of(config)
        t = shift * t / (1 + (shift - 1) * t)
    return t / (1 - t)


def _schedule_keys(config: Any) -> dict[str, Any]:
    """The noise-schedule keys of ``config`` (no ``prediction_type``), types and sizes checked before diffusers
    sees them: a bad value is a ValueError naming the key and the value."""
    keys = {k: config[k] for k in SCHEDULE_KEYS if k in config and k != "prediction_type"}
    steps = keys.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"scheduler config: num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], "
                         f"got {steps!r}.")
    if not isinstance(keys.get("rescale_betas_zero_snr", False), (bool, np.bool_)):
        raise ValueError(f"scheduler config: rescale_betas_zero_snr must be true or false, "
                         f"got {keys['rescale_betas_zero_snr']!r}.")
    betas = keys.get("trained_betas")
    if betas is not None:
        try:
            arr = np.asarray(betas.detach().cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros((0, 0))
        if arr.ndim != 1 or not np.isfinite(arr).all() or ("num_train_timesteps" in keys and arr.size != steps):
            got = f"a list of length {arr.size}" if arr.ndim == 1 and np.isfinite(arr).all() else repr(betas)[:80]
            raise ValueError(f"scheduler config: trained_betas must be a list of num_train_timesteps = {steps} finite "
                             f"numbers, got {got}.")
        keys["trained_betas"] = arr.tolist()
        return keys
    schedule = keys.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"scheduler config: beta_schedule {schedule!r} is not supported; use one of "
                         f"{', '.join(BETA_SCHEDULES)} (or trained_betas).")
    for key in ("beta_start", "beta_end"):
        v = keys.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise ValueError(f"scheduler config: {key} must be a finite number, got {v!r}.")
    return keys


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' logger at error level and its loading bars off (its warnings about weights or accelerate become our
    own errors or nothing)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()
