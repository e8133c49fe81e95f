"""OSS (the optimal-stepsize peer): its teacher trajectory against a hand-written Euler loop, the dynamic programme
against a brute-force search over the same greedy recursion run through samplers.sample, the batch median, the native
grid of a diffusers folder, and the command's input errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from optimize.data.models import native_sigmas
from optimize.methods import oss
from samplers import baselines, make_noise, sample
from samplers.denoisers import GaussianMixture

GMM = GaussianMixture.random((1, 4, 4), components=4, seed=1)
SHAPE = (1, 4, 4)
REPO = Path(__file__).resolve().parents[1]


def _noise(n: int) -> torch.Tensor:
    return make_noise(1, SHAPE, range(100, 100 + n), dtype=torch.float64)[0]


def _euler_path(e: torch.Tensor, grid: np.ndarray, points: list[int]) -> torch.Tensor:
    """Euler from grid[points[0]] e through the listed grid points down to sigma 0, as a table run by samplers.sample."""
    table = baselines.build("euler", len(points), sigmas=[float(grid[p]) for p in points], end="zero")
    return sample(table, GMM, e[None])


def test_teacher_trajectory_is_the_euler_recurrence_written_out() -> None:
    e, grid = _noise(3), oss.teacher_grid(12, 0.01, 40.0)
    traj = oss.teacher_trajectory(GMM, e, grid)
    x = grid[-1] * e
    torch.testing.assert_close(traj[-1], x)
    for i in range(len(grid) - 1, 0, -1):
        x = x + (grid[i - 1] - grid[i]) * (x - GMM(x, torch.full((3,), grid[i], dtype=torch.float64))) / grid[i]
        torch.testing.assert_close(traj[i - 1], x, rtol=1e-9, atol=1e-9)


def test_the_search_equals_brute_force_over_its_recursion() -> None:
    """Two steps: the point i minimising the distance at sigma 0 of N -> i -> 0. Three steps: each j keeps its closest
    2-step state N -> i -> j; the schedule is the j whose third step lands closest at 0."""
    n, e, grid = 10, _noise(4), oss.teacher_grid(10, 0.02, 30.0)
    traj = oss.teacher_trajectory(GMM, e, grid)
    per_k = oss.search(GMM, e, grid, 3)
    assert [s.shape for s in per_k] == [(4, 1), (4, 2), (4, 3)]
    assert (per_k[0] == n).all()

    def cost(x: torch.Tensor, j: int) -> torch.Tensor:  # [B]
        return (x - traj[j]).pow(2).flatten(1).mean(1)

    two = torch.stack([cost(_euler_path(e, grid, [n, i]), 0) for i in range(1, n)])  # [i-1, B]
    np.testing.assert_array_equal(per_k[1][:, 1], (two.argmin(0) + 1).numpy())
    # three steps: the best 2-step state at each j (stepped N -> i -> j), then its last step to 0
    best_i = {}
    for j in range(1, n - 1):
        states = {}
        for i in range(j + 1, n):
            x_i = oss.euler_step(grid[n] * e, GMM(grid[n] * e, torch.full((4,), grid[n], dtype=torch.float64)), grid[n], grid[i])
            states[i] = oss.euler_step(x_i, GMM(x_i, torch.full((4,), grid[i], dtype=torch.float64)), grid[i], grid[j])
        c = torch.stack([cost(states[i], j) for i in states])
        best_i[j] = (c.argmin(0), states, list(states))
    final = []
    for j in range(1, n - 1):
        arg, states, keys = best_i[j]
        x_j = torch.stack([states[keys[int(a)]][b] for b, a in enumerate(arg)])
        final.append(cost(oss.euler_step(x_j, GMM(x_j, torch.full((4,), grid[j], dtype=torch.float64)), grid[j], 0.0), 0))
    j_star = torch.stack(final).argmin(0) + 1
    np.testing.assert_array_equal(per_k[2][:, 2], j_star.numpy())
    for b in range(4):
        arg, _, keys = best_i[int(j_star[b])]
        assert per_k[2][b, 1] == keys[int(arg[b])]


def test_the_searched_schedule_beats_euler_on_the_same_grid_budget() -> None:
    e, grid = _noise(8), oss.teacher_grid(40, 0.02, 30.0)
    traj = oss.teacher_trajectory(GMM, e, grid)
    tables = oss.fit(GMM, SHAPE, [4], n_search=8, teacher_steps=40, sigma_min=0.02, sigma_max=30.0, dtype=torch.float64)
    picked = tables[4].metadata["oss"]["grid_indices"]
    assert picked[0] == 40 and all(a > b for a, b in zip(picked, picked[1:]))
    uniform = [40, 30, 20, 10]
    err = lambda pts: float((_euler_path(e, grid, pts) - traj[0]).pow(2).mean())  # noqa: E731
    assert err(picked) < err(uniform)
    assert tables[4].metadata["step_sigmas"][:-1] == pytest.approx(grid[picked].tolist())


def test_batch_median_is_cal_medium_and_stays_strictly_decreasing() -> None:
    steps = np.array([[10, 5, 2], [10, 7, 3], [10, 6, 1], [10, 4, 2]])
    assert oss.batch_median(steps, 10) == [10, 5, 2]  # (5+6)//2, (2+2)//2
    assert oss.batch_median(np.array([[10, 10, 1]]), 10) == [10, 9, 1]
    assert oss.batch_median(np.array([[10, 1, 1]]), 10) == [10, 2, 1]
    for steps in itertools.islice(itertools.combinations(range(1, 8), 3), 20):
        out = oss.batch_median(np.array([[8, *sorted(steps, reverse=True)]] * 3), 8)
        assert all(a > b for a, b in zip(out, out[1:])) and out[-1] >= 1


def test_native_grid_of_a_diffusers_folder_is_uniform_in_training_time() -> None:
    mcfg = OmegaConf.create({"kind": "diffusers", "path": str(REPO / "checkpoints" / "sd-tiny")})
    native = native_sigmas(mcfg)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    np.testing.assert_allclose(native, ((1 - abar) / abar).sqrt().numpy(), rtol=1e-4)  # diffusers builds betas in float32
    grid = oss.teacher_grid(100, float(native[0]), float(native[-1]), native)
    assert grid[0] == 0 and grid[1] == native[0] and grid[-1] == native[-1] and len(grid) == 101
    assert native_sigmas(OmegaConf.create({"kind": "edm", "path": None})) is None
    with pytest.raises(ValueError, match="exceed the 1000 training times"):
        oss.teacher_grid(2000, float(native[0]), float(native[-1]), native)


def test_native_grid_of_a_flow_pipeline_folder_is_its_training_times() -> None:
    """A saved SD3 pipeline (transformer, no unet) reads scheduler/scheduler_config.json: with shift 1 the flow times
    t = i / 1000 are EDM sigmas t / (1 - t), i = 1 .. 999 (t = 1 has none)."""
    native = native_sigmas(OmegaConf.create({"kind": "diffusers", "path": str(REPO / "checkpoints" / "sd3-tiny")}))
    t = np.arange(1, 1000) / 1000
    np.testing.assert_allclose(native, t / (1 - t), rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["teacher_grid=uniform"], "teacher_grid must be one of karras, native"),
    (["nfe=8", "teacher_steps=5"], "nfe must not exceed teacher_steps=5"),
    (["teacher_steps=1"], "teacher_steps"),
    (["n_search=0"], "n_search"),
])
def test_bad_keys_are_one_error_line(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "optimize", "oss", "model=gmm", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
