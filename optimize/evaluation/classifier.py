"""Digits classifiers used as metric feature nets (KID / Frechet distance).

Two independently trained architectures, so a sampler tuned on one feature space is also judged on
the other:

- ``cnn``: conv3x3(1->c)-ReLU-conv3x3(c->2c)-ReLU-maxpool2 -> conv3x3(2c->2c)-ReLU-maxpool2 ->
  flatten(2c*2*2) -> linear(feat)-ReLU [features] -> linear(10) [logits].
- ``mlp``: flatten(64) -> linear(hidden)-ReLU -> linear(feat)-ReLU [features] -> linear(10).

Inputs are ``[B, 1, 8, 8]`` in [-1, 1]. Training minimises cross-entropy with Adam, augmenting each
image by a random integer shift of at most ``max_shift`` pixels (background value -1 filled in).
Files are safetensors with ``{"format": "optimize.classifier", "config": JSON}`` in the header.

Below them: the RGB patches' feature nets (``patch_cnn``, ``patch_strided``) and the captioned digits' multi-head nets
(``captioned_cnn``, ``captioned_strided``: one head per label, e.g. digit, colour and background).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from samplers.artifact import atomic_save

CLASSIFIER_FORMAT = "optimize.classifier"
DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"channels": 32, "feat": 128, "num_classes": 10},
    "mlp": {"hidden": 256, "feat": 128, "num_classes": 10},
}


class DigitsCNN(nn.Module):
    """Small CNN; ``features`` is the ReLU output of the penultimate linear layer, ``[B, feat]``."""

    input_size = 8  # images are 8x8

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

    input_size = 8  # images are 8x8

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


# --- feature nets of the RGB patches (data=patches): self-supervised targets, two different architectures ---------
class PatchCNN(nn.Module):
    """VGG-style net on ``[B, 3, 32, 32]``: two 3x3 convs per level at 32, 16 and 8 pixels (max-pool between), flatten
    of the 4x4 map -> linear(feat)-ReLU [features] -> heads: source photograph and the 4x4 grid cell of its position
    (``num_classes = photos + cells``, two cross-entropies)."""

    input_size = 32  # images are 32x32

    def __init__(self, channels: int = 16, feat: int = 128, photos: int = 8, cells: int = 16):
        super().__init__()
        c = channels
        self.convs = nn.ModuleList([nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1),
                                    nn.Conv2d(c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                                    nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.Conv2d(4 * c, 4 * c, 3, padding=1)])
        self.fc = nn.Linear(4 * c * 16, feat)
        self.head = nn.Linear(feat, photos + cells)
        self.photos = photos

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feat]``."""
        h = x
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            if i % 2 == 1:
                h = F.max_pool2d(h, 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, photos + cells]`` (photograph logits first)."""
        return self.head(self.features(x))


class PatchStrided(nn.Module):
    """A different design on ``[B, 3, 32, 32]``: a 5x5 stride-2 conv, two 3x3 stride-2 convs with GroupNorm and SiLU,
    then the per-channel mean and standard deviation over the 4x4 map beside the flattened map -> linear(feat)-ReLU
    [features] -> heads: the rotation of the input (0/90/180/270 degrees) and its source photograph
    (``num_classes = 4 + photos``)."""

    input_size = 32  # images are 32x32

    def __init__(self, channels: int = 32, feat: int = 128, photos: int = 8):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(3, c, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(8, 2 * c)
        self.conv3 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.norm3 = nn.GroupNorm(8, 4 * c)
        self.fc = nn.Linear(8 * c + 4 * c * 16, feat)
        self.head = nn.Linear(feat, 4 + photos)
        self.photos = photos

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feat]``."""
        h = F.silu(self.conv1(x))
        h = F.silu(self.norm2(self.conv2(h)))
        h = F.silu(self.norm3(self.conv3(h))).flatten(2)
        return F.relu(self.fc(torch.cat([h.mean(2), h.std(2), h.flatten(1)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 4 + photos]`` (rotation logits first)."""
        return self.head(self.features(x))


ARCHS: dict[str, type[nn.Module]] = {"cnn": DigitsCNN, "mlp": DigitsMLP, "patch_cnn": PatchCNN, "patch_strided": PatchStrided}
DEFAULTS.update({"patch_cnn": {"channels": 16, "feat": 128, "photos": 8, "cells": 16},
                 "patch_strided": {"channels": 32, "feat": 128, "photos": 8}})


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


def _train(config: dict[str, Any], n: int, loss_of: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
           epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int) -> nn.Module:
    """The loop every feature net shares: AdamW, cosine decay over all steps, shuffled batches of ``n`` examples;
    ``loss_of(model, idx, gen)`` is the batch's loss (augmentations draw from ``gen``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_classifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            loss = loss_of(model, perm[i : i + batch_size], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_classifier(config: dict[str, Any], x: torch.Tensor, y: torch.Tensor, epochs: int = 60, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 1e-4, max_shift: int = 1, seed: int = 0) -> nn.Module:
    """Cross-entropy training with AdamW, cosine learning-rate decay and random-shift augmentation."""
    return _train(config, len(x), lambda model, idx, gen: F.cross_entropy(model(random_shift(x[idx], max_shift, gen)), y[idx]),
                  epochs, batch_size, lr, weight_decay, seed)


def save_classifier(model: nn.Module, config: dict[str, Any], path: str, extra_metadata: dict | None = None) -> str:
    """Atomically write weights + ``config`` (JSON header) to ``path``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": CLASSIFIER_FORMAT, "config": json.dumps(config, sort_keys=True),
              "metadata": json.dumps(extra_metadata or {}, sort_keys=True)}
    return atomic_save(tensors, path, header)


def load_classifier(path: str, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild and load a classifier written by ``save_classifier`` (eval mode, no grad)."""
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a classifier file (format {header.get('format')!r}, expected {CLASSIFIER_FORMAT!r}).")
    model = build_classifier(json.loads(header["config"]))
    model.load_state_dict(load_file(path), strict=True)
    model.config = json.loads(header["config"])
    return model.to(device).eval().requires_grad_(False) if device is not None else model.eval().requires_grad_(False)


# --- training the patch feature nets ------------------------------------------------------------------------------
def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each image ``x[b]`` rotated by ``k[b] * 90`` degrees."""
    out = x.clone()
    for r in range(1, 4):
        sel = torch.nonzero(k == r).squeeze(1)
        out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out


def patch_targets(model: nn.Module, x: torch.Tensor, photo: torch.Tensor, cell: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]:
    """(input, [(logit slice, labels)]) of one batch for a patch feature net: PatchCNN predicts photograph and cell of
    ``x``; PatchStrided predicts the random rotation applied to ``x`` and the photograph."""
    if isinstance(model, PatchCNN):
        return x, [(slice(0, model.photos), photo), (slice(model.photos, None), cell)]
    k = torch.randint(0, 4, (len(x),), generator=generator)
    return _rotate(x, k), [(slice(0, 4), k), (slice(4, None), photo)]


def patch_accuracies(model: nn.Module, x: torch.Tensor, photo: torch.Tensor, cell: torch.Tensor, batch_size: int = 500,
                     seed: int = 0) -> dict[str, float]:
    """Held-out probe quality: the accuracy of each head (rotations drawn with ``seed``)."""
    names = ["photo", "cell"] if isinstance(model, PatchCNN) else ["rotation", "photo"]
    gen = torch.Generator().manual_seed(seed)
    hits = [0, 0]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            inp, heads = patch_targets(model, x[i:i + batch_size], photo[i:i + batch_size], cell[i:i + batch_size], gen)
            logits = model(inp)
            for j, (sl, y) in enumerate(heads):
                hits[j] += int((logits[:, sl].argmax(1) == y).sum())
    return {f"{n}_accuracy": h / len(x) for n, h in zip(names, hits)}


def train_patch_features(config: dict[str, Any], x: torch.Tensor, photo: torch.Tensor, cell: torch.Tensor, epochs: int = 4,
                         batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """A patch feature net trained with the sum of its heads' cross-entropies (AdamW, cosine decay); no augmentation
    beyond what the crops carry (random positions and flips) and PatchStrided's rotations."""

    def loss_of(model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        inp, heads = patch_targets(model, x[idx], photo[idx], cell[idx], gen)
        logits = model(inp)
        return sum(F.cross_entropy(logits[:, sl], y) for sl, y in heads)

    return _train(config, len(x), loss_of, epochs, batch_size, lr, weight_decay, seed)


# --- the judge and feature nets of the captioned digits (optimize.data.captioned): supervised, one head per label -----
class CaptionedCNN(PatchCNN):
    """PatchCNN's VGG-style trunk on ``[B, 3, 32, 32]``; its last linear layer gives the logits of several labels,
    concatenated (``heads``: the class count of each, e.g. (10, 6, 5) for digit, colour and background)."""

    def __init__(self, channels: int = 16, feat: int = 128, heads: tuple[int, ...] = (10, 6, 5)):
        super().__init__(channels, feat, photos=sum(heads), cells=0)  # head: linear(feat, sum(heads))
        self.heads = tuple(int(h) for h in heads)


class CaptionedStrided(PatchStrided):
    """PatchStrided's strided trunk (mean/std pooling) on ``[B, 3, 32, 32]`` with the concatenated logits of
    ``heads`` as CaptionedCNN."""

    def __init__(self, channels: int = 32, feat: int = 128, heads: tuple[int, ...] = (10, 6, 5)):
        super().__init__(channels, feat, photos=sum(heads) - 4)  # head: linear(feat, 4 + photos) = sum(heads)
        self.heads = tuple(int(h) for h in heads)


ARCHS.update({"captioned_cnn": CaptionedCNN, "captioned_strided": CaptionedStrided})
DEFAULTS.update({"captioned_cnn": {"channels": 16, "feat": 128, "heads": [10, 6, 5]},
                 "captioned_strided": {"channels": 32, "feat": 128, "heads": [10, 6, 5]}})


def head_slices(heads: tuple[int, ...]) -> list[slice]:
    """The logit columns of each head: ``(10, 6, 5) -> [0:10, 10:16, 16:21]``."""
    ends = torch.tensor(heads).cumsum(0).tolist()
    return [slice(e - h, e) for h, e in zip(heads, ends)]


def predict_heads(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The argmax of every head of a multi-head net, ``[N, len(model.heads)]`` int64."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size])
            out.append(torch.stack([logits[:, s].argmax(1) for s in head_slices(model.heads)], dim=1))
    return torch.cat(out) if out else torch.empty((0, len(model.heads)), dtype=torch.int64)


def head_accuracies(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """Per head ``<name>_accuracy`` (fraction of argmax == label) and ``all_accuracy`` (every head right at once)."""
    hits = predict_heads(model, x) == labels
    return {**{f"{n}_accuracy": float(hits[:, j].double().mean()) for j, n in enumerate(names)},
            "all_accuracy": float(hits.all(1).double().mean())}


def train_multihead(config: dict[str, Any], x: torch.Tensor, labels: torch.Tensor, epochs: int = 4, batch_size: int = 128,
                    lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """A multi-head net trained with the sum of its heads' cross-entropies on ``labels [N, heads]`` (AdamW, cosine
    decay; no augmentation beyond the variety the data carries)."""

    def loss_of(model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        logits = model(x[idx])
        return sum(F.cross_entropy(logits[:, s], labels[idx, j]) for j, s in enumerate(head_slices(model.heads)))

    return _train(config, len(x), loss_of, epochs, batch_size, lr, weight_decay, seed)
