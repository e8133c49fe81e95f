"""The walk of one parameter through the code: which modules a key (default ``nfe``) visits, from the command line to
the saved table, and how often the walk returns to a module it had left.

Runs one small ``python -m optimize`` command in this process and records, in the order of their first call, every
function of ``optimize`` or ``samplers`` whose code names the key (as a variable or an attribute, ``cfg.nfe``). Each
function counts once (loops do not inflate the walk); consecutive functions of one module are one visit. Rooms: the
distinct modules; returns: visits to a module already left.

    python scripts/walk_parameter.py                       # nfe through: optimize ld3 model=gmm nfe=4 (small)
    python scripts/walk_parameter.py --key nfe -- iia model=gmm nfe=4 n=64 n_fit=64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import samplers
import optimize
from optimize.cli import main

PACKAGES = (Path(samplers.__file__).parent, Path(optimize.__file__).parent)
DEFAULT = ["ld3", "model=gmm", "nfe=4", "n=64", "n_train=8", "n_valid=8", "rounds_v1=1", "rounds_v2=0", "n_boot=10",
           "ref_nfe=21"]


def module_of(code: CodeType) -> str | None:
    """``package.module`` of a code object inside the project's packages, else None."""
    path = Path(code.co_filename)
    for root in PACKAGES:
        if root in path.parents:
            return ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    return None


def walk(args: list[str], key: str, functions: list[str] | None = None) -> list[str]:
    """The modules of the functions that name ``key``, in the order of their first call, consecutive repeats merged
    (``functions``, when given, receives each such function as ``module.qualname``)."""
    seen: set[CodeType] = set()
    visits: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event != "call" or code in seen:
            return
        seen.add(code)
        if key in code.co_varnames or key in code.co_names:
            module = module_of(code)
            if module is not None and functions is not None:
                functions.append(f"{module}.{code.co_qualname}")
            if module is not None and (not visits or visits[-1] != module):
                visits.append(module)

    with tempfile.TemporaryDirectory() as tmp:
        argv = sys.argv
        sys.argv = ["optimize", *args, f"hydra.run.dir={tmp}", "hydra.output_subdir=null"]
        sys.setprofile(profile)
        try:
            main()
        except SystemExit as err:
            if err.code not in (0, None):
                raise
        finally:
            sys.setprofile(None)
            sys.argv = argv
    return visits


def main_walk() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", default="nfe", help="the parameter to follow (default nfe)")
    parser.add_argument("--functions", action="store_true", help="also list the functions in the order of the walk")
    parser.add_argument("command", nargs="*", help="the optimize command and its overrides (after --)")
    a = parser.parse_args()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    functions: list[str] = []
    visits = walk(a.command or DEFAULT, a.key, functions)
    if a.functions:
        print("\n".join(functions))
    rooms = list(dict.fromkeys(visits))
    print(f"walk of {a.key!r}: " + " -> ".join(visits))
    print(f"rooms {len(rooms)}, visits {len(visits)}, returns {len(visits) - len(rooms)}")


if __name__ == "__main__":
    main_walk()
