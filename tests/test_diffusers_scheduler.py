"""TableScheduler: solver tables inside diffusers pipelines (samplers/diffusers_scheduler.py).

A tiny randomly initialised UNet2DModel (8x8, about 20k parameters) keeps these fast. Equality is float32
rounding relative to the sample's scale: the pipeline's first network input is its raw latents where the executor
feeds ``alpha_0 * (c_00 * latents / init_noise_sigma)`` (one ulp apart), and a random net amplifies that a little.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from samplers import SolverTable, baselines, make_noise, sample

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from samplers.models import load_diffusers  # noqa: E402
from samplers.diffusers_scheduler import TableScheduler  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
TOL = 2e-5  # relative to the largest |value|: float32 rounding, amplified by a random net over a few steps


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request, tmp_path_factory):
    """(folder, unet, scheduler) of a tiny diffusers model saved with safetensors."""
    folder = tmp_path_factory.mktemp(f"unet-{request.param}")
    unet, sched = tiny_unet(), DDPMScheduler(prediction_type=request.param)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    sched.save_pretrained(folder / "scheduler")
    return folder, unet, sched


def run_loop(unet, scheduler, latents, scale_input: bool = True, multiply: bool = True) -> torch.Tensor:
    """The standard diffusers denoising loop (as in StableDiffusionPipeline), raw output (no clamp)."""
    scheduler.set_timesteps(getattr(scheduler, "nfe", 5))
    x = latents * scheduler.init_noise_sigma if multiply else latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t) if scale_input else x
            x = scheduler.step(unet(inp, t).sample, t, x).prev_sample
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,options", [("dpmpp_2m", {}), ("euler", {}), ("unipc", {"order": 3}),
                                          ("ddim", {"eta": 1.0}), ("tada", {"detail": 0.5})])
def test_table_scheduler_equals_executor(model, name, options):
    """Same noise -> the same sample as samplers.sample with load_diffusers, deterministic and stochastic tables,
    in the standard loop and in DDPMPipeline (which neither scales latents nor calls scale_model_input)."""
    folder, unet, sched = model
    den = load_diffusers(folder)
    table = baselines.build(name, 5, sigma_min=den.sigma_min, sigma_max=80.0, **options)
    ts = TableScheduler.from_table(table, sched.config)
    assert len(ts.timesteps) == table.nfe == ts.nfe
    noise = make_noise(table, (1, 8, 8), range(3))
    latents = noise[0] * ts.init_noise_sigma  # what a pipeline that multiplies by init_noise_sigma holds
    noise[0] = latents / ts.init_noise_sigma
    ts.set_noise(noise)
    ref = sample(table, den, noise)
    out = run_loop(unet, ts, noise[0])
    assert rel(out, ref) < TOL, rel(out, ref)
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    pipe = DDPMPipeline(unet=unet, scheduler=ts)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(7))  # the pipeline's own first draw
    noise[0] = raw / ts.init_noise_sigma
    ts.set_noise(noise)
    img = pipe(batch_size=3, generator=gen, num_inference_steps=table.nfe, output_type="np").images
    hook.remove()
    assert len(calls) == table.nfe  # exactly the table's NFE
    ref = (sample(table, den, noise) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(img - ref).max() < 1e-4


def test_stochastic_draws_from_the_pipeline_generator(model):
    """Without set_noise, the extra noise vectors come from the step generator: same generator, same images."""
    folder, unet, sched = model
    table = baselines.build("ddim", 4, sigma_min=0.01, sigma_max=80.0, eta=1.0)
    pipe = DDPMPipeline(unet=unet, scheduler=TableScheduler.from_table(table, sched.config))
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=4, output_type="np").images
    b = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=4, output_type="np").images
    c = pipe(batch_size=2, generator=torch.Generator().manual_seed(2), num_inference_steps=4, output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_peer_dpmpp_2m_equals_diffusers_dpm_solver(model):
    """Peer check: a dpmpp_2m table on DPMSolverMultistepScheduler's own sigmas, run by TableScheduler in
    DDPMPipeline, equals that diffusers scheduler on the same model and latents (float32 rounding)."""
    folder, unet, sched = model
    for nfe in (4, 6, 10):
        dpm = DPMSolverMultistepScheduler.from_config(sched.config)
        dpm.set_timesteps(nfe)
        table = baselines.build("dpmpp_2m", nfe, sigmas=dpm.sigmas[:-1].double().tolist())
        latents = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(nfe))
        dpm.set_timesteps(nfe)
        x = latents.clone()
        with torch.no_grad():
            for t in dpm.timesteps:
                x = dpm.step(unet(x, t).sample, t, x).prev_sample
        ref = x
        ts = TableScheduler.from_table(table, sched.config)
        out = run_loop(unet, ts, latents / ts.init_noise_sigma)
        err = rel(out, ref)
        print(f"dpmpp_2m NFE {nfe} {sched.config.prediction_type}: TableScheduler vs DPMSolverMultistepScheduler max rel {err:.2e}")
        assert err < 1e-5


def test_save_pretrained_round_trip(model, tmp_path):
    folder, unet, sched = model
    table = baselines.build("ddim", 4, sigma_min=0.01, sigma_max=80.0, eta=0.5)
    ts = TableScheduler.from_table(table, sched.config, quantize=False)
    ts.save_pretrained(tmp_path / "sched")
    back = TableScheduler.from_pretrained(tmp_path / "sched")
    assert torch.equal(back.table.coef, table.coef) and torch.equal(back.table.sigmas, table.sigmas)
    assert back.config.prediction_type == sched.config.prediction_type
    assert torch.equal(back.timesteps, ts.timesteps) and back.init_noise_sigma == ts.init_noise_sigma
    assert json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())["_class_name"] == "TableScheduler"


def test_table_file_and_fingerprint(model, tmp_path):
    folder, unet, sched = model
    den = load_diffusers(folder)
    table = baselines.build("euler", 3, sigma_min=0.01, sigma_max=80.0)
    table.metadata["model_fingerprint"] = den.fingerprint()
    path = table.save(str(tmp_path / "t.safetensors"))
    assert TableScheduler.from_table(path, sched.config, fingerprint=den.fingerprint()).nfe == 3
    with pytest.raises(ValueError):
        TableScheduler.from_table(path, sched.config, fingerprint="0" * 16)


def test_other_step_counts_warn_and_bad_inputs(model):
    folder, unet, sched = model
    ts = TableScheduler.from_table(baselines.build("euler", 3, sigma_min=0.01, sigma_max=80.0), sched.config)
    with pytest.warns(UserWarning, match="3 evaluations"):
        ts.set_timesteps(50)
    assert len(ts.timesteps) == 3
    with pytest.raises(ValueError, match="custom timesteps"):
        ts.set_timesteps(timesteps=[1, 2, 3])
    x = torch.zeros(1, 1, 8, 8)
    ts.set_timesteps(3)
    for t in ts.timesteps:
        x = ts.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="step called 4 times"):
        ts.step(torch.zeros_like(x), ts.timesteps[0], x)
    with pytest.raises(ValueError, match="prediction_type"):
        TableScheduler.from_table(baselines.build("euler", 3), {**sched.config, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="from_table"):
        TableScheduler()


def test_import_samplers_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import samplers, sys; print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_scheduler_uses_only_the_public_executor():
    """TableScheduler runs the table through samplers.table.TableRun (issue 24): it imports no private name and
    reads no private attribute of another object (no second plan of buffer lifetimes, no private row combination)."""
    import ast
    import inspect

    import samplers.diffusers_scheduler as module

    tree = ast.parse(inspect.getsource(module))
    private = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names
               if a.name.startswith("_") and not a.name.startswith("__")]
    foreign = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    assert not private and not foreign, (private, foreign)
    assert "TableRun" in {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
