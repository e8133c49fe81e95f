"""OSS, a peer: optimal stepsize for diffusion sampling by dynamic programming (Pei, Hu, Gu, 2025; public code
``bebebe666/OptimalSteps``, ``search_OSS``). It picks the K steps of a first-order solver among the points of a
many-step teacher's grid so that the student stays near the teacher's trajectory.

Grid (``teacher_grid``): N + 1 noise levels ``s_0 = 0 < s_1 < ... < s_N = sigma_max``: the model's own N-step time-uniform
grid where it has one (a diffusers folder: training times of its DDPM betas or of its flow schedule with the shift,
spaced uniformly, as the public code's ``fm_steps``), else EDM's Karras grid (rho 7) between sigma_min and sigma_max.
The teacher is Euler (deterministic DDIM; for a flow model the same as the public code's velocity step,
``x_s = x_t + (s - t) v``) over all N steps from ``x_N = s_N e``:

    x_j = x_i + (s_j - s_i) (x_i - D(x_i, s_i)) / s_i                                   (Euler in EDM sigma-space)

Search, per sample, K rounds: round k carries, for every grid point j, the student state ``z_k[j]`` reached in
exactly k + 1 steps whose distance to the teacher there, ``cost(j) = mean((z - x_j)^2)``, is the lowest over all
sources i > j reached in round k - 1 (round 0 starts from ``x_N``); ``trace_k[j]`` keeps that source. The K-step
schedule of a sample is the trace back from ``j = 0`` (sigma 0) through rounds K-1 .. 0, so one search of K rounds
gives every NFE up to K. The recommended batch median (``cal_medium``: per position, the integer mean of the two
middle values of the sorted grid indices) makes one schedule for the model, which is compiled as the table of Euler
on those sigmas (``baselines.build('euler', K, sigmas=..., end='zero')``): a schedule table that
``python -m samplers export`` turns into a sigma list.

Two choices the public code leaves open are pinned here: a round only steps from states reached in the previous
round (the public code also evaluates unreached points, which hold the initial noise, at lower times), and exactly K
steps reach sigma 0 (the public code keeps the best of at most K, whose trace can repeat a point); a median that
repeats a point is moved down to the next free grid point.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samplers import SolverTable, baselines, make_noise, sample, schedules

from optimize.base import ConfigError, as_list
from optimize.base.conds import cond_of_seeds, cond_rows
from optimize.base.keys import count
from optimize.base.seeds import FIT_SEED_OFFSET, seed_range
from optimize.data.models import native_sigmas
from optimize.evaluation.evaluate import Judge, evaluate_jobs, load_model
from optimize.evaluation.evaluate import validate as validate_evaluate
from optimize.evaluation.results import plot_sigmas
from optimize.training.distill import TEACHER_GRIDS as GRIDS
from optimize.training.distill import native_points
from optimize.training.runs import compare_tables

KEYS = {"teacher_steps": count(100_000, low=2), "n_search": count(100_000), "search_batch_size": count(10**6)}


def teacher_grid(n: int, sigma_min: float, sigma_max: float, native: np.ndarray | None = None) -> np.ndarray:
    """``[s_0 = 0, s_1, ..., s_N]`` increasing: N points uniform in the model's training time between sigma_min and
    sigma_max (``native``: its training sigmas, increasing; ``native_points``), else Karras (rho 7), then 0 prepended."""
    if native is not None:
        grid = native_points(native, n, sigma_min, sigma_max)
    else:
        grid = schedules.karras(n, sigma_min, sigma_max)[::-1]
    return np.concatenate([[0.0], np.asarray(grid, dtype=np.float64)])


def euler_step(x: torch.Tensor, d: torch.Tensor, s_from: torch.Tensor | float, s_to: torch.Tensor | float) -> torch.Tensor:
    """One Euler (deterministic DDIM) step in EDM sigma-space: ``x + (s_to - s_from) (x - d) / s_from``."""
    return x + (s_to - s_from) * (x - d) / s_from


def teacher_trajectory(denoiser: Any, e: torch.Tensor, grid: np.ndarray, cond: Any = None) -> torch.Tensor:
    """``[N + 1, B, *shape]``: row j is the N-step Euler teacher's state at ``grid[j]`` from ``x_N = grid[N] e``
    (run through ``samplers.sample``; its callback keeps every evaluated state)."""
    n = len(grid) - 1
    table = baselines.build("euler", n, sigmas=grid[:0:-1].tolist(), end="zero")
    traj = torch.empty((n + 1, *e.shape), dtype=e.dtype)

    def keep(i: int, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> None:
        traj[n - i] = x.detach()

    with torch.no_grad():
        traj[0] = sample(table, denoiser, e[None], cond, callback=keep)
    return traj


def search(denoiser: Any, e: torch.Tensor, grid: np.ndarray, rounds: int, cond: Any = None, batch_size: int = 4096,
           progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """OSS's dynamic programme over ``grid`` for the noises ``e [B, *shape]``: element K-1 is ``[B, K]`` grid indices
    (descending, first = N) of each sample's best K-step Euler schedule, for K = 1..rounds."""
    n, b = len(grid) - 1, len(e)
    if rounds > n:
        raise ValueError(f"{rounds} steps cannot be picked from a {n}-step teacher grid.")
    s = torch.as_tensor(grid, dtype=e.dtype)
    traj = teacher_trajectory(denoiser, e, grid, cond)
    z = torch.zeros_like(traj)
    z[n] = traj[n]
    reached = [n]  # grid points holding a state of the previous round
    traces: list[torch.Tensor] = []
    schedules_: list[np.ndarray] = []
    for k in range(rounds):
        sources = [i for i in reached if i > 0]
        x = z[sources].flatten(0, 1)  # [len(sources) * B, *shape], source-major
        sig = s[sources].repeat_interleave(b)
        c = None if cond is None else cond_rows(cond, torch.arange(b).repeat(len(sources)))
        with torch.no_grad():
            d = torch.cat([denoiser(x[r:r + batch_size], sig[r:r + batch_size],
                                    *(() if c is None else (cond_rows(c, slice(r, r + batch_size)),)))
                           for r in range(0, len(x), batch_size)]).view(len(sources), *e.shape)
        best = torch.full((n + 1, b), float("inf"), dtype=torch.float64)
        trace = torch.full((n + 1, b), -1, dtype=torch.long)
        z_next = torch.zeros_like(z)
        for q, i in enumerate(sources):
            j = torch.arange(i)
            shape = (i,) + (1,) * e.dim()
            cand = euler_step(z[i][None], d[q][None], s[i], s[j].view(shape))  # [i, B, *shape]
            cost = (cand - traj[:i]).double().pow(2).flatten(2).mean(2)  # [i, B]
            better = cost < best[:i]
            best[:i] = torch.where(better, cost, best[:i])
            trace[:i] = torch.where(better, i, trace[:i])
            z_next[:i] = torch.where(better.view(i, b, *(1,) * (e.dim() - 1)), cand, z_next[:i])
        z = z_next
        reached = [j for j in range(n) if bool((trace[j] >= 0).all())]
        traces.append(trace)
        steps = np.zeros((b, k + 1), dtype=np.int64)
        for col in range(b):
            j = 0
            for kk in range(k, -1, -1):
                j = int(traces[kk][j, col])
                steps[col, kk] = j
        schedules_.append(steps)
        if progress is not None:
            progress(k)
    return schedules_


def batch_median(steps: np.ndarray, n: int) -> list[int]:
    """OSS's recommended schedule for a batch (``cal_medium``): per position, the integer mean of the two middle sorted
    grid indices; a point equal to or above the previous one moves down to the next free grid point (strictly
    decreasing, first = N kept)."""
    b = len(steps)
    ordered = np.sort(steps, axis=0)
    med = [int((ordered[b // 2, k] + ordered[b // 2 - 1, k]) // 2) if b > 1 else int(ordered[0, k])
           for k in range(steps.shape[1])]
    out: list[int] = []
    for k, v in enumerate(med):
        room = steps.shape[1] - k - 1  # points still to place below this one, each >= 1
        v = min(v, n if not out else out[-1] - 1)
        out.append(max(v, room + 1))
    return out


def fit(denoiser: Any, shape: Sequence[int], nfes: Sequence[int], *, n_search: int = 32, teacher_steps: int = 200,
        sigma_min: float = 0.002, sigma_max: float = 80.0, native: np.ndarray | None = None, seed: int = 0,
        dtype: torch.dtype = torch.float32, batch_size: int = 4096, cond_of: Callable[[Sequence[int]], Any] | None = None,
        progress: Callable[[int], None] | None = None) -> dict[int, SolverTable]:
    """One OSS search on ``n_search`` noises of the FIT seed range (each with its seed's cond); returns the Euler table
    on the batch-median schedule for each NFE in ``nfes``."""
    t0 = time.perf_counter()
    seeds = seed_range(FIT_SEED_OFFSET, int(seed), int(n_search))
    e = make_noise(1, shape, seeds, dtype=dtype)[0]
    grid = teacher_grid(int(teacher_steps), sigma_min, sigma_max, native)
    per_k = search(denoiser, e, grid, max(nfes), cond_of_seeds(cond_of, seeds), batch_size, progress)
    seconds = time.perf_counter() - t0
    tables = {}
    for nfe in nfes:
        picked = batch_median(per_k[nfe - 1], len(grid) - 1)
        table = baselines.build("euler", nfe, sigmas=grid[picked].tolist(), end="zero")
        table.metadata.update({"method": "oss", "oss": {
            "teacher_steps": int(teacher_steps), "n_search": int(n_search), "grid": "native" if native is not None
            else "karras", "grid_indices": picked, "search_spread": per_k[nfe - 1].std(0).round(2).tolist()},
            "fit_seconds": round(seconds, 2)})
        tables[nfe] = table
    return tables


def validate(cfg: Any) -> None:
    """OSS's keys and the final evaluation's."""
    if str(cfg.teacher_grid) not in GRIDS:
        raise ConfigError(f"teacher_grid must be one of {', '.join(GRIDS)}, got {cfg.teacher_grid!r}.")
    if max(int(n) for n in as_list(cfg.nfe)) > int(cfg.teacher_steps):
        raise ConfigError(f"nfe must not exceed teacher_steps={cfg.teacher_steps} (steps are picked from its grid).")
    if cfg.evaluate:
        validate_evaluate(cfg)
    for nfe in as_list(cfg.nfe):
        compare_tables(cfg, as_list(cfg.get("compare") or []), int(nfe))


def run(cfg: Any) -> list[str]:
    """`python -m optimize oss`: one search for every ``nfe``, save ``<out_dir>/oss-<model>-nfe<N>.safetensors`` and a
    sigma plot each, then evaluate them beside Euler on the run's schedule and the ``compare`` classics."""
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    model = load_model(cfg.model, str(cfg.device))
    nfes = [int(n) for n in as_list(cfg.nfe)]
    native = native_sigmas(cfg.model) if str(cfg.teacher_grid) == "native" else None
    try:
        native_grid = teacher_grid(int(cfg.teacher_steps), float(cfg.sigma_min), float(cfg.sigma_max), native)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"oss: teacher Euler@{cfg.teacher_steps} on the {'native' if native is not None else 'karras'} grid "
          f"({native_grid[1]:.4g} .. {native_grid[-1]:.4g}), {cfg.n_search} noises, {max(nfes)} rounds", flush=True)
    tables = fit(model.denoiser, model.shape, nfes, n_search=int(cfg.n_search), teacher_steps=int(cfg.teacher_steps),
                 sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), native=native, seed=int(cfg.fit_seed),
                 dtype=model.dtype, batch_size=int(cfg.search_batch_size), cond_of=model.cond_of,
                 progress=lambda k: print(f"  round {k + 1}/{max(nfes)} done", flush=True))
    os.makedirs(str(cfg.out_dir), exist_ok=True)
    paths, jobs = [], []
    for nfe, table in tables.items():
        table.metadata.update(model.table_metadata())
        path = os.path.join(str(cfg.out_dir), f"oss-{model.name}-nfe{nfe}.safetensors")
        table.save(path)
        plain = baselines.build("euler", nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
        plot_sigmas(np.asarray(plain.metadata["step_sigmas"]), np.asarray(table.metadata["step_sigmas"]),
                    path.replace(".safetensors", "-sigmas.png"))
        print(f"wrote {path} (search {table.metadata['fit_seconds']} s; grid points {table.metadata['oss']['grid_indices']})",
              flush=True)
        paths.append(path)
        others = [(label, t) for label, t in compare_tables(cfg, as_list(cfg.get("compare") or []), nfe) if label != "euler"]
        jobs += [(label, t, {}) for label, t in [("euler", plain), *others, ("oss", table)]]
    if cfg.evaluate and jobs:
        judge = Judge.for_model(cfg.model, model.shape, str(cfg.device), n_boot=int(cfg.n_boot))
        evaluate_jobs(cfg, model, judge, jobs)
    return paths
