"""Train the captioned digits' judge and feature nets (fixed seeds, CPU, about 4 minutes on one core).

    python scripts/train_captioned_judges.py

Each net reads a ``[B, 3, 32, 32]`` image of ``optimize.data.captioned`` and has three heads: the digit, the
foreground colour and the background. Each is trained on its own fresh draw of training-split digit images under all
300 prompts (``captioned_digits(N_TRAIN, seed, images="train", prompts="all")``), so no net ever sees a held-out digit
image or a held-out background pixel:

- ``checkpoints/features-captioned-judge.safetensors`` (captioned_strided, 32 channels, seed 0): the prompt-adherence
  judge (are the digit, the colour and the background of a sample those of its prompt?);
- ``checkpoints/features-captioned-a.safetensors`` (captioned_cnn, 8 channels, seed 1): the main FD feature net, the
  one learners may train or select on;
- ``checkpoints/features-captioned-b.safetensors`` (captioned_strided, 16 channels, seed 2): the second FD feature
  net, never used by any learner.

Each is reported on real held-out images (held-out digit images on held-out prompts, and on training prompts) and on
its first 2,000 training images: the accuracy of each head and of all three at once, written to the file's metadata
and to ``docs/results/t2i/judge.csv``. On a shared 2-core machine one thread was about 5x faster than two contended
ones, so the script uses one unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from optimize.data.captioned import captioned_digits
from optimize.evaluation.classifier import head_accuracies, save_classifier, train_multihead
from optimize.evaluation.results import write_csv

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"
CSV = ROOT / "docs" / "results" / "t2i" / "judge.csv"
HEADS = ("digit", "colour", "background")
N_TRAIN = 24_000
N_EVAL = 2_000
EVAL_SEED = 0  # the evaluation draws; every training draw uses another seed (TRAIN_SEED_BASE + net seed)
TRAIN_SEED_BASE = 100
# (file stem, config, epochs, seed)
NETS = (
    ("features-captioned-judge", {"arch": "captioned_strided", "channels": 32}, 8, 0),
    ("features-captioned-a", {"arch": "captioned_cnn", "channels": 8}, 12, 1),
    ("features-captioned-b", {"arch": "captioned_strided", "channels": 16}, 8, 2),
)
EVAL_SETS = (("heldout", "heldout"), ("heldout", "train"))  # (digit images, prompts) of the held-out reports


def train_net(name: str, config: dict, epochs: int, seed: int) -> list[dict]:
    """Train one net, save it with its accuracies in the metadata and return its CSV rows."""
    train = captioned_digits(N_TRAIN, seed=TRAIN_SEED_BASE + seed, images="train", prompts="all")
    t0 = time.time()
    model = train_multihead(config, train.x, train.labels, epochs=epochs, seed=seed)
    seconds = round(time.time() - t0, 1)
    rows = []
    for images, prompts in EVAL_SETS:
        real = captioned_digits(N_EVAL, seed=EVAL_SEED, images=images, prompts=prompts)
        rows.append({"images": images, "prompts": prompts, "n": N_EVAL, **head_accuracies(model, real.x, real.labels, HEADS)})
    rows.append({"images": "train (fit)", "prompts": "all", "n": N_EVAL,
                 **head_accuracies(model, train.x[:N_EVAL], train.labels[:N_EVAL], HEADS)})
    meta = {"heads": list(HEADS), "epochs": epochs, "seed": seed, "n_train": N_TRAIN, "train_seed": TRAIN_SEED_BASE + seed,
            "train_seconds": seconds, "threads": torch.get_num_threads(), "accuracies": rows,
            "split": "optimize.data.captioned: training digit images under all prompts / held-out digit images"}
    path = save_classifier(model, config, str(CKPT / f"{name}.safetensors"), meta)
    print(f"{name}: {config['arch']} ({config['channels']} channels) {seconds:.0f} s -> {path}", flush=True)
    out = []
    for r in rows:
        print(f"  {r['images']:>12} images, {r['prompts']:>8} prompts: " + ", ".join(f"{h} {r[f'{h}_accuracy']:.4f}"
                                                                                    for h in (*HEADS, "all")), flush=True)
        out.append({"file": f"checkpoints/{name}.safetensors", "arch": config["arch"], "channels": config["channels"],
                    "seed": seed, **r, "train_seconds": seconds})
    return out


def main(argv: list[str]) -> None:
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return
    if argv:
        print(f"error: this script takes no arguments, got {' '.join(argv)}.", file=sys.stderr)
        raise SystemExit(2)
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else 1)
    t0 = time.time()
    rows = [row for name, config, epochs, seed in NETS for row in train_net(name, config, epochs, seed)]
    CSV.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(CSV))
    print(f"wrote {CSV.relative_to(ROOT)} ({time.time() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
