"""How far each candidate teacher solve of ``best`` is from the same solver at three times the NFE
(``optimize.training.distill.teacher_gap``, the check ``best`` prints before fitting), on the selection prompts'
first noises of both tiny text-to-image teachers: why the flow teacher needs ``teacher_grid=native``.
Writes ``docs/results/t2i/teacher-gap.csv`` (per-noise relative RMS gap: mean and standard error).

    python scripts/t2i_teacher_gap.py [--n 8]
"""

from __future__ import annotations

import argparse
import math

import torch
from omegaconf import OmegaConf

from samplers import make_noise

from optimize.base import REPO
from optimize.base.seeds import VAL_SEED_OFFSET, seed_range
from optimize.data.models import load_model, native_sigmas
from optimize.evaluation.results import write_csv
from optimize.training.distill import teacher_gap

OUT = REPO / "docs" / "results" / "t2i" / "teacher-gap.csv"
TEACHERS = {"sd-tiny": [("unipc", 20, "karras"), ("unipc", 20, "native")],
            "sd3-tiny": [("unipc", 20, "karras"), ("unipc", 20, "native"), ("euler", 50, "native")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="selection noises (seeds 3000000..)")
    args = ap.parse_args()
    rows = []
    for name, solves in TEACHERS.items():
        mcfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
        mcfg.prompts = str(REPO / "conf" / "prompts" / "captioned-selection.txt")
        model, native = load_model(mcfg), native_sigmas(mcfg)
        lo, hi = float(native[0]), float(native[-1])
        seeds = seed_range(VAL_SEED_OFFSET, 0, args.n)
        e, cond = make_noise(1, model.shape, seeds, dtype=model.dtype)[0], model.cond_of(seeds)
        for solver, nfe, grid in solves:
            gaps = [teacher_gap(model.denoiser, e[i:i + 1], solver, nfe, lo, hi, cond[i:i + 1],
                                native if grid == "native" else None) for i in range(len(e))]
            mean = sum(gaps) / len(gaps)
            se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
            rows.append({"teacher": name, "solver": solver, "nfe": nfe, "grid": grid, "finer_nfe": 3 * nfe,
                         "gap": mean, "gap_se": se, "n": len(gaps)})
            print(f"{name} {solver}@{nfe} {grid}: {mean:.3f} ± {se:.3f}", flush=True)
    write_csv(rows, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
