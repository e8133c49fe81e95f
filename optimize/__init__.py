"""Offline learning of samplers (Lightning + Hydra); builds on the ``samplers`` runtime.

Layers, each importing only those listed before it: ``base`` (errors, paths, seeds, typed keys), ``data`` (datasets,
image folders, model configs), ``evaluation`` (metrics, judge, evaluate, results), ``training`` (the Lightning base,
resume, distillation targets), ``methods`` (one module per method), ``recipes`` (the chain that ships the best
tables), then ``commands``, ``usage`` and ``cli`` (compose the configuration and dispatch).

The modules' earlier flat names (``optimize.iia`` for ``optimize.methods.iia``, ``optimize.results``, ...) stay
importable: each is the same module object as its layered home (``FLAT_NAMES``), loaded only when first imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

FLAT_NAMES = {
    "paths": "base.paths", "seeds": "base.seeds", "keys": "base.keys",
    "folder_data": "data.folder", "models": "data.models",
    "metrics": "evaluation.metrics", "classifier": "evaluation.classifier", "judge": "evaluation.judge",
    "results": "evaluation.results", "report": "evaluation.report", "evaluate": "evaluation.evaluate",
    "checkpoints": "training.checkpoints", "runs": "training.runs",
    "teacher": "methods.teacher", "iia": "methods.iia", "ld3": "methods.ld3", "ddss": "methods.ddss",
    "dsno": "methods.dsno", "pagoda": "methods.pagoda", "best": "recipes.best",
}


class _FlatNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import optimize.<flat name>`` gives the module at its layered home (the same object, not a copy)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix == __name__ and name in FLAT_NAMES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(f"{__name__}.{FLAT_NAMES[spec.name.partition('.')[2]]}")

    def exec_module(self, module: ModuleType) -> None:
        """Nothing: the module ran at its layered home."""


if not any(isinstance(f, _FlatNames) for f in sys.meta_path):
    sys.meta_path.append(_FlatNames())
