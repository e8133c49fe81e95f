"""`python -m optimize <method> key=value ...`: Hydra entry point shared by every offline method.

The first bare word is the method (rewritten to ``method=<name>`` for Hydra). Every configuration the
command would run (each point of a ``-m`` sweep) is composed and validated before any work; a bad
one is reported as one sentence on stderr with exit code 2.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from samplers import nets
from samplers.table import MAX_SIGMA

from optimize.base import CONF_DIR, ConfigError, SkipPoint, as_list, methods, models, resolve_path  # noqa: F401 - re-exported
from optimize.base.seeds import RANGE
from optimize.commands import check_needs_data, method_keys, method_module
from optimize.data.models import check_model_keys, check_model_spec
from optimize.evaluation.judge import check_features
from optimize.training.checkpoints import CheckpointUnreadable, _explicit_path, _flag, _is_true, readable_checkpoint
from optimize.usage import help_text

MAX_CHECKED = 512  # sweep points composed and validated up front

# Hydra flags that take a value (the method word is the first bare token that is not one of these values)
_VALUE_FLAGS = {"--cfg", "-c", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                "--package", "-p", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}

def _tag(value: Any) -> str:
    """Folder tag of a scalar or list value: 8 or 3-4-5."""
    return "-".join(str(v) for v in as_list(value))


def split_method(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(method word or None, the other arguments) from the command line."""
    rest = list(argv)
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in _VALUE_FLAGS:
            i += 2
            continue
        if a == "--info":
            i += 2 if i + 1 < len(rest) and rest[i + 1] in _INFO_CHOICES else 1
            continue
        if a.startswith("-") or "=" in a:
            i += 1
            continue
        return a, rest[:i] + rest[i + 1:]
    return None, rest


def _check_number(cfg: DictConfig, key: str) -> float:
    try:
        value = float(cfg[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {cfg[key]!r}.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {cfg[key]!r}.")
    return value


DTYPES = ("float32", "float64")
# keys naming folders the run writes into (a file there, or above them, fails late otherwise)
DIR_KEYS = ("cache_dir", "ref_cache_dir", "data_cache_dir", "tables_dir")
FILE_KEYS = ("export", "export_table")


def check_typed(cfg: DictConfig) -> None:
    """Every typed key of the method the config has (``method_keys``), plus nfe, device, devices, model.dtype and the
    paths a run writes."""
    for key, spec in method_keys(str(cfg.method.name)).items():
        if key in cfg:
            spec.check(key, cfg[key])
    if "seed" in cfg:
        if cfg.seed >= RANGE:
            raise ConfigError(f"seed must be below {RANGE} (each use has a 1e6-wide seed range, optimize/base/seeds.py), got {cfg.seed}.")
        for key in ("n", "n_val", "tune_n"):
            if key in cfg and cfg.seed + cfg[key] > RANGE:
                raise ConfigError(f"seed + {key} must be at most {RANGE} (a 1e6-wide seed range, optimize/base/seeds.py), "
                                  f"got seed={cfg.seed} and {key}={cfg[key]}.")
    nfes = as_list(cfg.nfe)
    if not nfes:
        raise ConfigError("nfe must be a positive integer (or a non-empty list of them), got [].")
    for nfe in nfes:
        if isinstance(nfe, bool) or not isinstance(nfe, int) or not 0 < nfe <= 100_000:
            raise ConfigError(f"nfe must be a positive integer (at most 100000, or a list of them), got {nfe!r}.")
    if "device" in cfg:
        check_device(cfg.device)
    if "devices" in cfg:
        devices = cfg.devices
        if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)):
            raise ConfigError(f"devices must be a positive integer or auto, got {devices!r}.")
    if "model" in cfg and "dtype" in cfg.model and str(cfg.model.dtype) not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}.")
    for key in DIR_KEYS:
        if cfg.get(key) is not None:
            check_writable_dir(str(cfg[key]), key)
    for key in FILE_KEYS:
        if cfg.get(key) is not None:
            path = resolve_out(str(cfg[key]))
            if path.is_dir():
                raise ConfigError(f"{key}={cfg[key]} is a folder; give a file path.")
            check_writable_dir(str(cfg[key]), key, is_file=True)


def resolve_out(path: str) -> Path:
    """An output path as the run will use it (relative to the working directory)."""
    return Path(os.path.expanduser(path))


def check_writable_dir(path: str, key: str, is_file: bool = False) -> None:
    """A folder a run will create or write into (``is_file``: a file it will write): not a file, not below a
    file, and writable where it will be created."""
    p = resolve_out(path)
    for q in ([*p.parents] if is_file else [p, *p.parents]):
        if q.exists():
            if not q.is_dir():
                where = "is a file" if q == p else f"is below the file {q}"
                raise ConfigError(f"{key}={path} {where}; give another path.")
            if not os.access(q, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={path}: {q} is not writable (permission denied).")
            return


def check_device(device: Any) -> None:
    """``cpu``, or ``cuda`` / ``cuda:N`` on a machine that has that CUDA device."""
    name = str(device)
    if name == "cpu":
        return
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {name!r}.")

    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for, but no CUDA device is available (use device=cpu).")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def check_network_file(path: Path, key: str) -> None:
    """``path`` must be a readable samplers network file (not a table, not a pickle)."""
    try:
        config, _ = nets.read_net_header(str(path))
        nets.full_config(config)  # types, ranges and size, before anything is allocated
    except nets.NetError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_resume_file(cfg: DictConfig) -> None:
    """An explicit ``resume=PATH`` is read now (weights only: a pickle that needs code is refused, never run)."""
    resume = cfg.get("resume")
    if not _flag(resume) or _is_true(resume):
        return
    path = _explicit_path(resume)
    if not os.path.isfile(path):
        raise ConfigError(f"resume checkpoint {path} does not exist.")
    try:
        readable_checkpoint(path)
    except CheckpointUnreadable as err:
        raise ConfigError(str(err)) from None


def validate(cfg: DictConfig) -> None:
    """Checks shared by every method, then the method module's own ``validate(cfg)`` when it has one."""
    name = str(cfg.method.name)
    if name not in methods():
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(methods())}.")
    if str(cfg.model.name) not in models():
        raise ConfigError(f"unknown model {cfg.model.name!r}; valid models: {', '.join(models())}.")

    if cfg.model.get("kind") in ("diffusers", "callable") or str(cfg.model.get("data")).startswith("folder:"):
        check_model_spec(cfg)  # a user's model or data (fills the sigma range from a diffusers model)
        feats = cfg.model.get("features")
        if feats is not None and feats != "raw":
            check_features(feats)  # a user's feature nets
    else:
        check_model_keys(cfg.model)
    check_needs_data(cfg)
    check_typed(cfg)
    smin, smax = _check_number(cfg, "sigma_min"), _check_number(cfg, "sigma_max")
    if not 0 < smin < smax:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got sigma_min={smin} and sigma_max={smax}.")
    if cfg.model.get("kind") != "diffusers" and smax > MAX_SIGMA:  # a diffusers model's own range is checked above
        raise ConfigError(f"sigma_max={smax:g} is above {MAX_SIGMA:g}, the largest noise level of a model that states "
                          f"no range (samplers.table.MAX_SIGMA).")
    if cfg.model.get("kind") == "net" and cfg.method.get("needs_checkpoint", True):
        ckpt = resolve_path(str(cfg.model.checkpoint))
        if not ckpt.is_file():
            raise ConfigError(f"model {cfg.model.name}: checkpoint file {ckpt} does not exist "
                              f"(train it with python -m optimize teacher model={cfg.model.name} or scripts/train_teachers.sh, or set model.checkpoint=PATH).")
        check_network_file(ckpt, "model.checkpoint")
    if cfg.method.get("resumable", True):  # a method without resume (ld3) says so in its own check
        check_resume_file(cfg)
    if cfg.logger.name == "wandb":
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package (pip install -e .[wandb]).") from None
    module = method_module(name)
    if getattr(module, "run", None) is None:
        raise ConfigError(f"method {name!r} has no command-line entry yet.")
    check = getattr(module, "validate", None)
    if check is not None:
        check(cfg)


def run_method(cfg: DictConfig) -> Any:
    """Validate, then call ``run(cfg)`` of the method's module (``optimize.commands.method_module``)."""
    validate(cfg)
    entry: Callable[[DictConfig], Any] = getattr(method_module(str(cfg.method.name)), "run")
    return entry(cfg)


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every override list a Hydra basic sweep would run (each comma/range sweep expanded), at most MAX_CHECKED."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for o in parsed:
        if o.get_key_element().startswith("hydra."):
            continue
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(p) for p in itertools.islice(itertools.product(*choices), MAX_CHECKED)]


def check_hydra_dirs(overrides: list[str], multirun: bool) -> None:
    """The run (or sweep) folder Hydra will create must not be, or lie below, a file."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == key]
    path = given[-1] if given else "outputs"  # the default folders live below outputs/
    if "${" in path:  # an interpolation: check its fixed leading part
        path = path.split("${")[0].rstrip("/") or "."
    check_writable_dir(path, key if given else "outputs folder")


def precheck(overrides: list[str], multirun: bool = False, values: bool = True) -> None:
    """Compose and validate every configuration the command would run (before Hydra starts any job); in a
    multirun, points that raise SkipPoint are announced and left out (an error if that leaves none).
    ``values=False`` (``--cfg``) only checks that every point composes."""
    for o in overrides:  # names of config groups first, for a clearer message than Hydra's
        key, _, value = o.partition("=")
        group = key.lstrip("+~")
        if group in ("method", "model") and value:
            valid = methods() if group == "method" else models()
            for v in value.split(","):
                if v not in valid:
                    raise ConfigError(f"unknown {group} {v!r}; valid {group}s: {', '.join(valid)}.")
    _register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            points = _sweep_points(overrides)
            skipped = 0
            if values:
                check_hydra_dirs(overrides, multirun)
            for point in points:
                cfg = compose(config_name="config", overrides=point)
                if not values:
                    continue
                try:
                    validate(cfg)  # before resolving: a method's own check explains a missing key best
                except SkipPoint as err:
                    if not multirun:
                        raise
                    skipped += 1
                    print(f"note: skipping {' '.join(o for o in point if not o.startswith('method='))}: {err}", file=sys.stderr)
                    continue
                OmegaConf.resolve(_without_hydra(cfg))
            if values and skipped == len(points):
                raise ConfigError("no point of the sweep can run (see the notes above)")
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    finally:
        GlobalHydra.instance().clear()


def _without_hydra(cfg: DictConfig) -> DictConfig:
    """A copy of cfg without keys that only resolve inside a Hydra run (out_dir)."""
    copy = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(copy, dict)
    copy.pop("out_dir", None)
    return OmegaConf.create(copy)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("tag"):
        OmegaConf.register_new_resolver("tag", _tag)


def compose_config(overrides: list[str]) -> DictConfig:
    """The configuration ``python -m optimize`` would run with these overrides (for scripts; no run folder,
    so pass ``out_dir=...``)."""
    _register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _fail(message: str) -> None:
    msg = message.rstrip()
    print(f"error: {msg if msg.endswith('.') else msg + '.'}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, validate every configuration, then hand over to Hydra."""
    argv = list(sys.argv[1:] if argv is None else argv)
    method, rest = split_method(argv)
    if method is None and not any(a.startswith("method=") for a in rest) or any(a in ("-h", "--help") for a in rest):
        if method is not None and method not in methods():
            _fail(f"unknown method {method!r}; valid methods: {', '.join(methods())}")
        print(help_text(method), end="")
        return
    if method is not None:
        if method not in methods():
            _fail(f"unknown method {method!r}; valid methods: {', '.join(methods())}")
        rest = rest + [f"method={method}"]
    rest = [f"model.{a}" if a.startswith(("data=", "features=")) else a for a in rest]  # data=folder:PATH -> model.data
    overrides = [a for a in rest if not a.startswith("-") and "=" in a]
    flags = [a for a in rest if a not in overrides]
    if not any(f == "--info" for f in flags):
        try:
            precheck(overrides, multirun=any(f in ("-m", "--multirun") for f in flags),
                     values=not any(f in ("--cfg", "-c") for f in flags))
        except ConfigError as err:
            _fail(str(err))
    _hydra_main(flags + overrides)


def _quiet_libraries() -> None:
    """Drop Lightning's banner lines (accelerator summary, tips) and a known third-party deprecation warning."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _end_distributed() -> None:
    """Close the process group Lightning's DDP opened under torchrun: left open, gloo's threads are still running at
    interpreter exit and now and then abort a rank ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _hydra_main(args: list[str]) -> None:
    _register_resolvers()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        _quiet_libraries()
        try:
            run_method(cfg)
        except SkipPoint as err:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                _fail(str(err))
            print(f"note: skipped: {err}", file=sys.stderr)
        except ConfigError as err:
            _fail(str(err))
        finally:
            _end_distributed()

    saved = sys.argv
    sys.argv = [saved[0] if saved else "optimize", *args]
    try:
        _task()
    finally:
        sys.argv = saved
