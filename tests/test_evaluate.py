"""`optimize evaluate` on the analytic GMM: Python API, table artifacts, seeded reruns and a multirun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimize.evaluation.evaluate import Judge, evaluate, feature_maps, read_results, start_sigma
from samplers import baselines
from samplers.denoisers import GaussianMixture

TINY = ["model=gmm", "n=24", "ref_nfe=21", "n_boot=20", "grid=16"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "optimize", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_evaluate_api_2d_ring() -> None:
    gmm = GaussianMixture.ring(8, radius=2.0, std=0.1)
    real = {"train": gmm.sample(200, torch.Generator().manual_seed(0))}
    judge = Judge(features=feature_maps("raw"), real=real, n_boot=20)
    table = baselines.build("dpmpp_2m", 10, sigma_max=20.0)
    assert start_sigma(table) == 20.0
    ref = evaluate(gmm, baselines.build("heun", 41, sigma_max=20.0), judge=judge, shape=(2,), seeds=range(64), dtype=torch.float64)
    r = evaluate(gmm, table, judge=judge, shape=(2,), seeds=range(64), reference=ref["samples"], dtype=torch.float64)
    assert r["samples"].shape == (64, 2) and r["nfe"] == 10
    for key in ("ref_rmse", "kid_train_raw", "kid_se_train_raw", "fd_train_raw", "sw_train", "seconds"):
        assert math.isfinite(r[key]), key
    assert r["ref_rmse"] < 0.1 and r["sw_train"] < 0.5


def test_evaluate_table_artifact_writes_results_and_reruns_identically(tmp_path: Path) -> None:
    table = tmp_path / "ipndm4.safetensors"
    baselines.build("ipndm", 4).save(str(table))
    common = [*TINY, f"table={table}", f"cache_dir={tmp_path / 'cache'}"]
    out1 = _run(["evaluate", *common, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path).stdout
    _run(["evaluate", *common, f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert "ref-RMSE" in out1 and "ipndm" in out1
    rows = [read_results(str(tmp_path / d / "results.csv")) for d in "ab"]
    assert len(rows[0]) == 1 and rows[0][0]["method"] == "ipndm" and rows[0][0]["nfe"] == 4
    for key, value in rows[0][0].items():
        if isinstance(value, float):
            assert math.isfinite(value), key
        if key != "seconds":
            assert rows[1][0][key] == value, key  # seeded: identical numbers on rerun
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["rows"][0]["fd_train_raw"] == rows[0][0]["fd_train_raw"] and data["config"]["table"] == str(table)
    assert (tmp_path / "a" / "samples-ipndm-nfe4.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the reference solve was cached once and reused


def test_multirun_over_two_solvers(tmp_path: Path) -> None:
    _run(["-m", "evaluate", *TINY, "solver=euler,dpmpp_2m", "nfe=3", f"cache_dir={tmp_path / 'cache'}",
          f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    found = sorted((tmp_path / "sweep" / "evaluate" / "gmm" / "nfe3").glob("*/results.csv"))
    assert [read_results(str(p))[0]["method"] for p in found] == ["euler", "dpmpp_2m"]


def test_nfe_list_writes_quality_plot(tmp_path: Path) -> None:
    _run(["evaluate", *TINY, "nfe=[3,5]", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    rows = read_results(str(tmp_path / "run" / "results.csv"))
    assert [r["nfe"] for r in rows] == [3, 5]
    assert (tmp_path / "run" / "quality-vs-nfe.png").stat().st_size > 1000


def test_solver_option_a_solver_does_not_take_is_one_sentence(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "optimize", "evaluate", *TINY, "solver=euler", "nfe=4", "solver_options.detail=2.0",
                        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: solver euler does not take solver_options.detail"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_tada_with_solver_options_sweep(tmp_path: Path) -> None:
    """solver=tada solver_options.detail=0.5,2.0 (multirun): each job samples the table of its own detail."""
    _run(["-m", "evaluate", *TINY, "solver=tada", "nfe=4", "solver_options.detail=0.5,2.0", f"cache_dir={tmp_path / 'cache'}",
          f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    found = sorted((tmp_path / "sweep" / "evaluate" / "gmm" / "nfe4").glob("*/results.json"))
    runs = [json.loads(p.read_text()) for p in found]
    assert [d["config"]["solver_options"]["detail"] for d in runs] == [0.5, 2.0]
    rows = [d["rows"][0] for d in runs]
    assert [r["method"] for r in rows] == ["tada(detail=0.5)", "tada(detail=2.0)"]  # labels say the option
    assert all(r["nfe"] == 4 and math.isfinite(r["fd_train_raw"]) for r in rows)
    assert rows[0]["fd_train_raw"] != rows[1]["fd_train_raw"]  # the option reached the table


def test_tuned_baseline_picks_the_best_schedule_on_separate_seeds(tmp_path: Path) -> None:
    """tuned=true adds a '+tuned' row whose rho/sigma_min/end is the grid point with the lowest tuning-seed FD."""
    _run(["evaluate", *TINY, "solver=euler", "nfe=4", "tuned=true", "tune_rho=[2.0,7.0]", "tune_sigma_min=[0.002,0.05]",
          "tune_n=24", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["euler", "euler+tuned"]
    tuned = rows[1]
    assert tuned["rho"] in (2.0, 7.0) and tuned["sigma_min"] in (0.002, 0.05) and tuned["end"] in ("zero", "sigma_min")
    from optimize.evaluation.evaluate import TUNE_SEED_OFFSET

    gmm = GaussianMixture.random((1, 8, 8), components=6, seed=0)
    real = {"train": __import__("optimize.data", fromlist=["get"]).get("gmm")(2000, seed=0)}
    judge = Judge(features=feature_maps("raw"), real=real, n_boot=20)
    seeds = range(TUNE_SEED_OFFSET, TUNE_SEED_OFFSET + 24)
    fds = {(rho, smin, end): evaluate(gmm, baselines.build("euler", 4, rho=rho, sigma_min=smin, end=end), judge=judge,
                                      shape=(1, 8, 8), seeds=seeds, dtype=torch.float64)["fd_train_raw"]
           for rho in (2.0, 7.0) for smin in (0.002, 0.05) for end in ("zero", "sigma_min")}
    assert (tuned["rho"], tuned["sigma_min"], tuned["end"]) == min(fds, key=fds.get)
    assert tuned["tune_fd"] == pytest.approx(min(fds.values()), rel=1e-6)  # the run and this process may differ in threads


def test_results_csv_round_trips_labels_with_commas_and_quotes(tmp_path: Path) -> None:
    from optimize.evaluation.results import write_results

    rows = [{"method": "tada(detail=0.5,order=2)", "nfe": 6, "fd_train_main": 10.123456789012345, "ref_rmse": None},
            {"method": 'odd "quoted", label', "nfe": 8, "fd_train_main": 3.5, "ref_rmse": 0.25, "extra": "a\nb"}]
    write_results(rows, str(tmp_path))
    back = read_results(str(tmp_path / "results.csv"))
    assert [r["method"] for r in back] == [r["method"] for r in rows]
    assert back[0]["fd_train_main"] == rows[0]["fd_train_main"] and back[0]["ref_rmse"] is None
    assert back[1]["extra"] == "a\nb" and back[0]["extra"] is None and back[1]["nfe"] == 8


def test_paired_rows_and_restricted_judge() -> None:
    from optimize.evaluation.results import format_table, paired, public, verdict

    gmm = GaussianMixture.ring(8, radius=2.0, std=0.1)
    real = {"train": gmm.sample(300, torch.Generator().manual_seed(0)), "heldout": gmm.sample(300, torch.Generator().manual_seed(1))}
    judge = Judge(features=feature_maps("raw"), real=real, n_boot=50)
    rows = []
    for name, nfe in [("heun", 41), ("euler", 3)]:
        r = evaluate(gmm, baselines.build(name, nfe, sigma_max=20.0), judge=judge, shape=(2,), seeds=range(300), dtype=torch.float64)
        rows.append({"method": name, **r})
    diff, se = paired(rows[0], rows[1], "fd_train_raw")
    assert diff == rows[0]["fd_train_raw"] - rows[1]["fd_train_raw"] and se > 0
    assert verdict(diff, se) == "better"  # the converged heun solve is far closer to the data than euler at NFE 3
    assert "fd_se_train_raw" in rows[0] and "_estimates" not in public(rows[0])
    assert "heun - euler" not in format_table(rows)  # different NFE: no paired line
    same_nfe = [{**r, "nfe": 1} for r in rows]
    assert "heun - euler (NFE 1)" in format_table(same_nfe) and "heun better" in format_table(same_nfe)
    only_train = judge.restricted(splits=["train"], n_boot=0)
    s = only_train.score(rows[0]["samples"])
    assert "fd_train_raw" in s and "fd_heldout_raw" not in s and "fd_se_train_raw" not in s


def test_student_table_gets_no_reference_rmse(tmp_path: Path) -> None:
    """A table distilled from another model (metadata teacher_fingerprint) is scored without a reference solve:
    a long solve with a one-step student as the denoiser would mean nothing."""
    base = baselines.build("euler", 1)
    table = tmp_path / "student.safetensors"
    type(base)(base.sigmas, base.coef, {**base.metadata, "teacher_fingerprint": "0123456789abcdef"}).save(str(table))
    _run(["evaluate", *TINY, f"table={table}", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    row = read_results(str(tmp_path / "a" / "results.csv"))[0]
    assert row["ref_rmse"] is None and math.isfinite(row["fd_train_raw"])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
