"""The judge: feature nets and real data sets that samples are scored against, with honest uncertainties.

For every feature net and every real split, ``Judge.score`` gives

- ``kid_<split>_<net>`` and ``kid_se_<split>_<net>``: the unbiased MMD^2 (cubic kernel) on the whole sets and its
  two-sample jackknife standard error (``optimize.evaluation.metrics.kid_estimate``: it counts the sampling of the
  generated AND the real set, and errs on the large side);
- ``fd_<split>_<net>`` and ``fd_se_<split>_<net>``: the Frechet distance and its bootstrap standard error
  (``n_boot`` replicates resampling both sets, ``optimize.evaluation.metrics.fd_estimate``);
- ``sw_<split>`` for 2-D data (sliced Wasserstein, no interval);
- ``_estimates``: the estimates behind those numbers, from which ``optimize.evaluation.results.paired`` gives the paired
  difference of two rows scored on the same seeds (never written to results files).

The resamples are fixed by (number of rows, ``n_boot``, ``boot_seed``), so every set of the same size meets the
same bootstrap draws and paired differences are replicate-wise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open

from samplers.models import describe, import_target

from optimize import data as datasets
from optimize.base import ConfigError, as_list, resolve_path
from optimize.evaluation.classifier import CLASSIFIER_FORMAT, load_classifier
from optimize.data.folder import load_folder
from optimize.evaluation.metrics import N_BOOT, FDReference, fd_estimate, kid_estimate, sliced_wasserstein

REAL_N = 2000  # draws of the reference distribution for synthetic data (gmm, toy2d, shapes)
Features = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Judge:
    """Feature maps (name -> fn on ``[B, *shape]``) and real data sets (split -> tensor) to compare against."""

    features: dict[str, Features]
    real: dict[str, torch.Tensor]
    clip: bool = False  # clamp samples to [-1, 1] (image data range) before features
    n_boot: int = N_BOOT  # bootstrap replicates of FD (0: no FD interval, e.g. during training)
    boot_seed: int = 0
    _real_feats: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _fd_refs: dict[tuple[str, str], FDReference] = field(default_factory=dict, repr=False)

    def feats(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.features[name](x).reshape(x.shape[0], -1).to(torch.float64).cpu()

    def real_feats(self, split: str, name: str) -> torch.Tensor:
        if (split, name) not in self._real_feats:
            self._real_feats[(split, name)] = self.feats(name, self.real[split])
        return self._real_feats[(split, name)]

    def fd_reference(self, split: str, name: str) -> FDReference:
        if (split, name) not in self._fd_refs:
            self._fd_refs[(split, name)] = FDReference.of(self.real_feats(split, name), self.n_boot, self.boot_seed)
        return self._fd_refs[(split, name)]

    def restricted(self, splits: Sequence[str] | None = None, features: Sequence[str] | None = None,
                   n_boot: int | None = None) -> "Judge":
        """A judge that sees only some splits / feature nets (e.g. model selection on the training set with the
        first net, so held-out data and the second net stay independent of every choice a learner makes)."""
        splits = list(self.real) if splits is None else list(splits)
        features = list(self.features) if features is None else list(features)
        for s in splits:
            if s not in self.real:
                raise KeyError(f"no real split {s!r}; have {', '.join(self.real)}.")
        return replace(self, features={k: self.features[k] for k in features}, real={s: self.real[s] for s in splits},
                       n_boot=self.n_boot if n_boot is None else int(n_boot), _real_feats={}, _fd_refs={})

    def score(self, samples: torch.Tensor) -> dict[str, Any]:
        """KID and FD with standard errors per (split, feature set), sliced W2 per split for 2-D data, and the
        ``_estimates`` behind them (see the module docstring)."""
        x = samples.clamp(-1, 1) if self.clip else samples
        out: dict[str, Any] = {}
        estimates: dict[str, Any] = {}
        for name in self.features:
            f = self.feats(name, x)
            for split in self.real:
                k = kid_estimate(f, self.real_feats(split, name))
                fd = fd_estimate(f, self.fd_reference(split, name), seed=self.boot_seed)
                out[f"kid_{split}_{name}"], out[f"kid_se_{split}_{name}"] = k.value, k.se
                out[f"fd_{split}_{name}"] = fd.value
                if self.n_boot > 1:
                    out[f"fd_se_{split}_{name}"] = fd.se
                estimates[f"kid_{split}_{name}"], estimates[f"fd_{split}_{name}"] = k, fd
        if x[0].numel() == 2:
            for split, real in self.real.items():
                m = min(len(x), len(real))
                out[f"sw_{split}"] = sliced_wasserstein(x[:m].reshape(m, 2), real[:m].reshape(m, 2))
        out["_estimates"] = estimates
        return out

    @classmethod
    def for_model(cls, mcfg: Any, shape: Sequence[int], device: str = "cpu", **kw: Any) -> "Judge":
        """Real train/held-out sets and feature maps of a model config (classifier checkpoints or raw)."""
        if mcfg.get("data") is None:  # a user's model without reference data: only what needs none (ref-RMSE, time)

            print(f"note: model {mcfg.name} has no reference data (data=null): no FD/KID; set data=folder:PATH "
                  f"features=[...] to get them.", file=sys.stderr)
            real = {}
        elif str(mcfg.data).startswith("folder:"):
            real = load_folder(str(mcfg.data)[len("folder:"):], shape)
        elif mcfg.data == "digits":
            real = {"train": datasets.digits("train")[0], "heldout": datasets.digits("heldout")[0]}
        elif mcfg.data == "gmm":
            gen = lambda s: datasets.get("gmm")(REAL_N, seed=s, shape=tuple(shape), components=int(mcfg.components),  # noqa: E731
                                                model_seed=int(mcfg.model_seed))
            real = {"train": gen(0), "heldout": gen(1)}
        elif mcfg.data == "toy2d":
            real = {"train": datasets.toy2d(REAL_N, seed=0), "heldout": datasets.toy2d(REAL_N, seed=1)}
        elif mcfg.data == "shapes":
            res = int(shape[-1])
            real = {"train": datasets.shapes(REAL_N, seed=0, resolution=res), "heldout": datasets.shapes(REAL_N, seed=1, resolution=res)}
        elif mcfg.data == "patches":  # training-region crops (seed 1; the teacher trained on seed 0) and the fixed held-out set
            res = int(shape[-1])
            real = {"train": datasets.patches("train", REAL_N, seed=1, resolution=res),
                    "heldout": datasets.patches("heldout", resolution=res)}
        elif mcfg.data == "captioned-digits":  # images of the prompts a text-to-image model is evaluated on (held out)
            real = {"train": datasets.captioned_digits(REAL_N, seed=1, images="train", prompts="train").x,
                    "heldout": datasets.captioned_digits(REAL_N, seed=1, images="heldout", prompts="heldout").x}
        else:
            raise ConfigError(f"model {mcfg.name}: unknown data {mcfg.data!r}; valid: digits, gmm, toy2d, shapes, "
                              f"patches, captioned-digits.")
        return cls(features=feature_maps(mcfg.features, device), real=real, clip=bool(mcfg.get("clip", False)), **kw)


def _is_target(entry: Any) -> bool:
    """A feature-net entry naming a Python callable (``package.module:function`` / ``file.py:function``)."""
    return ":" in str(entry) and not resolve_path(str(entry)).exists()


def _feature_target(entry: Any, device: str) -> Features:
    """``function()`` of a callable entry: a feature map ``f(x [B, *shape]) -> [B, D]`` (a torch module is put on the
    device in eval mode)."""
    try:
        target = import_target(str(entry), f"features={entry}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        fn = target()
    except BaseException as err:  # user code: an exception, sys.exit or KeyboardInterrupt is one error line
        raise ConfigError(f"features: {entry} raised {describe(err)}.") from None
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device).eval().requires_grad_(False)
    if not callable(fn):
        raise ConfigError(f"features: {entry} must return a callable feature map f(x) -> [B, D], got {type(fn).__name__}.")
    return lambda x, fn=fn: fn(x.to(device, torch.float32))


def check_features(spec: Any) -> None:
    """Every feature-net entry exists: a classifier file (optimize.evaluation.classifier safetensors) or an importable callable."""
    for entry in as_list(spec):
        if _is_target(entry):
            _feature_target(entry, "cpu")
            continue
        p = resolve_path(str(entry))
        if not p.is_file():
            raise ConfigError(f"feature net {p} does not exist (a .safetensors feature-net file or package.module:function).")
        try:
            with safe_open(str(p), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:
            fmt = None
        if fmt != CLASSIFIER_FORMAT:
            raise ConfigError(f"feature net {p} is not an optimize.evaluation.classifier safetensors file (format {fmt!r}); "
                              f"wrap other nets as package.module:function.")


def feature_maps(spec: Any, device: str = "cpu") -> dict[str, Features]:
    """``raw`` -> flattened coordinates; a list of classifier checkpoints -> their ``.features`` named main, b, c, ...
    (images of another size than the net's are resized bicubically to it, ``at_size``); an entry
    ``package.module:function`` -> the feature map that function returns; null or [] -> none."""
    if spec == "raw":
        return {"raw": lambda x: x.reshape(x.shape[0], -1)}

    maps: dict[str, Features] = {}
    for i, path in enumerate(as_list(spec) if spec is not None else []):
        if _is_target(path):
            maps["main" if i == 0 else chr(ord("a") + i)] = _feature_target(path, device)
            continue
        p = resolve_path(str(path))
        if not p.is_file():
            raise ConfigError(f"feature net {p} does not exist (train it with scripts/train_teachers.sh).")
        net = load_classifier(str(p), device=device)
        maps["main" if i == 0 else chr(ord("a") + i)] = lambda x, net=net: net.features(at_size(x.to(device, torch.float32), net.input_size))
    return maps


def at_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``[B, C, H, W]`` resized bicubically to ``size x size`` when they have another size (a feature net's
    input: e.g. the patches' 32x32 nets judging the 8x8 teacher or a 16x16 stage); unchanged otherwise."""
    if x.shape[-2:] == (size, size):
        return x
    if x.dim() != 4:
        raise ValueError(f"a feature net for {size}x{size} images got a tensor of shape {list(x.shape)}.")
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
