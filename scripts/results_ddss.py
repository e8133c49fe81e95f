"""DDSS tables on model=edm against every classic solver on the same seeds -> docs/results-ddss.md.

    python scripts/results_ddss.py --learn 4 5 6 --steps 250 --families ggdm ggdm_mc   # learn, commit the tables
    python scripts/results_ddss.py                                                     # evaluate every committed table

``--learn`` runs ``python -m optimize ddss`` (defaults of conf/method/ddss.yaml, ``max_minutes=null``) for each NFE
and family and copies the exported table with its sigma/coefficient plots to docs/results/ddss/tables/. Without it
the script evaluates every table in that folder beside the classic solvers (karras rho 7) at the same NFE and at
2 x NFE on seeds 0..n-1 (paired), and writes docs/results/ddss/results.csv and the page. DDSS trained and selected
its tables on other seeds against the training set with the first (CNN) feature net only: the held-out FD and FD-b
columns are independent of everything it learned or chose.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from optimize.cli import compose_config
from optimize.evaluation.evaluate import Judge, evaluate, load_model, reference_solve, start_sigma, write_results
from optimize.evaluation.metrics import ReferenceCache
from optimize.evaluation.report import NOTE, best, diff_cell, fmt, pm, table
from samplers import SolverTable, baselines

REPO = Path(__file__).resolve().parents[1]
CLASSIC = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
FAMILY_INIT = {"ggdm": "euler", "ggdm_mc": "euler", "full": "dpmpp_2m"}
OUT = REPO / "docs" / "results" / "ddss"
TABLES = OUT / "tables"


def learn(nfe: int, family: str, steps: int | None, extra: list[str]) -> Path:
    """Train one table with the CLI (its own process, like a user) and copy it with its plots to TABLES."""
    run = REPO / "outputs" / "results-ddss" / f"{family}-nfe{nfe}"
    over = ["ddss", "model=edm", f"nfe={nfe}", f"family={family}", f"init={FAMILY_INIT[family]}", "max_minutes=null",
            "evaluate_at_end=false", "progress_bar=false", f"hydra.run.dir={run}", *extra]
    if steps is not None:
        over.append(f"steps={steps}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimize", *over], cwd=REPO, check=True)
    print(f"learned {family} nfe={nfe} in {time.perf_counter() - t0:.0f} s", flush=True)
    TABLES.mkdir(parents=True, exist_ok=True)
    stem = f"ddss-{family}-nfe{nfe}"
    for suffix in (".safetensors", "-sigmas.png", "-coef.png"):
        shutil.copyfile(run / f"{stem}{suffix}", TABLES / f"{stem}{suffix}")
    return TABLES / f"{stem}.safetensors"


def section(rows: list[dict[str, Any]], nfe: int) -> str:
    """One NFE: learned tables and classics at NFE and 2 x NFE, with paired differences to the best classic at NFE."""
    key = "fd_train_main"
    classic = lambda r: not r["method"].startswith("ddss")  # noqa: E731
    base = best(rows, key, lambda r: classic(r) and r["nfe"] == nfe)
    double = best(rows, key, lambda r: classic(r) and r["nfe"] == 2 * nfe)
    mine = [r for r in rows if r["nfe"] == nfe or (classic(r) and r["nfe"] == 2 * nfe)]
    mine.sort(key=lambda r: (not r["method"].startswith("ddss"), r["nfe"], r[key]))
    body = []
    for r in mine:
        name = r["method"] + ("" if r["nfe"] == nfe else f" (NFE {r['nfe']})")
        body.append([name, pm(r, key), pm(r, "fd_heldout_main"), pm(r, "fd_train_b"), pm(r, "kid_train_main"),
                     fmt(r.get("ref_rmse")),
                     *(diff_cell(r, base, k) if base is not None and r["nfe"] == nfe else "" for k in ("fd_heldout_main", "fd_train_b")),
                     fmt(r.get("train_seconds"))])
    text = (f"## NFE {nfe}\n\nBest classic at NFE {nfe} (by FD train): **{base['method'] if base else '-'}**"
            + (f"; best classic at NFE {2 * nfe}: {double['method']} ({pm(double, key)})" if double else "") + ".\n\n")
    text += table(["method", "FD train", "FD held-out", "FD-b train", "KID train", "ref-RMSE",
                   "Δ FD held-out vs best classic", "Δ FD-b vs best classic", "train s"], body)
    for r in (r for r in mine if r["method"].startswith("ddss") and double is not None):
        text += (f"\n{r['method']} at NFE {nfe} vs {double['method']} at NFE {2 * nfe} (paired): FD train "
                 f"{diff_cell(r, double, key)}, held-out {diff_cell(r, double, 'fd_heldout_main')}, FD-b {diff_cell(r, double, 'fd_train_b')}.")
    return text + "\n"


def family_section(rows: list[dict[str, Any]]) -> str:
    """ggdm (free) against ggdm_mc (marginal-consistent, the paper's Theorem 1) at each NFE both exist, paired."""
    lines = []
    for nfe in sorted({r["nfe"] for r in rows}):
        free = next((r for r in rows if r["method"] == "ddss-ggdm" and r["nfe"] == nfe), None)
        mc = next((r for r in rows if r["method"] == "ddss-ggdm_mc" and r["nfe"] == nfe), None)
        if free and mc:
            lines.append([str(nfe), pm(free, "fd_train_main"), pm(mc, "fd_train_main"),
                          *(diff_cell(mc, free, k) for k in ("fd_train_main", "fd_heldout_main", "fd_train_b"))])
    if not lines:
        return ""
    return ("## Free GGDM vs marginal-consistent GGDM\n\n"
            "`family=ggdm` learns every GGDM coefficient freely; `family=ggdm_mc` keeps the forward marginals "
            "(Theorem 1 of the paper: in sigma space each row's coefficients of the iterates weighted by their sigmas sum "
            "to the row's sigma, and all its coefficients sum to 1), solving two coefficients per row from the rest. Same "
            "steps, seeds and settings; Δ = ggdm_mc - ggdm, paired.\n\n"
            + table(["NFE", "ggdm FD train", "ggdm_mc FD train", "Δ FD train", "Δ FD held-out", "Δ FD-b"], lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learn", type=int, nargs="*", default=[], help="NFEs to learn first (tables go to docs/results/ddss/tables)")
    parser.add_argument("--families", nargs="+", default=["ggdm"], choices=sorted(FAMILY_INIT))
    parser.add_argument("--steps", type=int, default=None, help="DDSS steps (default: conf/method/ddss.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra ddss config overrides")
    parser.add_argument("--n", type=int, default=2000, help="evaluation samples (seeds 0..n-1)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results-ddss.md"))
    args = parser.parse_args()
    for nfe in args.learn:
        for fam in args.families:
            learn(nfe, fam, args.steps, list(args.set))
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    cfg = compose_config(["method=evaluate", "model=edm", f"out_dir={OUT}"])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape, n_boot=int(cfg.n_boot))
    seeds = list(range(args.n))
    ref = reference_solve(model, float(cfg.sigma_max), float(cfg.sigma_min), seeds, ReferenceCache(str(REPO / cfg.cache_dir)),
                          str(cfg.ref_solver), int(cfg.ref_nfe))
    jobs: list[tuple[str, SolverTable, dict[str, Any]]] = []
    for path in sorted(TABLES.glob("ddss-*.safetensors")):
        t = SolverTable.load(str(path), fingerprint=model.fingerprint)
        meta = t.metadata
        jobs.append((f"ddss-{meta.get('family')}", t, {"table": str(path.relative_to(REPO)), "train_seconds": meta.get("train_seconds"),
                                                       "steps": meta.get("steps"), "best_step": meta.get("best_step")}))
    if not jobs:
        sys.exit(f"error: no DDSS tables in {TABLES}; learn some with --learn.")
    nfes = sorted({t.nfe for _, t, _ in jobs})
    for n in sorted({k for nfe in nfes for k in (nfe, 2 * nfe)}):
        for solver in CLASSIC:
            try:
                jobs.append((solver, baselines.build(solver, n), {}))
            except ValueError:
                pass  # heun at even NFE
    rows = []
    for label, t, info in jobs:
        same_start = start_sigma(t) == start_sigma(baselines.build("euler", 1))
        r = evaluate(model.denoiser, t, judge=judge, shape=model.shape, seeds=seeds, reference=ref if same_start else None,
                     dtype=model.dtype)
        r.pop("samples")
        rows.append({"method": label, "model": "edm", **r, **info})
        print(f"{label} nfe={t.nfe}: FD {pm(rows[-1], 'fd_train_main')} (held {pm(rows[-1], 'fd_heldout_main')}, "
              f"b {pm(rows[-1], 'fd_train_b')})", flush=True)
    write_results(rows, str(OUT), cfg)
    fingerprint = model.fingerprint
    head = [
        "# DDSS over GGDM on the digits teacher: learned tables vs classic solvers",
        "",
        f"Generated by `python scripts/results_ddss.py{''.join(' ' + a for a in sys.argv[1:])}` on {datetime.date.today()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}) from the tables committed in "
        "`docs/results/ddss/tables/` (re-evaluate any of them with `python -m optimize evaluate model=edm table=PATH`); "
        "all numbers: `docs/results/ddss/results.csv`.",
        f"Model fingerprint `{fingerprint}`. Seeds 0..{args.n - 1} for every row (paired). FD and KID (the unbiased MMD² "
        "with the cubic kernel on the whole sets, raw 128-d features: compare rows, not published KIDs) on `main` (CNN) and "
        "`b` (MLP) classifier features, against the 1,497 training digits and the 300 held-out digits; ref-RMSE against the "
        "cached Heun-255 solve from the same noise. Classic solvers: karras schedule, rho 7, sigma 0.002..80.",
        "",
        NOTE,
        "",
        "**What is independent of training.** DDSS's loss is KID against the training digits on `main` features, and it "
        "keeps the best table by FD against the training digits (`main`) on its own selection seeds "
        "(3,000,000+), never the evaluation seeds. So *FD train* is the quantity it optimised; *FD held-out* (300 digits "
        "it never saw) and *FD-b* (a feature net it never saw) are the independent evidence. The 'best classic' is chosen "
        "on the evaluation seeds themselves, which favours the baseline.",
        "",
        "Tables (settings in each file's metadata; learned with `python -m optimize ddss model=edm nfe=N family=F steps=S "
        "max_minutes=null`, which `--learn` runs; train s = wall seconds of training on this 2-core CPU shared with up to "
        "a dozen other jobs, several times what a quiet machine takes):",
        "",
    ]
    for label, t, info in jobs:
        if label.startswith("ddss"):
            head.append(f"- `{info['table']}`: {label}, NFE {t.nfe}, {info['steps']} steps (best at step {info['best_step']}), "
                        f"{fmt(info['train_seconds'])} s")
    parts = ["\n".join(head), "", *[section(rows, nfe) for nfe in nfes], family_section(rows)]
    Path(args.out).write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
