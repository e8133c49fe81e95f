"""Digits classifiers used as metric feature nets (KID / Frechet distance).

Two independently trained architectures, so a sampler tuned on one feature space is also judged on
the other:

- ``cnn``: conv3x3(1->c)-ReLU-conv3x3(c->2c)-ReLU-maxpool2 -> conv3x3(2c->2c)-ReLU-maxpool2 ->
  flatten(2c*2*2) -> linear(feat)-ReLU [features] -> linear(10) [logits].
- ``mlp``: flatten(64) -> linear(hidden)-ReLU -> linear(feat)-ReLU [features] -> linear(10).

Inputs are ``[B, 1, 8, 8]`` in [-1, 1]. Training minimises cross-entropy with Adam, augmenting each
image by a random integer shift of at most ``max_shift`` pixels (background value -1 filled in).
Files are safetensors with ``{"format": "optimize.classifier", "config": JSON}`` in the header.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

CLASSIFIER_FORMAT = "optimize.classifier"
DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"channels": 32, "feat": 128, "num_classes": 10},
    "mlp": {"hidden": 256, "feat": 128, "num_classes": 10},
}


class DigitsCNN(nn.Module):
    """Small CNN; ``features`` is the ReLU output of the penultimate linear layer, ``[B, feat]``."""

    def __init__(self, channels: int = 32, feat: int = 128, num_classes: int = 10):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * 4, feat)
        self.head = nn.Linear(feat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feat]``."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pool2d(h, 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.features(x))


class DigitsMLP(nn.Module):
    """Two-hidden-layer MLP on the 64 pixels; ``features`` is the second hidden layer, ``[B, feat]``."""

    def __init__(self, hidden: int = 256, feat: int = 128, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, feat)
        self.head = nn.Linear(feat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feat]``."""
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.features(x))


ARCHS: dict[str, type[nn.Module]] = {"cnn": DigitsCNN, "mlp": DigitsMLP}


def build_classifier(config: dict[str, Any]) -> nn.Module:
    """Classifier from ``{"arch": "cnn" | "mlp", ...options}`` (missing options take DEFAULTS)."""
    arch = config.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown classifier architecture {arch!r}; valid: {', '.join(ARCHS)}.")
    opts = {**DEFAULTS[arch], **{k: v for k, v in config.items() if k != "arch"}}
    return ARCHS[arch](**opts)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image translated by integer ``(dy, dx)`` uniform in ``[-max_shift, max_shift]``, filled with -1."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    d = torch.randint(0, 2 * m + 1, (b, 2), generator=generator)
    rows = (d[:, 0, None] + torch.arange(h)[None])  # [B, H]
    cols = (d[:, 1, None] + torch.arange(w)[None])  # [B, W]
    bi = torch.arange(b)[:, None, None]
    return padded[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``argmax model(x) == y``."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def train_classifier(config: dict[str, Any], x: torch.Tensor, y: torch.Tensor, epochs: int = 60, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 1e-4, max_shift: int = 1, seed: int = 0) -> nn.Module:
    """Cross-entropy training with AdamW, cosine learning-rate decay and random-shift augmentation."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_classifier(model: nn.Module, config: dict[str, Any], path: str, extra_metadata: dict | None = None) -> str:
    """Atomically write weights + ``config`` (JSON header) to ``path``."""
    from samplers.artifact import atomic_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": CLASSIFIER_FORMAT, "config": json.dumps(config, sort_keys=True),
              "metadata": json.dumps(extra_metadata or {}, sort_keys=True)}
    return atomic_save(tensors, path, header)


def load_classifier(path: str, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild and load a classifier written by ``save_classifier`` (eval mode, no grad)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a classifier file (format {header.get('format')!r}, expected {CLASSIFIER_FORMAT!r}).")
    model = build_classifier(json.loads(header["config"]))
    model.load_state_dict(load_file(path), strict=True)
    model.config = json.loads(header["config"])
    return model.to(device).eval().requires_grad_(False) if device is not None else model.eval().requires_grad_(False)
