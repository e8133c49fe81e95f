"""``python -m optimize best``: the recipe behind the shipped tables as one command (LD3 -> IIA and DDSS from it ->
select on the selection seeds -> evaluate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimize.cli import main
from samplers import SolverTable


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
])
def test_bad_best_settings_are_one_error_line(cli_error, argv: list[str], needle: str) -> None:
    assert needle in cli_error(argv)


@pytest.mark.slow
def test_best_runs_the_chain_and_picks_on_the_selection_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """About a minute on 2 CPU cores: the whole chain on the analytic mixture at NFE 3."""
    monkeypatch.chdir(tmp_path)
    main(["best", "model=gmm", "nfe=3", "n=200", "n_select=200", "ddss_steps=20", "hydra.run.dir=run"])
    picked = SolverTable.load(str(tmp_path / "run" / "gmm-best-nfe3.safetensors"))
    assert picked.metadata["selected"] in ("iia(ld3)", "ddss(ld3)")
    scores = picked.metadata["selected_from"]
    assert scores[picked.metadata["selected"]] == min(scores.values())
    assert {p.name for p in (tmp_path / "run" / "tables").glob("*.safetensors")} == {
        "ld3-unipc-nfe3.safetensors", "ld3-dpmpp_2m-nfe3.safetensors", "iia-ld3-nfe3.safetensors", "ddss-match-nfe3.safetensors"}
    assert "best=" in (tmp_path / "run" / "results.csv").read_text()
