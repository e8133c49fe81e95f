"""Fit cost against quality, side by side in one run: each learner's wall seconds of fitting and the FD of its table.

    python scripts/bench_fit.py                 # NFE 4 5 6 on the digits teacher -> docs/results/bench/fit.csv
    python scripts/bench_fit.py --nfe 4 --ddss-steps 100

For each NFE, in this order and in fresh processes (the command-line tools, as a user runs them): LD3 (UniPC base),
IIA over the LD3 table, DDSS (kid+match) from the LD3 table, and IIA over Euler (the default IIA, for scale). Fit time
is the wall time of the command (model loading included; a chained method's total includes the LD3 fit it starts
from). Quality: FD against the training and held-out digits and FD-b on 2,000 evaluation seeds, and the paired
difference to LD3 at the same NFE.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from optimize.cli import compose_config
from optimize.evaluation.evaluate import Judge, evaluate, load_model
from optimize.recipes import ddss_args, run_cli, write_bench_results
from optimize.evaluation.report import diff_text, pm
from optimize.evaluation.results import paired
from samplers import SolverTable

REPO = Path(__file__).resolve().parents[1]
KEYS = ("fd_train_main", "fd_heldout_main", "fd_train_b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--ddss-steps", type=int, default=150)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    started = time.perf_counter()
    work = REPO / "outputs" / "bench-fit"
    fits: list[tuple[int, str, Path, float]] = []
    for nfe in args.nfe:
        run = work / f"nfe{nfe}"
        t_ld3 = run_cli(["ld3", "model=edm", f"nfe={nfe}", "base=unipc", "evaluate=false"], run / "ld3")
        ld3 = run / "ld3" / f"ld3-unipc-edm-nfe{nfe}.safetensors"
        fits.append((nfe, "ld3-unipc", ld3, t_ld3))
        t = run_cli(["iia", "model=edm", f"nfe={nfe}", f"base=table:{ld3}", "evaluate=false"], run / "iia-ld3")
        fits.append((nfe, "iia(ld3)", run / "iia-ld3" / f"iia-generic-ld3-unipc-edm-nfe{nfe}.safetensors", t_ld3 + t))
        t = run_cli(ddss_args("edm", nfe, ld3, args.ddss_steps), run / "ddss")
        fits.append((nfe, "ddss-kid+match(ld3)", run / "ddss" / f"ddss-full-kid-match-nfe{nfe}.safetensors", t_ld3 + t))
        t = run_cli(["iia", "model=edm", f"nfe={nfe}", "evaluate=false"], run / "iia-euler")
        fits.append((nfe, "iia(euler)", run / "iia-euler" / f"iia-generic-edm-nfe{nfe}.safetensors", t))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = compose_config(["method=evaluate", "model=edm"])
    m = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, m.shape, n_boot=int(cfg.n_boot))
    seeds = list(range(args.n))
    scored = []
    for nfe, label, path, seconds in fits:
        r = evaluate(m.denoiser, SolverTable.load(str(path), fingerprint=m.fingerprint), judge=judge, shape=m.shape,
                     seeds=seeds, dtype=m.dtype)
        r.pop("samples")
        scored.append((nfe, label, seconds, r))
    rows, lines = [], []
    for nfe, label, seconds, r in scored:
        ld3 = next(x for n, lab, _, x in scored if n == nfe and lab == "ld3-unipc")
        ld3_seconds = next(s for n, lab, s, _ in scored if n == nfe and lab == "ld3-unipc")
        row = {"nfe": nfe, "method": label, "fit_seconds": round(seconds, 1), "fit_vs_ld3": round(seconds / ld3_seconds, 2)}
        for k in KEYS:
            row[k], row[k.replace("fd_", "fd_se_")] = round(r[k], 3), round(r[k.replace("fd_", "fd_se_")], 3)
            d, se = (0.0, 0.0) if r is ld3 else paired(r, ld3, k)
            row[f"d_{k}_vs_ld3"], row[f"d_{k}_vs_ld3_se"] = round(d, 3), round(se, 3)
        rows.append(row)
        lines.append(f"NFE {nfe:>2} {label:<20} fit {seconds:7.1f} s ({row['fit_vs_ld3']:.2f} x LD3)  "
                     + "  ".join(f"{k} {pm(r, k)}" + ("" if r is ld3 else f" [{diff_text(*paired(r, ld3, k))}]") for k in KEYS))
    print("\n".join(lines))
    write_bench_results("fit", rows, started, n=args.n, ddss_steps=args.ddss_steps)


if __name__ == "__main__":
    main()
