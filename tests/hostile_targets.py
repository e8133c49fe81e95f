"""Model targets (``model.target=tests/hostile_targets.py:NAME``) whose user code misbehaves: a huge shape, exits,
interrupts, a fingerprint() that raises, a denoiser that sleeps or turns NaN at small sigma. Used by
tests/test_model_spec.py and scripts/probe_inputs.py (not a test module itself)."""

from __future__ import annotations

import sys
import time

import torch


def _identity(x, sigma, cond=None):
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


def huge_shape():
    return _identity, (1, 100000, 100000)


def exits():
    sys.exit(0)


def interrupts():
    raise KeyboardInterrupt


class _BadFingerprint(torch.nn.Module):
    def forward(self, x, sigma, cond=None):
        return _identity(x, sigma)

    def fingerprint(self):
        raise RuntimeError("no hash today")


def bad_fingerprint():
    return _BadFingerprint(), (1, 4, 4)


def denoiser_exits():
    return (lambda x, sigma, cond=None: sys.exit(3)), (1, 4, 4)


def denoiser_interrupts():
    def den(x, sigma, cond=None):
        raise KeyboardInterrupt

    return den, (1, 4, 4)


def sleeper():
    def den(x, sigma, cond=None):
        try:
            time.sleep(600)
        except Exception:  # swallows every Exception: the watchdog must still stop it
            pass
        return x

    return den, (1, 4, 4)


def nan_small_sigma(threshold=0.01):
    """Finite at the pre-check's sigmas (2.0 and 0.5), NaN below ``threshold``: found only during work."""
    def den(x, sigma, cond=None):
        out = _identity(x, sigma)
        small = sigma.reshape(-1, *[1] * (x.ndim - 1)) < threshold
        return torch.where(small, torch.full_like(out, float("nan")), out)

    return den, (1, 4, 4)
