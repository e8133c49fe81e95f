"""Table compilers: NFE accounting, schedules, identities between solvers, and input errors.

Agreement with diffusers is in test_peer_diffusers.py and convergence orders in test_convergence.py.
"""

import numpy as np
import pytest
import torch

from samplers import baselines, schedules

ALL = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc", "ddim"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("nfe", [1, 3, 5, 9])
def test_nfe_is_exact_and_tables_are_causal(name, nfe):
    table = baselines.build(name, nfe)
    assert table.nfe == nfe == table.metadata["nfe"]
    assert table.metadata["method"] == name
    assert np.all(np.diff(table.sigmas.numpy()) <= 0)
    assert table.sigmas[0] == 80.0
    table.validate()


def test_heun_even_nfe_names_valid_values():
    with pytest.raises(ValueError, match=r"heun needs an odd NFE .*valid values are 1, 3, 5, 7"):
        baselines.build("heun", 4)


@pytest.mark.parametrize("nfe", [0, -3, 2.5, True, "4"])
def test_bad_nfe(nfe):
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        baselines.build("euler", nfe)


def test_unknown_solver_and_option():
    with pytest.raises(ValueError, match=r"unknown solver 'rk45'; valid: euler, heun, dpmpp_2m"):
        baselines.build("rk45", 4)
    with pytest.raises(ValueError, match=r"dpmpp_2m does not take option\(s\) eta; its options: none"):
        baselines.build("dpmpp_2m", 4, eta=0.5)
    with pytest.raises(ValueError, match="unipc order must be 1, 2 or 3"):
        baselines.build("unipc", 4, order=4)
    with pytest.raises(ValueError, match=r"ddim needs 0 <= eta <= 1"):
        baselines.build("ddim", 4, eta=1.5)


def test_schedule_errors():
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        baselines.build("euler", 4, sigma_min=80.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: karras, logsnr, time_uniform, flow"):
        baselines.build("euler", 4, schedule="cosine")
    with pytest.raises(ValueError, match="heun with nfe=5 takes 3 step sigmas, got 4"):
        baselines.build("heun", 5, sigmas=[10.0, 5.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        baselines.build("euler", 3, sigmas=[1.0, 2.0, 0.5])


def test_schedules():
    k = schedules.karras(5, 0.002, 80.0, 7.0)
    assert k[0] == pytest.approx(80.0) and k[-1] == pytest.approx(0.002)
    ramp = k ** (1 / 7)
    assert np.allclose(np.diff(ramp), np.diff(ramp)[0])  # linear in sigma^(1/rho)
    lg = np.log(schedules.logsnr_uniform(6, 0.01, 10.0))
    assert np.allclose(np.diff(lg), np.diff(lg)[0]) and np.exp(lg[0]) == pytest.approx(10.0)
    tu = schedules.time_uniform(7, 0.002, 80.0)
    t = schedules.vp_time(tu)
    assert np.allclose(np.diff(t), np.diff(t)[0]) and tu[0] == 80.0 and tu[-1] == 0.002
    assert np.allclose(schedules.vp_sigma(schedules.vp_time(np.array([0.01, 1.0, 50.0]))), [0.01, 1.0, 50.0])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_is_uniform_in_flow_time(shift):
    """sigma = t / (1 - t) with t = shift u / (1 + (shift - 1) u) and u uniform (rectified flow; SD3's shift)."""
    sig = schedules.make("flow", 6, 0.001, 999.0, shift=shift)
    assert sig[0] == 999.0 and sig[-1] == 0.001 and np.all(np.diff(sig) < 0)
    t = sig / (1 + sig)
    u = t / (shift - (shift - 1) * t)  # undo the shift
    assert np.allclose(np.diff(u), np.diff(u)[0])
    if shift == 1.0:  # from t = 1 to 0 in 4 equal steps (FlowMatchEuler's grid up to its 1/1000 end): sigma 3, 1, 1/3 inside
        assert np.allclose(schedules.flow_uniform(5, 1e-9, 1e9)[1:4], [3.0, 1.0, 1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="shift must be positive"):
        schedules.flow_uniform(4, 0.01, 10.0, shift=0.0)


def test_explicit_sigmas_are_used_as_given():
    table = baselines.build("heun", 5, sigmas=[10.0, 2.0, 0.1, 0.0])
    np.testing.assert_array_equal(table.sigmas.numpy(), [10.0, 2.0, 2.0, 0.1, 0.1])
    assert table.metadata["schedule"] == {"name": "explicit", "sigmas": [10.0, 2.0, 0.1]}


def test_solver_identities():
    euler = baselines.build("euler", 6)
    # DDIM with eta = 0 is Euler; its extra noise columns are unused.
    ddim0 = baselines.build("ddim", 6, eta=0.0)
    np.testing.assert_allclose(ddim0.coef[:, [0] + list(range(7, 7 + 12))].numpy(), euler.coef.numpy(), atol=1e-15)
    assert np.all(ddim0.coef[:, 1:7].numpy() == 0)
    # Multistep methods start with an Euler step and end with the data prediction d_{N-1}.
    for name in ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]:
        t = baselines.build(name, 6)
        np.testing.assert_allclose(t.coef[1].numpy(), euler.coef[1].numpy(), atol=1e-14, err_msg=name)
    for name in ["dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "ddim"]:
        t = baselines.build(name, 5)
        row = np.zeros(t.coef.shape[1])
        row[t.d(4)] = 1.0
        np.testing.assert_allclose(t.coef[-1].numpy(), row, atol=1e-12, err_msg=name)


def test_ddim_noise_columns_follow_the_ancestral_step():
    eta = 0.7
    table = baselines.build("ddim", 4, eta=eta)
    s = np.append(table.sigmas.numpy(), 0.0)
    for i in range(1, 4):
        s_up = eta * s[i] * np.sqrt(s[i - 1] ** 2 - s[i] ** 2) / s[i - 1]
        assert table.coef[i, table.e(i)].item() == pytest.approx(s_up)
    assert np.all(table.coef[-1, :5].numpy() == 0)  # no noise on the step to sigma 0


def test_sample_with_ddim_eta_on_zero_data_keeps_marginals():
    """On data x0 = 0 (D = 0) every DDIM(eta) iterate has the exact marginal N(0, sigma_i^2)."""
    from samplers import make_noise, sample

    table = baselines.build("ddim", 4, eta=1.0)
    seen = []
    noise = make_noise(table, (1,), range(20000), dtype=torch.float64)
    sample(table, lambda x, s, c=None: torch.zeros_like(x), noise, callback=lambda i, x, d, s: seen.append(x.std().item()))
    np.testing.assert_allclose(seen, table.sigmas.numpy(), rtol=0.03)


# --- end convention: the last step lands on sigma_min, which is never evaluated -------------------
def _gmm():
    from samplers.denoisers import GaussianMixture

    return GaussianMixture.random()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("nfe", [1, 3, 5])
def test_end_sigma_min_spends_no_evaluation_at_sigma_min(name, nfe):
    table = baselines.build(name, nfe, end="sigma_min")
    assert table.nfe == nfe and table.metadata["end"] == "sigma_min"
    assert table.metadata["step_sigmas"][-1] == pytest.approx(0.002)
    assert table.sigmas.min() > 0.002 * 10  # karras(N+1)'s last evaluated point is far above sigma_min
    table.validate()


def test_end_sigma_min_euler_and_dpmpp_2m_match_hand_written_loops():
    """Independent float64 loops over the N+1 grid (DDIM; DPM-Solver++(2M), Lu et al. 2022 Alg. 2, first order on the
    first and last step), ending at the state at sigma_min."""
    gmm = _gmm()
    grid = schedules.karras(6, 0.002, 80.0, 7.0)  # 5 evaluations, lands on 0.002
    e = torch.randn(3, *gmm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = lambda x, s: gmm(x, torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0]))  # noqa: E731

    x = grid[0] * e
    for i in range(5):
        x = grid[i + 1] / grid[i] * x + (1 - grid[i + 1] / grid[i]) * D(x, grid[i])
    table = baselines.build("euler", 5, sigmas=grid, end="sigma_min")
    out = baselines_sample(table, D, e)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)

    lam = -np.log(grid)
    x, prev = grid[0] * e, None
    for i in range(5):
        d = D(x, grid[i])
        h = lam[i + 1] - lam[i]
        if prev is None or i == 4:
            x = grid[i + 1] / grid[i] * x - np.expm1(-h) * d
        else:
            r = (lam[i] - lam[i - 1]) / h
            x = grid[i + 1] / grid[i] * x - np.expm1(-h) * d - 0.5 * np.expm1(-h) * (d - prev) / r
        prev = d
    table = baselines.build("dpmpp_2m", 5, sigmas=grid, end="sigma_min")
    torch.testing.assert_close(baselines_sample(table, D, e), x, rtol=0, atol=1e-10)


def baselines_sample(table, denoiser, e):
    from samplers import sample

    return sample(table, denoiser, e[None])


def test_end_sigma_min_is_the_better_use_of_few_evaluations_on_the_gmm():
    """Exact GMM denoiser: at NFE 4 the sigma_min convention is closer to the converged solve than EDM's (it does not
    spend one of four evaluations at sigma_min, where D(x) ~ x)."""
    gmm = _gmm()
    e = torch.randn(256, *gmm.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D = lambda x, s: gmm(x, torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0]))  # noqa: E731
    ref = baselines_sample(baselines.build("heun", 255), D, e)
    for name in ("dpmpp_2m", "unipc", "ipndm"):
        err = {end: (baselines_sample(baselines.build(name, 4, end=end), D, e) - ref).pow(2).mean().sqrt().item()
               for end in baselines.ENDS}
        assert err["sigma_min"] < 0.8 * err["zero"], (name, err)


def test_end_errors():
    with pytest.raises(ValueError, match="end must be one of zero, sigma_min, got 'one'"):
        baselines.build("euler", 4, end="one")
    with pytest.raises(ValueError, match="tada.* takes only end='zero'"):
        baselines.build("tada", 4, end="sigma_min")
    with pytest.raises(ValueError, match=r"euler with nfe=3 takes 4 sigmas with end=sigma_min .* got 3"):
        baselines.build("euler", 3, sigmas=[10.0, 1.0, 0.1], end="sigma_min")
