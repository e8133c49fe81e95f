"""What a sample costs: forward FLOPs per sample of a network call, and a network's cost in teacher forwards (the unit
every one-step student is compared in: a student whose one call costs c teacher forwards sits beside the tables of
NFE round(c))."""

from __future__ import annotations

from typing import Any

import torch


def flops_per_sample(fn: Any, x: torch.Tensor) -> float:
    """Forward FLOPs of ``fn(x)`` per sample of the batch (torch's FlopCounterMode: convolutions, matmuls, einsums;
    FFTs are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / x.shape[0]


def call_flops(denoiser: Any, x: torch.Tensor, sigma: float) -> float:
    """FLOPs per sample of one ``denoiser(x, sigma)`` call."""
    return flops_per_sample(lambda v: denoiser(v, torch.full((v.shape[0],), float(sigma))), x)


def teacher_forwards(student: Any, teacher: Any, x: torch.Tensor, sigma: float, calls: int = 1) -> float:
    """``calls`` student calls at ``sigma`` in units of one teacher call on the same input."""
    return calls * call_flops(student, x, sigma) / call_flops(teacher, x, sigma)
