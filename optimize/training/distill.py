"""What distillation methods share: the teacher's fine solve from given noises (the targets of LD3 and of DDSS's
``loss=match``) and a one-step student's 1-NFE table (DSNO, PaGoDA: a distilled network is a network plus this table)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from samplers import SolverTable, baselines, sample
from samplers.table import first_nonfinite

from optimize.base.conds import cond_rows
from optimize.training.runs import NaNLossError


def check_teacher(solver: str, nfe: Any) -> None:
    """ValueError unless ``solver`` is a classic solver that can meet ``nfe`` exactly (the fine teacher solve)."""
    if solver not in baselines.SOLVERS:
        raise ValueError(f"unknown teacher_solver {solver!r}; valid: {', '.join(baselines.SOLVERS)}.")
    baselines.check_nfe(solver, nfe)


def teacher_targets(denoiser: Any, e: torch.Tensor, solver: str, nfe: int, sigma_min: float, sigma_max: float,
                    batch_size: int = 500, cond: Any = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The fine teacher solve from unit noises ``e [B, *shape]`` (LD3's data: a 20-NFE UniPC solve), row i with the
    cond of row i (``cond``: per-row, ``Model.cond_of(seeds)``, or None); NaNLossError naming the evaluation, its sigma
    and the first bad noise (its seed when ``seeds`` are given) where it leaves the finite numbers."""
    end = "zero" if solver in ("heun", "tada") else "sigma_min"
    table = baselines.build(solver, nfe, sigma_min=sigma_min, sigma_max=sigma_max, end=end)
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


def one_step_table(sigma_max: float, metadata: dict[str, Any] | None = None) -> SolverTable:
    """The student's 1-NFE table: ``x_0 = sigma_max e_0``, output ``d_0`` (columns e_0, x_0, d_0)."""
    coef = torch.zeros(2, 3, dtype=torch.float64)
    coef[0, 0] = sigma_max
    coef[1, 2] = 1.0
    return SolverTable(torch.tensor([sigma_max], dtype=torch.float64), coef, metadata)
