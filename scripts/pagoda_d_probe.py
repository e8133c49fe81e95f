"""Can PaGoDA's discriminator tell a generator's samples from real patches at all? -> docs/results/pagoda/d-probe.csv

    python scripts/pagoda_d_probe.py --label shipped       # the shipped generators (checkpoints/pagoda-patches{8,16,32})
    python scripts/pagoda_d_probe.py --generators out/exp/pagoda-freq --label pixel-freq --no-teacher

A fresh ``optimize.methods.pagoda.Discriminator`` (the training's architecture and Adam settings) is trained with the
hinge loss against FIXED samples, for ``--steps`` steps of batch 32 at each learning rate, at each stage resolution R:

    L_D = E relu(1 - D(x_real)) + E relu(1 + D(x_fake)),   x_fake from a source below, x_real area-downsampled crops

and scored on samples and crops it never saw: held-out hinge loss and accuracy ``(P[D(real) > 0] + P[D(fake) < 0]) / 2``
with its standard error. Sources: the PaGoDA generator of resolution R (1 NFE), and the 8x8 teacher's converged solve
(dpmpp_2m@50) bicubically upsampled to R (the samples themselves at 8x8). Held-out accuracy 0.5 means this D cannot
separate the source from real patches even with the generator held still, so a training D at hinge loss 2 is not
a schedule failure there; accuracy well above 0.5 at a learning rate means a D of that rate has a signal to give.
Fakes come from seeds DATA + 500,000.. (``optimize.base.seeds``), real crops from the training region (seed 7),
so neither overlaps the evaluation seeds or the real sets the FDs use. Rows of the same ``--label`` (the generators'
name; the teacher's rows have none) replace those already in ``--out``; the others are kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from optimize import data
from optimize.base.seeds import DATA_SEED_OFFSET
from optimize.evaluation.evaluate import draw
from optimize.evaluation.results import read_results, write_csv
from optimize.methods.pagoda import Discriminator, area_downsample, hinge_loss
from samplers import SolverTable, baselines
from samplers.nets import load_denoiser

REPO = Path(__file__).resolve().parents[1]
RES = (8, 16, 32)
PROBE_SEED = DATA_SEED_OFFSET + 500_000


def generator_files(folder: Path) -> dict[int, tuple[Path, Path]] | None:
    """``{R: (generator, its 1-NFE table)}`` in a run folder (side by side) or in checkpoints/ (tables under tables/);
    None when one is missing."""
    files = {}
    for r in RES:
        gen = folder / f"pagoda-patches{r}.safetensors"
        table = next((t for t in (folder / f"pagoda-patches{r}-1nfe.safetensors", folder / "tables" / f"pagoda-patches{r}-1nfe.safetensors")
                      if t.is_file()), None)
        if not gen.is_file() or table is None:
            return None
        files[r] = (gen, table)
    return files


def fakes(files: dict[int, tuple[Path, Path]], n: int, teacher: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """``{(source, R): [n, 3, R, R]}`` for the generators ``files`` and (``teacher``) the upsampled teacher."""
    seeds = list(range(PROBE_SEED, PROBE_SEED + n))
    out = {}
    for r, (gen_path, table_path) in files.items():
        gen = load_denoiser(str(gen_path))
        out[("pagoda", r)] = draw(SolverTable.load(str(table_path), fingerprint=gen.fingerprint()), gen, gen.shape, seeds).clamp(-1, 1)
    if not teacher:
        return out
    net = load_denoiser(str(REPO / "checkpoints" / "edm-patches8.safetensors"))
    low = draw(baselines.build("dpmpp_2m", 50, sigma_min=0.002, sigma_max=80.0), net, net.shape, seeds).clamp(-1, 1)
    for r in RES:
        out[("teacher dpmpp_2m@50 bicubic", r)] = low if r == 8 else F.interpolate(low, size=r, mode="bicubic", align_corners=False)
    return out


def probe(real: torch.Tensor, fake: torch.Tensor, r: int, lr: float, steps: int, n_test: int) -> dict[str, float]:
    """Train a fresh D on all but the last ``n_test`` of each set; held-out hinge loss and accuracy (± se)."""
    torch.manual_seed(0)
    d = Discriminator(r, real.shape[1], 32, downsample="strided")
    opt = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.99))
    rtr, rte, ftr, fte = real[:-n_test], real[-n_test:], fake[:-n_test], fake[-n_test:]
    g = torch.Generator().manual_seed(1)
    tail = []
    for it in range(steps):
        i, j = torch.randint(len(rtr), (32,), generator=g), torch.randint(len(ftr), (32,), generator=g)
        loss = hinge_loss(d(rtr[i]), d(ftr[j]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it >= steps - 200:
            tail.append(float(loss.detach()))
    with torch.no_grad():
        dr, df = d(rte), d(fte)
    hits = torch.cat([(dr > 0).float(), (df < 0).float()])
    return {"train_hinge_last200": sum(tail) / len(tail),
            "heldout_hinge": float(hinge_loss(dr, df)),
            "heldout_accuracy": float(hits.mean()), "heldout_accuracy_se": float(hits.std() / len(hits) ** 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generators", type=Path, default=REPO / "checkpoints",
                        help="folder of pagoda-patches{8,16,32}.safetensors (and their -1nfe tables, under tables/ in checkpoints)")
    parser.add_argument("--label", required=True, help="a name for the generators (a run's label on results-pagoda.md)")
    parser.add_argument("--no-teacher", action="store_true", help="probe the generators only (the teacher's rows are kept)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-3])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "pagoda" / "d-probe.csv")
    args = parser.parse_args()
    if args.steps < 200 or args.n_train < 32 or args.n_test < 10 or any(not lr > 0 for lr in args.lrs):
        parser.error("need --steps >= 200, --n-train >= 32, --n-test >= 10 and positive --lrs")
    files = generator_files(args.generators)
    if files is None:
        parser.error(f"{args.generators} lacks a pagoda-patches{{8,16,32}} generator or its -1nfe table (beside it or under tables/)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    n = args.n_train + args.n_test
    sources = fakes(files, n, teacher=not args.no_teacher)
    real32 = data.patches("train", n, seed=7, resolution=32)
    rows = []
    for (source, r), fake in sources.items():
        real = area_downsample(real32, r)
        for lr in args.lrs:
            row = {"source": source, "generators": args.label if source == "pagoda" else "", "resolution": r, "d_lr": lr, "steps": args.steps, "n_train": args.n_train,
                   "n_test": args.n_test, **probe(real, fake, r, lr, args.steps, args.n_test)}
            rows.append(row)
            print(f"{source} at {r}x{r}, D lr {lr:g}: held-out accuracy {row['heldout_accuracy']:.3f} ± "
                  f"{row['heldout_accuracy_se']:.3f}, hinge {row['heldout_hinge']:.3f} (train {row['train_hinge_last200']:.3f})",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = {(r["source"], r["generators"]) for r in rows}
    kept = [r for r in read_results(str(args.out)) if (r["source"], r.get("generators") or "") not in new] if args.out.is_file() else []
    write_csv(kept + rows, str(args.out))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
