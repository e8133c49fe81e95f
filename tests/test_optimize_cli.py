"""`python -m optimize`: method word rewriting, --help, and one-sentence bad-config errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optimize.cli import main, methods, split_method



def test_split_method() -> None:
    assert split_method(["-m", "evaluate", "nfe=4,8"]) == ("evaluate", ["-m", "nfe=4,8"])
    assert split_method(["--cfg", "job", "evaluate"]) == ("evaluate", ["--cfg", "job"])
    assert split_method(["nfe=3"]) == (None, ["nfe=3"])


@pytest.mark.parametrize("argv", [["--help"], [], ["evaluate", "--help"]])
def test_help_lists_methods_and_keys(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    main(argv)
    out = capsys.readouterr().out
    assert f"methods: {', '.join(methods())}" in out and {"evaluate", "teacher"} <= set(methods())
    assert "  teacher   EDM training (optimize.methods.teacher), EMA weights exported" in out  # each method's summary line
    for key in ("model=NAME", "solver=dpmpp_2m", "nfe=8", "sigma_min=", "seed=0 [a non-negative integer]", "-m/--multirun"):
        assert key in out


def test_method_help_lists_its_keys_with_default_bounds_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m optimize ld3 --help``: ld3's own keys (declared in optimize/methods/ld3.py KEYS and conf/method/ld3.yaml),
    then those of evaluate, whose config ld3's includes; no other method's keys."""
    main(["ld3", "--help"])
    out = capsys.readouterr().out
    own, inherited = out.index("ld3 keys (conf/method/ld3.yaml):"), out.index("evaluate keys (conf/method/evaluate.yaml):")
    assert own < inherited
    assert "  n_train=50 [a positive integer (at most 1000000)]\n      training noises" in out[own:inherited]
    assert "  window=0.5 [in [0, 0.999]]" in out[own:inherited]
    assert "  ref_nfe=255 [a positive integer (at most 100000)]" in out[inherited:]
    assert "family=" not in out and "M=4" not in out  # ddss's and dsno's keys are theirs
    main(["dsno", "--help"])
    assert "  M=4 [a positive integer (at most 4096)]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate", "--help"])
    assert exc.value.code == 2 and "unknown method 'frobnicate'" in capsys.readouterr().err


def test_keys_come_from_the_method_and_its_included_configs() -> None:
    from optimize.base.keys import SHARED, inherited
    from optimize.commands import method_keys

    assert inherited("iia") == ["evaluate", "iia"] and inherited("ddss") == ["ddss"]
    iia = method_keys("iia")
    assert {"substeps", "tune_n", "steps"} <= set(iia) and "M" not in iia  # its own, evaluate's, the shared ones
    assert method_keys("dsno")["M"].high == 4096 and SHARED["lr"].positive


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "unknown method 'frobnicate'; valid methods: "),
        (["evaluate", "model=nope"], "unknown model 'nope'; valid models: callable, diffusers, edm, gmm"),
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
def test_bad_config_fails_with_one_sentence(argv: list[str], needle: str, cli_error) -> None:
    assert needle in cli_error(argv)


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


# --- typed values, devices and paths for every sweep point (issue 11) ------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["evaluate", "model=gmm", "n=abc"], "n must be an integer, got 'abc'."),
        (["evaluate", "model=gmm", "seed=abc"], "seed must be an integer, got 'abc'."),
        (["evaluate", "model=gmm", "seed=-1"], "seed must be a non-negative integer, got -1."),
        (["iia", "model=gmm", "substeps=abc"], "substeps must be an integer, got 'abc'."),
        (["iia", "model=gmm", "ridge=abc"], "ridge must be a finite number, got 'abc'."),
        (["ddss", "model=gmm", "steps=abc"], "steps must be an integer, got 'abc'."),
        (["evaluate", "model=gmm", "device=nope"], "device must be cpu, cuda or cuda:N, got 'nope'."),
        (["evaluate", "model=edm", "model.dtype=float16"], "model.dtype must be one of float32, float64, got 'float16'."),
        (["iia", "model=gmm", "devices=0"], "devices must be a positive integer or auto, got 0."),
        (["evaluate", "model=gmm", "nfe=[]"], "nfe must be a positive integer (or a non-empty list of them), got []."),
        (["evaluate", "model=gmm", "grid=-1"], "grid must be a non-negative integer (at most 100000), got -1."),
        (["-m", "evaluate", "model=gmm", "n=16,abc"], "n must be an integer, got 'abc'."),
        (["--cfg", "job", "evaluate", "model=nope"], "unknown model 'nope'"),
    ],
)
def test_typed_values_fail_before_work(argv: list[str], needle: str, cli_error) -> None:
    assert needle in cli_error(argv)


def test_device_cuda_without_cuda(cli_error) -> None:
    import torch

    if torch.cuda.is_available():
        assert "this machine has" in cli_error(["evaluate", "model=gmm", "device=cuda:99"])
    else:
        assert "no CUDA device is available" in cli_error(["evaluate", "model=gmm", "device=cuda"])


def test_paths_that_are_files_and_tables_as_networks(tmp_path: Path, cli_error) -> None:
    from samplers import baselines

    afile = tmp_path / "afile"
    afile.write_text("x")
    table = baselines.build("euler", 4).save(str(tmp_path / "t.safetensors"))
    assert f"cache_dir={afile} is a file" in cli_error(["evaluate", "model=gmm", f"cache_dir={afile}"])
    assert f"hydra.run.dir={afile}/run is below the file {afile}" in cli_error(["evaluate", "model=gmm", f"hydra.run.dir={afile}/run"])
    assert f"export={afile}/t.safetensors is below the file" in cli_error(["teacher", "model=toy2d", f"export={afile}/t.safetensors"])
    err = cli_error(["evaluate", "model=edm", f"model.checkpoint={table}"])
    assert "not a network file (format 'samplers.table'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "t.safetensors"]


def test_ddss_resume_continues_the_loss_curve_and_refuses_other_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A DDSS run resumed from its step-2 checkpoint logs the same losses as the uninterrupted run; a truncated last.ckpt
    falls back with a note; resume=true with another seed is one error naming it."""
    from samplers import SolverTable

    monkeypatch.chdir(tmp_path)
    tiny = ["ddss", "model=gmm", "nfe=3", "steps=4", "batch_size=8", "checkpoint_every=2", "val_every=0",
            "evaluate_at_end=false", "progress_bar=false", "n_val=4"]
    main([*tiny, f"hydra.run.dir={tmp_path / 'runs' / 'a'}"])
    straight = SolverTable.load(str(tmp_path / "runs" / "a" / "ddss-ggdm-nfe3.safetensors"))
    ckpts = tmp_path / "runs" / "a" / "lightning"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000002.ckpt", "step-000004.ckpt"]
    main([*tiny, f"resume={ckpts / 'step-000002.ckpt'}", f"hydra.run.dir={tmp_path / 'runs' / 'b'}"])
    resumed = SolverTable.load(str(tmp_path / "runs" / "b" / "ddss-ggdm-nfe3.safetensors"))
    assert resumed.metadata["loss"]["curve"] == straight.metadata["loss"]["curve"]  # steps 0-1 from the checkpoint, 2-3 rerun
    assert len(straight.metadata["loss"]["curve"]) == 4
    assert resumed.coef.tolist() == straight.coef.tolist()
    capsys.readouterr()
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    main([*tiny, f"resume={tmp_path / 'runs' / 'a'}", f"hydra.run.dir={tmp_path / 'runs' / 'c'}"])
    assert f"note: resume checkpoint {ckpts / 'last.ckpt'} is truncated or corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*tiny, "seed=5", "resume=true", f"hydra.run.dir={tmp_path / 'runs' / 'd'}"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("note:")]  # a's last.ckpt is still cut
    assert exc.value.code == 2 and len(err) == 1 and "resume=true found no earlier run with the same settings" in err[0]
    assert "it was trained with seed=0, but this run has seed=5" in err[0]
