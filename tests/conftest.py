"""Shared fixtures."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def script():
    """``script(name)``: the module ``scripts/<name>.py``, loaded under its own name (dataclasses look it up there)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def one_thread():
    """Run a module of tiny-tensor tests single-threaded: torch's intra-op pool only adds latency there
    (a [4, 5] softmax took ~10 ms with 2 threads on a busy 2-core machine, 2 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv)``: run ``python -m optimize argv`` in-process, assert one ``error:`` line and exit 2 (no
    traceback), and return that line."""
    from optimize.cli import main

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err
        return err

    return run
