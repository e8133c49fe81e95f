"""scripts/results_pagoda.py: how the training time of a run that kept another run's base is counted."""

import pytest


def test_a_kept_base_counts_its_clocked_rerun_else_its_whole_run(script, tmp_path, monkeypatch):
    mod = script("results_pagoda")
    monkeypatch.setattr(mod, "BASE_TIMING", tmp_path / "base-timing.csv")
    grown = {"base_generator": "checkpoints/pagoda-patches8.safetensors", "stage_seconds": [0.0, 1200.0, 1195.0]}
    bound = mod.base_description(grown, mod.RES)  # the shipped base's file does not clock its stages apart
    assert bound["base_seconds"] == pytest.approx(3407.1) and "an upper bound" in bound["total_note"]
    assert bound["time_note"] == "the grown stages only; 16x16 20.0 min, 32x32 19.9 min"
    timing = {"seconds": 720.2, "steps": 10000.0, "threads": 1.0, "command": "python -m optimize pagoda model=patches8 stages=1"}
    rerun = mod.base_description(grown, mod.RES, timing)
    assert rerun["base_seconds"] == pytest.approx(720.2)
    assert "rerun alone with its settings, `python -m optimize pagoda model=patches8 stages=1` (10,000 steps on 1 thread(s)" \
        in rerun["total_note"]
    own = mod.base_description({"stage_seconds": [600.0, 300.0, 0.0]}, mod.RES)  # a run that trained its base
    assert own["base_seconds"] == 0.0 and own["time_note"] == "training time of all stages; 8x8 10.0 min, 16x16 5.0 min"
    assert mod.base_timing(None) is None  # nothing kept yet
