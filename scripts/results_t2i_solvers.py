"""Does sampling matter on the tiny text-to-image teachers? The stock pipelines with their stock few-step scheduler at
NFE 3-10 against the same pipeline's 50-step solve, on held-out prompts (issue 25's goal).

For each teacher (``checkpoints/sd-tiny``: StableDiffusionPipeline with DPMSolverMultistepScheduler;
``checkpoints/sd3-tiny``: StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler, its own scheduler class) and
guidance 7.5, the sample of seed s (s = 0..n-1, the evaluation range) starts from the same latents ``make_noise`` gives
that seed and gets held-out prompt ``s mod 60`` (``samplers.t2i.prompt_indices``). Every row is decoded by the VAE and
scored on the same seeds (paired):

- distance to the 50-step solve of the same seed: RMSE and PSNR (peak-to-peak 2) of the decoded images, mean over
  samples with its standard error;
- FD against real held-out images of held-out prompts on both feature nets (``features-captioned-a``, the one learners
  may use, and ``-b``, never used by a learner), with bootstrap standard errors counting both sets, and the paired FD
  difference to the 50-step row;
- prompt adherence: the judge (``features-captioned-judge``) reads digit, colour and background; the fraction with all
  three right, its binomial se, and the paired difference to the 50-step row;
- the real-vs-real floor: a second draw of real held-out images scored the same way.

Writes ``docs/results/t2i/solvers.csv``. The 50-step decoded images are kept under ``--cache`` (default
``out/t2i-cache``, one safetensors file per teacher, guidance and n) so later runs and ``results_t2i.py`` reuse them.

    python scripts/results_t2i_solvers.py [--n 1000] [--teachers sd-tiny sd3-tiny] [--nfe 3 4 5 6 8 10]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from samplers.t2i import prompt_indices, read_prompts
from samplers.table import make_noise

from optimize.base import REPO
from optimize.base.seeds import EVAL_SEED_OFFSET, seed_range
from optimize.data import captioned as cap
from optimize.evaluation import metrics, t2i
from optimize.evaluation.classifier import load_classifier
from optimize.evaluation.judge import Judge
from optimize.evaluation.results import paired, verdict, write_csv

OUT = REPO / "docs" / "results" / "t2i"
PROMPTS = REPO / "conf" / "prompts" / "captioned-heldout.txt"
FEATURES = [str(REPO / "checkpoints" / "features-captioned-a.safetensors"),
            str(REPO / "checkpoints" / "features-captioned-b.safetensors")]
JUDGE = REPO / "checkpoints" / "features-captioned-judge.safetensors"
REFERENCE_STEPS = t2i.REFERENCE_STEPS


def few_step_scheduler(pipe: Any) -> tuple[str, Any]:
    """The stock few-step scheduler a user picks: DPMSolverMultistep (dpmsolver++, order 2) for SD, FlowMatchEuler
    (the pipeline's own) for SD3."""
    return "DPM++2M" if getattr(pipe, "unet", None) is not None else "FlowMatchEuler"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", nargs="+", default=["sd-tiny", "sd3-tiny"])
    ap.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10])
    ap.add_argument("--n", type=int, default=1000, help="samples (evaluation seeds 0..n-1)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--root", type=Path, default=REPO / "checkpoints", help="folder holding the teachers' folders")
    ap.add_argument("--out", type=Path, default=OUT / "solvers.csv")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "t2i-cache", help="where the 50-step images are kept")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts_all = read_prompts(str(PROMPTS))
    seeds = seed_range(EVAL_SEED_OFFSET, 0, args.n)
    idx = prompt_indices(seeds, len(prompts_all))
    prompts = [prompts_all[i] for i in idx.tolist()]
    labels = torch.tensor([cap.parse_caption(p) for p in prompts])
    judge = Judge.for_model(OmegaConf.create({"name": "captioned", "data": "captioned-digits", "features": FEATURES,
                                             "clip": True}), (3, 32, 32), n_boot=args.n_boot)
    judge_net = load_classifier(str(JUDGE))
    rows: list[dict[str, Any]] = []
    real = cap.captioned_digits(args.n, seed=7, images="heldout", prompts="heldout")  # the floor: real vs real
    floor = {"teacher": "real", "scheduler": "real held-out images (another draw)", "nfe": 0, **judge.score(real.x),
             "adherence": float(t2i.adherence(judge_net, real.x, real.labels).mean())}
    rows.append(floor)
    for teacher in args.teachers:
        pipe = t2i.pipeline(args.root / teacher)
        latents = make_noise(1, t2i.latent_shape(pipe), seeds)[0]
        t0 = time.perf_counter()
        ref = t2i.reference_images(pipe, teacher, prompts, latents, args.guidance, args.batch, args.cache)
        hits_ref = t2i.adherence(judge_net, ref, labels)
        base = {"teacher": teacher, "scheduler": f"{type(pipe.scheduler).__name__} (stock)", "nfe": REFERENCE_STEPS,
                **judge.score(ref), "adherence": float(hits_ref.mean()), "_hits": hits_ref,
                "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(base)
        for nfe in args.nfe:
            label = few_step_scheduler(pipe)
            sched, call = t2i.stock_schedulers(pipe)[label](nfe)
            t0 = time.perf_counter()
            x, calls = t2i.pipeline_images(pipe, sched, prompts, latents, args.guidance, args.batch, **call)
            assert calls == nfe, (label, nfe, calls)
            hits = t2i.adherence(judge_net, x, labels)
            row = {"teacher": teacher, "scheduler": type(sched).__name__, "nfe": nfe, **metrics.distance(x, ref),
                   **judge.score(x), "adherence": float(hits.mean()), "_hits": hits,
                   "seconds": round(time.perf_counter() - t0, 1)}
            for key in ("fd_heldout_main", "fd_heldout_b"):
                row[f"d{key}_vs_50"], row[f"d{key}_vs_50_se"] = paired(row, base, key)
            row["dadherence_vs_50"], row["dadherence_vs_50_se"] = metrics.paired_mean(hits, hits_ref)
            rows.append(row)
            print(f"{teacher} {row['scheduler']} NFE {nfe}: RMSE to {REFERENCE_STEPS} steps {row['rmse']:.4f} ± "
                  f"{row['rmse_se']:.2g}, PSNR {row['psnr']:.2f}; FD held-out {row['fd_heldout_main']:.2f} "
                  f"({row['dfd_heldout_main_vs_50']:+.2f} ± {row['dfd_heldout_main_vs_50_se']:.2g} vs 50 steps: "
                  f"{verdict(row['dfd_heldout_main_vs_50'], row['dfd_heldout_main_vs_50_se'])}); adherence "
                  f"{row['adherence']:.3f} ({row['dadherence_vs_50']:+.3f} ± {row['dadherence_vs_50_se']:.2g})", flush=True)
    for r in rows:
        if "adherence" in r and "adherence_se" not in r:
            r["adherence_se"] = math.sqrt(max(r["adherence"] * (1 - r["adherence"]), 0.0) / args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
