"""scripts/results_t2i.py: the paired differences behind the page's verdicts (peer, shipped, teacher, NFE 10)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimize.evaluation.metrics import FDEstimate
from optimize.evaluation.results import write_csv
from samplers import baselines

REPO = Path(__file__).resolve().parents[1]


def row(method, kind, nfe, rmse, hits, fd_b, boot_shift):
    """An in-memory row as ``score`` makes it: per-sample RMSE and hits, an FD b estimate with 4 replicates."""
    rmse, hits = torch.tensor(rmse, dtype=torch.float64), torch.tensor(hits, dtype=torch.float64)
    fd = {key: FDEstimate(fd_b, np.array([fd_b, fd_b + boot_shift, fd_b - boot_shift, fd_b + 2 * boot_shift]))
          for key in ("fd_heldout_main", "fd_heldout_b", "fd_teacher_b")}
    return {"method": method, "kind": kind, "nfe": nfe, "rmse": float(rmse.mean()), "_rmse": rmse,
            "adherence": float(hits.mean()), "_hits": hits, "_estimates": fd}


def test_moonshot_columns_pair_against_the_teacher_and_the_best_peer_at_nfe_10(script):
    mod = script("results_t2i")
    ref = row("50 steps", "reference", 50, [0, 0, 0, 0], [1, 1, 1, 0], 10.0, 1.0)
    peer10a = row("A", "peer", 10, [0.30, 0.30, 0.30, 0.30], [1, 1, 1, 1], 11.0, 1.0)
    peer10b = row("B", "peer", 10, [0.10, 0.20, 0.10, 0.20], [1, 1, 0, 1], 12.0, 2.0)  # lowest RMSE at 10: B
    peer5 = row("A", "peer", 5, [0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 20.0, 1.0)
    table5 = row("best", "project", 5, [0.11, 0.22, 0.13, 0.24], [1, 1, 1, 1], 12.5, 2.0)
    table4 = row("best", "project", 4, [0.2, 0.2, 0.2, 0.2], [1, 1, 1, 0], 13.0, 1.0)
    peer4 = row("A", "peer", 4, [0.4, 0.4, 0.4, 0.4], [1, 0, 1, 0], 14.0, 1.0)
    rows = [ref, peer10a, peer10b, peer5, table5, table4, peer4]
    mod.add_paired(rows)

    # adherence paired with the 50-step solve's hits on the same seeds: mean of the differences and its se
    d = torch.tensor([0, 0, 0, 0.0])  # table4's hits equal the teacher's
    assert table4["dadherence_vs_teacher"] == pytest.approx(float(d.mean()))
    d = torch.tensor([0, -1, 0, 0.0])  # peer4 [1, 0, 1, 0] against the teacher's [1, 1, 1, 0]
    assert peer4["dadherence_vs_teacher"] == pytest.approx(-0.25)
    assert peer4["dadherence_vs_teacher_se"] == pytest.approx(float(d.std() / 2))
    assert "dadherence_vs_teacher" not in ref

    # only the project's NFE-5 rows are paired with the best (lowest RMSE) peer at NFE 10
    assert table5["peer10"] == "B" and "peer10" not in peer5 and "peer10" not in table4
    diff = torch.tensor([0.01, 0.02, 0.03, 0.04])
    assert table5["drmse_vs_peer10"] == pytest.approx(float(diff.mean()))
    assert table5["drmse_vs_peer10_se"] == pytest.approx(float(diff.std() / 2))
    assert table5["dfd_heldout_b_vs_peer10"] == pytest.approx(0.5)
    assert table5["dfd_heldout_b_vs_peer10_se"] == pytest.approx(0.0)

    as_read = [{k: "" if v is None else str(v) for k, v in r.items() if not k.startswith("_")} for r in rows]
    lines = mod.moonshot_lines(as_read)
    nfe4 = next(line for line in lines if line.startswith("- NFE 4"))
    nfe5 = next(line for line in lines if line.startswith("- NFE 5"))
    assert "(within noise)" in nfe4  # a zero difference
    # RMSE +0.025 +- 0.0065: worse beyond two se; FD b +0.5 with se 0: worse
    assert "against B at NFE 10" in nfe5 and nfe5.count("(worse)") == 2


def test_no_moonshot_lines_without_nfe_4_or_a_pairing_at_nfe_10(script):
    mod = script("results_t2i")
    rows = [{"method": "best", "kind": "project", "nfe": "6", "dadherence_vs_teacher": "0.01",
             "dadherence_vs_teacher_se": "0.01"}]
    assert mod.moonshot_lines(rows) == []


@pytest.mark.parametrize("config, label", [
    ({"schedule": "karras"}, "ddss (from euler)"),
    ({"schedule": "flow", "end": "sigma_min"}, "ddss (from euler, flow, to sigma_min)"),
    ({"schedule": "time_uniform", "end": "zero"}, "ddss (from euler, time_uniform)"),
    ({"schedule": "karras", "loss": "kid+match", "match_weight": 3e6}, "ddss (kid+match loss, match_weight 3e+06) (from euler)"),
    ({"loss": "kid+match", "kid_against": "teacher", "match_weight": 2e6},
     "ddss (kid+match loss against the teacher, match_weight 2e+06) (from euler)"),
    ({"loss": "match", "feature_weight": 200.0}, "ddss (feature match, feature_weight 200) (from euler)"),
])
def test_a_ddss_row_names_its_classic_start_grid_and_end(script, config, label):
    mod = script("results_t2i")
    table = baselines.build("euler", 4)
    table.metadata.update(method="ddss", init="euler", config=config, guidance=7.5)
    assert mod.table_label(Path("t.safetensors"), table, 7.5) == label
    assert mod.table_label(Path("t.safetensors"), table, 3.0) == label + " (learned at w7.5)"


def test_a_section_pairs_with_the_table_shipped_for_its_scale(script, tmp_path):
    mod = script("results_t2i")
    shipped = mod.SHIPPED / "sd-tiny-best-nfe4.safetensors"
    at_3, best = {"guidance": 3}, {"guidance": 7.5, "shipped_as": "sd-tiny-best-nfe4"}
    assert mod.shipped_rank(mod.SHIPPED / "sd-tiny-w3-nfe4.safetensors", at_3, 3.0) == 2
    assert mod.shipped_rank(shipped, best, 3.0) == 1  # shipped at 7.5, run at 3
    assert mod.shipped_rank(shipped, best, 7.5) == 2
    assert mod.shipped_rank(tmp_path / "sd-tiny-best-nfe4.safetensors", best, 7.5) == 0  # a copy elsewhere
    assert mod.shipped_rank(mod.SHIPPED / "sd-tiny-best-fast-nfe4.safetensors", best, 10.0) == 0  # kept beside it
    assert mod.shipped_rank(mod.SHIPPED / "sd-tiny-w3-nfe4.safetensors", at_3, 7.5) == 0

    peer = row("AYS", "peer", 4, [0.3, 0.3, 0.3, 0.3], [1, 0, 1, 1], 20.0, 1.0)
    learned_at_7 = row("best", "project", 4, [0.4, 0.4, 0.4, 0.4], [1, 1, 1, 0], 25.0, 1.0)
    learned_at_3 = row("ddss", "project", 4, [0.1, 0.2, 0.1, 0.2], [1, 1, 1, 1], 15.0, 1.0)
    learned_at_7["_shipped"], learned_at_3["_shipped"] = 1, 2
    mod.add_paired([peer, learned_at_7, learned_at_3])
    assert {r["shipped"] for r in (peer, learned_at_7, learned_at_3)} == {"ddss"}
    assert learned_at_7["drmse_vs_shipped"] == pytest.approx(0.25) and "drmse_vs_shipped" not in learned_at_3
    assert peer["dfd_heldout_b_vs_shipped"] == pytest.approx(5.0)


def test_cached_images_serve_a_prefix_and_extend_a_shorter_run(script, tmp_path):
    mod = script("results_t2i")
    images = torch.rand(6, 3, 4, 4)
    asked = []

    def compute(lo):
        asked.append(lo)
        return images[lo:4]

    first = mod.cached(tmp_path, "t-w7.5", 2, "Euler-nfe4", lambda lo: images[lo:2])
    assert torch.equal(first, images[:2])
    longer = mod.cached(tmp_path, "t-w7.5", 4, "Euler-nfe4", compute)  # runs samples 2..3 only
    assert asked == [2] and torch.equal(longer, images[:4])
    again = mod.cached(tmp_path, "t-w7.5", 3, "Euler-nfe4", compute)  # a prefix of the n = 4 file, nothing run
    assert asked == [2] and torch.equal(again, images[:3])
    other = mod.cached(tmp_path, "t-w7.5", 4, "DDIM-nfe4", lambda lo: images[lo:4] + 1)  # another key: all of it
    assert torch.equal(other, images[:4] + 1)
    tail = mod.cached(tmp_path, "t-w7.5", 4, "nfe4", lambda lo: images[lo:4] + 2)  # the end of other keys' names: not its files
    assert torch.equal(tail, images[:4] + 2)


def section_row(method, kind, nfe, best="", table="", peer10=""):
    """A row of a section as read back (``read_section``): strings but the NFE."""
    return {"method": method, "kind": kind, "nfe": nfe, "best_peer": best, "table": table, "peer10": peer10}


def test_update_scores_the_best_peers_and_the_project_rows_again_and_keeps_the_other_peers(script):
    mod = script("results_t2i")
    section = [section_row("50 steps", "reference", 50),
               section_row("Euler", "peer", 4, "oss"), section_row("oss", "peer", 4, "oss", "t/oss-4.safetensors"),
               section_row("best (x)", "project", 4, "oss", "c/best-4.safetensors"),
               section_row("ddss (y)", "project", 4, "oss", "t/ddss-4.safetensors"),
               section_row("Euler", "peer", 5, "UniPC"), section_row("UniPC", "peer", 5, "UniPC"),
               section_row("best (x)", "project", 5, "UniPC", "c/best-5.safetensors", peer10="DPM"),
               section_row("DPM", "peer", 10, "DPM"), section_row("oss", "peer", 10, "DPM", "t/oss-10.safetensors")]
    plan = mod.update_plan(section, [4])
    assert plan == {4: [mod.REPO / "t/oss-4.safetensors", mod.REPO / "c/best-4.safetensors",
                        mod.REPO / "t/ddss-4.safetensors"]}  # not Euler: its figures and differences stand
    plan = mod.update_plan(section, [5])  # an NFE-5 row paired against NFE 10's best peer: that peer too
    assert plan == {5: ["UniPC", mod.REPO / "c/best-5.safetensors"], 10: ["DPM"]}
    assert mod.update_plan(section, [4], ["DDIM"])[4][-1] == "DDIM"  # a named peer the section has not scored yet
    section[1]["dfd_heldout_b_vs_shipped"] = "1.0"  # Euler paired with the shipped table, which may have changed
    assert mod.update_plan(section, [4], ["Euler"])[4] == ["Euler", mod.REPO / "t/oss-4.safetensors",
                                                          mod.REPO / "c/best-4.safetensors", mod.REPO / "t/ddss-4.safetensors"]
    del section[1]["dfd_heldout_b_vs_shipped"]

    fresh = [section_row("50 steps", "reference", 50) | {"rmse": "new"},
             section_row("best (z)", "project", 4, "oss", "c/best-4.safetensors") | {"rmse": 0.1},  # same file
             section_row("oss", "peer", 4, "oss", "t/oss-4.safetensors") | {"rmse": 0.2},
             section_row("ddss (w)", "project", 4, "oss", "t/new-4.safetensors") | {"rmse": 0.3}]  # a new file
    merged = mod.merge_section(section, fresh)
    assert [r["method"] for r in merged[:6]] == ["50 steps", "Euler", "oss", "best (z)", "ddss (y)", "ddss (w)"]
    assert "rmse" not in merged[0] and merged[2]["rmse"] == 0.2 and merged[3]["rmse"] == 0.1
    assert merged[6:] == section[5:] and len(merged) == len(section) + 1


@pytest.mark.parametrize("argv, message", [
    (["--update", "--teacher", "sd3-tiny", "--peers", "Nope"], "error: --peers: no stock peer 'Nope' for sd3-tiny"),
    (["--update", "--teacher", "no-such-teacher"], "error: --update: no section"),
    (["--update", "--teacher", "sd-tiny", "--n", "7"], "error: --update: methods-sd-tiny-w7.5.csv holds 2000 samples, "
     "not --n 7"),
    (["--tables", "README.md"], "error: --tables: README.md"),
    (["--study", "a b"], "error: --study is part of a file name"),
    (["--teacher", "sd-tiny", "--peers", "Nope"], "error: --peers: no stock peer 'Nope' for sd-tiny; choose from DPM++2M"),
])
def test_bad_arguments_exit_2_before_any_work(argv, message):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "results_t2i.py"), *argv], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def csv_row(method, kind, nfe, fd_b, fd_se, **paired):
    """A row as the page reads it back: strings, the paired columns given by name."""
    return {"method": method, "kind": kind, "nfe": str(nfe), "fd_heldout_b": str(fd_b), "fd_se_heldout_b": str(fd_se),
            **{k: str(v) for k, v in paired.items()}}


def test_goals_judge_the_shipped_table_against_every_peer_and_the_teacher_where_a_peer_is_there(script):
    mod = script("results_t2i")
    ref = csv_row("50 steps", "reference", 50, 100.0, 4.0)
    table = csv_row("best", "project", 5, 95.0, 4.0, shipped="best", best_peer="oss", drmse_vs_peer=-0.05,
                    drmse_vs_peer_se=0.002, dfd_heldout_b_vs_teacher=-5.0, dfd_heldout_b_vs_teacher_se=1.0)
    beaten = csv_row("UniPC", "peer", 5, 120.0, 4.0, shipped="best", dfd_heldout_b_vs_shipped=25.0,
                     dfd_heldout_b_vs_shipped_se=2.0, dfd_heldout_b_vs_teacher=20.0, dfd_heldout_b_vs_teacher_se=2.0)
    at_teacher = csv_row("oss", "peer", 5, 99.0, 4.0, shipped="best", dfd_heldout_b_vs_shipped=4.0,
                         dfd_heldout_b_vs_shipped_se=3.0, dfd_heldout_b_vs_teacher=-1.0, dfd_heldout_b_vs_teacher_se=3.0)
    unpaired_far = csv_row("PNDM", "peer", 5, 200.0, 5.0)  # no paired columns: the two rows' own errors
    rows = [ref, table, beaten, at_teacher, unpaired_far]
    line = mod.goal_lines(rows)[-1]
    assert line.startswith("- NFE 5, best: RMSE met (-0.0500 ± 0.0020 against oss). FD b met: beats UniPC, PNDM; not oss")
    assert "(the table's FD b to the 50-step solve's: -5.0 ± 1.0, better)" in line

    # the table worse than the teacher beyond noise: a peer at the teacher it does not beat fails the goal
    table.update(dfd_heldout_b_vs_teacher="6.0", dfd_heldout_b_vs_teacher_se="1.0")
    assert "FD b not met: beats UniPC, PNDM; not oss (-4.0 ± 3.0; its own to the 50-step solve's -1.0 ± 3.0)" in \
        mod.goal_lines(rows)[-1]
    # a peer worse than the teacher that the table does not beat fails it too, paired or not
    table.update(dfd_heldout_b_vs_teacher="-5.0")
    at_teacher.update(dfd_heldout_b_vs_teacher="9.0")
    assert "FD b not met" in mod.goal_lines(rows)[-1]
    # unpaired figures decide only beyond noise: a peer within noise of the table and the teacher, unpaired, is open
    at_teacher.update(dfd_heldout_b_vs_teacher="-1.0")
    unpaired_far.update(fd_heldout_b="96.0")
    line = mod.goal_lines(rows)[-1]
    assert "FD b unresolved: beats UniPC; not oss" in line
    assert line.endswith("unresolved without pairing: PNDM (-1.0 ± 6.4 unpaired; its own to the 50-step solve's "
                         "-4.0 ± 6.4 unpaired) (the table's FD b to the 50-step solve's: -5.0 ± 1.0, better).")
    unpaired_far.update(fd_heldout_b="80.0")  # the table worse beyond noise, the peer below the teacher's FD b beyond it
    assert "FD b met: beats UniPC; not oss (-4.0 ± 3.0; its own to the 50-step solve's -1.0 ± 3.0), PNDM (+15.0 ± 6.4 " \
        "unpaired; its own to the 50-step solve's -20.0 ± 6.4 unpaired), at or below" in mod.goal_lines(rows)[-1]
    del table["dfd_heldout_b_vs_teacher"]  # the table's own distance to the teacher unpaired and within noise: open
    assert "FD b unresolved" in mod.goal_lines(rows)[-1]
    table.update(dfd_heldout_b_vs_teacher="-5.0", dfd_heldout_b_vs_teacher_se="1.0")
    # RMSE: within noise of the best peer is not met; no shipped table at an NFE, no line
    table.update(drmse_vs_peer="-0.003")
    assert "RMSE not met (-0.0030 ± 0.0020 against oss)" in mod.goal_lines(rows)[-1]
    assert mod.goal_lines([ref, beaten]) == []


def test_goals_add_the_fd_b_to_the_teachers_images_where_scored(script):
    """Beside FD b to data: the table's FD b to the 50-step solve's images against each peer's, paired; met only when
    every peer is beaten beyond noise, unresolved when some peer was not scored on it."""
    mod = script("results_t2i")
    ref = csv_row("50 steps", "reference", 50, 100.0, 4.0)
    table = csv_row("best", "project", 4, 95.0, 4.0, shipped="best", best_peer="oss", drmse_vs_peer=-0.05,
                    drmse_vs_peer_se=0.002, dfd_heldout_b_vs_teacher=-5.0, dfd_heldout_b_vs_teacher_se=1.0,
                    fd_teacher_b=10.0, fd_se_teacher_b=1.0)
    far = csv_row("Euler", "peer", 4, 90.0, 4.0, shipped="best", dfd_heldout_b_vs_shipped=-5.0,
                  dfd_heldout_b_vs_shipped_se=1.0, dfd_heldout_b_vs_teacher=-10.0, dfd_heldout_b_vs_teacher_se=1.0,
                  fd_teacher_b=40.0, fd_se_teacher_b=2.0, dfd_teacher_b_vs_shipped=30.0, dfd_teacher_b_vs_shipped_se=2.0)
    near = csv_row("oss", "peer", 4, 110.0, 4.0, shipped="best", dfd_heldout_b_vs_shipped=15.0,
                   dfd_heldout_b_vs_shipped_se=2.0, dfd_heldout_b_vs_teacher=10.0, dfd_heldout_b_vs_teacher_se=2.0,
                   fd_teacher_b=13.0, fd_se_teacher_b=2.0, dfd_teacher_b_vs_shipped=3.0, dfd_teacher_b_vs_shipped_se=2.0)
    line = mod.goal_lines([ref, table, far, near])[-1]
    assert line.endswith(" FD b to the 50-step solve's images not met (the table's 10.00 ± 1.00): beats Euler; not oss "
                         "(-3.00 ± 2.00).")
    near.update(dfd_teacher_b_vs_shipped="5.0")
    assert line.replace("not met", "met").split(": beats")[0] in mod.goal_lines([ref, table, far, near])[-1]
    assert mod.goal_lines([ref, table, far, near])[-1].endswith("beats every peer.")
    near.update(dfd_teacher_b_vs_shipped="")  # not paired with the table: unpaired, 10 - 13 within noise
    assert mod.goal_lines([ref, table, far, near])[-1].endswith(
        "unresolved (the table's 10.00 ± 1.00): beats Euler; unresolved without pairing: oss (-3.00 ± 2.24 unpaired).")
    del near["fd_teacher_b"]  # scored before the column
    assert mod.goal_lines([ref, table, far, near])[-1].endswith("unresolved (the table's 10.00 ± 1.00): beats Euler; "
                                                                "not scored on it: oss.")
    del table["fd_teacher_b"]  # a section scored before the column: no clause
    assert mod.goal_lines([ref, table, far, near])[-1].endswith("better).")


def test_a_side_study_judges_its_own_tables_against_every_peer_unpaired(script):
    """In a side study the goals judge each project row but the shipped file, at an NFE where the study holds every
    peer of the main section; the peers were paired with the shipped table only, so the differences are unpaired."""
    mod = script("results_t2i")
    ref = csv_row("50 steps", "reference", 50, 100.0, 4.0)
    shipped = csv_row("best", "project", 4, 95.0, 4.0, teacher="sd-tiny", table="checkpoints/tables/sd-tiny-best-nfe4.safetensors",
                      best_peer="oss", drmse_vs_peer=-0.05, drmse_vs_peer_se=0.002)
    variant = csv_row("ddss (kid)", "project", 4, 80.0, 3.0, teacher="sd-tiny", table="docs/results/t2i/tables/v.safetensors",
                      best_peer="oss", drmse_vs_peer=-0.01, drmse_vs_peer_se=0.002, dfd_heldout_b_vs_teacher=-20.0,
                      dfd_heldout_b_vs_teacher_se=2.0)
    peer = csv_row("Euler", "peer", 4, 92.0, 4.0, shipped="best", dfd_heldout_b_vs_shipped=-3.0,
                   dfd_heldout_b_vs_shipped_se=0.5, dfd_heldout_b_vs_teacher=-10.0, dfd_heldout_b_vs_teacher_se=1.0)
    main = [ref, shipped, peer]
    lines = mod.goal_lines([ref, shipped, variant, peer], main)
    assert len(lines) == 4 and "each table of this study but the shipped one" in lines[1]
    # 80 - 92 unpaired: -12 +- 5 is beyond two se (the paired -3 +- 0.5 belongs to the shipped table, not this one)
    assert lines[3].startswith("- NFE 4, ddss (kid): RMSE met (-0.0100 ± 0.0020 against oss). FD b met: beats Euler (")
    peer.update(fd_heldout_b="85.0")  # -5 +- 5 unpaired: within noise; both below the teacher's: there too
    assert "FD b met: beats no peer; not Euler (-5.0 ± 5.0 unpaired; its own to the 50-step solve's -10.0 ± 1.0), at " \
        "or below" in mod.goal_lines([ref, shipped, variant, peer], main)[3]
    main.append(csv_row("DDIM", "peer", 4, 91.0, 4.0))  # a peer of the main section the study lacks: no verdict
    assert mod.goal_lines([ref, shipped, variant, peer], main) == []


def test_the_page_shows_each_rows_paired_fd_b_to_the_50_step_solve(script, tmp_path):
    """A section's row gives its FD b minus the 50-step solve's (paired), the figure the goals' "be there too" reads;
    a row scored before that column (an old study) leaves the cell empty."""
    mod = script("results_t2i")
    head = dict(teacher="sd-tiny", guidance="3.0", n="2000", study="teacher-solve")
    rows = [csv_row("50 steps", "reference", 50, 49.49, 3.16, **head),
            csv_row("fit teacher unipc@20 (karras)", "peer", 20, 49.87, 3.13, dfd_heldout_b_vs_teacher=0.3756,
                    dfd_heldout_b_vs_teacher_se=0.131, **head),
            csv_row("old", "peer", 20, 50.0, 3.0, **head)]
    write_csv(rows, str(tmp_path / "methods-sd-tiny-w3-teacher-solve.csv"))
    mod.render(tmp_path, tmp_path / "page.md")
    page = (tmp_path / "page.md").read_text()
    assert "| FD b to 50-step | Δ FD b vs 50-step | adherence |" in page
    cells = {line.split(" | ")[0]: line.split(" | ") for line in page.splitlines() if line.startswith(("| fit", "| old"))}
    assert cells["| fit teacher unipc@20 (karras)"][6:8] == ["", "0.4 ± 0.1"]  # FD b to 50-step not scored; the paired Δ
    assert cells["| old"][7] == ""
