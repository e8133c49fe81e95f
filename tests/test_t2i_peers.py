"""The text-to-image peers of docs/results-t2i.md (optimize.evaluation.t2i): every stock scheduler configuration spends
exactly the NFE it is reported at inside the stock pipeline, Align Your Steps at 10 steps is the published list, and
the distance / paired statistics match their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tiny_t2i import save_tiny_sd, save_tiny_sd3  # noqa: E402

from optimize.evaluation import metrics, t2i  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-peers")
    return {"sd": t2i.pipeline(save_tiny_sd(root / "sd")), "sd3": t2i.pipeline(save_tiny_sd3(root / "sd3"))}


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("nfe", [3, 5])
def test_every_stock_peer_spends_exactly_its_nfe(pipes, kind: str, nfe: int) -> None:
    pipe = pipes[kind]
    latents = torch.randn(2, *t2i.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    peers = t2i.stock_schedulers(pipe)
    assert ("AYS (DPM++2M)" in peers and "DDIM trailing" in peers) if kind == "sd" else ("FlowMatchEuler" in peers)
    for label, make in peers.items():
        sched, call = make(nfe)
        x, calls = t2i.pipeline_images(pipe, sched, ["a red seven", "a blue two"], latents, 3.0, 2, **call)
        assert calls == nfe, label
        assert x.shape[0] == 2 and bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0


def test_ddim_peers_do_not_clip_the_predicted_latents(pipes) -> None:
    """Both DDIM peers predict x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) unclipped, as SD 1.5's config (clip_sample
    false) makes them: DDIM's default clips x0 to [-1, 1], which on latents far outside it ruins every sample."""
    peers = t2i.stock_schedulers(pipes["sd"])
    g = torch.Generator().manual_seed(1)
    x, eps = 5 * torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    for label in ("DDIM", "DDIM trailing"):
        sched, call = peers[label](4)
        sched.set_timesteps(call["num_inference_steps"])
        t = int(sched.timesteps[1])
        abar = sched.alphas_cumprod[t].double()
        x0 = sched.step(eps, t, x).pred_original_sample.double()
        expected = (x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
        assert float(expected.abs().max()) > 2, label
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)


def test_align_your_steps_at_ten_is_the_published_list() -> None:
    """At 10 steps on SD's betas the AYS timesteps are diffusers' AysSchedules["StableDiffusionTimesteps"]; other step
    counts interpolate log-linearly (ComfyUI) and keep the end points."""
    from diffusers.schedulers import AysSchedules

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    assert t2i.ays_timesteps(10, config) == list(AysSchedules["StableDiffusionTimesteps"])
    s4 = t2i.ays_sigmas(4)
    assert len(s4) == 5 and s4[0] == pytest.approx(t2i.AYS_SD1[0]) and s4[-1] == 0.0
    inner = np.exp(np.interp(0.75, np.linspace(0, 1, 11), np.log(t2i.AYS_SD1)))  # log-linear at 3/4 of the way
    assert s4[-2] == pytest.approx(inner) and bool(np.all(np.diff(s4) < 0))


def test_distance_and_paired_mean_against_their_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    ref, x = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    d = metrics.distance(x, ref)
    per = [math.sqrt(float(((x[i] - ref[i]) ** 2).mean())) for i in range(6)]
    assert d["rmse"] == pytest.approx(np.mean(per)) and d["rmse_se"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(6))
    assert d["psnr"] == pytest.approx(np.mean([10 * math.log10(4 / p**2) for p in per]))
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 2.5, 3.0])
    m, se = metrics.paired_mean(a, b)
    assert m == pytest.approx(1 / 3) and se == pytest.approx(np.std([0.5, -0.5, 1.0], ddof=1) / math.sqrt(3))


def test_reference_reuses_the_prefix_of_a_longer_cached_run_and_nothing_else(tmp_path) -> None:
    """n = 2 reads the first two images of a cached n = 4 reference when its latents and prompts start with the
    same ones; other latents are not served from it (the pipeline would be run: here a None pipe fails)."""
    from safetensors.torch import save_file

    prompts = ["a red 3", "a blue 7", "a green 1", "a red 0"]
    latents, images = torch.randn(4, 4, 8, 8), torch.rand(4, 3, 32, 32)
    hashes = torch.tensor([t2i.prompt_hash(p) for p in prompts])
    save_file({"images": images, "latents": latents, "prompts": hashes},
              str(tmp_path / f"tiny-w7.5-n4-steps{t2i.REFERENCE_STEPS}.safetensors"))
    got = t2i.reference_images(None, "tiny", prompts[:2], latents[:2], 7.5, 2, tmp_path)
    assert torch.equal(got, images[:2])
    with pytest.raises(AttributeError):
        t2i.reference_images(None, "tiny", prompts[:2], latents[1:3], 7.5, 2, tmp_path)


def test_reference_extends_a_shorter_cached_run_running_only_the_missing_samples(tmp_path, monkeypatch) -> None:
    """n = 4 after a cached n = 2 with the same start: the pipeline runs samples 2..3 only, and the n = 4 file then
    serves both lengths; a cached run whose start differs is not extended."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    prompts = ["a red 3", "a blue 7", "a green 1", "a red 0"]
    latents, images = torch.randn(4, 4, 8, 8), torch.rand(4, 3, 32, 32)
    hashes = torch.tensor([t2i.prompt_hash(p) for p in prompts])
    save_file({"images": images[:2], "latents": latents[:2], "prompts": hashes[:2]},
              str(tmp_path / f"tiny-w7.5-n2-steps{t2i.REFERENCE_STEPS}.safetensors"))
    save_file({"images": images[:3] + 5, "latents": latents[:3] + 1, "prompts": hashes[:3]},  # another start
              str(tmp_path / f"tiny-w7.5-n3-steps{t2i.REFERENCE_STEPS}.safetensors"))
    ran = []

    def fake_pipeline(pipe, scheduler, p, lat, guidance, batch, **call):
        ran.append((list(p), lat.clone()))
        return images[len(prompts) - len(p):], 1

    class Scheduler:
        config: dict = {}

        @classmethod
        def from_config(cls, config):
            return cls()

    monkeypatch.setattr(t2i, "pipeline_images", fake_pipeline)
    got = t2i.reference_images(SimpleNamespace(scheduler=Scheduler()), "tiny", prompts, latents, 7.5, 2, tmp_path)
    assert torch.equal(got, images)
    assert len(ran) == 1 and ran[0][0] == prompts[2:] and torch.equal(ran[0][1], latents[2:])
    assert torch.equal(t2i.reference_images(None, "tiny", prompts[:3], latents[:3], 7.5, 2, tmp_path), images[:3])
    assert len(ran) == 1
