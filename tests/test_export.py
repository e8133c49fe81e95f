"""``python -m samplers export`` (samplers/export.py): a classic-solver table's schedule for stock schedulers.

Independent truths:

* diffusers: the exported JSON is handed to the stock diffusers 0.42 scheduler it names (``from_config`` with its
  options, ``set_timesteps`` with its sigmas or timesteps) and run by hand, as StableDiffusionPipeline's loop does,
  on a tiny UNet2DModel; the sample must be the table's (``samplers.sample`` on ``load_diffusers``) to float32
  rounding. A negative control (the Euler scheduler on a DPM-Solver table's sigmas) shows the comparison can fail.
  On-grid cases (DPMSolver, Heun) differ a little more (up to ~1e-5 with v-prediction) also because the stock
  scheduler feeds the net integer timesteps where the table's VPDenoiser computes t from the float32-rounded sigma.
* ComfyUI: not installable here, so its k-diffusion loops (comfy/k_diffusion/sampling.py: sample_euler, sample_heun,
  sample_dpmpp_2m, sample_ipndm, sample_euler_ancestral) are restated below step for step and run on the exported
  SIGMAS list with the analytic Gaussian mixture in float64; they must give the table's sample to 1e-10, and the
  pairs the export refuses (ComfyUI's heun, dpmpp_2m, ipndm take the step to sigma 0 as a plain denoise) must differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from samplers import SolverTable, baselines, make_noise, sample
from test_cli import run_main  # noqa: E402 - the samplers CLI run in this process, as test_cli runs it
from samplers.denoisers import GaussianMixture
from samplers.export import identify
from samplers.models import load_diffusers

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parents[1]
GMM = GaussianMixture.random(shape=(1, 4, 4), components=5, seed=3)
OFF_GRID = [60.0, 12.0, 3.1, 0.7, 0.09]  # LD3-style learned step sigmas: no training timestep's
TOL = 2e-5  # relative to the largest |value|: float32 rounding, amplified a little by a random net


def exported(table: SolverTable, tmp_path: Path, capsys, to: str, *extra: str) -> dict:
    """``python -m samplers export`` of ``table`` (saved first) ``--to to --out FILE``: the JSON it wrote."""
    path, out = tmp_path / "t.safetensors", tmp_path / f"{to}.json"
    table.save(str(path))
    code, stdout, err = run_main(["export", str(path), "--to", to, "--out", str(out), *extra], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out) and err == ""
    return json.loads(out.read_text())


def one_error(argv: list[str], capsys) -> str:
    """Exit 2, nothing on stdout, exactly one ``error:`` line on stderr (no traceback); returns it."""
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- identification ------------------------------------------------------------------------------
CLASSIC = [("euler", 5, {}), ("heun", 5, {}), ("dpmpp_2m", 6, {}), ("dpmpp_3m", 6, {}), ("dpmpp_3m", 6, {"variant": "taylor"}),
           ("ipndm", 6, {}), ("ipndm", 6, {"max_order": 2}), ("unipc", 6, {}), ("unipc", 6, {"order": 3}),
           ("ddim", 5, {"eta": 0.0}), ("ddim", 5, {"eta": 0.4})]


@pytest.mark.parametrize("end", ["zero", "sigma_min"])
@pytest.mark.parametrize("name,nfe,options", CLASSIC)
def test_classic_tables_are_named_with_their_sigmas(name, nfe, options, end):
    table = baselines.build(name, nfe, end=end, **options)
    match = identify(table)
    assert (match.solver, match.nfe, match.end) == (name, nfe, end)
    assert match.options == table.metadata["config"]
    assert match.sigmas == table.metadata["step_sigmas"]  # step sigmas, then where the last step lands


def test_ld3_style_schedule_exports_its_own_sigmas(tmp_path, capsys):
    """dpmpp_2m on learned step sigmas landing on sigma_min (what LD3 with window=0 writes): json names the solver
    and gives the learned sigmas exactly; the rebuild decides, so the same table without metadata is named too."""
    sigmas = [*OFF_GRID, 0.02]
    table = baselines.build("dpmpp_2m", 5, sigmas=sigmas, end="sigma_min")
    table.metadata.update(method="ld3-dpmpp_2m", model="tiny")
    got = exported(table, tmp_path, capsys, "json")
    assert got == {"solver": "dpmpp_2m", "options": {}, "nfe": 5, "end": "sigma_min", "sigmas": sigmas}
    bare = identify(SolverTable(table.sigmas, table.coef, {}))
    assert (bare.solver, bare.end) == ("dpmpp_2m", "sigma_min")
    assert bare.sigmas == pytest.approx(sigmas, rel=1e-14)


def test_the_simplest_equal_solver_is_named():
    """iPNDM of order 1 is Euler, coefficient for coefficient: it is exported as Euler (which stock schedulers run)."""
    assert identify(baselines.build("ipndm", 5, max_order=1)).solver == "euler"


# --- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["diffusers", "comfyui", "json"])
def test_a_learned_table_is_refused(tmp_path, capsys, to):
    table = baselines.build("dpmpp_2m", 5)
    table.coef[3, table.d(1)] += 1e-3  # one learned coefficient
    path, out = tmp_path / "learned.safetensors", tmp_path / "out.json"
    table.save(str(path))
    err = one_error(["export", str(path), "--to", to, "--out", str(out)], capsys)
    assert str(path) in err and "not a classic solver" in err and "TableScheduler" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["learned.safetensors"]


def test_shipped_learned_table_is_refused(capsys):
    """A DDSS table shipped in the repository (learned coefficients and sigmas)."""
    err = one_error(["export", str(REPO / "checkpoints/tables/edm-best-nfe5.safetensors"), "--to", "json"], capsys)
    assert "TableScheduler" in err


def test_ld3_decoupled_evaluation_sigmas_are_refused(tmp_path, capsys):
    """LD3's default window evaluates the denoiser near, not at, its step sigmas: no stock scheduler does that."""
    table = baselines.build("dpmpp_2m", 5, sigmas=[*OFF_GRID, 0.02], end="sigma_min")
    moved = table.sigmas.clone()
    moved[1:4] *= torch.tensor([1.01, 0.99, 1.02], dtype=torch.float64)
    path = tmp_path / "ld3.safetensors"
    SolverTable(moved, table.coef, table.metadata).save(str(path))
    err = one_error(["export", str(path), "--to", "comfyui"], capsys)
    assert "dpmpp_2m's on its step sigmas" in err and "window=0" in err and "TableScheduler" in err


def test_solvers_without_a_stock_peer_are_refused_per_format(tmp_path, capsys):
    path = tmp_path / "unipc.safetensors"
    baselines.build("unipc", 5).save(str(path))
    assert "no diffusers 0.42 scheduler" in one_error(["export", str(path), "--to", "diffusers"], capsys)
    assert "no ComfyUI sampler" in one_error(["export", str(path), "--to", "comfyui"], capsys)
    code, out, _ = run_main(["export", str(path), "--to", "json"], capsys)
    assert code == 0 and json.loads(out)["solver"] == "unipc"


# --- diffusers: the exported list drives the stock scheduler to the table's sample -------------------
@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def tiny(request, tmp_path_factory):
    """(folder, denoiser, scheduler config, training sigma grid) of a tiny UNet2DModel folder."""
    pytest.importorskip("diffusers")
    from tiny_models import save_tiny  # the tests' one tiny diffusers folder; imports diffusers, hence here

    folder = save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), prediction_type=request.param)
    den = load_diffusers(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    abar = den.alphas_cumprod.to(torch.float32)
    grid = (((1 - abar) / abar) ** 0.5).double()  # sigma_t as diffusers computes it (float32)
    return folder, den, config, grid


def stock_sample(recipe: dict, config: dict, unet, noise: torch.Tensor) -> torch.Tensor:
    """The recipe's stock scheduler run by hand as StableDiffusionPipeline runs it (latents times init_noise_sigma,
    scale_model_input, step); the table's sample is ``sample_scale`` times its output."""
    import diffusers  # optional dependency: only the stock-scheduler tests need it (importorskip in ``tiny``)

    scheduler = getattr(diffusers, recipe["scheduler"]).from_config(config, **recipe["scheduler_config"])
    scheduler.set_timesteps(**recipe["set_timesteps"])
    x = noise * recipe["latents_scale"] * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x * recipe["sample_scale"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


GRID_T = [999, 640, 350, 120, 30]  # training timesteps: DPMSolver and Heun take only these
DIFFUSERS_CASES = [  # (solver, nfe, step sigmas (or timesteps), end, options, scheduler)
    ("euler", 5, OFF_GRID, "zero", {}, "EulerDiscreteScheduler"),
    ("euler", 5, OFF_GRID + [0.02], "sigma_min", {}, "EulerDiscreteScheduler"),
    ("ddim", 5, OFF_GRID, "zero", {"eta": 0.0}, "EulerDiscreteScheduler"),
    ("dpmpp_2m", 5, GRID_T, "zero", {}, "DPMSolverMultistepScheduler"),
    ("dpmpp_2m", 5, GRID_T + [0], "sigma_min", {}, "DPMSolverMultistepScheduler"),  # LD3-style, on the grid
    ("dpmpp_3m", 5, GRID_T, "zero", {}, "DPMSolverMultistepScheduler"),
    ("dpmpp_3m", 5, GRID_T + [0], "sigma_min", {}, "DPMSolverMultistepScheduler"),
    ("heun", 5, GRID_T[:3], "zero", {}, "HeunDiscreteScheduler"),
]


@pytest.mark.parametrize("name,nfe,points,end,options,scheduler", DIFFUSERS_CASES)
def test_exported_schedule_gives_the_table_sample_in_stock_diffusers(tiny, tmp_path, capsys, name, nfe, points, end,
                                                                        options, scheduler):
    folder, den, config, grid = tiny
    sigmas = [float(grid[t]) for t in points] if isinstance(points[0], int) else points
    table = baselines.build(name, nfe, sigmas=sigmas, end=end, **options)
    recipe = exported(table, tmp_path, capsys, "diffusers", "--model", f"diffusers:{folder}")
    assert (recipe["solver"], recipe["end"], recipe["scheduler"]) == (name, end, scheduler)
    if scheduler == "EulerDiscreteScheduler":
        assert recipe["set_timesteps"] == {"sigmas": [*sigmas, 0.0] if end == "zero" else sigmas}
    else:
        assert recipe["set_timesteps"] == {"timesteps": [t for t in points if t]}
    noise = make_noise(table, den.shape, range(4))
    want = sample(table, den, noise)
    got = stock_sample(recipe, config, den.model, noise[0])
    err = rel(got, want)
    print(f"{name} end={end} {config['prediction_type']}: {scheduler} vs table, max rel {err:.2e}")
    assert err < TOL
    if name != "euler" and name != "ddim":  # negative control: Euler on the same sigmas is another sampler
        euler = {**recipe, "scheduler": "EulerDiscreteScheduler", "scheduler_config": {"timestep_spacing": "linspace"},
                 "set_timesteps": {"sigmas": [float(s) for s in grid[points[: len(recipe["set_timesteps"]["timesteps"])]]]
                                   + [recipe["sigmas"][-1]]}, "latents_scale": 1.0, "sample_scale": 1.0}
        assert rel(stock_sample(euler, config, den.model, noise[0]), want) > 100 * TOL


def test_off_grid_multistep_schedule_needs_integer_timesteps(tiny, tmp_path, capsys):
    """DPMSolverMultistepScheduler takes no sigmas= in diffusers 0.42, only integer timesteps=: a learned
    off-grid dpmpp_2m schedule is refused for diffusers (and exported for json/comfyui); no --model is refused too."""
    folder = tiny[0]
    path = tmp_path / "ld3.safetensors"
    baselines.build("dpmpp_2m", 5, sigmas=OFF_GRID).save(str(path))
    err = one_error(["export", str(path), "--to", "diffusers", "--model", f"diffusers:{folder}"], capsys)
    assert "integer timesteps" in err and "step 0" in err
    err = one_error(["export", str(path), "--to", "diffusers"], capsys)
    assert "needs --model diffusers:DIR" in err
    code, out, _ = run_main(["export", str(path), "--to", "comfyui"], capsys)
    assert code == 0 and json.loads(out)["sigmas"] == [*OFF_GRID, 0.0]


def test_json_with_a_model_gives_its_timesteps(tiny, tmp_path, capsys):
    folder, den, _, grid = tiny
    table = baselines.build("euler", 3, sigmas=[float(grid[t]) for t in (999, 500, 10)])
    got = exported(table, tmp_path, capsys, "json", "--model", f"diffusers:{folder}")
    assert got["timesteps"] == pytest.approx([999, 500, 10], abs=1e-3)


# --- ComfyUI: k-diffusion's loops, restated, on the exported SIGMAS ----------------------------------
def _gmm(x: torch.Tensor, s: float) -> torch.Tensor:
    return GMM(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))


def k_euler(x, sigmas, noises):
    for i in range(len(sigmas) - 1):
        d = (x - _gmm(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def k_heun(x, sigmas, noises):
    for i in range(len(sigmas) - 1):
        d = (x - _gmm(x, sigmas[i])) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:  # Euler on the step to 0
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - _gmm(x2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def k_dpmpp_2m(x, sigmas, noises):
    old = None
    for i in range(len(sigmas) - 1):
        den = _gmm(x, sigmas[i])
        if sigmas[i + 1] == 0:  # k-diffusion: t_next = inf, so the update is the denoised sample
            x = den
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            if old is None:
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * den
            else:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - old / (2 * r))
        old = den
    return x


def k_ipndm(x, sigmas, noises, max_order: int = 4):
    history: list[torch.Tensor] = []  # the last max_order - 1 slopes
    for i in range(len(sigmas) - 1):
        den = _gmm(x, sigmas[i])
        d = (x - den) / sigmas[i]
        order, dt = min(max_order, i + 1), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x_next = den
        elif order == 1:
            x_next = x + dt * d
        elif order == 2:
            x_next = x + dt * (3 * d - history[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            x_next = x + dt * (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


def k_euler_ancestral(x, sigmas, noises, eta: float = 1.0):
    """``noises[i + 1]`` is step i's fresh noise (the table's e_{i+1}), in place of ComfyUI's own draw."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = _gmm(x, s)
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)) if eta else 0.0
        down = math.sqrt(s_next**2 - up**2)
        x = den if down == 0 else x + (x - den) / s * (down - s) + noises[i + 1] * up
    return x


K_SAMPLERS = {"euler": k_euler, "heun": k_heun, "dpmpp_2m": k_dpmpp_2m, "ipndm": k_ipndm, "euler_ancestral": k_euler_ancestral}
COMFY_CASES = [("euler", 5, {}, "zero"), ("euler", 5, {}, "sigma_min"), ("heun", 7, {}, "zero"), ("dpmpp_2m", 6, {}, "zero"),
               ("ipndm", 6, {}, "sigma_min"), ("ddim", 5, {"eta": 0.0}, "zero"), ("ddim", 5, {"eta": 0.6}, "zero"),
               ("ddim", 5, {"eta": 1.0}, "sigma_min")]


def comfy_run(recipe: dict, noise: torch.Tensor) -> torch.Tensor:
    sigmas = recipe["sigmas"]
    return K_SAMPLERS[recipe["sampler_name"]](noise[0] * sigmas[0], sigmas, noise, **recipe["sampler_options"])


@pytest.mark.parametrize("name,nfe,options,end", COMFY_CASES)
def test_exported_sigmas_give_the_table_sample_in_comfyui_loops(tmp_path, capsys, name, nfe, options, end):
    table = baselines.build(name, nfe, end=end, **options)
    recipe = exported(table, tmp_path, capsys, "comfyui")
    assert recipe["sigmas"] == table.metadata["step_sigmas"] and recipe["solver"] == name
    noise = make_noise(table, GMM.shape, range(4), dtype=torch.float64)
    err = rel(comfy_run(recipe, noise), sample(table, GMM, noise))
    assert err < 1e-10, f"{name} end={end}: ComfyUI's {recipe['sampler_name']} differs by {err:.2e}"


@pytest.mark.parametrize("name,end,sampler", [("heun", "sigma_min", "heun"), ("dpmpp_2m", "sigma_min", "dpmpp_2m"),
                                              ("ipndm", "zero", "ipndm")])
def test_comfyui_pairs_the_export_refuses_really_differ(tmp_path, capsys, name, end, sampler):
    table = baselines.build(name, 5, end=end)
    path = tmp_path / "t.safetensors"
    table.save(str(path))
    assert "no ComfyUI sampler" in one_error(["export", str(path), "--to", "comfyui"], capsys)
    noise = make_noise(table, GMM.shape, range(4), dtype=torch.float64)
    recipe = {"sigmas": table.metadata["step_sigmas"], "sampler_name": sampler, "sampler_options": {}}
    assert rel(comfy_run(recipe, noise), sample(table, GMM, noise)) > 1e-4


# --- bad inputs --------------------------------------------------------------------------------------
def test_bad_inputs_are_one_error_line_and_write_nothing(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    baselines.build("euler", 4).save(str(good))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a table")
    (tmp_path / "sub").mkdir()
    (tmp_path / "afile").write_text("x")
    no_sched = tmp_path / "nosched"
    no_sched.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (["export", str(tmp_path / "missing.safetensors"), "--to", "json"], "no such table file"),
        (["export", str(junk), "--to", "json"], "truncated or corrupt"),
        (["export", str(tmp_path / "sub"), "--to", "json"], "is a folder"),
        (["export", str(good), "--to", "onnx"], "invalid choice"),
        (["export", str(good)], "--to"),
        (["export", str(good), "--to", "json", "--model", "gmm"], "--model must be diffusers:DIR"),
        (["export", str(good), "--to", "json", "--model", f"diffusers:{tmp_path / 'nope'}"], "no such folder"),
        (["export", str(good), "--to", "json", "--model", f"diffusers:{no_sched}"], "not a readable scheduler config"),
        (["export", str(good), "--to", "json", "--out", str(tmp_path / "sub")], "--out must name a file"),
        (["export", str(good), "--to", "json", "--out", ""], "--out must name a file"),
        (["export", str(good), "--to", "json", "--out", str(good)], "is the table file itself"),
        (["export", str(good), "--to", "json", "--out", str(tmp_path / "afile" / "x.json")], "nothing was written"),
    ]
    for argv, words in cases:
        assert words in one_error(argv, capsys), argv
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary left
    assert good.read_bytes()[:8] and SolverTable.load(str(good)).nfe == 4


def test_stdout_without_out_and_a_model_above_the_table(tiny, tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    baselines.build("euler", 4, sigma_max=80.0).save(str(path))
    code, out, err = run_main(["export", str(path), "--to", "json"], capsys)
    assert code == 0 and err == "" and json.loads(out)["sigmas"][-1] == 0.0
    high = tmp_path / "high.safetensors"
    baselines.build("euler", 4, sigma_max=500.0).save(str(high))  # the tiny DDPM model's sigma_max is about 157
    assert "above the largest noise level" in one_error(
        ["export", str(high), "--to", "diffusers", "--model", f"diffusers:{tiny[0]}"], capsys)
