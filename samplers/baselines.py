"""Training-free solvers compiled to solver tables (all maths in EDM sigma-space, x = x0 + sigma n).

Each compiler walks the solver symbolically: a state is a vector of coefficients over the table's
basis (e_k, x_i, d_i), so the table is exactly the solver's recurrence. ``d_i = D(x_i, sigma_i)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from . import schedules
from .tada import tada
from .table import FORMAT_VERSION, SolverTable


class _Builder:
    """Records rows of a table with N evaluations and K noise vectors as symbolic combinations."""

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        self.coef = np.zeros((n + 1, k + 2 * n))
        self.sigmas: list[float] = []

    def _unit(self, col: int) -> np.ndarray:
        v = np.zeros(self.k + 2 * self.n)
        v[col] = 1.0
        return v

    def e(self, j: int) -> np.ndarray:
        return self._unit(j)

    def x(self, i: int) -> np.ndarray:
        return self._unit(self.k + i)

    def d(self, i: int) -> np.ndarray:
        return self._unit(self.k + self.n + i)

    def evaluate(self, state: np.ndarray, sigma: float) -> int:
        """Row i: the denoiser input x_i = state, evaluated at sigma; returns i."""
        i = len(self.sigmas)
        self.coef[i] = state
        self.sigmas.append(float(sigma))
        return i

    def finish(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert len(self.sigmas) == self.n, (len(self.sigmas), self.n)
        self.coef[self.n] = state
        return np.asarray(self.sigmas), self.coef


def _with_final(sig: np.ndarray, final: float) -> np.ndarray:
    """The step sigmas followed by where the last step lands: 0, or sigma_min (``end="sigma_min"``)."""
    return np.append(sig, float(final))


# --- one-evaluation-per-step solvers: len(sig) = N ----------------------------------------------
def euler(sig: np.ndarray, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Euler on the probability-flow ODE = deterministic DDIM: ``x' = x + (s'-s)(x - D)/s``."""
    n, s = len(sig), _with_final(sig, final)
    b = _Builder(n, 1)
    z = s[0] * b.e(0)
    for i in range(n):
        b.evaluate(z, s[i])
        r = s[i + 1] / s[i]
        z = r * b.x(i) + (1 - r) * b.d(i)
    return b.finish(z)


def ddim(sig: np.ndarray, eta: float = 0.0, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """DDIM with stochasticity eta (Song et al. 2021, eq. 12) in sigma-space, K = N+1 noise vectors.

    ``x' = D + s_down (x - D)/s + s_up e``, ``s_up = eta s' sqrt(s^2 - s'^2)/s``, ``s_down = sqrt(s'^2 - s_up^2)``;
    e_0 is the initial noise and e_{i+1} the fresh noise of step i (zero weight on the step to sigma 0).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim needs 0 <= eta <= 1, got eta={eta}.")
    n, s = len(sig), _with_final(sig, final)
    b = _Builder(n, n + 1)
    z = s[0] * b.e(0)
    for i in range(n):
        b.evaluate(z, s[i])
        s_up = eta * s[i + 1] * math.sqrt(s[i] ** 2 - s[i + 1] ** 2) / s[i]
        s_down = math.sqrt(max(s[i + 1] ** 2 - s_up**2, 0.0))
        z = b.d(i) + (s_down / s[i]) * (b.x(i) - b.d(i)) + s_up * b.e(i + 1)
    return b.finish(z)


def _dpmpp_order(i: int, n: int, order: int) -> int:
    """diffusers' DPMSolverMultistep order rule: warm-up, first order on the step to sigma 0, and
    (lower_order_final, N < 15) at most second order on the step before it."""
    p = min(order, i + 1)
    if i == n - 1:
        return 1
    if i == n - 2 and n < 15:
        return min(p, 2)
    return p


def dpmpp(sig: np.ndarray, order: int = 2, variant: str = "diffusers", final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver++(2M)/(3M) multistep in data prediction (Lu et al. 2022, Alg. 2), lambda = -log sigma.

    ``x' = (s'/s) x - expm1(-h) D0 + (expm1(-h)/h + 1) D1 - c ((expm1(-h) + h)/h^2 - 1/2) D2``.

    ``D2 = (D1_0 - D1_1)/(r0 + r1)`` estimates ``h^2 x0''/2`` while the exact Taylor term of the step is
    ``-h^2 phi_3 x0''``, so only ``c = 2`` is consistent to third order. ``variant="diffusers"`` (the
    default) uses ``c = 1`` like the DPM-Solver reference code, diffusers and k-diffusion, which makes
    "3M" a second-order method in practice; ``variant="taylor"`` uses ``c = 2`` (third order).
    """
    if variant not in ("diffusers", "taylor"):
        raise ValueError(f"dpmpp variant must be 'diffusers' or 'taylor', got {variant!r}.")
    c2 = 2.0 if variant == "taylor" else 1.0
    n, s = len(sig), _with_final(sig, final)
    lam = -np.log(np.maximum(s, 1e-300))
    b = _Builder(n, 1)
    z = s[0] * b.e(0)
    for i in range(n):
        b.evaluate(z, s[i])
        p = _dpmpp_order(i, n, order)
        m0 = b.d(i)
        if p == 1:
            r = s[i + 1] / s[i]
            z = r * b.x(i) + (1 - r) * m0
            continue
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = (m0 - b.d(i - 1)) / r0
        if p == 2:  # midpoint form: D0 + 0.5 D1
            z = (s[i + 1] / s[i]) * b.x(i) - phi1 * m0 - 0.5 * phi1 * d1_0
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = (b.d(i - 1) - b.d(i - 2)) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        z = (s[i + 1] / s[i]) * b.x(i) - phi1 * m0 + (phi1 / h + 1) * d1 - c2 * ((phi1 + h) / h**2 - 0.5) * d2
    return b.finish(z)


def dpmpp_2m(sig: np.ndarray, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    return dpmpp(sig, 2, final=final)


def dpmpp_3m(sig: np.ndarray, variant: str = "diffusers", final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    return dpmpp(sig, 3, variant, final=final)


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm(sig: np.ndarray, max_order: int = 4, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Improved PNDM (Zhang & Chen 2023): Euler steps on eps = (x - D)/s with fixed Adams-Bashforth
    weights over the last min(i+1, max_order) eps, ``x' = x + (s' - s) sum_j a_j eps_{i-j}``."""
    if max_order not in _AB:
        raise ValueError(f"ipndm max_order must be one of 1, 2, 3, 4, got {max_order}.")
    n, s = len(sig), _with_final(sig, final)
    b = _Builder(n, 1)
    z = s[0] * b.e(0)
    eps: list[np.ndarray] = []
    for i in range(n):
        b.evaluate(z, s[i])
        eps.append((b.x(i) - b.d(i)) / s[i])
        weights = _AB[min(max_order, i + 1)]
        z = b.x(i) + (s[i + 1] - s[i]) * sum(w * eps[-1 - j] for j, w in enumerate(weights))
    return b.finish(z)


def _unipc_coefficients(rks: Sequence[float], h: float, p: int) -> tuple[np.ndarray, float, float, np.ndarray]:
    """UniPC (Zhao et al. 2023) B(h) = expm1(-h) ('bh2'): returns the p x p matrix R (rows r_k^(j-1)),
    h phi_1 = expm1(-h), B(h) and the vector b_j = h phi_(j+1)(h) j! / B(h)."""
    rk = np.append(np.asarray(rks, dtype=np.float64), 1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, bvec = 1.0, []
    for j in range(1, p + 1):
        bvec.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r = np.stack([rk**j for j in range(p)])
    return r, h_phi_1, b_h, np.asarray(bvec)


def unipc(sig: np.ndarray, order: int = 2, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """UniPC-p with B(h) = expm1(-h) ('bh2') in data prediction: UniP predictor plus the UniC corrector,
    which reuses the next evaluation (no extra NFE). Orders follow diffusers: warm-up min(p, i+1) and
    min(p, N - i) near the end (lower_order_final)."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}.")
    n, s = len(sig), _with_final(sig, final)
    lam = -np.log(np.maximum(s, 1e-300))
    b = _Builder(n, 1)
    z_next = s[0] * b.e(0)  # predicted state at s_i: the denoiser input x_i
    z, p = None, 0  # corrected state at s_{i-1} and the order of the step that left it
    for i in range(n):
        b.evaluate(z_next, s[i])
        if i == 0:
            z_i = b.x(0)
        else:  # UniC: correct the state at s_i with m_i = d_i (reuses the evaluation, no extra NFE)
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]
            r, h_phi_1, b_h, bvec = _unipc_coefficients(rks, h, p)
            rhos = np.array([0.5]) if p == 1 else np.linalg.solve(r, bvec)
            corr = rhos[-1] * (b.d(i) - b.d(i - 1))
            for k in range(1, p):
                corr = corr + rhos[k - 1] * (b.d(i - 1 - k) - b.d(i - 1)) / rks[k - 1]
            z_i = (s[i] / s[i - 1]) * z - h_phi_1 * b.d(i - 1) - b_h * corr
        # UniP from s_i to s_{i+1}; the last step (to sigma 0) is first order, giving d_{N-1}
        p = min(order, n - i, i + 1)
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        r, h_phi_1, b_h, bvec = _unipc_coefficients(rks, h, p)
        rhos = np.array([0.5]) if p == 2 else (np.linalg.solve(r[:-1, :-1], bvec[:-1]) if p > 2 else np.zeros(0))
        pred = np.zeros_like(z_i)
        for k in range(1, p):
            pred = pred + rhos[k - 1] * (b.d(i - k) - b.d(i)) / rks[k - 1]
        z, z_next = z_i, (s[i + 1] / s[i]) * z_i - h_phi_1 * b.d(i) - b_h * pred
    return b.finish(z_next)


# --- Heun: two evaluations per step except the last, N = 2S - 1 ------------------------------------
def heun(sig: np.ndarray, final: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """EDM's deterministic 2nd-order Heun (Karras et al. 2022, Alg. 1); Euler on the last step (to sigma 0)."""
    steps, s = len(sig), _with_final(sig, final)
    b = _Builder(2 * steps - 1, 1)
    z = s[0] * b.e(0)
    for j in range(steps):
        m = b.evaluate(z, s[j])
        slope = (b.x(m) - b.d(m)) / s[j]
        z_euler = b.x(m) + (s[j + 1] - s[j]) * slope
        if j == steps - 1:  # the last step: Euler (to 0, or to sigma_min with end="sigma_min")
            z = z_euler
            continue
        c = b.evaluate(z_euler, s[j + 1])
        slope2 = (b.x(c) - b.d(c)) / s[j + 1]
        z = b.x(m) + (s[j + 1] - s[j]) * 0.5 * (slope + slope2)
    return b.finish(z)


# --- registry ------------------------------------------------------------------------------------
Compiler = Callable[..., tuple[np.ndarray, np.ndarray]]
SOLVERS: dict[str, tuple[Compiler, Callable[[int], int], dict[str, Any]]] = {
    # name: (compiler, steps needed for an NFE, default options)
    "euler": (euler, lambda nfe: nfe, {}),
    "heun": (heun, lambda nfe: (nfe + 1) // 2, {}),
    "dpmpp_2m": (dpmpp_2m, lambda nfe: nfe, {}),
    "dpmpp_3m": (dpmpp_3m, lambda nfe: nfe, {"variant": "diffusers"}),
    "ipndm": (ipndm, lambda nfe: nfe, {"max_order": 4}),
    "unipc": (unipc, lambda nfe: nfe, {"order": 2}),
    "ddim": (ddim, lambda nfe: nfe, {"eta": 0.0}),
    "tada": (tada, lambda nfe: nfe, {"detail": 1.0, "order": 3, "components": 2}),
}


def check_nfe(name: str, nfe: Any) -> int:
    """``nfe`` as an int when solver ``name`` can meet it exactly; ValueError naming the valid values otherwise."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}.")
    if name == "heun" and nfe % 2 == 0:
        raise ValueError(f"heun needs an odd NFE (2 per step, 1 on the last): valid values are 1, 3, 5, 7, ...; got {nfe}.")
    return int(nfe)


ENDS = ("zero", "sigma_min")


def build(
    name: str,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    schedule: str = "karras",
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    end: str = "zero",
    **options: Any,
) -> SolverTable:
    """Compile a training-free solver to a table with exactly ``nfe`` denoiser evaluations.

    ``schedule`` is 'karras' (uses rho), 'logsnr', 'time_uniform' or 'flow'; ``sigmas`` gives the step
    sigmas explicitly instead. ``end`` is where the last step lands: 'zero' (the schedule's last point,
    sigma_min, is evaluated and the last step goes to sigma 0: EDM's convention) or 'sigma_min' (the
    schedule gets one more point, sigma_min, which is never evaluated: the last step lands there and the
    sample is that state, as in DPM-Solver's code and LD3, so no evaluation is spent where the denoiser
    barely changes the sample). Explicit ``sigmas``: one per step (a trailing 0 is implied) with 'zero',
    one per step plus the final sigma with 'sigma_min'. Options: ddim ``eta``, unipc ``order`` (1-3),
    ipndm ``max_order`` (1-4), dpmpp_3m ``variant`` ('diffusers' or 'taylor'), tada ``detail`` (> 0,
    velocity prior variance), ``order`` (Adams-Bashforth order, 1-3) and ``components`` (2; 1 turns the
    augmentation off).
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(SOLVERS)}.")
    if end not in ENDS:
        raise ValueError(f"end must be one of {', '.join(ENDS)}, got {end!r}.")
    if end != "zero" and name == "tada":
        raise ValueError("tada's output is its last data prediction: it takes only end='zero'.")
    compiler, steps_for, defaults = SOLVERS[name]
    nfe = check_nfe(name, nfe)
    unknown = set(options) - set(defaults)
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ValueError(f"{name} does not take option(s) {', '.join(sorted(unknown))}; its options: {valid}.")
    config = {**defaults, **options}
    steps = steps_for(nfe)
    points = steps + (end == "sigma_min")
    if sigmas is not None:
        grid = schedules.explicit(sigmas)
        if len(grid) != points:
            what = "step sigmas" if end == "zero" else "sigmas with end=sigma_min (one per step, then the final sigma)"
            raise ValueError(f"{name} with nfe={nfe} takes {points} {what}, got {len(grid)}.")
        sched: dict[str, Any] = {"name": "explicit", "sigmas": grid.tolist()}
    else:
        extra = {"rho": rho} if schedule == "karras" else {}
        grid = schedules.make(schedule, points, sigma_min, sigma_max, **extra)
        sched = {"name": schedule, "sigma_min": sigma_min, "sigma_max": sigma_max, **extra}
    final = 0.0 if end == "zero" else float(grid[-1])
    step_sigmas = grid[:steps]
    table_sigmas, coef = compiler(step_sigmas, **config) if end == "zero" else compiler(step_sigmas, final=final, **config)
    metadata = {
        "format_version": FORMAT_VERSION,
        "method": name,
        "base_solver": name,
        "nfe": nfe,
        "schedule": sched,
        "config": config,
    }
    if end != "zero":
        metadata["end"] = end
    metadata["step_sigmas"] = [*step_sigmas.tolist(), final]  # where the solver's states sit, then where it lands
    return SolverTable(table_sigmas, coef, metadata)
