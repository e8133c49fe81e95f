"""IIA: least-squares weights against numpy, exactness on a Gaussian, gains on the GMM, summed equations, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimize.methods import iia
from samplers import SolverTable, baselines, make_noise, sample
from samplers.denoisers import GaussianMixture

GMM = GaussianMixture.random((1, 8, 8), components=6, seed=0)
SHAPE = (1, 8, 8)


def _noise(seeds: range) -> torch.Tensor:
    return make_noise(1, SHAPE, seeds, dtype=torch.float64)[0]


def _rmse(table: SolverTable, den, e: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((sample(table, den, e[None]) - ref) ** 2).mean().sqrt())


def test_state_rows_and_truncate() -> None:
    heun = baselines.build("heun", 7)
    assert iia.state_rows(heun) == [0, 2, 4, 6, 7]
    assert iia.state_rows(baselines.build("euler", 4)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(iia.step_sigmas(heun), heun.sigmas.numpy()[[0, 2, 4, 6]])
    e = _noise(range(4))
    seen: list[torch.Tensor] = []
    sample(heun, GMM, e[None], callback=lambda i, x, d, s: seen.append(x))
    cut = iia.truncate(heun, 4)
    assert cut.nfe == 4 and torch.equal(sample(cut, GMM, e[None]), seen[4])  # the input of row 4 is the state at sigma_2


@pytest.mark.parametrize("base, variant, target", [("euler", "ddim", "trajectory"), ("euler", "ddim", "step"),
                                                   ("heun", "edm", "step"), ("heun", "edm", "trajectory"),
                                                   ("dpmpp_2m", "dpmpp", "step"), ("dpmpp_2m", "generic", "trajectory"),
                                                   ("heun", "generic", "step"), ("ipndm", "full", "trajectory"),
                                                   ("euler", "free", "step")])
def test_weights_equal_lstsq_on_the_stacked_per_sample_system(base: str, variant: str, target: str) -> None:
    """Every row's weights equal numpy.linalg.lstsq of the system stacked over samples and pixels, built here."""
    nfe, m = (5, 3) if base == "heun" else (4, 3)
    table = baselines.build(base, nfe)
    e = _noise(range(100, 124))
    fitted = iia.fit(GMM, table, SHAPE, n_fit=24, substeps=m, seed=100, variant=variant, target=target, batch_size=10,
                     dtype=torch.float64)
    states = iia.state_rows(table)
    steps = iia.step_sigmas(table)
    if target == "trajectory":  # the base solver on the refined grid, read at the coarse sigmas
        grid = np.concatenate([np.linspace(a, b, m + 1)[:-1] for a, b in zip(steps, [*steps[1:], 0.0])])
        fine = baselines.build(base, 2 * len(grid) - 1 if base == "heun" else len(grid), sigmas=grid.tolist())
        xs: list[torch.Tensor] = []
        out = sample(fine, GMM, e[None], callback=lambda i, x, d, s: xs.append(x))
        fine_states = iia.state_rows(fine)
        targets = [xs[fine_states[j * m]] for j in range(len(steps))] + [out]
    checked: list[bool] = []
    for j, row in enumerate(states[1:], start=1):
        prev = states[j - 1]
        # the IIA sampler's own trajectory up to this row: the fitted table's prefix
        vals: list[torch.Tensor] = []
        ds: list[torch.Tensor] = []
        sample(iia.truncate(fitted, row), GMM, e[None], callback=lambda i, x, d, s: (vals.append(x), ds.append(d)))
        if target == "trajectory":
            y = targets[j]
        else:
            s0, s1 = steps[j - 1], (steps[j] if j < len(steps) else 0.0)
            grid = np.linspace(s0, s1, m + 1)
            if s1 > 0:
                sub = baselines.build(base, 2 * len(grid) - 1 if base == "heun" else len(grid), sigmas=grid.tolist())
                sub = iia.truncate(sub, iia.state_rows(sub)[m])
            else:
                sub = baselines.build(base, 2 * m - 1 if base == "heun" else m, sigmas=grid[:-1].tolist())
            y = sample(sub, GMM, (vals[prev] / s0)[None])
        basis = [e] + vals + [torch.zeros_like(e)] * (table.nfe - len(vals)) + ds + [torch.zeros_like(e)] * (table.nfe - len(ds))
        V = torch.stack([b.flatten() for b in basis], 1).numpy()  # [samples*pixels, columns]
        dirs = iia.directions(table, row, prev, variant)
        base_row = table.coef[row].numpy()
        if len(dirs) == 0:
            np.testing.assert_array_equal(fitted.coef[row].numpy(), base_row)
            continue
        M = V @ dirs.T
        # SVD of the stacked system, columns scaled to unit norm, singular values under 1e-6 of the largest dropped
        # (the fitter's 1e-12 on its Jacobi-scaled normal equations): heun's x_1 is a combination of x_0 and d_0
        scale = 1 / np.linalg.norm(M, axis=0)
        w, _, rank, sv = np.linalg.lstsq(M * scale, y.flatten().numpy() - V @ base_row, rcond=1e-6)
        want, got = base_row + (w * scale) @ dirs, fitted.coef[row].numpy()
        np.testing.assert_allclose(V @ got, V @ want, rtol=1e-6, atol=1e-7 * np.abs(V @ want).max())  # same fit (BLAS order varies with threads)
        if rank == len(dirs) and sv[0] / sv[-1] < 1e4:  # unique and well-conditioned: the same coefficients too
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
        checked.append(rank == len(dirs))
    # the fit checked on every fitted row, the coefficients too on at least two unless the directions are redundant
    # (full and free; generic over heun, whose predictor input x_1 is a combination of x_0 and d_0)
    assert len(checked) >= 2 and (sum(checked) >= 2 or variant in ("full", "free") or (variant, base) == ("generic", "heun"))


def _reference_run(table: SolverTable, den, e: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The table run by a plain loop written here (not the executor): every basis vector, and the output row."""
    n, coef = table.nfe, table.coef.numpy()
    basis = [e] + [torch.zeros_like(e)] * (2 * n)
    for i in range(n):
        x = sum(float(coef[i, c]) * basis[c] for c in range(1 + 2 * n))
        basis[1 + i], basis[1 + n + i] = x, den(x, torch.full((x.shape[0],), float(table.sigmas[i]), dtype=x.dtype))
    return basis, sum(float(coef[n, c]) * basis[c] for c in range(1 + 2 * n))


@pytest.mark.parametrize("name, nfe", [("heun", 5), ("dpmpp_3m", 5), ("dense", 4)])
def test_continuation_resumes_a_run(name: str, nfe: int) -> None:
    """``sample`` on ``continuation(table, start, stop)`` with the known vectors as noise gives the evaluations
    start..stop-1 and row ``stop`` of the whole run, for every start < stop."""
    if name == "dense":  # every causal entry nonzero
        rng = np.random.default_rng(0)
        coef = baselines.build("euler", nfe).coef.numpy() + 0.01 * rng.standard_normal((nfe + 1, 1 + 2 * nfe))
        for i in range(nfe):
            coef[i, [1 + j for j in range(i, nfe)] + [1 + nfe + j for j in range(i, nfe)]] = 0.0
        table = SolverTable(baselines.build("euler", nfe).sigmas, coef)
    else:
        table = baselines.build(name, nfe)
    e = _noise(range(6))
    basis, out = _reference_run(table, GMM, e)
    n = table.nfe
    rows = {r: sample(iia.truncate(table, r), GMM, e[None]) for r in range(1, n)} | {n: out}  # row r's value
    for start in range(n):
        for stop in range(start + 1, n + 1):
            cont, cols = iia.continuation(table, start, stop)
            assert cont.nfe == stop - start and all(c < 1 + start or 1 + n <= c < 1 + n + start for c in cols)
            seen: dict[int, torch.Tensor] = {}
            got = sample(cont, GMM, torch.stack([basis[c] for c in cols]),
                         callback=lambda i, x, d, s: seen.update({1 + start + i: x, 1 + n + start + i: d}))
            torch.testing.assert_close(got, rows[stop], rtol=1e-12, atol=1e-12)
            for c, v in seen.items():
                torch.testing.assert_close(v, basis[c], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="0 <= start < stop <= N"):
        iia.continuation(table, 2, 2)


@pytest.mark.parametrize("variant, base, nfe, target", [("generic", "euler", 4, "step"), ("edm", "heun", 5, "trajectory"),
                                                        ("free", "dpmpp_2m", 4, "step")])
def test_fit_walks_the_fitted_tables_own_trajectory(variant: str, base: str, nfe: int, target: str) -> None:
    """After the fit every batch's stored x_i, d_i are the fitted table's own run (a plain loop here), and each
    sample cost its N coarse evaluations plus the fine solves (no prefix re-runs)."""
    table, m, e = baselines.build(base, nfe), 3, _noise(range(40, 52))
    calls = [0]

    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls[0] += x.shape[0]
        return GMM(x, sigma)

    fitter = iia.IIAFitter(den, table, variant=variant, target=target, substeps=m)
    for row in fitter.rows():
        fitter.begin(row)
        fitter.accumulate(0, e[:5])
        fitter.accumulate(1, e[5:])
        fitter.solve()
    basis, _ = _reference_run(fitter.table(), GMM, e)
    for c, v in fitter.batches[0]["v"].items():
        torch.testing.assert_close(torch.cat([v, fitter.batches[1]["v"][c]]), basis[c], rtol=1e-12, atol=1e-12)
    assert sorted(fitter.batches[0]["v"]) == list(range(1 + 2 * nfe))
    steps = len(iia.step_sigmas(table))
    fine_per_step = 2 * m - 1 if base == "heun" else m  # Heun's last sub-step into sigma 0 is Euler
    if target == "step":
        fine = (steps - 1) * (2 * m if base == "heun" else m) + fine_per_step
    else:
        fine = 2 * steps * m - 1 if base == "heun" else steps * m
    assert calls[0] == len(e) * (nfe + fine)


@pytest.mark.parametrize("target", ["step", "trajectory"])
def test_iia_edm_keeps_plain_heun_on_the_first_step(target: str) -> None:
    """The paper's IIA-EDM: the first step (rows 0..2 of Heun: start, predictor, landing) is the base's exactly,
    every later step is fitted (4 weights, 3 on the last, Euler step)."""
    heun = baselines.build("heun", 7)
    fitted = iia.fit(GMM, heun, SHAPE, n_fit=16, substeps=2, variant="edm", target=target, dtype=torch.float64)
    assert torch.equal(fitted.coef[:3], heun.coef[:3]) and torch.equal(fitted.sigmas, heun.sigmas)
    assert len(iia.directions(heun, 2, 0, "edm")) == 0
    assert [len(iia.directions(heun, r, p, "edm")) for p, r in ((2, 4), (4, 6), (6, 7))] == [4, 4, 3]
    for r in (4, 6, 7):
        assert not torch.equal(fitted.coef[r], heun.coef[r])
    first = fitted.metadata["iia"]["residuals"][0]
    assert first["row"] == 2 and first["rms_fit"] == first["rms_base"] > 0


def test_exact_on_a_single_gaussian() -> None:
    """For one isotropic Gaussian every step of the probability-flow ODE is a linear map that generic IIA can
    express, so the 5-NFE IIA table reproduces its 320-step fine target on unseen noise to rounding."""
    gauss = GaussianMixture(torch.full((1, 2), 0.7), torch.full((1, 2), 0.09))
    table = baselines.build("euler", 5)
    m = 64
    fitted = iia.fit(gauss, table, (2,), n_fit=64, substeps=m, variant="generic", target="trajectory", fine_solver="heun",
                     dtype=torch.float64)
    steps = iia.step_sigmas(table)
    grid = np.concatenate([np.linspace(a, b, m + 1)[:-1] for a, b in zip(steps, [*steps[1:], 0.0])])
    fine = baselines.build("heun", 2 * len(grid) - 1, sigmas=grid.tolist())
    e = make_noise(1, (2,), range(500, 540), dtype=torch.float64)
    exact = 0.7 + (80.0 * e[0] - 0.7) * np.sqrt(0.09 / (80.0**2 + 0.09))  # x(0) = mu + (x_T - mu) sd / sqrt(s^2 + sd^2)
    got, target = sample(fitted, gauss, e), sample(fine, gauss, e)
    assert float((got - target).abs().max()) < 1e-8
    assert float((got - exact).abs().max()) < 0.01 * float((sample(table, gauss, e) - exact).abs().max())


@pytest.mark.parametrize("base, nfe", [("euler", 4), ("euler", 8), ("dpmpp_2m", 6), ("heun", 7)])
def test_beats_its_base_on_the_gmm(base: str, nfe: int) -> None:
    table = baselines.build(base, nfe)
    fitted = iia.fit(GMM, table, SHAPE, n_fit=128, substeps=4, variant=iia.resolve_variant("auto", base), dtype=torch.float64)
    e = _noise(range(7000, 7200))  # held-out noises
    ref = sample(baselines.build("heun", 201), GMM, e[None])
    assert _rmse(fitted, GMM, e, ref) < 0.9 * _rmse(table, GMM, e, ref)
    assert fitted.nfe == table.nfe and torch.equal(fitted.sigmas, table.sigmas)  # zero extra NFE


def test_summed_equations_of_two_shards_equal_one_process() -> None:
    """What DDP's all_reduce does: normal equations of two disjoint shards, summed, give the one-process table."""
    table = baselines.build("dpmpp_2m", 5)
    batches = {j: _noise(range(10 * j, 10 * j + 10)) for j in range(4)}
    one = iia.IIAFitter(GMM, table, variant="dpmpp")
    shards = [iia.IIAFitter(GMM, table, variant="dpmpp"), iia.IIAFitter(GMM, table, variant="dpmpp")]
    for row in one.rows():
        for f in (one, *shards):
            f.begin(row)
        for j, e in batches.items():
            one.accumulate(j, e)
            shards[j % 2].accumulate(j, e)
        summed = [a + b for a, b in zip(shards[0].equations.tensors(), shards[1].equations.tensors())]
        for a, b in zip(summed, one.equations.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))
        for f in shards:
            for t, s in zip(f.equations.tensors(), summed):
                t.copy_(s)
        for f in (one, *shards):
            f.solve()
    for f in shards:
        np.testing.assert_allclose(f.coef, one.coef, rtol=1e-7, atol=1e-9)  # summation order x conditioning


def test_lightning_fit_equals_plain_fit() -> None:
    import lightning as L

    table = baselines.build("euler", 4)
    plain = iia.fit(GMM, table, SHAPE, n_fit=20, seed=3, variant="ddim", batch_size=8, dtype=torch.float64)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    fitter = iia.IIAFitter(GMM, table, variant="ddim")
    lit = iia.fit_lightning(trainer, fitter, list(range(3, 23)), SHAPE, batch_size=8, dtype=torch.float64)
    np.testing.assert_allclose(lit.coef.numpy(), plain.coef.numpy(), rtol=1e-12, atol=1e-14)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="IIA variant 'edm' corrects heun tables, got a euler table"):
        iia.IIAFitter(GMM, baselines.build("euler", 4), variant="edm")
    with pytest.raises(ValueError, match="K = 5 noise vectors"):
        iia.IIAFitter(GMM, baselines.build("ddim", 4, eta=1.0))
    with pytest.raises(ValueError, match="unknown IIA target 'mean'"):
        iia.IIAFitter(GMM, baselines.build("euler", 4), target="mean")
    with pytest.raises(ValueError, match="n_fit must be a positive integer"):
        iia.fit(GMM, baselines.build("euler", 4), SHAPE, n_fit=0)


def _optimize(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimize", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_writes_artifact_that_generate_runs(tmp_path: Path) -> None:
    r = _optimize(["iia", "model=gmm", "nfe=4", "base=euler", "n_fit=32", "n=32", "ref_nfe=21", "n_boot=20", "grid=16",
                   f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    path = tmp_path / "run" / "iia-generic-gmm-nfe4.safetensors"
    table = SolverTable.load(str(path), fingerprint=GMM.fingerprint())
    meta = table.metadata["iia"]
    assert meta["substeps"] == 8 and meta["fine_solver"] == "heun" and table.metadata["n_fit"] == 32 and len(meta["residuals"]) == 4
    assert table.metadata["seed"] == 2_000_000  # the fitting seed range (optimize.base.seeds.FIT_SEED_OFFSET)
    assert "iia-generic" in r.stdout and "euler" in r.stdout  # evaluated beside its base
    g = subprocess.run([sys.executable, "-m", "samplers", "generate", "--table", str(path), "--model", "gmm", "--n", "8",
                        "--dtype", "float64", "--no-progress", "--out", str(tmp_path / "gen")], capture_output=True, text=True, timeout=120)
    assert g.returncode == 0, g.stderr
    got = torch.from_numpy(np.load(tmp_path / "gen" / "samples.npz")["samples"]).to(torch.float64)
    want = sample(table, GMM, make_noise(table, SHAPE, range(8), dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # samples.npz holds float32


@pytest.mark.parametrize("args, needle", [
    (["base=ddim"], "base must be a deterministic classic solver"),
    (["base=euler", "variant=edm"], "IIA variant 'edm' corrects heun tables, not euler"),
    (["base=tada"], "base must be a deterministic classic solver"),
    (["target=mean"], "unknown IIA target 'mean'"),
    (["base=heun", "nfe=4"], "heun needs an odd NFE"),
    (["n_fit=0"], "n_fit must be"),
    (["fit_seed=999990", "n_fit=20"], "fit seeds: seed=999990 with n=20 leaves its seed range"),
])
def test_cli_bad_config(args: list[str], needle: str, tmp_path: Path) -> None:
    r = _optimize(["iia", "model=gmm", *args], tmp_path)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1


def test_torchrun_two_processes_give_the_one_process_table(tmp_path: Path) -> None:
    """Lightning DDP under torchrun (gloo on CPU): the all-reduced fit equals the single-process fit."""
    common = ["iia", "model=gmm", "nfe=4", "n_fit=48", "fit_batch_size=8", "evaluate=false"]
    one = _optimize([*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "optimize", *common, "devices=2",
                          f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (SolverTable.load(str(tmp_path / d / "iia-generic-gmm-nfe4.safetensors")) for d in ("one", "two"))
    assert b.metadata["n_fit"] == 48
    noise = make_noise(a, SHAPE, range(50), dtype=torch.float64)
    torch.testing.assert_close(sample(b, GMM, noise), sample(a, GMM, noise), rtol=1e-7, atol=1e-7)
