"""The commands of ``python -m optimize``: each ``conf/method/<name>.yaml`` is run by the module of that name in
``optimize.methods`` (learners), ``optimize.recipes`` (chains of them) or ``optimize.evaluation`` (``evaluate``),
found in that order. A module gives ``run(cfg)`` and may give ``KEYS`` (its typed keys), ``validate(cfg)`` and
``NEEDS_DATA`` (or ``needs_data(cfg)``); a new method is its file plus its conf file, nothing else."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from optimize.base import ConfigError, as_list
from optimize.base.keys import SHARED, Key, inherited

PACKAGES = ("optimize.methods", "optimize.recipes", "optimize.evaluation")


def method_module(name: str) -> ModuleType:
    """The module that runs method ``name`` (the first of ``PACKAGES`` holding it); ConfigError when none does or it
    cannot be imported."""
    for package in PACKAGES:
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ImportError as err:
                raise ConfigError(f"method {name!r} cannot be imported ({err}).") from None
    raise ConfigError(f"method {name!r} has no module in {', '.join(PACKAGES)}.")


def method_keys(name: str) -> dict[str, Key]:
    """The typed keys of method ``name``: SHARED, then the ``KEYS`` that the module of each method in
    ``inherited(name)`` declares (found by name: a new method needs no edit here)."""
    keys = dict(SHARED)
    for method in inherited(name):
        keys.update(getattr(method_module(method), "KEYS", {}))
    return keys


def check_needs_data(cfg: Any) -> None:
    """A method whose module says ``NEEDS_DATA = True`` or whose ``needs_data(cfg)`` is true for this run (it learns
    against reference data) gets a model with data and feature nets."""
    m, method = cfg.model, str(cfg.method.name)
    data, feats = m.get("data"), m.get("features")
    module = method_module(method)
    needs = module.needs_data(cfg) if hasattr(module, "needs_data") else getattr(module, "NEEDS_DATA", False)
    if needs and (data is None or not as_list(feats)):
        raise ConfigError(f"{method} learns against reference data: model {m.name} needs data=folder:PATH (or digits) "
                          f"and features=[a feature-net .safetensors file or package.module:function]; "
                          f"IIA needs neither.")
