"""Sample-quality metrics (float64 internally) and an on-disk cache of high-accuracy reference solves.

Features are ``[N, d]`` tensors or arrays (anything ``torch.as_tensor`` accepts); images are
flattened to ``[N, -1]``. mmd2_unbiased runs on its first input's device (autograd kept); the other
metrics detach, run on the CPU and return Python floats.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samplers.artifact import atomic_save

__all__ = [
    "mmd2_unbiased",
    "kid",
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


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    return _mmd2_from_kernels(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b))


FULL_GRAM_LIMIT = 6000  # kid precomputes the full kernel matrices (3 x N^2 float64) up to this many rows


def kid(feat_a: Any, feat_b: Any, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean of mmd2_unbiased over ``n_subsets`` random subsets (without replacement,
    size ``min(subset_size, N_a, N_b)``) and its standard error ``std(ddof=1) / sqrt(n_subsets)``."""
    a, b = _feats(feat_a).detach().cpu(), _feats(feat_b).detach().cpu()
    _check_pair(a, b, "KID")
    if n_subsets < 2:
        raise ValueError(f"KID needs n_subsets >= 2 for a standard error, got {n_subsets}.")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    picks = [(rng.choice(a.shape[0], size, replace=False), rng.choice(b.shape[0], size, replace=False)) for _ in range(n_subsets)]
    if max(a.shape[0], b.shape[0]) <= FULL_GRAM_LIMIT:
        # subset sums as quadratic forms w^T K w of 0/1 indicator rows w (no gathers): same numbers, faster
        wa = torch.zeros((n_subsets, a.shape[0]), dtype=torch.float64)
        wb = torch.zeros((n_subsets, b.shape[0]), dtype=torch.float64)
        for s, (ia, ib) in enumerate(picks):
            wa[s, torch.from_numpy(ia)] = 1.0
            wb[s, torch.from_numpy(ib)] = 1.0
        k_aa, k_bb, k_ab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
        off = size * (size - 1)
        term_a = (((wa @ k_aa) * wa).sum(1) - wa @ k_aa.diagonal()) / off
        term_b = (((wb @ k_bb) * wb).sum(1) - wb @ k_bb.diagonal()) / off
        vals = (term_a + term_b - 2.0 * ((wa @ k_ab) * wb).sum(1) / size**2).numpy()
    else:
        vals = np.array([float(mmd2_unbiased(a[torch.from_numpy(ia)], b[torch.from_numpy(ib)])) for ia, ib in picks])
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(n_subsets))


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
        atomic_save({"reference": out}, path, {"format": "optimize.reference", **key})
        return out

    @staticmethod
    def _load(path: str, key: dict[str, str], expected: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The stored tensor when ``path`` exists, reads cleanly and matches key, shape and dtype; else None."""
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                header = dict(f.metadata() or {})
                t = f.get_tensor("reference")
        except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
            return None
        if any(header.get(k) != v for k, v in key.items()) or tuple(t.shape) != expected or t.dtype != dtype:
            return None
        return t
