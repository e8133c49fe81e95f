"""What distillation methods share: the teacher's fine solve from given noises (the targets of LD3 and of DDSS's
``loss=match``) and a one-step student's 1-NFE table (DSNO, PaGoDA: a distilled network is a network plus this table)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from samplers import SolverTable, baselines, sample
from samplers.table import first_nonfinite

from optimize.base.conds import cond_rows
from optimize.data.models import native_sigmas
from optimize.training.runs import NaNLossError


TEACHER_GRIDS = ("karras", "native")  # where the fine teacher solve steps: Karras (rho 7) | the model's training times


def native_points(native: np.ndarray, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """``n`` of the model's training sigmas ``native`` (increasing) inside [sigma_min, sigma_max], uniform in training
    time (index), increasing: the grid a stock scheduler's ``linspace`` spacing steps on (FlowMatchEuler's for a flow
    model). ValueError when fewer than ``n`` training times lie in the range."""
    inside = native[(native >= sigma_min * (1 - 1e-9)) & (native <= sigma_max * (1 + 1e-9))]
    if len(inside) < n:
        raise ValueError(f"{n} grid points exceed the {len(inside)} training times of the model between sigma_min and "
                         f"sigma_max.")
    return inside[np.round(np.linspace(0, len(inside) - 1, n)).astype(int)]


def teacher_table(solver: str, nfe: int, sigma_min: float, sigma_max: float, native: np.ndarray | None = None
                  ) -> SolverTable:
    """The fine teacher solve as a table: ``solver`` at exactly ``nfe`` evaluations ending unevaluated at sigma_min
    (heun and tada end at 0), on Karras (rho 7) between sigma_min and sigma_max, or with ``native`` (the model's
    training sigmas, increasing) on its training times spaced uniformly (``native_points``): on a flow-matching model
    Karras over sigma 0.001-999 spends half its steps at flow time t > 0.95, and UniPC@20 there lands far from the
    50-step FlowMatchEuler solve (docs/methods/best.md). ValueError naming the problem."""
    if solver not in baselines.SOLVERS:
        raise ValueError(f"unknown teacher_solver {solver!r}; valid: {', '.join(baselines.SOLVERS)}.")
    nfe = baselines.check_nfe(solver, nfe)
    end = "zero" if solver in ("heun", "tada") else "sigma_min"
    if native is None:
        return baselines.build(solver, nfe, sigma_min=sigma_min, sigma_max=sigma_max, end=end)
    points = baselines.SOLVERS[solver][1](nfe) + (end == "sigma_min")
    grid = native_points(native, points, sigma_min, sigma_max)[::-1]
    return baselines.build(solver, nfe, sigmas=grid.tolist(), end=end)


def check_teacher(solver: str, nfe: Any, sigma_min: float = 0.002, sigma_max: float = 80.0, grid: str = "karras",
                  native: np.ndarray | None = None) -> None:
    """ValueError unless ``solver`` at ``nfe`` on ``grid`` (one of TEACHER_GRIDS; ``native``: the model's training
    sigmas, None where it has none, which falls back to Karras) compiles: the fine teacher solve."""
    if grid not in TEACHER_GRIDS:
        raise ValueError(f"teacher_grid must be one of {', '.join(TEACHER_GRIDS)}, got {grid!r}.")
    teacher_table(solver, nfe, sigma_min, sigma_max, native if grid == "native" else None)


def teacher_native(cfg: Any) -> np.ndarray | None:
    """The training sigmas of ``cfg.model`` (``optimize.data.models.native_sigmas``) when ``cfg.teacher_grid`` is
    native and the model has them; None otherwise (the teacher steps on Karras)."""
    return native_sigmas(cfg.model) if str(cfg.get("teacher_grid", "karras")) == "native" else None


def teacher_targets(denoiser: Any, e: torch.Tensor, solver: str, nfe: int, sigma_min: float, sigma_max: float,
                    batch_size: int = 500, cond: Any = None, seeds: Sequence[int] | None = None,
                    native: np.ndarray | None = None) -> torch.Tensor:
    """The fine teacher solve (``teacher_table``; ``native``: on the model's training times) from unit noises
    ``e [B, *shape]`` (LD3's data: a 20-NFE UniPC solve), row i with the cond of row i (``cond``: per-row,
    ``Model.cond_of(seeds)``, or None); NaNLossError naming the evaluation, its sigma and the first bad noise (its seed
    when ``seeds`` are given) where it leaves the finite numbers."""
    table = teacher_table(solver, nfe, sigma_min, sigma_max, native)
    out = []
    with torch.no_grad():
        for b, part in zip(range(0, len(e), batch_size), e.split(batch_size)):
            c = cond_rows(cond, slice(b, b + batch_size))
            y = sample(table, denoiser, part[None], c)
            if not torch.isfinite(y).all():
                where, i = first_nonfinite(table, denoiser, part[None], c)
                first = f"seed {seeds[b + i]}" if seeds is not None else f"noise {b + i}"
                raise NaNLossError(f"ld3 stopped before fitting: the teacher solve ({solver}, {nfe} NFE) gave NaN or "
                                   f"infinite values at {where}, first for {first}; the model is unusable there.")
            out.append(y)
    return torch.cat(out)


GAP_WARN = 0.05  # a teacher solve farther than this (relative RMS) from its 3x finer solve is not converged


def teacher_gap(denoiser: Any, e: torch.Tensor, solver: str, nfe: int, sigma_min: float, sigma_max: float,
                cond: Any = None, native: np.ndarray | None = None, coarse: torch.Tensor | None = None) -> float:
    """How far the teacher solve is from converged: ``RMS(y_nfe - y_3nfe) / RMS(y_3nfe)`` over the noises ``e`` for
    the same solver and grid at three times the NFE (odd stays odd for heun). About 0.33 for UniPC@20 on Karras on the
    sd3-tiny flow teacher, 0.012 for euler@50 on its native grid (docs/results/t2i/teacher-gap.csv). ``coarse``: the
    solve at ``nfe`` from ``e`` when the caller already has it (``best``'s selection targets)."""
    if coarse is None:
        coarse = teacher_targets(denoiser, e, solver, nfe, sigma_min, sigma_max, cond=cond, native=native)
    coarse = coarse.double()
    fine = teacher_targets(denoiser, e, solver, 3 * nfe, sigma_min, sigma_max, cond=cond, native=native).double()
    return float((coarse - fine).pow(2).mean().sqrt() / fine.pow(2).mean().sqrt().clamp_min(1e-12))


def one_step_table(sigma_max: float, metadata: dict[str, Any] | None = None) -> SolverTable:
    """The student's 1-NFE table: ``x_0 = sigma_max e_0``, output ``d_0`` (columns e_0, x_0, d_0)."""
    coef = torch.zeros(2, 3, dtype=torch.float64)
    coef[0, 0] = sigma_max
    coef[1, 2] = 1.0
    return SolverTable(torch.tensor([sigma_max], dtype=torch.float64), coef, metadata)
