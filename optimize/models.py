"""Models of the offline pipeline: a denoiser with the shape, fingerprint and dtype evaluation needs.

``load_model(cfg.model)`` turns a ``conf/model/*.yaml`` config into a Model, by ``kind``:

- ``net``: a network checkpoint (built by ``samplers.nets`` from the config stored beside its weights);
- ``gmm``: the analytic Gaussian mixture;
- ``diffusers``: a LOCAL diffusers folder (``model.path``: ``unet/`` + ``scheduler/``, or one folder holding both
  configs) with a ``UNet2DModel`` predicting epsilon, v or the sample, read with safetensors only
  (``samplers.models.load_diffusers``); class-conditional nets take ``model.label`` (one class) or
  ``model.label_weights`` (a distribution over classes), and ``model.guidance=w`` applies classifier-free guidance
  towards the label against the net's null class ``model.null_label`` (default: its last class embedding);
- ``callable``: ``model.target=package.module:function`` (or ``path/to/file.py:function``) called with
  ``model.kwargs``, returning ``(denoiser, shape)`` (or a dict with those keys): any ``D(x, sigma, cond=None)`` in
  EDM sigma-space (k-diffusion-style wrappers, any framework) and the shape of one sample (docs/byo-model.md).

``check_model_spec(cfg)`` makes every check that needs no sampling (called by ``optimize.cli.validate`` before any
work): a bad spec is one ConfigError sentence. For ``diffusers`` it also fills ``model.sigma_min`` / ``sigma_max``
left null with the range of the model's own noise schedule. The folder checks are ``samplers.models``' (shared with
``python -m samplers generate``). Every kind's denoiser is watched: its first call is timed (a ``note:`` line) and
``model.timeout_s`` (null: no limit) stops a call that runs longer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch

from samplers.denoisers import CFGDenoiser, InnerRange, _module_fingerprint, fingerprint_tensors
from samplers.models import WatchedDenoiser, check_labels, check_sample_shape, check_timeout, diffusers_spec, load_diffusers

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
    """The model of a ``conf/model/*.yaml`` config (see the module docstring for the kinds), its denoiser watched
    (``samplers.models.WatchedDenoiser``: the first call timed on stderr, ``model.timeout_s`` enforced)."""
    timeout = check_model_keys(mcfg)
    dtype = getattr(torch, str(mcfg.get("dtype", "float32")))
    if mcfg.kind == "gmm":
        shape = _checked_shape(mcfg.get("shape"), "model.shape")
        gmm = datasets.gmm_model(shape, int(mcfg.components), int(mcfg.model_seed))
        model = Model(str(mcfg.name), gmm, tuple(gmm.shape), gmm.fingerprint(), dtype)
    elif mcfg.kind == "diffusers":
        model = _load_diffusers(mcfg, device, dtype)
    elif mcfg.kind == "callable":
        den, shape, fp = _checked_target(mcfg, device)
        model = Model(str(mcfg.name), den, shape, fp, dtype)
    elif mcfg.kind == "net":
        from samplers.nets import load_denoiser

        path = resolve_path(str(mcfg.checkpoint))
        if not path.is_file():
            raise ConfigError(f"model {mcfg.name}: checkpoint file {path} does not exist.")
        den = load_denoiser(str(path), device=device).to(dtype)
        model = Model(str(mcfg.name), den, tuple(den.shape), den.fingerprint(), dtype)
    else:
        raise ConfigError(f"model {mcfg.name}: unknown kind {mcfg.kind!r}; valid kinds: {', '.join(KINDS)}.")
    model.denoiser = WatchedDenoiser(model.denoiser, timeout, error=ConfigError)
    return model


def check_model_keys(m: Any) -> float | None:
    """Keys every model kind has: ``model.timeout_s`` (a positive number of seconds, or null for no limit)."""
    try:
        return check_timeout(m.get("timeout_s"), "model.timeout_s")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _checked_shape(shape: Any, key: str) -> tuple[int, ...]:
    try:
        return check_sample_shape(shape)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_model_spec(cfg: Any) -> None:
    """Checks of a model spec (``model.timeout_s``; a ``diffusers`` folder or a ``callable`` target, whose pre-check
    calls the user's code once) and of the data a method needs, before any work."""
    m = cfg.model
    check_model_keys(m)
    if m.kind == "diffusers":
        info = diffusers_info(m)
        for key, value in (("sigma_min", info["sigma_min"]), ("sigma_max", info["sigma_max"])):
            if m.get(key) is None:
                m[key] = value  # the model's own range unless given
        top = cfg.get("sigma_max")
        if isinstance(top, (int, float)) and not isinstance(top, bool) and top > info["sigma_max"] * (1 + 1e-6):
            raise ConfigError(f"sigma_max={top:g} is above the largest noise level of the model at {m.path} "
                              f"({info['sigma_max']:.6g}, from its noise schedule); leave model.sigma_max null for the "
                              f"model's own range.")
    elif m.kind == "callable":
        _checked_target(m, "cpu")
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
def diffusers_info(m: Any) -> dict[str, Any]:
    """Everything checkable about ``model.path`` without building the net (``samplers.models.diffusers_spec``, shared
    with ``python -m samplers generate``), class conditioning against label / label_weights / guidance; the sigma range."""
    if m.get("path") in (None, ""):
        raise ConfigError(f"model {m.name}: set model.path=DIR (a local diffusers folder with unet/ and scheduler/).")
    try:
        spec = diffusers_spec(resolve_path(str(m.path)))
    except ImportError:
        raise ConfigError("model=diffusers needs the diffusers package (pip install -e .[dev]).") from None
    except ValueError as err:
        raise ConfigError(f"model.path={m.path}: {err}") from None
    weights = m.get("label_weights")
    try:
        check_labels(spec.classes, spec.class_embed_type, label=m.get("label"), guidance=m.get("guidance"),
                     label_weights=None if weights is None else as_list(weights), null_label=m.get("null_label"),
                     net=f"the net at {m.path}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sigmas = spec.sigmas
    return {"unet_dir": spec.unet_dir, "prediction_type": spec.prediction_type, "sigma_min": round(float(sigmas[0]), 12),
            "sigma_max": round(float(sigmas[-1]), 12), "shape": spec.shape, "num_class_embeds": spec.classes}


class LabelDenoiser(InnerRange, torch.nn.Module):
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
        cdf = None if self.cdf is None else [round(float(c), 12) for c in self.cdf]
        return fingerprint_tensors({}, config={"base": self.denoiser.fingerprint(), "label": self.label, "cdf": cdf, **self.extra})


def _load_diffusers(m: Any, device: str, dtype: torch.dtype) -> Model:
    info = diffusers_info(m)
    try:
        den = load_diffusers(str(resolve_path(str(m.path))), device=device, dtype=torch.float32)
    except (ValueError, OSError) as err:
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
# Importing a target, calling it, calling its denoiser and its fingerprint() run the user's code: every exception
# there, SystemExit (sys.exit) and KeyboardInterrupt included, becomes one ConfigError sentence naming the key.
_CALLED: dict[str, tuple[Any, tuple[int, ...], str]] = {}


def describe(err: BaseException) -> str:
    """An exception from user code in a few words: ``RuntimeError: message``, ``SystemExit (sys.exit(0))``."""
    if isinstance(err, SystemExit):
        return f"SystemExit (sys.exit({err.code!r}))"
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def import_target(spec: str, key: str) -> Any:
    """The object named by ``package.module:attr`` or ``path/to/file.py:attr``; ConfigError naming ``key`` otherwise.
    Importing runs the module's code (see docs/byo-model.md, Security)."""
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
    except BaseException as err:  # ImportError, or the module's own code failing or exiting
        raise ConfigError(f"{key}={spec}: cannot import {mod_name} ({describe(err)}).") from None
    obj = module
    try:
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"{key}={spec}: {mod_name} has no attribute {attr!r}.")
            obj = getattr(obj, part)
    except ConfigError:
        raise
    except BaseException as err:  # a module __getattr__ or property of the user's
        raise ConfigError(f"{key}={spec}: looking up {attr} raised {describe(err)}.") from None
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
    ints within ``samplers.models.MAX_SAMPLE_ELEMENTS``, one call on two samples (watched: ``model.timeout_s``) returns
    a finite tensor of that shape, and ``fingerprint()`` (if any) returns a string. Cached per (target, kwargs, device)."""
    den, shape, _ = _checked_target(m, device)
    return den, shape


def _checked_target(m: Any, device: str) -> tuple[Any, tuple[int, ...], str]:
    """``call_target``'s (denoiser, shape) and the denoiser's fingerprint."""
    if m.get("target") in (None, ""):
        raise ConfigError(f"model {m.name}: set model.target=package.module:function (returning a denoiser and its sample shape).")
    timeout = check_model_keys(m)
    kw = _kwargs(m)
    key = json.dumps([str(m.target), kw, device], sort_keys=True, default=str)
    if key in _CALLED:
        return _CALLED[key]
    fn = import_target(str(m.target), "model.target")
    try:
        out = fn(**kw)
    except BaseException as err:
        raise ConfigError(f"model.target={m.target} raised {describe(err)}.") from None
    if isinstance(out, dict) and {"denoiser", "shape"} <= set(out):
        out = (out["denoiser"], out["shape"])
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"model.target={m.target} must return (denoiser, shape), got {type(out).__name__}.")
    den, shape = out
    if not callable(den):
        raise ConfigError(f"model.target={m.target} returned a {type(den).__name__} as denoiser; it must be callable D(x, sigma, cond=None).")
    try:
        shape = check_sample_shape(shape)
    except ValueError as err:
        raise ConfigError(f"model.target={m.target}: {err}") from None
    watched = WatchedDenoiser(den, timeout, what=f"the denoiser of model.target={m.target}", error=ConfigError, report=False)
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(device) * 2.0
    try:
        if isinstance(den, torch.nn.Module):
            den = den.to(device).eval().requires_grad_(False)
            watched.denoiser = den
        with torch.no_grad():
            d = watched(x, torch.tensor([2.0, 0.5], device=device))
    except ConfigError:
        raise
    except BaseException as err:
        raise ConfigError(f"model.target={m.target}: the denoiser failed on a test batch of shape {tuple(x.shape)} "
                          f"({describe(err)}).") from None
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(x.shape):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ConfigError(f"model.target={m.target}: D(x, sigma) must return a tensor shaped like x {tuple(x.shape)}, got {got}.")
    if not torch.isfinite(d).all():
        raise ConfigError(f"model.target={m.target}: D(x, sigma) returned non-finite values on a test batch.")
    fp = _target_fingerprint(m, den)
    _CALLED[key] = (den, shape, fp)
    return den, shape, fp


def _target_fingerprint(m: Any, den: Any) -> str:
    """The denoiser's own ``fingerprint()`` (a string), else a hash of the target, its kwargs and (a torch module)
    its state dict."""
    try:
        method = getattr(den, "fingerprint", None)
        if callable(method):
            return str(method())
        return _module_fingerprint(den, {}, {"target": str(m.target), "kwargs": _kwargs(m)})
    except ConfigError:
        raise
    except BaseException as err:
        raise ConfigError(f"model.target={m.target}: the denoiser's fingerprint() raised {describe(err)}.") from None
