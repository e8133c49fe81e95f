"""Models of the offline pipeline: a denoiser with the shape, fingerprint and dtype evaluation needs.

``load_model(cfg.model)`` turns a ``conf/model/*.yaml`` config into a Model, by ``kind``:

- ``net``: a network checkpoint (built by ``samplers.nets`` from the config stored beside its weights);
- ``gmm``: the analytic Gaussian mixture;
- ``diffusers``: a LOCAL diffusers folder (``model.path``: ``unet/`` + ``scheduler/``, or one folder holding both
  configs) with a ``UNet2DModel`` predicting epsilon, v or the sample, read with safetensors only
  (``samplers.denoisers.load_diffusers``); class-conditional nets take ``model.label`` (one class) or
  ``model.label_weights`` (a distribution over classes), and ``model.guidance=w`` applies classifier-free guidance
  towards the label against the net's null class ``model.null_label`` (default: its last class embedding);
- ``callable``: ``model.target=package.module:function`` (or ``path/to/file.py:function``) called with
  ``model.kwargs``, returning ``(denoiser, shape)`` (or a dict with those keys): any ``D(x, sigma, cond=None)`` in
  EDM sigma-space (k-diffusion-style wrappers, any framework) and the shape of one sample (docs/byo-model.md).

``check_model_spec(cfg)`` makes every check that needs no sampling (called by ``optimize.cli.validate`` before any
work): a bad spec is one ConfigError sentence. For ``diffusers`` it also fills ``model.sigma_min`` / ``sigma_max``
left null with the range of the model's own noise schedule.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as datasets
from .cli import ConfigError, as_list, resolve_path


@dataclass
class Model:
    """A denoiser with what evaluation needs to know about it."""

    name: str
    denoiser: Any
    shape: tuple[int, ...]
    fingerprint: str
    dtype: torch.dtype


KINDS = ("net", "gmm", "diffusers", "callable")
# methods that need reference data and a feature net (a KID/FD loss or selection)
NEEDS_DATA = ("ddss",)


def load_model(mcfg: Any, device: str = "cpu") -> Model:
    """The model of a ``conf/model/*.yaml`` config (see the module docstring for the kinds)."""
    dtype = getattr(torch, str(mcfg.get("dtype", "float32")))
    if mcfg.kind == "gmm":
        gmm = datasets.gmm_model(tuple(mcfg.shape), int(mcfg.components), int(mcfg.model_seed))
        return Model(str(mcfg.name), gmm, tuple(gmm.shape), gmm.fingerprint(), dtype)
    if mcfg.kind == "diffusers":
        return _load_diffusers(mcfg, device, dtype)
    if mcfg.kind == "callable":
        den, shape = call_target(mcfg, device)
        fp = den.fingerprint() if callable(getattr(den, "fingerprint", None)) else _callable_fingerprint(mcfg, den)
        return Model(str(mcfg.name), den, shape, str(fp), dtype)
    if mcfg.kind != "net":
        raise ConfigError(f"model {mcfg.name}: unknown kind {mcfg.kind!r}; valid kinds: {', '.join(KINDS)}.")
    from samplers.nets import load_denoiser

    path = resolve_path(str(mcfg.checkpoint))
    if not path.is_file():
        raise ConfigError(f"model {mcfg.name}: checkpoint file {path} does not exist.")
    den = load_denoiser(str(path), device=device).to(dtype)
    return Model(str(mcfg.name), den, tuple(den.shape), den.fingerprint(), dtype)


def check_model_spec(cfg: Any) -> None:
    """Checks of a ``diffusers`` or ``callable`` model spec and of the data a method needs, before any work."""
    m = cfg.model
    if m.kind == "diffusers":
        info = diffusers_info(m)
        for key, value in (("sigma_min", info["sigma_min"]), ("sigma_max", info["sigma_max"])):
            if m.get(key) is None:
                m[key] = value  # the model's own range unless given
    elif m.kind == "callable":
        call_target(m, "cpu")
    data = m.get("data")
    if data is not None and str(data).startswith("folder:"):
        from .folder_data import check_folder

        check_folder(str(data)[len("folder:"):], key="data")
    feats = m.get("features")
    if feats is not None and feats != "raw":
        from .judge import check_features

        check_features(feats)
    method = str(cfg.method.name)
    if method in NEEDS_DATA and (data is None or not as_list(feats) or feats is None):
        raise ConfigError(f"{method} learns against reference data: model {m.name} needs data=folder:PATH (or digits) "
                          f"and features=[a feature-net .safetensors file or package.module:function]; "
                          f"IIA needs neither.")


# --- diffusers folders ---------------------------------------------------------------------------
def _folders(path: Path) -> tuple[Path, Path]:
    if (path / "unet" / "config.json").is_file():
        return path / "unet", path / "scheduler"
    return path, path


def diffusers_info(m: Any) -> dict[str, Any]:
    """Everything checkable about ``model.path`` without building the net: folder, class, weights (safetensors),
    prediction type, time embedding, class conditioning against label / label_weights / guidance; the sigma range."""
    from samplers.denoisers import PREDICTION_TYPES

    if m.get("path") in (None, ""):
        raise ConfigError(f"model {m.name}: set model.path=DIR (a local diffusers folder with unet/ and scheduler/).")
    root = resolve_path(str(m.path))
    if not root.is_dir():
        raise ConfigError(f"model.path={m.path}: folder {root} does not exist.")
    unet_dir, sched_dir = _folders(root)
    if not (unet_dir / "config.json").is_file():
        raise ConfigError(f"model.path={m.path}: no UNet config.json in {root} or {root / 'unet'}.")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise ConfigError(f"model.path={m.path}: no scheduler_config.json in {sched_dir}.")
    try:
        ucfg = json.loads((unet_dir / "config.json").read_text())
        scfg = json.loads((sched_dir / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={m.path}: unreadable config ({err}).") from None
    if not isinstance(ucfg, dict) or not isinstance(scfg, dict):
        raise ConfigError(f"model.path={m.path}: config.json and scheduler_config.json must hold JSON objects.")
    cls = ucfg.get("_class_name")
    if cls != "UNet2DModel":
        raise ConfigError(f"model.path={m.path}: {unet_dir / 'config.json'} describes a {cls}, but model=diffusers "
                          f"supports UNet2DModel only (use model=callable for other networks).")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise ConfigError(f"model.path={m.path}: no diffusion_pytorch_model.safetensors in {unet_dir} "
                          f"(weights are read with safetensors only, never unpickled).")
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"model.path={m.path}: prediction_type {pred!r} is not supported; supported: "
                          f"{', '.join(PREDICTION_TYPES)}.")
    if ucfg.get("time_embedding_type", "positional") == "fourier":
        raise ConfigError(f"model.path={m.path}: a score-SDE (Fourier time) UNet is not a discrete-time VP model.")
    _check_labels(m, ucfg.get("num_class_embeds"), ucfg.get("class_embed_type"))
    try:
        from samplers.diffusers_scheduler import alphas_cumprod_of

        abar = alphas_cumprod_of(scfg)
    except ImportError:
        raise ConfigError("model=diffusers needs the diffusers package (pip install -e .[dev]).") from None
    except Exception as err:  # diffusers rejects the schedule (unknown beta_schedule, ...)
        raise ConfigError(f"model.path={m.path}: scheduler config not usable ({' '.join(str(err).split())[:200]}).") from None
    sigmas = ((1 - abar) / abar).sqrt()
    size = ucfg.get("sample_size", 32)
    size = [size, size] if isinstance(size, int) else list(size)
    return {"unet_dir": unet_dir, "prediction_type": pred, "sigma_min": round(float(sigmas[0]), 12),
            "sigma_max": round(float(sigmas[-1]), 12), "shape": (int(ucfg.get("in_channels", 3)), *map(int, size)),
            "num_class_embeds": ucfg.get("num_class_embeds")}


def _check_labels(m: Any, classes: Any, embed_type: Any) -> None:
    label, weights, guidance = m.get("label"), m.get("label_weights"), m.get("guidance")
    if not classes:
        if embed_type is not None:
            raise ConfigError(f"model.path={m.path}: class_embed_type {embed_type!r} is not supported (only num_class_embeds).")
        for key, v in (("label", label), ("label_weights", weights), ("guidance", guidance)):
            if v is not None:
                raise ConfigError(f"model.{key} is set, but the net at {m.path} is not class-conditional (no num_class_embeds).")
        return
    classes = int(classes)
    null = m.get("null_label")
    if (label is None) == (weights is None):
        raise ConfigError(f"the net at {m.path} is class-conditional ({classes} class embeddings): set exactly one of "
                          f"model.label=K or model.label_weights=[p_0, ...].")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes):
        raise ConfigError(f"model.label must be an integer in [0, {classes}), got {label!r}.")
    if weights is not None:
        w = as_list(weights)
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in w)
        if not ok or not w or len(w) > classes or sum(w) <= 0:
            raise ConfigError(f"model.label_weights must be 1..{classes} non-negative numbers with a positive sum, got {list(w)!r}.")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ConfigError(f"model.guidance must be a number (the CFG scale w) or null, got {guidance!r}.")
        null = classes - 1 if null is None else null
        if isinstance(null, bool) or not isinstance(null, int) or not 0 <= null < classes:
            raise ConfigError(f"model.null_label must be an integer in [0, {classes}) naming the net's null class, got {null!r}.")
        if label == null:
            raise ConfigError(f"model.label={label} is the null class used for guidance; pick another label.")


class LabelDenoiser(torch.nn.Module):
    """A class-conditional denoiser with its labels fixed: one class, or a distribution assigned by position in the
    batch (a stratified golden-ratio sequence, so every batch carries the distribution; a sample's label depends on
    its position, so keep batch boundaries fixed when pairing runs)."""

    def __init__(self, denoiser: Any, label: int | None = None, weights: list[float] | None = None, extra: dict | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.label = label
        self.cdf = None if weights is None else torch.tensor(weights, dtype=torch.float64).cumsum(0) / float(sum(weights))
        self.extra = dict(extra or {})

    def labels(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.cdf is None:
            return torch.full((batch,), int(self.label), dtype=torch.long, device=device)
        u = (torch.arange(batch, dtype=torch.float64) * 0.6180339887498949 + 0.5) % 1.0
        return torch.searchsorted(self.cdf, u).clamp(max=len(self.cdf) - 1).to(device)

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        return self.denoiser(x, sigma, self.labels(x.shape[0], x.device) if cond is None else cond)

    def fingerprint(self) -> str:
        from samplers.denoisers import fingerprint_tensors

        cdf = None if self.cdf is None else [round(float(c), 12) for c in self.cdf]
        return fingerprint_tensors({}, config={"base": self.denoiser.fingerprint(), "label": self.label, "cdf": cdf, **self.extra})


def _load_diffusers(m: Any, device: str, dtype: torch.dtype) -> Model:
    from samplers.denoisers import CFGDenoiser, load_diffusers

    info = diffusers_info(m)
    try:
        den = load_diffusers(str(resolve_path(str(m.path))), device=device, dtype=torch.float32)
    except (ValueError, OSError, RuntimeError) as err:
        raise ConfigError(f"model.path={m.path}: {' '.join(str(err).split())[:300]}") from None
    if info["num_class_embeds"]:
        classes = int(info["num_class_embeds"])
        inner, extra = den, {}
        if m.get("guidance") is not None:
            null = classes - 1 if m.get("null_label") is None else int(m.null_label)
            inner = CFGDenoiser(den, float(m.guidance), torch.tensor(null))
            extra = {"guidance": float(m.guidance), "null_label": null}
        weights = None if m.get("label_weights") is None else [float(w) for w in as_list(m.label_weights)]
        den = LabelDenoiser(inner, None if m.get("label") is None else int(m.label), weights, extra)
    if dtype != torch.float32:
        den = den.to(dtype)
    return Model(str(m.name), den, tuple(info["shape"]), den.fingerprint(), dtype)


# --- callables -------------------------------------------------------------------------------------
_CALLED: dict[str, tuple[Any, tuple[int, ...]]] = {}


def import_target(spec: str, key: str) -> Any:
    """The object named by ``package.module:attr`` or ``path/to/file.py:attr``; ConfigError naming ``key`` otherwise."""
    spec = str(spec)
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{key}={spec}: give package.module:function (or path/to/file.py:function).")
    try:
        if mod_name.endswith(".py"):
            path = resolve_path(mod_name)
            if not path.is_file():
                raise ConfigError(f"{key}={spec}: file {path} does not exist.")
            name = f"_byo_{abs(hash(str(path.resolve())))}"
            if name not in sys.modules:
                loader = importlib.util.spec_from_file_location(name, path)
                assert loader is not None and loader.loader is not None
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
                sys.modules[name] = module
            module = sys.modules[name]
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as err:  # ImportError, or the module's own code failing
        raise ConfigError(f"{key}={spec}: cannot import {mod_name} ({type(err).__name__}: {' '.join(str(err).split())[:200]}).") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={spec}: {mod_name} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={spec}: {attr} is not callable.")
    return obj


def _kwargs(m: Any) -> dict[str, Any]:
    kw = m.get("kwargs") or {}
    try:
        from omegaconf import OmegaConf

        kw = OmegaConf.to_container(kw, resolve=True) if OmegaConf.is_config(kw) else dict(kw)
    except ImportError:
        kw = dict(kw)
    return kw


def call_target(m: Any, device: str = "cpu") -> tuple[Any, tuple[int, ...]]:
    """``model.target(**model.kwargs)`` checked: ``(denoiser, shape)`` with a callable denoiser and a shape of positive
    ints, and one call on two samples returns a finite tensor of that shape. Cached per (target, kwargs, device)."""
    if m.get("target") in (None, ""):
        raise ConfigError(f"model {m.name}: set model.target=package.module:function (returning a denoiser and its sample shape).")
    kw = _kwargs(m)
    key = json.dumps([str(m.target), kw, device], sort_keys=True, default=str)
    if key in _CALLED:
        return _CALLED[key]
    fn = import_target(str(m.target), "model.target")
    try:
        out = fn(**kw)
    except Exception as err:
        raise ConfigError(f"model.target={m.target} raised {type(err).__name__}: {' '.join(str(err).split())[:200]}.") from None
    if isinstance(out, dict) and {"denoiser", "shape"} <= set(out):
        out = (out["denoiser"], out["shape"])
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"model.target={m.target} must return (denoiser, shape), got {type(out).__name__}.")
    den, shape = out
    if not callable(den):
        raise ConfigError(f"model.target={m.target} returned a {type(den).__name__} as denoiser; it must be callable D(x, sigma, cond=None).")
    try:
        shape = tuple(int(s) for s in shape)
        ok = len(shape) >= 1 and all(s > 0 for s in shape) and all(int(s) == s for s in out[1])
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"model.target={m.target} returned shape {out[1]!r}; it must be a sequence of positive integers.")
    if isinstance(den, torch.nn.Module):
        den = den.to(device).eval().requires_grad_(False)
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0), device=device) * 2.0
    try:
        with torch.no_grad():
            d = den(x, torch.tensor([2.0, 0.5], device=device))
    except Exception as err:
        raise ConfigError(f"model.target={m.target}: the denoiser failed on a test batch of shape {tuple(x.shape)} "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]}).") from None
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(x.shape):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ConfigError(f"model.target={m.target}: D(x, sigma) must return a tensor shaped like x {tuple(x.shape)}, got {got}.")
    if not torch.isfinite(d).all():
        raise ConfigError(f"model.target={m.target}: D(x, sigma) returned non-finite values on a test batch.")
    _CALLED[key] = (den, shape)
    return den, shape


def _callable_fingerprint(m: Any, den: Any) -> str:
    """Hash of the target, its kwargs and (a torch module) its state dict."""
    from samplers.denoisers import _module_fingerprint

    return _module_fingerprint(den, {}, {"target": str(m.target), "kwargs": _kwargs(m)})
