"""DSNO (optimize.methods.dsno, samplers.nets.DSNOUNet): the student starts as the teacher (temporal_init=zero) or near
it (random), zero temporal weights still get a gradient, the shipped student loads unchanged, the temporal layer's
algebra, the [B*M] layout, data from the executor's callback, the loss weightings against hand computations, a short
run that overfits, export served by the unchanged runtime, resume, NaN stop and bad configs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from optimize.methods import dsno
from optimize.cli import main
from optimize.training.runs import NaNLossError, ticks
from optimize.evaluation.results import read_results
from samplers import SolverTable, make_noise, sample
from samplers.denoisers import EDMPrecond
from samplers.nets import DSNOUNet, SpectralConv1d, TemporalBlock, load_denoiser, load_net, read_net_header

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "checkpoints" / "edm-digits.safetensors"
SIGMAS = dsno.output_sigmas(4, 0.002, 80.0)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def teacher() -> tuple[torch.nn.Module, dict]:
    return load_net(str(TEACHER))


def _student(teacher, sigmas=SIGMAS, modes=2, temporal=True, init="random") -> DSNOUNet:
    net, cfg = teacher
    return dsno.make_student(net, dsno.student_config(cfg, sigmas, modes, temporal, (1, 8, 8)), init).eval()


# --- the student starts as the teacher ------------------------------------------------------------
def test_zero_init_student_is_the_teacher_denoiser_and_random_init_is_near_it(teacher) -> None:
    torch.manual_seed(0)
    student = _student(teacher, init="zero")
    assert all(not p.any() for p in student.temporal.parameters())
    den = EDMPrecond(teacher[0])
    x = 3.0 * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    near = _student(teacher)  # the default: temporal weights uniform in [0, 1/C^2)
    with torch.no_grad():
        for m, s in enumerate(SIGMAS):  # an input at noise level sigma_m: slice m is exactly D_teacher(x, sigma_m)
            got = dsno.trajectory(student, x, s)[:, m]
            torch.testing.assert_close(got, den(x, s), atol=1e-5, rtol=1e-5)
            gap = (dsno.trajectory(near, x, s)[:, m] - got).abs().max().item()
            assert gap < 0.02 and (gap > 1e-4 or m == len(SIGMAS) - 1), (m, gap)  # sigma_min: c_out ~ 0.002
        # served: EDMPrecond(student) at sigma_max is the last slice of the trajectory at sigma_max
        torch.testing.assert_close(EDMPrecond(student)(x, 80.0), dsno.trajectory(student, x, 80.0)[:, -1])
        e = 80.0 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # the served input
        assert 1e-3 < (dsno.trajectory(near, e, 80.0) - dsno.trajectory(student, e, 80.0)).abs().max() < 0.05
    for block in near.temporal:
        w, c = block.conv.weight, block.conv.weight.shape[0]
        assert w.min() >= 0 and 0.5 / c**2 < w.max() < 1 / c**2  # uniform in [0, 1/C^2), not zero
    # the same random draws either way: zeroing happens after the build, so nothing else in the run moves
    torch.testing.assert_close(dict(near.named_parameters())["conv_in.weight"], dict(student.named_parameters())["conv_in.weight"])
    with pytest.raises(ValueError, match="temporal_init must be one of random, zero"):
        _student(teacher, init="ones")


def test_zero_temporal_weights_still_get_a_gradient() -> None:
    """At W = 0 the block is the identity and dL/dW = 0.01 (LeakyReLU's slope at 0 in PyTorch) times the gradient of
    the linear layer irfft(W rfft(h)) alone: nonzero, so zero init does not block learning."""
    gen = torch.Generator().manual_seed(2)
    h, g = torch.randn(12, 6, 2, 2, generator=gen, dtype=torch.float64), torch.randn(12, 6, 2, 2, generator=gen, dtype=torch.float64)
    block = TemporalBlock(6, modes=2, num_times=4, init_scale=0.0).double()
    assert not block.conv.weight.any()
    (block(h) * g).sum().backward()
    linear = SpectralConv1d(6, modes=2, init_scale=0.0).double()
    (linear(h.reshape(3, 4, 6, 2, 2)) * g.reshape(3, 4, 6, 2, 2)).sum().backward()
    assert linear.weight.grad.norm() > 1.0  # the linear layer's own gradient is not small
    torch.testing.assert_close(block.conv.weight.grad, 0.01 * linear.weight.grad)


def test_shipped_student_loads_and_gives_the_same_samples() -> None:
    """checkpoints/dsno-digits.safetensors (the M = 1 student shipped on 2026-12-07) loads with its stored weights (the
    shipped table's fingerprint) and gives the samples it gave when it was shipped (values recorded from that code on
    seeds 0..2); the M = 4 student shipped before it keeps its own samples under docs/results/students/nets."""
    den = load_denoiser(str(ROOT / "checkpoints" / "dsno-digits.safetensors"))
    table = SolverTable.load(str(ROOT / "checkpoints" / "tables" / "dsno-digits-1nfe.safetensors"), fingerprint=den.fingerprint())
    assert den.fingerprint() == table.metadata["model_fingerprint"] == "4abded870860361f" and table.metadata["M"] == 1
    with torch.no_grad():
        x = sample(table, den, make_noise(table, (1, 8, 8), range(3)))
    np.testing.assert_allclose(x.double().sum(dim=(1, 2, 3)).numpy(), [-25.32993899, -22.92683217, -30.45747632], atol=1e-3)
    np.testing.assert_allclose(x[0, 0, 0].numpy(), [-1.0288911, -0.99458885, -0.08966545, 1.0351394, -0.15144458,
                                                    -1.0017143, -1.0079144, -1.0115849], atol=1e-4)
    nets = ROOT / "docs" / "results" / "students" / "nets"
    old = load_denoiser(str(nets / "dsno-m4-4k.safetensors"))
    old_table = SolverTable.load(str(nets / "dsno-m4-4k-1nfe.safetensors"), fingerprint=old.fingerprint())
    assert old.fingerprint() == "d524b9eddc17bd55" and old_table.metadata["M"] == 4
    with torch.no_grad():
        y = sample(old_table, old, make_noise(old_table, (1, 8, 8), range(3)))
    np.testing.assert_allclose(y.double().sum(dim=(1, 2, 3)).numpy(), [-25.94247306, -22.91686697, -30.59723131], atol=1e-3)


def test_spectral_layer_identity_and_formula() -> None:
    h = torch.randn(3, 4, 6, 2, 2, dtype=torch.float64)
    block = TemporalBlock(6, modes=2, num_times=4).double()
    with torch.no_grad():
        block.conv.weight.zero_()
    flat = h.reshape(12, 6, 2, 2)
    assert torch.equal(block(flat), flat)  # identity at zero weights, bit for bit
    # the layer is irfft(W_k rfft(h)_k, k < modes): check against an explicit DFT
    conv = SpectralConv1d(6, modes=2).double()
    with torch.no_grad():
        conv.weight.normal_()
    w = conv.weight[..., 0] + 1j * conv.weight[..., 1]  # [C_in, C_out, modes]
    hn = h.numpy()
    t = np.arange(4)
    coeffs = [np.einsum("bmchw,m->bchw", hn, np.exp(-2j * np.pi * k * t / 4)) for k in range(2)]
    mixed = [np.einsum("bihw,io->bohw", c, w[:, :, k].detach().numpy()) for k, c in enumerate(coeffs)]
    # irfft with only modes 0, 1 of M = 4 (Hermitian: mode 1 counted twice, the imaginary part of mode 0 dropped)
    want = np.stack([(mixed[0].real + 2 * (mixed[1] * np.exp(2j * np.pi * tt / 4)).real) / 4 for tt in t], axis=1)
    np.testing.assert_allclose(conv(h).detach().numpy(), want, atol=1e-10)


def test_batch_times_layout_keeps_each_time_with_its_embedding(teacher) -> None:
    student = _student(teacher)
    with torch.no_grad():
        for p in student.temporal.parameters():
            p.normal_(std=0.05)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) / 80
    with torch.no_grad():
        full = student.trajectory(x)
        assert full.shape == (3, 4, 1, 8, 8)
        for b in range(3):  # no mixing across samples: each sample alone gives the same slices
            torch.testing.assert_close(student.trajectory(x[b:b + 1])[0], full[b], atol=1e-5, rtol=1e-5)
    # without temporal mixing, slice m is the teacher's net with the embedding of sigma_m only
    plain = _student(teacher, temporal=False)
    net = teacher[0]
    with torch.no_grad():
        out = plain.trajectory(x)
        for m, s in enumerate(SIGMAS):
            torch.testing.assert_close(out[:, m], net(x, torch.full((3,), math.log(s) / 4)), atol=1e-5, rtol=1e-5)
        reversed_net = _student(teacher, sigmas=SIGMAS[::-1], temporal=False)
        torch.testing.assert_close(reversed_net.trajectory(x).flip(1), out, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in net.parameters())


def test_times_weights_and_stored_data_come_from_the_executor(teacher) -> None:
    assert SIGMAS[-1] == 0.002 and all(a > b for a, b in zip(SIGMAS, SIGMAS[1:]))
    assert [round(s, 3) for s in SIGMAS] == [1.219, 0.414, 0.098, 0.002]  # tan(pi t/2) at t = (1 - m/4)^2
    torch.testing.assert_close(dsno.loss_weights(SIGMAS), torch.tensor([1.0, 1 / SIGMAS[1], 1 / SIGMAS[2], 500.0]))
    table, stored = dsno.data_table("dpmpp_2m", 6, 0.002, 80.0)
    for m in (1, 2, 4):
        got = [stored[i] for i in dsno.store_index(m)]
        np.testing.assert_allclose(got, dsno.output_sigmas(m, 0.002, 80.0), rtol=1e-2)
    den = EDMPrecond(teacher[0])
    data = dsno.generate(den, table, stored, [7, 8, 9], (1, 8, 8), batch_size=2, progress=False)
    e = make_noise(table, (1, 8, 8), [7, 8, 9])
    torch.testing.assert_close(data["noise"], e[0])
    with torch.no_grad():
        torch.testing.assert_close(data["x0"][:, -1], sample(table, den, e))  # the last stored point is the sample
        i = int(np.argmin(np.abs(table.sigmas.numpy() - stored[0])))
        seen = {}
        sample(table, den, e, callback=lambda j, x, d, s: seen.setdefault(j, d))
        torch.testing.assert_close(data["x0"][:, 0], seen[i])
    with pytest.raises(ValueError, match="must divide"):
        dsno.store_index(3)


def _hand_distances(module: dsno.DSNOModule, noise: torch.Tensor, x0: torch.Tensor) -> np.ndarray:
    """d_m = mean over samples and pixels of |S_m - x0_m| (l1) or its square (l2), in float64."""
    with torch.no_grad():
        diff = (dsno.trajectory(module.student, 80.0 * noise, 80.0) - x0).double().numpy()
    dist = np.abs(diff) if module.hparams.loss == "l1" else diff**2
    return dist.transpose(1, 0, 2, 3, 4).reshape(diff.shape[1], -1).mean(1)


@pytest.mark.parametrize("weighting, loss", [("snr", "l1"), ("uniform", "l1"), ("uniform", "l2"), ("normalised", "l1")])
def test_loss_weights_of_each_weighting_against_a_hand_computation(teacher, weighting: str, loss: str) -> None:
    """w_m by hand (snr: clamp(1/sigma, 1, 1e4); uniform: 1/c_out(sigma)^p; normalised: 1/s_m with s = d at the first
    step, then 0.99 s + 0.01 d), and the module's loss L = mean_m w_m d_m on two training steps."""
    sd = 0.5
    c_out = np.array([s * sd / math.sqrt(s * s + sd * sd) for s in SIGMAS])
    fixed = {"snr": np.array([min(max(1 / s, 1.0), 1e4) for s in SIGMAS]), "uniform": c_out ** -(1 if loss == "l1" else 2)}
    if weighting in fixed:
        torch.testing.assert_close(dsno.loss_weights(SIGMAS, weighting, loss, sd), torch.tensor(fixed[weighting], dtype=torch.float32))
    net, cfg = teacher
    module = dsno.DSNOModule(dsno.student_config(cfg, SIGMAS, 2, True, (1, 8, 8)), loss=loss, weighting=weighting).init_from(net)
    assert "dist_scale" in module.state_dict()  # s goes into checkpoints (exact resume)
    gen = torch.Generator().manual_seed(5)
    b0, b1 = [(torch.randn(3, 1, 8, 8, generator=gen), torch.rand(3, 4, 1, 8, 8, generator=gen) * 2 - 1) for _ in range(2)]
    batches = [b0, b1, b0]
    d = [_hand_distances(module, *b) for b in batches]
    scale = [d[0]]
    for dist in d[1:]:
        scale.append(0.99 * scale[-1] + 0.01 * dist)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for step, batch in enumerate(batches):
            w = fixed.get(weighting, 1 / scale[step])
            got = module.training_step(batch, step).item()
            assert got == pytest.approx(float(np.mean(w * d[step])), rel=1e-5), (step, got)  # normalised: 1 at step 0
            np.testing.assert_allclose(module.dist_scale.numpy(), scale[step], rtol=1e-5)  # tracked under every weighting
    np.testing.assert_allclose(module.final_weights(), fixed.get(weighting, 1 / scale[-1]), rtol=1e-5)


def test_weight_shares_and_bad_weighting() -> None:
    """At M = 4 snr and uniform (l1) put about 97% of the weight on the last slice; an unknown weighting is refused."""
    for weighting in ("snr", "uniform"):
        w = dsno.loss_weights(SIGMAS, weighting, "l1")
        assert 0.96 < float(w[-1] / w.sum()) < 0.98
    with pytest.raises(ValueError, match="weighting must be one of snr, uniform, normalised, got 'focal'"):
        dsno.loss_weights(SIGMAS, "focal")
    with pytest.raises(ValueError, match="weighting must be one of"):
        dsno.DSNOModule({"arch": "dsno_unet", "sigmas": SIGMAS}, weighting="focal")


# --- training --------------------------------------------------------------------------------------
def test_short_run_overfits_a_handful_of_trajectories(teacher) -> None:
    STEPS = 80
    torch.manual_seed(0)
    net, cfg = teacher
    sigmas = dsno.output_sigmas(2, 0.002, 80.0)
    module = dsno.DSNOModule(dsno.student_config(cfg, sigmas, 1, True, (1, 8, 8)), lr=3e-3, warmup_steps=5, steps=STEPS,
                             ema_decay=0.9).init_from(net)
    gen = torch.Generator().manual_seed(3)
    data = {"noise": torch.randn(4, 1, 8, 8, generator=gen), "x0": torch.rand(4, 2, 1, 8, 8, generator=gen) * 2 - 1}
    module.attach_data(data, [0, 1], batch_size=4)
    with torch.no_grad():
        before = module.losses(data["noise"], data["x0"])[0].item()
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ticks())
    with torch.no_grad():
        after = module.losses(data["noise"], data["x0"])[0].item()
        ema = (module(data["noise"], ema=True) - data["x0"]).abs().flatten(2).mean(-1).mean(0)
    assert after < 0.2 * before, (before, after)
    assert (module.weights * ema).mean() < 0.3 * before  # the exported (EMA) weights fit too
    assert len(module.history) == STEPS


def test_nan_loss_stops_with_a_sentence(teacher) -> None:
    module = dsno.DSNOModule(dsno.student_config(teacher[1], SIGMAS, 2, True, (1, 8, 8)))
    bad = torch.full((2, 4, 1, 8, 8), float("nan"))
    with pytest.raises(NaNLossError, match="non-finite loss"):
        module.training_step((torch.randn(2, 1, 8, 8), bad), 0)


# --- command: export round trip, resume, bad configs ------------------------------------------------
FAST = ["model=edm", "n_data=16", "data_steps=4", "data_batch_size=16", "batch_size=8", "M=2", "modes=1",
        "evaluate_at_end=false", "progress_bar=false", "checkpoint_every=1", "warmup_steps=1"]


def test_export_round_trip_served_by_samplers_generate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*FAST, f"data_cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
    main(["dsno", *common, "steps=2"])
    student_path, table_path = run / "dsno-edm.safetensors", run / "dsno-edm-1nfe.safetensors"
    assert (run / "dsno-edm-loss.png").is_file() and (run / "logs" / "metrics.csv").is_file()
    assert len(list((tmp_path / "cache").glob("dsno-*.safetensors"))) == 1
    # resume continues from the checkpoint to the new step count (data from the cache)
    main(["dsno", *common, "steps=3", f"resume={run}"])
    config, meta = read_net_header(str(student_path))
    assert meta["global_step"] == 3 and config["arch"] == "dsno_unet" and len(config["sigmas"]) == 2
    assert meta["train_seconds"] > 0  # includes the resumed run's time (kept in the checkpoint)
    sig2 = dsno.output_sigmas(2, 0.002, 80.0)
    assert meta["weighting"] == "snr" and meta["temporal_init"] == "random"
    np.testing.assert_allclose(meta["loss_weights"], [min(max(1 / s, 1.0), 1e4) for s in sig2], rtol=1e-6)
    den = load_denoiser(str(student_path))
    table = SolverTable.load(str(table_path), fingerprint=den.fingerprint())
    assert table.nfe == 1 and table.metadata["method"] == "dsno" and table.metadata["M"] == 2
    assert table.metadata["weighting"] == "snr" and table.metadata["loss_weights"] == meta["loss_weights"]
    assert table.metadata["config"]["weighting"] == "snr" and table.metadata["temporal_init"] == "random"
    with torch.no_grad():
        x = sample(table, den, make_noise(table, (1, 8, 8), range(4)))
        direct = dsno.trajectory(den.net, 80.0 * make_noise(1, (1, 8, 8), range(4))[0], 80.0)[:, -1]
    torch.testing.assert_close(x, direct, atol=1e-5, rtol=1e-5)
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(table_path), "--model",
                           f"edm:{student_path}", "--n", "4", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples = np.load(out / "samples.npz")
    arr = samples["samples"]
    np.testing.assert_allclose(arr.reshape(4, 1, 8, 8), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["weighting=normalised", "temporal_init=zero"]])
def test_resumed_student_equals_uninterrupted(tmp_path: Path, extra: list[str], capsys) -> None:
    """Stopped at step 2 and resumed to 5 (16 trajectories, batches of 8: the data order wraps twice) gives the
    uninterrupted student bit for bit: batches follow the step, the EMA update and normalised's running distances are
    in the checkpoint, and the learning rate follows the new step count."""
    common = [*FAST, *extra, f"data_cache_dir={tmp_path / 'cache'}"]
    main(["dsno", *common, "steps=5", f"hydra.run.dir={tmp_path / 'a'}"])
    main(["dsno", *common, "steps=2", f"hydra.run.dir={tmp_path / 'b'}"])
    main(["dsno", *common, "steps=5", f"hydra.run.dir={tmp_path / 'b'}", f"resume={tmp_path / 'b'}"])
    a, b = (load_file(str(tmp_path / r / "dsno-edm.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "dsno-edm-loss.csv").read_text() == (tmp_path / "b" / "dsno-edm-loss.csv").read_text()
    if extra:  # the weighting the run used is recorded with the student, and a resume under another one is refused
        meta = read_net_header(str(tmp_path / "b" / "dsno-edm.safetensors"))[1]
        assert meta["weighting"] == "normalised" and meta["temporal_init"] == "zero" and len(meta["loss_weights"]) == 2
        with pytest.raises(SystemExit) as exc:
            main(["dsno", *FAST, f"data_cache_dir={tmp_path / 'cache'}", "steps=6", f"hydra.run.dir={tmp_path / 'b'}",
                  f"resume={tmp_path / 'b'}"])
        assert exc.value.code == 2
        assert "weighting=normalised, but this run has weighting=snr" in capsys.readouterr().err


def test_evaluation_at_end_pairs_the_student_with_the_classics(tmp_path: Path) -> None:
    """The default run ends with an evaluation: the student beside the best classics on each end convention (dpmpp_2m,
    ipndm landing on sigma_min) on the same seeds, written to results.csv."""
    run = tmp_path / "run"
    fast = [a for a in FAST if a != "evaluate_at_end=false"]
    main(["dsno", *fast, "steps=1", "n=24", "eval_batch_size=24", "ref_nfe=9", "n_boot=20", "compare_nfe=[2]",
          f"ref_cache_dir={tmp_path / 'refs'}", f"data_cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"])
    rows = read_results(str(run / "results.csv"))
    assert [(r["method"], int(r["nfe"])) for r in rows] == [("dsno", 1), ("dpmpp_2m", 2), ("ipndm(end=sigma_min)", 2)]
    assert all(r["ref_rmse"] > 0 and r["fd_train_main"] > 0 and r["fd_se_train_main"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["M=0"], r"^error: M .*(at least 1|positive|1\.\.)"),  # the shared key check or dsno's own
    (["modes=4"], r"modes must lie in 1\.\.M//2\+1 = 1\.\.3"),
    (["M=1", "modes=2"], r"modes must lie in 1\.\.M//2\+1 = 1\.\.1"),
    (["M=3", "modes=1"], "M must divide the 8 stored data times"),
    (["model.checkpoint=/nonexistent/teacher.safetensors"], "does not exist"),
    (["model=gmm"], "dsno distils a network teacher"),
    (["loss=huber"], "loss must be one of l1, l2"),
    (["weighting=focal"], r"weighting must be one of snr, uniform, normalised, got 'focal'\.$"),
    (["temporal_init=ones"], r"temporal_init must be one of random, zero, got 'ones'\.$"),
    (["compare=[unipc:sigma-min]"], "compare entry 'unipc:sigma-min': the end convention after ':' must be one of zero"),
    (["compare=[heun]"], "compare: heun needs an odd NFE"),
])
def test_bad_config_is_one_error_line(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dsno", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and re.search(message, err[0]), err
