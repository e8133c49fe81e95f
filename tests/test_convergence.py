"""Convergence orders on the analytic Gaussian mixture: error to an accurate reference vs NFE.

Reference: classic RK4 written here, on the probability-flow ODE in u = log sigma,
``dx/du = x - D(x, sigma)``, from sigma_max = 80 to sigma_min = 0.002 with 1200 steps, checked against
600 steps (Richardson: RK4's error at 1200 steps is ~1/16 of that difference). Every solver but iPNDM
ends with a first-order step to sigma 0, i.e. returns ``D(x_{N-1}, sigma_min)``, so its reference is
``D(x_ref(sigma_min), sigma_min)``: the comparison then measures only the ODE error on [sigma_min,
sigma_max]. iPNDM's last step is an Adams-Bashforth step to sigma 0, so its reference is the ODE solution
at sigma 0 itself (RK4 in sigma on [sigma_min, 0], where ``dx/dsigma = (x - D)/sigma -> 0``).

The order is the least-squares slope of log(error) vs log(steps) over N = 64..256 steps on the Karras
schedule (rho = 7), where the behaviour is asymptotic for this mixture. Measured (GaussianMixture.random(),
8 samples) and asserted:

    solver              expected  measured  asserted
    euler, ddim(eta=0)  1         1.00      [0.7, 1.3]
    heun (per step)     2         2.03      [1.7, 2.3]
    dpmpp_2m            2         1.98      [1.7, 2.3]
    dpmpp_3m            see below 2.23      [1.7, 2.6]
    dpmpp_3m taylor     3         3.03      [2.7, 3.4]
    unipc order 1       2         1.96      [1.7, 2.3]   (UniC raises order p to p + 1)
    unipc order 2       3         2.89      [2.6, 3.4]
    unipc order 3       4         4.72      >= 3.5       (pre-asymptotic > 4; the last predictor
                                                           before the final denoise is UniP-2)
    ipndm (max order 4) 2         2.38      [1.7, 3.0]

DPM-Solver++(3M) as written in the DPM-Solver reference code, diffusers and k-diffusion weights its second
difference D2 (an estimate of h^2 x0''/2) by phi_3 where the Taylor expansion needs 2 phi_3; the step is
then exact only up to linear x0(lambda) and the method is second order. ``dpmpp_3m`` keeps that formula
(it is what the name means to users, and what test_peer_diffusers checks); ``variant="taylor"`` is the
consistent third-order step. ``test_dpmpp_3m_step_on_quadratic_data`` shows the difference on one step.

iPNDM uses fixed Adams-Bashforth weights, which are exact only for equal steps in sigma, and starts with
an Euler step; on Karras steps it achieves order 2, not 4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samplers import baselines, make_noise, sample
from samplers.denoisers import GaussianMixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
STEPS = [64, 96, 128, 192, 256]
GMM = GaussianMixture.random()  # (1, 8, 8), 6 components, stds 0.05..0.3
SEEDS = range(8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# name, options, expected order, asserted interval (inclusive)
CASES = [
    ("euler", {}, 1, (0.7, 1.3)),
    ("ddim", {"eta": 0.0}, 1, (0.7, 1.3)),
    ("heun", {}, 2, (1.7, 2.3)),
    ("dpmpp_2m", {}, 2, (1.7, 2.3)),
    ("dpmpp_3m", {}, 2, (1.7, 2.6)),
    ("dpmpp_3m", {"variant": "taylor"}, 3, (2.7, 3.4)),
    ("unipc", {"order": 1}, 2, (1.7, 2.3)),
    ("unipc", {"order": 2}, 3, (2.6, 3.4)),
    ("unipc", {"order": 3}, 4, (3.5, math.inf)),
    ("ipndm", {}, 2, (1.7, 3.0)),
]


def _denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return GMM(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def _rk4_log_sigma(x: torch.Tensor, sigma_from: float, sigma_to: float, n: int) -> torch.Tensor:
    """Classic RK4 on dx/du = x - D(x, e^u), u = log sigma, n equal steps."""
    u0, u1 = math.log(sigma_from), math.log(sigma_to)
    h = (u1 - u0) / n

    def f(x, u):
        return x - _denoise(x, math.exp(u))

    for k in range(n):
        u = u0 + k * h
        k1 = f(x, u)
        k2 = f(x + 0.5 * h * k1, u + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, u + 0.5 * h)
        k4 = f(x + h * k3, u0 + (k + 1) * h)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _rk4_sigma_to_zero(x: torch.Tensor, sigma_from: float, n: int) -> torch.Tensor:
    """Classic RK4 on dx/dsigma = (x - D)/sigma from sigma_from to 0; the slope is 0 at sigma = 0
    (for a mixture with positive variances, x - D = O(sigma^2))."""
    h = -sigma_from / n

    def f(x, s):
        return torch.zeros_like(x) if s == 0.0 else (x - _denoise(x, s)) / s

    for k in range(n):
        s = sigma_from + k * h
        s_next = 0.0 if k == n - 1 else sigma_from + (k + 1) * h
        k1 = f(x, s)
        k2 = f(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = f(x + h * k3, s_next)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over samples of ||a - b||, relative to the RMS norm of b."""
    a, b = a.flatten(1), b.flatten(1)
    return float((a - b).norm(dim=1).pow(2).mean().sqrt() / b.norm(dim=1).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def reference():
    e0 = make_noise(1, GMM.shape, SEEDS, dtype=torch.float64)[0]
    x_min = _rk4_log_sigma(SIGMA_MAX * e0, SIGMA_MAX, SIGMA_MIN, 1200)
    x_min_coarse = _rk4_log_sigma(SIGMA_MAX * e0, SIGMA_MAX, SIGMA_MIN, 600)
    ref_denoised = _denoise(x_min, SIGMA_MIN)
    ref_zero = _rk4_sigma_to_zero(x_min, SIGMA_MIN, 20)
    accuracy = {  # error estimates of the two references (Richardson, RK4 order 4: diff/15)
        "denoised": _rel(_denoise(x_min_coarse, SIGMA_MIN), ref_denoised) / 15,
        "zero": max(_rel(_rk4_sigma_to_zero(x_min, SIGMA_MIN, 10), ref_zero) / 15, _rel(x_min_coarse, x_min) / 15),
    }
    return e0, {"denoised": ref_denoised, "zero": ref_zero}, accuracy


@pytest.fixture(scope="module")
def measured(reference):
    """errors[(name, options)] over STEPS, and the fitted slopes."""
    e0, refs, accuracy = reference
    out = {}
    for name, options, _, _ in CASES:
        ref = refs["zero" if name == "ipndm" else "denoised"]
        errs = []
        for steps in STEPS:
            nfe = 2 * steps - 1 if name == "heun" else steps
            table = baselines.build(name, nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, schedule="karras", **options)
            noise = e0[None].expand(table.n_noise, *e0.shape)  # ddim: extra noise columns carry weight 0
            errs.append(_rel(sample(table, GMM, noise), ref))
        errs = np.asarray(errs)
        slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
        out[(name, tuple(sorted(options.items())))] = (errs, slope)
    print(f"\nconvergence on GaussianMixture.random(), karras {SIGMA_MIN}..{SIGMA_MAX}, steps {STEPS} (shown with -s)")
    for (name, opts), (errs, slope) in out.items():
        label = name + (str(dict(opts)) if opts else "")
        print(f"  {label:32s} slope {slope:5.2f}   err@{STEPS[0]} {errs[0]:.2e}  err@{STEPS[-1]} {errs[-1]:.2e}")
    return out, accuracy


def test_reference_is_accurate(reference, measured):
    _, _, accuracy = reference
    results, _ = measured
    smallest = min(float(errs.min()) for errs, _ in results.values())
    for key, acc in accuracy.items():
        assert acc < 0.01 * smallest, f"reference '{key}' error ~{acc:.1e} is not << smallest solver error {smallest:.1e}"


@pytest.mark.parametrize("name,options,order,bounds", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_convergence_order(measured, name, options, order, bounds):
    results, _ = measured
    errs, slope = results[(name, tuple(sorted(options.items())))]
    assert np.all(np.diff(errs) < 0), f"{name}{options}: error does not fall with NFE: {errs}"
    lo, hi = bounds
    assert lo <= slope <= hi, (
        f"{name}{options}: log-log slope {slope:.2f} over steps {STEPS} (errors {np.array2string(errs, precision=2)}) "
        f"outside [{lo}, {hi}] for expected order {order}"
    )


def test_taylor_3m_beats_diffusers_3m_at_high_nfe(measured):
    results, _ = measured
    diff, _ = results[("dpmpp_3m", ())]
    taylor, _ = results[("dpmpp_3m", (("variant", "taylor"),))]
    assert taylor[-1] < 0.5 * diff[-1]


# --- one step on data whose x0(lambda) is a polynomial -------------------------------------------
def _exact_step(x: float, lam0: float, lam1: float, coeffs: tuple[float, float, float]) -> float:
    """Exact ODE step dx/dlambda = m(lambda) - x for m = a + b lambda + c lambda^2:
    ``x(lam1) = e^{-(lam1-lam0)} x + e^{-lam1} [F(lam1) - F(lam0)]`` with F the antiderivative of e^l m(l)."""
    a, b, c = coeffs

    def F(l):
        return math.exp(l) * (a + b * (l - 1) + c * (l * l - 2 * l + 2))

    return math.exp(-(lam1 - lam0)) * x + math.exp(-lam1) * (F(lam1) - F(lam0))


@pytest.mark.parametrize("variant", ["diffusers", "taylor"])
def test_dpmpp_3m_step_on_quadratic_data(variant):
    """A third-order multistep step is exact when the data prediction is quadratic in lambda = -log sigma.

    The table's row 4 is the 3M step from sigma_3 to sigma_4 (third order: i = 3 >= 2 and not one of the
    last two steps of N = 8 < 15). Feed it the exact data predictions at sigma_1..3 and any x_3.
    """
    coeffs = (0.3, -0.7, 0.45)
    sig = np.array([8.0, 4.5, 2.2, 1.3, 0.6, 0.25, 0.1, 0.03])
    table = baselines.build("dpmpp_3m", 8, sigmas=sig, variant=variant)
    coef = table.coef.numpy()
    lam = -np.log(sig)
    m = coeffs[0] + coeffs[1] * lam + coeffs[2] * lam**2
    x3 = 1.7
    used = np.flatnonzero(coef[4])
    assert set(used) <= {table.x(3), table.d(1), table.d(2), table.d(3)}
    step = coef[4, table.x(3)] * x3 + sum(coef[4, table.d(j)] * m[j] for j in (1, 2, 3))
    exact = _exact_step(x3, lam[3], lam[4], coeffs)
    if variant == "taylor":
        assert step == pytest.approx(exact, abs=1e-12)
    else:  # off by the missing half of the phi_3 term: a local O(h^3) error -> second order globally
        h = lam[4] - lam[3]
        phi3 = (math.expm1(-h) + h) / h**2 - 0.5
        d2 = h**2 * coeffs[2]  # (D1_0 - D1_1)/(r0 + r1) = h^2 m''/2 exactly for quadratic m, m'' = 2c
        assert abs(step - exact) > 1e-3
        assert step - exact == pytest.approx(phi3 * d2, rel=1e-9)


def test_dpmpp_variant_is_checked():
    with pytest.raises(ValueError, match="dpmpp variant must be 'diffusers' or 'taylor', got 'exact'"):
        baselines.build("dpmpp_3m", 5, variant="exact")
