"""Output names that file contents cannot steer: labels from table or model metadata become safe slugs, and every
path built from one is checked to stay inside its run folder (a table from a stranger never chooses where we write).

Imports nothing of the project (a base module).
"""

from __future__ import annotations

import hashlib
import os
import re

MAX_SLUG = 80  # characters of a label kept in a file name (longer ones end in a hash of the whole label)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+(),=@-]+")


def slug(label: str, default: str = "table") -> str:
    """``label`` as one safe file-name component: characters outside ``[A-Za-z0-9._+(),=@-]`` become ``_``, leading
    dots and underscores go (no ``..``, no hidden files), at most MAX_SLUG characters; a label that had to change in
    length beyond that ends in 8 hex of its SHA-256 so two long labels stay apart. Names already safe
    (``dpmpp_2m(eta=0.5)``, ``iia-generic(unipc)``, ``ddss-ggdm+tuned``) are returned unchanged."""
    text = str(label)
    safe = _UNSAFE.sub("_", text).lstrip("._")
    if not safe:
        safe = default
    if len(safe) > MAX_SLUG:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe[: MAX_SLUG - 9]}-{digest}"
    return safe


def path_inside(folder: str | os.PathLike, name: str) -> str:
    """``folder/name`` after checking that it resolves inside ``folder`` (ValueError otherwise): the last guard
    behind ``slug`` for every file a run writes under a name that came from data."""
    root = os.path.realpath(folder)
    if os.path.dirname(os.path.realpath(os.path.join(root, name))) != root:
        raise ValueError(f"output name {name!r} would leave the run folder {root}; refused.")
    return os.path.join(folder, name)
