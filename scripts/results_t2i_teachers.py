"""Prompt adherence of the tiny text-to-image teachers (checkpoints/sd-tiny, checkpoints/sd3-tiny) on HELD-OUT prompts.

    python scripts/results_t2i_teachers.py [--per-prompt K] [--teachers sd-tiny sd3-tiny] [--guidance 1 3 7.5]

Each teacher runs in its stock pipeline (``from_pretrained``, the folder's own scheduler: PNDM for sd-tiny as SD 1.5
ships it, FlowMatchEulerDiscrete with the folder's shift for sd3-tiny) for 50 steps at each guidance scale on the 60
held-out prompts of ``optimize.data.captioned`` (combinations no teacher saw), K samples per prompt: sample j has
prompt ``j mod 60`` and the generator seeded ``j``, the same for every teacher and scale. The judge
(``checkpoints/features-captioned-judge.safetensors``) reads digit, colour and background from each decoded image;
adherence is the fraction of samples whose head equals the prompt's word (and all three at once), with the binomial
standard error ``sqrt(p (1 - p) / n)``. FD uses the second feature net (``features-captioned-b``, never used by any
learner) against real held-out images (held-out digit images under held-out prompts), with its bootstrap standard
error, beside the real-vs-real floor (a second, independent real draw of the same size).

Reference rows: real held-out images, and their VAE reconstructions (the ceiling a teacher decoding through this VAE
can reach). Grids: ``docs/results/t2i/grid-<teacher>-w<scale>.png``, 8 held-out prompts (rows) x 6 seeds, the same
for every teacher and scale. Rows go to ``docs/results/t2i/teachers.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from optimize.data.captioned import caption, captioned_digits, parse_caption, prompt_split
from optimize.evaluation.classifier import load_classifier, predict_heads
from optimize.evaluation.metrics import fd_estimate
from optimize.evaluation.results import read_results, write_csv
from samplers.images import write_png_grid

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "t2i"
TEACHERS = ("sd-tiny", "sd3-tiny")
GUIDANCE = (1.0, 3.0, 7.5)
STEPS = 50
HEADS = ("digit", "colour", "background")
JUDGE = ROOT / "checkpoints" / "features-captioned-judge.safetensors"
FEATURES = ROOT / "checkpoints" / "features-captioned-b.safetensors"
GRID_PROMPTS = 8  # held-out prompts 0, 7, 14, ... of the 60
GRID_SEEDS = 6
GRID_SEED_BASE = 1_000_000  # grid samples draw their own seeds, apart from the scored ones
REAL_SEED, FLOOR_SEED = 0, 1
N_BOOT = 200


def heldout_prompts() -> list[str]:
    """The 60 held-out captions, digit-major (``prompt_split("heldout")``)."""
    return [caption(*map(int, row)) for row in prompt_split("heldout")]


def load_pipeline(folder: Path):
    """The stock pipeline of a teacher folder (offline, safetensors)."""
    from diffusers import DiffusionPipeline  # optional dependency: the text-to-image teachers

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int = STEPS,
             batch: int = 60) -> torch.Tensor:
    """Decoded images ``[N, 3, 32, 32]`` in [-1, 1]: prompt ``prompts[i]`` with the generator seeded ``seeds[i]``."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        with torch.no_grad():
            images = pipe(prompt=prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="pt").images
        out.append(images.float() * 2 - 1)
    return torch.cat(out)


def adherence(judge: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per head and all three: the fraction of judged labels equal to the prompt's, with its binomial standard error."""
    hits = predict_heads(judge, x) == labels
    cols = {**{h: hits[:, j] for j, h in enumerate(HEADS)}, "all": hits.all(1)}
    row = {}
    for name, h in cols.items():
        p = float(h.double().mean())
        row[name] = round(p, 4)
        row[f"{name}_se"] = round((p * (1 - p) / len(h)) ** 0.5, 4)
    return row


def fd_row(features: torch.nn.Module, x: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """FD of ``x`` to ``real`` in the feature net's space, with the bootstrap standard error."""
    with torch.no_grad():
        est = fd_estimate(features.features(x), features.features(real), n_boot=N_BOOT, seed=0)
    return {"fd_b": round(est.value, 4), "fd_b_se": round(float(est.boot.std(ddof=1)), 4)}


def tidy(row: dict) -> dict:
    """A row read back from the CSV with its integer columns as integers again."""
    return {k: int(v) if k in ("steps", "n") and isinstance(v, float) and v.is_integer() else v for k, v in row.items()}


def ordered(rows: list[dict]) -> list[dict]:
    """Reference rows first, then the teachers in TEACHERS order (stable within a teacher)."""
    rank = {t: i + 1 for i, t in enumerate(TEACHERS)}
    return sorted(rows, key=lambda r: rank.get(r["teacher"], 0))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-prompt", type=int, default=5, help="samples per held-out prompt (n = 60 K)")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    ap.add_argument("--guidance", nargs="+", type=float, default=list(GUIDANCE))
    args = ap.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else 1)
    if not JUDGE.is_file():
        raise SystemExit(f"error: the judge {JUDGE} is missing (scripts/train_captioned_judges.py).")
    judge, features = load_classifier(str(JUDGE)), load_classifier(str(FEATURES))
    prompts = heldout_prompts()
    n = len(prompts) * args.per_prompt
    seeds = list(range(n))
    texts = [prompts[j % len(prompts)] for j in seeds]
    labels = torch.tensor([parse_caption(t) for t in texts])
    real = captioned_digits(n, seed=REAL_SEED, images="heldout", prompts="heldout")
    floor = captioned_digits(n, seed=FLOOR_SEED, images="heldout", prompts="heldout")
    base = {"steps": "", "guidance": "", "prompts": "heldout", "n": n}
    rows = [{"teacher": "real held-out images", "scheduler": "", **base, **adherence(judge, real.x, real.labels),
             **fd_row(features, floor.x, real.x), "seconds": ""}]
    vae = load_pipeline(ROOT / "checkpoints" / TEACHERS[0]).vae
    with torch.no_grad():
        recon = vae.decode(vae.encode(real.x).latent_dist.mode()).sample.clamp(-1, 1)
    rows.append({"teacher": "VAE reconstruction", "scheduler": "", **base, **adherence(judge, recon, real.labels),
                 **fd_row(features, recon, real.x), "seconds": ""})
    print(rows[0], rows[1], sep="\n", flush=True)
    csv = OUT / "teachers.csv"
    kept = [tidy(r) for r in read_results(str(csv)) if r["teacher"] in TEACHERS and r["teacher"] not in args.teachers] \
        if csv.is_file() else []  # the rows of teachers not rerun this time
    grid_prompts = [prompts[7 * i] for i in range(GRID_PROMPTS) for _ in range(GRID_SEEDS)]
    grid_seeds = [GRID_SEED_BASE + k for k in range(len(grid_prompts))]
    OUT.mkdir(parents=True, exist_ok=True)
    for teacher in args.teachers:
        pipe = load_pipeline(ROOT / "checkpoints" / teacher)
        shift = pipe.scheduler.config.get("shift")
        sched = type(pipe.scheduler).__name__ + (f"(shift={shift:g})" if shift is not None else "")
        for w in args.guidance:
            t0 = time.perf_counter()
            x = generate(pipe, texts, seeds, w)
            seconds = round(time.perf_counter() - t0, 1)
            row = {"teacher": teacher, "scheduler": sched, "steps": STEPS, "guidance": w, "prompts": "heldout", "n": n,
                   **adherence(judge, x, labels), **fd_row(features, x, real.x), "seconds": seconds}
            rows.append(row)
            print(row, flush=True)
            grid = generate(pipe, grid_prompts, grid_seeds, w)
            write_png_grid(grid, str(OUT / f"grid-{teacher}-w{w:g}.png"), nrow=GRID_SEEDS, scale=2)
            write_csv(ordered(rows + kept), str(csv))
    write_csv(ordered(rows + kept), str(csv))
    print(f"wrote {(OUT / 'teachers.csv').relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
