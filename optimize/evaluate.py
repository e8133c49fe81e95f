"""`python -m optimize evaluate`: sample quality of classic solvers or table artifacts on a model.

Every method is sampled from the same seeds (paired comparison). Measures: reference RMSE (distance
to a cached high-accuracy solve from the same noise), KID +- standard error and Frechet distance on
each feature set (the shipped digits classifiers, or raw coordinates) against the training data and
held-out data, sliced Wasserstein for 2-D data, and wall seconds of sampling.

From Python: ``evaluate(denoiser, table, judge=Judge.for_model(...), seeds=range(2000)) -> dict``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samplers import SolverTable, baselines, make_noise, sample
from samplers.artifact import atomic_write_bytes
from samplers.images import write_png_grid

from . import data as datasets
from .cli import ConfigError, SkipPoint, as_list, resolve_path
from .metrics import ReferenceCache, frechet_distance, kid, reference_rmse, sliced_wasserstein

REAL_N = 2000  # draws of the reference distribution for synthetic data (gmm, toy2d, shapes)
TUNE_SEED_OFFSET = 1_000_000  # tuning sweeps use seeds seed+1e6 ..., never the evaluation seeds
Features = Callable[[torch.Tensor], torch.Tensor]


# --- models ----------------------------------------------------------------------------------
@dataclass
class Model:
    """A denoiser with what evaluation needs to know about it."""

    name: str
    denoiser: Any
    shape: tuple[int, ...]
    fingerprint: str
    dtype: torch.dtype


def load_model(mcfg: Any, device: str = "cpu") -> Model:
    """The model of a ``conf/model/*.yaml`` config (a network checkpoint or the analytic GMM)."""
    dtype = getattr(torch, str(mcfg.get("dtype", "float32")))
    if mcfg.kind == "gmm":
        gmm = datasets.gmm_model(tuple(mcfg.shape), int(mcfg.components), int(mcfg.model_seed))
        return Model(str(mcfg.name), gmm, tuple(gmm.shape), gmm.fingerprint(), dtype)
    if mcfg.kind != "net":
        raise ConfigError(f"model {mcfg.name}: unknown kind {mcfg.kind!r}; valid kinds: net, gmm.")
    from samplers.nets import load_denoiser

    path = resolve_path(str(mcfg.checkpoint))
    if not path.is_file():
        raise ConfigError(f"model {mcfg.name}: checkpoint file {path} does not exist.")
    den = load_denoiser(str(path), device=device).to(dtype)
    return Model(str(mcfg.name), den, tuple(den.shape), den.fingerprint(), dtype)


# --- the judge: feature nets and real data ---------------------------------------------------
@dataclass
class Judge:
    """Feature maps (name -> fn on ``[B, *shape]``) and real data sets (split -> tensor) to compare against."""

    features: dict[str, Features]
    real: dict[str, torch.Tensor]
    clip: bool = False  # clamp samples to [-1, 1] (image data range) before features
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    _real_feats: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def feats(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.features[name](x).reshape(x.shape[0], -1).to(torch.float64).cpu()

    def real_feats(self, split: str, name: str) -> torch.Tensor:
        if (split, name) not in self._real_feats:
            self._real_feats[(split, name)] = self.feats(name, self.real[split])
        return self._real_feats[(split, name)]

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """KID, KID standard error and FD per (split, feature set), sliced W2 per split for 2-D data."""
        x = samples.clamp(-1, 1) if self.clip else samples
        out: dict[str, float] = {}
        for name in self.features:
            f = self.feats(name, x)
            for split in self.real:
                r = self.real_feats(split, name)
                k, se = kid(f, r, n_subsets=self.kid_subsets, subset_size=self.kid_subset_size)
                out[f"kid_{split}_{name}"], out[f"kid_se_{split}_{name}"] = k, se
                out[f"fd_{split}_{name}"] = frechet_distance(f, r)
        if x[0].numel() == 2:
            for split, real in self.real.items():
                m = min(len(x), len(real))
                out[f"sw_{split}"] = sliced_wasserstein(x[:m].reshape(m, 2), real[:m].reshape(m, 2))
        return out

    @classmethod
    def for_model(cls, mcfg: Any, shape: Sequence[int], device: str = "cpu", **kw: Any) -> "Judge":
        """Real train/held-out sets and feature maps of a model config (classifier checkpoints or raw)."""
        if mcfg.data == "digits":
            real = {"train": datasets.digits("train")[0], "heldout": datasets.digits("heldout")[0]}
        elif mcfg.data == "gmm":
            gen = lambda s: datasets.get("gmm")(REAL_N, seed=s, shape=tuple(shape), components=int(mcfg.components),  # noqa: E731
                                                model_seed=int(mcfg.model_seed))
            real = {"train": gen(0), "heldout": gen(1)}
        elif mcfg.data == "toy2d":
            real = {"train": datasets.toy2d(REAL_N, seed=0), "heldout": datasets.toy2d(REAL_N, seed=1)}
        elif mcfg.data == "shapes":
            res = int(shape[-1])
            real = {"train": datasets.shapes(REAL_N, seed=0, resolution=res), "heldout": datasets.shapes(REAL_N, seed=1, resolution=res)}
        else:
            raise ConfigError(f"model {mcfg.name}: unknown data {mcfg.data!r}; valid: digits, gmm, toy2d, shapes.")
        return cls(features=feature_maps(mcfg.features, device), real=real, clip=bool(mcfg.get("clip", False)), **kw)


def feature_maps(spec: Any, device: str = "cpu") -> dict[str, Features]:
    """``raw`` -> flattened coordinates; a list of classifier checkpoints -> their ``.features`` named main, b, c, ..."""
    if spec == "raw":
        return {"raw": lambda x: x.reshape(x.shape[0], -1)}
    from .classifier import load_classifier

    maps: dict[str, Features] = {}
    for i, path in enumerate(as_list(spec)):
        p = resolve_path(str(path))
        if not p.is_file():
            raise ConfigError(f"feature net {p} does not exist (train it with scripts/train_teachers.sh).")
        net = load_classifier(str(p), device=device)
        maps["main" if i == 0 else chr(ord("a") + i)] = lambda x, net=net: net.features(x.to(device, torch.float32))
    return maps


# --- sampling and evaluation -----------------------------------------------------------------
def draw(table: SolverTable, denoiser: Any, shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32,
         device: str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """Samples for ``seeds`` (in batches; each sample depends only on its seed), on the CPU."""
    out = []
    with torch.no_grad():
        for b in range(0, len(seeds), batch_size):
            noise = make_noise(table, shape, seeds[b:b + batch_size], dtype=dtype, device=device)
            out.append(sample(table, denoiser, noise).cpu())
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
                                lambda: draw(table, model.denoiser, model.shape, list(seeds), model.dtype, device, batch_size))


def evaluate(denoiser: Any, table: SolverTable, *, judge: Judge, shape: Sequence[int], seeds: Sequence[int],
             reference: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
             batch_size: int = 500) -> dict[str, Any]:
    """Sample ``table`` on ``seeds`` and score it: ``nfe``, ``seconds``, ``ref_rmse`` (None without a
    reference), ``kid_*``/``kid_se_*``/``fd_*``/``sw_*`` (see Judge.score) and ``samples`` (a CPU tensor)."""
    seeds = list(seeds)
    t0 = time.perf_counter()
    x = draw(table, denoiser, shape, seeds, dtype, device, batch_size)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{table.metadata.get('method', 'table')} at NFE {table.nfe} produced non-finite samples.")
    rmse = reference_rmse(x, reference) if reference is not None else None
    return {"nfe": table.nfe, "ref_rmse": rmse, **judge.score(x), "seconds": seconds, "samples": x}


# --- the command -------------------------------------------------------------------------------
def _schedule(cfg: Any, rho: float | None = None, sigma_min: float | None = None) -> dict[str, Any]:
    return {"schedule": str(cfg.schedule), "rho": float(cfg.rho if rho is None else rho),
            "sigma_min": float(cfg.sigma_min if sigma_min is None else sigma_min), "sigma_max": float(cfg.sigma_max)}


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


def _tables(cfg: Any, fingerprint: str | None = None) -> list[tuple[str, SolverTable]]:
    """(label, table) pairs of the run: the artifact of ``table=PATH`` (checked against the model ``fingerprint``
    when given) or every solver x nfe (with ``solver_options``)."""
    options = _solver_options(cfg)
    if cfg.table:
        if options:
            raise ConfigError(f"table=PATH fixes the solver; drop solver_options.{next(iter(options))}.")
        path = resolve_path(str(cfg.table))
        if not path.is_file():
            raise ConfigError(f"table file {path} does not exist.")
        try:
            table = SolverTable.load(str(path), fingerprint=fingerprint)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return [(str(table.metadata.get("method", path.stem)), table)]
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
    if cfg.model.features != "raw":
        for path in as_list(cfg.model.features):
            if not resolve_path(str(path)).is_file():
                raise ConfigError(f"feature net {resolve_path(str(path))} does not exist (train it with scripts/train_teachers.sh).")


def _main_fd(result: dict[str, Any]) -> float:
    keys = [k for k in result if k.startswith("fd_train_")]
    return float(result[keys[0]])


def tune(cfg: Any, model: Model, judge: Judge, solver: str, nfe: int) -> tuple[SolverTable, dict[str, float]]:
    """Grid over rho x sigma_min on the tuning seeds; the table with the lowest training-set FD (main features)."""
    m = cfg
    seeds = list(range(TUNE_SEED_OFFSET + int(cfg.seed), TUNE_SEED_OFFSET + int(cfg.seed) + int(m.tune_n)))
    best: tuple[float, SolverTable, dict[str, float]] | None = None
    for rho in m.tune_rho:
        for smin in m.tune_sigma_min:
            table = baselines.build(solver, nfe, **_schedule(cfg, float(rho), float(smin)), **_solver_options(cfg))
            r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, dtype=model.dtype,
                         device=str(cfg.device), batch_size=int(m.batch_size))
            fd = _main_fd(r)
            if best is None or fd < best[0]:
                best = (fd, table, {"rho": float(rho), "sigma_min": float(smin), "tune_fd": fd})
    assert best is not None
    return best[1], best[2]


def run(cfg: Any) -> list[dict[str, Any]]:
    """The `evaluate` command: rows of results, also printed and written to the run folder."""
    m, device = cfg, str(cfg.device)
    model = load_model(cfg.model, device)
    judge = Judge.for_model(cfg.model, model.shape, device, kid_subsets=int(m.kid_subsets), kid_subset_size=int(m.kid_subset_size))
    jobs: list[tuple[str, SolverTable, dict[str, Any]]] = []
    for label, table in _tables(cfg, model.fingerprint):
        if m.table:
            jobs.append((label, table, {}))
            continue
        jobs.append((label, table, {"rho": float(cfg.rho), "sigma_min": float(cfg.sigma_min)}))
        if m.tuned:
            tuned, info = tune(cfg, model, judge, str(table.metadata["method"]), table.nfe)
            jobs.append((f"{label}+tuned", tuned, info))
    return evaluate_jobs(cfg, model, judge, jobs)


def evaluate_jobs(cfg: Any, model: Model, judge: Judge, jobs: list[tuple[str, SolverTable, dict[str, Any]]],
                  batch_size: int | None = None) -> list[dict[str, Any]]:
    """Score every (label, table, extra columns) on the evaluation seeds (paired), print the table and write
    results.csv/json, sample grids and (several NFE) the quality-vs-NFE plot to ``cfg.out_dir``."""
    m, device = cfg, str(cfg.device)
    batch = int(batch_size or m.batch_size)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    seeds = list(range(int(cfg.seed), int(cfg.seed) + int(m.n)))
    cache = ReferenceCache(str(resolve_path(str(m.cache_dir))))
    rows: list[dict[str, Any]] = []
    refs: dict[float, torch.Tensor] = {}
    for label, table, info in jobs:
        s0 = start_sigma(table)
        if s0 is not None and s0 not in refs:
            refs[s0] = reference_solve(model, s0, float(cfg.model.sigma_min), seeds, cache, str(m.ref_solver), int(m.ref_nfe),
                                       device, batch)
        r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, reference=refs.get(s0),
                     dtype=model.dtype, device=device, batch_size=batch)
        samples = r.pop("samples")
        row = {"method": label, "model": model.name, **r, **info}
        rows.append(row)
        _save_samples(samples[: int(m.grid)], os.path.join(out_dir, f"samples-{label}-nfe{table.nfe}.png"))
    print(format_table(rows))
    write_results(rows, out_dir, cfg)
    if len({r["nfe"] for r in rows}) > 1:
        plot_quality(rows, os.path.join(out_dir, "quality-vs-nfe.png"))
    if cfg.logger.name == "wandb":
        _log_wandb(rows, cfg)
    return rows


# --- outputs ---------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table: method, NFE, ref-RMSE, KID +- se, FD (train, main features), FD held-out, FD of the
    second feature net when present, seconds."""
    if not rows:
        return ""
    feat = "main" if "fd_train_main" in rows[0] else "raw"
    extra = [("FD held", f"fd_heldout_{feat}")] + ([("FD-b", "fd_train_b")] if "fd_train_b" in rows[0] else [])
    head = ["method", "NFE", "ref-RMSE", "KID ± se", "FD", *[h for h, _ in extra], "seconds"]
    body = [[r["method"], str(r["nfe"]), _fmt(r["ref_rmse"]),
             f"{r[f'kid_train_{feat}']:.4f} ± {r[f'kid_se_train_{feat}']:.4f}", _fmt(r[f"fd_train_{feat}"]),
             *[_fmt(r[k]) for _, k in extra], f"{r['seconds']:.2f}"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def write_results(rows: list[dict[str, Any]], out_dir: str, cfg: Any | None = None) -> None:
    """results.csv (one row per method and NFE) and results.json (rows and the resolved config), atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else repr(r[k]) if isinstance(r.get(k), float) else str(r[k])
                                         for k in keys) for r in rows]
    atomic_write_bytes(os.path.join(out_dir, "results.csv"), ("\n".join(lines) + "\n").encode())
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None
    atomic_write_bytes(os.path.join(out_dir, "results.json"), json.dumps({"rows": rows, "config": config}, indent=1).encode())


def read_results(path: str) -> list[dict[str, Any]]:
    """The rows of a results.csv (numbers as float, empty as None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    def conv(v: str) -> Any:
        if v == "":
            return None
        try:
            return float(v)
        except ValueError:
            return v
    return [{k: conv(v) for k, v in r.items()} for r in rows]


def _save_samples(x: torch.Tensor, path: str) -> None:
    """A PNG grid for images, a scatter plot for 2-D points, nothing otherwise."""
    if x.ndim == 4:
        write_png_grid(x.clamp(-1, 1), path)
    elif x[0].numel() == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        pts = x.reshape(-1, 2).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2)
        ax.set_aspect("equal")
        fig.savefig(path, dpi=100)
        plt.close(fig)


def plot_quality(rows: list[dict[str, Any]], path: str) -> None:
    """FD (train, main features) and reference RMSE against NFE, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == label), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in mine]
        axes[0].plot(nfe, [_main_fd(r) for r in mine], marker="o", label=label)
        if all(r["ref_rmse"] is not None for r in mine):
            axes[1].plot(nfe, [r["ref_rmse"] for r in mine], marker="o", label=label)
    for ax, name in zip(axes, ["FD vs training set", "RMSE to reference solve"]):
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_wandb(rows: list[dict[str, Any]], cfg: Any) -> None:
    import wandb
    from omegaconf import OmegaConf

    run = wandb.init(project=str(cfg.logger.project), mode=str(cfg.logger.mode), dir=str(cfg.out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True))
    keys = list(rows[0])
    run.log({"results": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})
    run.finish()
