"""scripts/results_overview.py: the best table of each method per NFE, verdicts only from the main run's stored
paired differences, never for a figure from another run; and the committed CSVs build a page with all three models."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def _row(method: str, nfe: int, fd: float, key: str = "fd_train_main", **extra: Any) -> dict[str, Any]:
    metric, _, rest = key.partition("_")
    return {"method": method, "nfe": nfe, key: fd, f"{metric}_se_{rest}": 0.5, **extra}


def _cells(page: str, model: str, nfe: int) -> dict[str, str]:
    """Header -> cell of one NFE row of one model's table."""
    sec = page.split(f"## {model}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(ln for ln in lines[2:] if ln.startswith(f"| {nfe} |"))
    return dict(zip(head, (c.strip() for c in row.strip("|").split("|"))))


VERDICT = re.compile(r"better|worse|≈|Δ")


def test_best_per_method_and_no_cross_run_verdict(tmp_path: Path, script) -> None:
    res = tmp_path / "results"
    _write(res / "learned" / "edm" / "results.csv", [
        _row("teacher (heun)", 79, 0.9, group="teacher"),
        _row("euler", 4, 10.0, group="classic"), _row("ipndm(end=sigma_min)", 4, 8.0, group="classic"),
        _row("ipndm+tuned", 4, 7.0, group="tuned classic"),
        _row("ld3-unipc", 4, 6.0, group="ld3"), _row("ld3-dpmpp_2m", 4, 5.0, group="ld3"),
        _row("iia(ld3)", 4, 4.0, group="ours"), _row("ddss-kid+match(ld3)", 4, 3.0, group="ours"),
        _row("edm-best", 4, 0.1, group="shipped"),  # a copy of one of ours: never a cell
    ])
    _write(res / "tada" / "results.csv", [
        _row("dpmpp_2m", 4, 0.2),  # another run's classic row: never the best classic
        _row("tada k=1 o2", 4, 9.0), _row("tada k=0.5 o2", 4, 2.0), _row("tada k=4 o3", 15, 1.5),
    ])
    _write(res / "edm" / "results.csv", [_row("unipc", 15, 1.7), _row("euler", 15, 9.0)])
    # gmm: the main run's IIA wins its column even where another run's IIA has the lower figure
    _write(res / "learned" / "gmm" / "results.csv", [
        _row("ipndm", 4, 0.5, "fd_train_raw", group="classic"), _row("iia(ld3)", 4, 0.3, "fd_train_raw", group="ours")])
    _write(res / "iia" / "gmm" / "results.csv", [
        _row("iia euler (default)", 4, 0.01, "fd_train_raw", best_classic="ipndm", dfd_train_raw_best=-1.0, dfd_train_raw_best_se=0.1),
        _row("iia euler (default)", 5, 0.2, "fd_train_raw", best_classic="ipndm", dfd_train_raw_best=-1.0, dfd_train_raw_best_se=0.1)])
    # patches: stored paired differences to the run's named best classic; new columns and an ld3 row are fine
    _write(res / "patches" / "results.csv", [
        _row("dpmpp_2m", 4, 300.0, kind="classic", best_classic="dpmpp_2m", ref_rmse=0.2),
        _row("dpmpp_3m", 4, 300.0, kind="classic", best_classic="dpmpp_2m", dfd_train_main_best=0.0, dfd_train_main_best_se=0.0),
        _row("ddss-ggdm", 4, 240.0, kind="learned", best_classic="dpmpp_2m", dfd_train_main_best=-60.0, dfd_train_main_best_se=20.0),
        _row("iia (euler, default)", 4, 299.0, kind="learned", best_classic="dpmpp_2m", dfd_train_main_best=-1.0, dfd_train_main_best_se=2.0),
        _row("ld3-unipc", 4, 250.0, kind="ld3", ref_rmse=0.1),
        _row("tada", 4, 350.0, kind="tada", best_classic="dpmpp_2m", dfd_train_main_best=50.0, dfd_train_main_best_se=10.0),
    ])
    page = script("results_overview").build(res, tmp_path)

    d4 = _cells(page, "digits", 4)
    assert d4["best classic"].startswith("ipndm(end=sigma_min) 8 ± 0.5")
    assert d4["tuned classic"].startswith("ipndm+tuned 7")
    assert d4["LD3"].startswith("ld3-dpmpp_2m 5")
    assert d4["IIA"].startswith("iia(ld3) 4") and d4["DDSS"].startswith("ddss-kid+match(ld3) 3")
    assert d4["TADA"].startswith("tada k=0.5 o2 2 ± 0.5") and not VERDICT.search(d4["TADA"])
    assert "edm-best" not in page and "0.1 ±" not in page and "0.2 ±" not in page.split("## gmm")[0]
    assert "0.9 ± 0.5" in page  # the converged teacher line
    d15 = _cells(page, "digits", 15)  # classic from the classic page, TADA from its own run: no verdict anywhere
    assert d15["best classic"].startswith("unipc 1.7") and not any(VERDICT.search(c) for c in d15.values())
    assert "results-tada.md" in page and "separate run" in page

    g4, g5 = _cells(page, "gmm", 4), _cells(page, "gmm", 5)
    assert g4["IIA"].startswith("iia(ld3) 0.3") and not VERDICT.search(g4["IIA"])
    assert g5["IIA"].startswith("iia euler (default) 0.2") and not VERDICT.search(g5["IIA"])  # stored Δ, but another run

    p4 = _cells(page, "patches", 4)
    assert p4["best classic"].startswith("dpmpp_2m 300")
    assert p4["DDSS"].endswith("**better**)") and p4["IIA"].endswith("≈)") and p4["TADA"].endswith("worse)")
    assert p4["LD3"] == "ld3-unipc 250 ± 0.5"  # no stored difference: the value only


def test_committed_results_build(script) -> None:
    page = script("results_overview").build(REPO / "docs" / "results")
    for model in ("## digits", "## gmm", "## patches"):
        assert model in page
    for target in set(re.findall(r"\]\(([^)#]+\.md)\)", page)):
        assert (REPO / "docs" / target).is_file(), target


def test_the_students_pages_hold_the_current_students(tmp_path: Path, script) -> None:
    res = tmp_path / "results"
    _write(res / "learned" / "edm" / "results.csv", [
        _row("euler", 4, 10.0, group="classic"), _row("ddss-kid+match(ld3)", 4, 3.0, group="ours")])
    _write(res / "students" / "digits.csv", [
        _row("dsno", 1, 6.2, kind="student"), _row("cd", 1, 11.1, kind="student"),
        _row("cd 2-step", 2, 12.8, kind="student"), _row("edm-best-nfe4", 4, 2.9, kind="best table")])
    _write(res / "dsno" / "results.csv", [_row("dsno", 1, 11.9)])  # an older student's ablation run
    _write(res / "patches" / "results.csv", [
        _row("dpmpp_2m", 4, 300.0, kind="classic"), _row("ddss-ggdm", 4, 240.0, kind="learned"),
        _row("dsno", 1, 206.0, kind="distilled")])  # the older student
    _write(res / "students" / "patches.csv", [
        _row("heun@255 (converged teacher)", 255, 60.5, kind="teacher"), _row("dsno", 1, 85.5, kind="student"),
        _row("patches-best-nfe4", 4, 39.7, kind="best table"), _row("unipc:sigma_min@4", 4, 1.5, kind="classic")])
    page = script("results_overview").build(res, tmp_path)

    d1, d2 = _cells(page, "digits", 1), _cells(page, "digits", 2)
    assert d1["DSNO"] == "dsno 6.2 ± 0.5 ¹" and d1["CD"] == "cd 11.1 ± 0.5 ¹" and d2["CD"] == "cd 2-step 12.8 ± 0.5 ¹"
    assert _cells(page, "digits", 4)["DDSS"].startswith("ddss-kid+match(ld3) 3")  # a best-table copy is never a cell
    assert _cells(page, "patches", 1)["DSNO"] == "dsno 85.5 ± 0.5 ¹"  # before the main run's older student
    assert _cells(page, "patches", 4)["best classic"].startswith("dpmpp_2m 300")  # the base stays the main run's
    assert not any(f"{x} ±" in page for x in ("11.9", "206", "2.9", "39.7", "60.5", "1.5"))
