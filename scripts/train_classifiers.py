"""Train the shipped feature nets (fixed seeds, CPU).

    python scripts/train_classifiers.py [digits] [patches]      (default: digits)

``digits`` writes ``checkpoints/classifier-digits.safetensors`` (CNN: the main metric feature net) and
``checkpoints/classifier-digits-b.safetensors`` (MLP: the independent second feature net), both trained on the
1,497 training digits of ``optimize.data.digits`` and checked on the 300 held-out ones (under a minute each).

``patches`` writes the two feature nets of the RGB patches (``optimize.data.patches``), both trained on random crops
of the training region only (self-supervised targets, no labels beyond where a crop comes from):
``checkpoints/features-patches.safetensors`` (PatchCNN: VGG-style, predicts the source photograph and the 4x4 grid cell
of the crop; the main net, the one DDSS trains on) and ``checkpoints/features-patches-b.safetensors`` (PatchStrided:
strided convs + mean/std pooling, predicts the rotation of the input and the photograph; reported as FD-b). Their
probe quality (each head's accuracy) on the 2,000 held-out patches is printed and stored in the file's metadata.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from optimize.evaluation.classifier import (accuracy, patch_accuracies, save_classifier, train_classifier,
                                 train_patch_features)
from optimize.data import digits

CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
NETS = (("classifier-digits", {"arch": "cnn"}, 60), ("classifier-digits-b", {"arch": "mlp"}, 100))
# (file stem, config, epochs) over PATCH_TRAIN_N random training crops (seed PATCH_TRAIN_SEED)
PATCH_NETS = (("features-patches", {"arch": "patch_cnn"}, 4), ("features-patches-b", {"arch": "patch_strided"}, 6))
PATCH_TRAIN_N = 20_000
PATCH_TRAIN_SEED = 2  # the teacher trains on seed-0 crops, the judge's training reference is seed 1


def train_digits() -> None:
    """Train both digits feature nets and print their accuracies."""
    (xt, yt), (xh, yh) = digits("train"), digits("heldout")
    for name, config, epochs in NETS:
        t0 = time.time()
        model = train_classifier(config, xt, yt, epochs=epochs, seed=0)
        acc_h, acc_t = accuracy(model, xh, yh), accuracy(model, xt, yt)
        path = save_classifier(model, config, os.path.join(CKPT, f"{name}.safetensors"),
                               {"heldout_accuracy": acc_h, "train_accuracy": acc_t, "epochs": epochs, "seed": 0,
                                "split": "optimize.data.digits train (1497) / heldout (300)"})
        print(f"{name}: {config['arch']} held-out accuracy {acc_h:.4f}, train {acc_t:.4f}, {time.time() - t0:.0f} s -> {path}",
              flush=True)


def patch_set(split: str, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patches, photograph index, 4x4 cell) of a split."""
    from optimize import data

    pos, flip = data.patch_positions(split, n, seed)
    x = data.patches(split, n, seed)
    return x, torch.from_numpy(pos[:, 0].copy()), torch.from_numpy(data.patch_cells(pos, flip))


def train_patches(n: int = PATCH_TRAIN_N, only: str | None = None) -> list[dict]:
    """Train both patch feature nets, print and return their held-out probe accuracies (chance: photo 1/8,
    cell 1/16, rotation 1/4)."""
    xt, pt, ct = patch_set("train", n, PATCH_TRAIN_SEED)
    xh, ph, ch = patch_set("heldout")
    rows = []
    for name, config, epochs in PATCH_NETS:
        if only is not None and name != only:
            continue
        t0 = time.time()
        model = train_patch_features(config, xt, pt, ct, epochs=epochs, seed=0)
        seconds = time.time() - t0
        held, train = patch_accuracies(model, xh, ph, ch), patch_accuracies(model, xt[:2000], pt[:2000], ct[:2000])
        meta = {"heldout": held, "train_first_2000": train, "epochs": epochs, "seed": 0, "n_train": n,
                "train_seed": PATCH_TRAIN_SEED, "train_seconds": round(seconds, 1),
                "split": "optimize.data.patches random train-region crops / the 2,000 held-out patches"}
        path = save_classifier(model, config, os.path.join(CKPT, f"{name}.safetensors"), meta)
        text = ", ".join(f"{k} {v:.4f}" for k, v in held.items())
        print(f"{name}: {config['arch']} held-out {text} (train {', '.join(f'{v:.4f}' for v in train.values())}), "
              f"{seconds:.0f} s -> {path}", flush=True)
        rows.append({"name": name, "arch": config["arch"], **{f"heldout_{k}": v for k, v in held.items()},
                     **{f"train_{k}": v for k, v in train.items()}, "train_seconds": round(seconds, 1)})
    return rows


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    threads = os.environ.get("OMP_NUM_THREADS")  # a shared machine: OMP_NUM_THREADS=1 is often faster than 2 contended threads
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(CKPT, exist_ok=True)
    targets = argv or ["digits"]
    for t in targets:
        if t not in ("digits", "patches"):
            print(f"error: unknown target {t!r}; valid: digits, patches.", file=sys.stderr)
            raise SystemExit(2)
    for t in targets:
        train_digits() if t == "digits" else train_patches()


if __name__ == "__main__":
    main(sys.argv[1:])
