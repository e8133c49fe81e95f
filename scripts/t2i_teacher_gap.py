"""How far each candidate teacher solve of ``best`` is from the same solver at three times the NFE
(``optimize.training.distill.teacher_gap``, the check ``best`` prints before fitting), on the selection prompts'
first noises of both tiny text-to-image teachers: why the flow teacher needs ``teacher_grid=native``.
Writes ``docs/results/t2i/teacher-gap.csv`` (per-noise relative RMS gap: mean and standard error). With
``--write-tables`` it writes each candidate teacher solve as a table file instead (``teacher_table``, the solve the fits
match, named ``<teacher>-teacher-<solver><nfe>-<grid>``), for ``scripts/results_t2i.py`` to score on the held-out
seeds beside the 50-step solve: the fits' own target need not share its FD to data.

    python scripts/t2i_teacher_gap.py [--n 8]
    python scripts/t2i_teacher_gap.py --write-tables docs/results/t2i/tables
    python scripts/results_t2i.py --guidance 3 --nfe 20 --peers --study teacher-solve \
        --tables docs/results/t2i/tables/sd-tiny-teacher-unipc20-karras.safetensors
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from samplers import make_noise

from optimize.base import REPO
from optimize.base.seeds import VAL_SEED_OFFSET, seed_range
from optimize.data.models import diffusers_range, load_model, native_sigmas
from optimize.evaluation.results import write_csv
from optimize.training.distill import teacher_gap, teacher_table

OUT = REPO / "docs" / "results" / "t2i" / "teacher-gap.csv"
TEACHERS = {"sd-tiny": [("unipc", 20, "karras"), ("unipc", 20, "native")],
            "sd3-tiny": [("unipc", 20, "karras"), ("unipc", 20, "native"), ("euler", 50, "native")]}


def model_config(name: str) -> Any:
    """``conf/model/<name>.yaml`` with the selection prompts."""
    mcfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    mcfg.prompts = str(REPO / "conf" / "prompts" / "captioned-selection.txt")
    return mcfg


def write_tables(folder: Path) -> None:
    """Each candidate teacher solve as a table file in ``folder``, on the fits' sigma range (the model's own, as its
    config fills it: ``diffusers_range``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, solves in TEACHERS.items():
        mcfg = model_config(name)
        native, (low, high) = native_sigmas(mcfg), diffusers_range(mcfg)
        for solver, nfe, grid in solves:
            table = teacher_table(solver, nfe, low, high, native if grid == "native" else None)
            table.metadata.update(method=f"fit teacher {solver}@{nfe} ({grid})", model=name)
            path = folder / f"{name}-teacher-{solver}{nfe}-{grid}.safetensors"
            table.save(str(path))
            print(f"wrote {path}")


def measure(n: int) -> None:
    """Each candidate teacher solve's gap to its 3x finer solve on ``n`` selection noises: ``OUT``."""
    rows = []
    for name, solves in TEACHERS.items():
        mcfg = model_config(name)
        model, native = load_model(mcfg), native_sigmas(mcfg)
        lo, hi = float(native[0]), float(native[-1])
        seeds = seed_range(VAL_SEED_OFFSET, 0, n)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="selection noises (seeds 3000000..)")
    ap.add_argument("--write-tables", type=Path, default=None, metavar="DIR",
                    help="write the teacher solves as table files in DIR and measure nothing")
    args = ap.parse_args()
    if args.write_tables is not None:
        write_tables(args.write_tables)
    else:
        measure(args.n)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
