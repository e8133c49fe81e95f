"""Every seed range of the offline pipeline, in one place, so no two uses ever share a seed.

Sample b of a run uses seed ``OFFSET + seed + b`` (``seed`` is the run's ``seed=`` key). Reported figures
come only from the evaluation range; everything a method learns from or selects on comes from another range:

| range            | used by                                                                  |
| ---------------- | ------------------------------------------------------------------------ |
| EVAL (0..)       | ``optimize evaluate`` and every results page: the only reported samples  |
| TUNE (1e6..)     | the tuned-classic sweep (rho x sigma_min), chosen on these               |
| FIT (2e6..)      | noises that learners fit on (IIA normal equations, LD3 targets)           |
| VAL (3e6..)      | model selection during training (DDSS keeps the best table on these)      |
| DATA (4e6..)     | generated training data (distillation trajectories)                      |

The ranges are 1e6 wide, so a run may use up to 1e6 samples of each.
"""

from __future__ import annotations

EVAL_SEED_OFFSET = 0
TUNE_SEED_OFFSET = 1_000_000
FIT_SEED_OFFSET = 2_000_000
VAL_SEED_OFFSET = 3_000_000
DATA_SEED_OFFSET = 4_000_000
RANGE = 1_000_000


def seed_range(offset: int, seed: int, n: int) -> list[int]:
    """The ``n`` seeds ``offset + seed ..`` of one use; ``ValueError`` if they would leave their 1e6-wide range."""
    if n < 0 or seed < 0 or seed + n > RANGE:
        raise ValueError(f"seed={seed} with n={n} leaves its seed range (seed + n must be <= {RANGE}).")
    return list(range(offset + seed, offset + seed + n))
