"""Sample-quality metrics (float64 internally) and an on-disk cache of high-accuracy reference solves.

Features are ``[N, d]`` tensors or arrays (anything ``torch.as_tensor`` accepts); images are
flattened to ``[N, -1]``. mmd2_unbiased runs on its first input's device (autograd kept); the other
metrics detach, run on the CPU and return Python floats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from samplers.artifact import atomic_save

__all__ = [
    "mmd2_unbiased",
    "kid",
    "kid_estimate",
    "KIDEstimate",
    "paired_kid_difference",
    "fd_estimate",
    "FDEstimate",
    "FDReference",
    "paired_fd_difference",
    "frechet_from_stats",
    "frechet_distance",
    "sliced_wasserstein",
    "reference_rmse",
    "ReferenceCache",
]


def _feats(x: Any) -> torch.Tensor:
    """``x`` as a float64 ``[N, d]`` tensor (keeps autograd)."""
    t = torch.as_tensor(x)
    t = t.to(torch.float64)
    return t.reshape(t.shape[0], -1)


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` for all pairs."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(k_aa: torch.Tensor, k_bb: torch.Tensor, k_ab: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 from the three kernel matrices (diagonals of k_aa and k_bb excluded)."""
    m, n = k_aa.shape[0], k_bb.shape[0]
    term_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    term_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return term_a + term_b - 2.0 * k_ab.mean()


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what} needs [>=2, d] features on both sides with the same d, got {tuple(a.shape)} and {tuple(b.shape)}.")


def mmd2_unbiased(feat_a: Any, feat_b: Any) -> torch.Tensor:
    """Unbiased MMD^2 with the cubic kernel: ``mean_{i!=j} k(a_i,a_j) + mean_{i!=j} k(b_i,b_j) - 2 mean k(a_i,b_j)``.

    Differentiable in both inputs (a float64 scalar tensor); needs at least 2 rows on each side."""
    a = _feats(feat_a)
    b = _feats(feat_b).to(a.device)
    _check_pair(a, b, "MMD")
    return _mmd2_from_kernels(poly_kernel(a, a), poly_kernel(b, b), poly_kernel(a, b))


BLOCK = 2048  # rows per kernel block: memory stays O(BLOCK * N) however large the sets


def _kernel_row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row sums of ``k(a, b)`` (length N_a), column sums (length N_b) and, for ``a is b``, the diagonal (else empty);
    computed in blocks of BLOCK rows."""
    rows, cols, diag = [], torch.zeros(b.shape[0], dtype=torch.float64), []
    for s in range(0, a.shape[0], BLOCK):
        k = poly_kernel(a[s:s + BLOCK], b)
        rows.append(k.sum(1))
        cols += k.sum(0)
        if a is b:
            diag.append(k.diagonal(s))
    return torch.cat(rows), cols, torch.cat(diag) if diag else torch.empty(0, dtype=torch.float64)


@dataclass
class KIDEstimate:
    """Unbiased MMD^2 of a generated set A (m rows) against a reference set R (n rows), with its jackknife.

    ``loo_a[i]`` is the estimate without generated row i, ``loo_r[j]`` without reference row j. Two estimates on
    the same seeds and the same reference have aligned rows, so their difference has a paired jackknife too.
    """

    value: float
    loo_a: np.ndarray
    loo_r: np.ndarray

    @property
    def se(self) -> float:
        """Two-sample jackknife standard error: ``sqrt(v_A + v_R)``, ``v = (n-1)/n sum (loo - mean loo)^2`` per side.
        It counts the sampling of both sets and, by the Efron-Stein inequality, errs on the large side."""
        return _jackknife_se(self.loo_a, self.loo_r)


def _jackknife_se(loo_a: np.ndarray, loo_r: np.ndarray) -> float:
    var = 0.0
    for loo in (loo_a, loo_r):
        n = loo.shape[0]
        var += (n - 1) / n * float(((loo - loo.mean()) ** 2).sum())
    return math.sqrt(var)


def kid_estimate(feat_a: Any, feat_r: Any) -> KIDEstimate:
    """KID of generated features A against reference features R: the unbiased MMD^2 with the cubic kernel on the
    whole sets (the mean of KID's subset estimates, without their subset noise) and every leave-one-out value.

    With ``S_aa = sum_{i!=j} k(a_i,a_j)``, ``r_i = sum_{j!=i} k(a_i,a_j)`` and ``c_i = sum_j k(a_i,r_j)``, deleting a_i
    gives ``(S_aa - 2 r_i)/((m-1)(m-2)) + S_rr/(n(n-1)) - 2 (S_ar - c_i)/((m-1) n)``; likewise for r_j."""
    a, r = _feats(feat_a).detach().cpu(), _feats(feat_r).detach().cpu()
    _check_pair(a, r, "KID")
    m, n = a.shape[0], r.shape[0]
    if m < 3 or n < 3:
        raise ValueError(f"KID's jackknife needs at least 3 rows on each side, got {m} and {n}.")
    row_aa, _, diag_a = _kernel_row_sums(a, a)
    row_rr, _, diag_r = _kernel_row_sums(r, r)
    row_ar, col_ar, _ = _kernel_row_sums(a, r)
    off_a, off_r = row_aa - diag_a, row_rr - diag_r  # sum over j != i
    s_aa, s_rr, s_ar = off_a.sum(), off_r.sum(), row_ar.sum()
    value = s_aa / (m * (m - 1)) + s_rr / (n * (n - 1)) - 2 * s_ar / (m * n)
    loo_a = (s_aa - 2 * off_a) / ((m - 1) * (m - 2)) + s_rr / (n * (n - 1)) - 2 * (s_ar - row_ar) / ((m - 1) * n)
    loo_r = s_aa / (m * (m - 1)) + (s_rr - 2 * off_r) / ((n - 1) * (n - 2)) - 2 * (s_ar - col_ar) / (m * (n - 1))
    return KIDEstimate(float(value), loo_a.numpy(), loo_r.numpy())


def kid(feat_a: Any, feat_b: Any) -> tuple[float, float]:
    """Kernel Inception Distance and its standard error: ``(kid_estimate(a, b).value, kid_estimate(a, b).se)``."""
    est = kid_estimate(feat_a, feat_b)
    return est.value, est.se


def paired_kid_difference(x: KIDEstimate, y: KIDEstimate) -> tuple[float, float]:
    """``KID(A) - KID(B)`` for two generated sets on the same seeds against the same reference, and its paired
    jackknife standard error (deleting seed i deletes a_i and b_i together)."""
    if x.loo_a.shape != y.loo_a.shape or x.loo_r.shape != y.loo_r.shape:
        raise ValueError("a paired KID difference needs both estimates on the same seeds and the same reference.")
    return x.value - y.value, _jackknife_se(x.loo_a - y.loo_a, x.loo_r - y.loo_r)


def _sqrt_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (negative eigenvalues clipped to 0)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_from_stats(mu1: Any, c1: Any, mu2: Any, c2: Any) -> float:
    """Frechet distance of N(mu1, c1) and N(mu2, c2): ``|mu1-mu2|^2 + Tr(c1 + c2 - 2 (c1 c2)^{1/2})``, with
    ``Tr (c1 c2)^{1/2} = sum sqrt(eig(s c2 s))``, ``s = c1^{1/2}`` (symmetric PSD, tiny negatives clipped;
    the result is clipped at 0)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    c1, c2 = torch.as_tensor(c1, dtype=torch.float64), torch.as_tensor(c2, dtype=torch.float64)
    s = _sqrt_psd(c1)
    m = s @ c2 @ s
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    fd = ((mu1 - mu2) ** 2).sum() + c1.trace() + c2.trace() - 2.0 * tr_sqrt
    return max(float(fd), 0.0)  # rounding (about sqrt(eps) * trace for singular covariances) can dip below 0


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (N-1) covariance of the rows of ``x``."""
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (x.shape[0] - 1)


def frechet_distance(feat_a: Any, feat_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (sample mean, unbiased covariance)."""
    a, b = _feats(feat_a).detach().cpu(), _feats(feat_b).detach().cpu()
    _check_pair(a, b, "FD")
    return frechet_from_stats(*_stats(a), *_stats(b))


N_BOOT = 200  # bootstrap replicates of FD intervals


@dataclass
class FDEstimate:
    """Frechet distance on the whole sets and on ``n_boot`` bootstrap replicates (both sets resampled)."""

    value: float
    boot: np.ndarray

    @property
    def se(self) -> float:
        """Bootstrap standard error (std of the replicates); NaN without replicates."""
        return float(self.boot.std(ddof=1)) if self.boot.size > 1 else float("nan")


def boot_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """``[n_boot, n]`` float64 multiplicities of n rows drawn with replacement, from a seeded generator: the same
    (n, n_boot, seed) always gives the same resamples, which is what pairs two sets on the same seeds."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    return torch.zeros((n_boot, n), dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def _boot_stats(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``[B, d]`` and unbiased covariances ``[B, d, d]`` of the resamples ``counts`` of the rows of x."""
    n = x.shape[0]
    xc = x - x.mean(0)  # centred first: the covariance below is then free of cancellation
    mu = counts @ xc / n
    second = torch.matmul(xc.T[None] * counts[:, None, :], xc)
    cov = (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
    return mu + x.mean(0), cov


@dataclass
class FDReference:
    """A reference set's statistics for fd_estimate: full-set mean/covariance/sqrt and those of its resamples."""

    mu: torch.Tensor
    cov: torch.Tensor
    sqrt: torch.Tensor
    boot_mu: torch.Tensor
    boot_cov: torch.Tensor
    boot_sqrt: torch.Tensor

    @classmethod
    def of(cls, feat_r: Any, n_boot: int = N_BOOT, seed: int = 0, same_seeds: bool = False) -> "FDReference":
        """The reference rows resampled with ``boot_counts(n, n_boot, seed + 1)``, independently of the generated rows
        (``fd_estimate`` draws theirs with ``seed``), or with ``same_seeds``: with the generated rows' own draws, for a
        reference whose row i comes from the same seed as generated row i (samples of another sampler on the same
        noises), so each replicate resamples seeds, the unit both sets share."""
        r = _feats(feat_r).detach().cpu()
        mu, cov = _stats(r)
        boot_mu, boot_cov = _boot_stats(r, boot_counts(r.shape[0], n_boot, seed if same_seeds else seed + 1))
        with _one_thread():
            w, v = torch.linalg.eigh((boot_cov + boot_cov.transpose(1, 2)) / 2)
        boot_sqrt = (v * w.clamp(min=0).sqrt()[:, None, :]) @ v.transpose(1, 2)
        return cls(mu, cov, _sqrt_psd(cov), boot_mu, boot_cov, boot_sqrt)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small batched eigen-decompositions on one thread: on a busy machine torch's threaded batched eigh is
    100x slower than a single thread, and d x d matrices with d ~ 128 gain nothing from threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fd_batch(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_r: torch.Tensor, cov_r: torch.Tensor, sqrt_r: torch.Tensor) -> torch.Tensor:
    """Batched ``|mu_a-mu_r|^2 + Tr(C_a + C_r - 2 (C_r^{1/2} C_a C_r^{1/2})^{1/2})``, clipped at 0."""
    m = sqrt_r @ cov_a @ sqrt_r
    with _one_thread():
        tr_sqrt = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp(min=0).sqrt().sum(-1)
    fd = ((mu_a - mu_r) ** 2).sum(-1) + cov_a.diagonal(0, -2, -1).sum(-1) + cov_r.diagonal(0, -2, -1).sum(-1) - 2 * tr_sqrt
    return fd.clamp(min=0)


def fd_estimate(feat_a: Any, reference: "FDReference | Any", n_boot: int = N_BOOT, seed: int = 0) -> FDEstimate:
    """Frechet distance of generated features A to a reference, with ``n_boot`` bootstrap replicates that resample
    both sets (generated rows with ``boot_counts(m, n_boot, seed)``, reference rows with seed + 1). ``reference``
    is an FDReference (precomputed once per reference set) or the reference features."""
    ref = reference if isinstance(reference, FDReference) else FDReference.of(reference, n_boot, seed)
    a = _feats(feat_a).detach().cpu()
    if a.shape[0] < 2 or a.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"FD needs [>=2, {ref.mu.shape[0]}] generated features, got {tuple(a.shape)}.")
    mu, cov = _stats(a)
    value = float(_fd_batch(mu, cov, ref.mu, ref.cov, ref.sqrt))
    if ref.boot_mu.shape[0] == 0:
        return FDEstimate(value, np.zeros(0))
    boot_mu, boot_cov = _boot_stats(a, boot_counts(a.shape[0], ref.boot_mu.shape[0], seed))
    boot = _fd_batch(boot_mu, boot_cov, ref.boot_mu, ref.boot_cov, ref.boot_sqrt)
    return FDEstimate(value, boot.numpy())


def paired_fd_difference(x: FDEstimate, y: FDEstimate) -> tuple[float, float]:
    """``FD(A) - FD(B)`` for two sets on the same seeds and reference (same resamples), and the standard error of
    the replicate-wise differences."""
    if x.boot.shape != y.boot.shape or x.boot.size < 2:
        raise ValueError("a paired FD difference needs two estimates with the same bootstrap replicates.")
    return x.value - y.value, float((x.boot - y.boot).std(ddof=1))


def sliced_wasserstein(
    a: Any, b: Any, n_projections: int = 256, seed: int = 0, directions: Any | None = None
) -> float:
    """Squared sliced 2-Wasserstein distance of two equal-size point sets:
    ``mean_u mean_i (sort(a.u)_i - sort(b.u)_i)^2`` over unit directions u (``n_projections`` random ones
    from ``seed``, or the rows of ``directions`` normalised)."""
    x, y = _feats(a).detach().cpu(), _feats(b).detach().cpu()
    if x.shape != y.shape:
        raise ValueError(f"sliced Wasserstein needs point sets of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if directions is None:
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn((n_projections, x.shape[1]), generator=gen, dtype=torch.float64)
    else:
        u = torch.as_tensor(directions, dtype=torch.float64).reshape(-1, x.shape[1])
    u = u / u.norm(dim=1, keepdim=True)
    px, _ = torch.sort(x @ u.T, dim=0)
    py, _ = torch.sort(y @ u.T, dim=0)
    return float(((px - py) ** 2).mean())


def reference_rmse(samples: Any, reference: Any) -> float:
    """``sqrt(mean_b mean_j (samples[b,j] - reference[b,j])^2)``: root of the mean squared error over every
    sample b and element j (same noise, so sample b pairs with reference b)."""
    s, r = torch.as_tensor(samples, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    if s.shape != r.shape:
        raise ValueError(f"samples {tuple(s.shape)} and reference {tuple(r.shape)} must have the same shape.")
    return float(((s.detach().cpu() - r.detach().cpu()) ** 2).mean().sqrt())


def distance(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Mean per-sample RMSE and PSNR (peak-to-peak 2, images in [-1, 1]) to ``ref`` from the same noise, each with its
    standard error; ``_rmse``/``_psnr`` keep the per-sample values for paired differences."""
    mse = (x - ref).double().pow(2).flatten(1).mean(1)
    rmse, psnr = mse.sqrt(), 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
    n = len(x)
    return {"rmse": float(rmse.mean()), "rmse_se": float(rmse.std() / math.sqrt(n)),
            "psnr": float(psnr.mean()), "psnr_se": float(psnr.std() / math.sqrt(n)), "_rmse": rmse, "_psnr": psnr}


def paired_mean(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of the per-sample differences a - b and its standard error (same seeds)."""
    d = (a - b).double()
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def seeds_hash(seeds: Sequence[int]) -> str:
    """16-hex SHA-256 of the seed list (order matters) as int64 bytes."""
    arr = np.asarray(list(seeds), dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


class ReferenceCache:
    """High-accuracy reference solves cached in ``folder`` as safetensors (atomic writes), one file per key
    ``(model fingerprint, solver name, nfe, seeds hash, shape, dtype)``."""

    def __init__(self, folder: str):
        self.folder = str(folder)
        self.computed = 0  # how many times compute_fn ran (tests and logs)

    @staticmethod
    def key(fingerprint: str, solver: str, nfe: int, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype) -> dict[str, str]:
        """The key parts as strings (also stored in the file header and checked on load)."""
        return {
            "fingerprint": str(fingerprint),
            "solver": str(solver),
            "nfe": str(int(nfe)),
            "seeds": seeds_hash(seeds),
            "n_seeds": str(len(list(seeds))),
            "shape": json.dumps([int(s) for s in shape]),
            "dtype": str(dtype),
        }

    def path(self, key: dict[str, str]) -> str:
        """``folder/ref-<solver>-<nfe>-<16-hex hash of the key>.safetensors``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        solver = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in key["solver"])
        return os.path.join(self.folder, f"ref-{solver}-{key['nfe']}-{digest}.safetensors")

    def get_or_compute(
        self,
        fingerprint: str,
        solver: str,
        nfe: int,
        seeds: Sequence[int],
        shape: Sequence[int],
        dtype: torch.dtype,
        compute_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The cached ``[len(seeds), *shape]`` reference, else ``compute_fn()`` saved atomically and returned.
        A file that is unreadable or whose header does not match the key is recomputed and replaced."""
        seeds = list(seeds)
        key = self.key(fingerprint, solver, nfe, seeds, shape, dtype)
        path = self.path(key)
        expected = (len(seeds), *[int(s) for s in shape])
        cached = self._load(path, key, expected, dtype)
        if cached is not None:
            return cached
        out = compute_fn().detach().to("cpu", dtype).contiguous()
        if tuple(out.shape) != expected:
            raise ValueError(f"reference solve has shape {tuple(out.shape)}, expected {expected}.")
        if not torch.isfinite(out).all():
            raise ValueError(f"reference solve ({solver}, nfe {nfe}) has non-finite values; not caching it.")
        self.computed += 1
        try:
            atomic_save({"reference": out}, path, {"format": "optimize.reference", **key})
        except OSError as err:  # a cache: the run goes on without it (disk full, read-only folder)
            print(f"note: could not cache the reference solve in {self.folder} ({err.strerror or err}); "
                  f"it will be computed again next time.", file=sys.stderr)
        return out

    @staticmethod
    def _load(path: str, key: dict[str, str], expected: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The stored tensor when ``path`` exists, reads cleanly and matches key, shape and dtype; else None."""
        if not os.path.isfile(path):
            return None

        try:
            with safe_open(path, framework="pt") as f:
                header = dict(f.metadata() or {})
                t = f.get_tensor("reference")
        except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
            return None
        if any(header.get(k) != v for k, v in key.items()) or tuple(t.shape) != expected or t.dtype != dtype:
            return None
        return t
