"""DSNO on the digits teacher beside classic solvers -> docs/results-dsno.md and docs/results/dsno/.

    python scripts/results_dsno.py                                   # main run (defaults) + ablations + evaluation
    python scripts/results_dsno.py --main outputs/dsno/edm/main --ablation-steps 300 --ship

The main student is a ``python -m optimize dsno model=edm`` run with the defaults of conf/method/dsno.yaml (given with
``--main RUN_FOLDER``, else trained here). Ablations are trained here with equal steps ``--ablation-steps`` on the same
cached teacher trajectories: the default student, ``temporal=false`` (plain one-step distillation) at equal steps and
at equal CPU time (``no-temporal-eqtime``: 1.45x the steps, the measured CPU cost ratio of a step), ``modes=1``,
``M=2`` and ``M=1``; their wall-clock training time (on a shared machine: load varies) is listed beside them. Everything is evaluated on seeds 0..n-1
(paired with the classic solvers euler, dpmpp_2m, ipndm and unipc at NFE 6 and 10 on the teacher): FD against the
training digits and the held-out digits on the CNN features (``main``) and FD-b on the MLP features (``b``), with
the evaluation API's standard errors, and RMSE to the cached Heun-255 solve of the teacher from the same noise.
Cost: network calls (NFE), forward FLOPs per sample (torch's FlopCounterMode: convolutions, matmuls, einsums; the
FFTs are not counted) and sampling wall time per sample. ``--ship`` copies the main student and its table to
checkpoints/. Hand-written notes in docs/results/dsno/notes.md are included in the page.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from optimize.methods import dsno
from optimize.cli import compose_config
from optimize.evaluation.cost import flops_per_sample
from optimize.evaluation.evaluate import Judge, evaluate, load_model, reference_solve, write_results
from optimize.evaluation.metrics import ReferenceCache
from samplers import SolverTable, baselines
from samplers.images import write_png_grid
from samplers.nets import load_denoiser, read_net_header

REPO = Path(__file__).resolve().parents[1]
CLASSIC = ["euler", "dpmpp_2m", "ipndm", "unipc"]
ABLATIONS = {"default": [], "no-temporal": ["temporal=false"], "no-temporal-eqtime": ["temporal=false"], "modes1": ["modes=1"],
             "M2": ["M=2"], "M1": ["M=1", "modes=1"]}
# no-temporal-eqtime: as many steps as the default student's CPU time buys without temporal blocks (a training step
# costs 0.527 s of CPU with them and 0.363 s without, batch 128, one thread, measured on this machine: x1.45)
STEP_FACTOR = {"no-temporal-eqtime": 1.45}
DOCS, OUT = REPO / "docs" / "results" / "dsno", REPO / "outputs" / "results-dsno"


def train(name: str, overrides: list[str], out: Path) -> Path:
    """A `python -m optimize dsno` run in this process (reused when its student exists); returns the run folder."""
    if (out / "dsno-edm.safetensors").is_file():
        print(f"{name}: reusing {out}", flush=True)
        return out
    cfg = compose_config(["method=dsno", "model=edm", f"out_dir={out}", "evaluate_at_end=false", "progress_bar=false", *overrides])
    dsno.validate(cfg)
    print(f"{name}: training {' '.join(overrides)}", flush=True)
    dsno.run(cfg)
    return out


def loss_log(run: Path) -> list[tuple[int, float]]:
    """(step, L1 distance of the sample, i.e. the last time) of a run: its whole curve (dsno-edm-loss.csv), else its
    Lightning CSV log (every 10 steps). Unlike the weighted loss, this is comparable across M."""
    path = run / "dsno-edm-loss.csv"
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        last = [k for k in rows[0] if k.startswith("dist_")][-1]
        return [(int(r["step"]), float(r[last])) for r in rows]
    path = run / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last = sorted(k for k in rows[0] if k.startswith("dist_t"))[-1]
    return [(int(r["step"]), float(r[last])) for r in rows if r.get(last)]


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L1 distance of the sample (last time)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(v: Any, d: int = 3) -> str:
    return "-" if v is None or v == "" else f"{v:.{d}g}" if isinstance(v, float) else str(v)


def _pm(r: dict[str, Any], key: str) -> str:
    se_key = key.replace("fd_", "fd_se_", 1)
    se = r.get(se_key)
    return f"{_f(r.get(key))} ± {_f(se, 2)}" if se is not None else _f(r.get(key))


def paired_text(a: dict[str, Any], b: dict[str, Any], key: str = "fd_train_main") -> str:
    """``a - b`` on ``key`` with the paired standard error when the evaluation API provides it."""
    try:
        from optimize.evaluation.results import paired
    except ImportError:
        return f"{a[key] - b[key]:+.3g}"
    try:
        diff, se = paired(a, b, key)
    except (KeyError, TypeError, ValueError):
        return f"{a[key] - b[key]:+.3g}"
    return f"{diff:+.3g} ± {se:.2g}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], notes: str) -> str:
    by = {r["method"]: r for r in rows}
    lines = [
        "# DSNO: one-step neural-operator student of the digits teacher",
        "",
        f"Generated by `python scripts/results_dsno.py {meta['argv']}` on {meta['date']} ({meta['machine']}). Teacher "
        f"fingerprint `{meta['fingerprint']}`. Seeds 0..{meta['n'] - 1} for every row (paired; the student's training "
        "trajectories use seeds 4,000,000+). FD on CNN features (`main`) against the 1,497 training digits and the 300 "
        "held-out digits, FD-b on the MLP features against the training digits, ± the evaluation API's standard error; "
        "ref-RMSE: distance to the teacher's Heun-255 solve from the same noise (what the student distils).",
        "",
        "## Quality and cost",
        "",
        "| method | NFE | FD train | FD held-out | FD-b train | ref-RMSE | forward MFLOP / sample | teacher forwards / sample | ms / sample | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {_pm(r, 'fd_train_main')} | {_pm(r, 'fd_heldout_main')} | "
                     f"{_pm(r, 'fd_train_b')} | {_f(r.get('ref_rmse'))} | {r['mflop']:.1f} | {r['teacher_forwards']:.2f} | "
                     f"{1000 * r['seconds'] / meta['n']:.3f} | {_f(r.get('train_seconds'), 4)} |")
    main = by.get("dsno")
    if main is not None:
        lines += ["", "Paired FD-train differences of the main student (negative: the student is better):", ""]
        for other in [f"{s}-{n}" for n in (6, 10) for s in CLASSIC]:
            if other in by:
                lines.append(f"- dsno − {other}: {paired_text(main, by[other])}")
    base = by.get("ablation no-temporal")
    if base is not None:
        lines += ["", "Ablations (300 steps; `no-temporal-eqtime`: 435 steps, the CPU time of 300 steps with temporal blocks), "
                  "paired against `temporal=false` at 300 steps (negative: better than it):", "",
                  "| ablation | M | modes | FD train − no-temporal | FD-b train − no-temporal | FD held-out − no-temporal |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if r["method"].startswith("ablation") and r is not base:
                modes = r["modes"] if r["temporal"] else "-"
                lines.append(f"| {r['method'][9:]} | {r['M']} | {modes} | {paired_text(r, base)} | "
                             f"{paired_text(r, base, 'fd_train_b')} | {paired_text(r, base, 'fd_heldout_main')} |")
        pairs = [("ablation default", "ablation no-temporal-eqtime"), ("ablation default", "ablation M1")]
        lines += [""] + [f"- {a[9:]} − {b[9:]}: FD train {paired_text(by[a], by[b])}, FD-b train "
                         f"{paired_text(by[a], by[b], 'fd_train_b')}" for a, b in pairs if a in by and b in by]
    lines += ["", "Files: `docs/results/dsno/results.csv` (every row and column), `loss.csv` (training curves), "
              "`grid-*.png` (first 64 samples), `loss-curves.png`.", "",
              "![dsno samples](results/dsno/grid-dsno.png) ![dpmpp_2m 6](results/dsno/grid-dpmpp_2m-6.png) "
              "![dpmpp_2m 10](results/dsno/grid-dpmpp_2m-10.png)", "",
              "Left: the one-step student; middle and right: DPM-Solver++(2M) at NFE 6 and 10 on the same seeds.", "",
              "![loss curves](results/dsno/loss-curves.png)", ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", default=None, help="run folder of the main student (default: train it with the defaults)")
    parser.add_argument("--ablation-steps", type=int, default=300)
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help="comma list of " + ", ".join(ABLATIONS) + " (empty: none)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--no-ref", action="store_true", help="skip the Heun-255 reference solve (no ref-RMSE column)")
    parser.add_argument("--ship", action="store_true", help="copy the main student and its table to checkpoints/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    DOCS.mkdir(parents=True, exist_ok=True)
    main_run = Path(args.main) if args.main else train("main", [], OUT / "main")
    runs = {"dsno": main_run}
    for name in [a for a in args.ablations.split(",") if a]:
        steps = round(args.ablation_steps * STEP_FACTOR.get(name, 1.0))
        runs[f"ablation {name}"] = train(name, [*ABLATIONS[name], f"steps={steps}"], OUT / name)
    if args.ship:
        shutil.copyfile(main_run / "dsno-edm.safetensors", REPO / "checkpoints" / "dsno-digits.safetensors")
        (REPO / "checkpoints" / "tables").mkdir(exist_ok=True)
        table = SolverTable.load(str(main_run / "dsno-edm-1nfe.safetensors"))
        table.metadata["student"] = "checkpoints/dsno-digits.safetensors"
        table.save(str(REPO / "checkpoints" / "tables" / "dsno-digits-1nfe.safetensors"))

    cfg = compose_config(["method=dsno", "model=edm", "out_dir=/tmp"])
    model = load_model(cfg.model, "cpu")
    judge = Judge.for_model(cfg.model, model.shape, "cpu")
    seeds = list(range(args.n))
    ref = None if args.no_ref else reference_solve(model, 80.0, 0.002, seeds, ReferenceCache(str(REPO / "outputs/.cache/references")))
    x1 = 80.0 * torch.randn(16, *model.shape, generator=torch.Generator().manual_seed(0))
    teacher_flops = flops_per_sample(lambda x: model.denoiser(x, torch.full((x.shape[0],), 80.0)), x1)
    rows: list[dict[str, Any]] = []
    grids: dict[str, torch.Tensor] = {}
    for solver in CLASSIC:
        for nfe in (6, 10):
            table = baselines.build(solver, nfe, sigma_min=0.002, sigma_max=80.0)
            r = evaluate(model.denoiser, table, judge=judge, shape=model.shape, seeds=seeds, reference=ref, dtype=model.dtype)
            grids[f"{solver}-{nfe}"] = r.pop("samples")[:64]
            rows.append({"method": f"{solver}-{nfe}", **r, "mflop": nfe * teacher_flops / 1e6, "teacher_forwards": float(nfe)})
            print(f"{solver}-{nfe}: FD {r['fd_train_main']:.3g}", flush=True)
    for label, run in runs.items():
        student_path, table_path = run / "dsno-edm.safetensors", run / "dsno-edm-1nfe.safetensors"
        den = load_denoiser(str(student_path))
        table = SolverTable.load(str(table_path), fingerprint=den.fingerprint())
        config, meta = read_net_header(str(student_path))
        r = evaluate(den, table, judge=judge, shape=model.shape, seeds=seeds, reference=ref, dtype=model.dtype)
        grids[label.replace("ablation ", "ablation-")] = r.pop("samples")[:64]
        flops = flops_per_sample(lambda x: den(x, torch.full((x.shape[0],), 80.0)), x1)
        rows.append({"method": label, **r, "mflop": flops / 1e6, "teacher_forwards": flops / teacher_flops,
                     "M": len(config["sigmas"]), "modes": config["modes"], "temporal": config["temporal"],
                     "steps": meta.get("global_step"), "train_seconds": meta.get("train_seconds"),
                     "data_seconds": (meta.get("data") or {}).get("seconds")})
        print(f"{label}: FD {r['fd_train_main']:.3g}", flush=True)

    order = [f"{s}-6" for s in CLASSIC] + ["dsno"] + [f"{s}-10" for s in CLASSIC] + [k for k in runs if k != "dsno"]
    rows.sort(key=lambda r: order.index(r["method"]))
    write_results([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], str(DOCS))
    os.remove(DOCS / "results.json") if (DOCS / "results.json").exists() else None
    for name, x in grids.items():
        if name in ("dsno", "dpmpp_2m-6", "dpmpp_2m-10") or name.startswith("ablation"):
            write_png_grid(x.clamp(-1, 1), str(DOCS / f"grid-{name}.png"))
    curves = {label: loss_log(run) for label, run in runs.items()}
    with open(DOCS / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "l1_last_time"])
        for label, pts in curves.items():
            w.writerows([label, s, f"{v:.5g}"] for s, v in pts)
    plot_losses(curves, DOCS / "loss-curves.png")
    notes_path = DOCS / "notes.md"
    meta = {"argv": " ".join(sys.argv[1:]), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "fingerprint": model.fingerprint, "n": args.n}
    text = markdown(rows, meta, notes_path.read_text() if notes_path.is_file() else "")
    (REPO / "docs" / "results-dsno.md").write_text(text)
    print(f"wrote docs/results-dsno.md and {DOCS}", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
