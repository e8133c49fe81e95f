"""TableScheduler inside the stock text-to-image pipelines (issue 25, item 5): StableDiffusionPipeline (epsilon UNet,
scaled-linear betas, CLIP text) and StableDiffusion3Pipeline (flow-matching transformer, FlowMatchEulerDiscreteScheduler
with shift), random tiny folders from tests/tiny_t2i.py.

The truth is the executor: ``samplers.sample(table, D, e)`` with ``D`` written here from the pipeline's own
components (its UNet / transformer with the prompt embeddings, as an x0 denoiser through ``VPDenoiser`` /
``FlowDenoiser``, and classifier-free guidance on the doubled batch), from the same initial latents. Peers: the stock
DPMSolverMultistepScheduler and FlowMatchEulerDiscreteScheduler in the same pipelines. Equality is float32 rounding
relative to the sample's scale (a random net amplifies one-ulp differences of the first input a little).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from samplers import SolverTable, baselines, make_noise, sample

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,  # noqa: E402
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

from samplers.denoisers import FlowDenoiser, VPDenoiser  # noqa: E402
from samplers.diffusers_scheduler import TableScheduler, sigma_range  # noqa: E402
from samplers.schedule_config import alphas_cumprod_of, flow_sigmas_of  # noqa: E402
from tiny_t2i import MAX_TOKENS, save_tiny_sd, save_tiny_sd3  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
TOL = 2e-5  # relative to the largest |value|
PROMPTS = ["a red seven on a blue background", "a green two on a wood background"]
SHAPE = (2, 4, 8, 8)  # two prompts, 4x8x8 latents (32x32 images)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = StableDiffusionPipeline.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("sd")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pipe = StableDiffusion3Pipeline.from_pretrained(save_tiny_sd3(tmp_path_factory.mktemp("sd3")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the reference denoisers, from the pipelines' components (independent of the scheduler) ---------------------
class SDNet(torch.nn.Module):
    """``(x_vp, t, embeds) -> eps``: the pipeline's UNet with cross-attention on the prompt embeddings."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class SD3Net(torch.nn.Module):
    """``(x_t, timestep, (embeds, pooled)) -> v``: the pipeline's transformer."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, cond):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["embeds"],
                                pooled_projections=cond["pooled"]).sample


def guided(den, scale: float, cond, uncond):
    """``D(x, sigma)``: the conditional denoiser at scale 1 (the pipelines skip guidance there), else
    ``D_u + scale (D_c - D_u)`` from one call on ``[x, x]`` with ``[uncond, cond]``."""
    def cat(a, b):
        return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])

    def D(x, sigma):
        if scale == 1:
            return den(x, sigma, cond)
        d_u, d_c = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cat(uncond, cond)).chunk(2)
        return d_u + scale * (d_c - d_u)

    return D


def sd_denoiser(pipe, scale: float, scheduler):
    """``scheduler``: the pipeline's own (PNDM), whose alphas_cumprod (scaled-linear betas) the UNet was made for."""
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    abar = scheduler.alphas_cumprod.double()
    return guided(VPDenoiser(SDNet(pipe.unet), abar, prediction_type="epsilon"), scale, cond, uncond)


def sd3_denoiser(pipe, scale: float):
    c, u, pc, pu = pipe.encode_prompt(PROMPTS, None, None, "cpu", max_sequence_length=MAX_TOKENS)
    flow = FlowDenoiser(SD3Net(pipe.transformer), time_scale=pipe.scheduler.config.num_train_timesteps)
    return guided(flow, scale, {"embeds": c, "pooled": pc}, {"embeds": u, "pooled": pu})


def run_sd(pipe, scale: float, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=pipe.scheduler.nfe, guidance_scale=scale, output_type="latent",
                    **kw).images


def run_sd3(pipe, scale: float, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=pipe.scheduler.nfe, guidance_scale=scale, output_type="latent",
                    max_sequence_length=MAX_TOKENS, **kw).images


# --- tables ------------------------------------------------------------------------------------------------------
def tables(config) -> dict[str, SolverTable]:
    """A deterministic table (DPM-Solver++(2M)), TADA (two noise vectors; its first row reads e_1 with a rounding-size
    coefficient) and a table whose first input genuinely mixes two noises (0.6 e_0 + 0.8 e_1) and whose output
    reads e_1 again: over the model's sigma range, 4 evaluations (TADA from at most sigma 80: from SD3's 2997 in 4
    steps its samples on this random net reach |x| = 250 and amplify float32 rounding to 7e-5; in float64 it agrees
    to 1e-13)."""
    lo, hi = sigma_range(config)
    det = baselines.build("dpmpp_2m", 4, sigma_min=lo, sigma_max=hi)
    tada = baselines.build("tada", 4, sigma_min=lo, sigma_max=min(hi, 80.0), detail=0.5)
    coef = np.concatenate([det.coef[:, :1].numpy(), np.zeros((5, 1)), det.coef[:, 1:].numpy()], axis=1)
    s0 = float(det.sigmas[0])
    coef[0, :2] = [0.6 * s0, 0.8 * s0]
    coef[4, 1] = 0.05
    return {"dpmpp_2m": det, "tada": tada, "mixed": SolverTable(det.sigmas, coef)}


def first_row_noise(table: SolverTable, u: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
    """The documented rule: row 0's noises e = z + w (u - w . z) with w = c_0 / |c_0| (``e_0 = sign(c_00) u`` when the
    row reads e_0 alone); the other noise vectors are the next draws in column order. Returns e [K, B, ...]."""
    k = table.n_noise
    c = table.coef[0, :k].numpy()
    used = np.flatnonzero(c)
    w = c[used] / np.sqrt((c[used] ** 2).sum())
    e = [None] * k
    if len(used) == 1:
        e[used[0]] = u if w[0] > 0 else -u
    else:
        z = {j: draws.pop(0) for j in used}
        along = sum(float(wj) * z[j] for j, wj in zip(used, w))
        for j, wj in zip(used, w):
            e[j] = z[j] + float(wj) * (u - along)
    for j in range(k):
        if e[j] is None:
            e[j] = draws.pop(0)
    return torch.stack(e)


# --- Stable Diffusion (epsilon, VP) ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("name", ["dpmpp_2m", "tada", "mixed"])
def test_sd_pipeline_equals_executor(sd, name, scale):
    """StableDiffusionPipeline (guidance doubles the batch before scale_model_input) with the table equals the
    executor; the extra noise comes from the pipeline's generator: its latents, then further draws in column order."""
    table = tables(sd.scheduler.config)[name]
    base = sd.scheduler
    sd.scheduler = TableScheduler.from_table(table, base.config)
    try:
        calls = []
        hook = sd.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        out = run_sd(sd, scale, generator=torch.Generator().manual_seed(3))
        hook.remove()
        assert calls == [SHAPE[0] * (2 if scale > 1 else 1)] * table.nfe  # exactly N calls, guidance in one batch
        gen = torch.Generator().manual_seed(3)
        latents = torch.randn(SHAPE, generator=gen)  # the pipeline's draw; it holds latents * init_noise_sigma
        u = latents * sd.scheduler.init_noise_sigma / sd.scheduler.init_noise_sigma
        draws = [torch.randn(SHAPE, generator=gen) for _ in range(2 * table.n_noise)]
        e = first_row_noise(table, u, draws)
        with torch.no_grad():
            ref = sample(table, sd_denoiser(sd, scale, base), e)
    finally:
        sd.scheduler = base
    assert out.shape == SHAPE
    assert rel(out, ref) < TOL, rel(out, ref)


def test_sd_decoded_image_and_repeatability(sd):
    """output_type="pt": the pipeline's image is the VAE decode of the executor's latents; the same generator gives
    the same stochastic image, another generator another."""
    table = tables(sd.scheduler.config)["tada"]
    base = sd.scheduler
    sd.scheduler = TableScheduler.from_table(table, base.config)
    try:
        with torch.no_grad():
            img = sd(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="pt",
                     generator=torch.Generator().manual_seed(5)).images
            lat = run_sd(sd, 7.5, generator=torch.Generator().manual_seed(5))
            again = run_sd(sd, 7.5, generator=torch.Generator().manual_seed(5))
            other = run_sd(sd, 7.5, generator=torch.Generator().manual_seed(6))
            ref = (sd.vae.decode(lat / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    finally:
        sd.scheduler = base
    assert torch.equal(lat, again) and not torch.allclose(lat, other)
    assert float((img - ref).abs().max()) < 1e-5


def test_sd_peer_dpm_solver(sd):
    """Peer: a dpmpp_2m table on DPMSolverMultistepScheduler's own sigmas (from the SD config) in the same pipeline,
    same latents and guidance, gives that stock scheduler's latents."""
    dpm = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    dpm.set_timesteps(6)
    table = baselines.build("dpmpp_2m", 6, sigmas=dpm.sigmas[:-1].double().tolist())
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    base = sd.scheduler
    try:
        sd.scheduler = dpm
        with torch.no_grad():
            stock = sd(PROMPTS, num_inference_steps=6, guidance_scale=7.5, output_type="latent",
                       latents=latents / dpm.init_noise_sigma).images
        ts = sd.scheduler = TableScheduler.from_table(table, base.config)
        ours = run_sd(sd, 7.5, latents=latents / ts.init_noise_sigma)
    finally:
        sd.scheduler = base
    print(f"SD dpmpp_2m table vs DPMSolverMultistepScheduler: max rel {rel(ours, stock):.2e}")
    assert rel(ours, stock) < 1e-5, rel(ours, stock)


def test_sd_img2img(sd):
    """img2img with strength < 1 would start mid-table: one sentence, before any work. With strength=1 it starts from
    the pipeline's noised image at the table's first sigma: a table from sigma 2 is an img2img from that level,
    equal to the executor from x_0 = image + 2 n."""
    lo, _ = sigma_range(sd.scheduler.config)
    table = baselines.build("dpmpp_2m", 4, sigma_min=lo, sigma_max=2.0)
    base = sd.scheduler
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))  # 4 channels: taken as latents
    try:
        pipe.scheduler = TableScheduler.from_table(table, base.config)
        with pytest.raises(ValueError) as err:
            pipe(PROMPTS, image=image, strength=0.5, num_inference_steps=4, output_type="latent")
        assert str(err.value) == ("TableScheduler runs whole tables, but the pipeline asked to start at evaluation 2 "
                                  "of 4 (img2img or inpainting with strength < 1): use strength=1 with a table whose "
                                  "first sigma is the noise level to start from.")
        with torch.no_grad():
            out = pipe(PROMPTS, image=image, strength=1.0, num_inference_steps=4, guidance_scale=7.5,
                       output_type="latent", generator=torch.Generator().manual_seed(4)).images
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
            e0 = (image + 2.0 * noise) / float(table.coef[0, 0])
            ref = sample(table, sd_denoiser(sd, 7.5, base), e0[None])
    finally:
        pipe.scheduler = sd.scheduler = base
    assert rel(out, ref) < 1e-4, rel(out, ref)


# --- Stable Diffusion 3 (flow matching) ------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("name", ["dpmpp_2m", "tada", "mixed"])
def test_sd3_pipeline_equals_executor(sd3, name, scale):
    """StableDiffusion3Pipeline with the table equals the executor from the same latents (SD3 uses them as given and
    never multiplies by init_noise_sigma); stochastic tables take their noise from set_noise, corrected along the
    first row so that the first input is the latents."""
    table = tables(sd3.scheduler.config)[name]
    base = sd3.scheduler
    ts = sd3.scheduler = TableScheduler.from_table(table, base.config)
    try:
        noise = make_noise(table, SHAPE[1:], range(10, 12))
        c = table.coef[0, : table.n_noise].float()
        x0 = torch.einsum("k,kb...->b...", c, noise)  # the table's first input from this noise (EDM space)
        latents = x0 / math.sqrt(float((c**2).sum())) * ts.init_noise_sigma
        ts.set_noise(noise if table.n_noise > 1 else None)
        out = run_sd3(sd3, scale, latents=latents)
        if table.n_noise == 1:
            noise = (latents / ts.init_noise_sigma * np.sign(float(c[0])))[None]
        with torch.no_grad():
            ref = sample(table, sd3_denoiser(sd3, scale), noise)
    finally:
        sd3.scheduler = base
    assert out.shape == SHAPE
    assert rel(out, ref) < TOL, rel(out, ref)


def test_sd3_stochastic_noise_follows_the_latents(sd3):
    """SD3 hands step no generator: the extra noise of sample b comes from a CPU generator seeded with the SHA-256 of
    its initial latents, so the image is a function of the pipeline's generator (through its latents), the same with
    the same latents, different with different ones, and equal to the executor with that noise."""
    table = tables(sd3.scheduler.config)["mixed"]
    base = sd3.scheduler
    sd3.scheduler = TableScheduler.from_table(table, base.config)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    try:
        out = run_sd3(sd3, 7.5, generator=torch.Generator().manual_seed(2))
        again = run_sd3(sd3, 7.5, latents=latents.clone())
        changed = latents.clone()
        changed[1] = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(3))
        other = run_sd3(sd3, 7.5, latents=changed)
        u = latents / sd3.scheduler.init_noise_sigma
        e = []
        for b in range(SHAPE[0]):
            seed = int.from_bytes(hashlib.sha256(latents[b].contiguous().numpy().tobytes()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed & (2**63 - 1))
            draws = [torch.randn(SHAPE[1:], generator=gen)[None] for _ in range(2 * table.n_noise)]
            e.append(first_row_noise(table, u[b: b + 1], draws))
        with torch.no_grad():
            ref = sample(table, sd3_denoiser(sd3, 7.5), torch.cat(e, dim=1))
    finally:
        sd3.scheduler = base
    assert torch.equal(out, again)
    assert rel(other[0], out[0]) < TOL and rel(other[1], out[1]) > 0.01  # each sample's noise follows its own latents
    assert rel(out, ref) < TOL, rel(out, ref)


def test_sd3_peer_flow_match_euler(sd3):
    """Peer: an Euler table on FlowMatchEulerDiscreteScheduler's own (shifted) times, sigma = t / (1 - t), gives the
    stock scheduler's latents in the same pipeline: the flow conventions (x_t = x / (1 + sigma), timestep t * 1000,
    velocity n - x0) are diffusers' own."""
    stock = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    raw = np.linspace(0.97, 0.1, 5)
    stock.set_timesteps(sigmas=raw)
    t = stock.sigmas[:-1].double()
    table = baselines.build("euler", 5, sigmas=(t / (1 - t)).tolist())
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    base = sd3.scheduler
    try:
        sd3.scheduler = stock
        with torch.no_grad():
            ref = sd3(PROMPTS, sigmas=raw, guidance_scale=7.5, output_type="latent", latents=latents,
                      max_sequence_length=MAX_TOKENS).images
        sd3.scheduler = TableScheduler.from_table(table, base.config)
        ours = run_sd3(sd3, 7.5, latents=latents)
    finally:
        sd3.scheduler = base
    print(f"SD3 euler table vs FlowMatchEulerDiscreteScheduler: max rel {rel(ours, ref):.2e}")
    assert rel(ours, ref) < 1e-5, rel(ours, ref)


def test_sd3_decoded_image(sd3):
    table = tables(sd3.scheduler.config)["dpmpp_2m"]
    base = sd3.scheduler
    sd3.scheduler = TableScheduler.from_table(table, base.config)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    try:
        with torch.no_grad():
            img = sd3(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="pt", latents=latents,
                      max_sequence_length=MAX_TOKENS).images
            lat = run_sd3(sd3, 7.5, latents=latents)
            vae = sd3.vae.config
            ref = (sd3.vae.decode(lat / vae.scaling_factor + vae.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    finally:
        sd3.scheduler = base
    assert float((img - ref).abs().max()) < 1e-5


# --- the flow schedule and the scheduler's attributes ------------------------------------------------------------
def test_flow_schedule_in_sigma_space():
    """A FlowMatchEuler config has no betas: alphas_cumprod_of refuses it (it used to build DDPM's linear betas), and
    flow_sigmas_of gives the stock scheduler's own training times (shifted) as sigma = t / (1 - t)."""
    for shift in (1.0, 3.0):
        stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s = flow_sigmas_of(stock.config)
        t = stock.sigmas.double().flip(0)[:-1]  # increasing, without t = 1 (sigma infinite)
        assert torch.allclose(s / (1 + s), t, rtol=1e-6, atol=0)
        lo, hi = sigma_range(stock.config)
        assert lo == pytest.approx(float(t[0] / (1 - t[0])), rel=1e-6) and hi == pytest.approx(float(s[-1]))
    with pytest.raises(ValueError, match="flow-matching schedule .* has no alphas_cumprod"):
        alphas_cumprod_of(stock.config)
    dynamic = flow_sigmas_of({**stock.config, "use_dynamic_shifting": True})  # shift applied at sampling time
    assert float(dynamic[0]) == pytest.approx(1 / 999)
    with pytest.raises(ValueError, match="invert_sigmas=true"):
        flow_sigmas_of({**stock.config, "invert_sigmas": True})
    with pytest.raises(ValueError, match="shift must be a positive finite number, got -1"):
        TableScheduler.from_table(baselines.build("euler", 3), {**stock.config, "shift": -1})
    sd_lo, sd_hi = sigma_range({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert sd_lo == pytest.approx(0.029168, rel=1e-4) and sd_hi == pytest.approx(14.6146, rel=1e-4)


def test_flow_scheduler_attributes_and_round_trip(sd3, tmp_path):
    """What the pipelines read: timesteps t * 1000 (fractional), sigmas = the flow times then 0, order 1,
    init_noise_sigma; custom sigmas/timesteps are refused through retrieve_timesteps, mu is accepted; the flow mode
    survives save_pretrained / from_pretrained."""
    table = tables(sd3.scheduler.config)["dpmpp_2m"]
    ts = TableScheduler.from_table(table, sd3.scheduler.config)
    s = table.sigmas.float()
    assert ts.config.prediction_type == "flow_prediction" and ts.order == 1 and ts.config.shift == 3.0
    assert torch.equal(ts.timesteps, s / (1 + s) * 1000)
    assert torch.equal(ts.sigmas, torch.cat([s / (1 + s), torch.zeros(1)]))
    assert ts.init_noise_sigma == pytest.approx(float(table.coef[0, 0]) / (1 + float(table.sigmas[0])))
    ts.set_timesteps(4, mu=0.7)
    ts.save_pretrained(tmp_path / "sched")
    back = TableScheduler.from_pretrained(tmp_path / "sched")
    assert back.config.prediction_type == "flow_prediction" and torch.equal(back.timesteps, ts.timesteps)
    assert json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())["shift"] == 3.0
    base = sd3.scheduler
    sd3.scheduler = ts
    try:
        with pytest.raises(ValueError, match="custom sigmas cannot be used; the table fixes its 4 evaluations"):
            sd3(PROMPTS, sigmas=[0.9, 0.5, 0.2, 0.1], output_type="latent", max_sequence_length=MAX_TOKENS)
    finally:
        sd3.scheduler = base
    with pytest.raises(ValueError, match="quantize .* flow-matching model"):
        TableScheduler.from_table(table, sd3.scheduler.config, quantize=True)
    low = baselines.build("euler", 3, sigma_min=1e-4, sigma_max=10.0)
    with pytest.raises(ValueError, match=r"sigma 0.0001 \(evaluation 2\) is outside this flow-matching schedule's "
                                         r"range \[sigma_min, inf\) = \[0.003003"):
        TableScheduler.from_table(low, sd3.scheduler.config)
    assert TableScheduler.from_table(baselines.build("euler", 3, sigma_min=0.01, sigma_max=5e4),
                                     sd3.scheduler.config).nfe == 3  # above the grid: t = 1 is trained


def test_flow_add_noise_is_the_flow_forward_process(sd3):
    ts = TableScheduler.from_table(tables(sd3.scheduler.config)["dpmpp_2m"], sd3.scheduler.config)
    x0, n = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([250.0, 1000.0])
    want = (1 - t / 1000).reshape(-1, 1, 1, 1) * x0 + (t / 1000).reshape(-1, 1, 1, 1) * n
    assert torch.allclose(ts.add_noise(x0, n, t), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(ts.scale_noise(x0, t, n), ts.add_noise(x0, n, t))
    with pytest.raises(ValueError, match=r"timestep 1001 is outside the valid range \[0, 1000\]"):
        ts.add_noise(x0, n, torch.tensor([1001.0]))


def test_guidance_batch_must_be_combined_and_noise_must_fit(sd3):
    """A loop that forgets to combine the guided halves gets one sentence naming the batches; set_noise of another
    batch than the pipeline's is refused at the first step."""
    table = tables(sd3.scheduler.config)["mixed"]
    ts = TableScheduler.from_table(table, sd3.scheduler.config)
    ts.set_timesteps(4)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model_output has batch 4 but sample has batch 2; apply classifier-free "
                                         "guidance before step()"):
        ts.step(torch.randn(4, *SHAPE[1:]), ts.timesteps[0], x)
    base = sd3.scheduler
    sd3.scheduler = ts
    ts.set_noise(make_noise(table, SHAPE[1:], range(3)))
    try:
        with pytest.raises(ValueError, match=r"set_noise gave noise of shape \(2, 3, 4, 8, 8\), but the sample has "
                                             r"shape \(2, 4, 8, 8\)"):
            run_sd3(sd3, 7.5, latents=x)
    finally:
        sd3.scheduler = base


def test_scale_model_input_is_the_identity_on_doubled_batches():
    """Stock pipelines call scale_model_input on [latents, latents]; for every table (TADA's first row included) it
    returns its input, so no noise has to be drawn before step."""
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    lo, hi = sigma_range(config)
    ts = TableScheduler.from_table(baselines.build("tada", 4, sigma_min=lo, sigma_max=hi), config)
    ts.set_timesteps(4)
    x = torch.randn(4, 4, 8, 8)
    assert ts.scale_model_input(x, ts.timesteps[0]) is x
