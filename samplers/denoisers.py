"""Denoisers in EDM sigma-space: ``D(x, sigma, cond=None) -> E[x0 | x]`` with ``x = x0 + sigma n``.

Other parametrisations are adapters converting at the model boundary.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch


def fingerprint_tensors(named: dict[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> str:
    """16-hex SHA-256 over names, shapes, dtypes and bytes of tensors (sorted by name)."""
    items = sorted(named.items() if isinstance(named, dict) else named, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


class GaussianMixture:
    """Analytic denoiser of a Gaussian mixture with diagonal covariances.

    Data ``x0 ~ sum_m w_m N(mu_m, diag(v_m))``; given ``x = x0 + sigma n``:
    ``E[x0|x] = sum_m p(m|x) (mu_m + v_m / (v_m + sigma^2) (x - mu_m))`` with responsibilities from
    ``log w_m + log N(x; mu_m, v_m + sigma^2)`` by log-sum-exp (stable from sigma 0.002 to 80).
    """

    def __init__(self, means: Any, variances: Any, weights: Any | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must be [M, *shape] (M components), got shape {tuple(means.shape)}.")
        variances = torch.as_tensor(variances, dtype=torch.float64).expand_as(means).clone()
        if torch.any(variances < 0) or not torch.all(torch.isfinite(variances)):
            raise ValueError("variances must be finite and non-negative.")
        m = means.shape[0]
        weights = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (m,) or torch.any(weights <= 0):
            raise ValueError(f"weights must be {m} positive numbers, got {weights.tolist()}.")
        self.means, self.variances, self.weights = means, variances, weights / weights.sum()
        self.shape = tuple(means.shape[1:])
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _params(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (str(device), dtype)
        if key not in self._cache:
            m = self.means.shape[0]
            self._cache[key] = (
                self.means.reshape(m, -1).to(device, dtype),
                self.variances.reshape(m, -1).to(device, dtype),
                self.weights.log().to(device, dtype),
            )
        return self._cache[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        mu, var, log_w = self._params(x.device, x.dtype)
        flat = x.reshape(x.shape[0], 1, -1)  # [B, 1, D]
        s2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1) ** 2
        total = var[None] + s2  # [B, M, D]
        diff = flat - mu[None]
        log_p = log_w[None] - 0.5 * (diff**2 / total + torch.log(total)).sum(-1)  # [B, M]
        resp = torch.softmax(log_p, dim=1)
        post = mu[None] + var[None] / total * diff  # [B, M, D]
        return (resp[..., None] * post).sum(1).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0 (float64, CPU)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.means[comp] + self.variances[comp].sqrt() * eps

    def fingerprint(self) -> str:
        return fingerprint_tensors({"means": self.means, "variances": self.variances, "weights": self.weights})

    @classmethod
    def ring(cls, components: int = 8, radius: float = 2.0, std: float = 0.1) -> "GaussianMixture":
        """The 2-D benchmark: ``components`` equal Gaussians evenly spaced on a circle."""
        angle = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(means, std**2)

    @classmethod
    def random(cls, shape: Sequence[int] = (1, 8, 8), components: int = 6, seed: int = 0) -> "GaussianMixture":
        """A fixed image-shaped mixture: means uniform in [-1, 1], per-pixel stds in [0.05, 0.3]."""
        gen = torch.Generator().manual_seed(seed)
        means = torch.rand((components, *shape), generator=gen, dtype=torch.float64) * 2 - 1
        stds = 0.05 + 0.25 * torch.rand((components, *shape), generator=gen, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=gen, dtype=torch.float64)
        return cls(means, stds**2, weights)
