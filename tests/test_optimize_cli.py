"""`python -m optimize`: method word rewriting, --help, and one-sentence bad-config errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optimize.cli import main, methods, split_method



def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err
    return err


def test_split_method() -> None:
    assert split_method(["-m", "evaluate", "nfe=4,8"]) == ("evaluate", ["-m", "nfe=4,8"])
    assert split_method(["--cfg", "job", "evaluate"]) == ("evaluate", ["--cfg", "job"])
    assert split_method(["nfe=3"]) == (None, ["nfe=3"])


@pytest.mark.parametrize("argv", [["--help"], [], ["evaluate", "--help"]])
def test_help_lists_methods_and_keys(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    main(argv)
    out = capsys.readouterr().out
    assert f"methods: {', '.join(methods())}" in out and {"evaluate", "teacher"} <= set(methods())
    for key in ("model=", "solver=", "nfe=", "sigma_min", "table=PATH", "-m/--multirun"):
        assert key in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "unknown method 'frobnicate'; valid methods: "),
        (["evaluate", "model=nope"], "unknown model 'nope'; valid models: edm, gmm, shapes, toy2d"),
        (["-m", "evaluate", "model=gmm,nope"], "unknown model 'nope'"),
        (["evaluate", "model=gmm", "nfe=0"], "nfe must be a positive integer"),
        (["evaluate", "model=gmm", "nfe=[3,-1]"], "nfe must be a positive integer"),
        (["-m", "evaluate", "model=gmm", "nfe=3,0"], "got 0"),
        (["evaluate", "model=gmm", "sigma_min=90"], "need 0 < sigma_min < sigma_max"),
        (["evaluate", "model=gmm", "solver=heun", "nfe=4"], "heun needs an odd NFE"),
        (["evaluate", "model=gmm", "solver=rk99"], "unknown solver 'rk99'"),
        (["evaluate", "model=edm", "model.checkpoint=/nonexistent/edm.safetensors"], "checkpoint file /nonexistent/edm.safetensors does not exist"),
        (["evaluate", "model=gmm", "table=/nonexistent/t.safetensors"], "table file /nonexistent/t.safetensors does not exist"),
        (["evaluate", "model=gmm", "n=1"], "need n >= 2"),
    ],
)
def test_bad_config_fails_with_one_sentence(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in _fail(argv, capsys)


def test_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "optimize", "evaluate", "model=gmm", "sigma_min=80"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: need 0 < sigma_min < sigma_max, got sigma_min=80.0 and sigma_max=80.0."
    assert not list(tmp_path.iterdir())  # failed before any work: no output folder


def test_multirun_skips_points_a_solver_cannot_meet(tmp_path: Path) -> None:
    """-m with an NFE heun cannot meet: that point is announced and skipped, the others run; all-skipped is an error."""
    tiny = ["model=gmm", "n=16", "ref_nfe=21", "n_boot=20", "grid=4", f"cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run([sys.executable, "-m", "optimize", "-m", "evaluate", *tiny, "solver=heun,euler", "nfe=4",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: skipping" in r.stderr and "solver=heun nfe=4: heun needs an odd NFE" in r.stderr
    found = sorted((tmp_path / "sweep").rglob("results.csv"))
    assert len(found) == 1 and "euler" in found[0].read_text()
    bad = subprocess.run([sys.executable, "-m", "optimize", "-m", "evaluate", *tiny, "solver=heun", "nfe=4,6"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("error: no point of the sweep can run (see the notes above).")
