"""IIA against every classic solver on one model -> docs/results-iia.md (+ docs/results/iia/<model>/...).

    python scripts/results_iia.py                          # model=edm, NFE 4 5 6 8 10, n=2000 (about 20 min on 2 cores)
    python scripts/results_iia.py --model gmm --n 500

Fits, on seeds 2000000.. (never the evaluation seeds), the paper's three variants with the paper's
per-step target (IIA-DDIM over euler, IIA-DPM-Solver++ over dpmpp_2m, IIA-EDM over heun at odd NFE)
and the project's defaults (generic directions, trajectory target from an accurate fine solve) over
euler and dpmpp_2m; evaluates them and every classic solver on seeds 0..n-1 (paired).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimize import iia  # noqa: E402
from optimize.cli import compose_config  # noqa: E402
from optimize.evaluate import Judge, evaluate, load_model, plot_quality, reference_solve, write_results  # noqa: E402
from optimize.metrics import ReferenceCache  # noqa: E402
from samplers import baselines  # noqa: E402

CLASSIC = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
# label: (base, variant, target, substeps, fine solver)
FITS = {
    "iia-ddim (paper)": ("euler", "ddim", "step", 4, None),
    "iia-dpmpp (paper)": ("dpmpp_2m", "dpmpp", "step", 4, None),
    "iia-edm (paper)": ("heun", "edm", "step", 4, None),
    "iia euler (default)": ("euler", "generic", "trajectory", 8, "heun"),
    "iia dpmpp_2m (default)": ("dpmpp_2m", "generic", "trajectory", 8, "heun"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edm")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    ap.add_argument("--n-fit", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default docs/results-iia.md (edm) or docs/results-iia-<model>.md")
    ap.add_argument("--render-only", action="store_true", help="rewrite the page from the saved results.csv")
    args = ap.parse_args()
    args.out = args.out or str(REPO / "docs" / ("results-iia.md" if args.model == "edm" else f"results-iia-{args.model}.md"))
    out = Path(args.out).parent / "results" / "iia" / args.model
    if args.render_only:
        from optimize.evaluate import read_results

        Path(args.out).write_text(render(read_results(str(out / "results.csv")), args, args.model))
        return
    torch.set_num_threads(args.threads)
    cfg = compose_config(["method=evaluate", f"model={args.model}", "out_dir=."])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape)
    seeds = list(range(args.n))
    smin, smax = float(cfg.sigma_min), float(cfg.sigma_max)
    ref = reference_solve(model, smax, smin, seeds, ReferenceCache(str(REPO / cfg.cache_dir)), "heun", 255)
    rows: list[dict[str, Any]] = []

    def score(label: str, table: Any, extra: dict[str, Any]) -> None:
        r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, reference=ref, dtype=model.dtype)
        r.pop("samples")
        rows.append({"method": label, "model": model.name, **r, **extra})
        feat = "main" if "fd_train_main" in r else "raw"
        print(f"{label:24s} NFE {table.nfe:2d}  ref-RMSE {r['ref_rmse']:.4f}  FD {r[f'fd_train_{feat}']:.4g}  "
              f"FD held {r[f'fd_heldout_{feat}']:.4g}", flush=True)

    for nfe in args.nfe:
        for name in CLASSIC:
            try:
                score(name, baselines.build(name, nfe, sigma_min=smin, sigma_max=smax), {})
            except ValueError:
                continue
        for label, (base, variant, target, substeps, fine) in FITS.items():
            if base == "heun" and nfe % 2 == 0:
                continue
            table = baselines.build(base, nfe, sigma_min=smin, sigma_max=smax)
            t0 = time.perf_counter()
            fitted = iia.fit(model.denoiser, table, model.shape, n_fit=args.n_fit, substeps=substeps, seed=2_000_000,
                             variant=variant, target=target, fine_solver=fine, dtype=model.dtype)
            score(label, fitted, {"fit_seconds": round(time.perf_counter() - t0, 1)})
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, str(out))
    plot_quality(rows, str(out / "quality-vs-nfe.png"))
    Path(args.out).write_text(render(rows, args, model.name))
    print(f"wrote {args.out}")


def render(rows: list[dict[str, Any]], args: argparse.Namespace, model: str) -> str:
    feat = "main" if "fd_train_main" in rows[0] else "raw"
    cols = [("FD train", f"fd_train_{feat}"), ("FD held-out", f"fd_heldout_{feat}")]
    if "fd_train_b" in rows[0]:
        cols.append(("FD-b train", "fd_train_b"))
    cols += [("KID train", f"kid_train_{feat}"), ("ref-RMSE", "ref_rmse"), ("fit s", "fit_seconds")]
    lines = [f"# IIA on model={model}\n",
             f"Generated by `python scripts/results_iia.py --model {args.model} --n {args.n}` on {datetime.date.today()} "
             f"({platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), on a 2-core CPU shared with other jobs). "
             f"Fits use {args.n_fit} noises (seeds 2000000..); every row is evaluated on seeds 0..{args.n - 1} (paired). "
             f"Karras schedule, rho 7, sigma 0.002..80. Plot: `docs/results/iia/{args.model}/quality-vs-nfe.png`.\n",
             "Rows: the paper's variants with its per-step target and 4 sub-steps of the base solver, and the project's "
             "defaults: generic directions (every vector the step and the previous step use, zero-sum) against the "
             "trajectory of an accurate fine solve (Heun on the grid refined 8x).\n"]
    lines += summary(rows, f"fd_train_{feat}")
    for nfe in dict.fromkeys(int(r["nfe"]) for r in rows):
        mine = sorted((r for r in rows if int(r["nfe"]) == nfe), key=lambda r: r[f"fd_train_{feat}"])
        lines.append(f"\n## NFE {nfe}\n\n| method | " + " | ".join(c for c, _ in cols) + " |\n|---|" + "---:|" * len(cols))
        for r in mine:
            cells = ["-" if r.get(k) is None else f"{r[k]:.4g}" for _, k in cols]
            bold = "**" if r["method"].startswith("iia") else ""
            lines.append(f"| {bold}{r['method']}{bold} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Per NFE: best classic vs best IIA, and each paper variant against its own base (FD on the training set)."""
    def fd(method: str, nfe: int) -> float | None:
        hit = [r[key] for r in rows if r["method"] == method and int(r["nfe"]) == nfe]
        return float(hit[0]) if hit else None

    lines = ["\n## Summary (FD against the training set, main features; lower is better)\n",
             "| NFE | best classic | best IIA | IIA-DDIM / euler | IIA-DPM-Solver++ / dpmpp_2m | IIA-EDM / heun | "
             "default IIA over euler / euler |", "|---|---|---|---:|---:|---:|---:|"]
    for nfe in dict.fromkeys(int(r["nfe"]) for r in rows):
        mine = [r for r in rows if int(r["nfe"]) == nfe]
        classic = min((r for r in mine if not r["method"].startswith("iia")), key=lambda r: r[key])
        best = min((r for r in mine if r["method"].startswith("iia")), key=lambda r: r[key])

        def ratio(a: str, b: str) -> str:
            x, y = fd(a, nfe), fd(b, nfe)
            return "-" if x is None or y is None else f"{x / y:.2f}"

        lines.append(f"| {nfe} | {classic['method']} {classic[key]:.3g} | {best['method']} {best[key]:.3g} | "
                     f"{ratio('iia-ddim (paper)', 'euler')} | {ratio('iia-dpmpp (paper)', 'dpmpp_2m')} | "
                     f"{ratio('iia-edm (paper)', 'heun')} | {ratio('iia euler (default)', 'euler')} |")
    return lines


if __name__ == "__main__":
    main()
