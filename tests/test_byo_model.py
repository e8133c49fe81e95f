"""Bring your own model (optimize/data/models.py kinds diffusers and callable, optimize/data/folder.py, feature nets given
as files or callables): the models load as the runtime loads them, and every bad spec is one `error:` line, exit 2,
before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from optimize.cli import ConfigError, main

diffusers = pytest.importorskip("diffusers")
from tiny_models import save_tiny  # noqa: E402 - the one tiny diffusers folder of the tests

from samplers.models import load_diffusers  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_cond(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-cond"), "v_prediction", classes=3)


def _fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _mcfg(**kw):
    base = OmegaConf.load(REPO / "conf" / "model" / f"{kw.pop('conf')}.yaml")
    return OmegaConf.merge(base, kw)


# --- bad specs -------------------------------------------------------------------------------------
def _broken(tmp_path: Path, tiny: Path, what: str) -> Path:
    folder = tmp_path / what
    shutil.copytree(tiny, folder)
    if what == "class":
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    elif what == "prediction":
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    elif what == "pickle":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    elif what == "noscheduler":
        shutil.rmtree(folder / "scheduler")
    return folder


@pytest.mark.parametrize("what, needle", [
    ("class", "describes a UNet2DConditionModel, but a diffusers model must be a UNet2DModel"),
    ("prediction", "prediction_type 'flow' is not supported"),
    ("pickle", "no diffusion_pytorch_model.safetensors"),
    ("noscheduler", "no scheduler_config.json"),
])
def test_bad_diffusers_folders(tmp_path, tiny, capsys, what, needle):
    folder = _broken(tmp_path, tiny, what)
    assert needle in _fail(["iia", "model=diffusers", f"model.path={folder}", "nfe=5"], capsys)


@pytest.mark.parametrize("extra, needle", [
    ([], "set model.path=DIR"),
    (["model.path=/nonexistent/model"], "diffusers model folder '/nonexistent/model' does not exist"),
    (["model.path=TINY", "model.label=1"], "not class-conditional"),
    (["model.path=COND"], "set exactly one of model.label=K or model.label_weights"),
    (["model.path=COND", "model.label=5"], "model.label must be an integer in [0, 3)"),
    (["model.path=COND", "model.label=2", "model.guidance=3"], "is the null class"),
    (["model.path=COND", "model.label_weights=[1,-1]"], "label_weights must be"),
    (["model.path=TINY", "data=folder:/nonexistent/imgs"], "/nonexistent/imgs does not exist"),
    (["model.path=TINY", "features=[/nonexistent/f.safetensors]"], "feature net /nonexistent/f.safetensors does not exist"),
    (["model.path=TINY", "features=[nonexistent_pkg.mod:fn]"], "cannot import nonexistent_pkg.mod"),
])
def test_bad_diffusers_specs(tiny, tiny_cond, capsys, extra, needle):
    extra = [e.replace("TINY", str(tiny)).replace("COND", str(tiny_cond)) for e in extra]
    assert needle in _fail(["iia", "model=diffusers", *extra, "nfe=5"], capsys)


def test_ddss_needs_data_iia_does_not(tiny, capsys):
    assert "needs data=folder:PATH" in _fail(["ddss", "model=diffusers", f"model.path={tiny}", "nfe=4"], capsys)


@pytest.mark.parametrize("target, needle", [
    (None, "set model.target=package.module:function"),
    ("nonexistent_pkg.mod:make", "cannot import nonexistent_pkg.mod (ModuleNotFoundError"),
    ("examples.byo_model", "give package.module:function"),
    ("examples.byo_model:nothing_here", "has no attribute 'nothing_here'"),
    ("os:sep", "is not callable"),
    ("os:getcwd", "must return (denoiser, shape), got str"),
    ("tests.test_byo_model:bad_shape", "sample shape (1, -8) must be a non-empty sequence of positive integers"),
    ("tests.test_byo_model:bad_output", "must return a tensor shaped like x"),
    ("tests.test_byo_model:not_callable", "as denoiser; it must be callable"),
    ("tests.test_byo_model:raises", "raised RuntimeError: no weights here"),
])
def test_bad_callable_specs(capsys, target, needle):
    argv = ["iia", "model=callable", "nfe=5"] + ([f"model.target={target}"] if target else [])
    assert needle in _fail(argv, capsys)


def bad_shape():
    return (lambda x, s, c=None: x), (1, -8)


def bad_output():
    return (lambda x, s, c=None: x[:, :1].mean(1)), (2, 4)


def not_callable():
    return 3, (1, 4)


def raises():
    raise RuntimeError("no weights here")


def gaussian(std: float = 1.0):
    """A valid target: the exact denoiser of N(0, std^2) data, x0 = x std^2/(std^2 + sigma^2)."""
    return (lambda x, s, c=None: x * std**2 / (std**2 + s.reshape(-1, 1, 1, 1) ** 2)), (1, 4, 4)


# --- models load as the runtime loads them --------------------------------------------------------
def test_diffusers_model_equals_load_diffusers_and_takes_its_sigma_range(tiny):
    from optimize.data.models import check_model_spec, load_model

    cfg = OmegaConf.create({"method": {"name": "iia"}, "model": OmegaConf.to_container(_mcfg(conf="diffusers", path=str(tiny)))})
    check_model_spec(cfg)
    ref = load_diffusers(tiny)
    assert cfg.model.sigma_min == pytest.approx(ref.sigma_min) and cfg.model.sigma_max == pytest.approx(ref.sigma_max)
    m = load_model(cfg.model)
    assert m.shape == (1, 8, 8) and m.fingerprint == ref.fingerprint()
    x, s = torch.randn(3, 1, 8, 8) * 3, torch.tensor([3.0, 1.0, 0.1])
    assert torch.equal(m.denoiser(x, s), ref(x, s))


def test_class_conditional_label_distribution_and_guidance(tiny_cond):
    from optimize.data.models import load_model

    ref = load_diffusers(tiny_cond)
    x, s = torch.randn(4, 1, 8, 8) * 3, torch.tensor([3.0, 1.0, 0.1, 0.5])
    m = load_model(_mcfg(conf="diffusers", path=str(tiny_cond), label=1, guidance=2.5))
    d_c, d_u = ref(x, s, torch.full((4,), 1)), ref(x, s, torch.full((4,), 2))  # null class: the last one
    assert torch.allclose(m.denoiser(x, s), d_u + 2.5 * (d_c - d_u), atol=1e-5)
    plain = load_model(_mcfg(conf="diffusers", path=str(tiny_cond), label=1))
    assert torch.equal(plain.denoiser(x, s), d_c) and plain.fingerprint != m.fingerprint
    mix = load_model(_mcfg(conf="diffusers", path=str(tiny_cond), label_weights=[1, 1, 0]))
    labels = mix.denoiser.labels(1000, torch.device("cpu"))
    assert set(labels.tolist()) == {0, 1} and abs(int((labels == 0).sum()) - 500) <= 2


def test_callable_model_and_example(capsys):
    from optimize.data.models import load_model
    from samplers.nets import load_denoiser

    m = load_model(_mcfg(conf="callable", target="examples.byo_model:digits"))
    ref = load_denoiser(str(REPO / "checkpoints" / "edm-digits.safetensors"))
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 0.3])
    with torch.no_grad():
        assert m.shape == (1, 8, 8) and torch.allclose(m.denoiser(x, s), ref(x, s), atol=1e-5)
    g = load_model(_mcfg(conf="callable", target="tests.test_byo_model:gaussian", kwargs={"std": 0.5}))
    assert g.shape == (1, 4, 4) and g.fingerprint != load_model(_mcfg(conf="callable", target="tests.test_byo_model:gaussian")).fingerprint


# --- reference data from a folder; feature nets as files or callables ------------------------------
def test_folder_data_png_npy_npz(tmp_path):
    from PIL import Image

    from optimize.data.folder import load_folder

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    for i in range(2):
        Image.fromarray(imgs[i], mode="L").save(tmp_path / "train" / f"{i}.png")
    np.save(tmp_path / "train" / "more.npy", imgs[2:4, None])             # [N, C, H, W] uint8
    np.savez(tmp_path / "heldout" / "h.npz", a=imgs[4:6, :, :, None] / 127.5 - 1)  # [N, H, W, C] float in [-1, 1]
    real = load_folder(str(tmp_path), (1, 8, 8))
    assert set(real) == {"train", "heldout"} and real["train"].shape == (4, 1, 8, 8) and real["heldout"].shape == (2, 1, 8, 8)
    assert torch.allclose(real["train"][:, 0], torch.from_numpy(imgs[:4] / 127.5 - 1).float(), atol=1e-6)
    with pytest.raises(ConfigError, match="samples are"):
        load_folder(str(tmp_path / "train"), (3, 8, 8))
    np.save(tmp_path / "bad.npy", np.full((2, 1, 8, 8), 3.0))
    with pytest.raises(ConfigError, match="lie in \\[-1, 1\\]"):
        load_folder(str(tmp_path / "bad.npy"), (1, 8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .png, .npy or .npz images"):
        load_folder(str(tmp_path / "empty"), (1, 8, 8))


def test_judge_from_folder_with_file_and_callable_features(tmp_path):
    from optimize.data import digits
    from optimize.evaluation.judge import Judge

    x = digits("train")[0][:200]
    np.save(tmp_path / "digits.npy", x.numpy())
    feats = [str(REPO / "checkpoints" / "classifier-digits.safetensors"), "examples.byo_model:features"]
    mcfg = _mcfg(conf="diffusers", data=f"folder:{tmp_path}", features=feats)
    judge = Judge.for_model(mcfg, (1, 8, 8), n_boot=0)
    assert set(judge.real) == {"train"} and set(judge.features) == {"main", "b"}
    out = judge.score(digits("heldout")[0][:100])
    assert out["fd_train_main"] == pytest.approx(out["fd_train_b"])  # the callable wraps the same classifier
    none = Judge.for_model(_mcfg(conf="diffusers"), (1, 8, 8), n_boot=0)
    assert none.real == {} and none.features == {} and set(none.score(x)) == {"_estimates"}


def test_iia_on_a_diffusers_folder_without_data(tiny, tmp_path, capsys):
    """`python -m optimize iia model=diffusers model.path=DIR nfe=5` runs without reference data: a table for the
    model, evaluated on what needs no data (reference RMSE, time)."""
    main(["iia", "model=diffusers", f"model.path={tiny}", "nfe=3", "n=8", "n_fit=16", "substeps=2", "ref_nfe=5",
          "grid=4", "batch_size=8", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    from samplers import SolverTable

    table = SolverTable.load(str(tmp_path / "run" / "iia-generic-diffusers-nfe3.safetensors"),
                             fingerprint=load_diffusers(tiny).fingerprint())
    assert table.nfe == 3 and "no FD/KID" in captured.err
    assert "iia-generic" in captured.out
