"""TADA as a table: agreement with a direct solve of the augmented ODE, the flow-matching reduction, the
flow adapter, option errors and convergence.

The direct solver below shares no code with samplers/tada.py: it builds mu_t, Sigma_t, r_t and gamma_t from
matrices (numpy.linalg), finds the time grid with brentq, draws the prior from the eigen-decomposition of
the residual covariance, and integrates each step with ``expm`` (a Taylor series: the drift is nilpotent)
and Gauss-Legendre quadrature of the Lagrange-extrapolated force, on tensors, calling the denoiser.
"""

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from samplers import SolverTable, baselines, make_noise, sample, schedules
from samplers.__main__ import main as samplers_main
from samplers.denoisers import FlowDenoiser, GaussianMixture
from samplers.tada import tada

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
GMM = GaussianMixture.random(SHAPE, components=6, seed=0)


# --- direct solver -------------------------------------------------------------------------------
def phi0(t, c):
    """Phi(t, 0) of the closed loop (METHODS.md), s = 1 - t."""
    s = 1.0 - t
    return np.array([[s]]) if c == 1 else np.array([[2 * s - s**2, s - s**2], [2 * s - 2, 2 * s - 1]])


def mean(t, c):
    return np.array([t]) if c == 1 else np.array([t**2, 2 * t])


def moments(t, k, c):
    """mu_t, Sigma_t, gamma_t, r_t from the matrices."""
    phi, mu = phi0(t, c), mean(t, c)
    cov = phi @ np.diag([1.0, k][:c]) @ phi.T
    sol = np.linalg.solve(cov, mu)
    gamma = mu @ sol
    return mu, cov, gamma, sol / gamma


def time_of(sigma, k, c):
    f = lambda t: -0.5 * math.log(moments(t, k, c)[2]) - math.log(sigma)
    return scipy.optimize.brentq(f, 1e-8, 1 - 1e-4, xtol=1e-16, rtol=4 * np.finfo(float).eps, maxiter=500)


def prior(t0, sigma0, k, c):
    """[c, 2] loadings of e_0, e_1: e_0 along mu (r^T X = sigma0 e_0), e_1 along the residual covariance."""
    mu, cov, gamma, _ = moments(t0, k, c)
    if c == 1:
        return (mu * sigma0)[:, None]
    vals, vecs = np.linalg.eigh(cov - np.outer(mu, mu) / gamma)
    w = math.sqrt(vals[-1]) * vecs[:, -1]
    if np.linalg.solve(phi0(t0, c), w)[1] < 0:  # sign convention: positive initial velocity noise
        w = -w
    return np.stack([mu * sigma0, w], axis=1)


def force(d, x, s, c):
    """The constant force reaching d at t = 1: ``c!/s^c (d - sum_m x^(m) s^m / m!)``."""
    taylor = sum(x[m] * s**m / math.factorial(m) for m in range(c))
    return math.factorial(c) / s**c * (d - taylor)


def expm_nilpotent(a):
    """exp(a) of a nilpotent matrix: its Taylor series, which ends after len(a) terms."""
    out, term = np.eye(len(a)), np.eye(len(a))
    for m in range(1, len(a)):
        term = term @ a / m
        out = out + term
    return out


def direct_tada(denoiser, noise, sigmas, detail=1.0, order=3, components=2):
    """The augmented ODE x^(m)' = x^(m+1), x^(c-1)' = F solved step by step on tensors: eq. 5 with the
    transition expm(A h) and the force's Lagrange extrapolation integrated by Gauss-Legendre quadrature."""
    c, k = components, detail
    t = [time_of(s, k, c) for s in sigmas]
    load = prior(t[0], sigmas[0], k, c)
    x = [sum(load[m, j] * noise[j] for j in range(noise.shape[0])) for m in range(c)]
    a = np.diag(np.ones(c - 1), 1)
    b = np.eye(c)[:, -1]
    nodes, weights = np.polynomial.legendre.leggauss(12)
    hist = []
    for i, sigma in enumerate(sigmas):
        r = moments(t[i], k, c)[3]
        y = sum(r[m] * x[m] for m in range(c))
        d = denoiser(y, torch.full((y.shape[0],), float(sigma), dtype=y.dtype))
        if i == len(sigmas) - 1:
            return d
        hist = [(t[i], force(d, x, 1 - t[i], c))] + hist[: order - 1]
        h = t[i + 1] - t[i]
        taus = t[i] + 0.5 * h * (nodes + 1)
        trans = expm_nilpotent(a * h)
        new = [sum(trans[m, n] * x[n] for n in range(c)) for m in range(c)]
        kern = np.stack([expm_nilpotent(a * (t[i + 1] - tau)) @ b for tau in taus])  # [q, c]
        for j, (tj, fj) in enumerate(hist):
            lag = np.prod([(taus - tm) / (tj - tm) for m, (tm, _) in enumerate(hist) if m != j], axis=0)
            w = 0.5 * h * (weights * lag) @ kern
            new = [new[m] + w[m] * fj for m in range(c)]
        x = new


def table_of(nfe, **options):
    return SolverTable(*tada(schedules.karras(nfe), **options))


def noise_for(k, n=6, seed0=0):
    return make_noise(k, SHAPE, range(seed0, seed0 + n), dtype=torch.float64)


# --- tests -----------------------------------------------------------------------------------------
def test_closed_forms_solve_the_closed_loop():
    """Phi(t, 0) and mu_t used above solve Phi' = A Phi, mu' = A mu + b (finite differences)."""
    for t in [0.1, 0.5, 0.9]:
        s, eps = 1 - t, 1e-6
        a_hat = np.array([[0, 1], [-2 / s**2, -2 / s]])
        dphi = (phi0(t + eps, 2) - phi0(t - eps, 2)) / (2 * eps)
        np.testing.assert_allclose(dphi, a_hat @ phi0(t, 2), atol=1e-7)
        dmu = (mean(t + eps, 2) - mean(t - eps, 2)) / (2 * eps)
        np.testing.assert_allclose(dmu, a_hat @ mean(t, 2) + [0, 2 / s**2], atol=1e-7)


@pytest.mark.parametrize("nfe", [1, 4, 6, 10])
def test_table_shape_and_first_rows(nfe):
    table = baselines.build("tada", nfe)
    assert table.nfe == nfe and table.n_noise == 2
    assert table.metadata["method"] == "tada" and table.metadata["config"] == {"detail": 1.0, "order": 3, "components": 2}
    np.testing.assert_array_equal(table.sigmas.numpy(), schedules.karras(nfe))
    coef = table.coef.numpy()
    np.testing.assert_allclose(coef[0], np.eye(coef.shape[1])[0] * 80.0, atol=1e-12)  # x_0 = sigma_max e_0
    np.testing.assert_array_equal(coef[-1], np.eye(coef.shape[1])[table.d(nfe - 1)])  # output D_{N-1}
    assert np.all(coef[:, table.x(0) : table.x(0) + nfe] == 0)  # rows use e_0, e_1 and d_j only


@pytest.mark.parametrize("nfe", [4, 6, 10])
@pytest.mark.parametrize("detail", [0.01, 1.0, 4.0])
def test_table_equals_direct_solver_on_gmm(nfe, detail):
    table = baselines.build("tada", nfe, detail=detail)
    noise = noise_for(2)
    out = sample(table, GMM, noise)
    ref = direct_tada(GMM, noise, table.sigmas.numpy(), detail=detail, order=3)
    assert (out - ref).abs().max().item() < 1e-6 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("components", [1, 2])
def test_other_orders_and_components_equal_direct_solver(order, components):
    sig = schedules.karras(7)
    table = SolverTable(*tada(sig, detail=2.0, order=order, components=components))
    assert table.n_noise == components
    noise = noise_for(components)
    ref = direct_tada(GMM, noise, sig, detail=2.0, order=order, components=components)
    assert (sample(table, GMM, noise) - ref).abs().max().item() < 1e-6
    if components == 1 and order == 2:  # and order 3 (the default) for flow matching
        ref3 = direct_tada(GMM, noise, sig, order=3, components=1)
        assert (sample(table_of(7, components=1), GMM, noise) - ref3).abs().max().item() < 1e-6


def _expanded(table):
    """Rows over e_k and d_j only, substituting each x_j by its row."""
    coef, n, k = table.coef.numpy().copy(), table.nfe, table.n_noise
    for i in range(n + 1):
        for j in range(min(i, n)):
            coef[i] += coef[i, k + j] * coef[j]
            coef[i, k + j] = 0.0
    return coef


@pytest.mark.parametrize("nfe", [1, 2, 5, 10])
def test_augmentation_off_is_euler(nfe):
    """components=1 (flow matching) at order 1 is DDIM: the euler table, coefficient for coefficient."""
    off = table_of(nfe, components=1, order=1, detail=3.0)
    euler = baselines.build("euler", nfe)
    assert off.n_noise == 1
    np.testing.assert_array_equal(off.sigmas.numpy(), euler.sigmas.numpy())
    np.testing.assert_allclose(_expanded(off), _expanded(euler), rtol=1e-12, atol=1e-12)
    noise = noise_for(1)
    assert (sample(off, GMM, noise) - sample(euler, GMM, noise)).abs().max().item() < 1e-12


class TinyFlow(torch.nn.Module):
    """A small random velocity net v(x_t, t) (float64)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(64, 32, generator=g, dtype=torch.float64) / 8)
        self.w2 = torch.nn.Parameter(torch.randn(32, 64, generator=g, dtype=torch.float64) / 6)
        self.a = torch.nn.Parameter(torch.randn(32, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        h = torch.tanh(x.flatten(1) @ self.w1 + t[:, None] * self.a)
        return (h @ self.w2).reshape(x.shape) + 0.5 * x


class ExactFlow(torch.nn.Module):
    """The exact flow-matching velocity of GMM: ``v = (x_t - E[x0 | x_t]) / t``."""

    def forward(self, x_t, t):
        tb = t.reshape(-1, 1, 1, 1)
        return (x_t - GMM(x_t / (1 - tb), t / (1 - t))) / tb


@torch.no_grad()
def test_flow_adapter():
    table = baselines.build("tada", 6, order=2, detail=2.0)
    noise = noise_for(2, n=4)
    flow = FlowDenoiser(TinyFlow())
    out = sample(table, flow, noise)
    assert (out - direct_tada(flow, noise, table.sigmas.numpy(), detail=2.0, order=2)).abs().max().item() < 1e-6
    # the exact velocity of the mixture through the adapter gives the mixture's own TADA sample
    exact = sample(table, FlowDenoiser(ExactFlow()), noise)
    assert (exact - sample(table, GMM, noise)).abs().max().item() < 1e-9


def test_bad_options():
    with pytest.raises(ValueError, match=r"tada does not take option\(s\) eta, max_order; its options: detail, order, components"):
        baselines.build("tada", 4, eta=0.5, max_order=2)
    for order in [0, 4, 2.5, "3", True]:
        with pytest.raises(ValueError, match=r"tada order must be 1, 2 or 3 \(Adams-Bashforth order"):
            baselines.build("tada", 4, order=order)
    for detail in [-1.0, 0.0, float("nan"), float("inf"), "lots", None]:
        with pytest.raises(ValueError, match="tada detail must be a positive finite number"):
            baselines.build("tada", 4, detail=detail)
    for components in [0, 3, True, "2"]:
        with pytest.raises(ValueError, match=r"tada components must be 1 \(augmentation off"):
            baselines.build("tada", 4, components=components)
    with pytest.raises(ValueError, match="tada needs positive, finite, strictly decreasing step sigmas"):
        tada(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        baselines.build("tada", 0)


@pytest.mark.parametrize("order", [2, 3])
def test_error_to_fine_reference_decreases_with_nfe(order):
    noise = noise_for(2, n=8, seed0=100)
    ref = sample(baselines.build("tada", 200, order=order), GMM, noise)
    errs = [(sample(baselines.build("tada", n, order=order), GMM, noise) - ref).pow(2).mean().sqrt().item()
            for n in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 3e-3 and errs[-2] / errs[-1] > 0.5 * 2**order, errs  # about order-p convergence


def test_components_option_of_build():
    """``baselines.build("tada", nfe, components=1)`` is the flow-matching table (K = 1), the same as the compiler's."""
    table = baselines.build("tada", 6, components=1, detail=2.0)
    assert table.n_noise == 1 and table.metadata["config"] == {"detail": 2.0, "order": 3, "components": 1}
    np.testing.assert_array_equal(table.coef.numpy(), table_of(6, components=1, detail=2.0).coef.numpy())
    noise = noise_for(1)
    ref = direct_tada(GMM, noise, table.sigmas.numpy(), detail=2.0, order=3, components=1)
    assert (sample(table, GMM, noise) - ref).abs().max().item() < 1e-6


def _cli(argv, capsys):
    try:
        code = samplers_main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_generate_cli_passes_detail(tmp_path, capsys):
    """``python -m samplers generate --solver tada --detail 2.0`` samples baselines.build("tada", ..., detail=2.0)."""
    code, err = _cli(["generate", "--solver", "tada", "--nfe", "10", "--detail", "2.0", "--model", "gmm", "--n", "12",
                      "--batch-size", "5", "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    with np.load(tmp_path / "a" / "samples.npz") as z:
        got, meta = z["samples"], json.loads(str(z["metadata"]))
    assert meta["table"]["config"] == {"detail": 2.0, "order": 3, "components": 2}
    gmm = GaussianMixture.random()  # what --model gmm loads
    table = baselines.build("tada", 10, detail=2.0)
    want = sample(table, gmm, make_noise(table, gmm.shape, range(3, 15)))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    # detail matters: the default detail gives other samples from the same seeds
    default = sample(baselines.build("tada", 10), gmm, make_noise(table, gmm.shape, range(3, 15)))
    assert (default - want).abs().max().item() > 1e-3


def test_generate_cli_detail_only_for_tada(tmp_path, capsys):
    code, err = _cli(["generate", "--solver", "euler", "--nfe", "4", "--detail", "2.0", "--no-progress",
                      "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.startswith("error: --detail is an option of --solver tada only") and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()
    code, err = _cli(["generate", "--solver", "tada", "--nfe", "4", "--detail", "-1", "--no-progress",
                      "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err.startswith("error: tada detail must be a positive finite number"), err
