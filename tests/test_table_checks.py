"""Issue 23: table files hold only values a sampler can use, and a table suits the model it runs on (sigma range,
one-step students)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from samplers import SolverTable, TableError, baselines, make_noise
from samplers.denoisers import GaussianMixture, VPDenoiser
from samplers.nets import load_denoiser
from samplers.table import MAX_COEF, MAX_SIGMA, MAX_TABLE_SIGMA, first_nonfinite

REPO = Path(__file__).resolve().parents[1]


def _raw(path: Path, sigmas: torch.Tensor, coef: torch.Tensor) -> str:
    save_file({"sigmas": sigmas, "coef": coef}, str(path), metadata={"format": "samplers.table", "format_version": "1",
                                                                     "metadata": "{}"})
    return str(path)


def test_load_refuses_increasing_sigmas_and_huge_values(tmp_path: Path) -> None:
    t = baselines.build("euler", 4)
    with pytest.raises(TableError, match=r"must not increase, but sigma_1 = .* > sigma_0"):
        SolverTable.load(_raw(tmp_path / "up.safetensors", t.sigmas.flip(0), t.coef))
    huge = t.coef.clone()
    huge[1, 0] = 1e300
    with pytest.raises(TableError, match="magnitude 1e\\+300 is above 1e\\+12"):
        SolverTable.load(_raw(tmp_path / "huge.safetensors", t.sigmas, huge))
    far = t.sigmas.clone()
    far[0] = 2 * MAX_TABLE_SIGMA
    with pytest.raises(TableError, match="beyond any model's noise range"):
        SolverTable.load(_raw(tmp_path / "far.safetensors", far, t.coef))
    with pytest.raises(TableError, match="above 1e\\+12"):  # never written either
        SolverTable(t.sigmas, huge).save(str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_every_classic_and_shipped_table_passes_the_file_checks() -> None:
    for solver in baselines.SOLVERS:
        for nfe in (1, 2, 5, 10, 50):
            try:
                table = baselines.build(solver, nfe, sigma_max=2e4)
            except ValueError:
                continue  # an NFE the solver cannot meet exactly
            table.check_values()
            assert float(table.coef.abs().max()) < MAX_COEF / 1e4
    shipped = sorted((REPO / "checkpoints" / "tables").glob("*.safetensors"))
    assert len(shipped) >= 10
    for path in shipped:
        SolverTable.load(str(path))


def test_table_sigmas_must_lie_in_the_models_range() -> None:
    abar = torch.linspace(0.9999, 0.0001, 1000, dtype=torch.float64)
    vp = VPDenoiser(lambda x, t: x, abar)
    inside = baselines.build("euler", 4, sigma_min=0.02, sigma_max=vp.sigma_max)
    assert inside.check_for(vp) is inside  # exactly at the model's sigma_max
    with pytest.raises(TableError, match=rf"evaluates sigma 5000, above the largest noise level this model supports \({vp.sigma_max:.6g}\)"):
        baselines.build("euler", 4, sigma_max=5000.0).check_for(vp)
    gmm = GaussianMixture.random()  # states no range: MAX_SIGMA
    baselines.build("euler", 4, sigma_max=MAX_SIGMA).check_for(gmm)


def test_one_step_student_refuses_a_multi_step_table() -> None:
    student = load_denoiser(str(REPO / "checkpoints" / "dsno-digits.safetensors"))
    teacher = load_denoiser(str(REPO / "checkpoints" / "edm-digits.safetensors"))
    assert student.max_nfe == 1 and teacher.max_nfe is None
    SolverTable.load(str(REPO / "checkpoints" / "tables" / "dsno-digits-1nfe.safetensors")).check_for(student)
    with pytest.raises(TableError, match="1-step student that serves tables of at most 1 evaluation.*the table has 4"):
        baselines.build("euler", 4).check_for(student)
    baselines.build("euler", 4).check_for(teacher)


def test_first_nonfinite_names_the_evaluation_sigma_and_sample() -> None:
    table = baselines.build("euler", 4, sigma_min=0.002, sigma_max=80.0)

    def bad_at_small_sigma(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = x / (1 + sigma.reshape(-1, 1) ** 2)
        out[2] = torch.where(sigma[2] < 1.0, float("nan"), out[2])
        return out

    noise = make_noise(table, (3,), range(4), dtype=torch.float64)
    where, first = first_nonfinite(table, bad_at_small_sigma, noise)
    i = int((table.sigmas < 1.0).nonzero()[0])
    assert (where, first) == (f"the model output of evaluation {i} (sigma {float(table.sigmas[i]):.4g})", 2)
