"""Per-sample conditioning that follows the noise: a text-to-image model's sample of seed ``s`` has its own cond
(``Model.cond_of(seeds)``: row i holds the prompt index of seed i), so wherever a learner splits, shuffles, selects
or moves noise rows, the cond rows must follow exactly. Every other model has no cond (``cond_of`` is None), and then
every function here returns None: nothing changes for it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def cond_of_seeds(cond_of: Callable[[Sequence[int]], Any] | None, seeds: Sequence[int],
                  device: str | torch.device | None = None) -> Any:
    """The per-row cond of the samples of ``seeds`` (``cond_of(seeds)``, on ``device`` when given), or None when the
    model has none."""
    if cond_of is None:
        return None
    cond = cond_of(list(seeds))
    return cond.to(device) if device is not None and isinstance(cond, torch.Tensor) else cond


def cond_rows(cond: Any, index: Any) -> Any:
    """The cond of the noise rows ``index`` (a slice, an index or boolean tensor, a list) of a per-row ``cond``
    (row i belongs to noise row i): ``cond[index]``; None stays None."""
    if cond is None:
        return None
    if isinstance(index, torch.Tensor) and isinstance(cond, torch.Tensor):
        index = index.to(cond.device)
    return cond[index]

