"""Issue 11: every hostile-input probe of scripts/probe_inputs.py ends in one `error:` line, exit 2, no traceback,
nothing written and nothing unpickled."""

from __future__ import annotations

import re

import pytest


def test_every_probe_is_clean(script) -> None:
    lines: list[str] = []
    counts, results = script("probe_inputs").run_all(report=lines.append)
    unclean = [f"{r.probe.name}: {r.kind}: {r.err.strip()[-300:]}" for r in results if r.kind != "clean"]
    assert not unclean, "\n".join(unclean)
    assert counts["tried"] >= 90 and counts["clean"] == counts["tried"]
    assert counts["tracebacks"] == counts["silent wrong"] == 0
    assert lines[-1].startswith(f"probes tried {counts['tried']} / clean {counts['tried']} / tracebacks 0 / silent wrong 0")
    names = {r.probe.name for r in results}  # every class of the issue is present
    for needed in ("generate/out-is-file", "generate/nan-samples", "generate/table-meta_null", "generate/model-net_absurd",
                   "optimize/ddss-resume-evil", "optimize/ddss-resume-true-other-run", "optimize/teacher-resume-other-batch",
                   "optimize/sweep-late-bad-point", "optimize/cfg-job-bad-model", "optimize/checkpoint-is-table"):
        assert needed in names


def test_probe_counts_a_failure(script) -> None:
    """The probe's verdicts can fail: a command that exits 0, or prints a traceback, is not clean."""
    m = script("probe_inputs")
    probe = m.Probe("x", "samplers", [])
    assert m.Result(probe, 0, "", "", False).kind == "silent wrong"
    assert m.Result(probe, 1, "Traceback (most recent call last):\n", "", True).kind == "traceback"
    assert m.Result(probe, 2, "error: a\nerror: b\n", "", False).kind.startswith("unclean")
    assert m.Result(probe, 2, "error: a\n", "", False, written=["o/samples.npz"]).kind.startswith("unclean")
    assert m.Result(probe, 2, "error: a\n", "", False, payload_ran=True).kind.startswith("unclean")
    assert m.Result(probe, 2, "note: skipping\nerror: a\n", "", False).kind == "clean"


def test_script_command_line(capsys: pytest.CaptureFixture[str], script) -> None:
    """``python scripts/probe_inputs.py -k NAME`` runs the matching probes, prints the counts, exits 0 when all are clean."""
    assert script("probe_inputs").main(["-k", "generate/out-"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"probes tried (\d+) / clean (\d+) / tracebacks 0 / silent wrong 0 / other unclean 0", last)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 5, last
