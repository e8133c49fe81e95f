"""TableScheduler refuses bad use with one ValueError sentence (issue 23): bad noise-schedule configs, table sigmas
outside the schedule's range, guidance-doubled or changing batches, integer samples, out-of-range add_noise
timesteps; and a zero-terminal-SNR schedule (rescale_betas_zero_snr) is accepted and runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from samplers import baselines, make_noise, sample

pytest.importorskip("diffusers")
from samplers.denoisers import VPDenoiser  # noqa: E402
from samplers.diffusers_scheduler import TableScheduler, alphas_cumprod_of  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# linear DDPM: sigma_t = sqrt((1 - abar_t) / abar_t) spans [sigma_min, sigma_max] at t = 0, 999
abar = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), 0).double()
SIGMA_MIN, SIGMA_MAX = (math.sqrt((1 - float(a)) / float(a)) for a in (abar[0], abar[-1]))


def euler(sigma_min: float = SIGMA_MIN, sigma_max: float = 80.0, nfe: int = 3):
    return baselines.build("euler", nfe, sigma_min=sigma_min, sigma_max=sigma_max)


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a UNet (its output read as eps or v)."""
    return torch.tanh(x) * (1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) / 1000)


def run(ts: TableScheduler, latents: torch.Tensor) -> torch.Tensor:
    ts.set_timesteps(ts.nfe)
    x = latents * ts.init_noise_sigma
    for t in ts.timesteps:
        x = ts.step(net(ts.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("override,needle", [
    ({"beta_schedule": "nope"}, "beta_schedule 'nope' is not supported; use one of linear"),
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer in [2, 100000], got 0."),
    ({"num_train_timesteps": 1}, "num_train_timesteps must be an integer in [2, 100000], got 1."),
    ({"num_train_timesteps": 2.5}, "num_train_timesteps must be an integer in [2, 100000], got 2.5."),
    ({"num_train_timesteps": 10**9}, "num_train_timesteps must be an integer in [2, 100000], got 1000000000."),
    ({"prediction_type": "flow"}, "prediction_type must be one of epsilon, v_prediction, sample, got 'flow'."),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas must be a list of num_train_timesteps = 1000 finite numbers, "
                                    "got a list of length 2."),
    ({"trained_betas": "abc"}, "trained_betas must be a list of num_train_timesteps = 1000 finite numbers, got 'abc'."),
    ({"trained_betas": [0.5] * 999 + [float("nan")]}, "trained_betas must be a list of num_train_timesteps = 1000"),
    ({"trained_betas": [2.0] * 1000}, "trained_betas gives alphas_cumprod outside (0, 1)"),
    ({"beta_end": 1.5}, "beta_schedule='linear', beta_start=0.0001, beta_end=1.5 gives alphas_cumprod outside (0, 1)"),
    ({"beta_start": "x"}, "beta_start must be a finite number, got 'x'."),
    ({"rescale_betas_zero_snr": "yes"}, "rescale_betas_zero_snr must be true or false, got 'yes'."),
])
def test_bad_config_is_one_value_error(override, needle):
    with pytest.raises(ValueError) as err:
        TableScheduler.from_table(euler(), {**DDPM, **override})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_quantize_must_be_boolean():
    """quantize="no" would have been read as True (bool("no")): refused."""
    with pytest.raises(ValueError, match="quantize must be true or false, got 'no'."):
        TableScheduler.from_table(euler(), DDPM, quantize="no")
    assert TableScheduler.from_table(euler(), DDPM, quantize=True).timesteps.dtype == torch.int64


def test_alphas_cumprod_of_checks_the_config():
    """optimize's diffusers pre-check calls alphas_cumprod_of: the same sentences, and the right values when valid."""
    assert torch.allclose(alphas_cumprod_of(DDPM), abar, rtol=0, atol=0)
    with pytest.raises(ValueError, match="beta_schedule 'cosine' is not supported"):
        alphas_cumprod_of({**DDPM, "beta_schedule": "cosine"})


def test_table_sigmas_must_lie_in_the_schedule_range():
    """sigma_to_t would clamp 5000 to t = 999 (and 0.002 to t = 0) silently: refused, naming sigma and range.
    Tables built at the schedule's exact range pass (rounding), and round values within half a training step below
    sigma_min (0.01 for 0.0100013, t = -3e-4) pass as before."""
    with pytest.raises(ValueError) as err:
        TableScheduler.from_table(euler(sigma_max=5000.0), DDPM)
    msg = str(err.value)
    assert "sigma 5000 (evaluation 0)" in msg and f"[{SIGMA_MIN:.6g}, {SIGMA_MAX:.6g}]" in msg, msg
    assert "[0.0100013, 157.407]" in msg
    with pytest.raises(ValueError, match=r"sigma 0.002 \(evaluation 2\) is outside"):
        TableScheduler.from_table(euler(sigma_min=0.002), DDPM)
    with pytest.raises(ValueError, match=r"sigma 157.409 \(evaluation 0\)"):
        TableScheduler.from_table(euler(sigma_max=SIGMA_MAX * (1 + 1e-5)), DDPM)
    exact = TableScheduler.from_table(euler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX * (1 + 1e-7)), DDPM)
    assert float(exact.timesteps[0]) == 999.0 and float(exact.timesteps[-1]) == 0.0
    assert TableScheduler.from_table(euler(sigma_min=0.01), DDPM).nfe == 3


def test_guidance_batch_and_shape_mismatch_are_named():
    ts = TableScheduler.from_table(euler(), DDPM)
    ts.set_timesteps(3)
    x, t = torch.randn(2, 1, 8, 8), ts.timesteps[0]
    with pytest.raises(ValueError) as err:
        ts.step(torch.randn(4, 1, 8, 8), t, x)
    assert str(err.value) == ("TableScheduler: model_output has batch 4 but sample has batch 2; apply classifier-free "
                              "guidance before step() (model_output shape (4, 1, 8, 8), sample shape (2, 1, 8, 8)).")
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 1, 4, 4\) but sample has shape \(2, 1, 8, 8\)"):
        ts.step(torch.randn(2, 1, 4, 4), t, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        ts.step(torch.randn(2, 3, 8, 8), t, x)
    out = ts.step(torch.randn(2, 2, 8, 8), t, x).prev_sample  # learned variance: [prediction, variance] is fine
    assert out.shape == x.shape


def test_batch_and_shape_are_fixed_within_a_run():
    ts = TableScheduler.from_table(euler(), DDPM)
    ts.set_timesteps(3)
    x = torch.randn(2, 1, 8, 8)
    x = ts.step(torch.zeros_like(x), ts.timesteps[0], x).prev_sample
    bigger = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError) as err:
        ts.step(torch.zeros_like(bigger), ts.timesteps[1], bigger)
    assert str(err.value).startswith("TableScheduler: sample has shape (3, 1, 8, 8) at step 1, but this run started "
                                     "with shape (2, 1, 8, 8);")
    ts.set_timesteps(3)  # a new run may use another batch
    assert ts.step(torch.zeros_like(bigger), ts.timesteps[0], bigger).prev_sample.shape == bigger.shape


def test_set_noise_must_match_the_sample():
    table = baselines.build("ddim", 3, sigma_min=SIGMA_MIN, sigma_max=80.0, eta=1.0)
    ts = TableScheduler.from_table(table, DDPM)
    ts.set_noise(make_noise(table, (1, 8, 8), range(2)))
    ts.set_timesteps(3)
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"set_noise gave noise of shape \(4, 2, 1, 8, 8\), but the sample has shape "
                                         r"\(3, 1, 8, 8\)"):
        ts.step(torch.zeros_like(x), ts.timesteps[0], x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_samples_are_refused(dtype):
    ts = TableScheduler.from_table(euler(), DDPM)
    ts.set_timesteps(3)
    x = torch.ones(2, 1, 8, 8, dtype=dtype)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=f"sample must be a floating-point tensor, got {name}."):
        ts.step(torch.zeros(2, 1, 8, 8), ts.timesteps[0], x)
    with pytest.raises(ValueError, match=f"model_output must be a floating-point tensor, got {name}."):
        ts.step(torch.zeros(2, 1, 8, 8, dtype=dtype), ts.timesteps[0], torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=f"original_samples must be a floating-point tensor, got {name}."):
        ts.add_noise(x, torch.zeros(2, 1, 8, 8), torch.tensor([10, 10]))


def test_add_noise_timesteps_in_range():
    """In range: the VP forward process sqrt(abar) x0 + sqrt(1 - abar) n exactly at integer t; out of range (or a
    count that is neither 1 nor the batch) is refused, naming the timestep and the range."""
    ts = TableScheduler.from_table(euler(), DDPM)
    x0, n = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 999])
    a = abar[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(ts.add_noise(x0, n, t), a.sqrt() * x0 + (1 - a).sqrt() * n, rtol=1e-12, atol=1e-12)
    for bad, shown in ((1000, "1000"), (-1, "-1"), (float("nan"), "nan"), (999.5, "999.5")):
        with pytest.raises(ValueError, match=rf"add_noise: timestep {shown} is outside the valid range \[0, 999\]\."):
            ts.add_noise(x0, n, torch.tensor([10.0, bad]))
    with pytest.raises(ValueError, match="got 3 timesteps for a batch of 2"):
        ts.add_noise(x0, n, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"noise has shape \(1, 1, 4, 4\) but original_samples has shape"):
        ts.add_noise(x0, n[:1], torch.tensor([10]))


def test_rescale_betas_zero_snr_runs_like_the_executor():
    """A zero-terminal-SNR schedule (abar_T = 0, abar_{T-1} = 4.2e-9) constructs, covers a table up to its own finite
    sigma_max, and gives the executor's sample (VPDenoiser on the same abar) with finite values."""
    config = {**DDPM, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    zabar = alphas_cumprod_of(config)
    assert torch.all(zabar > 0) and torch.all(zabar[1:] < zabar[:-1])
    lo, hi = (math.sqrt((1 - float(a)) / float(a)) for a in (zabar[0], zabar[-1]))
    assert 2e4 < hi < 3e4  # abar_T = abar_{T-2} / 4 (2.1e-9), not 2^-24
    table = baselines.build("dpmpp_2m", 4, sigma_min=lo, sigma_max=hi)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on valid use
        ts = TableScheduler.from_table(table, config)
    e0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = run(ts, e0)
    ref = sample(table, VPDenoiser(net, zabar, prediction_type="v_prediction"), e0[None])
    assert torch.isfinite(out).all() and out.abs().max() < 10
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
