"""TADA, training-free augmented dynamics (Chen et al. 2025, arXiv:2506.21757; apple/ml-tada), as a table.

Time runs from noise (t = 0) to data (t = 1), ``s = 1 - t``. Each pixel carries the augmented state
``X = (x, v)`` (position, velocity), a chain of integrators ``x' = v``, ``v' = F`` driven by the force that
reaches the data x1 at t = 1 if held constant (paper App. F.2, N = 2): ``F = 2 (x1 - x - s v) / s^2``.
Closing the loop gives ``X' = A X + b x1`` with ``A = [[0, 1], [-2/s^2, -2/s]]``, ``b = (0, 2/s^2)``, so the
conditional paths are ``X_t ~ N(mu_t x1, Sigma_t)`` with ``mu_t = (t^2, 2t)``,
``Sigma_t = Phi(t) diag(1, k) Phi(t)^T`` and the closed-form transition
``Phi(t) = [[2s - s^2, s - s^2], [2s - 2, 2s - 1]]``. ``y = r_t^T X`` with ``r_t = Sigma_t^{-1} mu_t / gamma_t``,
``gamma_t = mu_t^T Sigma_t^{-1} mu_t = t^2 (t^2 + 4/k) / s^4`` is a sufficient statistic for x1 and equals
``x1 + gamma_t^{-1/2} n`` (Prop. 3.1), so x1 is predicted by the pretrained denoiser ``D(y, gamma_t^{-1/2})``.
``components=1`` is the same construction with a position only (``F = (x1 - x)/s``): plain flow matching,
``y = x/t``, ``gamma_t^{-1/2} = s/t``.
"""

from __future__ import annotations

import math

import numpy as np

COMPONENTS = (1, 2)
ORDERS = (1, 2, 3)


def _check(detail: float, order: int, components: int) -> tuple[float, int]:
    """Validated ``(k, order)``; every bad option is one ValueError sentence."""
    if isinstance(components, bool) or components not in COMPONENTS:
        raise ValueError(
            f"tada components must be 1 (augmentation off: flow matching) or 2 (position and velocity), got {components!r}."
        )
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"tada order must be 1, 2 or 3 (Adams-Bashforth order; the paper uses 3), got {order!r}.")
    try:
        k = float(detail)
    except (TypeError, ValueError):
        k = float("nan")
    if isinstance(detail, bool) or not (math.isfinite(k) and k > 0):
        raise ValueError(f"tada detail must be a positive finite number (the velocity prior variance k), got {detail!r}.")
    return k, int(order)


def tada_sigma(t: np.ndarray, detail: float = 1.0, components: int = 2) -> np.ndarray:
    """Noise level ``gamma_t^{-1/2}`` of the projection at time t: ``s^2 sqrt(k) / (t sqrt(k t^2 + 4))``,
    and ``s / t`` for ``components=1``."""
    t = np.asarray(t, dtype=np.float64)
    s = 1.0 - t
    if components == 1:
        return s / t
    k = float(detail)
    return s**2 * math.sqrt(k) / (t * np.sqrt(k * t**2 + 4.0))


def tada_time(sigma: np.ndarray, detail: float = 1.0, components: int = 2) -> np.ndarray:
    """Inverse of tada_sigma (strictly decreasing in t): the time in (0, 1) with noise level sigma; closed
    form ``1/(1 + sigma)`` for ``components=1``, else bisection on ``logit(t)`` to float64 precision."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if components == 1:
        return 1.0 / (1.0 + sigma)
    k = float(detail)
    target = np.log(sigma)
    lo, hi = np.full(sigma.shape, -80.0), np.full(sigma.shape, 80.0)  # z = logit(t)
    for _ in range(200):
        z = 0.5 * (lo + hi)
        log_t, log_s = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
        log_sigma = 2 * log_s + 0.5 * math.log(k) - log_t - 0.5 * np.log(k * np.exp(2 * log_t) + 4.0)
        above = log_sigma > target
        lo, hi = np.where(above, z, lo), np.where(above, hi, z)
    return 1.0 / (1.0 + np.exp(-0.5 * (lo + hi)))


def _projection(t: float, k: float, components: int) -> np.ndarray:
    """``r_t = Sigma_t^{-1} mu_t / gamma_t`` (so ``r_t^T mu_t = 1``), in closed form."""
    if components == 1:
        return np.array([1.0 / t])
    s, q = 1.0 - t, k * t**2 + 4.0
    return np.array([(k * (2 * t - 1) + 4.0) / q, s * (k * t**2 + 2 * (1 + t)) / (t * q)])


def _prior(t0: float, sigma0: float, k: float, components: int) -> np.ndarray:
    """``X_{t0} = mu sigma0 e_0 + w e_1`` (columns e_0, e_1): a draw of N(0, Sigma_{t0}) split so that the first
    denoiser input is ``r^T X = sigma0 e_0`` for every detail (Euler's ``sigma0 e_0``) and e_1 is the augmented
    noise, ``w = Phi(t0) (2, k t0) / sqrt(k t0^2 + 4)`` (``w w^T = Sigma - mu mu^T / gamma``, ``r^T w = 0``)."""
    if components == 1:
        return np.array([[t0 * sigma0]])
    s = 1.0 - t0
    phi = np.array([[2 * s - s**2, s - s**2], [2 * s - 2, 2 * s - 1]])
    w = phi @ np.array([2.0, k * t0]) / math.sqrt(k * t0**2 + 4.0)
    return np.stack([np.array([t0**2, 2 * t0]) * sigma0, w], axis=1)


def _ab_weights(t_nodes: np.ndarray, t_to: float) -> np.ndarray:
    """Variable-step Adams-Bashforth weights ``[p, 2]``: ``int_{t_i}^{t_to} ((t_to - tau), 1) l_j(tau) dtau`` with
    l_j the Lagrange basis on the nodes (current time t_i first), i.e. the exact integrals of the
    extrapolated force over one step of ``x' = v, v' = F``."""
    h = t_to - t_nodes[0]
    z = (np.asarray(t_nodes, dtype=np.float64) - t_nodes[0]) / h  # nodes in units of the step: 0, < 0, ...
    p = len(z)
    powers = np.arange(p)
    inv = np.linalg.inv(z[:, None] ** powers[None, :])  # l_j(t_i + h z) = sum_q inv[q, j] z^q
    # int_0^1 ((1 - z) h^2, h) z^q dz: the position and velocity gains of a unit force ~ z^q over the step
    moments = np.stack([h**2 / ((powers + 1) * (powers + 2)), h / (powers + 1)], axis=1)
    return inv.T @ moments


def tada(
    step_sigmas: np.ndarray, detail: float = 1.0, order: int = 3, components: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """TADA (Alg. 1; eq. 5 for ``x' = v, v' = F``): ``X_{i+1} = [[1, h], [0, 1]] X_i + sum_j W_ij F_{i-j}``,
    ``F_i = 2 (D_i - x_i - s_i v_i) / s_i^2``, ``D_i = D(r_{t_i}^T X_i, sigma_i)``, W the exact integrals of the
    Lagrange polynomial in t through the last ``min(order, i+1)`` forces (Adams-Bashforth; Table 2: F, in t).

    The N step sigmas are the noise levels of the N evaluations and set the grid by ``gamma_{t_i} =
    sigma_i^{-2}`` (tada_time), so NFE = N exactly: N-1 steps, then the output is the last data prediction
    ``D_{N-1}`` (Alg. 1, line 10; Euler's step to sigma 0). ``X_{t_0} ~ N(0, Sigma_{t_0})`` (see _prior), with
    ``detail`` = k the prior's velocity variance. ``components=1`` turns the augmentation off (K = 1: flow
    matching, ``x' = F = (D - x)/s``); at ``order=1`` that is DDIM, the euler table. F stays constant along the
    closed loop while D does, so order 1 is also the exact solve with D frozen over the step.
    """
    k, order = _check(detail, order, components)
    sig = np.asarray(step_sigmas, dtype=np.float64).reshape(-1)
    if sig.size < 1 or not np.all(np.isfinite(sig)) or np.any(sig <= 0) or np.any(np.diff(sig) >= 0):
        raise ValueError(f"tada needs positive, finite, strictly decreasing step sigmas, got {sig.tolist()}.")
    n, c = len(sig), int(components)
    t = tada_time(sig, k, c)
    cols = c + 2 * n
    coef = np.zeros((n + 1, cols))
    state = np.zeros((c, cols))  # X_i: one row of basis coefficients per component (position, velocity)
    state[:, :c] = _prior(t[0], sig[0], k, c)
    forces: list[np.ndarray] = []  # F_i, F_{i-1}, ... (newest first)
    for i in range(n):
        coef[i] = _projection(t[i], k, c) @ state  # x_i = r^T X_i, evaluated at sigma_i
        if i == n - 1:
            break
        s, d_i = 1.0 - t[i], np.zeros(cols)
        d_i[c + n + i] = 1.0
        force = (d_i - state[0]) / s if c == 1 else 2 * (d_i - state[0] - s * state[1]) / s**2
        forces = [force] + forces[: order - 1]
        weights = _ab_weights(t[i::-1][: len(forces)], t[i + 1])
        if c == 1:
            state = state + sum(w[1] * f for w, f in zip(weights, forces))[None]
        else:
            h = t[i + 1] - t[i]
            state = np.stack([state[0] + h * state[1], state[1]])
            for w, f in zip(weights, forces):
                state = state + np.outer(w, f)
    coef[n, c + 2 * n - 1] = 1.0  # output D_{N-1}
    return sig.copy(), coef
