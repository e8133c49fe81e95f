"""DDSS over GGDM (optimize.methods.ddss): exact DDIM initialisation, the parametrisation's constraints, the loss,
gradient rematerialisation, resume, a short GMM run with a loadable artifact, DDP and bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from optimize.methods import ddss
from optimize.cli import ConfigError, main
from optimize.evaluation.evaluate import Judge, Model
from optimize.evaluation.metrics import mmd2_unbiased
from optimize.training.runs import ticks
from samplers import SolverTable, baselines
from samplers.denoisers import EDMPrecond
from samplers.nets import build_net

ROOT = Path(__file__).resolve().parents[1]
GMM_FAST = ["model=gmm", "n_val=64", "n=128", "ref_nfe=15", "n_boot=20", "grid=0",
            "compare=[euler]", "progress_bar=false", "checkpoint_every=2"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


# --- initialisation and parametrisation --------------------------------------------------------
@pytest.mark.parametrize("nfe", [1, 2, 4, 10])
def test_ggdm_init_is_euler_bit_for_bit(nfe: int) -> None:
    table = ddss.GGDMTable(nfe).table()
    euler = baselines.build("euler", nfe)
    assert table.coef.requires_grad and table.sigmas.requires_grad == (nfe > 1)
    assert torch.equal(table.coef, euler.coef) and torch.equal(table.sigmas, euler.sigmas)
    assert table.coef.dtype == torch.float64


def test_other_inits_and_noise_columns_exact() -> None:
    for init in ("dpmpp_2m", "unipc", "ipndm"):
        t, ref = ddss.GGDMTable(6, "full", init).table(), baselines.build(init, 6)
        assert torch.equal(t.coef, ref.coef) and torch.equal(t.sigmas, ref.sigmas), init
    noisy = ddss.GGDMTable(5, learn_noise=True)
    t, euler = noisy.table(), baselines.build("euler", 5)
    assert t.n_noise == 5 and torch.equal(t.coef[:, 0], euler.coef[:, 0]) and torch.equal(t.coef[:, 5:], euler.coef[:, 1:])
    assert not t.coef[:, 1:5].any()
    assert noisy.support[1:5, 1:5].diagonal().all()  # row i learns its fresh noise e_i
    with pytest.raises(ValueError, match="needs family=full"):
        ddss.GGDMTable(4, "ggdm", "dpmpp_2m")


def test_family_supports_and_parameter_counts() -> None:
    n = 6
    ggdm = ddss.family_support("ggdm", n, 1)
    full = ddss.family_support("full", n, 1)
    assert int(ggdm.sum()) == n * (n + 3) // 2 and int(full.sum()) == n * (n + 1)
    assert not ggdm[0].any() and not full[0].any()
    # causality: row i uses only x_j, d_j with j < i
    for mask in (ggdm, full):
        for i in range(n):
            assert not mask[i, 1 + i:1 + n].any() and not mask[i, 1 + n + i:].any()
    # ggdm: x0-prediction of the current step only, and every previous iterate
    assert ggdm[3, 1:4].all() and ggdm[3, 1 + n + 2] and not ggdm[3, 1 + n:1 + n + 2].any()


def test_learned_sigmas_stay_ordered_in_range() -> None:
    g = ddss.GGDMTable(8, sigma_min=0.002, sigma_max=80.0)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 20.0):
        with torch.no_grad():
            g.theta.copy_(g.theta0 + scale * torch.randn(g.theta.shape, generator=gen, dtype=torch.float64))
        s = g.sigmas().detach()
        assert s[0] == baselines.build("euler", 8).sigmas[0]
        assert (s[1:] <= s[:-1]).all() and s.min() >= 0.002 - 1e-15 and s.max() <= 80.0 + 1e-12
        g.frozen().validate()


def test_skeleton_moves_with_sigmas() -> None:
    """With u = 0 the table is Euler/DDIM on whatever sigmas theta gives."""
    g = ddss.GGDMTable(5)
    with torch.no_grad():
        g.theta.add_(torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5], dtype=torch.float64))
    t = g.frozen()
    ref = baselines.build("euler", 5, sigmas=t.sigmas.tolist())
    assert torch.allclose(t.coef, ref.coef, atol=1e-12)


def test_loss_is_unbiased_mmd2() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(11, 5, generator=gen) + 0.3
    ours = ddss.mmd_loss(a, b, ddss.real_term(b))
    assert torch.allclose(ours, mmd2_unbiased(a, b), atol=1e-12)


def test_lr_schedule() -> None:
    f = [ddss.lr_factor(s, 100, 10, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[100] == pytest.approx(0.1) and all(x >= y for x, y in zip(f[10:], f[11:]))


# --- a tiny image model -------------------------------------------------------------------------
TINY_NET = {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "emb_dim": 16, "groups": 4}


def _tiny_module(nfe: int = 4, **kw) -> ddss.DDSSModule:
    torch.manual_seed(0)
    den = EDMPrecond(build_net(TINY_NET)).to(torch.float64)
    model = Model("tiny", den, (1, 8, 8), "tiny-fp", torch.float64)
    real = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    feat_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh()).to(torch.float64)
    judge = Judge(features={"main": feat_net}, real={"train": real, "heldout": real[:20]}, n_boot=20)
    kw.setdefault("batch_size", 6)
    kw.setdefault("n_val", 12)
    return ddss.DDSSModule(nfe, **kw).attach(model, judge)


@pytest.mark.parametrize("family, learn_noise", [("ggdm", True), ("full", True), ("ggdm_mc", False), ("ggdm_mc", True)])
def test_gradient_with_remat_equals_without(family: str, learn_noise: bool) -> None:
    module = _tiny_module(4, family=family, learn_noise=learn_noise)
    with torch.no_grad():  # move off the init so every entry matters
        module.sampler.u.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        module.sampler.theta.add_(0.1)
    noise = module.noise(6, step=0)
    grads = []
    for remat in (True, False):
        module.zero_grad()
        module.loss_of(module.generate(noise, remat=remat)).backward()
        grads.append((module.sampler.u.grad.clone(), module.sampler.theta.grad.clone()))
    # every free parameter of the marginal-consistent family moves the loss (the solved ones are not parameters)
    assert (grads[0][0].abs().min() if family == "ggdm_mc" else grads[0][0].abs().sum()) > 0 and grads[0][1].abs().sum() > 0
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-14)


def _trainer(tmp_path: Path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)


def _loader():
    return ticks()


def test_resume_continues_from_saved_step(tmp_path: Path) -> None:
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0, every_n_train_steps=3)
    first = _tiny_module(3, steps=6, val_every=2)
    _trainer(tmp_path, 3, callbacks=[ck]).fit(first, _loader())
    path = tmp_path / "ck" / "last.ckpt"
    assert path.is_file() and first.global_step == 3
    # straight through 6 steps vs 3 + resume 3: same parameters (noise depends only on seed, rank and step)
    straight = _tiny_module(3, steps=6, val_every=2)
    _trainer(tmp_path / "s", 6).fit(straight, _loader())
    second = _tiny_module(3, steps=6, val_every=2)
    seen: list[int] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.global_step)

    _trainer(tmp_path / "r", 6, callbacks=[Spy()]).fit(second, _loader(), ckpt_path=str(path))
    assert seen[0] == 3 and second.global_step == 6
    assert len(second.history["loss"]) == 6 and [v["step"] for v in second.history["val"]] == [0, 2, 4, 6]
    assert torch.allclose(second.sampler.u, straight.sampler.u, atol=1e-10)
    assert torch.allclose(second.sampler.theta, straight.sampler.theta, atol=1e-10)


def test_nan_loss_stops_with_one_sentence(tmp_path: Path) -> None:
    module = _tiny_module(2, val_every=0)
    with torch.no_grad():
        module.sampler.u.fill_(float("nan"))
    with pytest.raises(ddss.NaNLossError, match=r"non-finite loss .* at global step 0"):
        _trainer(tmp_path, 2).fit(module, _loader())


def test_resume_from_a_nan_checkpoint_is_one_sentence_before_work(tmp_path: Path) -> None:
    """A checkpoint whose table parameters are NaN is refused by resume= (naming the tensor and the step); a healthy one
    with no validation yet (best_score = inf) is accepted."""
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0, every_n_train_steps=2)
    module = _tiny_module(2, steps=2, val_every=0)
    _trainer(tmp_path, 2, callbacks=[ck]).fit(module, _loader())
    path = tmp_path / "ck" / "last.ckpt"
    assert ddss._check_resume_matches(str(path), str(tmp_path), module) == str(path)  # inf best_score is fine
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["sampler.u"] = torch.full_like(ckpt["state_dict"]["sampler.u"], float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(ConfigError, match=r"nan\.ckpt \(step 2\) holds NaN or infinite values in sampler\.u; it cannot be "
                                          r"continued"):
        ddss._check_resume_matches(str(tmp_path / "nan.ckpt"), str(tmp_path), module)


def test_default_compare_holds_the_best_classic_on_each_end_convention() -> None:
    """The default comparison has both end conventions (EDM's zero and sigma_min, as DPM-Solver and LD3), each with the
    best classic on digits at NFE 8 (dpmpp_2m) and 10 (ipndm), docs/results-learned.md."""
    from omegaconf import OmegaConf

    from optimize.training.runs import compare_entry, compare_tables

    cfg = OmegaConf.load(ROOT / "conf" / "method" / "ddss.yaml")
    ends = {end: {s for s, e, _ in map(compare_entry, cfg.compare) if e == end} for end in ("zero", "sigma_min")}
    assert {"dpmpp_2m", "ipndm"} <= ends["zero"] and {"dpmpp_2m", "ipndm"} <= ends["sigma_min"]
    run = OmegaConf.create({"sigma_min": 0.002, "sigma_max": 80.0, "schedule": "karras", "rho": 7.0, "end": "sigma_min"})
    tables = dict(compare_tables(run, ["ipndm", "ipndm:sigma_min", "ipndm:zero"], 10))
    assert list(tables) == ["ipndm", "ipndm(end=sigma_min)"]  # a bare name is EDM's end whatever the run's end
    assert tables["ipndm(end=sigma_min)"].metadata["end"] == "sigma_min" and "end" not in tables["ipndm"].metadata


# --- the command on the GMM ----------------------------------------------------------------------
def _run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "optimize", *args], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gmm_run_lowers_loss_and_exports_loadable_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run_cli(["ddss", "nfe=3", "steps=30", "batch_size=64", "val_every=10", "lr=0.01", *GMM_FAST,
                     f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = run_dir / "ddss-ggdm-nfe3.safetensors"
    table = SolverTable.load(str(path))
    meta = table.metadata
    assert meta["method"] == "ddss" and meta["family"] == "ggdm" and meta["init"] == "euler" and meta["nfe"] == 3
    assert meta["steps"] == 30 and meta["seed"] == 0 and meta["model_fingerprint"] and meta["selection_metrics"]
    assert meta["loss"]["last"] < meta["loss"]["first"]
    # selection saw only the training set: nothing held-out was computed during training
    assert meta["validation"] and all("heldout" not in k for v in meta["validation"] for k in v)
    assert meta["evaluation"]["fd_train_raw"] < 4.0  # euler at nfe 3 on this GMM: about 4.9
    for suffix in ("-sigmas.png", "-coef.png"):
        assert (run_dir / f"ddss-ggdm-nfe3{suffix}").stat().st_size > 1000
    assert (run_dir / "results.csv").is_file() and (run_dir / "logs" / "metrics.csv").is_file()
    assert (run_dir / "lightning" / "last.ckpt").is_file()
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ddss", "euler"] and rows[0]["fd_train_raw"] < rows[1]["fd_train_raw"]
    gen = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(path), "--model", "gmm", "--n", "8",
                          "--out", str(tmp_path / "gen"), "--no-progress"], cwd=str(tmp_path), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert np.load(tmp_path / "gen" / "samples.npz")["samples"].shape == (8, 1, 8, 8)


@pytest.mark.slow
def test_two_process_cpu_ddp(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    proc = _run_cli(["ddss", "nfe=3", "steps=4", "batch_size=16", "val_every=2", *GMM_FAST, "accelerator=cpu", "devices=2",
                     "strategy=ddp", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = SolverTable.load(str(run_dir / "ddss-ggdm-nfe3.safetensors"))
    assert table.metadata["steps"] == 4 and table.metadata["world_size"] == 2 and (run_dir / "results.csv").is_file()


# --- bad configurations --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["family=gggdm"], "unknown ddss family 'gggdm'; valid families: ggdm, ggdm_mc, full"),
        (["init=heun"], "ddss init must be a one-evaluation-per-step solver"),
        (["init=dpmpp_2m"], "family ggdm starts from DDIM (init=euler)"),
        (["nfe=[4,5]"], "give a single nfe"),
        (["nfe=0"], "nfe must be a positive integer"),
        (["steps=0"], "steps must be a positive integer"),
        (["lr=0"], "lr must be a positive number"),
        (["sigma_lr=-1"], "sigma_lr must be a positive number"),
        (["batch_size=1"], "batch_size, n_val and n must be at least 2"),
        (["monitor=loss"], "unknown monitor 'loss'"),
        (["min_lr_ratio=2"], "min_lr_ratio must lie in [0, 1]"),
        (["compare=[heun]", "nfe=4"], "compare: heun needs an odd NFE"),
        (["compare=[ipndm:sideways]"], "compare entry 'ipndm:sideways': the end convention after ':' must be one of zero, "
                                       "sigma_min, got 'sideways'"),
        (["compare=[tada:sigma_min]"], "compare: tada's output is its last data prediction"),
        (["resume=/nonexistent/last.ckpt"], "resume checkpoint /nonexistent/last.ckpt does not exist"),
        (["loss=lpips"], "unknown ddss loss 'lpips'; valid: kid, match, kid+match"),
        (["loss=match", "family=full", "n_match=16", "batch_size=32"], "batch_size (32) cannot exceed n_match (16)"),
        (["loss=match", "family=full", "match_space=pixels"], "match_space must be one of latent, decoded, got 'pixels'"),
        (["loss=match", "family=full", "n_match=16", "batch_size=16", "devices=2", "strategy=ddp"],
         "batch_size (16) cannot exceed n_match (16), the teacher pool it draws from, shared by 2 processes."),
        (["loss=match", "family=full", "teacher_solver=heun", "teacher_nfe=4"], "teacher: heun needs an odd NFE"),
        (["family=full", "init=table:/nonexistent.safetensors"], "init table file /nonexistent.safetensors does not exist"),
    ],
)
def test_bad_config_one_sentence(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ddss", "model=gmm", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_resume_true_without_checkpoint_is_one_sentence(tmp_path: Path) -> None:
    from optimize.training.checkpoints import resume_path

    with pytest.raises(ConfigError, match="resume=true found no lightning/last.ckpt"):
        resume_path(True, str(tmp_path / "fresh"))
    (tmp_path / "old" / "lightning").mkdir(parents=True)
    (tmp_path / "old" / "lightning" / "last.ckpt").write_bytes(b"x")
    assert resume_path(True, str(tmp_path / "fresh")) == str(tmp_path / "old" / "lightning" / "last.ckpt")


# --- family ggdm_mc: the marginal-consistent GGDM (Theorem 1 of the paper in sigma space) ---------------------
def _iterate_marginals(table: SolverTable) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 weight m_i and noise loading B_i [N+1, K] of every row of the forward GGDM process (x_0 = x0 + sigma_0 e_0,
    which the sampler's prior sigma_0 e_0 approximates) when every denoiser output is x0 exactly (x_i = m_i x0 +
    B_i . e), by the table's own recursion: independent of ddss's parametrisation."""
    coef = table.coef.detach()
    n, k = table.nfe, table.n_noise
    m, loads = [], []
    for i in range(n + 1):
        row = coef[i]
        xs = row[k:k + n][:i]
        m.append(sum((xs[j] * m[j] for j in range(i)), torch.tensor(float(i == 0), dtype=torch.float64)) + row[k + n:].sum())
        loads.append(row[:k] + sum((xs[j] * loads[j] for j in range(i)), torch.zeros(k, dtype=torch.float64)))
    return torch.stack(m), torch.stack(loads)


def _perturbed(nfe: int, learn_noise: bool, seed: int, family: str = "ggdm_mc", scale: float = 0.3) -> ddss.GGDMTable:
    g = ddss.GGDMTable(nfe, family, learn_noise=learn_noise)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g.u.normal_(0, scale, generator=gen)
        g.theta.add_(torch.randn(g.theta.shape, generator=gen, dtype=torch.float64))
    return g


@pytest.mark.parametrize("nfe", [1, 2, 4, 10])
@pytest.mark.parametrize("learn_noise", [False, True])
def test_ggdm_mc_init_is_euler_bit_for_bit(nfe: int, learn_noise: bool) -> None:
    g = ddss.GGDMTable(nfe, "ggdm_mc", learn_noise=learn_noise)
    table = g.table()
    euler = ddss.initial_table("euler", nfe, learn_noise, sigma_min=0.002, sigma_max=80.0)
    assert torch.equal(table.coef, euler.coef) and torch.equal(table.sigmas, euler.sigmas)
    assert table.coef.requires_grad and table.coef.dtype == torch.float64
    k = table.n_noise
    free, support = ddss.family_free("ggdm_mc", nfe, k), ddss.family_support("ggdm_mc", nfe, k)
    assert int(free.sum()) == g.u.numel() and not (free & ~support).any()
    if k == 1:  # x_0 and d_{i-1} of every row are solved
        assert g.u.numel() == nfe * (nfe - 1) // 2 and not free[:, 1].any() and not free[:, 1 + nfe:].any()
    with pytest.raises(ValueError, match="family ggdm_mc starts from DDIM"):
        ddss.GGDMTable(4, "ggdm_mc", "dpmpp_2m")


@pytest.mark.parametrize("learn_noise", [False, True])
def test_ggdm_mc_every_table_is_marginal_consistent(learn_noise: bool) -> None:
    """After random moves of every parameter (and the sigmas), each row keeps x0 weight 1 and noise scale sigma_i
    (0 for the output); the free family does not."""
    for seed in range(5):
        t = _perturbed(6, learn_noise, seed).frozen()
        m, loads = _iterate_marginals(t)
        target = torch.cat([t.sigmas, torch.zeros(1, dtype=torch.float64)])
        assert torch.allclose(m, torch.ones_like(m), rtol=0, atol=1e-12)
        assert torch.allclose(loads.norm(dim=1), target, rtol=0, atol=1e-12)
        if not learn_noise:  # deterministic: the noise loading itself is +sigma_i (x_i = x0 + sigma_i e_0)
            assert torch.allclose(loads[:, 0], target, rtol=0, atol=1e-12)
        else:
            assert t.coef[1:6, 1:6].diagonal().abs().min() > 0  # fresh noise really injected
    m, loads = _iterate_marginals(_perturbed(6, False, 0, family="ggdm").frozen())
    assert (m - 1).abs().max() > 1e-3


@pytest.mark.parametrize("learn_noise", [False, True])
def test_ggdm_mc_is_differentiable_in_every_parameter(learn_noise: bool) -> None:
    g = _perturbed(5, learn_noise, 1)
    t = g.table()
    (t.coef ** 2).sum().backward()
    assert torch.isfinite(g.u.grad).all() and g.u.grad.abs().min() > 0 and g.theta.grad.abs().sum() > 0
    g0 = ddss.GGDMTable(5, "ggdm_mc", learn_noise=learn_noise)  # at the init (c_i = 0 with learned noise) too
    (g0.table().coef.sum() + g0.table().coef[1:, 1:5].abs().sum()).backward()
    assert torch.isfinite(g0.u.grad).all() and torch.isfinite(g0.theta.grad).all()


@pytest.mark.parametrize("learn_noise", [False, True])
def test_ggdm_mc_sampler_keeps_forward_marginals_on_point_mass(learn_noise: bool) -> None:
    """The executor with the exact denoiser of a one-point data set (x0_hat = x0), started from the forward marginal
    x_0 = x0 + sigma_0 e (e_0 = e + x0 / sigma_0): every iterate is affine in the noise, so probing with one-hot
    noise vectors reads its loadings; they have norm sigma_i and x0 weight 1, as q(x_i | x0) = N(x0, sigma_i^2 I)
    demands. A Monte-Carlo mean/variance check confirms it on Gaussian noise."""
    from samplers import sample
    from samplers.denoisers import GaussianMixture

    x_star = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    den = GaussianMixture(x_star, 0.0)
    t = _perturbed(5, learn_noise, 2).frozen()
    k, n = t.n_noise, t.nfe
    target = torch.cat([t.sigmas, torch.zeros(1, dtype=torch.float64)])
    seen: list[torch.Tensor] = []

    def grab(i, x, d, sigma):
        seen.append(x.clone())

    noise = torch.zeros(k, k + 1, 2, dtype=torch.float64)  # sample 0: all noise 0; sample b >= 1: e_{b-1} = (1, 1)
    for b in range(k):
        noise[b, b + 1] = 1.0
    shift = x_star / t.sigmas[0]  # x_0 = sigma_0 e_0 = x0 + sigma_0 e
    noise[0] += shift
    out = sample(t, den, noise, callback=grab)
    iterates = torch.stack([*seen, out])  # [N+1, K+1, 2]
    assert torch.allclose(iterates[:, 0], x_star.expand(n + 1, 2), atol=1e-12)  # zero noise -> x0 at every step
    loads = iterates[:, 1:, 0] - iterates[:, :1, 0]  # [N+1, K]
    assert torch.allclose(loads.norm(dim=1), target, rtol=1e-12, atol=1e-12)
    # Monte Carlo: 20000 samples, mean x0 and variance sigma_i^2 per iterate (4 standard errors)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(k, 20000, 2, generator=gen, dtype=torch.float64)
    z[0] += shift
    seen.clear()
    out = sample(t, den, z, callback=grab)
    for i, x in enumerate([*seen, out]):
        var = target[i] ** 2
        assert ((x.mean(0) - x_star[0]).abs() <= 4 * (var / 20000) ** 0.5 + 1e-12).all()
        assert ((x.var(0) - var).abs() <= 4 * var * (2 / 20000) ** 0.5 + 1e-12).all()


def test_ggdm_mc_training_lowers_loss(tmp_path: Path) -> None:
    """10 Lightning steps on the tiny model lower the KID loss on fixed noise and the table stays consistent."""
    module = _tiny_module(3, family="ggdm_mc", batch_size=16, lr=0.2, sigma_lr=0.2, warmup_steps=0, steps=10, val_every=0)
    fixed = module.noise(64, step=10_000)
    with torch.no_grad():
        before = float(module.loss_of(module.generate(fixed)))
    _trainer(tmp_path, 10).fit(module, _loader())
    with torch.no_grad():
        after = float(module.loss_of(module.generate(fixed)))
    t = module.sampler.frozen()
    assert after < 0.95 * before and not torch.equal(t.coef, module.sampler.coef0)
    m, loads = _iterate_marginals(t)
    assert torch.allclose(m, torch.ones_like(m), atol=1e-12)
    assert torch.allclose(loads[:, 0], torch.cat([t.sigmas, torch.zeros(1, dtype=torch.float64)]), atol=1e-12)


def test_ggdm_mc_bad_config_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ddss", "model=gmm", "family=ggdm_mc", "init=dpmpp_2m"])
    assert exc.value.code == 2 and "family ggdm_mc starts from DDIM (init=euler)" in capsys.readouterr().err


# --- teacher matching and init from a table file ------------------------------------------------
def test_init_from_table_file_is_that_table_bit_for_bit(tmp_path: Path) -> None:
    """init=table:PATH (here a DPM-Solver++ schedule that lands on sigma_min) starts training from exactly that table."""
    src = baselines.build("dpmpp_2m", 4, end="sigma_min", rho=5.0)
    path = tmp_path / "start.safetensors"
    src.save(str(path))
    module = _tiny_module(4, family="full", init=f"table:{path}")
    t = module.sampler.frozen()
    assert torch.equal(t.coef, src.coef) and torch.equal(t.sigmas, src.sigmas)
    with pytest.raises(ValueError, match="must be deterministic .* with nfe=5"):
        ddss.GGDMTable(5, "full", f"table:{path}")
    with pytest.raises(ValueError, match="family ggdm starts from DDIM"):
        ddss.GGDMTable(4, "ggdm", f"table:{path}")


def test_match_loss_pulls_samples_to_the_teacher(tmp_path: Path) -> None:
    """loss=match: 15 steps lower the same-noise L2 to the fine teacher solve on noises outside the pool."""
    from optimize.methods.ld3 import l2_per_sample
    from optimize.training.distill import teacher_targets

    module = _tiny_module(3, family="full", loss="match", n_match=64, batch_size=16, lr=0.05, sigma_lr=0.05,
                          warmup_steps=0, steps=15, val_every=0, teacher_solver="heun", teacher_nfe=21)
    e = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    target = teacher_targets(module.model.denoiser, e, "heun", 21, 0.002, 80.0)

    def err() -> float:
        with torch.no_grad():
            return float(l2_per_sample(module.generate(e[None], remat=False), target).mean())

    before = err()
    _trainer(tmp_path, 15).fit(module, _loader())
    assert err() < 0.8 * before
