"""Peer agreement: every classic solver table equals the matching diffusers scheduler on the same sigmas.

All runs are float64 on the analytic Gaussian-mixture denoiser, from the same initial noise (and, for
stochastic DDIM, the same per-step noise). Tolerance: 1e-5 relative (issue 3 acceptance).

How each diffusers scheduler is made to use exactly our step sigmas ``s_0 > ... > s_{S-1}`` (then 0):

* ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler`` (sigma-space, EDM preconditioning):
  ``set_timesteps(S)`` then ``sched.sigmas = [s_0..s_{S-1}, 0]`` (float64; ``set_timesteps`` would round
  them to float32 and, for EDMEuler, reads its ``sigmas=`` argument as a ramp in [0, 1], not as sigmas)
  and ``sched.timesteps = precondition_noise(s)``. The model gets ``c_in x`` and returns the raw EDM
  output ``F = (D - c_skip x) / c_out`` with sigma_data = 0.5, so that ``precondition_outputs`` gives D.
* ``HeunDiscreteScheduler`` (k-diffusion sigma-space, VP model input): ``set_timesteps(S)`` (which makes
  2S-1 timesteps) then ``sched.sigmas = [s_0, s_1, s_1, ..., s_{S-1}, s_{S-1}, 0]`` (its own layout: every
  sigma after the first twice, for the Euler and the correction evaluation). The model is a VP epsilon
  model: it sees ``scale_model_input(x) = x / sqrt(1 + sigma^2)`` and returns ``(x - D) / sigma``.
* ``UniPCMultistepScheduler`` (VP sample space, ``alpha = 1/sqrt(1+s^2)``, ``sigma_t = s alpha``):
  ``set_timesteps(S)`` then ``sched.sigmas = [s..., 0]`` in float64 (all its coefficients are computed from
  ``self.sigmas[step_index]``; ``timesteps`` are only labels). The sample is ``x / sqrt(1 + s^2)``; the model
  is VP epsilon.
* ``DDIMScheduler`` (VP sample space, integer timesteps): ``num_train_timesteps = S``, spacing 'leading'
  (so the S inference timesteps are S-1..0, one apart) and ``alphas_cumprod[S-1-i] = 1/(1 + s_i^2)``
  (float64), ``final_alpha_cumprod = 1`` (sigma 0 after the last step), ``clip_sample=False``. For eta > 0
  the ``variance_noise`` of step i is our table's noise vector e_{i+1}: DDIM adds ``std_vp * z`` to the VP
  sample, which is ``s_up * z`` in sigma-space, our table's coefficient of e_{i+1}.
* ``IPNDMScheduler`` (VP sample space): its ``betas`` / ``alphas`` play the roles of VP ``sigma_t`` /
  ``alpha_t`` of a v-prediction model (its ``ets = beta x + alpha v`` is epsilon for ``v = alpha eps -
  sigma_t x0``). After ``set_timesteps(S)`` we set ``betas = [s/sqrt(1+s^2)..., 0]`` and
  ``alphas = [1/sqrt(1+s^2)..., 1]``, replacing its fixed trigonometric schedule; its update
  ``x' = alpha' (x - sigma_t ets)/alpha + sigma' ets`` is, in sigma-space, ``x + (s' - s) ets``: Euler on
  Adams-Bashforth-combined epsilons, i.e. our ``ipndm``.

Every loop calls ``set_begin_index(0)`` so the step counter does not depend on timestep look-ups.

Measured agreement is ~1e-13 everywhere except EDMEulerScheduler (~1e-7): its ``step`` casts the sample to
float32 (``sample = sample.to(torch.float32)`` in diffusers 0.42), so each step rounds x to float32.

``dpmpp_3m(variant="taylor")`` (the third-order-consistent 3M, see test_convergence.py) has no diffusers
peer; it is checked against an independent recurrence written below from the Taylor expansion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samplers import baselines, make_noise, sample, schedules
from samplers.denoisers import GaussianMixture

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42's set_timesteps calls np.array on tensors (numpy 2 copy-keyword DeprecationWarning)
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny tensors: see conftest.one_thread
]

TOL = 1e-5  # the acceptance bound
# What float64 peers actually reach (~1e-13): asserted too, since a slightly wrong sigma can move the
# output by less than 1e-5 (e.g. a 0.1% change of one mid-schedule Heun sigma moves it by ~6e-6).
TIGHT = 1e-10
SEEDS = range(4)
GMM = GaussianMixture.random(shape=(1, 4, 4), components=5, seed=3)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SIGMA_DATA = 0.5  # the diffusers EDM schedulers' default; only enters the model <-> D conversion

# (schedule name, schedule options) used for the step sigmas
SCHEDULES = [("karras", {"rho": 7.0}), ("logsnr", {}), ("time_uniform", {})]

MEASURED: dict[str, float] = {}  # max relative error per case, printed at the end with -s




# --- helpers ---------------------------------------------------------------------------------------
def step_sigmas(schedule: str, steps: int, **opts) -> np.ndarray:
    return schedules.make(schedule, steps, SIGMA_MIN, SIGMA_MAX, **opts)


def ours(name: str, nfe: int, sig: np.ndarray, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Our table's output on the GMM and the noise it used ([K, B, ...], float64)."""
    table = baselines.build(name, nfe, sigmas=sig, **options)
    noise = make_noise(table, GMM.shape, SEEDS, dtype=torch.float64)
    return sample(table, GMM, noise), noise


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over samples of ||a - b|| / ||b||."""
    a, b = a.flatten(1), b.flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def check(case: str, got: torch.Tensor, want: torch.Tensor, tol: float = TIGHT) -> None:
    assert got.dtype == torch.float64 and want.dtype == torch.float64
    err = rel_err(got, want)
    MEASURED[case] = err
    tol = min(tol, TOL)
    assert err < tol, f"{case}: relative error {err:.3e} to the peer exceeds {tol:g}"


def t64(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return GMM(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype))


def vp_eps_model(x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A VP epsilon model built from the GMM: input ``x / sqrt(1 + sigma^2)``, output ``(x - D) / sigma``."""
    x = x_vp * torch.sqrt(1 + sigma**2)
    return (x - denoise(x, sigma)) / sigma


def edm_raw_model(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An EDM raw network F built from the GMM: input ``c_in x``, ``D = c_skip x + c_out F``."""
    c_in = 1 / torch.sqrt(sigma**2 + SIGMA_DATA**2)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / torch.sqrt(sigma**2 + SIGMA_DATA**2)
    x = x_in / c_in
    return (denoise(x, sigma) - c_skip * x) / c_out


# --- diffusers loops (the pipeline's loop, with our sigmas forced in) -------------------------------
def edm_loop(sched, sig: np.ndarray, e0: torch.Tensor) -> torch.Tensor:
    sched.set_timesteps(len(sig))
    sigmas = t64(np.append(sig, 0.0))
    sched.sigmas = sigmas
    sched.timesteps = sched.precondition_noise(sigmas[:-1])
    sched.set_begin_index(0)
    x = sig[0] * e0
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)  # sets step_index on the first call
        sigma = sched.sigmas[sched.step_index]
        x = sched.step(edm_raw_model(x_in, sigma), t, x).prev_sample
    return x


def diffusers_euler(sig, e0):
    return edm_loop(diffusers.EDMEulerScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX), sig, e0)


def diffusers_dpmpp(sig, e0, order):
    sched = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    return edm_loop(sched, sig, e0)


def diffusers_heun(sig, e0):
    sched = diffusers.HeunDiscreteScheduler(prediction_type="epsilon")
    sched.set_timesteps(len(sig))
    s = t64(sig)
    sched.sigmas = torch.cat([s[:1], s[1:].repeat_interleave(2), torch.zeros(1, dtype=torch.float64)])
    assert len(sched.timesteps) == 2 * len(sig) - 1
    sched.set_begin_index(0)
    x = sig[0] * e0
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        sigma = sched.sigmas[sched.step_index]
        x = sched.step(vp_eps_model(x_in, sigma), t, x).prev_sample
    return x


def diffusers_unipc(sig, e0, order):
    sched = diffusers.UniPCMultistepScheduler(
        solver_order=order,
        prediction_type="epsilon",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(len(sig))
    assert len(sched.timesteps) == len(sig)
    sched.sigmas = t64(np.append(sig, 0.0))
    sched.set_begin_index(0)
    x_vp = sig[0] * e0 / math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]  # step_index is set inside step(); it equals i here
        x_vp = sched.step(vp_eps_model(sched.scale_model_input(x_vp, t), sigma), t, x_vp).prev_sample
        assert sched.step_index == i + 1
    return x_vp  # at sigma 0, x_vp = x


def diffusers_ddim(sig, noise, eta):
    n = len(sig)
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=n,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    )
    sched.alphas_cumprod = 1.0 / (1.0 + t64(sig[::-1].copy()) ** 2)  # index n-1-i <-> s_i
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == list(range(n - 1, -1, -1))
    x_vp = sig[0] * noise[0] / math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        sigma = t64(sig[i])
        eps = vp_eps_model(x_vp, sigma)
        kwargs = {"eta": eta, "variance_noise": noise[i + 1]} if eta > 0 else {}
        x_vp = sched.step(eps, t, x_vp, **kwargs).prev_sample
    return x_vp


def diffusers_ipndm(sig, e0):
    sched = diffusers.IPNDMScheduler()
    sched.set_timesteps(len(sig))
    s = t64(sig)
    sched.betas = torch.cat([s / torch.sqrt(1 + s**2), torch.zeros(1, dtype=torch.float64)])  # VP sigma_t
    sched.alphas = torch.cat([1 / torch.sqrt(1 + s**2), torch.ones(1, dtype=torch.float64)])  # VP alpha_t
    sched.set_begin_index(0)
    x_vp = sig[0] * e0 / math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(sched.timesteps):  # step_index is set inside step(); it equals i here
        alpha, sigma_vp, sigma = sched.alphas[i], sched.betas[i], s[i]
        x = x_vp / alpha
        d = denoise(x, sigma)
        v = alpha * (x - d) / sigma - sigma_vp * d  # v-prediction: alpha eps - sigma_t x0
        x_vp = sched.step(v, t, x_vp).prev_sample
    return x_vp


# --- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 2, 7, 18])
def test_euler_vs_edm_euler(schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("euler", nfe, sig)
    # EDMEulerScheduler.step rounds the sample to float32 each step: ~1e-7 is its float64 floor
    check(f"euler/EDMEuler/{schedule}/N{nfe}", got, diffusers_euler(sig, noise[0]), tol=1e-6)


@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_heun_vs_heun_discrete(schedule, opts, steps):
    sig = step_sigmas(schedule, steps, **opts)
    got, noise = ours("heun", 2 * steps - 1, sig)
    check(f"heun/HeunDiscrete/{schedule}/S{steps}", got, diffusers_heun(sig, noise[0]))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8, 14, 15, 20])
def test_dpmpp_vs_edm_dpmsolver(order, schedule, opts, nfe):
    # nfe 14 / 15 straddle diffusers' lower_order_final threshold (second order on step N-2 iff N < 15)
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours(f"dpmpp_{order}m", nfe, sig)
    check(f"dpmpp_{order}m/EDMDPMSolver/{schedule}/N{nfe}", got, diffusers_dpmpp(sig, noise[0], order))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8, 16])
def test_unipc_vs_diffusers(order, schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("unipc", nfe, sig, order=order)
    check(f"unipc{order}/UniPC/{schedule}/N{nfe}", got, diffusers_unipc(sig, noise[0], order))


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 5, 12])
def test_ddim_vs_diffusers(eta, schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("ddim", nfe, sig, eta=eta)
    assert noise.shape[0] == nfe + 1
    check(f"ddim(eta={eta})/DDIM/{schedule}/N{nfe}", got, diffusers_ddim(sig, noise, eta))


@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [4, 12])
def test_euler_is_deterministic_ddim(schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("euler", nfe, sig)
    check(f"euler/DDIM(eta=0)/{schedule}/N{nfe}", got, diffusers_ddim(sig, noise, 0.0))


@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 12])
def test_ipndm_vs_diffusers(schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("ipndm", nfe, sig)
    check(f"ipndm/IPNDM/{schedule}/N{nfe}", got, diffusers_ipndm(sig, noise[0]))


# --- no diffusers peer: an independent recurrence written here ------------------------------------
def dpmpp_3m_taylor_loop(sig: np.ndarray, e0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(3M) in sigma-space, k-diffusion style, from the Taylor expansion of the data prediction
    in lambda = -log sigma: ``x' = (s'/s) x + (1 - e^-h) m0 + h phi2 m' - h^2 phi3 m''`` with ``m'`` and
    ``m''`` from divided differences of the last three denoised values; diffusers' order schedule
    (warm-up, first order on the step to 0, at most second order on the step before when N < 15)."""
    n = len(sig)
    s = np.append(sig, 0.0)
    x, hist = sig[0] * e0, []  # hist: (lambda, denoised)
    for i in range(n):
        den = denoise(x, t64(s[i]))
        lam = -math.log(s[i])
        hist.append((lam, den))
        order = min(3, i + 1)
        if i == n - 1:
            order = 1
        elif i == n - 2 and n < 15:
            order = min(order, 2)
        if order == 1:  # exponential Euler = DDIM: x' = (s'/s) x + (1 - s'/s) D
            x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * den
            continue
        h = -math.log(s[i + 1]) - lam
        em = math.exp(-h)
        c1 = 1 - em  # integral of e^-(h - t) over [0, h]
        c2 = h - c1  # ... of t e^-(h - t)
        c3 = h * h / 2 - c2  # ... of t^2/2 e^-(h - t)
        (l0, m0), (l1, m1) = hist[-1], hist[-2]
        f01 = (m0 - m1) / (l0 - l1)
        if order == 2:  # the 2M midpoint rule: m' ~ f01, weight (1 - e^-h)/2 instead of c2/h
            x = em * x + c1 * m0 + 0.5 * c1 * f01 * h
            continue
        l2, m2 = hist[-3]
        f12 = (m1 - m2) / (l1 - l2)
        f012 = (f01 - f12) / (l0 - l2)  # = m''/2
        d1 = f01 + f012 * (l0 - l1)  # m'(l0) from the interpolating quadratic
        x = em * x + c1 * m0 + c2 * d1 + c3 * (2 * f012)
    return x


@pytest.mark.parametrize("schedule,opts", SCHEDULES)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8, 14, 15, 20])
def test_dpmpp_3m_taylor_vs_independent_recurrence(schedule, opts, nfe):
    sig = step_sigmas(schedule, nfe, **opts)
    got, noise = ours("dpmpp_3m", nfe, sig, variant="taylor")
    check(f"dpmpp_3m(taylor)/recurrence/{schedule}/N{nfe}", got, dpmpp_3m_taylor_loop(sig, noise[0]))


def test_report_measured():
    """Summary of the measured errors (run with -s to see it); runs last in this file."""
    if not MEASURED:
        pytest.skip("no peer comparison ran")
    worst: dict[str, float] = {}
    for case, err in MEASURED.items():
        key = "/".join(case.split("/")[:2])
        worst[key] = max(worst.get(key, 0.0), err)
    print("\nmax relative error to the diffusers peer (shown with -s):")
    for key, err in sorted(worst.items()):
        print(f"  {key:32s} {err:.2e}")
    assert max(worst.values()) < TOL
