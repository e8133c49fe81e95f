"""Results of an evaluation: paired comparisons, the printed table, results.csv/json, sample grids and plots.

A row is a dict from ``optimize.evaluation.evaluate.evaluate`` (plus ``method``, ``model`` and extra columns). Keys that
start with ``_`` (the estimates behind the intervals) live only in memory: ``paired`` uses them, the files never
hold them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from samplers.artifact import atomic_write_bytes
from samplers.images import write_png_grid

from optimize.evaluation.metrics import FDEstimate, KIDEstimate, paired_fd_difference, paired_kid_difference

Z = 2.0  # "A beats B" when the paired difference is beyond Z standard errors


# --- paired comparisons ---------------------------------------------------------------------------
def paired(row_a: dict[str, Any], row_b: dict[str, Any], key: str) -> tuple[float, float]:
    """``row_a[key] - row_b[key]`` and its paired standard error, for two rows scored on the same seeds against the
    same reference (``key`` like ``fd_train_main`` or ``kid_heldout_b``)."""
    try:
        x, y = row_a["_estimates"][key], row_b["_estimates"][key]
    except KeyError:
        raise KeyError(f"both rows need the in-memory estimate of {key!r} (rows read back from files have none).") from None
    if isinstance(x, KIDEstimate) and isinstance(y, KIDEstimate):
        return paired_kid_difference(x, y)
    if isinstance(x, FDEstimate) and isinstance(y, FDEstimate):
        return paired_fd_difference(x, y)
    raise TypeError(f"no paired difference for {type(x).__name__} and {type(y).__name__}.")


def verdict(diff: float, se: float, z: float = Z) -> str:
    """``better`` / ``worse`` when a (lower-is-better) difference is beyond z standard errors, else ``within noise``."""
    if not math.isfinite(se) or abs(diff) <= z * se:
        return "within noise"
    return "better" if diff < 0 else "worse"


def add_paired_columns(rows: list[dict[str, Any]], baseline: dict[str, Any], keys: Sequence[str], tag: str = "vs") -> None:
    """For each row and key add ``d<key>_<tag>`` (difference to ``baseline``) and ``d<key>_<tag>_se`` in place."""
    for r in rows:
        for key in keys:
            if r is baseline:
                continue
            diff, se = paired(r, baseline, key)
            r[f"d{key}_{tag}"], r[f"d{key}_{tag}_se"] = diff, se


def public(row: dict[str, Any]) -> dict[str, Any]:
    """The row without its in-memory ``_`` keys (what files hold)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


# --- the printed table ----------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pm(row: dict[str, Any], key: str, se_key: str) -> str:
    se = row.get(se_key)
    return _fmt(row.get(key)) + (f" ± {se:.2g}" if isinstance(se, float) and math.isfinite(se) else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table: method, NFE, ref-RMSE, KID ± se, FD ± se (train, first features), FD held-out, FD of
    the second feature net when present, seconds; then, with several rows on the same seeds, the paired FD difference
    of the first row at each NFE to every other row at that NFE (± se, and whether it is beyond 2 se)."""
    if not rows:
        return ""
    feat = "main" if "fd_train_main" in rows[0] else "raw"
    extra = [("FD held", f"fd_heldout_{feat}")] + ([("FD-b", "fd_train_b")] if "fd_train_b" in rows[0] else [])
    head = ["method", "NFE", "ref-RMSE", "KID ± se", "FD ± se", *[h for h, _ in extra], "seconds"]
    body = [[r["method"], str(r["nfe"]), _fmt(r["ref_rmse"]), _pm(r, f"kid_train_{feat}", f"kid_se_train_{feat}"),
             _pm(r, f"fd_train_{feat}", f"fd_se_train_{feat}"),
             *[_pm(r, k, k.replace("fd_", "fd_se_", 1)) for _, k in extra], f"{r['seconds']:.2f}"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])
    key = f"fd_train_{feat}"
    lines = []
    firsts: dict[Any, dict[str, Any]] = {}
    for r in rows:
        first = firsts.setdefault(r["nfe"], r)
        if first is r:
            continue
        try:
            diff, se = paired(first, r, key)
        except (KeyError, ValueError):
            continue
        lines.append(f"  {first['method']} - {r['method']} (NFE {r['nfe']}): FD {diff:+.4g} ± {se:.2g} -> "
                     f"{first['method']} {verdict(diff, se)}")
    if lines:
        text += f"\npaired on the same seeds ({key}, ± 1 se; beyond {Z:g} se counts):\n" + "\n".join(lines)
    return text


# --- files ----------------------------------------------------------------------------------------
def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    """Rows as CSV with the csv module (columns in order of first appearance, None as empty, floats exact),
    written atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else repr(r[k]) if isinstance(r.get(k), float) else r[k] for k in keys})
    atomic_write_bytes(str(path), buf.getvalue().encode())


def write_results(rows: list[dict[str, Any]], out_dir: str, cfg: Any | None = None) -> None:
    """results.csv (one row per method and NFE, written with the csv module) and results.json (rows and the
    resolved config), atomically."""
    rows = [public(r) for r in rows]
    write_csv(rows, os.path.join(out_dir, "results.csv"))

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


def save_samples(x: torch.Tensor, path: str) -> None:
    """A PNG grid for images, a scatter plot for 2-D points, nothing otherwise."""
    if x.ndim == 4:
        write_png_grid(x.clamp(-1, 1), path)
    elif x[0].numel() == 2:
        import matplotlib  # heavy, only for plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        pts = x.reshape(-1, 2).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2)
        ax.set_aspect("equal")
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _main_fd(row: dict[str, Any]) -> float:
    return float(row[next(k for k in row if k.startswith("fd_train_"))])


def plot_quality(rows: list[dict[str, Any]], path: str) -> None:
    """FD (train, main features; error bars ± 1 se where known) and reference RMSE against NFE, one line per method."""
    import matplotlib  # heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == label), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in mine]
        se_key = next((k.replace("fd_", "fd_se_", 1) for k in mine[0] if k.startswith("fd_train_")), "")
        err = [r.get(se_key) or 0.0 for r in mine]
        axes[0].errorbar(nfe, [_main_fd(r) for r in mine], yerr=err, marker="o", label=label, capsize=2)
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


def log_wandb(rows: list[dict[str, Any]], cfg: Any) -> None:
    """The rows as one wandb table (offline by default: ``logger=wandb``)."""
    import wandb  # optional (pip install -e .[wandb])

    rows = [public(r) for r in rows]
    run = wandb.init(project=str(cfg.logger.project), mode=str(cfg.logger.mode), dir=str(cfg.out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True))
    keys = list(rows[0])
    run.log({"results": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})
    run.finish()


def plot_sigmas(initial: np.ndarray, learned: np.ndarray, path: str) -> str:
    """Learned evaluation sigmas against the initial ones (log scale)."""
    import matplotlib  # heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    i = np.arange(len(initial))
    ax.plot(i, initial, "o--", label="initial", alpha=0.7)
    ax.plot(i, learned, "o-", label="learned")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation i")
    ax.set_ylabel("sigma_i")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
