"""`python -m optimize evaluate`: sample quality of classic solvers or table artifacts on a model.

Every method is sampled from the same seeds (paired comparison). Measures: reference RMSE (distance
to a cached high-accuracy solve from the same noise), KID and Frechet distance with standard errors that
count the sampling of both sets, on each feature set (the shipped digits classifiers, or raw coordinates)
against the training data and held-out data (``optimize.evaluation.judge``), sliced Wasserstein for 2-D data, and wall
seconds of sampling; paired differences between rows (``optimize.evaluation.results.paired``) decide "beats".

From Python: ``evaluate(denoiser, table, judge=Judge.for_model(...), shape=..., seeds=range(2000)) -> dict``.
Models live in ``optimize.data.models``, the judge in ``optimize.evaluation.judge``, files and plots in ``optimize.evaluation.results``,
seed ranges in ``optimize.base.seeds``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samplers import SolverTable, TableError, baselines, make_noise, sample
from samplers.table import first_nonfinite

from optimize.base import ConfigError, SkipPoint, as_list, resolve_path
from optimize.evaluation.judge import REAL_N, Features, Judge, feature_maps  # noqa: F401 - re-exported
from optimize.base.conds import cond_of_seeds
from optimize.base.keys import count
from optimize.evaluation.metrics import ReferenceCache, reference_rmse
from optimize.data.models import Model, load_model  # noqa: F401 - re-exported
from optimize.base.paths import path_inside, slug
from optimize.evaluation.results import (  # noqa: F401
    format_table,
    log_wandb,
    plot_quality,
    public,
    read_results,
    save_samples,
    write_results,
)
from optimize.base.seeds import EVAL_SEED_OFFSET, TUNE_SEED_OFFSET, seed_range

# --- sampling and evaluation -----------------------------------------------------------------
KEYS = {"tune_n": count(10**8)}  # this method's typed keys (optimize.base.keys; shared ones are declared there)


class NonFiniteSamples(FloatingPointError):
    """A table on a model produced NaN or infinite samples; the message names the evaluation, its sigma and the seed."""


def draw(table: SolverTable, denoiser: Any, shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32,
         device: str = "cpu", batch_size: int = 500, cond_of: Callable[[Sequence[int]], Any] | None = None) -> torch.Tensor:
    """Samples for ``seeds`` (in batches; each sample depends only on its seed, and on ``cond_of(seed)``, e.g. its
    prompt), on the CPU; NonFiniteSamples when a batch leaves the finite numbers (checked once per batch)."""
    out = []
    with torch.no_grad():
        for b in range(0, len(seeds), batch_size):
            batch = list(seeds[b:b + batch_size])
            noise = make_noise(table, shape, batch, dtype=dtype, device=device)
            cond = cond_of_seeds(cond_of, batch, device)
            x = sample(table, denoiser, noise, cond)
            if not bool(torch.isfinite(x).all()):
                where, i = first_nonfinite(table, denoiser, noise, cond)
                raise NonFiniteSamples(f"{table.metadata.get('method', 'table')} at NFE {table.nfe} gave NaN or infinite "
                                       f"samples at {where}, first for seed {batch[i]}")
            out.append(x.cpu())
    return torch.cat(out)


def start_sigma(table: SolverTable) -> float | None:
    """sigma_max (12 digits) of a table whose first input is ``sigma_max * e_0`` (K = 1), else None (no comparable reference)."""
    row = table.coef[0].detach().numpy()
    if table.n_noise != 1 or row[0] <= 0 or np.any(row[1:] != 0):
        return None
    return float(f"{row[0]:.12g}")  # schedules may round sigma_max in the last bit


def reference_solve(model: Model, sigma_max: float, sigma_min: float, seeds: Sequence[int], cache: ReferenceCache,
                    solver: str = "heun", nfe: int = 255, device: str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """High-accuracy solve from ``sigma_max * e_0`` of each seed, cached by model fingerprint, schedule and seeds."""
    table = baselines.build(solver, nfe, sigma_min=sigma_min, sigma_max=sigma_max)
    key = f"{solver}-karras7-{sigma_min:g}-{sigma_max:g}"
    return cache.get_or_compute(model.fingerprint, key, nfe, list(seeds), model.shape, model.dtype,
                                lambda: draw(table, model.denoiser, model.shape, list(seeds), model.dtype, device, batch_size,
                                             model.cond_of))


def evaluate(denoiser: Any, table: SolverTable, *, judge: Judge, shape: Sequence[int], seeds: Sequence[int],
             reference: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
             batch_size: int = 500, cond_of: Callable[[Sequence[int]], Any] | None = None,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Sample ``table`` on ``seeds`` (with ``cond_of(seeds)``, e.g. their prompts) and score it: ``nfe``, ``seconds``,
    ``ref_rmse`` (None without a reference), ``kid_*``/``kid_se_*``/``fd_*``/``sw_*`` (see Judge.score) and
    ``samples`` (a CPU tensor). A latent model's ``decode`` turns samples and reference into images first: the judge,
    the RMSE and the returned samples are of decoded images."""
    seeds = list(seeds)
    t0 = time.perf_counter()
    x = draw(table, denoiser, shape, seeds, dtype, device, batch_size, cond_of)
    seconds = time.perf_counter() - t0
    if decode is not None:
        x = decoded(decode, x, batch_size)
        reference = None if reference is None else decoded(decode, reference, batch_size)
    rmse = reference_rmse(x, reference) if reference is not None else None
    return {"nfe": table.nfe, "ref_rmse": rmse, **judge.score(x), "seconds": seconds, "samples": x}


def decoded(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``decode`` (a latent model's VAE) over ``latents`` in batches, on the CPU."""
    with torch.no_grad():
        return torch.cat([decode(part).cpu() for part in latents.split(batch_size)])


# --- the command -------------------------------------------------------------------------------
def _schedule(cfg: Any, rho: float | None = None, sigma_min: float | None = None, end: str | None = None) -> dict[str, Any]:
    return {"schedule": str(cfg.schedule), "rho": float(cfg.rho if rho is None else rho),
            "sigma_min": float(cfg.sigma_min if sigma_min is None else sigma_min), "sigma_max": float(cfg.sigma_max),
            "end": str(cfg.get("end", "zero") if end is None else end)}


def _solver_options(cfg: Any) -> dict[str, Any]:
    """The non-null ``solver_options`` (options of the classic solvers for baselines.build)."""
    opts = cfg.get("solver_options") or {}
    return {str(k): v for k, v in opts.items() if v is not None}


def _check_solver_options(solver: str, options: dict[str, Any]) -> None:
    """One sentence naming each set option that ``solver`` does not take."""
    if solver not in baselines.SOLVERS:
        return  # baselines.build names the valid solvers
    bad = sorted(set(options) - set(baselines.SOLVERS[solver][2]))
    if bad:
        valid = ", ".join(baselines.SOLVERS[solver][2]) or "none"
        raise ConfigError(f"solver {solver} does not take {', '.join(f'solver_options.{k}' for k in bad)} "
                          f"(its options: {valid}); set it to null or use a solver that takes it.")


def _tables(cfg: Any, model: Model | None = None) -> list[tuple[str, SolverTable]]:
    """(label, table) pairs of the run: the artifact of ``table=PATH`` (checked against the ``model``'s fingerprint
    when given, ``Model.table_fingerprint``) or every solver x nfe (with ``solver_options``)."""
    options = _solver_options(cfg)
    if cfg.table:
        if options:
            raise ConfigError(f"table=PATH fixes the solver; drop solver_options.{next(iter(options))}.")
        path = resolve_path(str(cfg.table))
        if not path.is_file():
            raise ConfigError(f"table file {path} does not exist.")
        try:
            table = model.load_table(str(path)) if model is not None else SolverTable.load(str(path))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return [(slug(str(table.metadata.get("method", path.stem))), table)]  # a label from a file: never a path
    out = []
    for solver in as_list(cfg.solver):
        _check_solver_options(str(solver), options)
        for nfe in as_list(cfg.nfe):
            try:
                baselines.check_nfe(str(solver), nfe)
            except ValueError as err:
                raise SkipPoint(str(err)) from None
            try:
                label = str(solver) + (f"({','.join(f'{k}={v}' for k, v in options.items())})" if options else "")
                out.append((label, baselines.build(str(solver), int(nfe), **_schedule(cfg), **options)))
            except ValueError as err:
                raise ConfigError(str(err)) from None
    return out


def validate(cfg: Any) -> None:
    """Evaluate's own checks (called by the CLI before any work)."""
    m = cfg
    if int(m.n) < 2 or int(m.batch_size) < 1:
        raise ConfigError(f"need n >= 2 and batch_size >= 1, got n={m.n} and batch_size={m.batch_size}.")
    _tables(cfg)
    try:
        baselines.build(str(m.ref_solver), int(m.ref_nfe), sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
    except ValueError as err:
        raise ConfigError(f"reference solve: {err}") from None
    if m.tuned and any(not 0 < float(s) < float(cfg.sigma_max) for s in m.tune_sigma_min):
        raise ConfigError(f"every tune_sigma_min must lie in (0, sigma_max={cfg.sigma_max}), got {list(m.tune_sigma_min)}.")
    if m.tuned and any(str(e) not in baselines.ENDS for e in tune_ends(m)):
        raise ConfigError(f"every tune_end must be one of {', '.join(baselines.ENDS)}, got {list(tune_ends(m))}.")
    if cfg.model.features != "raw":
        for path in as_list(cfg.model.features):
            if not resolve_path(str(path)).is_file():
                raise ConfigError(f"feature net {resolve_path(str(path))} does not exist (train it with scripts/train_teachers.sh).")


def _main_fd(result: dict[str, Any]) -> float:
    keys = [k for k in result if k.startswith("fd_train_")]
    return float(result[keys[0]])


def tune_ends(cfg: Any) -> list[str]:
    """The end conventions the tuned classic tries (tada has only 'zero')."""
    return [str(e) for e in as_list(cfg.get("tune_end", ["zero"]))]


def tune(cfg: Any, model: Model, judge: Judge, solver: str, nfe: int) -> tuple[SolverTable, dict[str, Any]]:
    """Grid over rho x sigma_min x end convention on the tuning seeds; the table with the lowest training-set FD
    (main features)."""
    m = cfg
    seeds = seed_range(TUNE_SEED_OFFSET, int(cfg.seed), int(m.tune_n))
    judge = judge.restricted(splits=["train"], features=[next(iter(judge.features))], n_boot=0)  # held-out stays unseen
    best: tuple[float, SolverTable, dict[str, Any]] | None = None
    ends = [e for e in tune_ends(cfg) if e == "zero" or solver != "tada"]
    for end in ends:
        for rho in m.tune_rho:
            for smin in m.tune_sigma_min:
                table = baselines.build(solver, nfe, **_schedule(cfg, float(rho), float(smin), end), **_solver_options(cfg))
                r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, dtype=model.dtype,
                             device=str(cfg.device), batch_size=int(m.batch_size), cond_of=model.cond_of,
                             decode=model.decode)
                fd = _main_fd(r)
                if best is None or fd < best[0]:
                    best = (fd, table, {"rho": float(rho), "sigma_min": float(smin), "end": end, "tune_fd": fd})
    assert best is not None
    return best[1], best[2]


def run(cfg: Any) -> list[dict[str, Any]]:
    """The `evaluate` command: rows of results, also printed and written to the run folder."""
    m, device = cfg, str(cfg.device)
    model = load_model(cfg.model, device)
    judge = Judge.for_model(cfg.model, model.shape, device, n_boot=int(m.n_boot))
    jobs: list[tuple[str, SolverTable, dict[str, Any]]] = []
    for label, table in _tables(cfg, model):
        check_table_for(table, model.denoiser, str(cfg.table or label))
        if m.table:
            jobs.append((label, table, {}))
            continue
        jobs.append((label, table, {"rho": float(cfg.rho), "sigma_min": float(cfg.sigma_min), "end": str(cfg.get("end", "zero"))}))
        if m.tuned:
            tuned, info = tune(cfg, model, judge, str(table.metadata["method"]), table.nfe)
            jobs.append((f"{label}+tuned", tuned, info))
    return evaluate_jobs(cfg, model, judge, jobs)


def check_table_for(table: SolverTable, denoiser: Any, name: str) -> None:
    """ConfigError unless ``table`` suits the denoiser (sigmas in its range, a one-step student's table size)."""
    try:
        table.check_for(denoiser)
    except TableError as err:
        raise ConfigError(f"{name}: {err}") from None


def evaluate_jobs(cfg: Any, model: Model, judge: Judge, jobs: list[tuple[str, SolverTable, dict[str, Any]]],
                  batch_size: int | None = None) -> list[dict[str, Any]]:
    """Score every (label, table, extra columns) on the evaluation seeds (paired), print the table and write
    results.csv/json, sample grids and (several NFE) the quality-vs-NFE plot to ``cfg.out_dir``. A job's extra columns
    may hold ``_denoiser``, another denoiser for that row (a distilled student beside its teacher's classics). Labels
    become safe file names (``optimize.base.paths.slug``); a non-finite sample is one ConfigError naming where it appeared.
    The one evaluation loop of every command (evaluate, iia, ld3, ddss, dsno)."""
    try:
        return _evaluate_jobs(cfg, model, judge, jobs, batch_size)
    except NonFiniteSamples as err:
        raise ConfigError(f"{err}; the model or table is unusable there (nothing of this evaluation was written)") from None


def _evaluate_jobs(cfg: Any, model: Model, judge: Judge, jobs: list[tuple[str, SolverTable, dict[str, Any]]],
                   batch_size: int | None = None) -> list[dict[str, Any]]:
    m, device = cfg, str(cfg.device)
    batch = int(batch_size or m.batch_size)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    seeds = seed_range(EVAL_SEED_OFFSET, int(cfg.seed), int(m.n))
    cache = ReferenceCache(str(resolve_path(str(m.get("cache_dir") or m.ref_cache_dir))))
    rows: list[dict[str, Any]] = []
    samples_by_row: list[tuple[str, torch.Tensor]] = []  # written once every row has sampled (a failure writes none)
    refs: dict[float, torch.Tensor] = {}
    for label, table, info in jobs:
        check_table_for(table, info.get("_denoiser", model.denoiser), label)
    for label, table, info in jobs:
        s0 = start_sigma(table)
        if table.metadata.get("teacher_fingerprint") not in (None, model.fingerprint):
            s0 = None  # a student distilled from another model: a long solve with the student as denoiser means nothing
        if s0 is not None and s0 not in refs:
            try:
                refs[s0] = reference_solve(model, s0, float(cfg.model.sigma_min), seeds, cache, str(m.ref_solver),
                                           int(m.ref_nfe), device, batch)
            except NonFiniteSamples as err:
                raise NonFiniteSamples(f"the reference solve ({m.ref_solver}, {m.ref_nfe} NFE): {err}") from None
        r = evaluate(info.get("_denoiser", model.denoiser), table, judge=judge, shape=model.shape, seeds=seeds,
                     reference=refs.get(s0), dtype=model.dtype, device=device, batch_size=batch, cond_of=model.cond_of,
                     decode=model.decode)
        samples = r.pop("samples")
        row = {"method": label, "model": model.name, **r, **public(info)}
        rows.append(row)
        samples_by_row.append((f"samples-{slug(label)}-nfe{table.nfe}.png", samples[: int(m.get("grid", 64))]))
    print(format_table(rows))
    writes = [(name, lambda g=grid, p=path_inside(out_dir, name): save_samples(g, p)) for name, grid in samples_by_row]
    writes.append(("results.csv and results.json", lambda: write_results(rows, out_dir, cfg)))
    if len({r["nfe"] for r in rows}) > 1:
        writes.append(("quality-vs-nfe.png", lambda: plot_quality(rows, os.path.join(out_dir, "quality-vs-nfe.png"))))
    for i, (name, write) in enumerate(writes):
        try:
            write()
        except OSError as err:
            lost = ", ".join(n for n, _ in writes[i:])
            raise ConfigError(f"writing {name} in {out_dir} failed ({err.strerror or err}); the results table above was "
                              f"printed, {i} file(s) before it were written, not written: {lost}") from None
    if cfg.logger.name == "wandb":
        log_wandb(rows, cfg)
    return rows


