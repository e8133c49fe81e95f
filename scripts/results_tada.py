"""TADA at NFE 4-20 over several `detail` values on model=edm, next to the classic solvers -> docs/results-tada.md.

    python scripts/results_tada.py                                  # n = 2000, NFE 4 5 6 8 10 15 20, detail 0.25 .. 4
    python scripts/results_tada.py --n 500 --nfe 4 8 --details 1 2  # a quick look
    python scripts/results_tada.py --sample-only --shard 0 2        # fill the sample cache (half the work), no scoring

Every row samples seeds 0..n-1 (optimize.base.seeds EVAL range, paired; TADA's first noise vector e_0 is the classic
solvers' noise, its second e_1 is the next draw of the same seed's generator) with the configs of conf/ (model=edm,
karras schedule, rho 7, sigma 0.002..80). Scores (optimize.evaluation.judge.Judge): FD and KID against the training and
held-out digits on the two classifier feature nets, each ± its standard error (KID: full-set unbiased MMD^2 with a
two-sample jackknife; FD: bootstrap of both sets), and ref-RMSE: for classic solvers the RMSE to the cached Heun-255
solve of the probability-flow ODE from ``sigma_max e_0``; for TADA the RMSE to TADA's own converged solve (order 3
at ``--own-ref-nfe``, same e_0 and e_1, cached beside it), because TADA integrates a different ODE whose limit is
not the PF-ODE solution (the doc reports how far apart the two limits are). dpmpp_2m is also run at ceil(1.5 N)
for the moonshot check. Every comparison on the page is a paired difference on the same seeds
(optimize.evaluation.results.paired) with its standard error and a verdict (beyond 2 se, or ≈).

The fixed TADA setting is chosen on the TUNE seed range (optimize.base.seeds.TUNE_SEED_OFFSET) against the training set
with the first feature net only; the evaluation seeds, the held-out set and the second net play no part in it.

Samples of every row are cached in ``<cache_dir>/../tada-samples`` (keyed by model fingerprint, a hash of the
table's sigmas and coefficients, and the seeds), so a rerun only re-scores; ``--sample-only`` fills that cache
(``--shard I N``: every N-th job from I, for parallel runs). Writes docs/results-tada.md,
docs/results/tada/results.csv/.json (optimize.evaluation.results.write_results), the quality-vs-NFE plot, one sample grid per
detail value at NFE 10 and report.json (the numbers and tables of the doc). The summary at the top of the doc is
hand-written in docs/results/tada/notes.md; after editing it, ``--render`` rewrites the doc from report.json
without sampling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from optimize.cli import as_list, compose_config, resolve_path
from optimize.evaluation.evaluate import Judge, draw, load_model, reference_solve, write_results
from optimize.evaluation.metrics import ReferenceCache, fd_estimate, kid, reference_rmse
from optimize.recipes import cached_draw
from optimize.evaluation.report import NOTE, diff_cell, fmt, pm, table
from optimize.evaluation.results import Z, public
from optimize.base.seeds import EVAL_SEED_OFFSET, TUNE_SEED_OFFSET, seed_range
from samplers import SolverTable, baselines
from samplers.artifact import atomic_write_bytes
from samplers.images import write_png_grid

REPO = Path(__file__).resolve().parents[1]
CLASSIC = ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]
NFES = [4, 5, 6, 8, 10, 15, 20]
DETAILS = [0.25, 0.5, 1.0, 2.0, 4.0]
GRID_NFE = 10
KEYS = [("fd_train_main", "FD train"), ("fd_heldout_main", "FD held-out"), ("fd_train_b", "FD-b train"),
        ("kid_train_main", "KID train")]  # what every comparison reports (lower is better)


def label(detail: float, order: int) -> str:
    return f"tada k={detail:g} o{order}"


def own_reference(model: Any, detail: float, nfe: int, seeds: list[int], cache: ReferenceCache, cfg: Any) -> torch.Tensor:
    """TADA's converged solve for ``detail`` (order 3 at ``nfe``), cached like the Heun reference."""
    table = baselines.build("tada", nfe, detail=detail, order=3, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max),
                            rho=float(cfg.rho))
    key = f"tada-k{detail:g}-o3-karras{float(cfg.rho):g}-{float(cfg.sigma_min):g}-{float(cfg.sigma_max):g}"
    return cache.get_or_compute(model.fingerprint, key, nfe, seeds, model.shape, model.dtype,
                                lambda: draw(table, model.denoiser, model.shape, seeds, model.dtype))


def best_by(rows: list[dict[str, Any]], nfe: int, kind: str) -> dict[str, Any] | None:
    """The row with the lowest FD (train, main) at ``nfe`` among the TADA rows (kind 'tada') or the classic ones."""
    mine = [r for r in rows if int(r["nfe"]) == nfe and r["method"].startswith("tada") == (kind == "tada")]
    return min(mine, key=lambda r: r["fd_train_main"], default=None)


def short(diff_text: str) -> str:
    """The verdict word of a diff_cell: better / worse / ≈."""
    return "better" if diff_text.endswith("**better**") else "worse" if diff_text.endswith("worse") else "≈"


def pivot(rows: list[dict[str, Any]], key: str, nfes: list[int], bold_best: bool = True) -> str:
    """Markdown table: one row per method, one column per NFE, cells ``value ± se`` (plain value for ref-RMSE); the
    lowest point value of each column in bold."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], int(r["nfe"])): r for r in rows}
    best = {n: min((cell[(m, n)][key] for m in methods if (m, n) in cell), default=None) for n in nfes}
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for m in methods:
        cells = []
        for n in nfes:
            r = cell.get((m, n))
            if r is None or r.get(key) is None:
                cells.append("-")
                continue
            text = pm(r, key)
            cells.append(f"**{text}**" if bold_best and r[key] == best[n] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], nfes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = [("fd_train_main", "FD vs training set (main features), ± 1 se"), ("fd_train_b", "FD vs training set (second net, b), ± 1 se"),
            ("ref_rmse", "ref-RMSE (classic: to Heun-255; TADA: to own limit)")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    details = sorted({float(r["detail"]) for r in rows if r.get("detail") is not None})
    cmap = plt.get_cmap("viridis")
    classic_style = {"dpmpp_2m": ("black", "s"), "dpmpp_3m": ("grey", "D"), "unipc": ("tab:red", "^"), "ipndm": ("tab:orange", "v")}
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m and int(r["nfe"]) in nfes), key=lambda r: r["nfe"])
        if m.startswith("tada"):
            k, order = float(mine[0]["detail"]), int(mine[0]["order"])
            color = cmap(details.index(k) / max(1, len(details) - 1) * 0.9)
            style = dict(color=color, marker="o", markersize=3, linewidth=1.2, linestyle="-" if order == 3 else ":")
        else:
            color, marker = classic_style.get(m, ("tab:brown", "x"))
            style = dict(color=color, marker=marker, markersize=5, linewidth=2.2, linestyle="--")
        for ax, (key, _) in zip(axes, keys):
            pts = [(r["nfe"], r[key], r.get(key.replace("fd_", "fd_se_", 1)) if key.startswith("fd_") else None)
                   for r in mine if r[key] is not None]
            err = [p[2] or 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err if any(err) else None, label=m, capsize=2, **style)
    for ax, (_, name) in zip(axes, keys):
        ax.set_xlabel("NFE")
        ax.set_title(name, fontsize=10)
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict_lists(pairs: list[tuple[int, dict[str, Any], dict[str, Any]]], key: str) -> dict[str, list[int]]:
    """NFEs where the first row of each (nfe, a, b) is better / ≈ / worse than the second on ``key`` (paired)."""
    out: dict[str, list[int]] = {"better": [], "≈": [], "worse": []}
    for nfe, a, b in pairs:
        out[short(diff_cell(a, b, key))].append(nfe)
    return out


def lists_text(v: dict[str, list[int]]) -> str:
    return "; ".join(f"{word} at NFE {', '.join(map(str, v[word]))}" for word in ("better", "≈", "worse") if v[word]) or "-"


def comparisons(rows: list[dict[str, Any]], limits: list[dict[str, Any]], nfes: list[int], orders: list[int],
                details: list[float], fixed: str, tune_text: str, own_ref_nfe: int, ref_name: str) -> dict[str, str]:
    """Every paired comparison of the page as markdown (computed here, while the rows still hold their estimates)."""
    main_rows = [r for r in rows if not r.get("moonshot_only")]
    cell = {(r["method"], int(r["nfe"])): r for r in rows}
    out: dict[str, str] = {}

    # converged limits, each TADA limit against the PF-ODE limit (same seeds)
    pf = limits[0]
    body = []
    for r in limits:
        body.append([r["method"], pm(r, "fd_train_main"), pm(r, "fd_heldout_main"), pm(r, "fd_train_b"), pm(r, "kid_train_main"),
                     *(diff_cell(r, pf, k) if r is not pf else "(baseline)" for k in ("fd_train_main", "fd_heldout_main", "fd_train_b")),
                     fmt(r["heun_rmse"]), f"{100 * r['same_label']:.1f}%", fmt(r.get("conv"))])
    out["limits_table"] = table(["solve", "FD train", "FD held-out", "FD-b train", "KID train", "Δ FD train vs PF-ODE",
                                 "Δ FD held-out vs PF-ODE", "Δ FD-b vs PF-ODE", "RMSE to Heun-255 (PF-ODE)", "same digit as PF-ODE",
                                 "own-ref convergence"], body)

    # head-to-head: best TADA vs best classic at each NFE
    h2h = [(n, best_by(main_rows, n, "tada"), best_by(main_rows, n, "classic")) for n in nfes]
    h2h = [(n, t, c) for n, t, c in h2h if t is not None and c is not None]
    out["h2h_values"] = table(
        ["NFE", "best TADA", "FD train", "FD held-out", "FD-b train", "KID train", "best classic", "FD train", "FD held-out",
         "FD-b train", "KID train"],
        [[str(n), t["method"], *(pm(t, k) for k, _ in KEYS), c["method"], *(pm(c, k) for k, _ in KEYS)] for n, t, c in h2h], 0)
    out["h2h_diffs"] = table(["NFE", "TADA − classic", *(f"Δ {name}" for _, name in KEYS)],
                             [[str(n), f"{t['method']} − {c['method']}", *(diff_cell(t, c, k) for k, _ in KEYS)] for n, t, c in h2h], 0)
    out["h2h_text"] = ("Best TADA against best classic at equal NFE, paired: " + " ".join(
        f"{name}: {lists_text(verdict_lists(h2h, k))}." for k, name in KEYS) + f" (of NFE {', '.join(map(str, nfes))}.)")

    # the fixed setting (chosen on the tuning seeds) against the best classic at each NFE
    fx = [(n, cell[(fixed, n)], best_by(main_rows, n, "classic")) for n in nfes if (fixed, n) in cell]
    fx = [(n, f, c) for n, f, c in fx if c is not None]
    out["fixed_table"] = table(["NFE", f"{fixed}: FD train", "best classic", "FD train", *(f"Δ {name}" for _, name in KEYS)],
                               [[str(n), pm(f, "fd_train_main"), c["method"], pm(c, "fd_train_main"), *(diff_cell(f, c, k) for k, _ in KEYS)]
                                for n, f, c in fx], 0)
    out["fixed_line"] = tune_text + " Fixed setting against the best classic solver at each NFE, paired on the evaluation seeds: " + " ".join(
        f"{name}: {lists_text(verdict_lists(fx, k))}." for k, name in KEYS)

    # moonshot: TADA at N against dpmpp_2m at ceil(1.5 N)
    moon_best, moon_fixed, mb, mf = [], [], [], []
    for n in nfes:
        target = math.ceil(1.5 * n)
        d = cell.get(("dpmpp_2m", target))
        t = best_by(main_rows, n, "tada")
        if d is None or t is None:
            continue
        mb.append((n, t, d))
        moon_best.append([str(n), str(target), pm(d, "fd_train_main"), pm(d, "kid_train_main"), t["method"], pm(t, "fd_train_main"),
                          pm(t, "kid_train_main"), *(diff_cell(t, d, k) for k, _ in KEYS)])
        if (fixed, n) in cell:
            f = cell[(fixed, n)]
            mf.append((n, f, d))
            moon_fixed.append([str(n), str(target), pm(d, "fd_train_main"), pm(f, "fd_train_main"), pm(f, "kid_train_main"),
                               *(diff_cell(f, d, k) for k, _ in KEYS)])
    out["moon_best"] = table(["N", "dpmpp_2m NFE", "dpmpp_2m FD train", "dpmpp_2m KID train", "best TADA at N", "FD train", "KID train",
                              *(f"Δ {name}" for _, name in KEYS)], moon_best, 0)
    out["moon_fixed"] = table(["N", "dpmpp_2m NFE", "dpmpp_2m FD train", f"{fixed} FD train", "KID train",
                               *(f"Δ {name}" for _, name in KEYS)], moon_fixed, 0)
    out["moon_text"] = ("TADA at N against dpmpp_2m at ceil(1.5 N), paired (better = TADA reached it beyond noise, ≈ = within "
                        "noise, worse = not reached). Best TADA setting: " + " ".join(
                            f"{name}: {lists_text(verdict_lists(mb, k))}." for k, name in KEYS)
                        + f" Fixed setting ({fixed}): " + " ".join(f"{name}: {lists_text(verdict_lists(mf, k))}." for k, name in KEYS))

    # the detail knob: at a few NFE, every k against the FD-best k of that order (paired)
    body = []
    for order in orders:
        for n in nfes:
            mine = [cell[(label(k, order), n)] for k in details if (label(k, order), n) in cell]
            if not mine:
                continue
            top = min(mine, key=lambda r: r["fd_train_main"])
            for r in mine:
                body.append([str(order), str(n), f"{float(r['detail']):g}", pm(r, "fd_train_main"),
                             *(diff_cell(r, top, k) for k in ("fd_train_main", "fd_heldout_main", "fd_train_b"))])
    out["detail_table"] = table(["order", "NFE", "k", "FD train", "Δ FD train vs best k", "Δ FD held-out vs best k",
                                 "Δ FD-b vs best k"], body, 0)
    lim = ", ".join(f"k={float(r['detail']):g}: {pm(r, 'fd_train_main')} (RMSE to PF-ODE {r['heun_rmse']:.3g})" for r in limits[1:])
    out["detail_text"] = (f"Converged (order 3, NFE {own_ref_nfe}), FD train (main): {lim}; PF-ODE ({ref_name}): "
                          f"{pm(pf, 'fd_train_main')}. Paired differences of the converged limits to the PF-ODE: table "
                          "\"Converged limits\" above.")
    return out


def markdown(rows: list[dict[str, Any]], extra: dict[str, Any], nfes: list[int], meta: dict[str, Any]) -> str:
    main_rows = [r for r in rows if int(r["nfe"]) in nfes and not r.get("moonshot_only")]
    out = [
        "# TADA on the digits teacher: augmented-noise sampler vs classic solvers",
        "",
        f"Generated by `python scripts/results_tada.py {meta['argv']}` on {meta['date']} ({meta['machine']}), "
        f"{meta['minutes']:.0f} minutes (wall time on a shared machine). Model `model=edm` (`checkpoints/edm-digits.safetensors`, "
        f"fingerprint `{meta['fingerprint']}`). {meta['n']} samples, seeds 0..{meta['n'] - 1} (the evaluation seed range) for "
        "every row (paired). Karras schedule, rho 7, sigma 0.002..80 for every method; TADA's N evaluations sit at the N "
        "karras sigmas (its time grid solves gamma_t = sigma^-2; `samplers/tada.py`).",
        "",
    ]
    if meta.get("sweep_note"):
        out += [f"**Reduced sweep.** {meta['sweep_note']}", ""]
    out += [
        "TADA (`baselines.build(\"tada\", nfe, detail=k, order=p)`, K = 2 noise vectors): position + velocity per pixel, "
        "velocity prior variance `detail` = k, Adams-Bashforth order p in t (`o3` = the paper's order 3, `o2` = order 2). "
        "Classic solvers: dpmpp_2m, dpmpp_3m (diffusers variant), unipc (order 2), ipndm (max order 4). FD and KID "
        "(unbiased MMD^2 with the cubic kernel on the whole sets, not rescaled) on the `main` (CNN) and `b` (MLP) "
        "classifier features against the 1,497 training digits and the 300 held-out digits; samples clipped to [-1, 1]. "
        "No hyper-parameter of the evaluation was changed for TADA.",
        "",
        NOTE + " The choice of the \"best\" row on the evaluation seeds is not part of any interval.",
        "",
        "**ref-RMSE.** TADA's first denoiser input is exactly `sigma_max e_0` (row 0 of its table is `80 e_0`), the same "
        "as the classic solvers' start, so it can be paired with the cached Heun-255 probability-flow solve from the "
        "same e_0. But that is not a fair error measure: TADA integrates the augmented ODE, whose exact solution from "
        "(e_0, e_1) is a *different* sample than the PF-ODE's from e_0 (it also depends on e_1 and on k). Its RMSE to "
        "the Heun reference therefore does not go to zero with NFE (see the converged rows below). For TADA the ref-RMSE "
        f"columns are the RMSE to TADA's own converged solve (order 3 at NFE {meta['own_ref_nfe']}, same k, e_0, e_1; "
        "cached in `outputs/.cache/references`), i.e. its discretisation error, which is what the classic solvers' "
        "ref-RMSE to the Heun solve measures for them. Both are errors to the solver's own ODE, not to each other.",
        "",
        "## Summary",
        "",
        extra["limits_text"],
        "",
        "## Converged limits (what each sampler tends to as NFE grows)",
        "",
        extra["limits_table"],
        f"own-ref convergence: RMSE between TADA order 3 at NFE {meta['own_ref_nfe'] // 2} and at NFE {meta['own_ref_nfe']} "
        f"on the first {extra['conv_n']} seeds (the own reference's own error is well below this). same digit as "
        "PF-ODE: share of seeds whose sample the main classifier labels as the same digit as the Heun-255 sample from "
        "the same e_0. Δ: paired difference to the PF-ODE row on the same seeds. Noise floor of the metrics, the 300 "
        f"held-out digits against the 1,497 training digits: {extra['floor']}.",
        "",
    ]
    sections = [
        ("FD against the training set (main features)", "fd_train_main"),
        ("FD against the held-out set (main features)", "fd_heldout_main"),
        ("FD against the training set (second feature net, b)", "fd_train_b"),
        ("FD against the held-out set (second feature net, b)", "fd_heldout_b"),
        ("KID against the training set (main features)", "kid_train_main"),
        ("KID against the held-out set (main features)", "kid_heldout_main"),
        ("ref-RMSE (classic: to the Heun-255 PF-ODE solve; TADA: to its own converged solve)", "ref_rmse"),
    ]
    out += ["## Quality vs NFE", "", "Every cell is value ± 1 se. Bold: the lowest point value at that NFE (whether it is "
            "lower beyond noise is what the paired comparisons below decide). Plot: `docs/results/tada/quality-vs-nfe.png`; "
            "all numbers: `docs/results/tada/results.csv`.", ""]
    for title, key in sections:
        out += [f"### {title}", "", pivot(main_rows, key, nfes)]
    out += ["## Head-to-head: best TADA vs best classic solver at equal NFE", "",
            f"Best = lowest FD against the training set (main features) among the {meta['n_tada']} TADA settings / among "
            "the four classic solvers at that NFE, on the evaluation seeds. Picking the best of more TADA settings than "
            "classic solvers on the same seeds is an optimistic bias in TADA's favour that no interval below includes; "
            "the fixed setting further down is chosen on separate seeds and has none.", "",
            extra["h2h_values"],
            f"Paired differences TADA − classic on the same {meta['n']} seeds and the same real set (negative = TADA lower), "
            f"± 1 se; **better** / worse beyond {Z:g} se, ≈ otherwise:", "",
            extra["h2h_diffs"], extra["h2h_text"], "",
            "### The fixed setting (chosen on separate seeds)", "",
            extra["fixed_line"], "", extra["fixed_table"]]
    out += ["## Moonshot: does TADA at NFE N reach dpmpp_2m at 1.5 N?", "",
            "dpmpp_2m at ceil(1.5 N) on the same seeds, against the best TADA setting at N (chosen on the evaluation "
            f"seeds) and against the fixed setting ({extra['fixed']}, chosen on the tuning seeds). Δ = TADA at N − dpmpp_2m "
            "at 1.5 N, paired, ± 1 se: **better** = TADA reached it beyond noise, ≈ = within noise, worse = not reached.", "",
            "Best TADA setting at N:", "", extra["moon_best"], "Fixed setting at N:", "", extra["moon_fixed"], extra["moon_text"], ""]
    out += ["## The detail knob", "",
            "At each order and NFE, every k against the k with the lowest FD train (paired, ± 1 se):", "",
            extra["detail_table"], extra["detail_text"], "",
            f"Sample grids at NFE {GRID_NFE} (order 3, the first 64 seeds, same noise in every grid): "
            + ", ".join(f"[k={k:g}](results/tada/grid-detail-{k:g}.png)" for k in meta["details"])
            + f"; dpmpp_2m at NFE {GRID_NFE} for comparison: [dpmpp_2m](results/tada/grid-dpmpp_2m.png).", ""]
    for k in meta["details"]:
        out.append(f"k = {k:g}: ![TADA k={k:g} NFE {GRID_NFE}](results/tada/grid-detail-{k:g}.png)")
        out.append("")
    out.append(f"dpmpp_2m: ![dpmpp_2m NFE {GRID_NFE}](results/tada/grid-dpmpp_2m.png)")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="samples (evaluation seeds 0..n-1, the same for every row)")
    ap.add_argument("--nfe", type=int, nargs="+", default=NFES)
    ap.add_argument("--details", type=float, nargs="+", default=DETAILS, help="TADA detail values k")
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 2], help="TADA orders (each with every detail)")
    ap.add_argument("--own-ref-nfe", type=int, default=200, help="NFE of TADA's own converged reference (order 3)")
    ap.add_argument("--tune-n", type=int, default=500, help="tuning seeds for choosing the fixed TADA setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--cache-dir", default=None, help="reference cache (default: conf cache_dir, outputs/.cache/references)")
    ap.add_argument("--sweep-note", default="", help="a sentence for the page when the sweep is smaller than the default")
    ap.add_argument("--sample-only", action="store_true", help="only fill the sample cache (no scoring, nothing written to docs)")
    ap.add_argument("--shard", type=int, nargs=2, default=[0, 1], metavar=("I", "N"), help="with --sample-only: jobs I, I+N, ...")
    ap.add_argument("--out", default=str(REPO / "docs" / "results-tada.md"))
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from docs/results/tada/report.json + notes.md")
    args = ap.parse_args()
    if args.render:
        render(Path(args.out).parent / "results" / "tada", Path(args.out))
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    out_dir = Path(args.out).parent / "results" / "tada"
    cfg = compose_config(["method=evaluate", "model=edm", f"out_dir={out_dir}"])
    model = load_model(cfg.model)
    seeds = seed_range(EVAL_SEED_OFFSET, 0, args.n)
    tune_seeds = seed_range(TUNE_SEED_OFFSET, 0, args.tune_n)
    ref_dir = Path(args.cache_dir or REPO / cfg.cache_dir)
    cache = ReferenceCache(str(ref_dir))
    samples_cache = ReferenceCache(str(ref_dir.parent / "tada-samples"))
    sched = dict(sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), rho=float(cfg.rho))
    conv_n = min(200, args.n)
    ref_name = f"{cfg.ref_solver}-{cfg.ref_nfe}"

    # every sampling job: (name, table, seeds, reference kind, extra columns)
    jobs: list[tuple[str, SolverTable, list[int], Any, dict[str, Any]]] = []
    for solver in CLASSIC:
        for nfe in args.nfe:
            jobs.append((solver, baselines.build(solver, nfe, **sched), seeds, "heun", {"reference": ref_name}))
    for nfe in sorted({math.ceil(1.5 * n) for n in args.nfe} - set(args.nfe)):
        jobs.append(("dpmpp_2m", baselines.build("dpmpp_2m", nfe, **sched), seeds, "heun", {"reference": ref_name, "moonshot_only": True}))
    tada_jobs = [(label(k, o), baselines.build("tada", nfe, detail=k, order=o, **sched), k, o, nfe)
                 for o in args.orders for k in args.details for nfe in args.nfe]
    for name, tab, k, o, nfe in tada_jobs:
        jobs.append((name, tab, seeds, k, {"detail": k, "order": o, "reference": f"tada-own-{args.own_ref_nfe}"}))
    tune_jobs = [(name, tab, tune_seeds, None, {}) for name, tab, _, _, _ in tada_jobs]
    half_jobs = [(f"tada k={k:g} o3", baselines.build("tada", args.own_ref_nfe // 2, detail=k, order=3, **sched), seeds[:conv_n], None, {})
                 for k in args.details]

    if args.sample_only:
        work: list[Callable[[], Any]] = [lambda j=j: cached_draw(model, samples_cache, j[0], j[1], j[2]) for j in jobs + tune_jobs + half_jobs]
        work += [lambda k=k: own_reference(model, k, args.own_ref_nfe, seeds, cache, cfg) for k in args.details]
        i, n_shards = args.shard
        for w in work[i::n_shards]:
            t0 = time.perf_counter()
            w()
            print(f"sample job done ({time.perf_counter() - t0:.0f} s; {(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
        return

    out_dir.mkdir(parents=True, exist_ok=True)
    judge = Judge.for_model(cfg.model, model.shape)
    heun = reference_solve(model, float(cfg.sigma_max), float(cfg.sigma_min), seeds, cache, str(cfg.ref_solver), int(cfg.ref_nfe))
    own_refs: dict[float, torch.Tensor] = {}

    def own(k: float) -> torch.Tensor:
        if k not in own_refs:
            own_refs[k] = own_reference(model, k, args.own_ref_nfe, seeds, cache, cfg)
        return own_refs[k]

    # rows are scored from the last job to the first (a concurrent --sample-only run fills the cache from the first, so
    # no job is sampled twice) and listed in job order; ref-RMSE is filled in once every row is scored
    rows: list[dict[str, Any]] = [{} for _ in jobs]
    xs: dict[int, torch.Tensor] = {}
    grids: dict[str, torch.Tensor] = {}
    for i in reversed(range(len(jobs))):
        name, tab, sd, ref_kind, info = jobs[i]
        x = xs[i] = cached_draw(model, samples_cache, name, tab, sd)
        if tab.nfe == GRID_NFE and (name == "dpmpp_2m" or name.endswith("o3")):
            grids[name] = x[:64]
        row = rows[i] = {"method": name, "model": "edm", "nfe": tab.nfe, "ref_rmse": None, **judge.score(x), **info}
        print(f"{name:>16} nfe={tab.nfe:>2}: FD {pm(row, 'fd_train_main')} (held {pm(row, 'fd_heldout_main')}, "
              f"b {pm(row, 'fd_train_b')}) KID {pm(row, 'kid_train_main')} [{(time.perf_counter() - t_start) / 60:.1f} min]", flush=True)
    for i, (name, tab, sd, ref_kind, info) in enumerate(jobs):
        rows[i]["ref_rmse"] = reference_rmse(xs[i], heun if ref_kind == "heun" else own(ref_kind))
    xs.clear()
    print(f"rows scored, references ready ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)

    # converged limits: the Heun reference and each TADA own reference, scored like a sampler
    from optimize.evaluation.classifier import load_classifier

    classifier = load_classifier(str(resolve_path(str(as_list(cfg.model.features)[0]))))

    def labels(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier(x.clamp(-1, 1).to(torch.float32)).argmax(1)

    heun_labels = labels(heun)
    limits = [{"method": f"PF-ODE (Heun {cfg.ref_nfe})", "nfe": int(cfg.ref_nfe), **judge.score(heun), "heun_rmse": 0.0, "conv": None,
               "same_label": 1.0}]
    for (name, tab, sd, _, _), k in zip(half_jobs, args.details):
        half = cached_draw(model, samples_cache, name, tab, sd)
        limits.append({"method": f"TADA k={k:g} (order 3, NFE {args.own_ref_nfe})", "nfe": args.own_ref_nfe, "detail": k,
                       **judge.score(own(k)), "heun_rmse": reference_rmse(own(k), heun),
                       "conv": reference_rmse(half, own(k)[:conv_n]),
                       "same_label": float((labels(own(k)) == heun_labels).double().mean())})
    print(f"limits scored ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)

    floor = []
    for name in judge.features:
        a, b = judge.real_feats("heldout", name), judge.real_feats("train", name)
        kv, kse = kid(a, b)
        fd = fd_estimate(a, b)
        floor.append(f"{name}: FD {fd.value:.3g} ± {fd.se:.2g}, KID {kv:.3g} ± {kse:.2g}")

    # the fixed setting: the lowest mean log FD over every NFE on the tuning seeds, against the training set with
    # the first feature net only (one setting for all NFE, chosen without the evaluation seeds, the held-out set
    # or the second net); its ± is the bootstrap se of the geometric mean
    tune_judge = judge.restricted(splits=["train"], features=[next(iter(judge.features))])
    tada_names = [label(k, o) for o in args.orders for k in args.details]
    tune_score: dict[str, tuple[float, float]] = {}
    for name in tada_names:
        vals, boots = [], []
        for jname, tab, sd, _, _ in tune_jobs:
            if jname != name:
                continue
            s = tune_judge.score(cached_draw(model, samples_cache, jname, tab, sd))
            est = s["_estimates"]["fd_train_main"]
            vals.append(math.log(est.value))
            boots.append(np.log(np.maximum(est.boot, 1e-12)))
        geo, geo_boot = math.exp(sum(vals) / len(vals)), np.exp(np.mean(boots, axis=0))
        tune_score[name] = (geo, float(geo_boot.std(ddof=1)))
        print(f"tuning seeds: {name} geometric-mean FD {geo:.4g} ± {tune_score[name][1]:.2g}", flush=True)
    fixed = min(tada_names, key=lambda m: tune_score[m][0])
    tune_text = (f"Fixed setting: **{fixed}**, the TADA setting with the lowest mean log FD (train set, main features only) over "
                 f"NFE {', '.join(map(str, args.nfe))} on {args.tune_n} separate tuning seeds ({tune_seeds[0]}..{tune_seeds[-1]}, "
                 "`optimize.base.seeds.TUNE_SEED_OFFSET`); ranking by geometric-mean FD on those seeds (± bootstrap se): "
                 + ", ".join(f"{m} {tune_score[m][0]:.3g} ± {tune_score[m][1]:.2g}" for m in sorted(tada_names, key=lambda m: tune_score[m][0]))
                 + ".")

    extra = comparisons(rows, limits, args.nfe, args.orders, args.details, fixed, tune_text, args.own_ref_nfe,
                        f"Heun {cfg.ref_nfe}")
    extra.update({"conv_n": conv_n, "floor": "; ".join(floor), "fixed": fixed})

    main_rows = [r for r in rows if not r.get("moonshot_only")]
    write_results(rows, str(out_dir), cfg)
    plot(main_rows, args.nfe, out_dir / "quality-vs-nfe.png")
    for name, x in grids.items():
        stem = "grid-dpmpp_2m" if name == "dpmpp_2m" else f"grid-detail-{float(name.split('=')[1].split()[0]):g}"
        write_png_grid(x.clamp(-1, 1), str(out_dir / f"{stem}.png"))
    argv = " ".join(f"--nfe {' '.join(map(str, args.nfe))}".split() if args.nfe != NFES else [])
    argv += "" if args.details == DETAILS else f" --details {' '.join(f'{k:g}' for k in args.details)}"
    argv += "" if args.n == 2000 else f" --n {args.n}"
    meta = {"argv": argv.strip() + (" --sweep-note ..." if args.sweep_note else ""), "date": datetime.date.today().isoformat(), "n": args.n, "details": args.details,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s)",
            "fingerprint": model.fingerprint, "n_tada": len(tada_names), "own_ref_nfe": args.own_ref_nfe,
            "minutes": (time.perf_counter() - t_start) / 60, "sweep_note": args.sweep_note}
    report = {"rows": [public(r) for r in rows], "limits": [public(r) for r in limits], "extra": extra, "nfe": args.nfe, "meta": meta}
    atomic_write_bytes(str(out_dir / "report.json"), json.dumps(report, indent=1).encode())
    render(out_dir, Path(args.out))
    print(f"done in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)


def render(out_dir: Path, out: Path) -> None:
    """docs/results-tada.md from the saved report.json and the hand-written summary docs/results/tada/notes.md."""
    report = json.loads((out_dir / "report.json").read_text())
    notes = out_dir / "notes.md"
    report["extra"]["limits_text"] = notes.read_text().strip() if notes.is_file() else "(no docs/results/tada/notes.md yet)"
    out.write_text(markdown(report["rows"], report["extra"], report["nfe"], report["meta"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
