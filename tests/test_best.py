"""``python -m optimize best``: the recipe behind the shipped tables as one command (LD3 -> IIA and DDSS from it ->
select on the selection seeds -> evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from optimize.cli import main
from optimize.data.models import load_model
from optimize.recipes import match_scores
from optimize.data.models import native_sigmas
from optimize.training.distill import GAP_WARN, teacher_gap, teacher_native, teacher_table, teacher_targets
from samplers import SolverTable, baselines, make_noise, sample

REPO = Path(__file__).resolve().parents[1]


def test_best_is_a_method_with_its_own_keys(capsys: pytest.CaptureFixture[str]) -> None:
    main(["best", "--help"])
    out = capsys.readouterr().out
    assert "  best      the recipe behind the shipped tables as one command" in out
    assert "  n_select=1000 [an integer >= 2 (at most 1000000)]" in out and "ld3_bases=[unipc, dpmpp_2m]" in out


@pytest.mark.parametrize("argv, needle", [
    (["best", "model=gmm", "n_select=1"], "n_select must be an integer >= 2"),
    (["best", "model=gmm", "ld3_bases=[]"], "ld3_bases must name at least one solver"),
    (["best", "model=gmm", "compare=[ipndm:sideways]"], "the end convention after ':'"),
    (["best", "model=edm", "model.data=null"], "best learns against reference data"),
    (["best", "model=gmm", "teacher_grid=cubic"], "teacher: teacher_grid must be one of karras, native, got 'cubic'"),
    (["best", "model=gmm", "teacher_solver=heun", "teacher_nfe=20"], "teacher: heun needs an odd NFE"),
    (["ld3", "model=gmm", "teacher_grid=cubic"], "teacher: teacher_grid must be one of karras, native"),
    (["ddss", "model=gmm", "loss=match", "teacher_grid=cubic"], "teacher: teacher_grid must be one of karras, native"),
    (["ld3", "model=sd3-tiny", "teacher_grid=native", "teacher_nfe=1200"],
     "teacher: 1201 grid points exceed the 999 training times of the model"),
])
def test_bad_best_settings_are_one_error_line(cli_error, argv: list[str], needle: str) -> None:
    assert needle in cli_error(argv)


@pytest.mark.slow
def test_best_runs_the_chain_and_picks_on_the_selection_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """About a minute on 2 CPU cores: the whole chain on the analytic mixture at NFE 3."""
    monkeypatch.chdir(tmp_path)
    main(["best", "model=gmm", "nfe=3", "n=200", "n_select=200", "ddss_steps=20", "hydra.run.dir=run"])
    picked = SolverTable.load(str(tmp_path / "run" / "gmm-best-nfe3.safetensors"))
    assert picked.metadata["selected"] in ("ld3", "iia(ld3)", "ddss(ld3)")  # the start is a candidate too
    scores = picked.metadata["selected_from"]
    assert scores[picked.metadata["selected"]] == min(scores.values())
    assert {p.name for p in (tmp_path / "run" / "tables").glob("*.safetensors")} == {
        "ld3-unipc-nfe3.safetensors", "ld3-dpmpp_2m-nfe3.safetensors", "iia-ld3-nfe3.safetensors", "ddss-match-nfe3.safetensors"}
    assert "best=" in (tmp_path / "run" / "results.csv").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["best", "model=gmm", "select_by=fid"], "select_by must be one of fd, match"),
    (["best", "model=gmm", "ddss_loss=kid"], "ddss_loss must be kid+match or match"),
    (["best", "model=gmm", "start=iia"], "start must be ld3, oss or a classic solver SOLVER[:END]"),
    (["best", "model=gmm", "start=[oss,oss]"], "start must name one or more different starts"),
    (["best", "model=gmm", "start=euler:nowhere"], "the end convention after ':' must be one of"),
    (["best", "model=gmm", "iia=maybe"], "iia must be true or false, got 'maybe'"),
    (["best", "model=gmm", "select_prompts=[a dog]"], "select_prompts is for text-to-image models"),
    (["best", "model=edm", "model.data=null", "ddss_loss=match"], "best learns against reference data"),
])
def test_bad_prompt_only_settings_are_one_error_line(cli_error, argv: list[str], needle: str) -> None:
    assert needle in cli_error(argv)


def test_match_selection_scores_each_table_by_its_distance_to_the_teacher() -> None:
    """select_by=match: each candidate's mean squared distance to the teacher's solve from the same selection noises,
    recomputed here sample by sample with samplers.sample."""
    m = load_model(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "gmm.yaml"))
    seeds = list(range(3_000_000, 3_000_012))
    e = make_noise(1, m.shape, seeds, dtype=m.dtype)[0]
    target = teacher_targets(m.denoiser, e, "unipc", 20, 0.002, 80.0)
    tables = [(s, baselines.build(s, 4, sigma_min=0.002, sigma_max=80.0)) for s in ("euler", "dpmpp_2m")]
    scores = match_scores(m, tables, seeds, target)
    for label, t in tables:
        x = torch.stack([sample(t, m.denoiser, make_noise(1, m.shape, [s], dtype=m.dtype))[0] for s in seeds])
        assert scores[label] == pytest.approx(float((x - target).double().pow(2).flatten(1).mean(1).mean()), rel=1e-6)


@pytest.mark.slow
def test_best_from_the_teacher_alone_needs_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt-only chain (ddss_loss=match select_by=match) on the mixture with its data switched off, started from
    OSS's search (start=oss, the text-to-image recipe)."""
    monkeypatch.chdir(tmp_path)
    main(["best", "model=gmm", "model.data=null", "nfe=3", "n=200", "n_select=100", "ddss_steps=20", "ddss_loss=match",
          "select_by=match", "start=oss", "teacher_solver=dpmpp_2m", "teacher_nfe=12", "hydra.run.dir=run"])
    assert {p.name for p in (tmp_path / "run" / "tables").glob("*.safetensors")} == {
        "oss-nfe3.safetensors", "iia-oss-nfe3.safetensors", "ddss-match-nfe3.safetensors"}
    picked = SolverTable.load(str(tmp_path / "run" / "gmm-best-nfe3.safetensors"))
    assert picked.metadata["selected"] in ("oss", "iia(oss)", "ddss(oss)")
    start = picked.metadata["chain_start"]  # the shipped file says what the chain started from and what it cost
    assert start["method"] == "oss" and start["oss"]["teacher_steps"] == 200 and picked.metadata["n_select"] == 100
    assert picked.metadata["chain_fit_seconds"] >= start["fit_seconds"] > 0
    scores = picked.metadata["selected_from"]
    assert scores[picked.metadata["selected"]] == min(scores.values())
    assert picked.metadata["selection"].startswith("teacher match (dpmpp_2m@12 on karras")
    # DDSS matched the same teacher as the selection (best passes its teacher keys on)
    overrides = (tmp_path / "run" / "runs" / "ddss-match-nfe3" / ".hydra" / "overrides.yaml").read_text()
    assert "teacher_solver=dpmpp_2m" in overrides and "teacher_nfe=12" in overrides and "teacher_grid=karras" in overrides


def test_oss_start_is_one_search_for_the_missing_nfe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start=oss over nfe=[4,5,8] with the NFE-5 table already there runs OSS once, for [4,8] (its round K gives the
    K-step schedule), and copies each table under its name; with all there it runs nothing."""
    import optimize.recipes as recipes

    calls: list[list[str]] = []

    def fake_cli(args: list[str], run: Path) -> None:
        calls.append(args)
        run.mkdir(parents=True)
        for nfe in (4, 8):
            (run / f"oss-toy-nfe{nfe}.safetensors").write_text(f"oss {nfe}")

    monkeypatch.setattr(recipes, "run_cli", fake_cli)
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "oss-nfe5.safetensors").write_text("kept")
    got = recipes.fit_oss("toy", [4, 5, 8], tables, ("model.x=1",), tmp_path / "runs")
    assert len(calls) == 1 and calls[0][:3] == ["oss", "model=toy", "nfe=[4,8]"] and "model.x=1" in calls[0]
    assert {n: p.read_text() for n, p in got.items()} == {4: "oss 4", 5: "kept", 8: "oss 8"}
    recipes.fit_oss("toy", [4, 5, 8], tables, (), tmp_path / "runs")
    assert len(calls) == 1


def test_native_teacher_steps_on_the_flow_models_training_times() -> None:
    """teacher_grid=native on sd3-tiny (shift 1, flow times t = i / 1000): Euler@50 evaluates at 50 training times
    spaced uniformly from t = 0.999 (sigma 999) and lands unevaluated on t = 0.001, the grid of a stock 50-step
    FlowMatchEuler solve; Karras (rho 7) over the same range spends half its steps above sigma 19 (t > 0.95)."""
    native = native_sigmas(OmegaConf.create({"kind": "diffusers", "path": str(REPO / "checkpoints" / "sd3-tiny")}))
    lo, hi = float(native[0]), float(native[-1])
    table = teacher_table("euler", 50, lo, hi, native)
    t = (table.sigmas / (1 + table.sigmas)).numpy()
    assert len(t) == 50 and t[0] == pytest.approx(0.999) and table.metadata["step_sigmas"][-1] == pytest.approx(lo)
    steps = -np.diff(np.concatenate([t, [0.001]])) * 1000
    assert np.all(np.abs(steps - 998 / 50) <= 1.0 + 1e-6)  # uniform in training time, up to the integer grid
    karras = teacher_table("euler", 50, lo, hi)
    assert float(karras.sigmas[25]) > 19
    np.testing.assert_array_equal(teacher_table("euler", 50, lo, hi, native).sigmas, table.sigmas)  # deterministic
    with pytest.raises(ValueError, match="exceed the 999 training times"):
        teacher_table("euler", 999, lo, hi, native)


def test_native_teacher_falls_back_to_karras_without_training_times() -> None:
    """teacher_grid=native on a model without a scheduler (the analytic mixture) is Karras, as for OSS."""
    cfg = OmegaConf.create({"teacher_grid": "native", "model": {"kind": "gmm", "path": None}})
    assert teacher_native(cfg) is None
    native = teacher_table("unipc", 20, 0.002, 80.0, teacher_native(cfg))
    np.testing.assert_array_equal(native.sigmas, baselines.build("unipc", 20, end="sigma_min").sigmas)


def test_teacher_gap_of_a_converged_and_an_unconverged_teacher() -> None:
    """best's convergence check on the analytic mixture: UniPC@20 on Karras is converged, Euler@3 is not."""
    gmm = load_model(OmegaConf.load(REPO / "conf" / "model" / "gmm.yaml"))
    e = make_noise(1, gmm.shape, list(range(8)), dtype=gmm.dtype)[0]
    assert teacher_gap(gmm.denoiser, e, "unipc", 20, 0.002, 80.0) < 0.03 < GAP_WARN
    assert teacher_gap(gmm.denoiser, e, "euler", 3, 0.002, 80.0) > GAP_WARN


@pytest.mark.slow
def test_teacher_gap_flags_karras_unipc_on_the_flow_teacher() -> None:
    """On the sd3-tiny flow teacher UniPC@20 on Karras is far from its 60-NFE solve, euler@50 on the native grid (the
    stock 50-step FlowMatchEuler solve) close to its 150-NFE one (about a minute on 2 quiet cores)."""
    mcfg = OmegaConf.load(REPO / "conf" / "model" / "sd3-tiny.yaml")
    m, native = load_model(mcfg), native_sigmas(mcfg)
    lo, hi = float(native[0]), float(native[-1])
    seeds = [2_000_000, 2_000_001]
    e, cond = make_noise(1, m.shape, seeds, dtype=m.dtype)[0], m.cond_of(seeds)
    assert teacher_gap(m.denoiser, e, "unipc", 20, lo, hi, cond) > 0.2 > GAP_WARN
    assert teacher_gap(m.denoiser, e, "euler", 50, lo, hi, cond, native) < GAP_WARN


def test_starts_run_a_chain_each_and_one_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start=[euler:sigma_min,dpmpp_2m]: each classic start is written as a table of the model (the run's schedule, no
    fit), DDSS runs from each (the first start's files keep the one-start names), and the four candidates go to one
    selection; the shipped pick records the start of its own chain. DDSS is faked here (its table = its start), the
    rest is the real recipe on the mixture."""
    import optimize.recipes as recipes

    inits: list[str] = []

    def fake_cli(args: list[str], run: Path) -> None:
        assert args[0] == "ddss"
        init = next(a for a in args if a.startswith("init=table:")).removeprefix("init=table:")
        inits.append(Path(init).name)
        run.mkdir(parents=True)
        SolverTable.load(init).save(str(run / "ddss-full-match-nfe3.safetensors"))
        for png in ("sigmas", "coef"):
            (run / f"ddss-full-match-nfe3-{png}.png").write_bytes(b"png")

    monkeypatch.setattr(recipes, "run_cli", fake_cli)
    monkeypatch.chdir(tmp_path)
    main(["best", "model=gmm", "model.data=null", "nfe=3", "start=[euler:sigma_min,dpmpp_2m]", "schedule=logsnr",
          "iia=false", "ddss_loss=match", "select_by=match", "n_select=16", "evaluate=false", "teacher_solver=dpmpp_2m",
          "teacher_nfe=12", "hydra.run.dir=run"])
    tables = tmp_path / "run" / "tables"
    assert {p.name for p in tables.glob("*.safetensors")} == {
        "euler-sigma_min-nfe3.safetensors", "dpmpp_2m-nfe3.safetensors", "ddss-match-nfe3.safetensors",
        "ddss-match-dpmpp_2m-nfe3.safetensors"}
    assert inits == ["euler-sigma_min-nfe3.safetensors", "dpmpp_2m-nfe3.safetensors"]
    gmm = load_model(OmegaConf.load(REPO / "conf" / "model" / "gmm.yaml"))
    start = SolverTable.load(str(tables / "euler-sigma_min-nfe3.safetensors"), fingerprint=gmm.fingerprint)
    built = baselines.build("euler", 3, schedule="logsnr", end="sigma_min", sigma_min=0.002, sigma_max=80.0)
    torch.testing.assert_close(start.sigmas, built.sigmas)
    torch.testing.assert_close(start.coef, built.coef)
    assert start.metadata["model_fingerprint"] == gmm.fingerprint and start.metadata["end"] == "sigma_min"
    picked = SolverTable.load(str(tmp_path / "run" / "gmm-best-nfe3.safetensors"))
    scores = picked.metadata["selected_from"]
    assert set(scores) == {"euler:sigma_min", "ddss(euler:sigma_min)", "dpmpp_2m", "ddss(dpmpp_2m)"}
    assert scores[picked.metadata["selected"]] == min(scores.values())
    chain_of = {"euler:sigma_min": "euler", "ddss(euler:sigma_min)": "euler", "dpmpp_2m": "dpmpp_2m",
                "ddss(dpmpp_2m)": "dpmpp_2m"}
    assert picked.metadata["chain_start"]["method"] == chain_of[picked.metadata["selected"]]
    main(["best", "model=gmm", "model.data=null", "nfe=3", "start=[euler:sigma_min,dpmpp_2m]", "schedule=logsnr",
          "iia=false", "ddss_loss=match", "select_by=match", "n_select=16", "evaluate=false", "teacher_solver=dpmpp_2m",
          "teacher_nfe=12", "hydra.run.dir=run"])
    assert len(inits) == 2  # a rerun finds every table and fits nothing
