"""Denoisers in EDM sigma-space: ``D(x, sigma, cond=None) -> E[x0 | x]`` with ``x = x0 + sigma n``.

Other parametrisations are adapters converting at the model boundary.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np
import torch


def fingerprint_tensors(
    named: dict[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]], config: dict[str, Any] | None = None
) -> str:
    """16-hex SHA-256 over names, shapes, dtypes and bytes of tensors (sorted by name), then the
    sorted-key JSON of ``config`` when given. Floating tensors are hashed as float64, so a model's
    fingerprint survives lossless casts (float32 weights run in float64) and device moves."""
    items = sorted(named.items() if isinstance(named, dict) else named, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        t = t.to(torch.float64) if t.is_floating_point() else t
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if config:
        digest.update(json.dumps(config, sort_keys=True).encode())
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
        """``E[x0 | x]`` for ``x [B, *shape]`` at ``sigma [B]`` (cond is ignored)."""
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
        """Hash of means, variances and weights."""
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


# --- helpers ---------------------------------------------------------------------------------
def _sigma_like(sigma: Any, x: torch.Tensor) -> torch.Tensor:
    """sigma as ``[B]`` in x's dtype and device (a scalar is repeated over the batch)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` so that it broadcasts against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _model_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    """dtype of the model's first floating parameter (default when it has none)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def _tensor_output(out: Any) -> torch.Tensor:
    """A model output as a tensor: diffusers returns ``.sample`` objects or ``(sample,)`` tuples."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _call_model(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    return _tensor_output(model(x, t) if cond is None else model(x, t, cond))


def _module_fingerprint(model: Any, extra: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    named = {f"model.{k}": v for k, v in model.state_dict().items()} if isinstance(model, torch.nn.Module) else {}
    return fingerprint_tensors({**named, **extra}, config=config)


# --- EDM preconditioning ---------------------------------------------------------------------
class EDMPrecond(torch.nn.Module):
    """Raw net F as an EDM denoiser (Karras et al. 2022, Table 1), with ``sd = sigma_data``:

    ``D(x, s) = c_skip x + c_out F(c_in x, c_noise)``, ``c_skip = sd^2/(s^2+sd^2)``,
    ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = log(s)/4``.
    """

    adapter = "edm"

    def __init__(self, net: torch.nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
        self.net = net
        self.sigma_data = float(sigma_data)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``F(c_in x, c_noise[, cond])`` in x's dtype (the net runs in its own); ``sigma`` is ``[B]``."""
        c_in = 1 / (_bcast(sigma, x) ** 2 + self.sigma_data**2).sqrt()
        dtype = _model_dtype(self.net, x.dtype)
        c_noise = (sigma.log() / 4).to(dtype)
        x_in = (c_in * x).to(dtype)
        return _tensor_output(self.net(x_in, c_noise) if cond is None else self.net(x_in, c_noise, cond)).to(x.dtype)

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """``c_skip x + c_out F(c_in x, c_noise[, cond])``."""
        sigma = _sigma_like(sigma, x)
        s, sd = _bcast(sigma, x), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.raw(x, sigma, cond)

    def fingerprint(self) -> str:
        """Hash of the net's state dict and sigma_data."""
        return _module_fingerprint(self.net, {}, {"adapter": self.adapter, "sigma_data": self.sigma_data})


class InputScaled(EDMPrecond):
    """A one-step generator whose raw output is the sample (PaGoDA's code calls its decoder this way):
    ``D(x, s) = F(c_in x, c_noise)``, ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = log(s)/4``; no c_skip, no c_out.
    The output may have another shape than ``x`` (a generator that up-samples)."""

    adapter = "input"

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """``F(c_in x, c_noise[, cond])``."""
        return self.raw(x, _sigma_like(sigma, x), cond)


# --- discrete-time VP (DDPM) models ----------------------------------------------------------
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_alphas_cumprod(abar: torch.Tensor) -> torch.Tensor:
    """``log sigma_t`` of a float64 ``abar_t``; ValueError unless it has at least 2 values in (0, 1), decreasing."""
    if abar.numel() < 2 or not torch.all((abar > 0) & (abar < 1)):
        raise ValueError("alphas_cumprod must hold at least 2 values, each strictly between 0 and 1.")
    log_sigmas = 0.5 * ((1 - abar) / abar).log()
    if not torch.all(log_sigmas[1:] > log_sigmas[:-1]):
        raise ValueError("alphas_cumprod must be strictly decreasing (sigma_t increasing in t).")
    return log_sigmas


class VPDenoiser(torch.nn.Module):
    """Discrete-time VP model ``model(x_vp, t) -> eps | v | x0`` as an EDM denoiser.

    ``x_vp = x / sqrt(1 + s^2)``; the table ``sigma_t = sqrt((1 - abar_t) / abar_t)`` maps s to a
    fractional t, linear in log-sigma (rounded if ``quantize``). x0: eps ``x - s eps``; v
    ``alpha x_vp - s alpha v`` with ``alpha = 1/sqrt(1+s^2)``; sample: the output itself.
    """

    def __init__(self, model: Any, alphas_cumprod: Any, prediction_type: str = "epsilon", quantize: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}.")
        abar = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64)).reshape(-1)
        log_sigmas = check_alphas_cumprod(abar)
        self.model = model
        self.alphas_cumprod = abar
        self.log_sigmas = log_sigmas  # float64 [T], increasing
        self.prediction_type = prediction_type
        self.quantize = bool(quantize)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def sigma_min(self) -> float:
        """sigma at t = 0 (the smallest noise level the model was trained on)."""
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        """sigma at t = T-1."""
        return float(self.log_sigmas[-1].exp())

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.log_sigmas.to(device, dtype)
        return self._cache[key]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional t with ``log sigma = (1-w) log sigma_i + w log sigma_{i+1}``, ``t = i + w``,
        clamped to [0, T-1]; rounded to the nearest integer when ``quantize``."""
        dtype = torch.promote_types(sigma.dtype, torch.float32)
        table = self._table(sigma.device, dtype)
        log_s = sigma.to(dtype).log()
        i = (torch.searchsorted(table, log_s.detach().contiguous()) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[i], table[i + 1]
        t = (i.to(dtype) + (log_s - lo) / (hi - lo)).clamp(0, table.numel() - 1)
        return t.round() if self.quantize else t

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """x0 from ``model(x / sqrt(1 + s^2), t(s)[, cond])``; a ``[B, 2C, ...]`` output (learned
        variance) keeps its first C channels."""
        sigma = _sigma_like(sigma, x)
        t = self.sigma_to_t(sigma)
        if self.quantize:
            t = t.long()
        s = _bcast(sigma, x)
        alpha = 1 / (1 + s**2).sqrt()
        x_vp = alpha * x
        out = _call_model(self.model, x_vp.to(_model_dtype(self.model, x.dtype)), t, cond).to(x.dtype)
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models: [prediction, variance]
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha * x_vp - s * alpha * out
        return out

    def fingerprint(self) -> str:
        """Hash of the model's state dict, alphas_cumprod, prediction_type and quantize."""
        config = {"adapter": "vp", "prediction_type": self.prediction_type, "quantize": self.quantize}
        return _module_fingerprint(self.model, {"alphas_cumprod": self.alphas_cumprod}, config)


class ContinuousVPDenoiser(VPDenoiser):
    """Continuous-time VP-SDE model (Song et al. 2021) as an EDM denoiser, x0 conversions as VPDenoiser.

    ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)`` (EDM Table 1), inverted in closed form
    ``t = (sqrt(beta_min^2 + 2 beta_d log(1 + s^2)) - beta_min) / beta_d``; the model gets
    ``t * time_scale`` (EDM's VP nets: time_scale = 999).
    """

    def __init__(
        self,
        model: Any,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        time_scale: float = 1.0,
        prediction_type: str = "epsilon",
        t_min: float = 1e-5,
    ):
        torch.nn.Module.__init__(self)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}.")
        if beta_d <= 0 or beta_min < 0 or not 0 < t_min < 1:
            raise ValueError(f"need beta_d > 0, beta_min >= 0 and 0 < t_min < 1, got {beta_d}, {beta_min}, {t_min}.")
        self.model = model
        self.beta_min, self.beta_d, self.time_scale, self.t_min = float(beta_min), float(beta_d), float(time_scale), float(t_min)
        self.prediction_type = prediction_type
        self.quantize = False

    def _sigma(self, t: float) -> float:
        return math.sqrt(math.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    @property
    def sigma_min(self) -> float:
        """sigma at t = t_min."""
        return self._sigma(self.t_min)

    @property
    def sigma_max(self) -> float:
        """sigma at t = 1."""
        return self._sigma(1.0)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's time for noise level sigma (exact inverse of sigma(t)), times time_scale."""
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
        t = ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d
        return t * self.time_scale

    def fingerprint(self) -> str:
        """Hash of the model's state dict and the adapter's schedule and prediction type."""
        config = {"adapter": "vp-continuous", "prediction_type": self.prediction_type, "beta_min": self.beta_min,
                  "beta_d": self.beta_d, "time_scale": self.time_scale}
        return _module_fingerprint(self.model, {}, config)


# --- flow matching ---------------------------------------------------------------------------
class FlowDenoiser(torch.nn.Module):
    """Flow-matching velocity model as an EDM denoiser: ``x_t = (1-t) x0 + t n``, ``v = n - x0``.

    ``s = t/(1-t)`` so ``t = s/(1+s)``, ``x_t = x/(1+s)``; ``v = model(x_t, t * time_scale)``;
    ``D = x_t - t v``. Diffusers' flow models (SD3, FlowMatchEulerDiscreteScheduler) take ``time_scale`` =
    num_train_timesteps. ``sigma_min``/``sigma_max``: the noise range the model states (None: none stated; a range
    does not change the model, so it is not in the fingerprint).
    """

    def __init__(self, model: Any, time_scale: float = 1.0, *, sigma_min: float | None = None,
                 sigma_max: float | None = None):
        super().__init__()
        self.model = model
        self.time_scale = float(time_scale)
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's timestep for noise level sigma: ``t * time_scale`` with ``t = s/(1+s)`` (at least float32)."""
        t = sigma / (1 + sigma)
        return t.to(torch.promote_types(t.dtype, torch.float32)) * self.time_scale

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """``x_t - t model(x_t, t * time_scale[, cond])`` with ``t = s/(1+s)``, ``x_t = x/(1+s)``."""
        sigma = _sigma_like(sigma, x)
        t = sigma / (1 + sigma)
        x_t = x / _bcast(1 + sigma, x)
        dtype = _model_dtype(self.model, x.dtype)
        v = _call_model(self.model, x_t.to(dtype), self.sigma_to_t(sigma), cond)
        return x_t - _bcast(t, x) * v.to(x.dtype)

    def fingerprint(self) -> str:
        """Hash of the model's state dict and time_scale."""
        return _module_fingerprint(self.model, {}, {"adapter": "flow", "time_scale": self.time_scale})


# --- classifier-free guidance ----------------------------------------------------------------
def _expand_uncond(uncond: Any, cond: Any) -> Any:
    """uncond broadcast to cond's batch (a missing batch dimension is added); dicts key by key."""
    if isinstance(cond, dict):
        return {k: _expand_uncond(uncond[k], v) for k, v in cond.items()}
    u = torch.as_tensor(uncond, device=cond.device, dtype=cond.dtype)
    if u.ndim == cond.ndim - 1:
        u = u[None]
    return u.expand(cond.shape[0], *cond.shape[1:])


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


class InnerRange:
    """Mixin for a wrapper of ``self.denoiser``: the inner denoiser's noise range (None when it states none), so
    checks of a table against the model's range see through guidance and label wrappers."""

    @property
    def sigma_min(self) -> float | None:
        return getattr(self.denoiser, "sigma_min", None)

    @property
    def sigma_max(self) -> float | None:
        return getattr(self.denoiser, "sigma_max", None)


class CFGDenoiser(InnerRange, torch.nn.Module):
    """Classifier-free guidance ``D = D_u + scale (D_c - D_u)`` in ONE call of the inner denoiser
    on ``[x, x]``, ``[sigma, sigma]``, ``[cond, uncond]`` (concatenated along the batch)."""

    def __init__(self, denoiser: Any, scale: float, uncond: Any):
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale
        self.uncond = uncond

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """``D_u + scale (D_c - D_u)`` from one inner call on the doubled batch."""
        if cond is None:
            raise ValueError("CFGDenoiser needs a cond (the conditional input to guide towards).")
        sigma = _sigma_like(sigma, x)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat(cond, _expand_uncond(self.uncond, cond)))
        d_c, d_u = both.chunk(2)
        return d_u + self.scale * (d_c - d_u)

    def fingerprint(self) -> str:
        """The inner denoiser's fingerprint (guidance does not change the model)."""
        return self.denoiser.fingerprint()


def finite_alphas_cumprod(alphas_cumprod: Any) -> torch.Tensor:
    """float64 ``abar_t`` with a zero terminal value (zero-terminal-SNR schedules, sigma_T = inf) replaced by
    ``min(2^-24, abar_{T-2} / 2)``: diffusers' 2^-24 where it keeps ``abar`` decreasing (a rescaled schedule can
    already reach 4e-9 at T-2), else half the last finite value, so sigma_t stays finite and increasing."""
    abar = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64)).reshape(-1).clone()
    if abar.numel() >= 2 and abar[-1] == 0:
        abar[-1] = min(2.0**-24, float(abar[-2]) / 2)
    return abar
