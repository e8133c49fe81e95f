"""LD3 (the learned-peer baseline): its two time grids, the coefficient gradient, a fit on the exact GMM, soft-teacher
bounds, IIA over its steps, and the command's input errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimize.methods import iia

from optimize.methods import ld3
from samplers import SolverTable, baselines, make_noise, sample
from samplers.denoisers import GaussianMixture

GMM = GaussianMixture.random((1, 8, 8), components=6, seed=0)
SHAPE = (1, 8, 8)
REPO = Path(__file__).resolve().parents[1]


def _noise(seeds: range) -> torch.Tensor:
    return make_noise(1, SHAPE, seeds, dtype=torch.float64)[0]


def test_grids_start_uniform_in_log_sigma_keep_their_ends_and_bound_the_decoupled_sigmas() -> None:
    steps = ld3.LD3Steps(5, 0.002, 80.0, window=0.5)
    s, ev = steps.sigmas()
    np.testing.assert_allclose(s.detach().numpy(), np.exp(np.linspace(math.log(80.0), math.log(0.002), 6)), rtol=1e-12)
    torch.testing.assert_close(ev, s[:-1])  # offsets start at 0
    with torch.no_grad():
        steps.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.5, 0.0, 1.0], dtype=torch.float64))
        steps.offsets.fill_(10.0)  # far outside the window: clamped
    lam, lam_eval = steps.lambdas()
    assert lam[0].item() == pytest.approx(-math.log(80.0)) and lam[-1].item() == pytest.approx(-math.log(0.002))
    assert torch.all(lam[1:] > lam[:-1])
    gap = float((lam[1:] - lam[:-1]).detach().min())
    moved = (lam_eval - lam).detach()
    assert moved[0] == 0 and moved[-1] == 0
    torch.testing.assert_close(moved[1:-1], torch.full((4,), 0.5 * gap, dtype=torch.float64))
    s, ev = steps.sigmas()
    assert ev[0].item() == pytest.approx(80.0) and ev.shape == (5,)


@pytest.mark.parametrize("base", ["unipc", "dpmpp_2m"])
def test_coefficient_gradient_matches_finite_differences_of_the_whole_sample(base: str) -> None:
    steps = ld3.LD3Steps(4)
    with torch.no_grad():
        steps.logits.copy_(torch.tensor([1.0, 0.7, 1.3, 0.9, 1.1], dtype=torch.float64))
        steps.offsets.copy_(torch.tensor([0.0, 0.05, -0.04, 0.03, 0.0], dtype=torch.float64))
    e = _noise(range(8))

    def loss() -> torch.Tensor:
        s, ev = steps.sigmas()
        return sample(ld3._compile(base, {}, s, ev), GMM, e[None]).pow(2).mean()

    loss().backward()
    for p in (steps.logits, steps.offsets):
        grad = p.grad.clone()
        for j in range(1, 4):
            with torch.no_grad():
                p[j] += 1e-6
                up = loss().item()
                p[j] -= 2e-6
                down = loss().item()
                p[j] += 1e-6
            assert grad[j].item() == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-9)


def test_compiled_table_is_the_base_solver_on_the_step_sigmas_told_the_evaluation_sigmas() -> None:
    s = torch.tensor([80.0, 5.0, 0.5, 0.002], dtype=torch.float64)
    ev = torch.tensor([80.0, 5.5, 0.45], dtype=torch.float64)
    table = ld3._compile("unipc", {}, s, ev)
    plain = baselines.build("unipc", 3, sigmas=s.tolist(), end="sigma_min")
    torch.testing.assert_close(table.coef, plain.coef)
    torch.testing.assert_close(table.sigmas, ev)


def test_fit_on_the_gmm_lowers_held_out_error_and_keeps_noises_in_the_ball() -> None:
    """A short LD3 fit (exact denoiser) beats its uniform-log-SNR start on noises it never saw, against the same teacher."""
    table, fitter = ld3.fit(GMM, SHAPE, "unipc", 3, n_train=12, n_valid=8, seed=0, teacher_solver="heun", teacher_nfe=41,
                            dtype=torch.float64, rounds_v1=1, rounds_v2=1, batch_size=4)
    table.validate()
    assert table.nfe == 3 and table.sigmas[0].item() == pytest.approx(80.0)
    assert table.metadata["end"] == "sigma_min" and table.metadata["step_sigmas"][-1] == pytest.approx(0.002)
    for d in fitter.data.values():
        moved = (d["cur"] - d["orig"]).flatten(1).norm(dim=1)
        assert torch.all(moved <= fitter.bound * (1 + 1e-9))
    e = _noise(range(500, 564))
    ref = ld3.teacher_targets(GMM, e, "heun", 41, 0.002, 80.0)
    start = ld3._compile("unipc", {}, *ld3.LD3Steps(3).sigmas())
    err = lambda t: float(ld3.l2_per_sample(sample(t, GMM, e[None]), ref).mean().detach())  # noqa: E731
    assert err(table) < 0.9 * err(start)


def test_iia_fits_over_a_learned_schedule_with_decoupled_sigmas() -> None:
    """IIA takes an LD3-style table (end=sigma_min, evaluation sigmas off the step grid) as its base and lowers the
    error to the converged solve on new noises."""
    s = torch.tensor([80.0, 4.0, 0.6, 0.06, 0.002], dtype=torch.float64)
    base = ld3._compile("unipc", {}, s, torch.tensor([80.0, 4.4, 0.55, 0.065], dtype=torch.float64),
                        {"step_sigmas": s.tolist()})
    fitted = iia.fit(GMM, base, SHAPE, n_fit=64, substeps=4, seed=0, variant="generic", target="trajectory",
                     batch_size=64, dtype=torch.float64)
    e = _noise(range(700, 764))
    ref = sample(baselines.build("heun", 255), GMM, e[None])
    rmse = lambda t: float((sample(t, GMM, e[None]) - ref).pow(2).mean().sqrt())  # noqa: E731
    assert rmse(fitted) < 0.7 * rmse(base)
    np.testing.assert_array_equal(fitted.sigmas.numpy(), base.sigmas.numpy())


@pytest.mark.parametrize("args, message", [
    (["base=heun"], "ld3 base must be one of unipc, dpmpp_2m, dpmpp_3m, ipndm, euler, got 'heun'"),
    (["teacher_nfe=0"], "teacher_nfe must be a positive integer"),
    (["window=1.5"], "window must lie in [0, 0.999], got 1.5"),
    (["teacher_solver=rk4"], "unknown teacher_solver 'rk4'"),
    (["n_train=-3"], "n_train must be a positive integer"),
    (["resume=true"], "ld3 has no resume (got resume=True): rerun the same command; its result is bit-identical"),
    (["compare=[ipndm:later]"], "compare entry 'ipndm:later': the end convention after ':' must be one of zero, sigma_min"),
])
def test_bad_ld3_config_is_one_error_line(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "optimize", "ld3", "model=gmm", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_iia_base_table_errors(tmp_path: Path) -> None:
    stoch = baselines.build("ddim", 4, eta=1.0)
    stoch.save(str(tmp_path / "ddim.safetensors"))
    for base, message in [(f"table:{tmp_path / 'missing.safetensors'}", "base table file"),
                          (f"table:{tmp_path / 'ddim.safetensors'}", "must be a deterministic table of a classic solver")]:
        r = subprocess.run([sys.executable, "-m", "optimize", "iia", "model=gmm", f"base={base}", "nfe=4"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
    baselines.build("unipc", 4, end="sigma_min").save(str(tmp_path / "u4.safetensors"))
    r = subprocess.run([sys.executable, "-m", "optimize", "iia", "model=gmm", f"base=table:{tmp_path / 'u4.safetensors'}",
                        "nfe=5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "has NFE 4; set nfe=4" in r.stderr, r.stderr


# --- no resume: a rerun is bit-identical; a model that leaves the finite numbers is one sentence -----------------------
LD3_FAST = ["nfe=3", "n_train=4", "n_valid=4", "rounds_v1=1", "rounds_v2=1", "evaluate=false"]
NAN_MODEL = Path(__file__).with_name("hostile_targets.py")  # nan_small_sigma: NaN below a threshold


def test_a_rerun_gives_a_bit_identical_table(tmp_path: Path) -> None:
    """What replaces resume: the same command twice gives the same table, bit for bit."""
    from optimize.cli import main

    for run in ("a", "b"):
        main(["ld3", "model=gmm", *LD3_FAST, f"hydra.run.dir={tmp_path / run}"])
    a, b = (SolverTable.load(str(tmp_path / run / "ld3-unipc-gmm-nfe3.safetensors")) for run in ("a", "b"))
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.coef, b.coef)
    assert a.metadata["step_sigmas"] == b.metadata["step_sigmas"] and a.metadata["ld3"]["iterations"] > 0


def test_model_nan_at_small_sigma_is_one_error_line_naming_the_sigma(tmp_path: Path, capsys) -> None:
    """A callable model that passes the pre-check (sigma 2 and 0.5) but gives NaN below sigma 0.01: the teacher solve
    stops the run with one error line naming the evaluation, its sigma and the seed."""
    from optimize.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["ld3", "model=callable", f"model.target={NAN_MODEL}:nan_small_sigma", "model.features=raw", *LD3_FAST,
              f"hydra.run.dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert len(err) == 1, err
    assert re.search(r"teacher solve \(unipc, 20 NFE\) gave NaN or infinite values at the model output of evaluation "
                     r"\d+ \(sigma 0\.00\d+\), first for seed 2000000", err[0]), err
    assert not list((tmp_path / "run").glob("*.safetensors"))


def test_nan_during_the_fit_names_the_iteration_and_the_sigma() -> None:
    """Targets are finite but the learned table evaluates where the model gives NaN (below sigma 0.1 here)."""
    from hostile_targets import nan_small_sigma

    den, shape = nan_small_sigma(0.1)
    e = _noise(range(4)).reshape(4, *SHAPE)[:, :, :4, :4].contiguous()
    fitter = ld3.LD3Fitter(den, "unipc", 3, train=(e, torch.zeros_like(e)), valid=(e, torch.zeros_like(e)),
                           sigma_min=0.002, sigma_max=80.0)
    with pytest.raises(ld3.NaNLossError, match=r"ld3 stopped at iteration 0: the unipc table gave NaN or infinite samples "
                                               r"at the model output of evaluation 2 \(sigma 0\.06\d+\)"):
        fitter.validation_loss()
