"""`import samplers` stays light: < 0.3 s on top of `import torch`, and no offline-only packages."""

import subprocess
import sys

PROBE = r"""
import sys, time
import torch
t0 = time.perf_counter()
import samplers
dt = time.perf_counter() - t0
heavy = sorted(m for m in ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "diffusers",
                           "matplotlib", "optimize", "scipy", "transformers") if m in sys.modules)
print(dt, ",".join(heavy))
"""


def test_import_is_fast_and_light():
    times = []
    for _ in range(3):  # best of three: the first run may pay for cold disk caches
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        assert len(out) == 1, f"import samplers loaded {out[1]}"
    assert min(times) < 0.3, f"import samplers took {min(times):.3f} s on top of torch"
