"""PaGoDA on the patches: the 8x8 teacher grown to 16x16 and 32x32 -> docs/results-pagoda.md and docs/results/pagoda/.

    python scripts/results_pagoda.py                          # train with the defaults (or reuse --run), evaluate, write
    python scripts/results_pagoda.py --run outputs/pagoda/main --ship
    python scripts/results_pagoda.py --candidates pool=outputs/pagoda/pool strided-dlr2e-4=outputs/pagoda/dlr2e-4 --ship
                                                              # pick one of several finished runs on selection seeds

The generators come from one ``python -m optimize pagoda model=patches8 stages=3`` run with the defaults of
conf/method/pagoda.yaml (``--run RUN_FOLDER``; trained here when it holds no generators); the scores are that run's
final evaluation when it made one with n = 2,000 (``--rescore`` computes them again, the same way). Every stage's generator is
scored on seeds 0..n-1 at its own resolution against the patches' real sets at that resolution (training-region crops
seed 1, the held-out set), both feature nets on inputs resized bicubically to 32x32 (``optimize.methods.pagoda.judge_at``);
at 32x32 beside the baseline PaGoDA exists to beat, the 8x8 teacher's converged solve (dpmpp_2m@50) from the same
seeds bicubically upsampled, with paired differences. The 32x32 teacher's rows (its converged solve and its classic
solvers at NFE 4) come from docs/results/patches/results.csv: the same seeds, real sets and feature nets, another
generator (not paired). ``--ship`` copies the three generators and their tables to checkpoints/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from optimize.base import repo_relative
from optimize.methods import pagoda
from optimize.cli import compose_config
from optimize.recipes import selection_scores
from optimize.evaluation.results import read_results, verdict, write_csv
from optimize.base.seeds import VAL_SEED_OFFSET
from samplers import SolverTable
from samplers.nets import load_denoiser, read_net_header

REPO = Path(__file__).resolve().parents[1]
RES = [8, 16, 32]
FIRST = "features-patches + pixel L2 loss, d_steps 1"  # the first runs' reconstruction loss and D schedule
CANDIDATE_NOTES = {"pool": f"{FIRST}; d_downsample=pool (the first runs' D), d_lr 1e-3; 5,000 + 1,500 steps; 1 thread beside another job",
                   "strided": f"{FIRST}; d_downsample=strided, d_lr 1e-3; 5,000 + 1,500 steps",
                   "strided-dlr2e-4": f"{FIRST}; d_downsample=strided, d_lr 2e-4; 5,000 + 1,500 steps",
                   "strided-dlr2e-4-x2": f"{FIRST}; as strided-dlr2e-4, base_steps 10,000, steps 3,000",
                   "strided-dlr2e-4-x4": f"{FIRST}; as strided-dlr2e-4, base_steps 20,000, steps 4,000",
                   "pixel-freq": "rec_features=null (no judge net): pixel L2 + amplitude-spectrum L1 (freq_weight 1); d_steps 2; "
                                 "strided D, d_lr 2e-4; base_steps 10,000, steps 2,000 (the defaults then)",
                   "grow-dlr1e-3": "as pixel-freq, its 8x8 base kept (base_generator, base_steps 0) and the 16x16 and 32x32 stages "
                                   "grown again with d_lr 1e-3 (the generator's rate)",
                   "grow-dlr2e-3": "as grow-dlr1e-3 with d_lr 2e-3 (twice the generator's rate)",
                   "grow-dlr1e-3-x2": "as grow-dlr1e-3 with twice the steps per grown stage (4,000)"}
DOCS, PAGE = REPO / "docs" / "results" / "pagoda", REPO / "docs" / "results-pagoda.md"
BASE_TIMING = DOCS / "base-timing.csv"  # a kept base's stage rerun alone and clocked (--base-timing)
QUIET = ("method=", "num_threads=", "progress_bar=", "hydra.", "export", "evaluate_at_end=")  # keys a run's result ignores
PATCHES_CSV = REPO / "docs" / "results" / "patches" / "results.csv"
KEYS = [("fd_train_main", "FD train"), ("fd_heldout_main", "FD held-out"), ("fd_train_b", "FD-b train"),
        ("fd_heldout_b", "FD-b held-out"), ("kid_train_main", "KID train"), ("kid_train_b", "KID-b train")]


def train(run: Path, overrides: list[str]) -> None:
    """The default run, in this process, unless ``run`` already holds its generators."""
    if (run / "pagoda-patches8.safetensors").is_file():  # the top generator may have gone to export= (checkpoints/)
        print(f"reusing {run}", flush=True)
        return
    cfg = compose_config(["method=pagoda", "model=patches8", "stages=3", f"out_dir={run}", "evaluate_at_end=false", *overrides])
    pagoda.validate(cfg)
    pagoda.run(cfg)


def uses_judge(run: Path) -> bool:
    """Whether the run's reconstruction loss used a feature net (the `main` judge's, the only one it can take)."""
    return read_net_header(str(run / "pagoda-patches32.safetensors"))[1].get("rec_features") is not None


def select(cfg: Any, candidates: dict[str, Path], n_select: int) -> tuple[str, dict[str, float]]:
    """The candidate run whose 32x32 generator ``optimize.recipes.selection_scores`` picks (FD train, main features, on
    the selection seeds against the training-region crops), among the runs whose loss uses no judge net when there are
    any: a run that trained on the main net's features would be picked by a score it was trained for."""
    jobs = []
    for label, run in candidates.items():
        gen = load_denoiser(str(run / "pagoda-patches32.safetensors"))
        jobs.append((label, gen, SolverTable.load(str(run / "pagoda-patches32-1nfe.safetensors"), fingerprint=gen.fingerprint())))
    scores = selection_scores(pagoda.judge_at(cfg.model, RES[-1], n_boot=0), n_select, jobs, jobs[0][1].shape)
    eligible = [k for k in scores if not uses_judge(candidates[k])] or list(scores)
    return min(eligible, key=scores.get), scores


def variants_section(candidates: dict[str, Path], scores: dict[str, float], chosen: str, n_select: int) -> str:
    """The candidate runs side by side: the selection score and each run's evaluation row at 32x32 with its paired
    difference to the upsampled teacher (the evaluation seeds; reported, not used to pick)."""
    lines = ["| run | settings | training | FD train, selection seeds | FD train | FD held-out | FD-b train | FD-b held-out | "
             "FD-b train vs upsampled teacher |", "|---|---|---|---|---|---|---|---|---|"]
    for label, run in candidates.items():
        row = next(r for r in read_results(str(DOCS / "variants" / f"results-{label}.csv")) if int(r["resolution"]) == RES[-1] and r["method"].startswith("pagoda"))
        d, se = row.get("dfd_train_b_vs_upsampled"), row.get("dfd_train_b_vs_upsampled_se")
        _, gmeta = read_net_header(str(DOCS / "variants" / f"{label}-pagoda-patches32.safetensors"))
        tag = " (chosen)" if label == chosen else " (its loss uses the main net)" if uses_judge(run) else ""
        lines.append(f"| {label}{tag} | {CANDIDATE_NOTES.get(label, '')} | "
                     f"{float(gmeta.get('train_seconds', float('nan'))) / 60:.1f} min"
                     + (f" on {gmeta['threads']} thread(s)" if "threads" in gmeta else "")
                     + (" (grown stages only)" if gmeta.get("base_generator") else "") + f" | {scores[label]:.3g} | "
                     + " | ".join(_pm(row, k) for k in ("fd_train_main", "fd_heldout_main", "fd_train_b", "fd_heldout_b"))
                     + f" | {d:+.3g} ± {se:.2g} ({verdict(d, se)}) |")
    return (f"\n## Variants\n\n{len(candidates)} runs that differ in the reconstruction loss, the discriminator or their step counts (settings "
            f"in the table), the reported one picked by FD train "
            f"(main features) on {n_select:,} selection seeds ({VAL_SEED_OFFSET:,}..), never on the evaluation seeds, among "
            f"the runs whose loss uses no judge net (a run whose loss used the main net's features is scored by what it "
            f"trained for); the "
            f"evaluation columns are the runs' own final evaluations (seeds 0..1999; docs/results/pagoda/variants/results-<run>.csv, "
            f"the runs' 32x32 generators beside them). Grids: "
            + ", ".join(f"[{label}](results/pagoda/variants/grid-{label}.png)" for label in candidates) + ".\n\n"
            + "\n".join(lines) + "\n")


def _pm(r: dict[str, Any], key: str) -> str:
    v, se = r.get(key), r.get(key.replace("fd_", "fd_se_", 1).replace("kid_", "kid_se_", 1))
    if v is None:
        return "-"
    return f"{v:.3g} ± {se:.2g}" if se is not None else f"{v:.3g}"


def table(rows: list[dict[str, Any]]) -> str:
    head = "| method | resolution | NFE | " + " | ".join(h for _, h in KEYS) + " |"
    lines = [head, "|" + "---|" * (3 + len(KEYS))]
    for r in rows:
        lines.append(f"| {r['method']} | {int(r['resolution'])} | {int(r['nfe'])} | " + " | ".join(_pm(r, k) for k, _ in KEYS) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], teacher32: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    top, base = rows[-2], rows[-1]
    paired = []
    verdicts = {}
    for key, name in KEYS:
        d, se = top.get(f"d{key}_vs_upsampled"), top.get(f"d{key}_vs_upsampled_se")
        if d is None:
            continue
        verdicts[key] = verdict(d, se)
        paired.append(f"| {name} | {d:+.3g} ± {se:.2g} | {verdicts[key]} |")
    conv = next(r for r in teacher32 if r["method"] == "dpmpp_2m" and r["nfe"] == 50)
    nfe4 = [r for r in teacher32 if r["nfe"] == 4 and r["kind"] == "classic"]
    best4 = min(nfe4, key=lambda r: r["fd_train_main"])
    moon_fd = {k: top[k] <= 2 * conv[k] for k in ("fd_train_main", "fd_train_b")}
    moon_4 = {k: top[k] + 2 * top[k.replace("fd_", "fd_se_")] < min(r[k] - 2 * r[k.replace("fd_", "fd_se_")] for r in nfe4)
              for k in ("fd_train_main", "fd_train_b")}
    main_goal = all(verdicts.get(k) == "better" for k in ("fd_train_main", "fd_train_b"))
    t = meta["train_seconds"]
    total = t + meta["base_seconds"] + meta["data_seconds"]
    note_32 = ("  The 32x32 teacher is a small CPU-trained net whose converged samples score worse than the 8x8 teacher's "
               "upsampled ones\n  (FD train {:.3g} vs {:.3g}), so this goal says more about that teacher than about PaGoDA."
               .format(conv["fd_train_main"], base["fd_train_main"]) if conv["fd_train_main"] > base["fd_train_main"] else "")
    curves = curve_summary(DOCS / "pagoda-patches8-loss.csv")
    text = f"""# PaGoDA: an 8x8 teacher grown to a one-step 32x32 generator

Generated by `python scripts/results_pagoda.py` on {meta['date']} ({meta['machine']}). Method: `optimize/methods/pagoda.py`
(Kim et al., NeurIPS 2024; public code sony/pagoda); run: `{meta['command']}` (the other keys: the
defaults of `conf/method/pagoda.yaml`).

- Teacher: `checkpoints/edm-patches8.safetensors`, EDM U-Net on the 8x8 patches (4x4 pixel means of the 32x32 crops).
- Latents: {meta['n_pairs']:,} training crops and mirrors, area-downsampled to 8x8 and carried to sigma_max = 80 by the
  teacher's ODE run up (Heun on a 40-point Karras grid, 77 NFE; {meta['data_seconds']:.0f} s).
- Generator: the teacher U-Net called once at sigma_max (raw output) plus two x2 stages (32 and 16 channels); base
  {meta['base_steps']:,} steps{meta['base_note']}, then {meta['steps']:,} per grown stage, batch {meta['batch_size']}; training {t:.0f} s
  ({t / 60:.1f} min) on {meta['threads']} ({meta['time_note']}, the latents not included).
- {meta['rec']}
- Scores: 2,000 samples (seeds 0..1999), ± one standard error counting both sets' sampling; each stage against the real
  sets at its own resolution (both resized bicubically to 32x32 for the feature nets). KID x 1e3.

## Every stage

{table(rows[:-1])}

## At 32x32: PaGoDA (1 NFE) against the 8x8 teacher's converged solve, bicubically upsampled

{table([top, base])}

Paired differences on the same seeds (PaGoDA minus upsampled teacher; beyond 2 se counts):

| measure | difference | verdict |
|---|---|---|
{chr(10).join(paired)}

The 32x32 teacher (`checkpoints/edm-patches.safetensors`, docs/results-patches.md; same seeds, real sets and feature
nets, another generator, so not paired):

{table([{**conv, 'resolution': 32, 'method': '32x32 teacher dpmpp_2m@50 (converged)'}, {**best4, 'resolution': 32, 'method': f"32x32 teacher {best4['method']}@4 (best classic at 4)"}])}

{spectral_section(top, base)}
## Goals

- PaGoDA at 32x32 beats the upsampled 8x8 teacher beyond the uncertainty (FD train on both nets): **{'met' if main_goal else 'not met'}**
  ({', '.join(f'{k}: {v}' for k, v in verdicts.items() if k.startswith('fd_'))}).
- Moonshot, within 2x the FD of the 32x32 teacher's converged samples: **{'met' if all(moon_fd.values()) else 'not met'}**
  (FD train main {top['fd_train_main']:.3g} vs 2 x {conv['fd_train_main']:.3g}; FD-b {top['fd_train_b']:.3g} vs 2 x {conv['fd_train_b']:.3g});
  better than the 32x32 teacher with any classic solver at NFE 4 beyond 2 se: **{'met' if all(moon_4.values()) else 'not met'}**.
{note_32}
- Training of all stages on 2 CPU cores under 45 minutes (the PaGoDA issue's goal) and at most 90 (issue 27's cap):
  {(t + meta['base_seconds']) / 60:.1f} min of training{meta['total_note']} plus {meta['data_seconds'] / 60:.1f} min of latents on
  {meta['threads']}: 45 minutes {'met' if total < 45 * 60 else 'not met'}, 90 minutes {'met' if total <= 90 * 60 else 'not met'} as measured.

## Samples (seeds 0..63; same noise in every grid)

| 8x8 (x16) | 16x16 (x8) | 32x32 (x4) | 8x8 teacher dpmpp_2m@50, bicubic to 32 (x4) |
|---|---|---|---|
| ![](results/pagoda/grid-pagoda8.png) | ![](results/pagoda/grid-pagoda16.png) | ![](results/pagoda/grid-pagoda32.png) | ![](results/pagoda/grid-upsampled32.png) |

## Loss curves

![](results/pagoda/pagoda-patches8-loss.png)

Stage boundaries are dotted. Per stage (means over its steps): {curves}
"""
    return text


def base_description(gmeta: dict[str, Any], res: list[int], timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """How the reported run got its base: trained in the run, or kept from another run's file (``base_generator``). A
    kept base's time is its own stage's where that run clocked its stages apart (``stage_seconds``); else, with
    ``timing`` (``BASE_TIMING``'s row: a rerun of the base stage alone with the base's settings), that rerun's base
    stage; else all of the base's run (an upper bound). The run's own time per stage where it was clocked."""
    path = gmeta.get("base_generator")
    split = gmeta.get("stage_seconds")
    per_stage = "; " + ", ".join(f"{r}x{r} {s / 60:.1f} min" for r, s in zip(res, split) if s) if split else ""
    if not path:
        return {"base_note": "", "time_note": f"training time of all stages{per_stage}", "base_seconds": 0.0, "total_note": ""}
    _, bmeta = read_net_header(str(REPO / path if not os.path.isabs(path) else path))
    base_split = bmeta.get("stage_seconds")  # a base file written since the stages are clocked apart: its own share
    if base_split:
        secs, share = float(base_split[0]), "the base's own share, clocked in the run it comes from"
    elif timing:
        secs, threads = float(timing["seconds"]), timing["threads"]
        share = (f"the base stage's time when rerun alone with its settings, `{timing['command']}` ({int(timing['steps']):,} "
                 f"steps on {int(threads) if isinstance(threads, float) else threads} thread(s), `{repo_relative(BASE_TIMING)}`)")
    else:
        secs = float(bmeta.get("train_seconds", float("nan")))
        share = "all three stages of the run the base comes from: an upper bound on the base's share"
    return {"base_steps": int(bmeta.get("steps", 0)),
            "base_note": f" (kept from `{path}`: another run's base, `base_generator`, not trained again)",
            "time_note": f"the grown stages only{per_stage}", "base_seconds": secs,
            "total_note": f" (the grown stages plus {secs / 60:.1f} min, {share})"}


def command_of(run: Path) -> str:
    """The ``python -m optimize pagoda`` command line of ``run`` (its Hydra overrides; the defaults' for a run made by
    train() here), less the keys that do not change its result (QUIET)."""
    given = run / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in (OmegaConf.load(given) if given.is_file() else ["model=patches8", "stages=3"])
                 if not str(o).startswith(QUIET)]
    return "python -m optimize pagoda " + " ".join(dict.fromkeys(overrides))


def base_timing(net: Path | None) -> dict[str, Any] | None:
    """The clocked base stage of the rerun whose 8x8 generator is ``net``, written to BASE_TIMING; without ``net``,
    the row kept there by an earlier call (None when there is none)."""
    if net is not None:
        _, meta = read_net_header(str(net))
        write_csv([{"seconds": meta["stage_seconds"][0], "steps": meta["steps"], "threads": meta.get("threads", "?"),
                    "command": command_of(net.parent), "run": repo_relative(net.parent)}], str(BASE_TIMING))
    return read_results(str(BASE_TIMING))[0] if BASE_TIMING.is_file() else None


def rec_description(gmeta: dict[str, Any]) -> str:
    """The reconstruction loss and discriminator schedule of the reported run, from its generator's metadata."""
    rec = gmeta.get("rec_features")
    pixel, freq, d_steps = float(gmeta.get("pixel_weight", 1.0)), float(gmeta.get("freq_weight", 0.0)), int(gmeta.get("d_steps", 1))
    parts = ([f"normalised activations of the six convolutions of `{Path(str(rec)).name}` (inputs resized to 32x32)"] if rec else []) \
        + ([f"pixel L2 (x {pixel:g})"] if pixel else []) + ([f"amplitude-spectrum L1 (x {freq:g}, phase-free)"] if freq else [])
    judge = ("That net is also the `main` judge below, so FD/KID `main` may flatter PaGoDA; the `b` net "
             "(`features-patches-b`, another architecture and task) never trained anything." if rec else
             "Neither judge net (`main`, `b`) is used by any loss: both FDs below are independent of the training.")
    return (f"Reconstruction loss: {' + '.join(parts)}. {judge} Discriminator: {d_steps} update(s) per generator update.")


def spectral_section(top: dict[str, Any], base: dict[str, Any]) -> str:
    """Share of power beyond the 8x8 Nyquist frequency (``pagoda.high_frequency_share``), when the run measured it."""
    if top.get("hf_share") is None or base.get("hf_share") is None:
        return ""
    d, se = top["dhf_share_vs_upsampled"], top["dhf_share_vs_upsampled_se"]
    return (f"Share of each image's power (mean removed) at frequencies an 8x8 image cannot hold (max(|k_x|, |k_y|) > 4 "
            f"cycles per image), mean ± se over the samples: PaGoDA 32x32 **{top['hf_share']:.4f} ± {top['hf_share_se']:.4f}**, "
            f"the upsampled teacher {base['hf_share']:.4f} ± {base['hf_share_se']:.4f} (paired difference {d:+.4f} ± {se:.4f}), "
            f"real 32x32 patches {top['hf_share_real']:.4f} ± {top['hf_share_real_se']:.4f}. The detail PaGoDA exists to add "
            "is this power: closer to the real share is better.\n")


def probe_section(path: Path) -> str:
    """What a fresh discriminator can tell apart at each resolution (``scripts/pagoda_d_probe.py``), when it was run."""
    if not path.is_file():
        return ""
    rows = read_results(str(path))
    lrs = sorted({float(r["d_lr"]) for r in rows})

    def name(r: dict[str, Any]) -> str:
        return f"{r['source']} ({r['generators']})" if r.get("generators") else str(r["source"])

    base: dict[str, list] = {name(r): [] for r in rows if r.get("generators")}  # each run's 8x8 rows
    for r in rows:
        if r.get("generators") and int(r["resolution"]) == RES[0]:
            base[name(r)].append((float(r["d_lr"]), r["heldout_accuracy"]))
    same = len(base) > 1 and len({tuple(sorted(v)) for v in base.values()}) == 1

    sources = list(dict.fromkeys(name(r) for r in rows))
    lines = ["| source | resolution | " + " | ".join(f"D lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for source in sources:
        for res in RES:
            at = {float(r["d_lr"]): r for r in rows if name(r) == source and int(r["resolution"]) == res}
            lines.append(f"| {source} | {res}x{res} | " + " | ".join(
                f"{at[lr]['heldout_accuracy']:.3f} ± {at[lr]['heldout_accuracy_se']:.3f}" if lr in at else "-" for lr in lrs) + " |")
    r0 = rows[0]
    return (f"\n## Can the discriminator tell at all?\n\nA fresh discriminator of the training's architecture, trained "
            f"{int(r0['steps']):,} steps (batch 32, hinge loss) on {int(r0['n_train']):,} fixed samples of a source against as many "
            f"real crops, then scored on {int(r0['n_test']):,} of each it never saw: held-out accuracy (0.5: it cannot separate "
            f"them) ± se (`scripts/pagoda_d_probe.py`, `docs/results/pagoda/d-probe.csv`; the generators of the runs named in "
            f"brackets, seeds 4,500,000..)." + (f" The runs' {RES[0]}x{RES[0]} rows agree: they share one base." if same else "")
            + "\n\n" + "\n".join(lines) + "\n")


def curve_summary(path: Path) -> str:
    """Per stage: the last tenth's mean reconstruction loss, the mean hinge loss of D (2 = D cannot tell real from
    generated) and how often lambda sat at a clip."""
    import numpy as np

    if not path.is_file():
        return "(no loss curve found)."
    h = np.genfromtxt(path, delimiter=",", names=True)
    out = []
    for k in np.unique(h["stage"]).astype(int):
        s = h[h["stage"] == k]
        tail = s[-max(1, len(s) // 10):]
        out.append(f"stage {k} ({RES[k]}x{RES[k]}): L_rec {tail['loss_rec'].mean():.3g} at the end, D hinge loss "
                   f"{s['loss_d'].mean():.3g}, lambda at its upper clip 10 in {np.mean(s['lambda'] >= 10 - 1e-6):.0%} and at "
                   f"0.01 in {np.mean(s['lambda'] <= 0.01 + 1e-9):.0%} of the steps")
    return "; ".join(out) + ". A D hinge loss near 2 means the discriminator hardly separates real from generated patches, " \
        "and lambda at 10 means the GAN gradient on the last layer is under a tenth of the reconstruction's: the " \
        "reconstruction loss then drives the training."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "outputs" / "pagoda" / "main")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ship", action="store_true", help="copy the generators and their tables to checkpoints/")
    parser.add_argument("--note", default="", help="a sentence added to the page (e.g. how loaded the machine was)")
    parser.add_argument("--rescore", action="store_true", help="score the generators again instead of reading the run's results.csv")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="LABEL=RUN",
                        help="finished runs to pick the reported one from (FD train on the selection seeds); replaces --run")
    parser.add_argument("--n-select", type=int, default=1000, help="selection samples for --candidates (seeds 3,000,000+)")
    parser.add_argument("--base-timing", type=Path, default=None, metavar="RUN",
                        help="the run folder of a rerun of a kept base's stage alone (stages=1 with its settings): its "
                             "clocked time counts as the base's (kept in docs/results/pagoda/base-timing.csv)")
    parser.add_argument("overrides", nargs="*", help="key=value settings of the training run")
    args = parser.parse_args()
    timing_net = None if args.base_timing is None else args.base_timing / f"pagoda-patches{RES[0]}.safetensors"
    if timing_net is not None and not (timing_net.is_file() and read_net_header(str(timing_net))[1].get("stage_seconds")
                                       and (args.base_timing / ".hydra" / "overrides.yaml").is_file()):
        parser.error(f"--base-timing takes the folder of a pagoda run that clocked its stages, got {args.base_timing}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run.resolve()
    variants = ""
    if args.candidates:
        pairs = [c.split("=", 1) for c in args.candidates]
        if any(len(p) != 2 or not (Path(p[1]) / "results.csv").is_file() for p in pairs):
            parser.error("--candidates takes LABEL=RUN with a finished run folder (its generators and results.csv)")
        candidates = {label: Path(path).resolve() for label, path in pairs}
        chosen, scores = select(compose_config(["method=pagoda", "model=patches8"]), candidates, args.n_select)
        run = candidates[chosen]
        (DOCS / "variants").mkdir(parents=True, exist_ok=True)
        write_csv([{"label": k, "run": repo_relative(v), "settings": CANDIDATE_NOTES.get(k, ""),
                    "n_select": args.n_select, "fd_train_main_select": scores[k], "chosen": k == chosen} for k, v in candidates.items()],
                  str(DOCS / "variants" / "selection.csv"))
        for label, path in candidates.items():  # what the variants' rows come from: grids, scores, the 32x32 generators
            shutil.copy(path / "grid-pagoda32.png", DOCS / "variants" / f"grid-{label}.png")
            shutil.copy(path / "results.csv", DOCS / "variants" / f"results-{label}.csv")
            shutil.copy(path / "pagoda-patches32.safetensors", DOCS / "variants" / f"{label}-pagoda-patches32.safetensors")
            shutil.copy(path / "pagoda-patches32-1nfe.safetensors", DOCS / "variants" / f"{label}-pagoda-patches32-1nfe.safetensors")
        variants = variants_section(candidates, scores, chosen, args.n_select)
        print(f"chosen: {chosen} ({run})", flush=True)
    train(run, args.overrides)
    gens = [run / f"pagoda-patches{r}.safetensors" for r in RES]
    tabs = [run / f"pagoda-patches{r}-1nfe.safetensors" for r in RES]
    if not gens[-1].is_file():  # the top generator was exported to export= (checkpoints/)
        gens[-1], tabs[-1] = REPO / "checkpoints" / "pagoda-patches32.safetensors", REPO / "checkpoints" / "tables" / "pagoda-patches32-1nfe.safetensors"
    DOCS.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(["method=pagoda", "model=patches8", f"n={args.n}", f"out_dir={DOCS}"])
    scored = run / "results.csv"
    if args.rescore or not scored.is_file() or len(read_results(str(scored))) != len(RES) + 1:
        rows = pagoda.evaluate_stages(cfg, [str(g) for g in gens], [str(t) for t in tabs], RES, str(DOCS))
    else:  # the run's own final evaluation (evaluate_at_end, same seeds and judges): copied, not recomputed
        for name in ("results.csv", "results.json", *(f"grid-pagoda{r}.png" for r in RES), "grid-upsampled32.png"):
            shutil.copy(run / name, DOCS / name)
        rows = read_results(str(DOCS / "results.csv"))
    for name in ("pagoda-patches8-loss.png", "pagoda-patches8-loss.csv"):
        if (run / name).is_file():
            shutil.copy(run / name, DOCS / name)
    config, gmeta = read_net_header(str(gens[-1]))
    hydra = run / ".hydra" / "config.yaml"  # the run's own settings (the defaults for a run made by train() here)
    trained = OmegaConf.load(hydra) if hydra.is_file() else cfg
    data = gmeta.get("data", {})
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "train_seconds": float(gmeta.get("train_seconds", float("nan"))), "data_seconds": float(data.get("seconds", float("nan"))),
            "n_pairs": 2 * int(data.get("n_data", 0)), "base_steps": int(trained.base_steps), "steps": int(trained.steps),
            "batch_size": int(trained.batch_size), "threads": f"{gmeta.get('threads', trained.get('num_threads') if hydra.is_file() else '?')} thread(s)",
            "rec": rec_description(gmeta), **base_description(gmeta, RES, base_timing(timing_net)),
            "command": command_of(run)}
    teacher32 = read_results(str(PATCHES_CSV))
    PAGE.write_text(markdown(rows, teacher32, meta) + probe_section(DOCS / "d-probe.csv") + variants
                    + (f"\n## Notes\n\n{args.note}\n" if args.note else ""))
    print(PAGE)
    if args.ship:
        dest = REPO / "checkpoints"
        kept = gmeta.get("base_generator")  # a base kept from another file is shipped already (or ships as that file)
        for g, t in zip(gens, tabs):
            if kept and g.name == f"pagoda-patches{RES[0]}.safetensors":
                continue
            if g.parent != dest:
                shutil.copy(g, dest / g.name)
                shutil.copy(t, dest / "tables" / t.name)


if __name__ == "__main__":
    main()
