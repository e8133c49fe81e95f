"""Metrics against hand-computed values: a direct double-loop MMD, closed-form Gaussian Frechet distances,
exact projected shifts for sliced Wasserstein, and the reference cache's compute-once behaviour."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from optimize.evaluation import metrics
from optimize.evaluation.metrics import (
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


def test_kid_is_full_set_mmd_and_jackknife_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(10, 4)) + 1.0
    monkeypatch.setattr(metrics, "BLOCK", 5)  # blocked kernel sums agree with one block
    est = metrics.kid_estimate(a, b)
    assert est.value == pytest.approx(_mmd2_loop(a, b), rel=1e-12)
    # leave-one-out values and the two-sample jackknife by brute force
    loo_a = np.array([_mmd2_loop(np.delete(a, i, 0), b) for i in range(12)])
    loo_b = np.array([_mmd2_loop(a, np.delete(b, j, 0)) for j in range(10)])
    np.testing.assert_allclose(est.loo_a, loo_a, rtol=1e-10)
    np.testing.assert_allclose(est.loo_r, loo_b, rtol=1e-10)
    var = 11 / 12 * np.sum((loo_a - loo_a.mean()) ** 2) + 9 / 10 * np.sum((loo_b - loo_b.mean()) ** 2)
    assert est.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert kid(a, b) == (est.value, est.se)


def test_kid_se_covers_zero_for_one_distribution():
    """Two samples of one Gaussian feature distribution (300 and 2,000 rows): the standard error includes both
    sets' sampling, so |KID| / se < 2 in at least 85% of 40 draws (the old subset spread failed this)."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(40):
        real, gen = rng.normal(size=(300, 16)), rng.normal(size=(2000, 16))
        value, se = kid(gen, real)
        hits += abs(value) / se < 2
    assert hits >= 34


def test_kid_se_tracks_the_spread_over_redraws():
    """The jackknife se is close to (and not below) the true spread of KID over independent redraws of both sets."""
    rng = np.random.default_rng(8)
    values, ses = [], []
    for _ in range(40):
        value, se = kid(rng.normal(size=(400, 8)) + 0.15, rng.normal(size=(200, 8)))
        values.append(value)
        ses.append(se)
    assert 0.8 * np.std(values, ddof=1) < np.mean(ses) < 2.0 * np.std(values, ddof=1)


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    mean, se = kid(a, b)
    assert se > 0 and abs(mean) < 4 * se + 1e-3
    shifted_mean, shifted_se = kid(a, b + 0.5)
    assert shifted_mean > 10 * shifted_se and shifted_mean > 0.05


def test_paired_kid_difference_jackknife_and_sign():
    rng = np.random.default_rng(9)
    real, noise = rng.normal(size=(150, 6)), rng.normal(size=(200, 6))
    good, bad = metrics.kid_estimate(noise, real), metrics.kid_estimate(noise * 1.3 + 0.2, real)
    diff, se = metrics.paired_kid_difference(good, bad)
    assert diff == pytest.approx(good.value - bad.value) and diff < -3 * se
    # the paired jackknife is the jackknife of the difference of the leave-one-out values
    loo_a, loo_r = good.loo_a - bad.loo_a, good.loo_r - bad.loo_r
    var = 199 / 200 * np.sum((loo_a - loo_a.mean()) ** 2) + 149 / 150 * np.sum((loo_r - loo_r.mean()) ** 2)
    assert se == pytest.approx(math.sqrt(var), rel=1e-10)
    # same seeds: the paired se is far below the unpaired one for two nearly equal samplers
    near = metrics.kid_estimate(noise * 1.01, real)
    _, paired_se = metrics.paired_kid_difference(good, near)
    assert paired_se < 0.2 * math.hypot(good.se, near.se)
    with pytest.raises(ValueError, match="same seeds"):
        metrics.paired_kid_difference(good, metrics.kid_estimate(noise[:100], real))


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


def test_fd_bootstrap_matches_explicit_resamples():
    rng = np.random.default_rng(10)
    a, r = rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) * 1.2
    est = metrics.fd_estimate(a, r, n_boot=6, seed=3)
    assert est.value == pytest.approx(frechet_distance(a, r), rel=1e-10)
    ca, cr = metrics.boot_counts(50, 6, 3).numpy(), metrics.boot_counts(40, 6, 4).numpy()
    assert (ca.sum(1) == 50).all() and (cr.sum(1) == 40).all()
    for b in range(6):  # replicate b = FD of the rows repeated as often as drawn
        ra, rr = np.repeat(a, ca[b].astype(int), 0), np.repeat(r, cr[b].astype(int), 0)
        assert est.boot[b] == pytest.approx(frechet_distance(ra, rr), rel=1e-8, abs=1e-10)
    assert est.se == pytest.approx(np.std(est.boot, ddof=1))


def test_fd_to_a_reference_on_the_same_seeds_resamples_seeds():
    """same_seeds: a replicate draws seed i's row from both sets together (the generated rows' counts), so a set
    against itself is 0 on every replicate, and a replicate is the FD of the rows repeated as often as their seed."""
    rng = np.random.default_rng(12)
    r = rng.normal(size=(60, 3))
    a = r * 1.1 + 0.2 + 0.3 * rng.normal(size=(60, 3))  # row i of a is a noisy copy of row i of r
    assert np.abs(metrics.fd_estimate(r, metrics.FDReference.of(r, 5, 3, same_seeds=True), seed=3).boot).max() < 1e-8
    assert metrics.fd_estimate(r, metrics.FDReference.of(r, 5, 3), seed=3).boot.min() > 1e-4  # independent draws
    est = metrics.fd_estimate(a, metrics.FDReference.of(r, 5, 3, same_seeds=True), seed=3)
    counts = metrics.boot_counts(60, 5, 3).numpy().astype(int)
    for b in range(5):
        ra, rr = np.repeat(a, counts[b], 0), np.repeat(r, counts[b], 0)
        assert est.boot[b] == pytest.approx(frechet_distance(ra, rr), rel=1e-8, abs=1e-10)


def test_fd_se_tracks_spread_and_paired_difference():
    rng = np.random.default_rng(11)
    values, ses = [], []
    for _ in range(25):
        est = metrics.fd_estimate(rng.normal(size=(300, 4)) * 1.2, rng.normal(size=(300, 4)), n_boot=100)
        values.append(est.value)
        ses.append(est.se)
    assert 0.6 * np.std(values, ddof=1) < np.mean(ses) < 1.7 * np.std(values, ddof=1)
    real, noise = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    ref = metrics.FDReference.of(real, n_boot=100)
    x, y = metrics.fd_estimate(noise * 1.3, ref), metrics.fd_estimate(noise * 1.32, ref)
    diff, se = metrics.paired_fd_difference(x, y)
    assert diff == pytest.approx(x.value - y.value) and diff < 0
    assert se < 0.3 * math.hypot(x.se, y.se)  # pairing removes the shared sampling noise


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
