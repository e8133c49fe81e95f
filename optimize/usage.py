"""``python -m optimize --help`` and ``python -m optimize <method> --help``, built from the configuration files and
the methods' ``KEYS``: each key with its default (the yaml value), its bounds (``optimize.base.keys``) and its meaning (the
yaml comment beside it). Nothing here names a method: a new method's help comes from its own files."""

from __future__ import annotations

import re
from pathlib import Path

from optimize import base
from optimize.base import CONF_DIR
from optimize.base.keys import SHARED, inherited
from optimize.commands import method_keys

_KEY_LINE = re.compile(r"^([A-Za-z_][\w]*):\s*(.*?)\s*(?:#\s?(.*))?$")
_MORE = re.compile(r"^\s+#\s?(.*)$")  # a comment line continuing the key above


def documented_keys(path: Path) -> list[tuple[str, str, str]]:
    """``(key, default, meaning)`` of each top-level scalar or list key of a yaml file, in file order; the meaning is
    the comment beside the key and the indented comment lines under it. Blocks (``method:``, ``hydra:``) are left out."""
    out: list[tuple[str, str, str]] = []
    open_key = False  # the last line was a documented key or its continuation
    for line in path.read_text().splitlines():
        more = _MORE.match(line)
        if more:
            if open_key:
                key, default, meaning = out[-1]
                out[-1] = (key, default, f"{meaning} {more.group(1)}".strip())
            continue
        m = _KEY_LINE.match(line)
        open_key = bool(m and m.group(2) and m.group(1) != "defaults")
        if open_key:
            out.append((m.group(1), m.group(2), (m.group(3) or "").strip()))
    return out


def summary(path: Path, width: int = 100) -> str:
    """What a config file is: its header comment (the lines after ``@package``) without the leading example command,
    cut at the end of the first clause when longer than ``width``."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            text.append(line.lstrip("#").strip())
    out = " ".join(text)
    out = out.split(": ", 1)[1] if out.startswith("python -m optimize") and ": " in out else out
    for end in ("; ", ". ", ", "):
        if len(out) > width and end in out[:width]:
            out = out[: out[:width].rindex(end)]
    return out if len(out) <= width else out[: width - 3] + "..."


def _rows(path: Path, keys: dict) -> list[str]:
    rows = []
    for key, default, meaning in documented_keys(path):
        bounds = f" [{keys[key].span().removeprefix('be ').removeprefix('lie ')}]" if key in keys else ""
        rows.append(f"  {key}={default}{bounds}" + (f"\n      {meaning}" if meaning else ""))
    return rows


def help_text(method: str | None = None) -> str:
    """The general help, or with ``method`` that method's keys (its own, then those of the files it includes)."""
    methods, models = base.methods(), base.models()
    lines = ["usage: python -m optimize [-m] <method> [key=value ...]",
             "       python -m optimize <method> --help   (the method's keys: default, bounds, meaning)", "",
             f"methods: {', '.join(methods)}"]
    lines += [f"  {m:<9} {summary(CONF_DIR / 'method' / f'{m}.yaml')}" for m in methods]
    lines += ["", f"models:  {', '.join(models)}   (model=NAME; model.KEY=VALUE overrides one of its keys)"]
    lines += [f"  {m:<9} {summary(CONF_DIR / 'model' / f'{m}.yaml')}" for m in models]
    if method is not None:
        keys = method_keys(method)
        for name in reversed(inherited(method)):
            lines += ["", f"{name} keys (conf/method/{name}.yaml):", *_rows(CONF_DIR / "method" / f"{name}.yaml", keys)]
    lines += ["", "keys of every method (conf/config.yaml):", *_rows(CONF_DIR / "config.yaml", SHARED)]
    lines += ["", "Hydra: -m/--multirun sweeps comma lists (solver=euler,dpmpp_2m nfe=4,8); --cfg job prints the config.",
              "Your own model: model=diffusers model.path=DIR | model=callable model.target=MODULE:FUNCTION (docs/byo-model.md)."]
    return "\n".join(lines) + "\n"
