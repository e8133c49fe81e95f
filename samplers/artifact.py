"""Table files: safetensors tensors ``sigmas`` and ``coef`` (float64) plus JSON metadata.

Writes are atomic (temporary file in the same folder, then rename). Loading validates everything
and reports any failure as one TableError sentence naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .table import FORMAT_VERSION, SolverTable, TableError

FORMAT_NAME = "samplers.table"


def package_version() -> str:
    from . import __version__

    return __version__


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to a temporary sibling of ``path``, then rename it over ``path`` (umask permissions)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> str:
    """safetensors bytes of ``tensors`` with string ``header``, written atomically to ``path``."""
    return atomic_write_bytes(path, save(tensors, metadata=header))


def save_table(table: SolverTable, path: str) -> str:
    """Write ``table`` to ``path``; metadata gains format_version, nfe and package_version."""
    table.validate().check_values()  # never write a file that load_table would refuse
    meta: dict[str, Any] = {**table.metadata}
    meta.update(format_version=FORMAT_VERSION, nfe=table.nfe, n_noise=table.n_noise)
    meta.setdefault("package_version", package_version())
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TableError(f"table metadata must be JSON-serialisable ({err}).") from None
    tensors = {
        "sigmas": table.sigmas.detach().to("cpu", torch.float64).contiguous(),
        "coef": table.coef.detach().to("cpu", torch.float64).contiguous(),
    }
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "metadata": meta_json}
    return atomic_save(tensors, path, header)


def read_header(path: str, kind: str = "table", error: type[Exception] = TableError) -> dict[str, str]:
    """The safetensors string header of ``path``, without reading the tensors; ``error`` if unreadable."""
    from safetensors import safe_open

    check_readable(path, kind, error)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path}: truncated or corrupt {kind} file ({short_error(err)}).") from None


def check_readable(path: str, kind: str = "table", error: type[Exception] = TableError) -> None:
    """``error`` naming the file when it is missing, a folder, or not readable (permission), so that a file we may
    not read is never reported as corrupt."""
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, not a {kind} file.")
    if not os.path.isfile(path):
        raise error(f"{path}: no such {kind} file.")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: {kind} file is not readable (permission denied).")


TABLE_TENSORS = ("sigmas", "coef")


def check_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """sigmas and coef present and stored as float64 (what save_table writes)."""
    missing = set(TABLE_TENSORS) - set(tensors)
    if missing:
        raise TableError(f"{path}: missing tensor(s) {', '.join(sorted(missing))}.")
    for name in TABLE_TENSORS:
        dtype = tensors[name].dtype
        if dtype != torch.float64:
            raise TableError(f"{path}: tensor {name} is {str(dtype).replace('torch.', '')}; a table stores float64.")


def short_error(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-sentence errors."""
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def load_table(path: str, fingerprint: str | None = None) -> SolverTable:
    """Load and validate a table file; with ``fingerprint`` check it was made for that model."""
    check_readable(path)
    header = read_header(path)
    if header.get("format") != FORMAT_NAME:
        raise TableError(f"{path}: not a solver table (format {header.get('format')!r}, expected {FORMAT_NAME!r}).")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise TableError(
            f"{path}: table format version {version} is not supported (this package reads version {FORMAT_VERSION})."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TableError(f"{path}: truncated or corrupt table file ({short_error(err)}).") from None
    try:
        metadata = json.loads(header.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise TableError(f"{path}: metadata is not valid JSON ({getattr(err, 'msg', 'too deeply nested')}).") from None
    if not isinstance(metadata, dict):
        raise TableError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}.")
    check_tensors(path, tensors)
    try:
        table = SolverTable(tensors["sigmas"], tensors["coef"], metadata).check_values()
    except TableError as err:
        raise TableError(f"{path}: {err}") from None
    for key, actual in (("nfe", table.nfe), ("n_noise", table.n_noise)):
        stated = metadata.get(key)
        if stated is not None and (isinstance(stated, bool) or stated != actual):
            raise TableError(f"{path}: metadata says {key} {stated!r}, but the tensors have {key} {actual}.")
    if fingerprint is not None:
        made_for = metadata.get("model_fingerprint")
        if made_for is not None and made_for != fingerprint:
            raise TableError(
                f"{path}: made for model fingerprint {made_for}, but the model in use has fingerprint {fingerprint}."
            )
    return table
