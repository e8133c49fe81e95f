"""PaGoDA (optimize.methods.pagoda, samplers.nets.PaGoDAGenerator): latents by the teacher's ODE run up decode back to the
images, the base generator starts as the teacher's raw output at sigma_max, a grown stage starts as the
nearest-upsampled smaller generator, frozen weights stay put, lambda stays in [0.01, 10], a generator whose output is
larger than its noise is served by the unchanged runtime, and bad configs are one error line."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from optimize.methods import pagoda
from optimize.data import gmm_model
from optimize.training.runs import ticks
from samplers import SolverTable, make_noise, sample
from samplers.nets import build_net, load_denoiser, load_net, output_shape, save_net

ROOT = Path(__file__).resolve().parents[1]
TEACHER8 = ROOT / "checkpoints" / "edm-patches8.safetensors"
TINY = {"arch": "unet", "in_channels": 3, "resolution": 8, "channels": 8, "channel_mult": [1, 2], "emb_dim": 16,
        "groups": 4, "precond": "edm", "sigma_data": 0.5}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A randomly initialised 8x8 RGB U-Net saved as a teacher network file."""
    torch.manual_seed(0)
    net = build_net({k: v for k, v in TINY.items() if k not in ("precond", "sigma_data")})
    with torch.no_grad():  # the output head starts random too, so the raw output is not trivially zero
        net.conv_out.weight.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_net(net, TINY, str(path))
    return path


def _module(teacher: Path, stages: int = 3, steps: int = 2, growth=(8, 8), base_steps: int | None = None) -> pagoda.PaGoDAModule:
    net, config = load_net(str(teacher))
    cfg = pagoda.generator_config(config, list(growth)[: stages - 1], 1, (3, 8, 8))
    return pagoda.PaGoDAModule(cfg, stages=stages, steps=steps, base_steps=base_steps, batch_size=4, d_channels=8,
                               ema_decay=0.5).init_from(net)


def _pairs(n: int = 8, stages: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    z = 80.0 * torch.randn(n, 3, 8, 8, generator=gen)
    high = torch.rand(n, 3, 8 * 2 ** (stages - 1), 8 * 2 ** (stages - 1), generator=gen) * 2 - 1
    return z, [pagoda.area_downsample(high, 8 * 2**k) for k in range(stages)]


def _fit(module: pagoda.PaGoDAModule, iterations: int) -> None:
    trainer = L.Trainer(max_steps=2 * iterations, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ticks())


# --- stage 1: latents --------------------------------------------------------------------------------------------
def test_encode_table_runs_heun_up_from_the_image() -> None:
    table = pagoda.encode_table(40, 0.002, 80.0)
    sig = table.sigmas.numpy()
    assert table.nfe == 77 and np.all(np.diff(sig) >= 0) and sig[0] == pytest.approx(0.002) and sig[-1] < 80.0
    assert table.coef[0, 0] == 1.0 and np.count_nonzero(table.coef[:, 0].numpy()) == 1  # x_0 = e_0: the image


def test_latents_decode_back_to_the_images_exact_denoiser() -> None:
    """The analytic mixture's exact denoiser: the round trip image -> latent -> image only has solver error."""
    gmm = gmm_model((3, 8, 8), components=4, seed=0)
    x = gmm.sample(16, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    z = pagoda.encode(gmm, x, steps=40)
    assert float(z.std()) > 40  # at sigma_max = 80 the latent is mostly noise
    back = pagoda.decode(gmm, z, steps=40)
    assert float((back - x).pow(2).mean().sqrt()) < 0.02 * float(x.std())


@pytest.mark.skipif(not TEACHER8.is_file(), reason="checkpoints/edm-patches8.safetensors not trained")
def test_latents_of_the_patches8_teacher_decode_back_to_the_8x8_patches() -> None:
    from optimize.data import patches

    teacher = load_denoiser(str(TEACHER8))
    x = patches("train", 8, seed=0, resolution=8)
    z = pagoda.encode(teacher, x, steps=40)
    back = pagoda.decode(teacher, z, steps=40)
    rmse = float((back - x).pow(2).mean().sqrt())
    assert rmse < 0.05, rmse  # the patches' std is about 0.5


# --- the generator -----------------------------------------------------------------------------------------------
def test_stage2_init_is_the_teachers_raw_output_at_sigma_max(tiny_teacher: Path) -> None:
    module = _module(tiny_teacher)
    net, _ = load_net(str(tiny_teacher))
    z = 80.0 * torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        raw = net(z / math.sqrt(80.0**2 + 0.25), torch.full((4,), math.log(80.0) / 4))
        torch.testing.assert_close(module.generate(z, 0), raw)
        torch.testing.assert_close(module.generate(z, 0, ema=True), raw)
        # ... which is the teacher's denoiser at sigma_max divided by c_out (c_skip is 0.5^2/(80^2+0.5^2) there)
        s, sd = 80.0, 0.5
        den = load_denoiser(str(tiny_teacher))(z, torch.full((4,), s))
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        torch.testing.assert_close(raw, (den - c_skip * z) / c_out, atol=1e-4, rtol=1e-4)


def test_grown_generator_at_init_is_the_nearest_upsampled_previous_stage(tiny_teacher: Path) -> None:
    module = _module(tiny_teacher)
    z = 80.0 * torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for p in module.generator.parameters():  # a base that is not the teacher any more
            p.add_(0.01 * torch.randn_like(p)) if p.ndim > 1 and p.abs().sum() > 0 else None
        y8, y16, y32 = (module.generate(z, k) for k in range(3))
    assert y16.shape == (4, 3, 16, 16) and y32.shape == (4, 3, 32, 32)
    torch.testing.assert_close(y16, F.interpolate(y8, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(y32, F.interpolate(y8, scale_factor=4.0, mode="nearest"))
    assert output_shape(module.config) == (3, 32, 32)


def test_frozen_weights_do_not_move_and_the_new_stage_trains(tiny_teacher: Path) -> None:
    module = _module(tiny_teacher, stages=2, steps=3, base_steps=2)
    module.attach(*_pairs(stages=2), pagoda.FeatureDistance(None))
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Snapshot(L.Callback):  # the weights as the grown stage begins (after the 2 base steps)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if pl_module.iteration() == 2:
                seen["ema"] = {n: p.detach().clone() for n, p in pl_module.ema.named_parameters()}
                seen["gen"] = {n: p.detach().clone() for n, p in pl_module.generator.named_parameters()}

    trainer = L.Trainer(max_steps=2 * 5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[Snapshot()])
    trainer.fit(module, ticks())
    assert module.active == 1 and [h[1] for h in module.history] == [0, 0, 1, 1, 1]
    base = [n for n, _ in module.generator.named_parameters() if not n.startswith("stages.")]
    assert any(not torch.equal(seen["gen"][n], seen["ema"][n]) for n in base)  # the raw base differed from its EMA
    for n, p in module.generator.named_parameters():
        if not n.startswith("stages."):
            assert torch.equal(p, seen["ema"][n]), n  # frozen at the base's EMA weights, in the generator ...
    for n, p in module.ema.named_parameters():
        if not n.startswith("stages."):
            assert torch.equal(p, seen["ema"][n]), n  # ... and in the exported EMA
    assert any(not torch.equal(p, seen["gen"][n]) for n, p in module.generator.named_parameters() if n.startswith("stages."))


def test_history_times_each_stage(tiny_teacher: Path, tmp_path: Path) -> None:
    """Every history row ends with the training seconds so far (non-decreasing); ``stage_seconds`` splits them at the
    stage boundaries (they add up to the last row's time); a row without the time (an old checkpoint) gives None."""
    module = _module(tiny_teacher, stages=2, steps=3, base_steps=2)
    module.attach(*_pairs(stages=2), pagoda.FeatureDistance(None))
    _fit(module, 5)
    times = [h[6] for h in module.history]
    assert len(times) == 5 and times == sorted(times) and times[0] > 0
    split = pagoda.stage_seconds(module.history, 2)
    assert split == [round(times[1], 1), round(times[-1] - times[1], 1)]
    assert pagoda.stage_seconds(module.history, 3)[2] == 0.0  # a stage that never ran
    assert pagoda.stage_seconds([row[:6] for row in module.history], 2) is None
    lines = Path(pagoda.write_history([module.history[0][:6], *module.history[1:]], str(tmp_path / "h.csv"))).read_text().splitlines()
    assert lines[0].endswith(",lambda,seconds") and lines[1].endswith(",") and lines[2].endswith(f",{times[1]:.1f}")


def test_lambda_is_clipped_to_0_01_and_10() -> None:
    w = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(5, 3)
    rec = (x @ w).pow(2).mean()
    for scale, expected in ((1e6, 0.01), (1e-6, 10.0)):
        gan = scale * (x @ w).sum()
        assert float(pagoda.adaptive_weight(rec, gan, w)) == pytest.approx(expected)
    lam = float(pagoda.adaptive_weight(rec, (x @ w).mean(), w))
    assert 0.01 <= lam <= 10.0


def test_lambda_stays_in_range_during_training(tiny_teacher: Path) -> None:
    module = _module(tiny_teacher, stages=2, steps=2)
    module.attach(*_pairs(stages=2), pagoda.FeatureDistance(None))
    _fit(module, 4)
    lams = [h[5] for h in module.history]
    assert len(lams) == 4 and all(0.01 <= v <= 10.0 for v in lams)


def test_d_steps_make_that_many_discriminator_updates_per_step(tiny_teacher: Path) -> None:
    """d_steps=3: each training step makes 1 G and 3 D optimiser steps, so 4 steps take 16 of Lightning's steps and
    the stage schedule still counts training steps."""
    module = _module(tiny_teacher, stages=2, steps=2, base_steps=2)
    module.hparams.d_steps = 3
    module.attach(*_pairs(stages=2), pagoda.FeatureDistance(None))
    d_before = [p.detach().clone() for p in module.discriminators[0].parameters()]
    trainer = L.Trainer(max_steps=module.optimiser_steps() * module.total_steps(), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ticks())
    assert module.optimiser_steps() == 4 and trainer.global_step == 16
    assert [h[1] for h in module.history] == [0, 0, 1, 1] and module.iteration() == 4
    assert any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminators[0].parameters()))


def test_amplitude_term_ignores_phase_and_counts_power() -> None:
    """The amplitude L1 is 0 for a circular shift of the image (same |FFT|) while the pixel L2 is not; it grows with
    a missing high-frequency component; Parseval holds for the orthonormal FFT."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    dist = pagoda.FeatureDistance(None, pixel_weight=0.0, freq_weight=1.0)
    shifted = x.roll((3, 5), dims=(-2, -1))
    assert torch.allclose(dist(x, shifted), torch.zeros(2), atol=1e-5)
    assert float(pagoda.FeatureDistance(None)(x, shifted).min()) > 0.1
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    assert float(dist(x, blurred).min()) > 0.05
    assert torch.allclose(pagoda.amplitude(x).pow(2).sum((-2, -1)), x.pow(2).sum((-2, -1)), rtol=1e-5)


def test_high_frequency_share_against_sinusoids() -> None:
    """A cosine of 3 cycles per image has no power beyond the 8x8 Nyquist (4 cycles); one of 6 cycles has all of it;
    their sum with equal amplitudes has half; the mean is ignored; nearest upsampling of an 8x8 image adds power there."""
    n = torch.arange(32, dtype=torch.float64)
    low = torch.cos(2 * math.pi * 3 * n / 32)[None, None, None, :].expand(1, 3, 32, 32)
    high = torch.cos(2 * math.pi * 6 * n / 32)[:, None].expand(32, 32)[None, None].expand(1, 3, 32, 32)
    share = pagoda.high_frequency_share(torch.cat([low + 5, high, low + high]), 8)
    assert torch.allclose(share, torch.tensor([0.0, 1.0, 0.5], dtype=share.dtype), atol=1e-9)
    small = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(pagoda.high_frequency_share(F.interpolate(small, scale_factor=4, mode="nearest"), 8).min()) > 0.01
    assert float(pagoda.high_frequency_share(F.interpolate(small, scale_factor=4, mode="bilinear"), 8).max()) < \
        float(pagoda.high_frequency_share(F.interpolate(small, scale_factor=4, mode="nearest"), 8).min())


# --- the runtime serves a generator whose output is larger than its noise ---------------------------------------
def test_executor_refuses_to_mix_shapes_in_a_row() -> None:
    from samplers import baselines

    table = baselines.build("euler", 2, sigma_min=0.002, sigma_max=80.0)  # row 1 mixes x_0 and d_0
    up = lambda x, s: F.interpolate(x, scale_factor=2.0, mode="nearest")  # noqa: E731
    with pytest.raises(ValueError, match="different shapes"):
        sample(table, up, make_noise(table, (3, 8, 8), range(2)))


# --- the command ---------------------------------------------------------------------------------------------------
def _fast(teacher: Path, tmp_path: Path) -> list[str]:
    return ["model=patches8", f"model.checkpoint={teacher}", "stages=2", "data_resolution=16", "growth=[8]", "stage_blocks=1",
            "n_data=4", "base_steps=2", "encode_steps=3", "data_batch_size=8", "batch_size=4", "d_channels=8", "evaluate_at_end=false",
            "progress_bar=false", "checkpoint_every=1", "num_threads=1", f"data_cache_dir={tmp_path / 'cache'}"]


def test_command_exports_every_resolution_served_by_samplers_generate(tiny_teacher: Path, tmp_path: Path) -> None:
    from optimize.cli import main
    from optimize.evaluation.results import read_results
    from samplers.nets import read_net_header

    from safetensors.torch import load_file

    run, again = tmp_path / "run", tmp_path / "again"
    main(["pagoda", *_fast(tiny_teacher, tmp_path), "steps=2", f"hydra.run.dir={run}", "evaluate_at_end=true", "n=16",
          "eval_batch_size=16", "baseline_nfe=3"])
    rows = {r["method"]: r for r in read_results(str(run / "results.csv"))}
    assert set(rows) == {"pagoda8", "pagoda16", "patches8-dpmpp_2m@3-bicubic16"}
    for key in ("fd_train_main", "fd_heldout_b", "kid_train_b"):  # both feature nets, paired with the upsampled teacher
        assert rows["pagoda16"][f"d{key}_vs_upsampled"] == pytest.approx(rows["pagoda16"][key] - rows["patches8-dpmpp_2m@3-bicubic16"][key])
    assert (run / "grid-pagoda16.png").is_file() and (run / "grid-upsampled16.png").is_file()
    # resumed from the checkpoint after 3 of the 4 steps (3 optimiser steps each: G and d_steps=2 D), it ends with the same weights
    main(["pagoda", *_fast(tiny_teacher, tmp_path), "steps=2", f"resume={run / 'lightning' / 'step-000009.ckpt'}",
          f"hydra.run.dir={again}"])
    assert len(list((tmp_path / "cache").glob("pagoda-*.safetensors"))) == 1
    a, b = (load_file(str(d / "pagoda-patches16.safetensors")) for d in (run, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[line.rsplit(",", 1)[0] for line in (d / "pagoda-patches8-loss.csv").read_text().splitlines()] for d in (run, again)]
    assert losses[0] == losses[1]  # the same history but its last column, the wall-clock seconds
    times = [float(line.rsplit(",", 1)[1]) for line in (again / "pagoda-patches8-loss.csv").read_text().splitlines()[1:]]
    assert times == sorted(times)  # the resumed run's clock goes on from the checkpoint's
    assert (run / "pagoda-patches8-loss.csv").is_file()
    # grown from that run's base (base_steps=0): the base is kept as given, only the 16x16 stage trains
    grow = tmp_path / "grow"
    main(["pagoda", *_fast(tiny_teacher, tmp_path), "steps=2", "base_steps=0", f"base_generator={run / 'pagoda-patches8.safetensors'}",
          f"hydra.run.dir={grow}"])
    base, kept = (load_file(str(d / "pagoda-patches8.safetensors")) for d in (run, grow))
    assert base.keys() == kept.keys() and all(torch.equal(base[k], kept[k]) for k in base)
    top = load_file(str(grow / "pagoda-patches16.safetensors"))
    assert all(torch.equal(top[k], kept[k]) for k in kept) and not all(torch.equal(top[k], a[k]) for k in top)
    assert read_net_header(str(grow / "pagoda-patches16.safetensors"))[1]["base_generator"] == str(run / "pagoda-patches8.safetensors")
    for r in (8, 16):
        config, meta = read_net_header(str(run / f"pagoda-patches{r}.safetensors"))
        assert config["arch"] == "pagoda_generator" and config["precond"] == "input" and meta["resolution"] == r
        assert meta["steps"] == 2
    gen_path, table_path = run / "pagoda-patches16.safetensors", run / "pagoda-patches16-1nfe.safetensors"
    den = load_denoiser(str(gen_path))
    assert den.shape == (3, 8, 8) and den.out_shape == (3, 16, 16)
    table = SolverTable.load(str(table_path), fingerprint=den.fingerprint())
    with torch.no_grad():
        x = sample(table, den, make_noise(table, den.shape, range(3)))
    assert x.shape == (3, 3, 16, 16)
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(table_path), "--model",
                           f"edm:{gen_path}", "--n", "3", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    arr = np.load(out / "samples.npz")["samples"]
    np.testing.assert_allclose(arr.reshape(3, 3, 16, 16), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("downsample", pagoda.D_DOWNSAMPLE)
def test_discriminator_shapes_and_one_logit_per_image(downsample: str) -> None:
    for res in (8, 16, 32):
        d = pagoda.Discriminator(res, 3, 8, downsample=downsample)
        assert d(torch.randn(5, 3, res, res)).shape == (5,)
    with pytest.raises(ValueError, match="downsample must be one of"):
        pagoda.Discriminator(8, downsample="max")


@pytest.mark.parametrize("args, message", [
    (["stages=0"], r"stages must be a positive integer"),
    (["data_resolution=4"], r"data_resolution \(4\) is below the teacher's resolution \(8\)"),
    (["stages=4"], r"stages=4 grows the 8x8 teacher to 64x64, beyond data_resolution 32"),
    (["growth=[16]"], r"growth must list a positive channel count for each of the 2 grown stages"),
    (["model=edm"], r"pagoda trains on the patches data set"),
    (["d_lr=0"], r"d_lr must be a positive number"),
    (["d_downsample=max"], r"d_downsample must be one of strided, pool, got 'max'"),
    (["d_steps=0"], r"d_steps must be"),
    (["freq_weight=-1"], r"freq_weight"),
    (["rec_features=null", "pixel_weight=0", "freq_weight=0"], r"leave no reconstruction loss"),
    (["base_steps=0"], r"base_steps=0 leaves the teacher's raw output at sigma_max as the base"),
    (["base_generator=nowhere.safetensors"], r"base_generator .*nowhere.safetensors does not exist"),
    (["base_generator=checkpoints/edm-patches8.safetensors"], r"holds a 'unet' network; expected a PaGoDA generator file"),
    (["base_generator=checkpoints/pagoda-patches8.safetensors"], r"was not grown from this teacher"),
    (["base_generator=README.md"], r"base_generator .*README.md is not a network file"),
])
def test_bad_config_is_one_error_line(args: list[str], message: str, tiny_teacher: Path, cli_error) -> None:
    import re

    err = cli_error(["pagoda", *args] if "model=edm" in args else ["pagoda", "model=patches8", f"model.checkpoint={tiny_teacher}", *args])
    assert re.search(message, err), err


def test_bad_rec_features_and_teacher_files_are_one_error_line(tiny_teacher: Path, tmp_path: Path, cli_error) -> None:
    """rec_features must be a patch_cnn feature-net file: a pickle is refused unread (a planted one would leave a
    marker), a table or another feature net is named; a 1-channel teacher is refused before any work."""
    import pickle

    from samplers import baselines

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    baselines.build("euler", 4).save(str(tmp_path / "table.safetensors"))
    base = ["pagoda", "model=patches8", f"model.checkpoint={tiny_teacher}", f"hydra.run.dir={tmp_path / 'run'}"]
    for path, message in [(tmp_path / "evil.pkl", r"is not a safetensors feature-net file .*pickles are never loaded"),
                          (tmp_path / "table.safetensors", r"is not a feature-net file \(format 'samplers.table'\)"),
                          (ROOT / "checkpoints" / "classifier-digits.safetensors", r"holds a 'cnn' feature net"),
                          (tmp_path / "missing.safetensors", r"rec_features .*missing.safetensors does not exist")]:
        err = cli_error([*base, f"rec_features={path}"])
        assert re.search(message, err) and "patch_cnn" in err, err
    assert not marker.exists()
    err = cli_error(["pagoda", "model=patches8", f"model.checkpoint={ROOT / 'checkpoints' / 'edm-digits.safetensors'}"])
    assert "pagoda grows a teacher of the RGB patches (3 channels)" in err and "takes 1 channel(s)" in err, err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.safetensors"))
