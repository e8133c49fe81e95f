"""Denoiser adapters: each is checked against an independent computation in float64."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from samplers.denoisers import (
    CFGDenoiser,
    ContinuousVPDenoiser,
    EDMPrecond,
    FlowDenoiser,
    GaussianMixture,
    VPDenoiser,
    fingerprint_tensors,
)
from samplers.models import load_diffusers

F64 = torch.float64


# --- Gaussian mixture ------------------------------------------------------------------------
def _quadrature_posterior_mean(means, stds, weights, x, sigma):
    """E[x0 | x] for a 1-D mixture by a Riemann sum on a fine grid, in the log domain."""
    grid = np.linspace(-12.0, 12.0, 400_001)
    comp = -0.5 * ((grid[None] - means[:, None]) / stds[:, None]) ** 2 - np.log(stds[:, None]) + np.log(weights)[:, None]
    log_prior = np.logaddexp.reduce(comp, axis=0)  # [G]
    log_post = log_prior[None] - 0.5 * ((x[:, None] - grid[None]) / sigma) ** 2  # [X, G]
    log_post -= log_post.max(axis=1, keepdims=True)
    w = np.exp(log_post)
    return (w * grid).sum(1) / w.sum(1)


@pytest.mark.parametrize("sigma", [0.002, 0.03, 0.3, 1.0, 5.0, 80.0])
def test_gmm_posterior_mean_matches_quadrature(sigma):
    means, stds, weights = np.array([-1.5, 0.2, 1.0]), np.array([0.3, 0.1, 0.5]), np.array([0.5, 0.2, 0.3])
    gmm = GaussianMixture(torch.tensor(means)[:, None], torch.tensor(stds**2)[:, None], torch.tensor(weights))
    x = np.array([-2.5, -0.7, 0.1, 0.6, 1.3, 4.0])
    expected = _quadrature_posterior_mean(means, stds, weights, x, sigma)
    got = gmm(torch.tensor(x)[:, None], torch.full((len(x),), sigma, dtype=F64))[:, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


def test_gmm_2d_matches_grid_quadrature():
    """A non-separable 2-D mixture with anisotropic components: E[x0|x] as a sum over a 2-D grid."""
    means, var, w = [[-1.0, 0.5], [1.2, -0.3], [0.0, 1.0]], [[0.04, 0.25], [0.3, 0.02], [0.1, 0.1]], [0.3, 0.5, 0.2]
    gmm = GaussianMixture(means, var, w)
    axis = np.linspace(-6.0, 6.0, 1201)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # [G, 2]
    mu, v = np.array(means)[:, None], np.array(var)[:, None]
    comp = np.log(w)[:, None] - 0.5 * ((grid[None] - mu) ** 2 / v + np.log(v)).sum(-1)  # [M, G]
    log_prior = np.logaddexp.reduce(comp, axis=0)
    x = np.array([[0.3, 0.2], [-1.0, 1.5], [2.5, -2.0]])
    for sigma in (0.1, 0.5, 1.0, 3.0):
        log_post = log_prior[None] - 0.5 * ((x[:, None] - grid[None]) ** 2).sum(-1) / sigma**2  # [X, G]
        p = np.exp(log_post - log_post.max(1, keepdims=True))
        expected = p @ grid / p.sum(1, keepdims=True)
        got = gmm(torch.tensor(x), torch.full((3,), sigma, dtype=F64)).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gmm_finite_from_small_to_large_sigma_and_far_points(dtype):
    gmm = GaussianMixture.random(shape=(1, 4, 4), components=5, seed=1)
    gen = torch.Generator().manual_seed(0)
    near = gmm.sample(4, generator=gen)
    far = torch.cat([near * 1e3, torch.full_like(near[:1], -1e4), torch.full_like(near[:1], 3e4)])
    x = torch.cat([near, far]).to(dtype)
    for sigma in np.geomspace(0.002, 80.0, 12):
        d = gmm(x, torch.full((x.shape[0],), sigma, dtype=dtype))
        assert d.dtype == dtype and d.shape == x.shape
        assert torch.isfinite(d).all(), f"non-finite output at sigma {sigma}"
    # far from the data at tiny sigma: D = mu + v/(v + s^2) (x - mu) ~ x, to s^2/v <= 4e-6/0.05^2
    d = gmm(x[4:], torch.full((x.shape[0] - 4,), 0.002, dtype=dtype))
    torch.testing.assert_close(d, x[4:], rtol=2e-3, atol=0)


def test_gmm_single_component_is_linear():
    mu, var = torch.tensor([[0.3, -1.0, 2.0]], dtype=F64), torch.tensor([[0.5, 0.01, 2.0]], dtype=F64)
    gmm = GaussianMixture(mu, var)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=F64)
    expected = mu + var / (var + sigma[:, None] ** 2) * (x - mu)
    torch.testing.assert_close(gmm(x, sigma), expected, rtol=1e-14, atol=1e-14)


def test_gmm_bad_inputs():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="variances must be finite and non-negative"):
        GaussianMixture([[1.0]], -1.0)
    with pytest.raises(ValueError, match="weights must be 2 positive numbers"):
        GaussianMixture([[1.0], [2.0]], 1.0, [1.0, 0.0])


def test_fingerprint_tensors_is_stable_and_sensitive():
    a = {"w": torch.ones(3), "n": torch.tensor(5)}
    assert fingerprint_tensors(a) == fingerprint_tensors(list(reversed(list(a.items()))))
    assert fingerprint_tensors(a) != fingerprint_tensors({"w": torch.ones(3) * 2, "n": torch.tensor(5)})
    assert fingerprint_tensors(a) != fingerprint_tensors(a, config={"k": 1})
    assert len(fingerprint_tensors(a)) == 16
    # lossless casts keep the fingerprint (a table made in float32 runs in float64); lossy ones do not
    w = torch.randn(5, generator=torch.Generator().manual_seed(0))
    assert fingerprint_tensors({"w": w}) == fingerprint_tensors({"w": w.double()})
    assert fingerprint_tensors({"w": w}) != fingerprint_tensors({"w": w.half()})


# --- EDM preconditioning ---------------------------------------------------------------------
class _RecordingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=F64)
        self.seen: tuple = ()

    def forward(self, x, c_noise, cond=None):
        self.seen = (x, c_noise, cond)
        return self.lin(x) + c_noise[:, None] + (0 if cond is None else cond)


def test_edm_precond_matches_hand_computation():
    torch.manual_seed(0)
    net = _RecordingNet()
    den = EDMPrecond(net, sigma_data=0.5)
    x = torch.randn(3, 4, dtype=F64)
    sigmas = [0.01, 1.0, 50.0]
    for cond in (None, torch.randn(3, 4, dtype=F64)):
        out = den(x, torch.tensor(sigmas, dtype=F64), cond)
        for b, s in enumerate(sigmas):
            sd = 0.5
            c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2)
            c_noise = math.log(s) / 4
            x_in = c_in * x[b]
            f = net.lin(x_in) + c_noise + (0 if cond is None else cond[b])
            torch.testing.assert_close(out[b], c_skip * x[b] + c_out * f, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(net.seen[0][b], x_in, rtol=1e-15, atol=0)
            assert net.seen[1][b].item() == pytest.approx(c_noise, rel=1e-15)
        assert net.seen[2] is cond


def test_edm_precond_module_and_fingerprint():
    torch.manual_seed(0)
    den = EDMPrecond(_RecordingNet())
    fp = den.fingerprint()
    assert fp == EDMPrecond(den.net).fingerprint() and len(fp) == 16
    assert fp != EDMPrecond(den.net, sigma_data=1.0).fingerprint()
    assert den.to("cpu") is den and isinstance(den, torch.nn.Module)
    f32 = EDMPrecond(_RecordingNet().float())
    fp32 = f32.fingerprint()
    assert f32.to(F64).fingerprint() == fp32  # the same model run in float64
    with torch.no_grad():
        den.net.lin.weight.add_(1.0)
    assert den.fingerprint() != fp
    with pytest.raises(ValueError, match="sigma_data must be positive"):
        EDMPrecond(_RecordingNet(), sigma_data=0.0)


# --- VP discrete-time models -----------------------------------------------------------------
T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # DDPM linear schedule, float64
LOG_SIGMAS = 0.5 * np.log((1 - ABAR) / ABAR)


def _sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    """Inverse of the adapter's sigma -> t map, written independently with np.interp."""
    return torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(T), LOG_SIGMAS)))


def _exact_vp_model(gmm: GaussianMixture, prediction_type: str, calls: list | None = None):
    """A model that is exact for the GMM: t -> sigma_t, then eps, v or x0 from the analytic D."""

    def model(x_vp, t):
        if calls is not None:
            calls.append(t.clone())
        sig = _sigma_of_t(t)
        s = sig.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp * (1 + s**2).sqrt()
        d = gmm(x, sig)
        eps = (x - d) / s
        alpha = 1 / (1 + s**2).sqrt()
        return {"epsilon": eps, "v_prediction": alpha * eps - s * alpha * d, "sample": d}[prediction_type]

    return model


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(shape=(1, 4, 4), components=4, seed=3)


def _data(gmm, sigma, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(len(sigma), generator=gen)
    sigma = torch.as_tensor(sigma, dtype=F64)
    return x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen, dtype=F64), sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_reproduces_gmm_on_table_sigmas(gmm, prediction_type):
    steps = [0, 1, 17, 250, 500, 998, 999]
    x, sigma = _data(gmm, np.exp(LOG_SIGMAS[steps]))
    for quantize in (False, True):
        den = VPDenoiser(_exact_vp_model(gmm, prediction_type), ABAR, prediction_type, quantize=quantize)
        torch.testing.assert_close(den(x, sigma), gmm(x, sigma), rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_interpolates_between_table_sigmas(gmm, prediction_type):
    den = VPDenoiser(_exact_vp_model(gmm, prediction_type), ABAR, prediction_type)
    sigma = np.geomspace(den.sigma_min * 1.0001, den.sigma_max * 0.9999, 9)
    x, sigma = _data(gmm, sigma, seed=1)
    torch.testing.assert_close(den(x, sigma), gmm(x, sigma), rtol=0, atol=1e-10)


def test_vp_sigma_to_t_is_monotone_continuous_and_clamped():
    den = VPDenoiser(lambda x, t: x, ABAR)
    assert den.sigma_min == pytest.approx(math.exp(LOG_SIGMAS[0]), rel=1e-14)
    assert den.sigma_max == pytest.approx(math.exp(LOG_SIGMAS[-1]), rel=1e-14)
    sigma = torch.from_numpy(np.geomspace(den.sigma_min / 2, den.sigma_max * 2, 20_001))
    t = den.sigma_to_t(sigma).numpy()
    assert np.all(np.diff(t) >= 0) and np.abs(np.diff(t)).max() < 0.5
    expected = np.interp(np.log(sigma.numpy()), LOG_SIGMAS, np.arange(T))  # clamps outside the table
    np.testing.assert_allclose(t, expected, rtol=0, atol=1e-9)
    assert t[0] == 0 and t[-1] == T - 1
    on_table = den.sigma_to_t(torch.from_numpy(np.exp(LOG_SIGMAS))).numpy()
    np.testing.assert_allclose(on_table, np.arange(T), rtol=0, atol=1e-9)
    den.quantize = True
    np.testing.assert_array_equal(den.sigma_to_t(sigma).numpy(), np.round(expected))


def test_vp_quantize_calls_integer_timesteps(gmm):
    calls: list = []
    den = VPDenoiser(_exact_vp_model(gmm, "epsilon", calls), ABAR, quantize=True)
    x, sigma = _data(gmm, [0.05, 0.7, 3.0])
    out = den(x, sigma)
    t = calls[-1]
    assert t.dtype == torch.long
    expected_t = np.round(np.interp(np.log(sigma.numpy()), LOG_SIGMAS, np.arange(T)))
    np.testing.assert_array_equal(t.numpy(), expected_t)
    # manual: eps from the rounded-t model on x_vp = x / sqrt(1 + sigma^2), then x0 = x - sigma eps
    s = sigma.reshape(-1, 1, 1, 1)
    eps = _exact_vp_model(gmm, "epsilon")(x / (1 + s**2).sqrt(), t)
    torch.testing.assert_close(out, x - s * eps, rtol=0, atol=1e-12)
    assert not torch.allclose(out, gmm(x, sigma), atol=1e-4)  # off-table sigmas: quantisation error


def test_vp_learned_variance_output_and_gradient():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    den = VPDenoiser(lambda x_vp, t: torch.cat([torch.ones_like(x_vp), torch.full_like(x_vp, 99.0)], dim=1), ABAR)
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    torch.testing.assert_close(den(x, sigma), x - sigma.reshape(-1, 1, 1, 1))
    # differentiable in sigma through the fractional timestep (used by sampler search)
    den.model = lambda x_vp, t: x_vp * t.reshape(-1, 1, 1, 1) / 1000
    sigma.requires_grad_(True)
    den(x, sigma).sum().backward()
    assert torch.isfinite(sigma.grad).all() and (sigma.grad != 0).all()


def test_vp_bad_inputs():
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, sample, got 'x0'"):
        VPDenoiser(lambda x, t: x, ABAR, prediction_type="x0")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        VPDenoiser(lambda x, t: x, [1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPDenoiser(lambda x, t: x, [0.5, 0.9])


def test_vp_fingerprint_depends_on_config():
    net = torch.nn.Linear(2, 2)
    a = VPDenoiser(net, ABAR).fingerprint()
    assert a == VPDenoiser(net, ABAR).fingerprint()
    assert a != VPDenoiser(net, ABAR, "v_prediction").fingerprint()
    assert a != VPDenoiser(net, ABAR[:-1]).fingerprint()


# --- flow matching ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_continuous_vp_reproduces_gmm(gmm, prediction_type):
    """An exact continuous-time model written with EDM's sigma(t) (forward direction only) must give
    back the GMM's D through the adapter's closed-form inverse t(sigma)."""
    beta_min, beta_d, scale = 0.1, 19.9, 999.0

    def model(x_vp, t):
        tt = t.double() / scale
        sig = torch.sqrt(torch.expm1(0.5 * beta_d * tt**2 + beta_min * tt))
        s = sig.reshape(-1, 1, 1, 1)
        x = x_vp * (1 + s**2).sqrt()
        d = gmm(x, sig)
        eps, alpha = (x - d) / s, 1 / (1 + s**2).sqrt()
        return eps if prediction_type == "epsilon" else alpha * eps - s * alpha * d

    den = ContinuousVPDenoiser(model, beta_min, beta_d, time_scale=scale, prediction_type=prediction_type)
    x, sigma = _data(gmm, [0.003, 0.2, 1.0, 7.0, 80.0])
    torch.testing.assert_close(den(x, sigma), gmm(x, sigma), rtol=1e-9, atol=1e-9)
    assert den.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d + beta_min)))
    assert den.sigma_to_t(torch.tensor([den.sigma_max], dtype=F64)).item() == pytest.approx(scale)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ContinuousVPDenoiser(model, prediction_type="score")


def test_flow_reproduces_gmm(gmm):
    scale = 1000.0

    def velocity(x_t, tau):
        t = tau / scale
        sig = t / (1 - t)
        s = sig.reshape(-1, 1, 1, 1)
        x = x_t * (1 + s)
        d = gmm(x, sig)
        return (x - d) / s - d  # v = n - x0

    den = FlowDenoiser(velocity, time_scale=scale)
    x, sigma = _data(gmm, [0.002, 0.1, 1.0, 10.0, 80.0])
    torch.testing.assert_close(den(x, sigma), gmm(x, sigma), rtol=0, atol=1e-10)
    assert den.fingerprint() != FlowDenoiser(velocity).fingerprint()


def test_flow_passes_cond_and_time():
    seen = {}

    def velocity(x_t, t, cond):
        seen.update(x_t=x_t, t=t, cond=cond)
        return torch.zeros_like(x_t)

    x, sigma = torch.randn(2, 3, dtype=F64), torch.tensor([1.0, 3.0], dtype=F64)
    out = FlowDenoiser(velocity, time_scale=2.0)(x, sigma, "c")
    torch.testing.assert_close(seen["t"], 2.0 * sigma / (1 + sigma))
    torch.testing.assert_close(out, x / (1 + sigma[:, None]))
    assert seen["cond"] == "c"


# --- classifier-free guidance ----------------------------------------------------------------
def test_cfg_one_call_and_formula():
    calls = []

    def inner(x, sigma, cond):
        calls.append((x.shape[0], cond.clone()))
        return x / (1 + sigma[:, None] ** 2) + cond

    x, sigma = torch.randn(3, 2, dtype=F64), torch.tensor([0.5, 1.0, 4.0], dtype=F64)
    cond, uncond = torch.randn(3, 2, dtype=F64), torch.tensor([0.1, -0.2], dtype=F64)  # uncond without batch dim
    out = CFGDenoiser(inner, 3.0, uncond)(x, sigma, cond)
    assert len(calls) == 1 and calls[0][0] == 6
    torch.testing.assert_close(calls[0][1], torch.cat([cond, uncond.expand(3, 2)]))
    d_c, d_u = inner(x, sigma, cond), inner(x, sigma, uncond.expand(3, 2))
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u))


def test_cfg_class_labels_dicts_and_errors():
    calls = []

    def inner(x, sigma, cond):
        calls.append(cond)
        return x + cond["y"].to(x.dtype)[:, None]

    x, sigma = torch.zeros(2, 1, dtype=F64), torch.ones(2, dtype=F64)
    out = CFGDenoiser(inner, 2.0, {"y": 10})(x, sigma, {"y": torch.tensor([1, 2])})
    assert len(calls) == 1 and calls[0]["y"].tolist() == [1, 2, 10, 10]
    torch.testing.assert_close(out[:, 0], torch.tensor([10 + 2.0 * (1 - 10), 10 + 2.0 * (2 - 10)], dtype=F64))
    with pytest.raises(ValueError, match="CFGDenoiser needs a cond"):
        CFGDenoiser(inner, 2.0, 0)(x, sigma)


# --- diffusers -------------------------------------------------------------------------------
def test_import_samplers_does_not_import_diffusers():
    code = "import sys, samplers, samplers.denoisers; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _manual_x0(unet, abar, prediction_type, x, sigma):
    """Independent reference: x_vp scaling, log-sigma interpolation to t, then eps/v -> x0 (float64)."""
    log_sigmas = 0.5 * np.log((1 - abar) / abar)
    t = torch.from_numpy(np.interp(np.log(sigma.numpy()), log_sigmas, np.arange(len(abar))))
    s = sigma.reshape(-1, 1, 1, 1)
    x_vp = x / (1 + s**2).sqrt()
    with torch.no_grad():
        out = unet(x_vp.float(), t).sample.double()
    if prediction_type == "epsilon":
        return x - s * out
    alpha, s_vp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    return alpha * x_vp - s_vp * out


def test_load_diffusers_unet_and_scheduler_folders(tiny_unet, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    tiny_unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")  # any VP scheduler config
    den = load_diffusers(tmp_path)
    assert isinstance(den, VPDenoiser) and den.prediction_type == "epsilon" and not den.quantize
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double().numpy()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = torch.tensor([0.05, 1.3, float(np.sqrt((1 - abar[600]) / abar[600]))], dtype=F64)
    with torch.no_grad():
        got = den(x, sigma)
    torch.testing.assert_close(got, _manual_x0(tiny_unet, abar, "epsilon", x, sigma), rtol=0, atol=1e-5)
    assert den.fingerprint() == load_diffusers(tmp_path).fingerprint()


def test_load_diffusers_bare_folder_v_prediction(tiny_unet, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    tiny_unet.save_pretrained(tmp_path)
    sched.save_pretrained(tmp_path)
    den = load_diffusers(str(tmp_path), device="cpu")
    assert den.prediction_type == "v_prediction"
    abar = sched.alphas_cumprod.double().numpy()
    assert den.sigma_max == pytest.approx(float(np.sqrt((1 - abar[-1]) / abar[-1])), rel=1e-12)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigma = torch.tensor([0.2, 7.0], dtype=F64)
    with torch.no_grad():
        got = den(x, sigma)
    torch.testing.assert_close(got, _manual_x0(tiny_unet, abar, "v_prediction", x, sigma), rtol=0, atol=1e-5)


def test_load_diffusers_learned_time_embedding_is_quantized(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        time_embedding_type="learned", num_train_timesteps=100,
    )
    unet.save_pretrained(tmp_path)
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path)
    den = load_diffusers(tmp_path, dtype=torch.float64)
    assert den.quantize
    with torch.no_grad():
        assert torch.isfinite(den(torch.randn(2, 1, 8, 8, dtype=F64), torch.tensor([0.3, 2.0], dtype=F64))).all()


def test_load_diffusers_errors(tiny_unet, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="diffusers model folder .*nope.* does not exist"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(ValueError, match="no UNet config.json in"):
        load_diffusers(tmp_path)
    tiny_unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="no scheduler_config.json in .*scheduler"):
        load_diffusers(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_diffusers(tmp_path)
