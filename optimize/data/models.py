"""Models of the offline pipeline: a ``conf/model/*.yaml`` config mapped onto the ONE model spec of
``samplers.models.load`` (shared with ``python -m samplers generate --model SPEC``), so both CLIs build the same
denoiser with the same fingerprint. By ``kind``:

- ``net``: ``edm:<model.checkpoint>``, a network checkpoint (built by ``samplers.nets`` from the config stored beside
  its weights);
- ``gmm``: ``gmm`` with ``kwargs`` shape / components / seed (``model.model_seed``), the analytic Gaussian mixture;
- ``diffusers``: ``diffusers:<model.path>``, a LOCAL diffusers folder (``unet/`` + ``scheduler/``, or one folder
  holding both configs) with a ``UNet2DModel`` predicting epsilon, v or the sample, read with safetensors only;
  class-conditional nets take ``model.label`` (one class) or ``model.label_weights`` (a distribution over classes),
  and ``model.guidance=w`` applies classifier-free guidance towards the label against the net's null class
  ``model.null_label`` (default: its last class embedding): ``generate --label K --guidance W --null-label K``;
- ``callable``: ``callable:<model.target>`` (``package.module:function`` or ``path/to/file.py:function``) called
  with ``model.kwargs`` (``generate --model-kwargs JSON``), returning ``(denoiser, shape)`` (or a dict with those
  keys): any ``D(x, sigma, cond=None)`` in EDM sigma-space (docs/byo-model.md).

``check_model_spec(cfg)`` makes every check that needs no sampling (called by ``optimize.cli.validate`` before any
work): a bad spec is one ConfigError sentence. For ``diffusers`` it also fills ``model.sigma_min`` / ``sigma_max``
left null with the range of the model's own noise schedule. Every kind's denoiser is watched: its first call is
timed (a ``note:`` line) and ``model.timeout_s`` (null: no limit) stops a call that runs longer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from samplers import SolverTable
from samplers import models as spec_models
from samplers import t2i
from samplers.models import Names, WatchedDenoiser, check_diffusers, check_t2i, check_timeout, diffusers_folders
from samplers.schedule_config import alphas_cumprod_of, flow_sigmas_of, is_flow_config
from samplers.table import check_fingerprint

from optimize.base import ConfigError, as_list, resolve_path
from optimize.data.folder import check_folder


@dataclass
class Model:
    """A denoiser with what evaluation needs to know about it."""

    name: str
    denoiser: Any
    shape: tuple[int, ...]
    fingerprint: str
    dtype: torch.dtype
    cond_of: Callable[[Sequence[int]], Any] | None = None  # the cond of the samples of some seeds (prompt indices)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents to images, before the judge (a VAE)
    any_guidance: bool = False  # model.any_guidance: tables learned at another guidance scale are accepted

    def table_metadata(self) -> dict[str, Any]:
        """What a table learned on this model records about it: its name and fingerprint; for a text-to-image model
        also the guidance scale, the negative prompt and the latent shape (``samplers.t2i.PromptDenoiser``)."""
        inner = getattr(self.denoiser, "denoiser", self.denoiser)  # under the WatchedDenoiser
        extra = {**inner.table_metadata(), "latent_shape": list(self.shape)} if isinstance(inner, t2i.PromptDenoiser) else {}
        return {"model": self.name, "model_fingerprint": self.fingerprint, **extra}

    def table_fingerprint(self, metadata: dict[str, Any]) -> tuple[str, str]:
        """(the fingerprint a table with ``metadata`` must match, a hint for the error): a text-to-image model's table
        learned at another guidance scale is refused unless ``model.any_guidance`` (``samplers.t2i.expected_fingerprint``)."""
        inner = getattr(self.denoiser, "denoiser", self.denoiser)  # under the WatchedDenoiser
        return t2i.expected_fingerprint(metadata, inner, self.fingerprint, self.any_guidance, "model.any_guidance=true")

    def load_table(self, path: str) -> SolverTable:
        """The table file at ``path`` checked against this model (its fingerprint, ``table_fingerprint``); one
        ValueError otherwise, with the hint naming both guidance scales where that is why."""
        table = SolverTable.load(path)
        fingerprint, hint = self.table_fingerprint(table.metadata)
        try:
            return check_fingerprint(table, fingerprint, path)
        except ValueError as err:
            raise ValueError(str(err) + hint) from None


KINDS = ("net", "gmm", "diffusers", "callable")
# how optimize spells the model options in its errors (model.label_weights; gmm's keywords are model.shape, ...)
NAMES = Names(prefix="model.", kwargs="model.", how="set exactly one of model.label=K or model.label_weights=[p_0, ...]",
              renamed=(("seed", "model_seed"),))


def load_model(mcfg: Any, device: str = "cpu") -> Model:
    """The model of a ``conf/model/*.yaml`` config (``samplers.models.load`` of ``model_spec(mcfg)``), its denoiser
    watched (``samplers.models.WatchedDenoiser``: the first call timed on stderr, ``model.timeout_s`` enforced)."""
    timeout = check_model_keys(mcfg)
    dtype = getattr(torch, str(mcfg.get("dtype", "float32")))
    spec, options, where = model_spec(mcfg)
    try:
        loaded = spec_models.load(spec, device=device, dtype=dtype, timeout_s=timeout, names=NAMES, where=where, **options)
    except ValueError as err:
        raise ConfigError(" ".join(str(err).split())) from None
    denoiser = WatchedDenoiser(loaded.denoiser, timeout, error=ConfigError)
    return Model(str(mcfg.name), denoiser, loaded.shape, loaded.fingerprint, dtype, loaded.cond_of, loaded.decode,
                 bool(mcfg.get("any_guidance", False)))


def model_spec(m: Any) -> tuple[str, dict[str, Any], str]:
    """``(spec, options, where)`` of a model config: the ``samplers.models.load`` spec string, its options (label,
    label_weights, guidance, null_label, kwargs) and the config key that names the model in errors."""
    labels = {key: _plain(m.get(key)) for key in ("label", "label_weights", "guidance", "null_label")}
    if labels["label_weights"] is not None:
        labels["label_weights"] = as_list(labels["label_weights"])
    if m.kind == "gmm":
        kwargs = {"shape": _plain(m.get("shape")), "components": m.get("components"), "seed": m.get("model_seed")}
        return "gmm", {**labels, "kwargs": kwargs}, f"model {m.name}"
    if m.kind == "net":
        path = resolve_path(str(m.checkpoint))
        if not path.is_file():
            raise ConfigError(f"model {m.name}: checkpoint file {path} does not exist.")
        return f"edm:{path}", labels, f"model.checkpoint={m.checkpoint}"
    if m.kind == "diffusers":
        if m.get("path") in (None, ""):
            raise ConfigError(f"model {m.name}: set model.path=DIR (a local diffusers folder with unet/ and scheduler/).")
        text = {key: _plain(m.get(key)) for key in ("prompts", "negative_prompt") if m.get(key) is not None}
        if isinstance(text.get("prompts"), str):
            text["prompts"] = str(resolve_path(text["prompts"]))  # a file of prompts, one per line
        return f"diffusers:{resolve_path(str(m.path))}", {**labels, **text}, f"model.path={m.path}"
    if m.kind == "callable":
        if m.get("target") in (None, ""):
            raise ConfigError(f"model {m.name}: set model.target=package.module:function (returning a denoiser and its "
                              f"sample shape).")
        return f"callable:{m.target}", {**labels, "kwargs": _plain(m.get("kwargs") or {})}, f"model.target={m.target}"
    raise ConfigError(f"model {m.name}: unknown kind {m.kind!r}; valid kinds: {', '.join(KINDS)}.")


def _plain(value: Any) -> Any:
    """An OmegaConf list or dict as plain Python (other values as they are)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_model_keys(m: Any) -> float | None:
    """Keys every model kind has: ``model.timeout_s`` (a positive number of seconds, or null for no limit)."""
    try:
        return check_timeout(m.get("timeout_s"), "model.timeout_s")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_model_spec(cfg: Any) -> None:
    """Checks of a model spec (``model.timeout_s``; a ``diffusers`` folder or a ``callable`` target, whose pre-check
    calls the user's code once) and of a ``data=folder:`` data set, before any work."""
    m = cfg.model
    check_model_keys(m)
    if m.kind == "diffusers":
        low, high = diffusers_range(m)
        for key, value in (("sigma_min", low), ("sigma_max", high)):
            if m.get(key) is None:
                m[key] = value  # the model's own range unless given
        top = cfg.get("sigma_max")
        if isinstance(top, (int, float)) and not isinstance(top, bool) and top > high * (1 + 1e-6):
            raise ConfigError(f"sigma_max={top:g} is above the largest noise level of the model at {m.path} "
                              f"({high:.6g}, from its noise schedule); leave model.sigma_max null for the "
                              f"model's own range.")
    elif m.kind == "callable":
        call_target(m, "cpu")
    data = m.get("data")
    if data is not None and str(data).startswith("folder:"):
        check_folder(str(data)[len("folder:"):], key="data")


# --- diffusers folders ---------------------------------------------------------------------------
def native_sigmas(mcfg: Any) -> np.ndarray | None:
    """The EDM sigmas of a diffusers model's training times, increasing (its DDPM betas, or its flow schedule with the
    shift), or None for a model without a scheduler config."""
    if str(mcfg.get("kind", "")) != "diffusers" or not mcfg.get("path"):
        return None
    root = Path(str(resolve_path(str(mcfg.path))))
    _, sched = diffusers_folders(root)
    config = json.loads((sched / "scheduler_config.json").read_text())
    if is_flow_config(config):
        return flow_sigmas_of(config).numpy()
    abar = alphas_cumprod_of(config)
    return ((1 - abar) / abar).sqrt().numpy()


def diffusers_range(m: Any) -> tuple[float, float]:
    """The sigma range of the diffusers model at ``model.path`` (its noise schedule's first and last sigma), after every
    check that needs no net built (``samplers.models.check_diffusers``, as ``python -m samplers generate`` checks it):
    the folder, class conditioning against label / label_weights / guidance / null_label."""
    spec, options, where = model_spec(m)
    options.pop("kwargs", None)
    folder = spec.partition(":")[2]
    try:
        if t2i.pipeline_class(folder) is not None:  # a text-to-image pipeline: prompts, no labels
            options.pop("negative_prompt", None)
            return check_t2i(folder, where, NAMES, options, options.pop("prompts", None))
        info = check_diffusers(folder, where, NAMES, **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sigmas = info.sigmas
    return round(float(sigmas[0]), 12), round(float(sigmas[-1]), 12)


# --- callables -------------------------------------------------------------------------------------
def call_target(m: Any, device: str = "cpu") -> tuple[Any, tuple[int, ...]]:
    """``model.target(**model.kwargs)`` checked by ``samplers.models.call_target`` (a callable denoiser, a shape
    within the limits, one finite test call watched by ``model.timeout_s``); cached per (target, kwargs, device)."""
    spec, options, where = model_spec(m)
    try:
        den, shape, _ = spec_models.call_target(spec.partition(":")[2], options["kwargs"], device, check_model_keys(m), where)
    except ValueError as err:
        raise ConfigError(" ".join(str(err).split())) from None
    return den, shape

