"""Issue 23: output names never come from file contents. Labels from table metadata become safe slugs and every
path built from one stays inside the run folder (traversal, absolute, empty, newline and very long labels)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimize.cli import main
from optimize.base.paths import MAX_SLUG, path_inside, slug
from samplers import baselines

HOSTILE = ["x/../../../../../../../tmp/ESCAPED", "/etc/passwd", "", "a\nb", "..", ".", "../x", "C:\\evil\\x",
           "ok" * 400, "nul\x00byte", "~/x", "$(rm -rf /)", "é-ü"]


@pytest.mark.parametrize("label", HOSTILE)
def test_slug_is_one_safe_component(label: str, tmp_path: Path) -> None:
    name = slug(label)
    assert name and len(name) <= MAX_SLUG and name not in (".", "..") and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\n" not in name and "\x00" not in name
    assert os.path.dirname(os.path.realpath(path_inside(tmp_path, f"samples-{name}-nfe4.png"))) == os.path.realpath(tmp_path)


def test_safe_labels_keep_their_names_and_long_ones_stay_apart() -> None:
    for label in ("dpmpp_2m(eta=0.5)", "iia-generic(unipc)", "ddss-ggdm+tuned", "ipndm(max_order=3,schedule=karras)"):
        assert slug(label) == label  # shipped file names do not change
    a, b = slug("a" * 200 + "1"), slug("a" * 200 + "2")
    assert a != b and len(a) == len(b) == MAX_SLUG
    assert slug("") == "table"


def test_path_inside_refuses_escapes(tmp_path: Path) -> None:
    for name in ("../x.png", "/tmp/x.png", "a/b.png", ".."):
        with pytest.raises(ValueError, match="leave the run folder"):
            path_inside(tmp_path, name)
    assert path_inside(str(tmp_path), "ok.png") == os.path.join(str(tmp_path), "ok.png")


def test_evaluate_with_a_traversal_label_writes_only_inside_its_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue's reproduction: a table whose ``method`` climbs out of the run folder into an existing folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    table = baselines.build("euler", 4)
    table.metadata["method"] = "x/" + "../" * 12 + str(outside).lstrip("/") + "/TRAV2"
    path = table.save(str(tmp_path / "evil.safetensors"))
    monkeypatch.chdir(work)
    main(["evaluate", "model=gmm", f"table={path}", "n=16", "ref_nfe=9", "n_boot=0", "grid=4", "hydra.run.dir=run",
          f"cache_dir={tmp_path / 'cache'}"])
    assert list(outside.iterdir()) == []
    written = sorted(p.name for p in (work / "run").iterdir())
    assert [n for n in written if n.startswith("samples-")] == [f"samples-{slug(table.metadata['method'])}-nfe4.png"]
    assert sorted(p.name for p in work.iterdir()) == ["run"]
    assert slug(table.metadata["method"]) in capsys.readouterr().out  # the printed and CSV label is the slug too
