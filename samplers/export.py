"""Export a table to tools that take a noise schedule: ``python -m samplers export TABLE --to diffusers|comfyui|json``.

A stock scheduler runs one classic solver on a list of noise levels; it can reproduce a table only when the table
IS that solver on its own sigmas (a classic table of ``samplers.baselines``, or an LD3-style table whose step sigmas
were learned). ``identify`` decides this by rebuilding ``baselines.build(name, nfe, sigmas=<the table's step
sigmas>, end=...)`` for every candidate solver, options and end, and comparing the coefficients to ``COEF_RTOL``; the
table's metadata only proposes candidates, the rebuild decides. Any other table (learned coefficients: IIA, DDSS,
TADA fits, LD3's decoupled evaluation sigmas) is a ValueError that says to use ``TableScheduler``.

What each format holds (all in EDM sigma-space, ``x = x0 + sigma n``, the space diffusers' Euler/Heun schedulers and
ComfyUI's samplers use; the ``sigmas`` list is the step sigmas then where the last step lands, 0 or sigma_min):

- ``diffusers``: the scheduler class, the ``from_config`` options and the ``set_timesteps`` argument that reproduce
  the table in diffusers 0.42 (each mapping checked against the stock scheduler by tests/test_export.py):
  euler (and deterministic ddim) -> ``EulerDiscreteScheduler`` with ``sigmas=``, any sigmas; dpmpp_2m, dpmpp_3m ->
  ``DPMSolverMultistepScheduler`` and heun -> ``HeunDiscreteScheduler`` with ``timesteps=``, which those schedulers
  take only as integer training timesteps, so the table's sigmas must be the model's (``--model diffusers:DIR``).
  ``latents_scale``: pass ``latents = latents_scale * noise`` for the table's sample from ``noise`` (the VP-space
  DPMSolver starts from ``sqrt(1 + sigma_0^2) noise`` otherwise); ``sample_scale``: the table's sample is that times
  the scheduler's final sample (not 1 only for DPMSolver ending on sigma_min, whose output is VP-scaled).
- ``comfyui``: the KSampler ``sampler_name`` whose recurrence is the table's (k-diffusion's loops, transcribed in
  tests/test_export.py) and the SIGMAS list.
- ``json``: solver, options, nfe, end and the sigma list (plus the model's fractional timesteps with ``--model``).

Imports torch, numpy and the package; diffusers only through ``samplers.models`` when a model's schedule is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import baselines
from .denoisers import VPDenoiser
from .models import MAX_CONFIG_BYTES, diffusers_folders
from .schedule_config import alphas_cumprod_of
from .table import SolverTable

FORMATS = ("diffusers", "comfyui", "json")
COEF_RTOL = 1e-9  # a table equals a solver when every coefficient agrees to this (relative; 1e-12 absolute)
GRID_RTOL = 1e-6  # a sigma is a training timestep's when it agrees to this (float32 schedules: ~2e-7 apart)
USE_TABLE_SCHEDULER = "use samplers.diffusers_scheduler.TableScheduler (or python -m samplers generate) to run it"

# the ComfyUI KSampler whose loop is the table's recurrence, per (solver, end); tests/test_export.py checks each
# against a transcription of k-diffusion's loop (ComfyUI's heun, dpmpp_2m and ipndm treat a step to sigma 0 as their
# own last step, so they agree only with the end listed)
COMFYUI = {("euler", "zero"): "euler", ("euler", "sigma_min"): "euler", ("heun", "zero"): "heun",
           ("dpmpp_2m", "zero"): "dpmpp_2m", ("ipndm", "sigma_min"): "ipndm",
           ("ddim", "zero"): "euler_ancestral", ("ddim", "sigma_min"): "euler_ancestral"}


@dataclass(frozen=True)
class Match:
    """A table identified as ``solver`` with ``options`` on ``sigmas`` (step sigmas, then where it lands: ``end``)."""

    solver: str
    nfe: int
    end: str
    sigmas: list[float]
    options: dict[str, Any] = field(default_factory=dict)


# --- identification ----------------------------------------------------------------------------
def identify(table: SolverTable) -> Match:
    """The classic solver the table equals on its own sigmas; ValueError (one sentence) when it equals none."""
    sig = table.sigmas.detach().cpu().numpy().astype(np.float64)
    coef = table.coef.detach().cpu().numpy()
    for name, options in _candidates(table):
        steps = sig[0::2] if name == "heun" else sig
        for end, final in _ends(table, steps):
            found = _rebuild(name, table.nfe, steps, end, final, options)
            if found is not None and _same(found, sig, coef):
                return Match(name, table.nfe, end, [*steps.tolist(), final], dict(found.metadata["config"]))
    decoupled = _decoupled(table, coef)
    if decoupled:
        raise ValueError(f"its coefficients are {decoupled}'s on its step sigmas, but it evaluates the denoiser at "
                         f"other sigmas (LD3's decoupled time grid; python -m optimize ld3 window=0 learns step sigmas "
                         f"only), which no stock scheduler does; {USE_TABLE_SCHEDULER}.")
    raise ValueError(f"it is not a classic solver on its own sigmas (its coefficients match none of "
                     f"{', '.join(baselines.SOLVERS)}: learned coefficients), so no stock scheduler runs it; "
                     f"{USE_TABLE_SCHEDULER}.")


def _candidates(table: SolverTable) -> list[tuple[str, dict[str, Any]]]:
    """(solver, options) worth rebuilding, simplest first (so Euler is named Euler whatever else it also equals):
    each solver with its defaults, its small option sets, and the options the metadata names."""
    n, k = table.nfe, table.n_noise
    meta = table.metadata
    stated = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    out: list[tuple[str, dict[str, Any]]] = []
    for name, (_, _, defaults) in baselines.SOLVERS.items():
        if k != {"ddim": n + 1, "tada": 2}.get(name, 1) or (name == "heun" and n % 2 == 0):
            continue
        variants = [dict(defaults)]
        if name == "unipc":
            variants = [{"order": o} for o in (2, 1, 3)]
        elif name == "ipndm":
            variants = [{"max_order": o} for o in (4, 3, 2, 1)]
        elif name == "dpmpp_3m":
            variants = [{"variant": v} for v in ("diffusers", "taylor")]
        elif name == "ddim":
            variants = [{"eta": e} for e in _ddim_etas(table)]
        if meta.get("base_solver") == name and stated:
            own = {key: stated[key] for key in defaults if key in stated}
            variants.insert(0, {**defaults, **own})
        for options in variants:
            if (name, options) not in out:
                out.append((name, options))
    return out


def _ddim_etas(table: SolverTable) -> list[float]:
    """eta = 0 and the eta that row 1's weight on e_1 implies (``s_up = eta s_1 sqrt(s_0^2 - s_1^2) / s_0``)."""
    etas = [0.0]
    if table.nfe >= 2:
        s0, s1 = (float(s) for s in table.sigmas[:2])
        up = float(table.coef[1, 1])
        if s0 > s1 > 0:
            eta = up * s0 / (s1 * math.sqrt(s0 * s0 - s1 * s1))
            if 0 < eta <= 1 + 1e-12:
                etas.append(min(eta, 1.0))
    return etas


def _ends(table: SolverTable, steps: np.ndarray) -> list[tuple[str, float]]:
    """("zero", 0.0), then ("sigma_min", s) for each proposed landing sigma below the last step sigma: the one the
    metadata records, and the one the output row's weight on the last input implies (its ratio s / s_last for a
    first-order last step)."""
    last = float(steps[-1])
    proposals = []
    recorded = table.metadata.get("step_sigmas")
    if isinstance(recorded, list) and recorded and isinstance(recorded[-1], (int, float)):
        proposals.append(float(recorded[-1]))
    proposals.append(float(table.coef[table.nfe, table.x(table.nfe - 1)]) * last)
    out = [("zero", 0.0)]
    for s in proposals:
        if 0 < s < last and math.isfinite(s) and ("sigma_min", s) not in out:
            out.append(("sigma_min", s))
    return out


def _rebuild(name: str, nfe: int, steps: np.ndarray, end: str, final: float, options: dict[str, Any]) -> SolverTable | None:
    grid = [*steps.tolist(), final] if end == "sigma_min" else steps.tolist()
    try:
        return baselines.build(name, nfe, sigmas=grid, end=end, **options)
    except (ValueError, TypeError, ArithmeticError):
        return None  # not this solver (e.g. sigmas not strictly decreasing, options it refuses)


def _same(found: SolverTable, sig: np.ndarray, coef: np.ndarray) -> bool:
    other = found.coef.numpy()
    return (other.shape == coef.shape and np.array_equal(found.sigmas.numpy(), sig)
            and bool(np.allclose(coef, other, rtol=COEF_RTOL, atol=1e-12)))


def _decoupled(table: SolverTable, coef: np.ndarray) -> str | None:
    """The solver whose coefficients the table has on the step sigmas its metadata records, when its evaluation
    sigmas differ from them (an LD3 fit with a window), else None."""
    recorded = table.metadata.get("step_sigmas")
    if not isinstance(recorded, list) or len(recorded) != table.nfe + 1:
        return None
    try:
        grid = np.asarray(recorded, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    for name, options in _candidates(table):
        if name == "heun":
            continue
        found = _rebuild(name, table.nfe, grid[:-1], "sigma_min", float(grid[-1]), options)
        if found is not None and found.coef.numpy().shape == coef.shape and \
                np.allclose(coef, found.coef.numpy(), rtol=COEF_RTOL, atol=1e-12):
            return name
    return None


# --- the model's noise schedule ------------------------------------------------------------------
def model_schedule(spec: str) -> torch.Tensor:
    """``diffusers:DIR`` -> the float64 ``abar_t`` of its scheduler config (``DIR/scheduler`` or ``DIR``); ValueError."""
    if not spec.startswith("diffusers:") or not spec.removeprefix("diffusers:"):
        raise ValueError(f"--model must be diffusers:DIR (a diffusers folder whose noise schedule gives the "
                         f"timesteps), got {spec!r}.")
    root = Path(spec.removeprefix("diffusers:"))
    if not root.is_dir():
        raise ValueError(f"--model {spec}: no such folder.")
    path = diffusers_folders(root)[1] / "scheduler_config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a scheduler config is a small JSON file.")
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {spec}: {path} is not a readable scheduler config "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:120]}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {spec}: {path} must hold a JSON object.")
    try:
        return alphas_cumprod_of(config)
    except ValueError as err:
        raise ValueError(f"--model {spec}: {path}: {str(err).removeprefix('scheduler config: ')}") from None


def _training_grid(abar: torch.Tensor) -> np.ndarray:
    """sigma_t of every training timestep as diffusers' DPMSolver/Heun schedulers compute it (float32)."""
    a = abar.to(torch.float32)
    return (((1 - a) / a) ** 0.5).double().numpy()


def _timesteps_on_grid(match: Match, abar: torch.Tensor, scheduler: str) -> list[int]:
    """The integer training timestep of each step sigma (ValueError naming the first sigma that is not one)."""
    grid = _training_grid(abar)
    out = []
    for i, s in enumerate(match.sigmas[:-1]):
        t = int(np.argmin(np.abs(np.log(grid) - math.log(s))))
        if abs(grid[t] / s - 1) > GRID_RTOL:
            raise ValueError(f"its step sigma {s:.6g} (step {i}) is not a sigma of the model's training timesteps "
                             f"(nearest: t={t}, sigma {grid[t]:.6g}), and diffusers' {scheduler} takes only integer "
                             f"timesteps=, so it cannot run this schedule exactly; --to json gives its sigmas, or "
                             f"{USE_TABLE_SCHEDULER}.")
        out.append(t)
    return out


def fractional_timesteps(sigmas: list[float], abar: torch.Tensor) -> list[float]:
    """The model's fractional timestep of each sigma (linear in log sigma between training steps, as VPDenoiser and
    diffusers' Euler scheduler compute it)."""
    vp = VPDenoiser(None, abar)
    return [float(t) for t in vp.sigma_to_t(torch.tensor(sigmas, dtype=torch.float64))]


# --- formats -------------------------------------------------------------------------------------
def _base(match: Match) -> dict[str, Any]:
    return {"solver": match.solver, "options": match.options, "nfe": match.nfe, "end": match.end, "sigmas": match.sigmas}


def to_json(match: Match, abar: torch.Tensor | None = None) -> dict[str, Any]:
    """solver, options, nfe, end, sigmas (step sigmas then the landing sigma) and, given a schedule, the model's
    fractional timesteps of the step sigmas."""
    out = _base(match)
    if abar is not None:
        out["timesteps"] = fractional_timesteps(match.sigmas[:-1], abar)
    return out


def to_comfyui(match: Match) -> dict[str, Any]:
    """The ComfyUI KSampler name (and its options) whose loop is the table's, with the SIGMAS list; ValueError when
    ComfyUI has no such sampler."""
    name = COMFYUI.get((match.solver, match.end))
    if name is None or (match.solver == "ipndm" and match.options.get("max_order") != 4):
        raise ValueError(f"it is {_describe(match)}, which no ComfyUI sampler runs step for step (ComfyUI's samplers "
                         f"that match: {_listing(COMFYUI)}); --to json gives its sigmas, or {USE_TABLE_SCHEDULER}.")
    options = {"eta": match.options["eta"]} if match.solver == "ddim" else {}
    if match.solver == "ddim" and options["eta"] == 0:
        name, options = "euler", {}
    return {**_base(match), "sampler_name": name, "sampler_options": options}


def to_diffusers(match: Match, abar: torch.Tensor | None = None) -> dict[str, Any]:
    """The diffusers 0.42 scheduler class, its ``from_config`` options, the ``set_timesteps`` argument and the
    latents scale that reproduce the table; ValueError when no stock scheduler does (or the model is needed)."""
    name = match.solver
    deterministic_ddim = name == "ddim" and match.options.get("eta") == 0
    if name == "euler" or deterministic_ddim:  # DDIM with eta 0 is Euler in sigma-space
        return {**_base(match), "scheduler": "EulerDiscreteScheduler",
                "scheduler_config": {"timestep_spacing": "linspace"},  # so init_noise_sigma is sigma_0
                "set_timesteps": {"sigmas": match.sigmas}, "latents_scale": 1.0, "sample_scale": 1.0}
    multistep = name in ("dpmpp_2m", "dpmpp_3m") and match.options.get("variant", "diffusers") == "diffusers"
    if not (multistep or (name == "heun" and match.end == "zero")):
        raise ValueError(f"it is {_describe(match)}, which no diffusers 0.42 scheduler runs on custom sigmas or "
                         f"timesteps (Euler: EulerDiscreteScheduler; dpmpp_2m, dpmpp_3m: DPMSolverMultistepScheduler; "
                         f"heun to 0: HeunDiscreteScheduler); --to json gives its sigmas, or {USE_TABLE_SCHEDULER}.")
    scheduler = "HeunDiscreteScheduler" if name == "heun" else "DPMSolverMultistepScheduler"
    if abar is None:
        raise ValueError(f"--to diffusers for a {name} table needs --model diffusers:DIR: diffusers' {scheduler} "
                         f"takes the model's integer timesteps=, not sigmas=.")
    timesteps = _timesteps_on_grid(match, abar, scheduler)
    s0 = match.sigmas[0]
    if name == "heun":
        return {**_base(match), "scheduler": scheduler,
                "scheduler_config": {"timestep_spacing": "linspace", "clip_sample": False,  # DDPM configs clip x0
                                     "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False},
                "set_timesteps": {"timesteps": timesteps}, "latents_scale": 1.0, "sample_scale": 1.0}
    if match.end == "sigma_min":
        floor = float(_training_grid(abar)[0])
        if abs(match.sigmas[-1] / floor - 1) > GRID_RTOL:
            raise ValueError(f"its last step lands on sigma {match.sigmas[-1]:.6g}, but {scheduler} (final_sigmas_type="
                             f"'sigma_min') lands on the model's sigma at t=0, {floor:.6g}; {USE_TABLE_SCHEDULER}.")
    config = {"algorithm_type": "dpmsolver++", "solver_order": 2 if name == "dpmpp_2m" else 3, "solver_type": "midpoint",
              "lower_order_final": True, "euler_at_final": True, "final_sigmas_type": match.end,
              "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "use_lu_lambdas": False, "use_flow_sigmas": False, "thresholding": False, "variance_type": None}
    return {**_base(match), "scheduler": scheduler, "scheduler_config": config,
            "set_timesteps": {"timesteps": timesteps},
            # VP sample space: the scheduler starts from the latents, x_0 / sqrt(1 + s0^2), and ends on x / sqrt(1 + s^2)
            "latents_scale": s0 / math.sqrt(1 + s0 * s0), "sample_scale": math.sqrt(1 + match.sigmas[-1] ** 2)}


def _describe(match: Match) -> str:
    options = ", ".join(f"{k}={v}" for k, v in match.options.items())
    return f"{match.solver}{f' ({options})' if options else ''} with end={match.end}"


def _listing(mapping: dict[tuple[str, str], str]) -> str:
    return ", ".join(f"{s} (end={e})" for s, e in mapping)


def export(table: SolverTable, to: str, abar: torch.Tensor | None = None) -> dict[str, Any]:
    """The ``to`` format's JSON object for ``table`` (``abar``: the model's schedule, for timesteps); ValueError."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}.")
    match = identify(table)
    if abar is not None:  # a table above the model's range would be clamped silently by the scheduler
        top = float(VPDenoiser(None, abar).sigma_max)
        if max(match.sigmas) > top * (1 + GRID_RTOL):
            raise ValueError(f"it evaluates sigma {max(match.sigmas):.6g}, above the largest noise level of the "
                             f"model's schedule ({top:.6g}).")
    if to == "diffusers":
        return to_diffusers(match, abar)
    if to == "comfyui":
        return to_comfyui(match)
    return to_json(match, abar)


def render(obj: dict[str, Any]) -> str:
    """JSON text (floats written exactly, keys in a fixed order) ending in a newline."""
    return json.dumps(obj, indent=2) + "\n"
