"""Shared fixtures."""

import pytest
import torch


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
