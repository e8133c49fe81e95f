"""Metrics against hand-computed values: a direct double-loop MMD, closed-form Gaussian Frechet distances,
exact projected shifts for sliced Wasserstein, and the reference cache's compute-once behaviour."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from optimize import metrics
from optimize.metrics import (
    ReferenceCache,
    frechet_distance,
    frechet_from_stats,
    kid,
    mmd2_unbiased,
    reference_rmse,
    sliced_wasserstein,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mmd2_loop(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3 by explicit double loops."""
    d = a.shape[1]
    k = lambda x, y: (float(np.dot(x, y)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(a), len(b)
    saa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sbb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return saa + sbb - 2 * sab


# --- MMD / KID -------------------------------------------------------------------------------
def test_mmd2_matches_double_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(9, 3))
    assert float(mmd2_unbiased(a, b)) == pytest.approx(_mmd2_loop(a, b), rel=1e-12, abs=1e-12)
    assert float(mmd2_unbiased(torch.tensor(a, dtype=torch.float32), b)) == pytest.approx(_mmd2_loop(a, b), rel=1e-5)


@pytest.mark.parametrize("gram_limit", [6000, 0], ids=["full-gram", "per-subset"])
def test_kid_subsets_match_double_loop(gram_limit, monkeypatch):
    monkeypatch.setattr(metrics, "FULL_GRAM_LIMIT", gram_limit)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(10, 4)) + 1.0
    mean, se = kid(a, b, n_subsets=5, subset_size=10, seed=0)
    assert se > 0
    # the same subsets (same generator calls) through the loop estimator
    vals = []
    gen = np.random.default_rng(0)
    for _ in range(5):
        ia, ib = gen.choice(12, 10, replace=False), gen.choice(10, 10, replace=False)
        vals.append(_mmd2_loop(a[ia], b[ib]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10)
    assert se == pytest.approx(np.std(vals, ddof=1) / math.sqrt(5), rel=1e-8)


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    mean, se = kid(a, b, n_subsets=20, subset_size=200, seed=0)
    assert se > 0 and abs(mean) < 4 * se + 1e-3
    shifted_mean, shifted_se = kid(a, b + 0.5, n_subsets=20, subset_size=200, seed=0)
    assert shifted_mean > 10 * shifted_se and shifted_mean > 0.05
    assert kid(a, b, n_subsets=20, subset_size=200, seed=0) == (mean, se)  # seeded


def test_mmd2_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.normal(size=(4, 3)), requires_grad=True)
    b = torch.tensor(rng.normal(size=(5, 3)))
    (grad,) = torch.autograd.grad(mmd2_unbiased(a, b), a)
    assert torch.isfinite(grad).all()
    h, num = 1e-6, torch.zeros_like(grad)
    for idx in np.ndindex(*a.shape):
        plus, minus = a.detach().clone(), a.detach().clone()
        plus[idx] += h
        minus[idx] -= h
        num[idx] = (_mmd2_loop(plus.numpy(), b.numpy()) - _mmd2_loop(minus.numpy(), b.numpy())) / (2 * h)
    torch.testing.assert_close(grad, num, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x: mmd2_unbiased(x, b), (a,))


def test_mmd_bad_shapes():
    with pytest.raises(ValueError, match="same d"):
        mmd2_unbiased(np.zeros((3, 2)), np.zeros((3, 4)))


# --- Frechet distance ------------------------------------------------------------------------
def test_frechet_from_stats_diagonal_closed_form():
    rng = np.random.default_rng(4)
    va, vb = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    mua, mub = rng.normal(size=5), rng.normal(size=5)
    truth = np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2) + np.sum((mua - mub) ** 2)
    assert frechet_from_stats(mua, np.diag(va), mub, np.diag(vb)) == pytest.approx(truth, rel=1e-10)


def test_frechet_from_stats_full_covariance_commuting_and_symmetric():
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    la, lb = rng.uniform(0.2, 3.0, 4), rng.uniform(0.2, 3.0, 4)
    ca, cb = q @ np.diag(la) @ q.T, q @ np.diag(lb) @ q.T  # commuting: (ca cb)^{1/2} = q sqrt(la lb) q^T
    mua, mub = np.zeros(4), np.ones(4)
    truth = 4.0 + np.sum((np.sqrt(la) - np.sqrt(lb)) ** 2)
    assert frechet_from_stats(mua, ca, mub, cb) == pytest.approx(truth, rel=1e-9)
    # general (non-commuting) case: symmetric, zero on itself
    m = rng.normal(size=(4, 4))
    cc = m @ m.T + 0.1 * np.eye(4)
    assert frechet_from_stats(mua, ca, mub, cc) == pytest.approx(frechet_from_stats(mub, cc, mua, ca), rel=1e-9)
    assert abs(frechet_from_stats(mua, cc, mua, cc)) < 1e-9
    # singular covariance (rank 1): the sqrt of rounding-level eigenvalues limits accuracy to ~sqrt(eps) * trace
    v = rng.normal(size=(4, 1))
    fd = frechet_from_stats(mua, v @ v.T, mua, v @ v.T)
    assert 0.0 <= fd < 1e-6 * float(np.sum(v**2))


def test_frechet_distance_from_samples_approaches_truth():
    gen = torch.Generator().manual_seed(0)
    sa, sb = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.7, 1.5, 1.0])
    dmu = torch.tensor([0.3, -0.2, 0.0])
    a = torch.randn((40_000, 3), generator=gen, dtype=torch.float64) * sa
    b = torch.randn((40_000, 3), generator=gen, dtype=torch.float64) * sb + dmu
    truth = float(((sa - sb) ** 2).sum() + (dmu**2).sum())
    assert frechet_distance(a, b) == pytest.approx(truth, abs=0.03)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-8


# --- sliced Wasserstein ----------------------------------------------------------------------
def test_sliced_wasserstein_shift_exact_and_average():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 2))
    v = np.array([0.6, -0.8]) * 1.5
    u = rng.normal(size=(7, 2))
    un = u / np.linalg.norm(u, axis=1, keepdims=True)
    exact = float(np.mean((un @ v) ** 2))  # projections of a shifted set are shifted by v.u
    assert sliced_wasserstein(x, x + v, directions=u) == pytest.approx(exact, rel=1e-10)
    avg = sliced_wasserstein(x, x + v, n_projections=4000, seed=0)  # E[(v.u)^2] = |v|^2 / d
    assert avg == pytest.approx(np.sum(v**2) / 2, rel=0.05)
    perm = rng.permutation(500)
    assert sliced_wasserstein(x, x[perm]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equal shape"):
        sliced_wasserstein(x, x[:10])


# --- reference RMSE --------------------------------------------------------------------------
def test_reference_rmse_definition():
    s = torch.zeros(2, 1, 2, 2)
    r = torch.zeros(2, 1, 2, 2)
    r[0] = 1.0  # sample 0: every element off by 1, sample 1 exact -> sqrt((4*1 + 4*0) / 8)
    assert reference_rmse(s, r) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        reference_rmse(s, r[:1])


# --- reference cache -------------------------------------------------------------------------
def test_reference_cache_computes_once(tmp_path):
    cache = ReferenceCache(str(tmp_path))
    calls = []

    def compute(seeds):
        def fn():
            calls.append(list(seeds))
            return torch.stack([torch.full((1, 2, 2), float(s)) for s in seeds])

        return fn

    args = dict(fingerprint="abc", solver="heun", nfe=501, shape=(1, 2, 2), dtype=torch.float32)
    first = cache.get_or_compute(seeds=range(3), compute_fn=compute(range(3)), **args)
    second = ReferenceCache(str(tmp_path)).get_or_compute(seeds=range(3), compute_fn=compute(range(3)), **args)
    assert len(calls) == 1 and cache.computed == 1
    assert torch.equal(first, second) and second.dtype == torch.float32
    other = cache.get_or_compute(seeds=[0, 1, 5], compute_fn=compute([0, 1, 5]), **args)
    assert len(calls) == 2 and other[2, 0, 0, 0] == 5.0
    k1 = cache.key(seeds=range(3), **args)
    k2 = cache.key(seeds=[0, 1, 5], **args)
    k3 = cache.key(seeds=range(3), **{**args, "fingerprint": "xyz"})
    assert len({cache.path(k) for k in (k1, k2, k3)}) == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_reference_cache_recomputes_corrupt_file_and_rejects_bad_output(tmp_path):
    cache = ReferenceCache(str(tmp_path))
    args = dict(fingerprint="abc", solver="heun", nfe=11, seeds=[0, 1], shape=(2,), dtype=torch.float64)
    cache.get_or_compute(compute_fn=lambda: torch.zeros(2, 2), **args)
    with open(cache.path(cache.key(**args)), "wb") as f:
        f.write(b"garbage")
    again = cache.get_or_compute(compute_fn=lambda: torch.ones(2, 2), **args)
    assert cache.computed == 2 and torch.equal(again, torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_compute(compute_fn=lambda: torch.zeros(3, 2), **{**args, "nfe": 12})
    with pytest.raises(ValueError, match="non-finite"):
        cache.get_or_compute(compute_fn=lambda: torch.full((2, 2), float("nan")), **{**args, "nfe": 13})
