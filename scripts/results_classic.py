"""Every classic solver at NFE 3, 4, 5, 6, 8, 10, 15, 20 on model=gmm and model=edm -> docs/results-classic.md.

    python scripts/results_classic.py                      # both models (edm needs checkpoints/edm-digits.safetensors)
    python scripts/results_classic.py --models gmm --n 500

Same seeds for every solver (paired), the configs of conf/ (karras schedule, rho 7, sigma 0.002..80),
one cached reference solve per model. Also writes docs/results/<model>/results.csv/.json, the reference points
(real-vs-real floor, converged teacher) as docs/results/<model>/reference.csv and a quality-vs-NFE plot.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from optimize.cli import ConfigError, compose_config, resolve_path
from optimize.evaluation.evaluate import Judge, evaluate, format_table, load_model, plot_quality, reference_solve, write_results
from optimize.evaluation.metrics import ReferenceCache, fd_estimate, kid
from optimize.evaluation.results import write_csv
from optimize.evaluation.report import NOTE, best, diff_cell, pivot, pm, table
from samplers import baselines

REPO = Path(__file__).resolve().parents[1]
SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
NFES = [3, 4, 5, 6, 8, 10, 15, 20]


def model_rows(model_name: str, n: int, nfes: list[int], device: str, out: Path, ref_nfe: int | None = None) -> list[dict[str, Any]]:
    """Evaluate every solver x NFE it supports on one model; write CSV/JSON/plot under ``out``."""
    cfg = compose_config(["method=evaluate", f"model={model_name}", f"out_dir={out}"])
    model = load_model(cfg.model, device)
    judge = Judge.for_model(cfg.model, model.shape, device)
    seeds = list(range(n))
    ref = reference_solve(model, float(cfg.sigma_max), float(cfg.sigma_min), seeds, ReferenceCache(str(REPO / cfg.cache_dir)),
                          str(cfg.ref_solver), int(ref_nfe or cfg.ref_nfe), device)
    rows = []
    for solver in SOLVERS:
        for nfe in nfes:
            try:
                table = baselines.build(solver, nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), rho=float(cfg.rho))
            except ValueError:
                continue  # e.g. heun at even NFE
            r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, reference=ref, dtype=model.dtype, device=device)
            r.pop("samples")
            rows.append({"method": solver, "model": model_name, **r})
            print(f"{model_name} {solver} nfe={nfe} fd={rows[-1].get('fd_train_main', rows[-1].get('fd_train_raw')):.4g}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, str(out), cfg)
    plot_quality(rows, str(out / "quality-vs-nfe.png"))
    return rows


def reference_points(model_name: str, n: int, device: str, converged_nfe: int = 79) -> str:
    """Markdown: the real-vs-real floor (training set vs held-out set) beside the converged teacher (Heun at
    ``converged_nfe``, as many samples as the training set) against the same held-out set, and the teacher's
    training-set figures with ``n`` samples."""
    cfg = compose_config(["method=evaluate", f"model={model_name}", "out_dir=."])
    model = load_model(cfg.model, device)
    judge = Judge.for_model(cfg.model, model.shape, device)
    train, held = judge.real["train"], judge.real["heldout"]
    table = baselines.build("heun", converged_nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
    x = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=range(max(n, len(train))), dtype=model.dtype,
                 device=device)["samples"]
    x = x.clamp(-1, 1) if judge.clip else x
    lines = ["| compared | features | FD ± se | KID ± se |", "|---|---|---:|---:|"]
    rows = []
    for name in judge.features:
        f_held = judge.feats(name, held)
        pairs = [(f"real train ({len(train)}) vs held-out ({len(held)}): the floor", judge.feats(name, train), f_held),
                 (f"teacher Heun NFE {converged_nfe} ({len(train)}) vs held-out ({len(held)})", judge.feats(name, x[: len(train)]), f_held),
                 (f"teacher Heun NFE {converged_nfe} ({n}) vs train ({len(train)})", judge.feats(name, x[:n]), judge.feats(name, train))]
        for label, a, b in pairs:
            k, se = kid(a, b)
            fd = fd_estimate(a, b)
            lines.append(f"| {label} | {name} | {fd.value:.3g} ± {fd.se:.2g} | {k:.4g} ± {se:.2g} |")
            rows.append({"compared": label, "features": name, "fd": fd.value, "fd_se": fd.se, "kid": k, "kid_se": se})
    out = REPO / "docs" / "results" / model_name
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "reference.csv")
    return "\n".join(lines) + "\n"


def best_per_nfe(rows: list[dict[str, Any]], key: str, nfes: list[int]) -> str:
    """Markdown: at each NFE the best solver by ``key`` and every other solver's paired difference to it."""
    body = []
    for nfe in nfes:
        top = best(rows, key, lambda r: r["nfe"] == nfe)
        if top is None:
            continue
        others = sorted((r for r in rows if r["nfe"] == nfe and r is not top), key=lambda r: r[key])
        tied = [r["method"] for r in others if diff_cell(r, top, key).endswith("≈")]
        body.append([str(nfe), top["method"], pm(top, key), ", ".join(tied) or "none",
                     "; ".join(f"{r['method']} {diff_cell(r, top, key)}" for r in others[:2])])
    return table(["NFE", "best", key, "within noise of it", "next two (paired difference to the best)"], body, 6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gmm", "edm"])
    ap.add_argument("--n", type=int, default=2000, help="samples (seeds 0..n-1, the same for every solver)")
    ap.add_argument("--nfe", type=int, nargs="+", default=NFES)
    ap.add_argument("--ref-nfe", type=int, default=None, help="NFE of the Heun reference solve (default: conf, 255)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "docs" / "results-classic.md"))
    ap.add_argument("--reference-only", action="store_true", help="only the reference points -> docs/results/<model>/reference.csv")
    args = ap.parse_args()
    if args.reference_only:
        for name in args.models:
            print(reference_points(name, args.n, args.device))
        return
    sections = []
    for name in args.models:
        if name == "edm" and not resolve_path("checkpoints/edm-digits.safetensors").is_file():
            print("skipping model=edm: checkpoints/edm-digits.safetensors does not exist (run scripts/train_teachers.sh).", file=sys.stderr)
            continue
        out = Path(args.out).parent / "results" / name
        try:
            rows = model_rows(name, args.n, args.nfe, args.device, out, args.ref_nfe)
        except ConfigError as err:
            sys.exit(f"error: {err}")
        print(format_table(rows))
        feat = "main" if "fd_train_main" in rows[0] else "raw"
        key = f"fd_train_{feat}"
        parts = [f"## model={name}\n", f"Best classic solver at each NFE by {key}, and which others are within noise of it:\n\n",
                 best_per_nfe(rows, key, args.nfe), "\n", "Reference points (the best a sampler of this model can do, and the noise floor of the metrics):\n\n",
                 reference_points(name, args.n, args.device), f"\nFD against the training set ({feat} features):\n", pivot(rows, f"fd_train_{feat}", args.nfe),
                 f"\nKID against the training set ({feat} features):\n", pivot(rows, f"kid_train_{feat}", args.nfe, 2),
                 f"\nRMSE to the reference solve (Heun, NFE {args.ref_nfe or 255}, same noise):\n", pivot(rows, "ref_rmse", args.nfe)]
        if "fd_train_b" in rows[0]:
            parts += ["\nFD against the training set (second feature net, b):\n", pivot(rows, "fd_train_b", args.nfe)]
        parts += [f"\nFD against held-out data ({feat} features):\n", pivot(rows, f"fd_heldout_{feat}", args.nfe),
                  f"\nAll numbers: `docs/results/{name}/results.csv`; plot: `docs/results/{name}/quality-vs-nfe.png`.\n"]
        sections.append("".join(parts))
    if not sections:
        sys.exit("error: no model evaluated.")
    head = (f"# Classic solvers: quality vs NFE\n\nGenerated by `python scripts/results_classic.py --models {' '.join(args.models)} "
            f"--n {args.n}{f' --ref-nfe {args.ref_nfe}' if args.ref_nfe else ''}` on {datetime.date.today()} ({platform.machine()}, torch {torch.__version__}). {args.n} samples, "
            "seeds 0..n-1 for every solver (paired); karras schedule, rho 7, sigma 0.002..80; '-' = NFE the solver cannot "
            "meet exactly (heun: odd only). Learned and other samplers on the same seeds: "
            "[IIA](results-iia.md) ([GMM](results-iia-gmm.md)), [DDSS](results-ddss.md), [TADA](results-tada.md), [DSNO](results-dsno.md) "
            "(with its plot `results/tada/quality-vs-nfe.png`); every method side by side: [overview](results.md).\n\n" + NOTE + "\n\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(head + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
