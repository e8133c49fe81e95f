"""Every method on the patches teacher (model=patches, 3x32x32), same seeds -> docs/results-patches.md.

    python scripts/results_patches.py --learn                  # tuned classics, IIA fits, DDSS runs -> docs/results/patches/tables
    python scripts/results_patches.py --sample-only --shard 0 2 # fill the sample cache (every 2nd job from 0), no scoring
    python scripts/results_patches.py                          # score every row, write the CSVs, grids and the page
    python scripts/results_patches.py --render-only            # rewrite the page from the CSVs

Rows, all on evaluation seeds 0..n-1 (paired): the classic solvers (karras rho 7, sigma 0.002..80) at NFE 4..50 (a grid
cut to the CPU budget of a shared 2-core machine: every solver at NFE 4 and 8, dpmpp_2m and unipc at 16 = 2 x 8,
dpmpp_2m at 10 and 50, heun at 9), the
converged teacher (DPM-Solver++(2M) at NFE 50, checked against DPM-Solver++(3M) at NFE 30), tuned DPM-Solver++(2M) (rho x sigma_min
on the tuning seeds, ``optimize.evaluate.tune``), IIA (the project's default: generic directions, trajectory target,
over euler; fitted on seeds 2,000,000+), DDSS (ggdm from euler, ``python -m optimize ddss model=patches`` with the CPU
settings below; selects on seeds 3,000,000+ against the training patches with the first feature net) and TADA
(detail 1). Reference points: fresh training-region crops and the validation patches scored like samples (the real
floor). ``--learn`` writes every learned or tuned table to docs/results/patches/tables/ (commit them); the scoring run
only evaluates tables. Samples are cached by model fingerprint, table hash and seeds (``results_tada.cached_draw``), so
a rerun only re-scores. No ref-RMSE: a Heun-255 reference solve of 2,000 samples costs more CPU than this page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from optimize import data  # noqa: E402
from optimize.cli import compose_config  # noqa: E402
from optimize.evaluate import Judge, load_model, read_results, save_samples, write_results  # noqa: E402
from optimize.metrics import ReferenceCache  # noqa: E402
from optimize.report import NOTE, best, diff_text, fmt, pivot, pm, table  # noqa: E402
from optimize.results import add_paired_columns, plot_quality, public, write_csv  # noqa: E402
from optimize.seeds import FIT_SEED_OFFSET  # noqa: E402
from results_tada import cached_draw, table_hash  # noqa: E402
from samplers import SolverTable, baselines  # noqa: E402
from samplers.images import write_png_grid  # noqa: E402

OUT = REPO / "docs" / "results" / "patches"
TABLES = OUT / "tables"
PAGE = REPO / "docs" / "results-patches.md"
CLASSIC = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
# NFEs per classic solver (a CPU budget: every solver where the learned tables are compared, at N and 2N)
CLASSIC_NFES = {
    "dpmpp_2m": [4, 8, 10, 16, 50],
    "unipc": [4, 8, 16],
    "dpmpp_3m": [4, 8, 30],
    "ipndm": [4, 8],
    "euler": [4, 8],
    "heun": [9],
}
CONVERGED = ("dpmpp_2m", 50)     # the converged teacher
CONVERGED_CHECK = ("dpmpp_3m", 30)  # a second, different solve: the two must agree within noise
PRIORITY_NFES = [50, 4, 8, 16, 10, 30, 9]  # sampling order: what the goals need first
LEARN_NFES = [4, 8]
KEYS = ("fd_train_main", "fd_heldout_main", "fd_train_b")
NAMES = {"fd_train_main": "FD train", "fd_heldout_main": "FD held-out", "fd_train_b": "FD-b train", "kid_train_main": "KID train"}
GRID_NFES = (4, 8)


# --- learning (tables committed under docs/results/patches/tables) ---------------------------------
def learn_tuned(nfes: list[int], tune_n: int) -> None:
    """Tuned DPM-Solver++(2M): rho x sigma_min grid on the tuning seeds, lowest FD against the training patches."""
    from optimize.evaluate import tune

    cfg = compose_config(["method=evaluate", "model=patches", "out_dir=.", f"tune_n={tune_n}", "tune_end=[zero]"])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape, n_boot=0)
    for nfe in nfes:
        t0 = time.perf_counter()
        tab, info = tune(cfg, model, judge, "dpmpp_2m", nfe)
        tab.metadata.update({"method": "dpmpp_2m+tuned", "model": "patches", "model_fingerprint": model.fingerprint,
                             "tune": info, "tune_n": tune_n, "tune_seconds": round(time.perf_counter() - t0, 1)})
        tab.save(str(TABLES / f"tuned-dpmpp_2m-nfe{nfe}.safetensors"))
        print(f"tuned dpmpp_2m nfe={nfe}: {info} in {time.perf_counter() - t0:.0f} s", flush=True)


def learn_iia(nfes: list[int], n_fit: int) -> None:
    """IIA with the project's defaults over euler (what ``python -m optimize iia model=patches nfe=N n_fit=...`` fits)."""
    from optimize import iia

    cfg = compose_config(["method=evaluate", "model=patches", "out_dir=."])
    model = load_model(cfg.model)
    for nfe in nfes:
        base = baselines.build("euler", nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
        t0 = time.perf_counter()
        fitted = iia.fit(model.denoiser, base, model.shape, n_fit=n_fit, substeps=8, seed=FIT_SEED_OFFSET, variant="generic",
                         target="trajectory", fine_solver="heun", dtype=model.dtype)
        fitted.metadata.update({"method": "iia", "model": "patches", "model_fingerprint": model.fingerprint,
                                "fit_seconds": round(time.perf_counter() - t0, 1), "n_fit": n_fit})
        fitted.save(str(TABLES / f"iia-euler-nfe{nfe}.safetensors"))
        print(f"iia euler nfe={nfe}: fitted in {time.perf_counter() - t0:.0f} s", flush=True)


def learn_ddss(nfes: list[int], settings: list[str]) -> None:
    """DDSS (ggdm from euler) through the CLI, one process per NFE, copied with its plots to TABLES."""
    for nfe in nfes:
        run = REPO / "outputs" / "results-patches" / f"ddss-ggdm-nfe{nfe}"
        over = ["ddss", "model=patches", f"nfe={nfe}", "family=ggdm", "init=euler", "evaluate_at_end=false", "progress_bar=false",
                f"hydra.run.dir={run}", *settings]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optimize", *over], cwd=REPO, check=True)
        print(f"ddss nfe={nfe}: {time.perf_counter() - t0:.0f} s ({' '.join(settings)})", flush=True)
        stem = f"ddss-ggdm-nfe{nfe}"
        for suffix in (".safetensors", "-sigmas.png", "-coef.png"):
            if (run / f"{stem}{suffix}").is_file():
                shutil.copyfile(run / f"{stem}{suffix}", TABLES / f"{stem}{suffix}")


# --- jobs, sampling and scoring ----------------------------------------------------------------------
def jobs(cfg: Any, fingerprint: str) -> list[tuple[str, SolverTable, dict[str, Any]]]:
    """(label, table, extra columns): classic solvers, TADA, then every committed table."""
    sched = {"sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max)}
    out = [(s, baselines.build(s, n, **sched), {"kind": "classic"}) for n in PRIORITY_NFES for s, nfes in CLASSIC_NFES.items()
           if n in nfes]
    out += [("tada", baselines.build("tada", n, **sched), {"kind": "tada"}) for n in LEARN_NFES]
    kinds = {"tuned": ("dpmpp_2m+tuned", "tuned"), "iia": ("iia (euler, default)", "learned"), "ddss": ("ddss-ggdm", "learned")}
    for path in sorted(TABLES.glob("*.safetensors")):
        t = SolverTable.load(str(path), fingerprint=fingerprint)
        label, kind = kinds[path.name.split("-")[0]]
        meta = t.metadata
        out.append((label, t, {"kind": kind, "table": os.path.relpath(path, REPO),
                               "learn_seconds": meta.get("fit_seconds", meta.get("train_seconds", meta.get("tune_seconds"))),
                               "steps": meta.get("steps"), "tune": json.dumps(meta["tune"]) if "tune" in meta else None}))
    return out


def reference_rows(judge: Judge) -> list[dict[str, Any]]:
    """Real patches scored like samples: fresh training-region crops (seed 3, not the judge's seed-1 set) and the
    validation patches; their FD to the training and held-out sets is the floor a perfect sampler would reach."""
    rows = []
    for label, x in (("real: fresh training crops (2,000, seed 3)", data.patches("train", 2000, seed=3)),
                     ("real: validation patches (2,000)", data.patches("validation"))):
        rows.append({"method": label, "model": "patches", "nfe": 0, "kind": "real", **judge.score(x), "seconds": 0.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="evaluation samples (seeds 0..n-1)")
    ap.add_argument("--learn", nargs="*", default=None, choices=["tuned", "iia", "ddss"], help="learn these (default: all three)")
    ap.add_argument("--learn-nfe", type=int, nargs="+", default=LEARN_NFES)
    ap.add_argument("--tune-n", type=int, default=250)
    ap.add_argument("--n-fit", type=int, default=256)
    ap.add_argument("--ddss", nargs="*", default=["steps=100", "batch_size=32", "n_val=250", "val_every=25", "max_minutes=null"],
                    metavar="KEY=VALUE", help="DDSS settings (CPU budget)")
    ap.add_argument("--sample-only", action="store_true")
    ap.add_argument("--shard", type=int, nargs=2, default=[0, 1], metavar=("I", "N"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-timing", action="store_true", help="no separate uncached timing of one evaluation")
    ap.add_argument("--n-boot", type=int, default=None, help="FD bootstrap replicates (default: conf n_boot, 200)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--cached-only", action="store_true", help="score only the classic rows whose samples are cached (a CPU budget)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.render_only:
        PAGE.write_text(render(read_results(str(OUT / "results.csv")), read_results(str(OUT / "reference.csv")), args))
        return
    TABLES.mkdir(parents=True, exist_ok=True)
    if args.learn is not None:
        what = args.learn or ["tuned", "iia", "ddss"]
        for w in what:
            {"tuned": lambda: learn_tuned(args.learn_nfe, args.tune_n), "iia": lambda: learn_iia(args.learn_nfe, args.n_fit),
             "ddss": lambda: learn_ddss(args.learn_nfe, args.ddss)}[w]()
        return
    cfg = compose_config(["method=evaluate", "model=patches", f"out_dir={OUT}"])
    model = load_model(cfg.model)
    seeds = list(range(args.n))
    samples_cache = ReferenceCache(str(REPO / "outputs" / ".cache" / "patches-samples"))
    work = jobs(cfg, model.fingerprint)
    if args.sample_only:
        i, k = args.shard
        for label, t, _ in work[i::k]:
            t0 = time.perf_counter()
            cached_draw(model, samples_cache, label, t, seeds)
            print(f"sampled {label} nfe={t.nfe} in {time.perf_counter() - t0:.0f} s", flush=True)
        return
    judge = Judge.for_model(cfg.model, model.shape, n_boot=int(args.n_boot or cfg.n_boot))
    t0 = time.perf_counter()
    refs = reference_rows(judge)
    print(f"reference rows scored in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    grids = OUT / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    write_png_grid(data.patches("heldout", 36), str(grids / "real-heldout.png"), scale=3)
    skipped = []
    for label, t, info in reversed(work):  # from the last job: a concurrent --sample-only run fills from the first
        t0 = time.perf_counter()
        key = samples_cache.key(model.fingerprint, f"{label.replace(' ', '-')}-{table_hash(t)}", t.nfe, seeds, model.shape, model.dtype)
        if args.cached_only and info["kind"] == "classic" and not os.path.isfile(samples_cache.path(key)):
            skipped.append(f"{label}@{t.nfe}")
            continue
        x = cached_draw(model, samples_cache, label, t, seeds)
        t1 = time.perf_counter()
        r = judge.score(x)
        rows.append({"method": label, "model": "patches", "nfe": t.nfe, "n": len(seeds), "ref_rmse": None, **info, **r, "score_seconds": round(time.perf_counter() - t1, 1)})
        if t.nfe in GRID_NFES or (label, t.nfe) == CONVERGED:
            write_png_grid(x[:36].clamp(-1, 1), str(grids / f"{label.split(' ')[0]}-nfe{t.nfe}.png"), scale=3)
        print(f"{label:22s} nfe={t.nfe:2d} FD {pm(rows[-1], 'fd_train_main')} held {pm(rows[-1], 'fd_heldout_main')} "
              f"b {pm(rows[-1], 'fd_train_b')} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows.reverse()
    if skipped:
        print(f"not sampled (CPU budget): {', '.join(skipped)}", flush=True)
    timing = {} if args.skip_timing else time_one_table(model, judge, seeds)
    compare(rows, refs)
    write_results(rows, str(OUT), cfg)
    write_csv([public(r) for r in refs], str(OUT / "reference.csv"))
    if timing:
        write_csv([timing], str(OUT / "timing.csv"))
    feats = []
    for name in ("features-patches", "features-patches-b"):
        m = _meta(f"checkpoints/{name}.safetensors")
        feats.append({"file": f"checkpoints/{name}.safetensors", "arch": m["config"].get("arch"), "n_heldout": 2000,
                      **{f"heldout_{k}": v for k, v in m["heldout"].items()}, **{f"train_{k}": v for k, v in m["train_first_2000"].items()},
                      "train_seconds": m.get("train_seconds")})
    write_csv(feats, str(OUT / "features.csv"))
    plot_quality([r for r in rows if r["kind"] != "real"], str(OUT / "quality-vs-nfe.png"))
    PAGE.write_text(render(rows, refs, args))
    print(f"wrote {PAGE}")


def time_one_table(model: Any, judge: Judge, seeds: list[int]) -> dict[str, Any]:
    """Wall seconds of one full evaluation (sampling 2,000 + scoring) of dpmpp_2m at NFE 10, uncached."""
    from optimize.evaluate import evaluate

    t = baselines.build("dpmpp_2m", 10)
    t0, c0 = time.perf_counter(), time.process_time()
    r = evaluate(model.denoiser, t, judge=judge, shape=model.shape, seeds=seeds, dtype=model.dtype)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"table": "dpmpp_2m nfe 10", "n": len(seeds), "n_boot": judge.n_boot, "sampling_seconds": round(r["seconds"], 1),
            "total_seconds": round(total, 1), "process_cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def compare(rows: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    """Stored paired differences: every row vs the best classic at its NFE (``_best``) and at 2 x NFE (``_2n``), the
    converged teacher vs the real floor and vs its check solve, and every row vs the converged teacher (``_conv``)."""
    classic = lambda r: r["kind"] == "classic"  # noqa: E731
    conv = next(r for r in rows if (r["method"], r["nfe"]) == CONVERGED)
    add_paired_columns([r for r in rows if r is not conv], conv, KEYS, "conv")
    add_paired_columns(refs, conv, KEYS, "conv")
    for nfe in sorted({int(r["nfe"]) for r in rows}):
        mine = [r for r in rows if r["nfe"] == nfe]
        base = best(mine, "fd_train_main", classic)
        double = best(rows, "fd_train_main", lambda r: classic(r) and r["nfe"] == 2 * nfe)
        if base is not None:
            add_paired_columns(mine, base, KEYS, "best")
            for r in mine:
                r["best_classic"] = base["method"]
        if double is not None:
            add_paired_columns(mine, double, KEYS, "2n")
            for r in mine:
                r["best_classic_2n"] = double["method"]


# --- the page ------------------------------------------------------------------------------------------
def _d(r: dict[str, Any], key: str, tag: str) -> str:
    d, se = r.get(f"d{key}_{tag}"), r.get(f"d{key}_{tag}_se")
    return "-" if d is None or se is None else diff_text(d, se)


def _meta(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(REPO / path), framework="pt") as f:
        header = f.metadata() or {}
    return {**json.loads(header.get("metadata", "{}")), "config": json.loads(header.get("config", "{}"))}


def render(rows: list[dict[str, Any]], refs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    teacher = _meta("checkpoints/edm-patches.safetensors")
    fa, fb = _meta("checkpoints/features-patches.safetensors"), _meta("checkpoints/features-patches-b.safetensors")
    timing = read_results(str(OUT / "timing.csv"))[0] if (OUT / "timing.csv").is_file() else {}
    conv = next(r for r in rows if (r["method"], int(r["nfe"])) == CONVERGED)
    check = next((r for r in rows if (r["method"], int(r["nfe"])) == CONVERGED_CHECK), None)
    d10 = next(r for r in rows if (r["method"], int(r["nfe"])) == ("dpmpp_2m", 10))
    chance = {"photo": 1 / 8, "cell": 1 / 16, "rotation": 1 / 4}
    acc = lambda m: ", ".join(f"{k.replace('_accuracy', '')} {v:.1%} (chance {chance[k.replace('_accuracy', '')]:.1%})"  # noqa: E731
                              for k, v in m["heldout"].items())
    lines = [
        "# Every method on the patches teacher (3x32x32 natural-image patches)\n",
        f"Generated by `python scripts/results_patches.py` on {datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPUs "
        f"shared with other jobs, torch {torch.__version__}); numbers: `docs/results/patches/results.csv` (every row), "
        "`reference.csv` (real-data rows), `timing.csv`, `features.csv` (feature-net probe accuracies); learned and tuned tables: `docs/results/patches/tables/` "
        "(`python -m optimize evaluate model=patches table=PATH` re-evaluates one); sample grids: `docs/results/patches/grids/` "
        "(36 samples each, seeds 0..35, 3x upscaled).\n",
        "**Data** (`optimize.data.patches`): 32x32 RGB crops of the 8 colour photographs in the scikit-image wheel "
        "(astronaut, coffee, chelsea, rocket, motorcycle_left, hubble_deep_field at 1/2, immunohistochemistry, retina at 1/3; "
        "no download). Each photograph is cut into 64x64 blocks; a fixed permutation gives 15% of its blocks to held-out, 15% "
        "to validation, the rest to train, and a crop belongs to a region only when all its pixels do, so the regions share "
        "no pixel (tested). Training: random crops with random flips; held-out and validation: fixed sets of 2,000 crops with "
        "fixed flips. The judge's training reference is 2,000 training-region crops (seed 1); the teacher trained on others (seed 0).\n",
        f"**Teacher** (`checkpoints/edm-patches.safetensors`, `python -m optimize teacher model=patches`): EDM-preconditioned "
        f"U-Net {teacher['config'].get('channels')} channels x {teacher['config'].get('channel_mult')}, "
        f"{teacher.get('steps')} steps of batch {teacher.get('batch_size')} on {teacher.get('n_data')} crops, EMA 0.999, "
        f"{float(teacher.get('train_seconds') or 0) / 60:.0f} minutes of training wall time on this CPU (1 thread, shared with other "
        "engineers' jobs at load average 4-8). Its samples (grids below) are colour-and-texture blotches with few of the "
        "edges and flat regions of the real patches: a small, short-trained teacher, far from the real floor.\n",
        f"**Feature nets** (`scripts/train_classifiers.py patches`, trained on 20,000 training-region crops only): `main` = "
        f"`features-patches.safetensors` (VGG-style CNN, heads: source photograph and 4x4 position cell; held-out accuracy "
        f"{acc(fa)}), `b` = `features-patches-b.safetensors` (strided convs, per-channel mean/std beside the "
        f"flattened map, heads: rotation of the input and photograph; held-out {acc(fb)}). Only the photograph heads "
        "generalise to the unseen regions; the position and rotation targets stay at or near chance there. FD/KID use their 128-d penultimate "
        "features; `main` is the one DDSS trains and selects on, `b` is never seen by any learner.\n",
        NOTE + f" FD standard errors here use {fmt(timing.get('n_boot', 200))} bootstrap replicates.\n",
        f"**Samples.** Every generated row has {int(rows[0]['n']):,} samples from seeds 0..{int(rows[0]['n']) - 1} (paired across rows); "
        "the real rows and both reference sets have 2,000 patches each. The issue asks for 2,000 generated samples; on this "
        "2-core machine, shared with other engineers' jobs, one network evaluation of 2,000 samples took about 22 s of "
        "wall time (dpmpp_2m at NFE 50: 1,113 s for 2,000 samples, about 22% of one core), so the page uses 1,000 to fit "
        "the time; intervals are correspondingly wider.\n",
        "**What is independent of what.** Reported rows use only seeds 0..n-1. Tuning uses seeds 1,000,000+ against the "
        "training patches (main net), IIA fits seeds 2,000,000+ against a fine solve (no data, no feature net), DDSS trains "
        "on KID against the training patches (main net) and selects on seeds 3,000,000+ against the training patches: "
        "*FD held-out* and *FD-b* are outside every learner's objective. The 'best classic' at each NFE is picked on the "
        "evaluation seeds themselves (which favours the baseline). No ref-RMSE column: a 255-step reference solve of 2,000 "
        "samples costs more CPU than this page had.\n",
    ]
    # reference points
    body = []
    for r in [*refs, conv, *([check] if check else [])]:
        body.append([r["method"] + ("" if r["kind"] == "real" else f" (NFE {int(r['nfe'])})"), *[pm(r, k) for k in KEYS],
                     pm(r, "kid_train_main"), "(converged)" if r is conv else _d(r, "fd_train_main", "conv"),
                     "" if r is conv else _d(r, "fd_heldout_main", "conv")])
    lines += ["## Reference points\n", table(["rows", *[NAMES[k] for k in KEYS], "KID train", "Δ FD train vs converged",
                                               "Δ FD held-out vs converged"], body),
              f"\nThe converged teacher is {CONVERGED[0]} at NFE {CONVERGED[1]}"
              + (f"; {CONVERGED_CHECK[0]} at NFE {CONVERGED_CHECK[1]} (another solver, same noise) is the check that it has "
                 "converged" if check else f" (the check against {CONVERGED_CHECK[0]} at NFE {CONVERGED_CHECK[1]} did not fit the CPU budget)")
              + ". The real rows are the floor: "
              "fresh training crops against the training reference show the metric's sampling noise, the held-out columns "
              "include the shift between image regions.\n"]
    if check is not None:
        lines.append(f"The check differs from the converged row by {fmt(check.get('dfd_train_main_conv'))} ± "
                     f"{fmt(check.get('dfd_train_main_conv_se'), 2)} in FD train (paired): beyond noise, but about 2% of it and "
                     "small beside the differences between samplers below.\n")
    lines += ["## Goal 1: does NFE 10 still matter here?\n",
              f"DPM-Solver++(2M) at NFE 10 minus the converged teacher (paired, same seeds): FD train "
              f"{_d(d10, 'fd_train_main', 'conv')}, FD held-out {_d(d10, 'fd_heldout_main', 'conv')}, FD-b "
              f"{_d(d10, 'fd_train_b', 'conv')}.\n",
              "**The goal is not met, in the opposite direction:** NFE 10 is not worse than the converged teacher, it is "
              "better beyond the uncertainty, on every column. FD is not monotone in NFE for this teacher (dpmpp_2m: NFE 8, "
              "10, 16, 50 in the table below): the truncation error of a coarse solver smooths the samples, and that smoothing "
              "brings this under-trained teacher's blotchy samples closer to the real patches in both feature spaces than its "
              "exact ODE solution is. NFE 10 still matters here (the samples differ beyond noise), but 'closer to the "
              "converged teacher' and 'better FD' are different things on this testbed, so FD rankings between NFE 8 and "
              "50 reward smoothing, not accuracy; a reference-RMSE column (distance to the converged solve) would be the "
              "measure of solver accuracy and did not fit the CPU budget.\n"]
    # classic grid
    nfes = sorted({int(r["nfe"]) for r in rows})
    classic = [r for r in rows if r["kind"] == "classic"]
    lines += ["## Classic solvers\n", "FD against the training patches (main features):\n", pivot(classic, "fd_train_main", nfes),
              "\nFD against the held-out patches (main features):\n", pivot(classic, "fd_heldout_main", nfes),
              "\nFD-b against the training patches (second feature net):\n", pivot(classic, "fd_train_b", nfes),
              "\nPlot: `docs/results/patches/quality-vs-nfe.png`.\n"]
    # learned vs classic
    learned = [r for r in rows if r["kind"] != "classic"]
    body = []
    for r in sorted(learned, key=lambda r: (int(r["nfe"]), r["method"])):
        body.append([str(int(r["nfe"])), r["method"], *[pm(r, k) for k in KEYS], r.get("best_classic") or "-",
                     *[_d(r, k, "best") for k in KEYS], r.get("best_classic_2n") or "-", *[_d(r, k, "2n") for k in KEYS]])
    lines += ["## Learned, tuned and TADA tables vs the best classic at N and at 2N\n",
              "Δ = row - best classic (by FD train on these seeds) at the same NFE, then at twice the NFE; paired.\n",
              table(["NFE", "method", *[NAMES[k] for k in KEYS], "best classic @N", *[f"Δ {NAMES[k]} @N" for k in KEYS],
                     "best classic @2N", *[f"Δ {NAMES[k]} @2N" for k in KEYS]], body, 2)]
    goal2 = []
    for nfe in LEARN_NFES:
        mine = [r for r in learned if int(r["nfe"]) == nfe and r["kind"] == "learned"]
        for r in mine:
            v = [_d(r, k, "2n") for k in KEYS]
            ok = all(not s.endswith("worse") for s in v)
            goal2.append([str(nfe), r["method"], r.get("best_classic_2n") or "-", *v, "yes" if ok else "no"])
    lines += ["\n## Goal 2: learned tables at N vs the best classic at 2N\n",
              "'at least as good' = not worse beyond 2 se on any of the three columns.\n",
              table(["NFE", "learned", "best classic @2N", *[f"Δ {NAMES[k]}" for k in KEYS], "at least as good"], goal2, 2),
              "\nNot met: at N = 4 and 8 neither IIA nor DDSS (100 CPU steps) reaches the best classic at 2N. At N = 8 the "
              "'2N' baseline (dpmpp_2m at 16) is itself worse than NFE 8 on FD (see Goal 1), so that comparison favours "
              "fewer steps and still the learned tables lose. The tuned dpmpp_2m (a schedule chosen on tuning seeds against "
              "the training patches) is the one table that beats dpmpp_2m at 2N on FD train and FD-b at N = 8 (held-out ≈); "
              "TADA (detail 1) is worse than the best classic at both NFEs. N = 6 and 10 were not run (CPU budget).\n"]
    settings = []
    for r in learned:
        if r.get("table"):
            settings.append(f"- `{r['table']}`: {r['method']} NFE {int(r['nfe'])}, {fmt(r.get('learn_seconds'))} s"
                            + (f", {int(r['steps'])} steps" if r.get("steps") else "") + (f", tuned {r['tune']}" if r.get("tune") else ""))
    lines += ["\n## Settings and cost\n",
              "Learned with `python scripts/results_patches.py --learn`: tuned dpmpp_2m (rho 3/5/7/10 x sigma_min "
              f"0.002/0.005/0.02, end zero, {args.tune_n} tuning samples per point), IIA over euler (generic, trajectory target, "
              f"Heun fine solve on the grid refined 8x, {args.n_fit} fitting noises), DDSS ggdm from euler with "
              f"`{' '.join(args.ddss)}` (the digits page uses 600 steps of batch 128: these are CPU settings). Seconds are wall "
              "time on this shared 2-core CPU:\n", "\n".join(sorted(settings)) + "\n"]
    if timing:
        lines.append(f"\nOne full evaluation (2,000 samples of dpmpp_2m at NFE 10, sampling + scoring on both feature nets and "
                     f"both reference sets): {fmt(timing.get('total_seconds'))} s, of which sampling {fmt(timing.get('sampling_seconds'))} s "
                     f"({fmt(timing.get('threads'))} thread, 1-minute load average {fmt(timing.get('load_average_1min'))} on "
                     f"{fmt(timing.get('cpus'))} CPUs; the reference sets' features were computed before the clock started). "
                     f"The process used {fmt(timing.get('process_cpu_seconds'))} s of CPU: on two uncontended cores one "
                     "evaluation fits the 2-minute goal, on this shared machine it took "
                     f"{fmt(timing.get('total_seconds'))} s of wall time.\n")
    lines.append("\n## Sample grids\n\nReal held-out patches: `results/patches/grids/real-heldout.png`; converged teacher: "
                 f"`results/patches/grids/{CONVERGED[0]}-nfe{CONVERGED[1]}.png`; every method at NFE 4 and 8: "
                 "`results/patches/grids/<method>-nfe4.png`, `-nfe8.png`.\n")
    for nfe in GRID_NFES:
        names = sorted({r["method"].split(" ")[0] for r in rows if int(r["nfe"]) == nfe})
        lines.append(f"\nNFE {nfe}: " + ", ".join(f"[{n}](results/patches/grids/{n}-nfe{nfe}.png)" for n in names) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
