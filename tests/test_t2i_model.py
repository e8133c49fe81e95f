"""Text-to-image pipelines as models (samplers.t2i, samplers.models.load, python -m samplers generate --prompt,
python -m optimize evaluate model=diffusers model.prompts=...): the latent denoiser with prompts and guidance gives the
stock pipeline's own latents (StableDiffusionPipeline and StableDiffusion3Pipeline, run with TableScheduler, which
tests/test_t2i_scheduler.py checks against a reference written independently), prompts follow seeds, guidance is part
of the fingerprint, images are decoded by the pipeline's VAE, and bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import DiffusionPipeline  # noqa: E402
from tiny_t2i import save_tiny_sd, save_tiny_sd3  # noqa: E402

from samplers import SolverTable, baselines, sample  # noqa: E402
from samplers import __main__ as cli  # noqa: E402
from samplers.diffusers_scheduler import TableScheduler  # noqa: E402
from samplers.models import load  # noqa: E402
from samplers.t2i import PromptDenoiser, expected_fingerprint, load_t2i, prompt_indices  # noqa: E402

PROMPTS = ["a red seven on a blue background", "a green two on a wood background"]
TOL = 2e-5  # relative to the largest |value| (float32 rounding through a few network calls)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i")
    return {"sd": save_tiny_sd(root / "sd"), "sd3": save_tiny_sd3(root / "sd3"),  # other sizes, same code path:
            "sd-wide": save_tiny_sd(root / "sd-wide", seed=1, width=(32, 64), text_width=32, scheduler="ddim"),
            "sd3-wide": save_tiny_sd3(root / "sd3-wide", seed=1, width=32, shift=1.0)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["sd", "sd3", "sd-wide", "sd3-wide"])
@pytest.mark.parametrize("w", [1.0, 7.5])
def test_prompt_denoiser_gives_the_stock_pipelines_latents(folders, kind: str, w: float) -> None:
    """samplers.sample on load_t2i's denoiser with cond = prompt indices equals the stock pipeline with the same
    prompts, guidance scale and initial latents (one prompt per row, guidance in one doubled call)."""
    den = load_t2i(folders[kind], PROMPTS, guidance=w)
    table = baselines.build("dpmpp_2m", 4, sigma_min=den.sigma_min, sigma_max=min(den.sigma_max, 80.0))
    e0 = torch.randn(2, *den.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample(table, den, e0[None], prompt_indices([0, 1], 2))
    pipe = DiffusionPipeline.from_pretrained(str(folders[kind]), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TableScheduler.from_table(table, pipe.scheduler.config)
    latents = e0 if kind.startswith("sd-") or kind == "sd" else e0 * pipe.scheduler.init_noise_sigma  # SD3 does not scale its latents
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=4, guidance_scale=w, latents=latents, output_type="latent").images
    assert den.shape == (4, 8, 8) and den.image_shape == (3, 32, 32)
    assert rel(ours, stock) < TOL, rel(ours, stock)


def test_prompts_follow_seeds_and_fingerprint_rules(folders) -> None:
    """Seed s gets prompt s mod P; the fingerprint ignores the prompts (inputs) but not the guidance scale or the
    negative prompt; fingerprint_at(w) is the fingerprint of the model loaded at w; w <= 1 is unguided."""
    assert prompt_indices([0, 1, 2, 5, 2_000_001], 3).tolist() == [0, 1, 2, 2, 0]
    at = {w: load_t2i(folders["sd"], PROMPTS, guidance=w) for w in (None, 1.0, 3.0, 7.5)}
    assert load_t2i(folders["sd"], ["another prompt"], guidance=7.5).fingerprint() == at[7.5].fingerprint()
    assert at[None].fingerprint() == at[1.0].fingerprint() != at[3.0].fingerprint() != at[7.5].fingerprint()
    assert at[7.5].fingerprint_at(3.0) == at[3.0].fingerprint()
    neg = load_t2i(folders["sd"], PROMPTS, guidance=7.5, negative_prompt="blurry")
    assert neg.fingerprint() != at[7.5].fingerprint()
    with pytest.raises(ValueError, match="prompt index"):
        at[7.5](torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))


def test_guidance_mismatch_is_one_clear_error_unless_asked(folders) -> None:
    """A table learned at 7.5 on a model run at 3: the hint names both scales; any_guidance checks the table against
    the model at the table's own scale."""
    den = load_t2i(folders["sd"], PROMPTS, guidance=3.0)
    meta = {"model_fingerprint": den.fingerprint_at(7.5), "guidance": 7.5}
    fp, hint = expected_fingerprint(meta, den, den.fingerprint())
    assert fp == den.fingerprint() and "learned at guidance 7.5" in hint and "uses 3.0" in hint
    assert expected_fingerprint(meta, den, den.fingerprint(), any_guidance=True) == (den.fingerprint_at(7.5), "")
    assert expected_fingerprint({"guidance": 3.0}, den, "x") == ("x", "")  # same scale: the plain check
    checked = {**meta, "checked_guidance": [3.0, 7.5, 10.0]}  # shipped for 3 and 10 too: accepted at 3 without asking
    assert expected_fingerprint(checked, den, den.fingerprint()) == (den.fingerprint_at(7.5), "")
    fp, hint = expected_fingerprint({**meta, "checked_guidance": [7.5, 10.0]}, den, den.fingerprint())
    assert fp == den.fingerprint() and "learned at guidance 7.5 (checked at 7.5, 10) and this run uses 3.0" in hint


def test_load_errors_are_one_sentence(folders, tmp_path) -> None:
    where = f"--model diffusers:{folders['sd']}"
    cases = [
        (dict(), "needs --prompts"),
        (dict(prompts=["x"], label=1), "--label is set, but a text-to-image pipeline"),
        (dict(prompts=[]), "no prompts given"),
        (dict(prompts=str(tmp_path / "missing.txt")), "not a readable UTF-8 text file"),
        (dict(prompts=["x" * 2000]), "longer than"),
        (dict(prompts=["x"], guidance=float("nan")), "guidance must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            load(f"diffusers:{folders['sd']}", **kwargs)
        assert str(err.value).startswith(where) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="applies to text-to-image pipeline folders"):
        load("gmm", prompts=["x"])


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_decoded_pngs_with_prompts_by_seed(folders, tmp_path, capsys) -> None:
    """generate --prompts FILE --guidance: decoded images (3x32x32) in samples.npz, one PNG per seed and a grid; each
    image is the VAE decode of the executor's latents for its seed's prompt; the prompts are in the metadata."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    code, _, err = run(["generate", "--solver", "euler", "--nfe", "3", "--model", f"diffusers:{folders['sd']}",
                        "--prompts", str(prompts), "--guidance", "5", "--n", "3", "--seed", "4", "--out", str(out),
                        "--no-progress"], capsys)
    assert code == 0, err
    z = np.load(out / "samples.npz")
    meta = json.loads(str(z["metadata"]))
    assert z["samples"].shape == (3, 3, 32, 32) and meta["prompts"] == PROMPTS and meta["guidance"] == 5.0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000004.png", "00000005.png", "00000006.png"]
    assert (out / "grid.png").is_file()
    model = load(f"diffusers:{folders['sd']}", prompts=PROMPTS, guidance=5.0)
    table = baselines.build("euler", 3, sigma_min=max(0.002, model.denoiser.sigma_min),
                            sigma_max=min(80.0, model.denoiser.sigma_max))  # generate's defaults
    from samplers.table import make_noise

    with torch.no_grad():
        x = sample(table, model.denoiser, make_noise(table, model.shape, [4, 5, 6]), model.cond_of([4, 5, 6]))
        ref = model.decode(x)
    assert float((torch.from_numpy(z["samples"]) - ref).abs().max()) < 1e-4


def test_generate_refuses_a_table_of_another_guidance_unless_asked(folders, tmp_path, capsys) -> None:
    model = load(f"diffusers:{folders['sd']}", prompts=PROMPTS, guidance=7.5)
    table = baselines.build("dpmpp_2m", 3, sigma_min=model.denoiser.sigma_min, sigma_max=14.0)
    table.metadata.update(model_fingerprint=model.fingerprint, **model.denoiser.table_metadata())
    path = table.save(str(tmp_path / "t.safetensors"))
    base = ["generate", "--table", path, "--model", f"diffusers:{folders['sd']}", "--prompt", PROMPTS[0], "--n", "1",
            "--no-progress"]
    code, _, err = run([*base, "--guidance", "3", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1 and "learned at guidance 7.5" in err and "--any-guidance" in err
    assert not (tmp_path / "a").exists()
    assert run([*base, "--guidance", "3", "--any-guidance", "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert run([*base, "--guidance", "7.5", "--out", str(tmp_path / "c")], capsys)[0] == 0
    code, _, err = run([*base, "--guidance", "7.5", "--prompts", "x.txt", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "not both" in err
    code, _, err = run(["generate", "--solver", "euler", "--nfe", "2", "--prompt", "x", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "applies to text-to-image pipeline folders" in err and err.count("\n") == 1


def test_optimize_evaluate_decodes_before_the_judge(folders, tmp_path, capsys) -> None:
    """python -m optimize evaluate model=diffusers model.path=SD model.prompts=[...]: the reference RMSE is measured on
    decoded images (3x32x32), equal to the RMSE of the decoded executor samples against the decoded reference solve;
    a missing prompt list is one error line before any work."""
    from optimize.cli import main
    from optimize.evaluation.results import read_results

    run_dir = tmp_path / "run"
    argv = ["evaluate", "model=diffusers", f"model.path={folders['sd']}", f"model.prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
            "model.guidance=3", "solver=euler", "nfe=3", "n=4", "ref_nfe=9", "grid=4", "batch_size=4",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    main(argv)
    capsys.readouterr()
    row = read_results(str(run_dir / "results.csv"))[0]
    model = load(f"diffusers:{folders['sd']}", prompts=PROMPTS, guidance=3.0)
    sigma_min, sigma_max = model.denoiser.sigma_min, model.denoiser.sigma_max
    seeds = list(range(4))
    from samplers.table import make_noise

    def decoded(table: SolverTable) -> torch.Tensor:
        with torch.no_grad():
            return model.decode(sample(table, model.denoiser, make_noise(table, model.shape, seeds), model.cond_of(seeds)))

    ours = decoded(baselines.build("euler", 3, sigma_min=sigma_min, sigma_max=min(80.0, sigma_max)))
    ref = decoded(baselines.build("heun", 9, sigma_min=sigma_min, sigma_max=min(80.0, sigma_max)))
    assert abs(float(row["ref_rmse"]) - float((ours - ref).pow(2).mean().sqrt())) < 1e-4
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "model=diffusers", f"model.path={folders['sd']}", "n=4", f"hydra.run.dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "needs model.prompts" in err and "\n" not in err
    assert isinstance(model.denoiser, PromptDenoiser)


def test_learned_tables_record_guidance_and_latent_shape(folders) -> None:
    """optimize's Model.table_metadata (what ld3, iia and ddss write beside the fingerprint): a text-to-image model adds
    its guidance scale, negative prompt and latent shape; any other model records its name and fingerprint only."""
    from omegaconf import OmegaConf

    from optimize.base import REPO
    from optimize.data.models import load_model

    base = OmegaConf.load(REPO / "conf" / "model" / "diffusers.yaml")
    m = load_model(OmegaConf.merge(base, {"path": str(folders["sd"]), "prompts": PROMPTS, "guidance": 7.5}))
    meta = m.table_metadata()
    assert meta == {"model": "diffusers", "model_fingerprint": m.fingerprint, "guidance": 7.5, "negative_prompt": "",
                    "latent_shape": [4, 8, 8]}
    gmm = load_model(OmegaConf.load(REPO / "conf" / "model" / "gmm.yaml"))
    assert gmm.table_metadata() == {"model": "gmm", "model_fingerprint": gmm.fingerprint}
