"""scripts/results_students.py: issue 27's goal verdicts, from the paired differences of the CSV rows; the selection
of the shipped student and its bad arguments."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def diffs(other: str, **d: tuple[float, float]) -> dict[str, str]:
    """The CSV columns of a student's paired differences to ``other`` (key -> (difference, standard error))."""
    out = {}
    for key, (mean, se) in d.items():
        out[f"d{key}_vs_{other}"], out[f"d{key}_vs_{other}_se"] = str(mean), str(se)
    return out


def test_goals_need_both_measures_beyond_noise_and_the_moonshot_no_measure_worse(script):
    mod = script("results_students")
    table = lambda bucket: {"method": f"edm-best-nfe{bucket}", "kind": "best table", "bucket": str(bucket),
                            "nfe": str(bucket), "teacher_forwards": str(bucket)}
    m4 = {"method": "dsno", "kind": "student", "bucket": "4", "nfe": "1", "teacher_forwards": "4.07",
          **diffs("edm-best-nfe4", fd_train_b=(-1.0, 0.4), fd_heldout_main=(-5.0, 2.0))}  # -2.5 se: better on both
    m1 = {"method": "dsno M=1", "kind": "student", "bucket": "1", "nfe": "1", "teacher_forwards": "1.04",
          **diffs("edm-best-nfe2", fd_train_b=(-1.0, 0.4), fd_heldout_main=(-10.0, 4.0)),
          **diffs("cd", fd_train_b=(-0.1, 0.1), fd_heldout_main=(-3.0, 1.4)),  # FD-b within noise of CD
          **diffs("edm-best-nfe4", fd_train_main=(3.0, 2.0), fd_heldout_main=(6.0, 3.8), fd_train_b=(0.2, 0.25))}
    cd = {"method": "cd", "kind": "student", "bucket": "1", "nfe": "1", "teacher_forwards": "1",
          **diffs("edm-best-nfe4", fd_train_main=(6.0, 2.5), fd_heldout_main=(1.0, 4.0), fd_train_b=(0.3, 0.3))}
    lines = mod.goal_lines([m4, m1, cd, table(2), table(4)])
    assert lines[0] == "## Goals"
    goals = [line for line in lines if line.startswith("- ")]
    assert len(goals) == 4
    assert "(`dsno`) beats the best table at NFE 4: **met**" in goals[0]
    assert "(`dsno M=1`) beats the best table at NFE 2 and the CD student at one step: **not met**" in goals[1]
    assert "`cd`: FD-b train -0.1 ± 0.1 (within noise)" in goals[1]
    assert "(`dsno M=1`, 1.04 teacher forwards) within noise of it: **met**" in goals[2]
    assert "(`cd`, 1 teacher forward) within noise of it: **not met**" in goals[3]  # FD train +6 +- 2.5: worse
    assert mod.goal_lines([table(4)]) == []  # no student, no goals


def test_goals_report_the_distance_to_the_teacher_beside_and_the_tables_floor(script):
    """The M = 4 goal line carries the RMSE difference to the table (reported, not a criterion: a worse RMSE does not
    flip a met goal), and a best table's differences to the converged teacher make the floor sentence."""
    mod = script("results_students")
    teacher = mod.slug(mod.TEACHER)
    table4 = {"method": "edm-best-nfe4", "kind": "best table", "bucket": "4", "nfe": "4", "teacher_forwards": "4",
              **diffs(teacher, fd_train_b=(0.05, 0.2), fd_heldout_main=(1.0, 3.0))}
    m4 = {"method": "dsno", "kind": "student", "bucket": "4", "nfe": "1", "teacher_forwards": "4.07",
          **diffs("edm-best-nfe4", fd_train_b=(-1.0, 0.4), fd_heldout_main=(-5.0, 2.0), rmse=(0.02, 0.001))}
    lines = mod.goal_lines([m4, table4])
    goal = next(line for line in lines if line.startswith("- "))
    assert "**met**" in goal and "beside it, RMSE to the teacher +0.02 ± 0.001 (worse)" in goal
    floor = next(line for line in lines if line.startswith("How far the tables sit above"))
    assert "`edm-best-nfe4` minus the converged teacher: FD-b train +0.05 ± 0.2 (within noise), FD held-out +1 ± 3" in floor
    assert mod.TEACHER == "heun@255 (converged teacher)"


def test_selection_lines_name_the_shipped_student_and_every_score(script, tmp_path):
    mod = script("results_students")
    path = tmp_path / "selection-digits.csv"
    path.write_text("label,network,table,n_select,fd_train_main_select,chosen\n"
                    "dsno M=4,a.safetensors,a-1nfe.safetensors,2000,7.865,False\n"
                    "dsno M=1,b.safetensors,b-1nfe.safetensors,2000,6.892,True\n")
    lines = mod.selection_lines(path)
    assert lines[0] == "## Which student ships"
    assert lines[2].startswith("`dsno M=1` ships (the `dsno` rows above): the lowest FD train (main features) on 2,000 "
                               "selection seeds")
    assert "`dsno M=4` 7.87, `dsno M=1` 6.89" in lines[2]
    assert mod.selection_lines(tmp_path / "none.csv") == []


@pytest.mark.parametrize("argv, message", [
    (["--ship"], "--ship needs --select"),
    (["--select", "dsno=a,b", "cd=c,d"], "error: --select compares students of one method, got cd, dsno"),
    (["--select", "dsno M=1=a.safetensors"], "error: --student and --select take LABEL=NET,TABLE"),
    (["--model", "patches", "--select", "cd=a,b", "--ship"], "error: --ship: the patches page ships no cd student"),
])
def test_bad_selection_arguments_exit_2_before_any_work(argv, message):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "results_students.py"), *argv], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""
