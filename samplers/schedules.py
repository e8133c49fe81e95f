"""Noise-level schedules: ``n`` decreasing sigmas from sigma_max to sigma_min (no trailing zero)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"a schedule needs n >= 1 points, got {n}.")
    if not (0 < sigma_min < sigma_max) or not np.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}.")


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """EDM (Karras et al. 2022, eq. 5): ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    _check(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}.")
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def logsnr_uniform(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> np.ndarray:
    """Uniform in log-SNR = -2 log sigma (DPM-Solver's 'logSNR' / k-diffusion's 'exponential')."""
    _check(n, sigma_min, sigma_max)
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


def vp_sigma(t: np.ndarray, beta_min: float = 0.1, beta_d: float = 19.9) -> np.ndarray:
    """VP-SDE noise level (EDM Table 1): ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    return np.sqrt(np.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_time(sigma: np.ndarray, beta_min: float = 0.1, beta_d: float = 19.9) -> np.ndarray:
    """Inverse of vp_sigma: the VP time t in [0, 1] at which the noise level is sigma."""
    c = np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)
    return (np.sqrt(beta_min**2 + 2.0 * beta_d * c) - beta_min) / beta_d


def time_uniform(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, beta_min: float = 0.1, beta_d: float = 19.9
) -> np.ndarray:
    """Uniform in the VP-SDE time t (DDPM/DDIM's 'uniform' spacing), mapped to sigma by vp_sigma."""
    _check(n, sigma_min, sigma_max)
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    t = np.linspace(vp_time(sigma_max, beta_min, beta_d), vp_time(sigma_min, beta_min, beta_d), n)
    sig = vp_sigma(t, beta_min, beta_d)
    sig[0], sig[-1] = sigma_max, sigma_min  # exact endpoints
    return sig


def flow_uniform(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, shift: float = 1.0) -> np.ndarray:
    """Uniform in the flow-matching time (rectified flow, SD3: ``x_t = (1 - t) x_0 + t e``, so ``sigma = t / (1 - t)``),
    after SD3's resolution-dependent time shift ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024; shift 1:
    none): the spacing of diffusers' FlowMatchEuler and of its multistep schedulers with ``use_flow_sigmas`` (whose
    ends differ: t = 1 or 0.999 first, t = 0.001 or a last step to 0)."""
    _check(n, sigma_min, sigma_max)
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}.")
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)

    def unshifted(sigma: float) -> float:  # the t before the shift whose shifted time has this sigma
        t = sigma / (1.0 + sigma)
        return t / (shift - (shift - 1.0) * t)

    t = np.linspace(unshifted(sigma_max), unshifted(sigma_min), n)
    t = shift * t / (1.0 + (shift - 1.0) * t)
    sig = t / (1.0 - t)
    sig[0], sig[-1] = sigma_max, sigma_min  # exact endpoints
    return sig


SCHEDULES = {"karras": karras, "logsnr": logsnr_uniform, "time_uniform": time_uniform, "flow": flow_uniform}


def explicit(sigmas: Sequence[float]) -> np.ndarray:
    """Validate user-given step sigmas: positive, finite, strictly decreasing (a trailing 0 is dropped)."""
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if sig.size and sig[-1] == 0:
        sig = sig[:-1]
    if sig.size < 1 or not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        raise ValueError(f"explicit sigmas must be positive and finite (a trailing 0 is allowed), got {list(sigmas)}.")
    if np.any(np.diff(sig) >= 0):
        raise ValueError(f"explicit sigmas must be strictly decreasing, got {sig.tolist()}.")
    return sig


def make(name: str, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, **options: Any) -> np.ndarray:
    """Schedule by name: 'karras' (option rho), 'logsnr', 'time_uniform' (options beta_min, beta_d), 'flow' (option
    shift)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}.")
    return SCHEDULES[name](n, sigma_min, sigma_max, **options)
