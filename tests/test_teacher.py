"""Teacher training (EDM loss, EMA, NaN stop, resume, export) and the digits feature classifiers."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from optimize.evaluation.classifier import accuracy, build_classifier, load_classifier, random_shift, save_classifier
from optimize.data import digits
from optimize.methods.teacher import NaNLossError, TeacherModule, data_loader, edm_loss, edm_weight, sample_sigma
from samplers.nets import load_denoiser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "emb_dim": 16, "groups": 4}


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def _data(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sigma_sampling_and_weight():
    s = sample_sigma(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 1.2) < 0.02 and abs(s.log().std().item() - 1.2) < 0.02
    sig = torch.tensor([0.1, 0.5, 2.0])
    assert torch.allclose(edm_weight(sig), (sig**2 + 0.25) / (sig * 0.5) ** 2)
    # weight is 1 / c_out^2: the weighted loss of the zero net F = 0 (D = c_skip x) equals E[F_target^2]
    c_out = sig * 0.5 / (sig**2 + 0.25).sqrt()
    assert torch.allclose(edm_weight(sig) * c_out**2, torch.ones(3))


def test_edm_loss_matches_definition():
    torch.manual_seed(0)
    module = TeacherModule(TINY)
    x0, n, s = _data(8), torch.randn(8, 1, 8, 8), torch.tensor([0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 10.0, 80.0])
    d = module.denoiser(x0 + s[:, None, None, None] * n, s)
    ref = ((s**2 + 0.25) / (s * 0.5) ** 2 * ((d - x0) ** 2).mean((1, 2, 3))).mean()
    assert torch.allclose(edm_loss(module.denoiser, x0, s, n), ref)


def test_training_lowers_loss_and_updates_ema(tmp_path):
    L.seed_everything(0)
    module = TeacherModule(TINY, lr=3e-3, warmup_steps=1)
    x = _data(64)
    s, n = sample_sigma(64, generator=torch.Generator().manual_seed(1)), torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    before = edm_loss(module.denoiser, x, s, n).item()
    ema0 = [p.clone() for p in module.ema.parameters()]
    _trainer(tmp_path, 15, enable_checkpointing=False).fit(module, data_loader(x, 16))
    after = edm_loss(module.denoiser, x, s, n).item()
    assert math.isfinite(after) and after < before
    assert any(not torch.equal(a, b) for a, b in zip(ema0, module.ema.parameters()))


def test_nan_loss_stops_with_message(tmp_path):
    module = TeacherModule(TINY)
    with torch.no_grad():
        module.denoiser.net.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NaNLossError, match="non-finite loss.*global step 0"):
        _trainer(tmp_path, 3, enable_checkpointing=False).fit(module, data_loader(_data(), 16))


def test_resume_continues_from_saved_step(tmp_path):
    L.seed_everything(0)
    x = _data()
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=3)
    first = TeacherModule(TINY)
    _trainer(tmp_path, 3, enable_checkpointing=True, callbacks=[ck]).fit(first, data_loader(x, 16))
    path = str(tmp_path / "ck" / "last.ckpt")
    assert os.path.isfile(path)
    second = TeacherModule(TINY)
    seen: list[int] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, *args):  # noqa: ANN001, ANN002
            seen.append(trainer.global_step)

    trainer = _trainer(tmp_path, 5, enable_checkpointing=False, callbacks=[Spy()])
    trainer.fit(second, data_loader(x, 16), ckpt_path=path)
    assert seen == [3, 4] and second.global_step == 5
    # the EMA weights travel with the checkpoint too
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("ema.") for k in state)


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    module = TeacherModule(TINY)
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = module.export(str(tmp_path / "t.safetensors"))
    den = load_denoiser(path)
    assert den.config["precond"] == "edm" and den.config["sigma_data"] == 0.5 and den.shape == (1, 8, 8)
    x, s = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 3.0, 80.0])
    with torch.no_grad():
        assert torch.allclose(den(x, s), module.ema.eval()(x, s), atol=1e-6)
        assert not torch.allclose(den(x, s), module.denoiser.eval()(x, s), atol=1e-4)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_classifier_features_and_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    model = build_classifier({"arch": arch}).eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert model.features(x).shape == (5, 128) and model(x).shape == (5, 10)
    path = save_classifier(model, {"arch": arch}, str(tmp_path / f"{arch}.safetensors"))
    loaded = load_classifier(path)
    assert torch.equal(loaded.features(x), model.features(x)) and loaded.config == {"arch": arch}


def test_random_shift_translates():
    x = torch.full((1, 1, 8, 8), -1.0)
    x[0, 0, 3, 4] = 1.0
    out = random_shift(x.expand(200, 1, 8, 8), 1, torch.Generator().manual_seed(0))
    pos = {tuple(int(v) for v in (o[0] == 1).nonzero()[0]) for o in out}
    assert pos == {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}
    assert torch.all((out == 1).sum((1, 2, 3)) == 1)


@pytest.mark.parametrize("name,minimum", [("classifier-digits", 0.97), ("classifier-digits-b", 0.95)])
def test_shipped_classifier_accuracy(name, minimum):
    path = os.path.join(ROOT, "checkpoints", f"{name}.safetensors")
    xh, yh = digits("heldout")
    assert accuracy(load_classifier(path), xh, yh) >= minimum


def test_shipped_teacher_loads():
    path = os.path.join(ROOT, "checkpoints", "edm-digits.safetensors")
    den = load_denoiser(path)
    assert den.shape == (1, 8, 8) and sum(p.numel() for p in den.parameters()) < 300_000
    x0 = digits("heldout")[0][:64]
    with torch.no_grad():  # a trained denoiser beats the trivial c_skip-only guess at moderate noise
        n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        s = torch.full((64,), 0.5)
        assert ((den(x0 + 0.5 * n, s) - x0) ** 2).mean() < 0.5 * ((0.5 * (x0 + 0.5 * n) - x0) ** 2).mean()


def test_teacher_command_trains_exports_and_resumes(tmp_path):
    """`python -m optimize teacher model=toy2d`: a short run exports a loadable EMA net; resume=RUN continues its steps."""
    import subprocess
    import sys

    small = ["teacher", "model=toy2d", "model.teacher.n_data=256", "batch_size=64", "checkpoint_every=2",
             "model.teacher.net.hidden=16", "model.teacher.net.depth=1"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "optimize", *small, *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    first = run("steps=4", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "a" / "lightning" / "last.ckpt").is_file() and (tmp_path / "a" / "logs" / "metrics.csv").is_file()
    second = run("steps=6", f"resume={tmp_path / 'a'}", f"export={tmp_path / 'b.safetensors'}", f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-2000:]
    den = load_denoiser(str(tmp_path / "b.safetensors"))
    assert den.shape == (2,) and den.config["hidden"] == 16
    from samplers.nets import read_net_header

    assert read_net_header(str(tmp_path / "b.safetensors"))[1]["steps"] == 6  # continued 4 -> 6, not 0 -> 6
    bad = run("resume=/nonexistent/run")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: resume checkpoint /nonexistent/run does not exist."


# --- resume: same batches and noise after a restart, safe loading, other runs refused ------------------------------
class _LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def _ticks():
    from optimize.training.runs import ticks

    return ticks()


def test_resumed_loss_curve_equals_uninterrupted(tmp_path):
    """Batches, noise levels and noise follow (seed, step): 3 steps + resume 3 gives the losses of 6 straight steps."""
    x = _data(40)  # 40 // 16 = 2 batches per epoch: the restart falls mid-epoch
    straight_log = _LossLog()
    torch.manual_seed(0)
    straight = TeacherModule(TINY, seed=3).attach_data(x, 16)
    _trainer(tmp_path / "s", 6, enable_checkpointing=False, callbacks=[straight_log]).fit(straight, _ticks())
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=3)
    torch.manual_seed(0)  # same initial weights
    first = TeacherModule(TINY, seed=3).attach_data(x, 16)
    _trainer(tmp_path / "a", 3, callbacks=[ck]).fit(first, _ticks())
    torch.manual_seed(123)  # the global RNG after a restart is anything: nothing may depend on it
    resumed_log = _LossLog()
    resumed = TeacherModule(TINY, seed=3).attach_data(x, 16)  # other initial weights: the checkpoint restores them
    _trainer(tmp_path / "b", 6, enable_checkpointing=False, callbacks=[resumed_log]).fit(
        resumed, _ticks(), ckpt_path=str(tmp_path / "ck" / "last.ckpt"), weights_only=True)
    assert sorted(resumed_log.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert math.isclose(resumed_log.losses[step], straight_log.losses[step], rel_tol=1e-6), step
    assert first.step_batch().shape == (16, 1, 8, 8)
    # the EMA is updated before Lightning writes a step's checkpoint (optimize.training.runs.TrainingModule), so it resumes exactly
    for name, value in straight.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[name], value), name


def _toy_cfg(*overrides: str):
    from optimize.cli import compose_config

    return compose_config(["method=teacher", "model=toy2d", "model.teacher.n_data=64", "out_dir=unused", *overrides])


def _fake_ckpt(path, cfg, **changes) -> str:
    from optimize.methods import teacher

    hp = dict(teacher.build_module(cfg).hparams)
    settings = {**teacher.run_settings(cfg, 64), **changes}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 2, "hyper_parameters": hp, "run_settings": settings}, str(path))
    return str(path)


def test_resume_refuses_another_run_naming_the_first_difference(tmp_path):
    from optimize.cli import ConfigError
    from optimize.training.checkpoints import pick_resume
    from optimize.methods import teacher

    cfg = _toy_cfg()
    module = teacher.build_module(cfg)
    current = {**dict(module.hparams), **teacher.run_settings(cfg, 64)}
    same = _fake_ckpt(tmp_path / "same" / "lightning" / "last.ckpt", cfg)
    other = _fake_ckpt(tmp_path / "other.ckpt", cfg, batch_size=7)
    with pytest.raises(ConfigError, match=r"belongs to another run: it was trained with batch_size=7, but this run has batch_size=512"):
        pick_resume(str(other), str(tmp_path / "new"), current, ignore=teacher.RESUME_IGNORE)
    assert pick_resume(str(tmp_path / "same"), str(tmp_path / "new"), current, ignore=teacher.RESUME_IGNORE) == same
    # steps only says where a constant-lr run stops: extending it is a continuation
    longer = {**current, "steps": current["steps"] + 100}
    assert pick_resume(same, str(tmp_path / "new"), longer, ignore=teacher.RESUME_IGNORE) == same
    # resume=true skips a newer sibling with other settings and continues the one that matches
    newer = _fake_ckpt(tmp_path / "newer" / "lightning" / "last.ckpt", cfg, batch_size=7)
    os.utime(newer, (2e9, 2e9))
    assert pick_resume(True, str(tmp_path / "new"), current, ignore=teacher.RESUME_IGNORE) == same
    os.remove(same)
    with pytest.raises(ConfigError, match=r"resume=true found no earlier run with the same settings .*batch_size=7"):
        pick_resume(True, str(tmp_path / "new"), current, ignore=teacher.RESUME_IGNORE)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_planted_pickle_is_refused_and_never_runs(tmp_path, capsys, monkeypatch):
    """A checkpoint whose unpickling would run code is refused with one sentence; the payload never runs."""
    import pickle

    from optimize.cli import main

    monkeypatch.chdir(tmp_path)
    marker = str(tmp_path / "PAYLOAD_RAN")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, str(evil))
    (tmp_path / "raw.ckpt").write_bytes(pickle.dumps(_Payload(marker)))
    for path in (evil, tmp_path / "raw.ckpt"):
        for method in ("teacher model=toy2d", "ddss model=gmm"):
            with pytest.raises(SystemExit) as exc:
                main([*method.split(), f"resume={path}"])
            err = capsys.readouterr().err
            assert exc.value.code == 2 and not os.path.exists(marker), err
            assert err.strip().splitlines() == [f"error: resume checkpoint {path} holds Python objects beyond tensors "
                                                f"and plain data (a pickle that could run code); it was refused, not loaded."]
    assert sorted(os.listdir(tmp_path)) == ["evil.ckpt", "raw.ckpt"]  # nothing written, nothing ran


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    from optimize.training.checkpoints import readable_checkpoint

    folder = tmp_path / "run" / "lightning"
    folder.mkdir(parents=True)
    for step in (2, 4):
        torch.save({"state_dict": {}, "global_step": step}, str(folder / f"step-{step:06d}.ckpt"))
    torch.save({"state_dict": {}, "global_step": 6}, str(folder / "last.ckpt"))
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 3])  # killed while writing
    (folder / "step-000004.ckpt").write_bytes(b"")  # and the newest step file is empty too
    path, ckpt = readable_checkpoint(str(folder / "last.ckpt"))
    assert path == str(folder / "step-000002.ckpt") and ckpt["global_step"] == 2
    err = capsys.readouterr().err
    assert err.startswith(f"note: resume checkpoint {folder / 'last.ckpt'} is truncated or corrupt") and "Falling back to" in err
