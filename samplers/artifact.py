"""Files of the runtime: atomic writes, safetensors headers read without the tensors, readable-file checks, and the
one-sentence errors they raise (TableError). Table files themselves (``sigmas`` and ``coef`` float64 plus JSON
metadata) are written and read in ``samplers.table``; network files in ``samplers.nets``. Imports nothing of the
package but its version."""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .version import __version__


class TableError(ValueError):
    """A table (or a file holding one) is not valid; the message is one sentence."""

FORMAT_NAME = "samplers.table"


def package_version() -> str:
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


def read_header(path: str, kind: str = "table", error: type[Exception] = TableError) -> dict[str, str]:
    """The safetensors string header of ``path``, without reading the tensors; ``error`` if unreadable."""
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


def short_error(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-sentence errors."""
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
