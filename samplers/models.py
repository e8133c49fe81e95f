"""One model spec for ``python -m samplers generate`` and ``python -m optimize``: ``load(spec, ...)`` turns a spec
(``gmm``, ``gmm-ring``, ``edm:PATH``, ``diffusers:DIR``, ``callable:package.module:function``, a shipped name) with its
label / label weights / guidance options into a denoiser with ONE fingerprint; optimize's model configs map onto it
(``optimize.models.model_spec``). The checks are plain functions that raise ValueError with one sentence (each CLI
wraps it into its own one-line error):

- ``check_sample_shape``: a sample shape of positive integers within ``MAX_SAMPLE_ELEMENTS``, before anything of that
  shape is allocated;
- ``diffusers_spec``: everything checkable about a LOCAL diffusers folder without building its net (layout, class,
  safetensors weights, prediction type, time embedding, channels, sample size, a usable noise schedule), and that the
  weights fit the net the config describes (laid out on the meta device, which allocates nothing);
- ``check_labels``: class conditioning of a net against the label / label weights / guidance asked for, options
  spelled as each CLI spells them (``Names``); ``LabelDenoiser`` / ``conditioned`` fix the labels and guidance;
- ``call_target``: a user's ``function(**kwargs) -> (denoiser, shape)``, imported, called and test-called once;
- ``WatchedDenoiser``: times the first call (a ``note:`` line) and stops a call longer than ``timeout_s``.

- ``load_diffusers``: a diffusers folder as a ``VPDenoiser`` (what ``load``'s ``diffusers:DIR`` uses; its noise schedule
  from ``samplers.schedule_config``); text-to-image pipeline folders go to ``samplers.t2i``.

Only torch, numpy and safetensors are imported at import time; diffusers (an optional dependency) is imported inside
the functions that need it, and a callable target's module when it is loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open

from .artifact import short_error
from . import t2i
from .denoisers import (PREDICTION_TYPES, CFGDenoiser, GaussianMixture, InnerRange, VPDenoiser, _module_fingerprint,
                        finite_alphas_cumprod, fingerprint_tensors)
from .schedule_config import alphas_cumprod_of, quiet_diffusers
from .nets import load_denoiser

# Numbers in ONE sample: 2^26 (64 Mi, 256 MiB in float32). A batch of a few such samples plus a network's activations
# already fills a large GPU; a shape beyond it is a typo or a hostile config, refused before any tensor of it exists.
MAX_SAMPLE_ELEMENTS = 2**26
# config.json / scheduler_config.json are small (a trained_betas list of 100,000 numbers is ~2 MB).
MAX_CONFIG_BYTES = 2**24
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
REPO = Path(__file__).resolve().parents[1]  # a repository checkout: shipped checkpoints, examples


def check_sample_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with at most MAX_SAMPLE_ELEMENTS numbers per sample; ValueError otherwise."""
    try:
        dims = tuple(shape)
        ok = len(dims) >= 1 and all(not isinstance(d, bool) and int(d) == d and int(d) > 0 for d in dims)
    except Exception:  # not a sequence, or entries that are not numbers
        ok = False
    if not ok:
        raise ValueError(f"sample shape {shape!r} must be a non-empty sequence of positive integers.")
    dims = tuple(int(d) for d in dims)
    n = math.prod(dims)
    if n > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"sample shape {list(dims)} has {n:,} numbers per sample, more than the limit of "
                         f"{MAX_SAMPLE_ELEMENTS:,} (2^26, samplers.models.MAX_SAMPLE_ELEMENTS).")
    return dims


def check_timeout(value: Any, key: str = "model.timeout_s") -> float | None:
    """A time limit in seconds: a positive finite number, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number of seconds or null (no limit), got {value!r}.")
    return float(value)


# --- diffusers folders ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersSpec:
    """A checked diffusers folder: where its parts are and what the denoiser built from it will be."""

    unet_dir: Path
    sched_dir: Path
    prediction_type: str
    alphas_cumprod: torch.Tensor  # float64, finite, in (0, 1), decreasing (samplers.denoisers.finite_alphas_cumprod)
    shape: tuple[int, ...]
    classes: int | None  # num_class_embeds
    class_embed_type: str | None
    quantize: bool  # a learned (nn.Embedding) time embedding takes integer timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()


def diffusers_folders(root: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder): ``root/unet`` + ``root/scheduler`` (a saved pipeline), or ``root`` for both (a
    bare UNet2DModel folder); a saved pipeline without a UNet (SD3's transformer) still has ``root/scheduler``."""
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root / "scheduler"
    sched = root / "scheduler"
    return root, sched if (sched / "scheduler_config.json").is_file() else root


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a diffusers config is a small JSON file.")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON config ({short_error(err)}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def diffusers_spec(folder: str | Path) -> DiffusersSpec:
    """Every check of a LOCAL diffusers folder that needs no net built: a ``UNet2DModel`` config with safetensors
    weights, a supported prediction type and time embedding, usable channels and sample size, a DDPM-family scheduler
    config that gives a finite increasing sigma_t, and weights that fit the config (``check_diffusers_weights``).
    ValueError with one sentence naming the file; ImportError without the diffusers package."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"diffusers model folder {str(root)!r} does not exist.")
    unet_dir, sched_dir = diffusers_folders(root)
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"no UNet config.json in {str(root)!r} (expected {str(root / 'unet')!r} or a bare UNet2DModel folder).")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise ValueError(f"no scheduler_config.json in {str(sched_dir)!r}.")
    ucfg, scfg = _read_json(unet_dir / "config.json"), _read_json(sched_dir / "scheduler_config.json")
    cls = ucfg.get("_class_name")
    if cls != "UNet2DModel":
        raise ValueError(f"{unet_dir / 'config.json'} describes a {cls}, but a diffusers model must be a UNet2DModel "
                         f"(wrap other networks as model=callable, docs/byo-model.md).")
    if not (unet_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in {unet_dir} (weights are read with safetensors only, never unpickled).")
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"{sched_dir / 'scheduler_config.json'}: prediction_type {pred!r} is not supported; supported: "
                         f"{', '.join(PREDICTION_TYPES)}.")
    embedding = ucfg.get("time_embedding_type", "positional")
    if embedding == "fourier":
        raise ValueError(f"{unet_dir / 'config.json'}: a score-SDE (Fourier time) UNet is not a discrete-time VP model.")
    if embedding not in ("positional", "learned"):
        raise ValueError(f"{unet_dir / 'config.json'}: time_embedding_type {embedding!r} is not supported (positional or learned).")
    shape = _unet_shape(unet_dir, ucfg)
    classes, embed_type = ucfg.get("num_class_embeds"), ucfg.get("class_embed_type")
    if classes is not None and not _positive_int(classes):
        raise ValueError(f"{unet_dir / 'config.json'}: num_class_embeds must be a positive integer or null, got {classes!r}.")
    abar = _alphas_cumprod(sched_dir, scfg)
    check_diffusers_weights(unet_dir, ucfg)
    return DiffusersSpec(unet_dir, sched_dir, pred, abar, shape, classes, embed_type, embedding == "learned")


def _unet_shape(unet_dir: Path, ucfg: dict) -> tuple[int, ...]:
    """(in_channels, H, W) from the config, checked: positive channels, an output of C or 2C channels (learned
    variance), a positive sample size within MAX_SAMPLE_ELEMENTS."""
    where = unet_dir / "config.json"
    channels, out = ucfg.get("in_channels", 3), ucfg.get("out_channels", 3)
    if not _positive_int(channels) or not _positive_int(out):
        raise ValueError(f"{where}: in_channels and out_channels must be positive integers, got {channels!r} and {out!r}.")
    if out not in (channels, 2 * channels):
        raise ValueError(f"{where}: out_channels {out} must equal in_channels {channels} (or twice it, learned variance).")
    size = ucfg.get("sample_size", 32)
    size = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(size, list) or len(size) != 2 or not all(_positive_int(s) for s in size):
        raise ValueError(f"{where}: sample_size must be a positive integer or [height, width], got {ucfg.get('sample_size')!r}.")
    try:
        return check_sample_shape((channels, *size))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _alphas_cumprod(sched_dir: Path, scfg: dict) -> torch.Tensor:
    """abar_t of the scheduler config as ``load_diffusers`` uses it (``alphas_cumprod_of``: the schedule keys checked,
    the result usable by VPDenoiser)."""
    try:
        import diffusers  # noqa: F401 - optional dependency, only for diffusers folders
    except ImportError:
        raise ImportError("diffusers models need the diffusers package: pip install diffusers.") from None
    try:
        abar = alphas_cumprod_of(scfg)
    except ValueError as err:
        raise ValueError(f"{sched_dir / 'scheduler_config.json'}: {str(err).removeprefix('scheduler config: ')}") from None
    except Exception as err:  # diffusers or torch rejecting a value nobody foresaw
        raise ValueError(f"{sched_dir / 'scheduler_config.json'}: scheduler config not usable ({short_error(err)}).") from None
    return abar


def check_diffusers_weights(unet_dir: Path, ucfg: dict) -> None:
    """The weights file fits the net ``config.json`` describes, found before the net is allocated: the net is laid out
    on the meta device (no memory) and every tensor it shares with the file must have the file's shape (weights of
    another width), and the file must hold at least as many numbers as the net (a config asking a larger net)."""
    from diffusers import UNet2DModel

    file = unet_dir / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"{file} is not a readable safetensors file ({short_error(err)}).") from None
    layers, blocks = ucfg.get("layers_per_block", 2), ucfg.get("block_out_channels", ())
    if isinstance(layers, int) and isinstance(blocks, list) and layers * len(blocks) > len(stored):
        raise ValueError(f"{unet_dir / 'config.json'} describes {layers * len(blocks)} resnet layers, more than the "
                         f"{len(stored)} tensors of {file} (weights of another net).")
    try:
        with quiet_diffusers(), torch.device("meta"):
            net = UNet2DModel.from_config(ucfg)
    except Exception as err:
        raise ValueError(f"{unet_dir / 'config.json'} does not describe a buildable UNet2DModel ({short_error(err)}).") from None
    wanted = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for name, shape in wanted.items():
        if name in stored and stored[name] != shape:
            raise ValueError(f"{file} does not fit {unet_dir / 'config.json'}: tensor {name} is {list(stored[name])} in the "
                             f"file but {list(shape)} in the net the config describes (weights of another width).")
    missing = [name for name in wanted if name not in stored]
    legacy = any(k.split(".")[-2:-1] in (["query"], ["key"], ["value"], ["proj_attn"]) for k in stored)  # renamed on load
    if missing and not legacy:
        raise ValueError(f"{file} lacks {len(missing)} tensor(s) of the net {unet_dir / 'config.json'} describes "
                         f"(e.g. {missing[0]}); the weights belong to another net.")
    need, have = sum(math.prod(s) for s in wanted.values()), sum(math.prod(s) for s in stored.values())
    if need > have:
        raise ValueError(f"{file} holds {have:,} numbers, but the net {unet_dir / 'config.json'} describes has {need:,} "
                         f"(weights of another net).")


# --- class conditioning ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Names:
    """How a CLI spells the model options in its one-line errors: ``generate``'s ``--label-weights`` (the default)
    or ``optimize``'s ``model.label_weights``; ``kwargs`` precedes the name of one keyword argument of the spec
    (``--model-kwargs shape``, or ``model.shape`` for optimize's gmm keys, ``renamed`` mapping ``seed`` to its
    ``model_seed``), and ``how`` says how to give a label."""

    prefix: str = "--"
    kwargs: str = "--model-kwargs "
    how: str = "add --label K or --label-weights P0,P1,... (one of them)"
    renamed: tuple[tuple[str, str], ...] = ()

    def __call__(self, key: str) -> str:
        """The option ``key`` (``label_weights``) as this CLI spells it."""
        return f"--{key.replace('_', '-')}" if self.prefix == "--" else f"{self.prefix}{key}"

    def kwarg(self, key: str) -> str:
        """The keyword argument ``key`` of the spec as this CLI spells it."""
        return self.kwargs + dict(self.renamed).get(key, key)


def check_labels(classes: int | None, embed_type: Any = None, *, label: Any = None, label_weights: Sequence[Any] | None = None,
                 guidance: Any = None, null_label: Any = None, names: Names = Names(), net: str = "this net",
                 required: bool = True) -> None:
    """A net with ``classes`` class embeddings (None or 0: unconditional) against the label (or label weights),
    guidance scale and null class asked for, options spelled by ``names``. A ``required`` label (diffusers nets
    take no unconditional call) must be given; guidance always needs one (it guides towards it)."""
    if not classes:
        if embed_type is not None:
            raise ValueError(f"class_embed_type {embed_type!r} of {net} is not supported (only num_class_embeds).")
        for key, v in (("label", label), ("label_weights", label_weights), ("guidance", guidance), ("null_label", null_label)):
            if v is not None:
                raise ValueError(f"{names(key)} is set, but {net} is not class-conditional.")
        return
    classes = int(classes)
    given = (label is not None) + (label_weights is not None)
    if given == 2 or (given == 0 and (required or guidance is not None)):
        raise ValueError(f"{net} is class-conditional ({classes} class embeddings): {names.how}.")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes):
        raise ValueError(f"{names('label')} must be an integer in [0, {classes}), got {label!r}.")
    if label_weights is not None:
        w = list(label_weights)
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in w)
        if not ok or not w or len(w) > classes or sum(w) <= 0:
            raise ValueError(f"{names('label_weights')} must be 1..{classes} non-negative numbers with a positive sum, "
                             f"got {w!r}.")
    if guidance is None:
        if null_label is not None:
            raise ValueError(f"{names('null_label')} is set without {names('guidance')}; the null class is used only "
                             f"for guidance.")
        return
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"{names('guidance')} must be a number (the CFG scale w) or null, got {guidance!r}.")
    null = classes - 1 if null_label is None else null_label
    if isinstance(null, bool) or not isinstance(null, int) or not 0 <= null < classes:
        raise ValueError(f"{names('null_label')} must be an integer in [0, {classes}) naming the net's null class, "
                         f"got {null!r}.")
    if label == null:
        raise ValueError(f"{names('label')}={label} is the null class used for guidance; pick another label.")


class LabelDenoiser(InnerRange, torch.nn.Module):
    """A class-conditional denoiser with its labels fixed: one class, or a distribution over classes assigned by
    position in the batch (a stratified golden-ratio sequence ``u_i = (i phi^-1 + 1/2) mod 1`` looked up in the
    weights' CDF, so every batch carries the distribution; a sample's label depends on its position, so keep batch
    boundaries fixed when pairing runs). With guidance its inner denoiser is a ``CFGDenoiser``.

    Its fingerprint hashes the base model's with the label (or the CDF) and the guidance settings (``extra``): a
    table learned for one class or one guidance scale is refused for another."""

    def __init__(self, denoiser: Any, label: int | None = None, weights: Sequence[float] | None = None,
                 extra: dict | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.label = label
        self.cdf = None if weights is None else torch.tensor(weights, dtype=torch.float64).cumsum(0) / float(sum(weights))
        self.extra = dict(extra or {})

    @property
    def max_nfe(self) -> int | None:
        """The inner model's table-size limit (a one-step student's), for ``SolverTable.check_for``."""
        return getattr(self.denoiser, "max_nfe", None)

    def labels(self, batch: int, device: torch.device) -> torch.Tensor:
        """The ``batch`` labels of one batch (int64)."""
        if self.cdf is None:
            return torch.full((batch,), int(self.label), dtype=torch.long, device=device)
        u = (torch.arange(batch, dtype=torch.float64) * 0.6180339887498949 + 0.5) % 1.0
        return torch.searchsorted(self.cdf, u).clamp(max=len(self.cdf) - 1).to(device)

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """The inner denoiser with this batch's labels (a ``cond`` given by the caller wins)."""
        return self.denoiser(x, sigma, self.labels(x.shape[0], x.device) if cond is None else cond)

    def fingerprint(self) -> str:
        cdf = None if self.cdf is None else [round(float(c), 12) for c in self.cdf]
        return fingerprint_tensors({}, config={"base": self.denoiser.fingerprint(), "label": self.label, "cdf": cdf,
                                               **self.extra})


def conditioned(denoiser: Any, classes: int, *, label: int | None, label_weights: Sequence[float] | None,
                guidance: float | None, null_label: int | None) -> Any:
    """``denoiser`` with the (checked, ``check_labels``) label or label weights fixed and, with ``guidance`` w,
    classifier-free guidance ``D_u + w (D_c - D_u)`` against the null class (default: the last class embedding);
    ``denoiser`` itself when no label is asked for (an edm net called unconditionally)."""
    if label is None and label_weights is None:
        return denoiser
    inner, extra = denoiser, {}
    if guidance is not None:
        null = classes - 1 if null_label is None else int(null_label)
        inner = CFGDenoiser(denoiser, float(guidance), torch.tensor(null))
        extra = {"guidance": float(guidance), "null_label": null}
    weights = None if label_weights is None else [float(w) for w in label_weights]
    return LabelDenoiser(inner, None if label is None else int(label), weights, extra)


# --- watchdog ------------------------------------------------------------------------------------
class _Expired(BaseException):
    """Raised by the SIGALRM handler inside a call past its time limit (a BaseException, so that user code catching
    Exception does not swallow it)."""


def _alarm_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise _Expired in this (main) thread after ``seconds`` (SIGALRM; it interrupts Python-level code, not a running
    C++ kernel). An outer timer that would fire first is left alone; one that fires later is re-armed afterwards."""
    if seconds is None or not _alarm_usable():
        yield
        return
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_delay and outer_delay <= seconds:
        yield
        return

    armed = [True]

    def expire(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            armed[0] = False  # a signal arriving from here on is ignored
        finally:  # runs even when the (one-shot) alarm fired just before the line above
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
            if outer_delay:
                signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - start), 1e-3), outer_interval)


class WatchedDenoiser(torch.nn.Module):
    """A denoiser whose calls are watched: the first call is timed and reported on stderr (``note: first model call
    took 0.12 s for a batch of 2``), and with ``timeout_s`` a call that runs longer raises ``error`` naming ``key``
    and the sigma. SIGALRM stops Python-level code (time.sleep, a Python loop) in the main thread on Unix; elsewhere,
    or inside one long C++ kernel, the call is checked when it returns. Everything else (``fingerprint()``, ``shape``,
    ``sigma_min`` / ``sigma_max``, ...) is the inner denoiser's, so fingerprints do not change."""

    def __init__(self, denoiser: Any, timeout_s: float | None = None, *, key: str = "model.timeout_s",
                 what: str = "the denoiser", error: type[Exception] = ValueError, report: bool = True):
        super().__init__()
        self.denoiser = denoiser
        self.timeout_s = check_timeout(timeout_s, key)
        self.key, self.what, self.error, self.report = key, what, error, report
        self.first_call_s: float | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "denoiser" or name.startswith("__"):  # not set yet (unpickling); protocols stay the wrapper's
                raise
            return getattr(self.denoiser, name)

    def fingerprint(self) -> str:
        """The inner denoiser's fingerprint."""
        return self.denoiser.fingerprint()

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> Any:
        """``denoiser(x, sigma[, cond])``, timed on the first call and limited to ``timeout_s`` when set."""
        first = self.first_call_s is None
        if self.timeout_s is None and not first:
            return self.denoiser(x, sigma) if cond is None else self.denoiser(x, sigma, cond)
        start = time.perf_counter()
        try:
            with _alarm(self.timeout_s):
                out = self.denoiser(x, sigma) if cond is None else self.denoiser(x, sigma, cond)
                if first and isinstance(out, torch.Tensor) and out.is_cuda:
                    torch.cuda.synchronize(out.device)
        except _Expired:
            raise self.error(self._late(x, sigma)) from None
        took = time.perf_counter() - start
        if self.timeout_s is not None and took > self.timeout_s:
            raise self.error(self._late(x, sigma))
        if first:
            self.first_call_s = took
            if self.report:
                print(f"note: first model call took {took:.3g} s for a batch of {len(x)}", file=sys.stderr, flush=True)
        return out

    def _late(self, x: torch.Tensor, sigma: Any) -> str:
        try:
            s = f"{float(torch.as_tensor(sigma).detach().reshape(-1).max()):.4g}"
        except Exception:
            s = "?"
        return (f"{self.key}={self.timeout_s:g}: a call of {self.what} took longer than {self.timeout_s:g} s at sigma {s} "
                f"(batch of {len(x)}); raise {self.key} or make the model faster.")


# --- diffusers loader ------------------------------------------------------------------------
def load_diffusers(folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                   spec: DiffusersSpec | None = None) -> VPDenoiser:
    """A diffusers ``UNet2DModel`` and its scheduler config from a LOCAL folder as a VPDenoiser (with ``shape``, the
    shape of one sample).

    Layouts: ``folder/unet`` + ``folder/scheduler``, or one folder holding the UNet's
    ``config.json`` and ``scheduler_config.json``. ``abar_t`` comes from DDPMScheduler; no hub access.
    Everything checkable comes first (``diffusers_spec``, or ``spec`` when the caller already checked ``folder``);
    any failure is a ValueError sentence (ImportError without diffusers).
    """
    spec = diffusers_spec(folder) if spec is None else spec
    from diffusers import UNet2DModel

    try:
        with quiet_diffusers():
            unet, info = UNet2DModel.from_pretrained(str(spec.unet_dir), local_files_only=True, torch_dtype=dtype,
                                                     use_safetensors=True, output_loading_info=True)
            unet = unet.to(device).eval().requires_grad_(False)
    except Exception as err:  # diffusers or torch: a state-dict mismatch, a corrupt file, out of memory
        raise ValueError(f"the weights in {spec.unet_dir} do not load into the net its config.json describes "
                         f"({' '.join(str(err).split())[:200]}).") from None
    missing = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    if missing:
        raise ValueError(f"the weights in {spec.unet_dir} lack {len(missing)} tensor(s) of the net its config.json "
                         f"describes (e.g. {missing[0]}); they belong to another net.")
    abar = finite_alphas_cumprod(spec.alphas_cumprod)  # idempotent: diffusers_spec already made abar_T finite
    den = VPDenoiser(unet, abar, prediction_type=spec.prediction_type, quantize=spec.quantize)
    den.shape = spec.shape
    return den


# --- callables: a denoiser from the user's Python code ----------------------------------------------
# Importing a target, calling it, calling its denoiser and its fingerprint() run the user's code: every exception there,
# SystemExit (sys.exit) and KeyboardInterrupt included, becomes one ValueError sentence naming the target.
_CALLED: dict[str, tuple[Any, tuple[int, ...], str]] = {}


class _Late(ValueError):
    """A watched test call of a callable's denoiser ran past its time limit (kept apart from the user's ValueErrors)."""


def describe(err: BaseException) -> str:
    """An exception from user code in a few words: ``RuntimeError: message``, ``SystemExit (sys.exit(0))``."""
    if isinstance(err, SystemExit):
        return f"SystemExit (sys.exit({err.code!r}))"
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute or present from the working directory, else relative to the repository
    (where the shipped checkpoints and examples live) when it exists there."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    return REPO / p if (REPO / p).exists() else p


def import_target(target: str, where: str) -> Any:
    """The callable named by ``package.module:attr`` or ``path/to/file.py:attr`` (a relative file as
    ``resolve_path`` finds it); a ValueError starting with ``where`` otherwise. Importing runs the module's code
    (docs/byo-model.md, Security)."""
    mod_name, sep, attr = str(target).rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{where}: give package.module:function (or path/to/file.py:function).")
    path = resolve_path(mod_name) if mod_name.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ValueError(f"{where}: file {path} does not exist.")
    try:
        obj = importlib.import_module(mod_name) if path is None else _import_file(path)
    except BaseException as err:  # ImportError, or the module's own code failing or exiting
        raise ValueError(f"{where}: cannot import {mod_name} ({describe(err)}).") from None
    for part in attr.split("."):
        try:
            found = hasattr(obj, part)
            obj = getattr(obj, part) if found else obj
        except BaseException as err:  # a module __getattr__ or property of the user's
            raise ValueError(f"{where}: looking up {attr} raised {describe(err)}.") from None
        if not found:
            raise ValueError(f"{where}: {mod_name} has no attribute {attr!r}.")
    if not callable(obj):
        raise ValueError(f"{where}: {attr} is not callable.")
    return obj


def _import_file(path: Path) -> Any:
    """The module of a Python file, imported once per resolved path (kept in ``sys.modules``)."""
    name = f"_byo_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        loader = importlib.util.spec_from_file_location(name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def call_target(target: str, kwargs: dict[str, Any], device: torch.device | str = "cpu", timeout_s: float | None = None,
                where: str | None = None) -> tuple[Any, tuple[int, ...], str]:
    """``(denoiser, shape, fingerprint)`` of ``target(**kwargs)``, checked: it returns ``(denoiser, shape)`` (or a
    dict with those keys) with a callable denoiser ``D(x, sigma, cond=None)`` in EDM sigma-space and a shape of
    positive ints within MAX_SAMPLE_ELEMENTS; one call on two samples (sigma 2 and 0.5, limited to ``timeout_s``)
    returns a finite tensor shaped like its input. The fingerprint is the denoiser's own ``fingerprint()`` (a
    string), else a hash of the target as written, its kwargs and (a torch module) its state dict. Cached per
    (target, kwargs, device); errors are one ValueError sentence starting with ``where``."""
    where = where or f"--model callable:{target}"
    key = json.dumps([str(target), kwargs, str(device)], sort_keys=True, default=str)
    if key in _CALLED:
        return _CALLED[key]
    fn = import_target(target, where)
    try:
        out = fn(**kwargs)
    except BaseException as err:
        raise ValueError(f"{where} raised {describe(err)}.") from None
    if isinstance(out, dict) and {"denoiser", "shape"} <= set(out):
        out = (out["denoiser"], out["shape"])
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"{where} must return (denoiser, shape), got {type(out).__name__}.")
    den, shape = out
    if not callable(den):
        raise ValueError(f"{where} returned a {type(den).__name__} as denoiser; it must be callable D(x, sigma, cond=None).")
    try:
        shape = check_sample_shape(shape)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(device) * 2.0
    try:
        if isinstance(den, torch.nn.Module):
            den = den.to(device).eval().requires_grad_(False)
        watched = WatchedDenoiser(den, timeout_s, what=f"the denoiser of {where}", error=_Late, report=False)
        with torch.no_grad():
            d = watched(x, torch.tensor([2.0, 0.5], device=device))
    except _Late as err:
        raise ValueError(str(err)) from None
    except BaseException as err:
        raise ValueError(f"{where}: the denoiser failed on a test batch of shape {tuple(x.shape)} ({describe(err)}).") from None
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(x.shape):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"{where}: D(x, sigma) must return a tensor shaped like x {tuple(x.shape)}, got {got}.")
    if not torch.isfinite(d).all():
        raise ValueError(f"{where}: D(x, sigma) returned non-finite values on a test batch.")
    try:
        method = getattr(den, "fingerprint", None)
        fp = str(method()) if callable(method) else _module_fingerprint(den, {}, {"target": str(target), "kwargs": kwargs})
    except BaseException as err:
        raise ValueError(f"{where}: the denoiser's fingerprint() raised {describe(err)}.") from None
    _CALLED[key] = (den, shape, fp)
    return _CALLED[key]


# --- one model spec for both CLIs ----------------------------------------------------------------
# shipped models by name (files of a repository checkout): the spec each name stands for
SHIPPED = {
    "edm": "edm:checkpoints/edm-digits.safetensors",
    "patches": "edm:checkpoints/edm-patches.safetensors",
    "patches8": "edm:checkpoints/edm-patches8.safetensors",
    "toy2d": "edm:checkpoints/edm-toy2d.safetensors",
    "dsno-digits": "edm:checkpoints/dsno-digits.safetensors",
    "cd-digits": "edm:checkpoints/cd-digits.safetensors",
    "pagoda-patches8": "edm:checkpoints/pagoda-patches8.safetensors",
    "pagoda-patches16": "edm:checkpoints/pagoda-patches16.safetensors",
    "pagoda-patches32": "edm:checkpoints/pagoda-patches32.safetensors",
    "diffusers-digits": "diffusers:checkpoints/diffusers-digits",
}
SPECS = ("gmm, gmm-ring, edm:PATH, diffusers:DIR, callable:package.module:function (or callable:path/file.py:function), "
         f"or a shipped model ({', '.join(SHIPPED)})")


def _positive_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# keyword arguments of the analytic mixtures (GaussianMixture.random / .ring): what each must be, and its test
# (check_sample_shape raises its own sentence)
GMM_KWARGS: dict[str, dict[str, tuple[str, Any]]] = {
    "gmm": {"shape": ("a sample shape", check_sample_shape),
            "components": ("a positive integer", _positive_int),
            "seed": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)},
    "gmm-ring": {"components": ("a positive integer", _positive_int),
                 "radius": ("a positive finite number", _positive_float),
                 "std": ("a positive finite number", _positive_float)},
}


@dataclass
class Loaded:
    """A model spec turned into a denoiser: the shape of one input sample, of one output sample (a generator may
    grow it: PaGoDA 8 -> 32 px; a text-to-image model decodes latents to images) and the ONE fingerprint both CLIs
    record in and check against tables (taken before any dtype cast; a label or guidance is part of it,
    ``LabelDenoiser``, ``samplers.t2i.PromptDenoiser``). A text-to-image model also gives ``cond_of(seeds)``, the prompt
    index of each seed's sample, ``decode`` and its ``prompts``."""

    denoiser: Any
    shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    fingerprint: str
    cond_of: Callable[[Sequence[int]], Any] | None = None  # the cond of the samples of some seeds (prompt indices)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents to images (a text-to-image VAE)
    prompts: list[str] | None = None


def load(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, label: Any = None,
         label_weights: Sequence[Any] | None = None, guidance: Any = None, null_label: Any = None,
         kwargs: dict[str, Any] | None = None, timeout_s: float | None = None, names: Names = Names(),
         where: str | None = None, prompts: str | Sequence[str] | None = None, negative_prompt: str | None = None) -> Loaded:
    """The model of a spec, as ``python -m samplers generate --model SPEC`` and ``python -m optimize model=...``
    both load it:

    - ``gmm`` / ``gmm-ring``: the analytic mixtures (``kwargs``: ``GaussianMixture.random``'s shape / components /
      seed, ``GaussianMixture.ring``'s components / radius / std);
    - ``edm:PATH``: a network file of ``samplers.nets`` in its preconditioning;
    - ``diffusers:DIR``: a LOCAL diffusers ``UNet2DModel`` folder (``load_diffusers``), or a text-to-image pipeline
      folder (Stable Diffusion, SD3, ``samplers.t2i.load_t2i``) with its ``prompts`` (a list or a text file),
      ``negative_prompt`` and ``guidance``;
    - ``callable:package.module:function`` or ``callable:path/file.py:function``: ``function(**kwargs)`` returning
      ``(denoiser, shape)`` (``call_target``; its test call limited to ``timeout_s``);
    - a shipped name (``SHIPPED``; ``edm`` is the digits teacher).

    A class-conditional net (diffusers ``num_class_embeds``, an edm net's ``num_classes``) takes ``label`` or
    ``label_weights``, and ``guidance`` w with ``null_label`` (``conditioned``); a diffusers net needs one. Nets are
    cast to ``dtype`` (after the fingerprint is taken), mixtures and callables run as they are. Errors are one
    ValueError sentence starting with ``where`` (default ``--model SPEC``); options are named as ``names`` spells
    them."""
    where = where or f"--model {spec}"
    kind, _, arg = SHIPPED.get(spec, spec).partition(":")
    arg = str(REPO / arg) if spec in SHIPPED else arg
    kw = {} if kwargs is None else dict(kwargs)
    if kw and kind not in ("gmm", "gmm-ring", "callable"):
        raise ValueError(f"{where}: {names.kwargs.strip()} applies to gmm, gmm-ring and callable: models only.")
    labels = {"label": label, "label_weights": label_weights, "guidance": guidance, "null_label": null_label}
    is_t2i = kind == "diffusers" and bool(arg) and t2i.pipeline_class(resolve_path(arg)) is not None
    for key, value in (("prompts", prompts), ("negative_prompt", negative_prompt)):
        if value is not None and not is_t2i:
            raise ValueError(f"{where}: {names(key)} applies to text-to-image pipeline folders (diffusers:DIR with a "
                             f"StableDiffusion / SD3 model_index.json) only.")
    if kind in GMM_KWARGS and not arg:
        _check_labels(where, None, labels, names, net="this model")
        gmm = _gmm(kind, kw, names)
        return Loaded(gmm, tuple(gmm.shape), tuple(gmm.shape), gmm.fingerprint())
    if kind == "callable" and arg:
        _check_labels(where, None, labels, names, net="this model")
        den, shape, fingerprint = call_target(arg, kw, device, timeout_s, where)
        return Loaded(den, shape, shape, fingerprint)
    if kind == "edm" and arg:
        try:
            den = load_denoiser(str(resolve_path(arg)))
        except OSError as err:
            raise ValueError(f"{where}: {short_error(err)}") from None
        classes = den.config.get("num_classes")
        _check_labels(where, classes, labels, names, required=False)
        shape, out_shape = tuple(den.shape), tuple(den.out_shape)
        base, den = den.fingerprint(), den.to(device=device, dtype=dtype)
    elif is_t2i:
        return _load_t2i(arg, where, names, labels, prompts, negative_prompt, device, dtype)
    elif kind == "diffusers" and arg:
        checked = check_diffusers(arg, where, names, **labels)
        classes = checked.classes
        try:
            den = load_diffusers(resolve_path(arg), device=device, spec=checked)  # its folder checked once
        except (ValueError, OSError) as err:
            raise ValueError(f"{where}: {' '.join(str(err).split())[:300]}") from None
        shape = out_shape = tuple(den.shape)
        base, den = den.fingerprint(), den.to(dtype=dtype)
    else:
        raise ValueError(f"unknown model {spec!r}; valid: {SPECS}.")
    if classes:
        den = conditioned(den, int(classes), **labels)
    return Loaded(den, shape, out_shape, den.fingerprint() if isinstance(den, LabelDenoiser) else base)


def check_t2i(folder: str | os.PathLike, where: str, names: Names, labels: dict[str, Any], prompts: Any) -> tuple[float, float]:
    """The checks of a text-to-image pipeline folder that need no net built (prompts given and readable, no class
    labels, the scheduler config usable); its (sigma_min, sigma_max). One ValueError sentence starting with ``where``."""
    for key in ("label", "label_weights", "null_label"):
        if labels.get(key) is not None:
            raise ValueError(f"{where}: {names(key)} is set, but a text-to-image pipeline is conditioned on prompts "
                             f"({names('prompts')}).")
    if prompts is None:
        raise ValueError(f"{where}: a text-to-image pipeline needs {names('prompts')} (a list of prompts or a text "
                         f"file with one per line).")
    try:
        t2i.read_prompts(prompts if isinstance(prompts, str) else list(prompts))
        return t2i.sigma_range(resolve_path(folder))
    except ValueError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())[:300]}") from None


def _load_t2i(folder: str, where: str, names: Names, labels: dict[str, Any], prompts: Any, negative_prompt: str | None,
              device: torch.device | str, dtype: torch.dtype) -> Loaded:
    """A text-to-image pipeline folder (``samplers.t2i``): prompts required, no class labels, guidance w >= 0."""
    check_t2i(folder, where, names, labels, prompts)
    try:
        den = t2i.load_t2i(resolve_path(folder), prompts if isinstance(prompts, str) else list(prompts),
                           guidance=labels["guidance"], negative_prompt=negative_prompt or "", device=device, dtype=dtype)
    except ImportError:
        raise ValueError(f"{where}: text-to-image pipelines need diffusers and transformers (pip install -e .[diffusers]).") from None
    except (ValueError, OSError) as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())[:300]}") from None
    n = len(den.prompts)
    return Loaded(den, tuple(den.shape), tuple(den.image_shape), den.fingerprint(),
                  cond_of=lambda seeds: t2i.prompt_indices(seeds, n), decode=den.decode, prompts=den.prompts)


def check_diffusers(folder: str | os.PathLike, where: str, names: Names = Names(), **labels: Any) -> DiffusersSpec:
    """``diffusers_spec`` of ``folder`` (as ``resolve_path`` finds it) with its class conditioning checked against
    ``labels`` (``check_labels``: label, label_weights, guidance, null_label): the checks of a diffusers model that
    need no net built. One ValueError sentence starting with ``where``."""
    try:
        spec = diffusers_spec(resolve_path(folder))
    except ImportError:
        raise ValueError(f"{where}: diffusers models need the diffusers package (pip install diffusers).") from None
    except ValueError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None
    _check_labels(where, spec.classes, labels, names, spec.class_embed_type)
    return spec


def _check_labels(where: str, classes: int | None, labels: dict[str, Any], names: Names, embed_type: Any = None,
                  net: str = "this net", required: bool = True) -> None:
    """``check_labels`` with its sentence prefixed by ``where`` (the model it is about)."""
    try:
        check_labels(classes, embed_type, **labels, names=names, net=net, required=required)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _gmm(kind: str, kwargs: dict[str, Any], names: Names) -> GaussianMixture:
    """``GaussianMixture.random(**kwargs)`` (``gmm``) or ``.ring(**kwargs)`` (``gmm-ring``), each keyword checked
    (errors name the keyword as ``names`` spells it)."""
    allowed = GMM_KWARGS[kind]
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(f"{names.kwarg(key)} is not a keyword of {kind}; it takes {', '.join(allowed)}.")
        what, check = allowed[key]
        try:
            ok = check(value)
        except ValueError as err:
            raise ValueError(f"{names.kwarg(key)}: {err}") from None
        if ok is False:
            raise ValueError(f"{names.kwarg(key)} must be {what}, got {value!r}.")
    if "shape" in kwargs:
        kwargs = {**kwargs, "shape": tuple(kwargs["shape"])}
    return (GaussianMixture.random if kind == "gmm" else GaussianMixture.ring)(**kwargs)
