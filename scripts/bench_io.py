"""Shared output of the benchmarks (scripts/bench_*.py): rows as docs/results/bench/<name>.csv, with the command
line and the machine in <name>.json beside it. Imported as ``from bench_io import write_results`` (the scripts
folder is on sys.path when a script runs)."""

from __future__ import annotations

import time


def write_results(name: str, rows: list[dict], started: float, **extra: object) -> None:
    """Write rows to docs/results/bench/<name>.csv and the command line and machine to <name>.json beside it."""
    import csv
    import json
    import os
    import platform
    import shlex
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    import torch

    out = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    meta = {
        "command": "python " + shlex.join(["scripts/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        **extra,
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / (name + '.csv')} and {name}.json")
