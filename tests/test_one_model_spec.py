"""One model spec shared by both CLIs (issue 24 item 3): ``samplers.models.load`` turns a spec (gmm, edm:PATH,
diffusers:DIR with a label / label weights / guidance, callable:..., a shipped name) into a denoiser with ONE
fingerprint; ``optimize``'s model configs map onto it, so a table learned with ``model.label=1 model.guidance=3``
generates with ``--label 1 --guidance 3`` and is refused with another label or guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from optimize.cli import main as optimize_main
from optimize.data.models import load_model
from samplers import SolverTable, baselines, make_noise, nets, sample
from samplers.__main__ import main as samplers_main
from samplers.models import SHIPPED, LabelDenoiser, load

diffusers = pytest.importorskip("diffusers")
from tiny_models import save_tiny  # noqa: E402 - the one tiny diffusers folder of the tests

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def cond(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet2DModel (3 classes; the last one serves as the null class) with its scheduler."""
    return save_tiny(tmp_path_factory.mktemp("cond"), classes=3)


def _mcfg(conf: str, **keys):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "model" / f"{conf}.yaml"), keys)


def _generate(argv: list[str], out: Path, capsys) -> tuple[int, str]:
    try:
        code = samplers_main(["generate", *QUIET, *argv, "--out", str(out)])
    except SystemExit as exit_:  # argparse's own errors (one line, exit 2: samplers.__main__._Parser)
        code = exit_.code
    return code, capsys.readouterr().err


def _one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- the table learned with model.label / model.guidance generates with --label / --guidance -------------------------
def test_table_learned_with_label_and_guidance_generates_with_the_same(cond, tmp_path, capsys):
    optimize_main(["iia", "model=diffusers", f"model.path={cond}", "model.label=1", "model.guidance=3", "nfe=3", "n=8",
                   "n_fit=16", "substeps=2", "ref_nfe=5", "grid=4", "batch_size=8", f"cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    capsys.readouterr()
    path = tmp_path / "run" / "iia-generic-diffusers-nfe3.safetensors"
    model = load_model(_mcfg("diffusers", path=str(cond), label=1, guidance=3))
    table = SolverTable.load(str(path), fingerprint=model.fingerprint)
    base = ["--table", str(path), "--model", f"diffusers:{cond}", "--n", "4"]

    code, err = _generate([*base, "--label", "1", "--guidance", "3"], tmp_path / "ok", capsys)
    assert code == 0, err
    with np.load(tmp_path / "ok" / "samples.npz") as z:
        got, meta = z["samples"], json.loads(str(z["metadata"]))
    assert meta["model_fingerprint"] == model.fingerprint
    with torch.inference_mode():  # the same denoiser as optimize's: the same samples, bit for bit
        want = sample(table, model.denoiser, make_noise(table, model.shape, list(range(4))))
    assert np.array_equal(got, want.numpy())

    for other in (["--label", "1", "--guidance", "2"], ["--label", "0", "--guidance", "3"], ["--label", "1"],
                  ["--label", "1", "--guidance", "3", "--null-label", "0"]):
        line = _one_error_line(*_generate([*base, *other], tmp_path / "refused", capsys))
        assert f"made for model fingerprint {model.fingerprint}, but the model in use has fingerprint" in line, other
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("options", [{"label": 1}, {"label": 1, "guidance": 2}, {"label": 0, "guidance": 2.5, "null_label": 1},
                                     {"label_weights": [1, 1, 0]}, {"label_weights": [0.2, 0.8], "guidance": 1.5}])
def test_both_clis_build_one_denoiser_with_one_fingerprint(cond, options):
    m = load_model(_mcfg("diffusers", path=str(cond), **options))
    loaded = load(f"diffusers:{cond}", **options)
    assert loaded.fingerprint == m.fingerprint and loaded.shape == m.shape == (1, 8, 8)
    x, s = torch.randn(4, 1, 8, 8) * 3, torch.tensor([3.0, 1.0, 0.1, 0.5])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, s), m.denoiser(x, s))


def test_labelled_and_guided_fingerprints_are_pinned_and_distinct(cond):
    """The labelled / guided fingerprint is optimize's (LabelDenoiser: the base model's hashed with the label or label
    CDF and the guidance settings); no shipped artifact records one (every shipped table and checkpoint is for an
    unconditional model), so none changes validity. The unconditional fingerprint is the base model's."""
    base = load(f"diffusers:{cond}", label=1).denoiser
    assert isinstance(base, LabelDenoiser)
    fps = {json.dumps(o): load(f"diffusers:{cond}", **o).fingerprint
           for o in ({"label": 1}, {"label": 2}, {"label": 1, "guidance": 2}, {"label": 1, "guidance": 3},
                     {"label": 1, "guidance": 3, "null_label": 0}, {"label_weights": [1, 1, 0]})}
    assert len(set(fps.values())) == len(fps)
    assert fps['{"label": 1}'] == "85cfd6e50dbdde3d" and fps['{"label": 1, "guidance": 2}'] == "22d64bf780eae0e8"


# --- every model optimize learns for loads in generate with the same fingerprint ------------------------------------
def test_callable_and_gmm_keywords_match_optimize(tmp_path, capsys):
    target = "tests.test_byo_model:gaussian"
    m = load_model(_mcfg("callable", target=target, kwargs={"std": 0.5}))
    loaded = load(f"callable:{target}", kwargs={"std": 0.5})
    assert loaded.fingerprint == m.fingerprint != load(f"callable:{target}").fingerprint and loaded.shape == (1, 4, 4)
    euler = baselines.build("euler", 3)
    path = SolverTable(euler.sigmas, euler.coef, {**euler.metadata, "model_fingerprint": m.fingerprint}).save(str(tmp_path / "t.safetensors"))
    code, err = _generate(["--table", path, "--model", f"callable:{target}", "--model-kwargs", '{"std": 0.5}', "--n", "2"],
                          tmp_path / "c", capsys)
    assert code == 0, err
    assert "made for model fingerprint" in _one_error_line(*_generate(
        ["--table", path, "--model", f"callable:{target}", "--n", "2"], tmp_path / "c2", capsys))

    g = load_model(_mcfg("gmm", components=4, model_seed=3))
    assert load("gmm", kwargs={"components": 4, "seed": 3}).fingerprint == g.fingerprint != load("gmm").fingerprint
    assert load("gmm").fingerprint == load_model(_mcfg("gmm")).fingerprint


def test_class_conditional_edm_net_takes_labels_and_guidance(tmp_path, capsys):
    torch.manual_seed(0)
    config = {"arch": "unet", "channels": 8, "num_classes": 4}
    path = nets.save_net(nets.build_net(config), config, str(tmp_path / "cond.safetensors"))
    plain = load(f"edm:{path}")
    assert plain.fingerprint == nets.load_denoiser(path).fingerprint()  # no label: the net called unconditionally
    labelled, guided = load(f"edm:{path}", label=2), load(f"edm:{path}", label=2, guidance=2.0)
    assert len({plain.fingerprint, labelled.fingerprint, guided.fingerprint}) == 3
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 0.5])
    with torch.no_grad():
        d_c, d_u = plain.denoiser(x, s, torch.full((2,), 2)), plain.denoiser(x, s, torch.full((2,), 3))
        assert torch.equal(labelled.denoiser(x, s), d_c)
        assert torch.allclose(guided.denoiser(x, s), d_u + 2.0 * (d_c - d_u), atol=1e-6)
    code, err = _generate(["--solver", "euler", "--nfe", "2", "--n", "2", "--model", f"edm:{path}", "--label-weights", "1,0,1",
                           "--guidance", "1.5", "--null-label", "3"], tmp_path / "o", capsys)
    assert code == 0, err


def test_every_shipped_table_loads_with_its_shipped_model():
    """Each table in checkpoints/tables is accepted (fingerprint and range) for its model named as a shipped spec."""
    model_of = {"dsno-digits": "dsno-digits", "cd-digits": "cd-digits", "edm-best": "edm", "sd-tiny-best": "sd-tiny",
                "sd3-tiny-best": "sd3-tiny", "sd-tiny-w3": "sd-tiny", "sd3-tiny-w3": "sd3-tiny", "patches-best": "patches",
                "pagoda-patches8": "pagoda-patches8", "pagoda-patches16": "pagoda-patches16",
                "pagoda-patches32": "pagoda-patches32"}
    files = sorted((REPO / "checkpoints" / "tables").glob("*.safetensors"))
    assert len(files) >= 14
    for f in files:
        name = next(model_of[k] for k in sorted(model_of, key=len, reverse=True) if f.name.startswith(k))
        if name.endswith("-tiny"):  # a text-to-image teacher: its training prompts, at the table's guidance scale
            guidance = SolverTable.load(str(f)).metadata["guidance"]
            loaded = load(f"diffusers:{REPO / 'checkpoints' / name}", prompts=str(REPO / "conf" / "prompts" /
                          "captioned-train.txt"), guidance=guidance)
        else:
            loaded = load(name)
        SolverTable.load(str(f), fingerprint=loaded.fingerprint).check_for(loaded.denoiser)
    assert set(SHIPPED) >= {v for v in model_of.values() if not v.endswith("-tiny")}


# --- every option is checked: one error line ---------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--model", "diffusers:{cond}", "--label", "2", "--guidance", "3"], "--label=2 is the null class used for guidance"),
    (["--model", "diffusers:{cond}", "--label", "1", "--guidance", "nan"], "--guidance must be a number (the CFG scale w)"),
    (["--model", "diffusers:{cond}", "--label", "1", "--guidance", "3", "--null-label", "5"], "--null-label must be an integer in [0, 3)"),
    (["--model", "diffusers:{cond}", "--label", "1", "--null-label", "0"], "--null-label is set without --guidance"),
    (["--model", "diffusers:{cond}", "--guidance", "3"], "add --label K or --label-weights"),
    (["--model", "diffusers:{cond}", "--label", "1", "--label-weights", "1,1"], "add --label K or --label-weights"),
    (["--model", "diffusers:{cond}", "--label-weights", "1,1,1,1"], "--label-weights must be 1..3 non-negative numbers"),
    (["--model", "diffusers:{cond}", "--label-weights", "1,x"], "argument --label-weights: must be comma-separated numbers"),
    (["--model", "gmm", "--guidance", "2"], "--model gmm: --guidance is set, but this model is not class-conditional"),
    (["--model", "gmm", "--model-kwargs", "[1]"], "argument --model-kwargs: must be a JSON object"),
    (["--model", "gmm", "--model-kwargs", '{"radius": 2}'], "--model-kwargs radius is not a keyword of gmm"),
    (["--model", "gmm", "--model-kwargs", '{"components": 0}'], "--model-kwargs components must be a positive integer, got 0"),
    (["--model", "gmm", "--model-kwargs", '{"shape": [1, 100000, 100000]}'], "--model-kwargs shape: sample shape"),
    (["--model", "edm", "--model-kwargs", '{"std": 1}'], "--model edm: --model-kwargs applies to gmm, gmm-ring and callable"),
    (["--model", "callable:nonexistent_pkg.mod:make"], "--model callable:nonexistent_pkg.mod:make: cannot import nonexistent_pkg.mod"),
    (["--model", "callable:tests.test_byo_model:raises"], "--model callable:tests.test_byo_model:raises raised RuntimeError"),
    (["--model", "callable:tests.test_byo_model:gaussian", "--model-kwargs", '{"bogus": 1}'], "raised TypeError"),
    (["--model", "callable:tests.test_byo_model:gaussian", "--label", "1"], "--label is set, but this model is not class-conditional"),
    (["--model", "callable:os"], "give package.module:function"),
    (["--model", "pagoda"], "unknown model 'pagoda'; valid: gmm, gmm-ring, edm:PATH, diffusers:DIR, callable:"),
])
def test_bad_model_options_are_one_error_line(cond, tmp_path, capsys, argv, needle):
    argv = [a.replace("{cond}", str(cond)) for a in argv]
    line = _one_error_line(*_generate(["--solver", "euler", "--nfe", "2", "--n", "2", *argv], tmp_path / "o", capsys))
    assert needle in line, line
    assert not (tmp_path / "o").exists()
