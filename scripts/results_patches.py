"""Every method on the patches teacher (model=patches, 3x32x32), same seeds -> docs/results-patches.md.

    python scripts/results_patches.py --learn                   # tuned classic, LD3 -> IIA, DDSS chain -> docs/results/patches/tables
    python scripts/results_patches.py --ship                    # pick and ship checkpoints/tables/patches-best-nfe<N>
    python scripts/results_patches.py --sample-only --shard 0 2 # fill the sample cache (every 2nd job from 0), no scoring
    python scripts/results_patches.py                           # score every row, write the CSVs, grids and the page
    python scripts/results_patches.py --render-only             # rewrite the page from the CSVs (keeps its date)
    python scripts/results_patches.py --teacher-check FILE      # record a from-scratch teacher run (time, weights), render

Rows, all on evaluation seeds 0..n-1 (paired): the classic solvers (karras rho 7, sigma 0.002..80; CLASSIC_NFES: NFE
3..50 for DPM-Solver++(2M), every NFE where a learned table is compared at N and 2N), the converged teacher
(DPM-Solver++(2M) at NFE 50, checked against DPM-Solver++(3M) at NFE 30), tuned DPM-Solver++(2M) (rho x sigma_min x end on
the tuning seeds, ``optimize.evaluation.evaluate.tune``), LD3 over UniPC (the learned peer), IIA over the LD3 table and DDSS
(every causal coefficient, from the LD3 table, KID + teacher L2; selects on seeds 3,000,000+ against the training
patches with the first feature net) as on the digits page (scripts/results_learned.py), and TADA (detail 1). Reference
points: fresh training-region crops and the validation patches scored like samples (the real floor); ref-RMSE is the
distance to a Heun solve from the same noise (REFERENCE). ``--learn`` writes every learned or tuned table to
docs/results/patches/tables/ (commit them); the scoring run only evaluates tables. Samples are cached by model
fingerprint, table hash and seeds (``optimize.recipes.cached_draw``), so a rerun only re-scores.
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

from optimize import data
from optimize.cli import compose_config
from optimize.evaluation.evaluate import Judge, Model, load_model, read_results, write_results
from optimize.evaluation.metrics import ReferenceCache, reference_rmse
from optimize.recipes import (SHIPPED, cached_draw, fit_ddss, fit_iia, fit_ld3, fit_seconds, page_date, select, ship,
                              table_hash)
from optimize.evaluation.report import NOTE, best, diff_text, fmt, pivot, pm, table
from optimize.evaluation.results import add_paired_columns, plot_quality, public, write_csv
from samplers import SolverTable, baselines
from samplers.images import write_png_grid

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "patches"
TABLES = OUT / "tables"
PAGE = REPO / "docs" / "results-patches.md"
CLASSIC = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]
# NFEs per classic solver: NFE 3..50 for the strongest multistep solvers, every NFE where a learned table is compared
# at N and at 2N (N = 4, 6, 8, 10), fewer for the weak single-step ones (a CPU budget)
CLASSIC_NFES = {
    "dpmpp_2m": [3, 4, 6, 8, 10, 12, 16, 20, 50],
    "unipc": [4, 6, 8, 10, 12, 16, 20],
    "ipndm": [4, 6, 8, 10, 12, 16, 20],
    "dpmpp_3m": [4, 8, 30],
    "euler": [4, 8],
    "heun": [9],
}
CONVERGED = ("dpmpp_2m", 50)     # the converged teacher
CONVERGED_CHECK = ("dpmpp_3m", 30)  # a second, different solve: the two must agree within noise
REFERENCE = ("heun", 79)         # the solve reference RMSE is measured against (same noise; finer than CONVERGED)
PRIORITY_NFES = [50, 10, 4, 8, 16, 30, 20, 6, 12, 3, 9]  # sampling order: what the goals need first
LEARN_NFES = [4, 6, 8, 10]
GOAL1_N = 6000  # goal 1 measured again on seeds 0..GOAL1_N-1 (its two rows only): more samples, a tighter paired interval
KEYS = ("fd_train_main", "fd_heldout_main", "fd_train_b")
NAMES = {"fd_train_main": "FD train", "fd_heldout_main": "FD held-out", "fd_train_b": "FD-b train", "kid_train_main": "KID train"}
GRID_NFES = (4, 8)
# how the shipped teacher was trained (its file records the steps and the seconds of the last, resumed, leg only)
TEACHER_TIME = ("Trained as one deterministic run in two legs (a resumed run continues exactly as the uninterrupted one, "
                "``optimize.methods.teacher``): steps 0-3,500 in 44 minutes on a CPU shared with other jobs (1 thread), steps 3,500-15,000 "
                "in 2,270 s on 2 threads (0.197 s per step, the file's train_seconds); at that rate the whole run from scratch "
                "takes about 49 minutes on 2 uncontended cores.")
DSNO_SETTINGS = ["n_data=2048", "steps=300", "batch_size=64", "max_minutes=20"]  # the digits default: 8192, 1000, 128
DSNO_DIR = OUT / "dsno"  # the DSNO student (a network file) and its 1-NFE table
# committed tables by file-name prefix: (row label, kind); 'peer' = the learned-peer baseline (LD3)
TABLE_KINDS = {"tuned": ("dpmpp_2m+tuned", "tuned"), "ld3": ("ld3-unipc", "peer"), "iia": ("iia(ld3)", "learned"),
               "ddss": ("ddss-kid+match(ld3)", "learned")}


# --- learning (tables committed under docs/results/patches/tables) ---------------------------------
def learn_tuned(nfes: list[int], tune_n: int) -> None:
    """Tuned DPM-Solver++(2M): rho x sigma_min grid on the tuning seeds, lowest FD against the training patches."""
    from optimize.evaluation.evaluate import tune

    cfg = compose_config(["method=evaluate", "model=patches", "out_dir=.", f"tune_n={tune_n}", "tune_end=[zero,sigma_min]"])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape, n_boot=0)
    for nfe in nfes:
        t0 = time.perf_counter()
        tab, info = tune(cfg, model, judge, "dpmpp_2m", nfe)
        tab.metadata.update({"method": "dpmpp_2m+tuned", "model": "patches", "model_fingerprint": model.fingerprint,
                             "tune": info, "tune_n": tune_n, "tune_seconds": round(time.perf_counter() - t0, 1)})
        tab.save(str(TABLES / f"tuned-dpmpp_2m-nfe{nfe}.safetensors"))
        print(f"tuned dpmpp_2m nfe={nfe}: {info} in {time.perf_counter() - t0:.0f} s", flush=True)


def learn_chain(nfes: list[int], ddss_steps: int, ddss_settings: list[str]) -> None:
    """The digits page's recipe (``optimize.recipes``), run through the CLI like a user would: LD3 over UniPC
    (the learned peer), IIA over that LD3 table, DDSS (every causal coefficient) from it with KID + teacher L2."""
    for nfe in nfes:
        t0 = time.perf_counter()
        ld3 = fit_ld3("patches", nfe, "unipc", TABLES)
        print(f"ld3 nfe={nfe}: {time.perf_counter() - t0:.0f} s", flush=True)
        fit_iia("patches", nfe, ld3, TABLES)
        print(f"iia(ld3) nfe={nfe}: {time.perf_counter() - t0:.0f} s", flush=True)
        fit_ddss("patches", nfe, ld3, TABLES, ddss_steps, tuple(ddss_settings))
        print(f"ddss(ld3) nfe={nfe}: {time.perf_counter() - t0:.0f} s", flush=True)


def learn_dsno(settings: list[str]) -> None:
    """DSNO through the CLI (``python -m optimize dsno model=patches`` with ``settings``): the student network and its
    1-NFE table go to DSNO_DIR with the loss plot."""
    run = REPO / "outputs" / "results-patches" / "dsno"
    DSNO_DIR.mkdir(parents=True, exist_ok=True)
    over = ["dsno", "model=patches", "evaluate_at_end=false", "progress_bar=false", f"export={DSNO_DIR / 'dsno-patches.safetensors'}",
            f"hydra.run.dir={run}", *settings]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimize", *over], cwd=REPO, check=True)
    shutil.copyfile(run / "dsno-patches-loss.png", DSNO_DIR / "dsno-patches-loss.png")
    print(f"dsno: {time.perf_counter() - t0:.0f} s ({' '.join(settings)})", flush=True)


def ship_best(nfes: list[int], n_select: int) -> None:
    """checkpoints/tables/patches-best-nfe<N>: IIA(ld3) or DDSS, whichever has the lower FD train (main features) on
    the selection seeds 3,000,000+ (never the evaluation seeds), as for the digits teacher (``optimize.recipes.select``)."""
    cfg = compose_config(["method=evaluate", "model=patches", "out_dir=."])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape, n_boot=0)
    for nfe in nfes:
        candidates = [(label, p) for label, p in (("iia(ld3)", TABLES / f"iia-ld3-nfe{nfe}.safetensors"),
                                                   ("ddss-kid+match(ld3)", TABLES / f"ddss-match-nfe{nfe}.safetensors")) if p.is_file()]
        if candidates:
            label, path, scores = select(model, judge, nfe, n_select, candidates)
            print(f"shipped {ship(model, 'patches', nfe, label, path, scores, 'patches')}: {label}", flush=True)


# --- jobs, sampling and scoring ----------------------------------------------------------------------
def jobs(cfg: Any, fingerprint: str) -> list[tuple[str, SolverTable, dict[str, Any]]]:
    """(label, table, extra columns): classic solvers, TADA, then every committed table."""
    sched = {"sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max)}
    out = [(s, baselines.build(s, n, **sched), {"kind": "classic"}) for n in PRIORITY_NFES for s, nfes in CLASSIC_NFES.items()
           if n in nfes]
    out += [("tada", baselines.build("tada", n, **sched), {"kind": "tada"}) for n in LEARN_NFES]
    for path in sorted(TABLES.glob("*.safetensors")):
        t = SolverTable.load(str(path), fingerprint=fingerprint)
        label, kind = TABLE_KINDS[path.name.split("-")[0]]
        meta = t.metadata
        out.append((label, t, {"kind": kind, "table": os.path.relpath(path, REPO),
                               "learn_seconds": meta["tune_seconds"] if "tune_seconds" in meta else round(fit_seconds(path), 1),
                               "steps": meta.get("steps"), "tune": json.dumps(meta["tune"]) if "tune" in meta else None}))
    student_path = DSNO_DIR / "dsno-patches.safetensors"
    if student_path.is_file():
        from samplers.nets import load_denoiser

        student = load_denoiser(str(student_path))
        t = SolverTable.load(str(DSNO_DIR / "dsno-patches-1nfe.safetensors"), fingerprint=student.fingerprint())
        meta = _meta(os.path.relpath(student_path, REPO))
        m = Model("dsno", student, tuple(student.shape), student.fingerprint(), torch.float32)
        out.append(("dsno", t, {"kind": "distilled", "table": os.path.relpath(student_path, REPO), "_model": m,
                                "learn_seconds": meta.get("train_seconds"), "steps": meta.get("steps"),
                                "teacher_forwards_per_call": t.metadata.get("M")}))
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
    ap.add_argument("--learn", nargs="*", default=None, choices=["tuned", "chain", "dsno"],
                    help="learn these (default: all): the tuned classic; the LD3 -> IIA, DDSS chain; the DSNO student")
    ap.add_argument("--learn-nfe", type=int, nargs="+", default=LEARN_NFES)
    ap.add_argument("--tune-n", type=int, default=250)
    ap.add_argument("--ddss-steps", type=int, default=100)
    ap.add_argument("--ddss", nargs="*", default=["batch_size=32", "n_val=250", "val_every=25"],
                    metavar="KEY=VALUE", help="more DDSS settings (a CPU budget)")
    ap.add_argument("--dsno", nargs="*", default=DSNO_SETTINGS, metavar="KEY=VALUE", help="DSNO settings (a CPU budget)")
    ap.add_argument("--sample-only", action="store_true")
    ap.add_argument("--shard", type=int, nargs=2, default=[0, 1], metavar=("I", "N"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-timing", action="store_true", help="no separate uncached timing of one evaluation")
    ap.add_argument("--n-boot", type=int, default=None, help="FD bootstrap replicates (default: conf n_boot, 200)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--ship", action="store_true", help="select and ship checkpoints/tables/patches-best-nfe<N> (then stop)")
    ap.add_argument("--n-select", type=int, default=1000, help="selection samples for --ship (seeds 3,000,000+)")
    ap.add_argument("--goal1-n", type=int, default=GOAL1_N, help="samples for the second measurement of goal 1 (0: skip)")
    ap.add_argument("--cached-only", action="store_true", help="score only the classic rows whose samples are cached (a CPU budget)")
    ap.add_argument("--teacher-check", type=Path, default=None, metavar="FILE",
                    help="record a from-scratch teacher run's file (time, weights vs the shipped teacher), then render")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.teacher_check is not None:
        print(teacher_check(args.teacher_check), flush=True)
        args.render_only = True
    args.date = page_date(PAGE) if args.render_only else datetime.date.today().isoformat()
    if args.render_only:
        PAGE.write_text(render(read_results(str(OUT / "results.csv")), read_results(str(OUT / "reference.csv")), args))
        return
    TABLES.mkdir(parents=True, exist_ok=True)
    if args.ship:
        ship_best(args.learn_nfe, args.n_select)
        return
    if args.learn is not None:
        what = args.learn or ["tuned", "chain", "dsno"]
        for w in what:
            {"tuned": lambda: learn_tuned(args.learn_nfe, args.tune_n),
             "chain": lambda: learn_chain(args.learn_nfe, args.ddss_steps, args.ddss),
             "dsno": lambda: learn_dsno(args.dsno)}[w]()
        return
    cfg = compose_config(["method=evaluate", "model=patches", f"out_dir={OUT}"])
    model = load_model(cfg.model)
    seeds = list(range(args.n))
    samples_cache = ReferenceCache(str(REPO / "outputs" / ".cache" / "patches-samples"))
    work = jobs(cfg, model.fingerprint)
    ref_table = baselines.build(REFERENCE[0], REFERENCE[1], sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
    if args.sample_only:
        if args.shard[0] == 0:
            cached_draw(model, samples_cache, f"reference-{REFERENCE[0]}", ref_table, seeds)
        i, k = args.shard
        for label, t, info in work[i::k]:
            t0 = time.perf_counter()
            cached_draw(info.get("_model", model), samples_cache, label, t, seeds)
            print(f"sampled {label} nfe={t.nfe} in {time.perf_counter() - t0:.0f} s", flush=True)
        return
    judge = Judge.for_model(cfg.model, model.shape, n_boot=int(args.n_boot or cfg.n_boot))
    reference = cached_draw(model, samples_cache, f"reference-{REFERENCE[0]}", ref_table, seeds)
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
        info = dict(info)
        m = info.pop("_model", model)
        key = samples_cache.key(m.fingerprint, f"{label.replace(' ', '-')}-{table_hash(t)}", t.nfe, seeds, model.shape, model.dtype)
        if args.cached_only and info["kind"] == "classic" and not os.path.isfile(samples_cache.path(key)):
            skipped.append(f"{label}@{t.nfe}")
            continue
        x = cached_draw(m, samples_cache, label, t, seeds)
        t1 = time.perf_counter()
        r = judge.score(x)
        rmse = None if info["kind"] == "tada" else reference_rmse(x, reference)  # TADA draws other noise: no pairing
        rows.append({"method": label, "model": "patches", "nfe": t.nfe, "n": len(seeds), "ref_rmse": rmse, **info, **r,
                     "score_seconds": round(time.perf_counter() - t1, 1)})
        if t.nfe in GRID_NFES or (label, t.nfe) == CONVERGED or info["kind"] == "distilled":
            write_png_grid(x[:36].clamp(-1, 1), str(grids / f"{_slug(label)}-nfe{t.nfe}.png"), scale=3)
        print(f"{label:22s} nfe={t.nfe:2d} FD {pm(rows[-1], 'fd_train_main')} held {pm(rows[-1], 'fd_heldout_main')} "
              f"ref-RMSE {fmt(rmse)} "
              f"b {pm(rows[-1], 'fd_train_b')} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows.reverse()
    if skipped:
        print(f"not sampled (CPU budget): {', '.join(skipped)}", flush=True)
    timing = {} if args.skip_timing else time_one_table(model, judge, seeds)
    compare(rows, refs)
    if args.goal1_n > args.n:
        t0 = time.perf_counter()
        goal1 = goal1_rows(model, judge, samples_cache, cfg, seeds, args.goal1_n)
        write_csv([public(r) for r in goal1], str(OUT / "goal1.csv"))
        print(f"goal 1 on {args.goal1_n:,} samples: FD train {_d(goal1[1], 'fd_train_main', 'conv')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
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


def teacher_check(path: Path) -> dict[str, Any]:
    """docs/results/patches/teacher_check.csv: a from-scratch, uninterrupted ``python -m optimize teacher model=patches``
    (its exported file ``path``): the training seconds it recorded and how far its weights are from the shipped teacher's."""
    from safetensors.torch import load_file

    from samplers.nets import read_net_header

    _, meta = read_net_header(str(path))
    new, old = load_file(str(path)), load_file(str(REPO / "checkpoints" / "edm-patches.safetensors"))
    if set(new) != set(old):
        raise SystemExit(f"error: {path} is not a patches teacher with the shipped teacher's layout.")
    diff = max(float((new[k].double() - old[k].double()).abs().max()) for k in old)
    scale = max(float(old[k].double().abs().max()) for k in old)
    row = {"file": str(path), "steps": meta.get("steps"), "train_seconds": meta.get("train_seconds"), "threads": meta.get("threads"),
           "max_abs_weight_difference": diff, "max_abs_weight": scale, "date": datetime.date.today().isoformat()}
    write_csv([row], str(OUT / "teacher_check.csv"))
    return row


def teacher_check_text() -> str:
    """The sentence on the from-scratch teacher run, from docs/results/patches/teacher_check.csv (none without it)."""
    path = OUT / "teacher_check.csv"
    if not path.is_file():
        return ""
    r = read_results(str(path))[0]
    same = ("identical to the shipped file's" if r["max_abs_weight_difference"] == 0 else
            f"not the shipped file's (largest difference {r['max_abs_weight_difference']:.2g}, largest weight "
            f"{r['max_abs_weight']:.2g}; the shipped file's first leg ran on 1 thread, and float sums depend on the thread "
            f"count), so this run checks the time only")
    threads = f" on {int(r['threads'])} threads" if r.get("threads") not in (None, "") else ""
    return (f" Checked on {r['date']}: the same command from scratch, uninterrupted, trained {int(r['steps']):,} steps in "
            f"{r['train_seconds']:.0f} s ({r['train_seconds'] / 60:.1f} min){threads} on this 2-core machine, otherwise idle; its weights are "
            f"{same} (`docs/results/patches/teacher_check.csv`).")


def goal1_rows(model: Any, judge: Judge, cache: ReferenceCache, cfg: Any, seeds: list[int], n: int) -> list[dict[str, Any]]:
    """The converged teacher and DPM-Solver++(2M) at NFE 10 on seeds 0..n-1 (``seeds`` reuse the page's cached samples,
    the rest are drawn as one more cached block), scored and paired: goal 1 with a tighter interval."""
    sched = {"sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max)}
    rows = []
    for label, nfe in (CONVERGED, ("dpmpp_2m", 10)):
        t = baselines.build(label, nfe, **sched)
        x = torch.cat([cached_draw(model, cache, label, t, seeds), cached_draw(model, cache, label, t, list(range(len(seeds), n)))])
        rows.append({"method": label, "model": "patches", "nfe": nfe, "n": n, "kind": "classic", **judge.score(x)})
    add_paired_columns(rows[1:], rows[0], KEYS, "conv")
    return rows


def time_one_table(model: Any, judge: Judge, seeds: list[int]) -> dict[str, Any]:
    """Wall seconds of one full evaluation (sampling 2,000 + scoring) of dpmpp_2m at NFE 10, uncached."""
    from optimize.evaluation.evaluate import evaluate

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
    for r in (r for r in rows if r["kind"] == "distilled"):  # vs the best classic of the same compute (teacher forwards)
        forwards = int(r["teacher_forwards_per_call"])
        same_cost = best(rows, "fd_train_main", lambda c: classic(c) and c["nfe"] == forwards)
        if same_cost is not None:
            add_paired_columns([r], same_cost, KEYS, "cost")
            r["best_classic_cost"] = f"{same_cost['method']}@{int(same_cost['nfe'])}"


# --- the page ------------------------------------------------------------------------------------------
def _d(r: dict[str, Any], key: str, tag: str) -> str:
    d, se = r.get(f"d{key}_{tag}"), r.get(f"d{key}_{tag}_se")
    return "-" if d is None or se is None else diff_text(d, se)


def _meta(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(REPO / path), framework="pt") as f:
        header = f.metadata() or {}
    return {**json.loads(header.get("metadata", "{}")), "config": json.loads(header.get("config", "{}"))}


def _verdicts(r: dict[str, Any], tag: str) -> list[str]:
    return [_d(r, k, tag) for k in KEYS]


def _worse(cells: list[str]) -> bool:
    return any(c.endswith("worse") for c in cells)


def _better(cells: list[str]) -> bool:
    return any(c.endswith("**better**") for c in cells)


def render(rows: list[dict[str, Any]], refs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    teacher = _meta("checkpoints/edm-patches.safetensors")
    tcfg = compose_config(["method=teacher", "model=patches"])
    fa, fb = _meta("checkpoints/features-patches.safetensors"), _meta("checkpoints/features-patches-b.safetensors")
    timing = read_results(str(OUT / "timing.csv"))[0] if (OUT / "timing.csv").is_file() else {}
    conv = next(r for r in rows if (r["method"], int(r["nfe"])) == CONVERGED)
    check = next((r for r in rows if (r["method"], int(r["nfe"])) == CONVERGED_CHECK), None)
    d10 = next(r for r in rows if (r["method"], int(r["nfe"])) == ("dpmpp_2m", 10))
    n = int(rows[0]["n"])
    chance = {"photo": 1 / 8, "cell": 1 / 16, "rotation": 1 / 4}
    acc = lambda m: ", ".join(f"{k.replace('_accuracy', '')} {v:.1%} (chance {chance[k.replace('_accuracy', '')]:.1%})"  # noqa: E731
                              for k, v in m["heldout"].items())
    floor = refs[0]
    lines = [
        "# Every method on the patches teacher (3x32x32 natural-image patches)\n",
        f"Generated by `python scripts/results_patches.py` on {args.date} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}); numbers: `docs/results/patches/results.csv` (every row), "
        "`reference.csv` (real-data rows), `timing.csv`, `features.csv` (feature-net probe accuracies); learned and tuned tables: "
        "`docs/results/patches/tables/` (`python -m optimize evaluate model=patches table=PATH` re-evaluates one); sample grids: "
        "`docs/results/patches/grids/` (36 samples each, seeds 0..35, 3x upscaled). Overview of every model: [results.md](results.md).\n",
        "**Data** (`optimize.data.patches`): 32x32 RGB crops of the 8 colour photographs in the scikit-image wheel "
        "(astronaut, coffee, chelsea, rocket, motorcycle_left, hubble_deep_field at 1/2, immunohistochemistry, retina at 1/3; "
        "no download). Each photograph is cut into 64x64 blocks; a fixed permutation gives 15% of its blocks to held-out, 15% "
        "to validation, the rest to train, and a crop belongs to a region only when all its pixels do, so the regions share "
        "no pixel (tested). Training: random crops with random flips; held-out and validation: fixed sets of 2,000 crops with "
        "fixed flips. The judge's training reference is 2,000 training-region crops (seed 1); the teacher trained on others (seed 0).\n",
        f"**Teacher** (`checkpoints/edm-patches.safetensors`, `python -m optimize teacher model=patches` = "
        "`bash scripts/train_teachers.sh patches`): EDM-preconditioned "
        f"U-Net {teacher['config'].get('channels')} channels x {teacher['config'].get('channel_mult')}, "
        f"{teacher.get('steps')} Adam steps (lr {fmt(tcfg.lr)}) of batch {teacher.get('batch_size')} on {teacher.get('n_data')} crops, "
        f"EMA {fmt(tcfg.ema)}. {TEACHER_TIME}{teacher_check_text()}\n",
        f"**Feature nets** (`scripts/train_classifiers.py patches`, trained on 20,000 training-region crops only): `main` = "
        f"`features-patches.safetensors` (VGG-style CNN, heads: source photograph and 4x4 position cell; held-out accuracy "
        f"{acc(fa)}), `b` = `features-patches-b.safetensors` (strided convs, per-channel mean/std beside the "
        f"flattened map, heads: rotation of the input and photograph; held-out {acc(fb)}). Only the photograph heads "
        "generalise to the unseen regions; the position and rotation targets stay at or near chance there. FD/KID use their 128-d penultimate "
        "features; `main` is the one DDSS trains and selects on, `b` is never seen by any learner.\n",
        NOTE + f" FD standard errors here use {fmt(timing.get('n_boot', 200))} bootstrap replicates.\n",
        f"**Samples.** Every generated row has {n:,} samples from seeds 0..{n - 1} (paired across rows); the real rows and both "
        f"reference sets have 2,000 patches each. **ref-RMSE** is the root-mean-square distance of a row's samples to "
        f"{REFERENCE[0]} at NFE {REFERENCE[1]} from the same noise (solver accuracy, independent of any data or feature net; "
        "none for TADA, which draws extra noise).\n",
        "**What is independent of what.** Reported rows use only seeds 0..n-1. Tuning uses seeds 1,000,000+ against the "
        "training patches (main net); LD3 and IIA fit seeds 2,000,000+ against a fine solve (no data, no feature net); DDSS "
        "trains on KID against the training patches (main net) plus L2 to the teacher on seeds 2,000,000+, and selects on "
        "seeds 3,000,000+ against the training patches: *FD held-out*, *FD-b* and ref-RMSE are outside every learner's "
        "objective. The 'best classic' at each NFE is picked on the evaluation seeds themselves (which favours the baseline).\n",
    ]
    # reference points
    body = []
    for r in [*refs, conv, *([check] if check else [])]:
        body.append([r["method"] + ("" if r["kind"] == "real" else f" (NFE {int(r['nfe'])})"), *[pm(r, k) for k in KEYS],
                     pm(r, "kid_train_main"), fmt(r.get("ref_rmse")), "(converged)" if r is conv else _d(r, "fd_train_main", "conv"),
                     "" if r is conv else _d(r, "fd_heldout_main", "conv")])
    lines += ["## Reference points\n", table(["rows", *[NAMES[k] for k in KEYS], "KID train", "ref-RMSE", "Δ FD train vs converged",
                                               "Δ FD held-out vs converged"], body),
              f"\nThe converged teacher is {CONVERGED[0]} at NFE {CONVERGED[1]}"
              + (f"; {CONVERGED_CHECK[0]} at NFE {CONVERGED_CHECK[1]} (another solver, same noise) checks that it has converged"
                 if check else "") + ". The real rows are the floor: fresh training crops against the training reference show "
              "the metric's sampling noise, the held-out columns include the shift between image regions. The converged teacher "
              f"is {fmt(conv['fd_train_main'] / max(floor['fd_train_main'], 1e-9), 2)}x the fresh-crop floor in FD train.\n"]
    # goal 1
    g1 = _verdicts(d10, "conv")
    met = all(c.endswith("worse") for c in g1)
    lines += ["## Goal 1: does NFE 10 still matter here?\n",
              f"DPM-Solver++(2M) at NFE 10 minus the converged teacher (paired, same seeds): FD train {g1[0]}, FD held-out "
              f"{g1[1]}, FD-b {g1[2]}; ref-RMSE {fmt(d10.get('ref_rmse'))} (converged: {fmt(conv.get('ref_rmse'))}).\n",
              ("**Met:** NFE 10 is worse than the converged teacher beyond the uncertainty on every column." if met else
               "**Not met on every column:** " + ("NFE 10 is better than the converged teacher on " if _better(g1) else
                                                  "NFE 10 is within noise of the converged teacher on ")
               + ", ".join(NAMES[k] for k, c in zip(KEYS, g1) if not c.endswith("worse")) + ".") + "\n"]
    goal1 = read_results(str(OUT / "goal1.csv")) if (OUT / "goal1.csv").is_file() else []
    if goal1:
        big = _verdicts(goal1[1], "conv")
        lines += [f"Measured again on {int(goal1[1]['n']):,} samples (seeds 0..{int(goal1[1]['n']) - 1}, the same two solvers; "
                  f"`docs/results/patches/goal1.csv`): FD train {big[0]}, FD held-out {big[1]}, FD-b {big[2]}. "
                  + ("**Met on every column at this sample size.**" if all(c.endswith("worse") for c in big) else
                     "Still not worse beyond the uncertainty on " + ", ".join(NAMES[k] for k, c in zip(KEYS, big) if not c.endswith("worse"))
                     + ".") + "\n"]
    # classic grid
    nfes = sorted({int(r["nfe"]) for r in rows})
    classic = [r for r in rows if r["kind"] == "classic"]
    lines += ["## Classic solvers\n", "FD against the training patches (main features):\n", pivot(classic, "fd_train_main", nfes),
              "\nFD against the held-out patches (main features):\n", pivot(classic, "fd_heldout_main", nfes),
              "\nFD-b against the training patches (second feature net):\n", pivot(classic, "fd_train_b", nfes),
              "\nref-RMSE to the reference solve (no interval: a distance on the same noise):\n",
              pivot(classic, "ref_rmse", nfes, with_se=False),
              "\nPlot: `docs/results/patches/quality-vs-nfe.png`.\n"]
    # learned vs classic
    learned = [r for r in rows if r["kind"] != "classic"]
    body = []
    for r in sorted(learned, key=lambda r: (int(r["nfe"]), r["method"])):
        body.append([str(int(r["nfe"])), r["method"], *[pm(r, k) for k in KEYS], fmt(r.get("ref_rmse")), r.get("best_classic") or "-",
                     *_verdicts(r, "best"), r.get("best_classic_2n") or "-", *_verdicts(r, "2n")])
    lines += ["## Learned, tuned and TADA tables vs the best classic at N and at 2N\n",
              "Δ = row - best classic (by FD train on these seeds) at the same NFE, then at twice the NFE; paired. "
              "ld3-unipc is the learned peer (LD3); iia(ld3) and ddss-kid+match(ld3) start from its table.\n",
              table(["NFE", "method", *[NAMES[k] for k in KEYS], "ref-RMSE", "best classic @N", *[f"Δ {NAMES[k]} @N" for k in KEYS],
                     "best classic @2N", *[f"Δ {NAMES[k]} @2N" for k in KEYS]], body, 2)]
    goal2, missing, met_at = [], [], set()
    for nfe in LEARN_NFES:
        mine = [r for r in learned if int(r["nfe"]) == nfe and r["kind"] in ("learned", "peer", "tuned")]
        missing += [] if mine else [str(nfe)]
        for r in mine:
            v = _verdicts(r, "2n")
            ok = "-" if v[0] == "-" else ("no" if _worse(v) else "yes")
            goal2.append([str(nfe), r["method"], r.get("best_classic_2n") or "-", *v, ok])
            if r["kind"] == "learned" and ok == "yes":
                met_at.add(nfe)
    lines += ["\n## Goal 2: learned tables at N vs the best classic at 2N\n",
              "'at least as good' = not worse beyond 2 se on any of the three FD columns.\n",
              table(["NFE", "table", "best classic @2N", *[f"Δ {NAMES[k]}" for k in KEYS], "at least as good"], goal2, 2),
              f"\nOne of the project's learned tables (IIA or DDSS) is at least as good as the best classic at 2N at N = "
              f"{', '.join(map(str, sorted(met_at))) or 'none'} of {', '.join(map(str, LEARN_NFES))}"
              + (f" (not run at N = {', '.join(missing)})" if missing else "") + ".\n"]
    settings = []
    for r in learned:
        if r.get("table"):
            settings.append(f"- `{r['table']}`: {r['method']} NFE {int(r['nfe'])}, {fmt(r.get('learn_seconds'))} s"
                            + (f", {fmt(r['steps'])} steps (from the table's metadata)" if r.get("steps") is not None else "")
                            + (f", tuned {r['tune']}" if r.get("tune") else ""))
    lines += ["\n## Settings and cost\n",
              "Learned with `python scripts/results_patches.py --learn`: tuned dpmpp_2m (rho 3/5/7/10 x sigma_min "
              f"0.002/0.005/0.02 x end zero/sigma_min, {args.tune_n} tuning samples per point); the chain of the digits page "
              "(`scripts/results_learned.py`): `python -m optimize ld3 base=unipc` with LD3's defaults (50 + 50 noises, UniPC-20 "
              "teacher), `python -m optimize iia base=table:<LD3 table>`, and `python -m optimize ddss family=full "
              f"init=table:<LD3 table> loss=kid+match steps={args.ddss_steps} {' '.join(args.ddss)}` (the digits page uses 150 "
              "steps of batch 128: these are CPU settings). Seconds are wall time on this 2-core CPU; a chained method's "
              "time includes the LD3 fit it starts from:\n", "\n".join(sorted(settings)) + "\n"]
    shipped = []
    for path in sorted(SHIPPED.glob("patches-best-nfe*.safetensors"), key=lambda p: int(p.stem.split("nfe")[1])):
        meta = SolverTable.load(str(path)).metadata
        shipped.append(f"NFE {int(path.stem.split('nfe')[1])}: {meta.get('selected')} ("
                       + ", ".join(f"{k} {v:.3g}" for k, v in meta.get("selected_from", {}).items()) + ")")
    if shipped:
        lines.append("\n**Shipped tables** (`python scripts/results_patches.py --ship`): `checkpoints/tables/patches-best-nfe<N>.safetensors`, "
                     "the better of IIA and DDSS by FD train on the selection seeds 3,000,000+ (1,000 samples; never the evaluation "
                     "seeds): " + "; ".join(shipped) + ". Use: `python -m samplers generate --table "
                     "checkpoints/tables/patches-best-nfe8.safetensors --model edm:checkpoints/edm-patches.safetensors --n 64 --out out/`.\n")
    for r in (r for r in rows if r["kind"] == "distilled"):
        lines.append(f"\n**DSNO** (`{r.get('table')}`, {fmt(r.get('steps'))} steps, {fmt(r.get('learn_seconds'))} s of training after "
                     f"its data; settings `{' '.join(DSNO_SETTINGS)}`, the digits default is n_data=8192 steps=1000 batch_size=128): "
                     f"one network call that runs {fmt(r.get('teacher_forwards_per_call'))} time slices, so its compute per call is "
                     f"about {fmt(r.get('teacher_forwards_per_call'))} teacher forwards. Against the best classic of that compute "
                     f"({r.get('best_classic_cost', '-')}): FD train {_d(r, 'fd_train_main', 'cost')}, FD held-out "
                     f"{_d(r, 'fd_heldout_main', 'cost')}, FD-b {_d(r, 'fd_train_b', 'cost')}. Grid: "
                     "[dsno-nfe1](results/patches/grids/dsno-nfe1.png).\n")
    if not any(r["kind"] == "distilled" for r in rows):
        lines.append("\nDSNO (one-step student, `python scripts/results_patches.py --learn dsno`, settings "
                     f"`{' '.join(DSNO_SETTINGS)}`) has no row yet: its distillation did not fit this run's CPU time.\n")
    if timing:
        lines.append(f"\nOne full evaluation (2,000 samples of dpmpp_2m at NFE 10, sampling + scoring on both feature nets and "
                     f"both reference sets): {fmt(timing.get('total_seconds'))} s, of which sampling {fmt(timing.get('sampling_seconds'))} s "
                     f"(torch threads: {fmt(timing.get('threads'))}, 1-minute load average {fmt(timing.get('load_average_1min'))} on "
                     f"{fmt(timing.get('cpus'))} CPUs; the reference sets' features were computed before the clock started; "
                     f"process CPU time {fmt(timing.get('process_cpu_seconds'))} s).\n")
    lines.append("\n## Sample grids\n\nReal held-out patches: [real-heldout](results/patches/grids/real-heldout.png); converged "
                 f"teacher: [{CONVERGED[0]}-nfe{CONVERGED[1]}](results/patches/grids/{CONVERGED[0]}-nfe{CONVERGED[1]}.png); every "
                 "method at NFE 4 and 8 below.\n")
    for nfe in GRID_NFES:
        names = sorted({_slug(r["method"]) for r in rows if int(r["nfe"]) == nfe})
        lines.append(f"\nNFE {nfe}: " + ", ".join(f"[{n}](results/patches/grids/{n}-nfe{nfe}.png)" for n in names) + "\n")
    return "\n".join(lines)


def _slug(method: str) -> str:
    """A grid file name for a row label: ``ddss-kid+match(ld3)`` -> ``ddss-kid+match-ld3``."""
    return method.replace("(", "-").replace(")", "").replace(" ", "-")


if __name__ == "__main__":
    main()
