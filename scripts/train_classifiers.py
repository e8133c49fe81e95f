"""Train the two shipped digits feature nets (fixed seeds, CPU, under a minute each).

    python scripts/train_classifiers.py

Writes ``checkpoints/classifier-digits.safetensors`` (CNN: the main metric feature net) and
``checkpoints/classifier-digits-b.safetensors`` (MLP: the independent second feature net), both
trained on the 1,497 training digits of ``optimize.data.digits`` and checked on the 300 held-out ones.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from optimize.classifier import accuracy, save_classifier, train_classifier  # noqa: E402
from optimize.data import digits  # noqa: E402

CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
NETS = (("classifier-digits", {"arch": "cnn"}, 60), ("classifier-digits-b", {"arch": "mlp"}, 100))


def main() -> None:
    """Train both feature nets and print their accuracies."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(CKPT, exist_ok=True)
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


if __name__ == "__main__":
    main()
