"""Consistency distillation (optimize.methods.cd, samplers.nets.ConsistencyPrecond): the boundary condition and the
scalings, the network file, the teacher's Heun step against the executor's, the 1-NFE and multistep tables through
samplers.sample, a short run that lowers the loss, export served by the unchanged runtime, resume, bad configs."""

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
from safetensors.torch import load_file

from optimize import data
from optimize.cli import main
from optimize.evaluation.results import read_results
from optimize.methods import cd
from optimize.training.distill import one_step_table
from optimize.training.runs import ticks
from samplers import SolverTable, baselines, make_noise, sample
from samplers.denoisers import EDMPrecond, GaussianMixture
from samplers.nets import ConsistencyPrecond, NetError, build_net, load_denoiser, load_net, read_net_header, save_net

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "checkpoints" / "edm-toy2d.safetensors"
SMIN, SMAX = 0.002, 80.0
TINY_UNET = {"arch": "unet", "channels": 8, "channel_mult": [1], "groups": 4, "emb_dim": 8}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _random_cm(dtype=torch.float64, seed=0) -> ConsistencyPrecond:
    torch.manual_seed(seed)
    return ConsistencyPrecond(build_net(TINY_UNET), sigma_data=0.5, sigma_min=SMIN).to(dtype).eval()


# --- the parametrisation ------------------------------------------------------------------------------
def test_boundary_condition_and_scalings_are_the_formula() -> None:
    f = _random_cm()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            assert torch.equal(f.to(dtype)(x.to(dtype), SMIN), x.to(dtype))  # f(x, sigma_min) = x, bit for bit
        f = f.double()
        sd = 0.5
        for s in (0.01, 0.3, 1.0, 7.5, 80.0):
            c_skip, c_out = (float(c) for c in f.scalings(torch.tensor(s, dtype=torch.float64)))
            assert c_skip == pytest.approx(sd**2 / ((s - SMIN) ** 2 + sd**2), rel=1e-14)
            assert c_out == pytest.approx(sd * (s - SMIN) / math.sqrt(s**2 + sd**2), rel=1e-14)
            raw = f.net(x / math.sqrt(s**2 + sd**2), torch.full((4,), math.log(s) / 4, dtype=torch.float64))
            torch.testing.assert_close(f(x, s), c_skip * x + c_out * raw, rtol=1e-12, atol=1e-12)
        # per-sample sigmas: row b at its own sigma
        s = torch.tensor([SMIN, 0.5, 3.0, 80.0], dtype=torch.float64)
        rows = torch.cat([f(x[b:b + 1], float(s[b])) for b in range(4)])
        torch.testing.assert_close(f(x, s), rows, rtol=1e-12, atol=1e-12)
        assert torch.equal(f(x, s)[0], x[0])
        # far above sigma_min the scalings tend to EDM's (the teacher's F starts the student near the teacher)
        edm = EDMPrecond(f.net)
        torch.testing.assert_close(f(x, 80.0), edm(x, 80.0), rtol=1e-4, atol=1e-4)


def test_network_file_records_the_preconditioning(tmp_path: Path) -> None:
    f = _random_cm(torch.float32)
    path = str(tmp_path / "cm.safetensors")
    save_net(f.net, {**TINY_UNET, "precond": "consistency", "sigma_data": 0.5, "sigma_min": SMIN}, path)
    den = load_denoiser(path)
    assert isinstance(den, ConsistencyPrecond) and den.sigma_min == SMIN and den.max_nfe is None
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(den(x, 2.0), f(x, 2.0))
    assert den.fingerprint() == f.fingerprint()
    assert den.fingerprint() != EDMPrecond(f.net).fingerprint()  # same weights, another model
    assert den.fingerprint() != ConsistencyPrecond(f.net, sigma_min=0.01).fingerprint()
    save_net(f.net, {**TINY_UNET, "precond": "consistency"}, str(tmp_path / "no-min.safetensors"))
    with pytest.raises(NetError, match="precond consistency must give sigma_min"):
        load_denoiser(str(tmp_path / "no-min.safetensors"))
    with pytest.raises(NetError, match="sigma_min must be a positive finite number"):
        save_net(f.net, {**TINY_UNET, "precond": "consistency", "sigma_min": -1.0}, str(tmp_path / "bad.safetensors"))


# --- the teacher's Heun step ---------------------------------------------------------------------------
def test_heun_step_equals_the_executors_heun() -> None:
    """cd.heun_step against samplers' compiled Heun table on [t, t_next]: its third evaluation's input x_2 is the Heun
    step's result at t_next (the independent computation), on the analytic mixture, per sample."""
    gmm = GaussianMixture.random(shape=(1, 8, 8), seed=3)
    sig = cd.boundaries(18, SMIN, SMAX)
    assert sig[0] == SMAX and sig[-1] == pytest.approx(SMIN, rel=1e-12) and len(sig) == 18
    x0 = gmm.sample(6, generator=torch.Generator().manual_seed(0))
    z = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    n = torch.tensor([0, 3, 8, 12, 15, 16])
    t, t_next = torch.tensor(sig, dtype=torch.float64)[n], torch.tensor(sig, dtype=torch.float64)[n + 1]
    x = x0 + t.reshape(-1, 1, 1, 1) * z
    got = cd.heun_step(gmm, x, t, t_next)
    for b in range(6):
        table = baselines.build("heun", 3, sigmas=[float(t[b]), float(t_next[b])])
        seen = {}
        sample(table, gmm, (x[b:b + 1] / t[b])[None], callback=lambda i, xi, d, s: seen.setdefault(i, (xi, float(s))))
        assert seen[2][1] == pytest.approx(float(t_next[b]), rel=1e-12)
        torch.testing.assert_close(got[b:b + 1], seen[2][0], rtol=1e-10, atol=1e-10)


def test_loss_at_the_last_interval_targets_the_heun_step_itself() -> None:
    """At n = N-2 the target is f_target(x_hat, sigma_min) = x_hat (the boundary condition), whatever the target net."""
    gmm = GaussianMixture.random(shape=(1, 8, 8), seed=3)
    sig = cd.boundaries(6, SMIN, SMAX)
    module = cd.CDModule(cd.student_config({**TINY_UNET, "precond": "edm", "sigma_data": 0.5}, SMIN), sig).double()
    with torch.no_grad():
        for p in module.target.parameters():
            p.add_(1.0)  # a target unlike the online net: it must not matter at sigma_min
    module.attach(gmm, torch.zeros(1, 1, 8, 8), 1)
    x0 = gmm.sample(3, generator=torch.Generator().manual_seed(2))
    z = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    n = torch.full((3,), 4)
    t = torch.full((3,), sig[4], dtype=torch.float64)
    with torch.no_grad():
        x = x0 + sig[4] * z
        x_hat = cd.heun_step(gmm, x, t, torch.full((3,), sig[5], dtype=torch.float64))
        want = (module.online(x, t) - x_hat).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(module.losses(x0, n, z), want, rtol=1e-12, atol=1e-14)
        diff = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        c = 0.00054 * 8
        torch.testing.assert_close(cd.distance(diff, torch.zeros_like(diff), "pseudo_huber"),
                                   (diff.flatten(1).pow(2).sum(1) + c**2).sqrt() - c)


# --- the tables ----------------------------------------------------------------------------------------
def test_one_and_multistep_tables_are_the_consistency_samplers(tmp_path: Path) -> None:
    f = _random_cm()
    shape, seeds = (1, 8, 8), range(5)
    one = one_step_table(SMAX)
    torch.testing.assert_close(cd.multistep_table(SMAX, [], SMIN).coef, one.coef, rtol=0, atol=0)
    multi = SolverTable.load(cd.multistep_table(SMAX, [1.382], SMIN, {"method": "cd"}).save(str(tmp_path / "t.safetensors")))
    assert (one.nfe, multi.nfe, multi.n_noise) == (1, 2, 2)
    with torch.no_grad():
        e = make_noise(one, shape, seeds, dtype=torch.float64)
        torch.testing.assert_close(sample(one, f, e), f(SMAX * e[0], SMAX), rtol=0, atol=0)
        e2 = make_noise(multi, shape, seeds, dtype=torch.float64)
        assert torch.equal(e2[0], e[0])  # the first noise is the 1-NFE table's
        tau = 1.382
        by_hand = f(f(SMAX * e2[0], SMAX) + math.sqrt(tau**2 - SMIN**2) * e2[1], tau)
        torch.testing.assert_close(sample(multi, f, e2), by_hand, rtol=1e-12, atol=1e-12)
        three = cd.multistep_table(SMAX, [2.0, 0.5], SMIN)
        e3 = make_noise(three, shape, seeds, dtype=torch.float64)
        x = f(SMAX * e3[0], SMAX)
        for i, s in enumerate((2.0, 0.5), start=1):
            x = f(x + math.sqrt(s**2 - SMIN**2) * e3[i], s)
        torch.testing.assert_close(sample(three, f, e3), x, rtol=1e-12, atol=1e-12)


# --- training ------------------------------------------------------------------------------------------
def test_short_training_lowers_the_loss() -> None:
    """60 steps on the toy2d teacher lower the CD loss on fixed inputs (x0, n, z) several times."""
    net, cfg = load_net(str(TOY))
    teacher = EDMPrecond(net).requires_grad_(False)
    x0 = data.toy2d(256, seed=0)
    module = cd.CDModule(cd.student_config(cfg, SMIN), cd.boundaries(18, SMIN, SMAX), lr=1e-3, warmup_steps=1,
                         ema_decay=0.9).init_from(net).attach(teacher, x0, 64)
    with torch.no_grad():  # the student starts as the teacher (c_skip, c_out differ only by sigma_min)
        torch.testing.assert_close(module.online(x0 + 3.0, 3.0), teacher(x0 + 3.0, 3.0), rtol=2e-3, atol=2e-3)
    gen = torch.Generator().manual_seed(5)
    n, z = torch.randint(0, 17, (256,), generator=gen), torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        before = module.losses(x0, n, z).mean().item()
    L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(module, ticks())
    with torch.no_grad():
        after = module.losses(x0, n, z).mean().item()
    assert after < 0.3 * before, (before, after)
    assert len(module.history) == 60
    # the target followed the online net at rate 0.95 and is neither of the other two
    online, target = (torch.cat([p.flatten() for p in m.parameters()]) for m in (module.online, module.target))
    assert 0 < (online - target).abs().max() < (online - torch.cat([p.flatten() for p in net.parameters()])).abs().max()


# --- command: export round trip, resume, bad configs -------------------------------------------------------
FAST = ["model=edm", "batch_size=8", "N=6", "warmup_steps=1", "evaluate_at_end=false", "progress_bar=false",
        "checkpoint_every=1"]


def test_export_served_by_samplers_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Stopped at step 2 and resumed to 4 gives the uninterrupted student bit for bit; the exported network and its two
    tables load with the student's fingerprint and run in `python -m samplers generate` (no new sampling code)."""
    main(["cd", *FAST, "steps=4", f"hydra.run.dir={tmp_path / 'a'}", f"tables_dir={tmp_path / 'tables'}"])
    shipped = SolverTable.load(str(tmp_path / "tables" / "cd-edm-2nfe.safetensors"))  # tables_dir: the tables go there
    assert shipped.metadata["student"] == str(tmp_path / "a" / "cd-edm.safetensors")
    assert not (tmp_path / "a" / "cd-edm-1nfe.safetensors").exists()
    main(["cd", *FAST, "steps=2", f"hydra.run.dir={tmp_path / 'b'}"])
    main(["cd", *FAST, "steps=4", f"hydra.run.dir={tmp_path / 'b'}", f"resume={tmp_path / 'b'}"])
    a, b = (load_file(str(tmp_path / r / "cd-edm.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "cd-edm-loss.csv").read_text() == (tmp_path / "b" / "cd-edm-loss.csv").read_text()
    run = tmp_path / "b"
    config, meta = read_net_header(str(run / "cd-edm.safetensors"))
    assert config["precond"] == "consistency" and config["sigma_min"] == SMIN and meta["global_step"] == 4
    den = load_denoiser(str(run / "cd-edm.safetensors"))
    one = SolverTable.load(str(run / "cd-edm-1nfe.safetensors"), fingerprint=den.fingerprint())
    two = SolverTable.load(str(run / "cd-edm-2nfe.safetensors"), fingerprint=den.fingerprint())
    assert two.metadata["taus"] == [1.382] and one.metadata["teacher_fingerprint"] == two.metadata["teacher_fingerprint"]
    with torch.no_grad():
        x = sample(two, den, make_noise(two, (1, 8, 8), range(4)))
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(run / "cd-edm-2nfe.safetensors"),
                           "--model", f"edm:{run / 'cd-edm.safetensors'}", "--n", "4", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(out / "samples.npz")["samples"].reshape(4, 1, 8, 8), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["N=1"], r"N must be an integer >= 2"),
    (["target_ema=1.0"], r"target_ema \(an EMA rate\) must lie in \[0, 1\), got 1\.0"),
    (["ema=1"], r"ema \(an EMA rate\) must lie in \[0, 1\)"),
    (["target_ema=-0.5"], r"target_ema must lie in \[0, 1\]"),
    (["loss=lpips"], "loss must be one of l2, pseudo_huber"),
    (["x0_source=noise"], "x0_source must be one of real, teacher"),
    (["taus=[90.0]"], r"taus must decrease strictly inside \(sigma_min, sigma_max\) = \(0\.002, 80\)"),
    (["taus=[0.5,1.0]"], "taus must decrease strictly"),
    (["x0_source=teacher", "teacher_nfe=4"], "heun needs an odd NFE"),
    (["model=gmm"], "cd distils a network teacher"),
])
def test_bad_config_is_one_error_line(args: list[str], message: str, cli_error) -> None:
    assert re.search(message, cli_error(["cd", *args]))


def test_teacher_samples_and_the_evaluation_at_end(tmp_path: Path) -> None:
    """x0_source=teacher trains on the teacher's Heun samples (the executor's, from the data seeds); the run ends with
    both tables scored beside the classics on the same seeds, the 1-NFE table with a reference RMSE (it starts from
    sigma_max e_0 alone), the 2-NFE table without (it draws fresh noise)."""
    gmm = GaussianMixture.random(shape=(1, 8, 8), seed=3)
    got = cd.teacher_samples(gmm, (1, 8, 8), [4_000_000, 4_000_001, 4_000_002], 5, SMIN, SMAX, batch_size=2)
    table = baselines.build("heun", 5)
    torch.testing.assert_close(got, sample(table, gmm, make_noise(table, (1, 8, 8), range(4_000_000, 4_000_003))).float())
    run = tmp_path / "run"
    fast = [a for a in FAST if a != "evaluate_at_end=false"]
    main(["cd", *fast, "x0_source=teacher", "n_data=16", "teacher_nfe=3", "steps=1", "n=24", "eval_batch_size=24",
          "ref_nfe=9", "n_boot=20", "compare_nfe=[2]", f"ref_cache_dir={tmp_path / 'refs'}", f"hydra.run.dir={run}"])
    assert read_net_header(str(run / "cd-edm.safetensors"))[1]["x0_source"] == "teacher"
    rows = read_results(str(run / "results.csv"))
    assert [(r["method"], int(r["nfe"])) for r in rows] == [("cd", 1), ("cd-2step", 2), ("dpmpp_2m", 2),
                                                            ("ipndm(end=sigma_min)", 2)]
    assert rows[0]["ref_rmse"] > 0 and rows[1]["ref_rmse"] is None  # the 2-NFE table has no reference
    assert all(r["fd_train_main"] > 0 for r in rows)
