"""``TableScheduler``: run any solver table inside a diffusers pipeline.

    from samplers.diffusers_scheduler import TableScheduler
    pipe.scheduler = TableScheduler.from_table("ddss-ggdm-nfe5.safetensors", pipe.scheduler.config)
    images = pipe(prompt, num_inference_steps=pipe.scheduler.nfe, guidance_scale=7.5, generator=g).images

The pipeline's own loop (``set_timesteps``, ``scale_model_input``, ``step``) then makes exactly the table's N
network calls. Two model families, read from the pipeline's scheduler config:

- DDPM-family (``DDPMPipeline``, ``StableDiffusionPipeline``: betas, ``prediction_type`` epsilon / v_prediction /
  sample): the pipeline's sample is VP, ``x / sqrt(1 + sigma^2)`` (``samplers.denoisers.VPDenoiser``); timesteps are
  fractional (``VPDenoiser.sigma_to_t``; rounded for nets with a learned time embedding, ``quantize=True``).
- Flow matching (``StableDiffusion3Pipeline``: ``FlowMatchEulerDiscreteScheduler``, no betas; ``prediction_type``
  becomes flow_prediction): the sample is ``x_t = x / (1 + sigma) = (1 - t) x0 + t n`` with ``t = sigma / (1 + sigma)``,
  the net gets timestep ``t * num_train_timesteps`` and returns the velocity ``v = n - x0``, so ``x0 = x_t - t v``
  (``samplers.denoisers.FlowDenoiser``). The config's ``shift`` only sets the model's noise range
  (``samplers.models.flow_sigmas_of``); the table's sigmas are the schedule, so ``mu`` (dynamic shifting) is ignored.

The sample the scheduler hands back after step i is the next network input in the pipeline's space (the table's
``x`` are in EDM sigma-space), so ``scale_model_input`` is the identity, whatever batch it gets (pipelines with
classifier-free guidance call it on the doubled batch ``[latents, latents]`` and call ``step`` with the guided output
for the B rows). ``init_noise_sigma = |c_0| a(sigma_0)`` with ``c_0`` row 0's noise coefficients and ``a`` the space's
input scaling: the first input ``x_0 = c_0 . e`` is ``|c_0| u`` for a standard normal ``u``, and ``u`` is the
pipeline's initial latents divided by ``init_noise_sigma``. For a first row that reads e_0 alone (Euler, DPM-Solver,
DDIM, ...), ``e_0 = sign(c_00) u``; when it mixes several noise vectors (TADA), they are ``e = z + w (u - w . z)`` with
``w = c_0 / |c_0|`` and ``z`` fresh standard normals: the conditional law of ``e`` given the first input, so the net's
first input needs no noise drawn before the first ``step``. Pipelines that do not multiply by ``init_noise_sigma``
(``DDPMPipeline``, SD3) pass the raw draw, read the same way; so from the same latents the pipeline gives
``samplers.sample(table, D, e)`` up to float32 rounding, where ``D`` is the pipeline's net as an x0 denoiser (with the
pipeline's guidance), the conversions repeating ``VPDenoiser`` / ``FlowDenoiser`` operation by operation, and the rows
combined, and their buffers freed, by the executor's own ``samplers.table.TableRun``.

Further noise vectors (stochastic tables, K > 1) are drawn when a row first needs them, in column order: from the
``generator`` the pipeline passes to ``step`` (StableDiffusionPipeline, DDPMPipeline), else (SD3 passes none) from one
CPU generator per sample seeded with the SHA-256 of that sample's initial latents, so the pipeline's generator still
fixes the image; ``set_noise([K, B, ...])`` gives them all for exact reproduction. A table always runs whole:
img2img and inpainting with ``strength < 1`` (``set_begin_index > 0``) are refused with one sentence; with
``strength=1`` they start from the pipeline's noised image at the table's first sigma, so a table whose first sigma is
the level to start from runs img2img exactly. The table and the noise schedule live in the scheduler config, so
``save_pretrained`` / ``from_pretrained`` round-trip. This module imports diffusers; ``import samplers`` never does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .denoisers import PREDICTION_TYPES, FlowDenoiser, VPDenoiser
from .schedule_config import (FLOW_PREDICTION, SCHEDULE_KEYS, alphas_cumprod_of, flow_shift_of, flow_sigmas_of,
                              is_flow_config)
from .table import SolverTable, TableRun

SIGMA_RTOL = 1e-6  # a table's sigma may exceed the schedule's sigma_max by this much (float rounding)
FLOW_KEYS = ("num_train_timesteps", "use_dynamic_shifting", "invert_sigmas")  # besides shift / flow_shift


@dataclass
class TableSchedulerOutput(BaseOutput):
    """``prev_sample``: the next network input (the pipeline's space), or the final sample after the last step;
    ``pred_original_sample``: the x0 prediction ``d_i`` of this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def sigma_range(config: Any) -> tuple[float, float]:
    """(sigma_min, sigma_max) in EDM sigma-space of a diffusers scheduler config (DDPM-family or flow matching): the
    range a table for that model should span. For flow matching sigma_max is the level of the last training time
    below t = 1 (pure noise, sigma infinite); a table may start above it."""
    log_s = _log_sigmas(config)
    return float(log_s[0].exp()), float(log_s[-1].exp())


def _log_sigmas(config: Any) -> torch.Tensor:
    if is_flow_config(config):
        return flow_sigmas_of(config).log()
    return VPDenoiser(None, alphas_cumprod_of(config)).log_sigmas


class TableScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a ``samplers`` solver table (see the module docstring)."""

    config_name = "scheduler_config.json"
    _compatibles: list[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        quantize: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        invert_sigmas: bool = False,
        table_sigmas: Sequence[float] | None = None,
        table_coef: Sequence[Sequence[float]] | None = None,
        table_metadata: dict | None = None,
    ):
        self.flow = prediction_type == FLOW_PREDICTION
        if not self.flow and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"TableScheduler: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}.")
        if table_sigmas is None or table_coef is None:
            raise ValueError("TableScheduler needs a table: use TableScheduler.from_table(path, pipe.scheduler.config).")
        if not isinstance(quantize, (bool, np.bool_)):
            raise ValueError(f"TableScheduler: quantize must be true or false, got {quantize!r}.")
        if self.flow and quantize:
            raise ValueError("TableScheduler: quantize (integer timesteps) is for UNets with a learned time embedding; "
                             "a flow-matching model takes t * num_train_timesteps as it is.")
        self.table = SolverTable(np.asarray(table_sigmas, dtype=np.float64), np.asarray(table_coef, dtype=np.float64),
                                 dict(table_metadata or {}))
        k = self.table.n_noise
        row0 = self.table.coef[0].numpy()[:k]
        first = np.flatnonzero(row0)
        if first.size == 0:
            raise ValueError("TableScheduler: the table's first input reads no noise vector (row 0 is zero).")
        norm = math.sqrt(sum(float(c) ** 2 for c in row0[first]))
        self._first = [(int(j), float(row0[j]) / norm) for j in first]  # w = c_0 / |c_0| on row 0's noises
        if self.flow:
            self._vp, self._flow = None, FlowDenoiser(None, time_scale=float(num_train_timesteps))
            self._log_sigmas = flow_sigmas_of(self.config).log()
        else:
            self._vp = VPDenoiser(None, alphas_cumprod_of(self.config), prediction_type=prediction_type,
                                  quantize=bool(quantize))
            self._flow, self._log_sigmas = None, self._vp.log_sigmas
        self._check_sigma_range()
        s0 = float(self.table.sigmas[0])
        # the pipeline's initial latents / init_noise_sigma = u, with the first input x_0 = |c_0| u (EDM space)
        self.init_noise_sigma = norm / (1.0 + s0) if self.flow else norm / math.sqrt(1.0 + s0 * s0)
        self.num_inference_steps = self.table.nfe
        self._sigmas32 = self.table.sigmas.to(torch.float32)
        self.timesteps = self._timesteps(torch.device("cpu"))
        self.sigmas = self._pipeline_sigmas()
        self._noise: torch.Tensor | None = None
        self._begin_index: int | None = None
        self._reset()

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: str | os.PathLike | SolverTable, config: Any = None, *, quantize: bool | None = None,
                   fingerprint: str | None = None, **overrides: Any) -> "TableScheduler":
        """A scheduler running ``table`` (a SolverTable or a table file, checked against ``fingerprint`` when
        given) with the noise schedule and prediction type of ``config``, the pipeline's scheduler config: any
        DDPM-family scheduler, or a flow-matching one (FlowMatchEulerDiscreteScheduler; DPMSolver / UniPC with
        ``use_flow_sigmas``). ``quantize``: integer timesteps (nets with a learned time embedding)."""
        if not isinstance(table, SolverTable):
            table = SolverTable.load(str(table), fingerprint=fingerprint)
        if config is not None and is_flow_config(config):
            keys = {k: config[k] for k in FLOW_KEYS if k in config}
            keys.update(prediction_type=FLOW_PREDICTION, shift=flow_shift_of(config))
        else:
            keys = {k: config[k] for k in SCHEDULE_KEYS if config is not None and k in config}
        if isinstance(keys.get("trained_betas"), (torch.Tensor, np.ndarray)):
            keys["trained_betas"] = [float(b) for b in keys["trained_betas"]]
        if quantize is not None:  # a non-boolean is refused by __init__, not read as its truth value
            keys["quantize"] = bool(quantize) if isinstance(quantize, (bool, np.bool_)) else quantize
        keys.update(overrides)
        meta = {k: v for k, v in table.metadata.items() if _jsonable(v)}
        return cls(**keys, table_sigmas=[float(s) for s in table.sigmas], table_coef=table.coef.tolist(), table_metadata=meta)

    def _check_sigma_range(self) -> None:
        """Every table sigma within the schedule's range (``sigma_to_t`` would clamp it silently): above sigma_max by at
        most SIGMA_RTOL (rounding; a flow model is trained up to t = 1, sigma infinite, so it has no upper limit),
        below sigma_min by at most half a training step in log-sigma (t > -0.5, which a quantized net rounds to 0
        anyway; this admits round values like 0.01 for DDPM's 0.0100013)."""
        log_s = self._log_sigmas
        lo, hi = float(log_s[0].exp()), float(log_s[-1].exp())
        floor = float((log_s[0] - 0.5 * (log_s[1] - log_s[0])).exp())
        top = math.inf if self.flow else hi * (1 + SIGMA_RTOL)
        for i, s in enumerate(self.table.sigmas.tolist()):
            if not floor <= s <= top:
                span = (f"flow-matching schedule's range [sigma_min, inf) = [{lo:.6g}, inf) (t = {lo / (1 + lo):.6g} .. 1)"
                        if self.flow else f"noise schedule's range [sigma_min, sigma_max] = [{lo:.6g}, {hi:.6g}] "
                                          f"(t = 0 .. {log_s.numel() - 1})")
                raise ValueError(f"TableScheduler: the table's sigma {s:.6g} (evaluation {i}) is outside this {span}; "
                                 f"build the table for this model's sigma range.")

    @property
    def nfe(self) -> int:
        """N: network calls per sample (the number of timesteps, whatever the pipeline asks for)."""
        return self.table.nfe

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def _timesteps(self, device: torch.device) -> torch.Tensor:
        """The net's timestep of each evaluation, as the denoiser adapter computes it from float32 sigmas."""
        sigmas = self._sigmas32.to(device)
        if self.flow:
            return self._flow.sigma_to_t(sigmas)
        t = self._vp.sigma_to_t(sigmas)
        return t.long() if self._vp.quantize else t

    def _pipeline_sigmas(self) -> torch.Tensor:
        """``sigmas`` as diffusers' sigma schedulers hold them: each evaluation's noise level in the pipeline's own
        terms (EDM sigma for DDPM-family models, flow time t = s / (1 + s) for flow models), then a final 0."""
        s = self._sigmas32
        levels = s / (1 + s) if self.flow else s
        return torch.cat([levels, torch.zeros(1, dtype=levels.dtype)])

    # --- diffusers scheduler interface ----------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None, **kwargs: Any) -> None:
        """Timesteps of the table's N evaluations (a different ``num_inference_steps`` is overridden with a
        warning: a table has exactly N evaluations); clears the state of the previous run. Custom ``timesteps`` or
        ``sigmas`` are refused (the table fixes them); ``mu`` (dynamic shifting) is accepted and has no effect."""
        for key, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None:
                raise ValueError(f"TableScheduler: custom {key} cannot be used; the table fixes its {self.nfe} evaluations.")
        if num_inference_steps is not None and int(num_inference_steps) != self.nfe:
            warnings.warn(f"TableScheduler runs its table's {self.nfe} evaluations; num_inference_steps="
                          f"{num_inference_steps} is ignored.", stacklevel=2)
        self.num_inference_steps = self.nfe
        self.timesteps = self._timesteps(torch.device(device) if device is not None else torch.device("cpu"))
        self.sigmas = self._pipeline_sigmas()
        self._begin_index = None
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0: a table runs whole (img2img / inpainting with strength < 1 would start mid-table)."""
        if begin_index != 0:
            raise ValueError(f"TableScheduler runs whole tables, but the pipeline asked to start at evaluation "
                             f"{begin_index} of {self.nfe} (img2img or inpainting with strength < 1): use strength=1 "
                             f"with a table whose first sigma is the noise level to start from.")
        self._begin_index = 0

    def set_noise(self, noise: torch.Tensor | None) -> None:
        """The table's noise ``[K, B, ...]`` for the next run: rows read it as given, except that row 0's noises are
        corrected along ``w`` so that the first input is the pipeline's latents (``noise[0]`` is then ignored for a
        first row that reads e_0 alone); None: further vectors are drawn (see the module docstring)."""
        if noise is not None and noise.shape[0] != self.table.n_noise:
            raise ValueError(f"noise must have shape [K, B, ...] with K = {self.table.n_noise}, got {tuple(noise.shape)}.")
        self._noise = noise

    @property
    def step_index(self) -> int:
        return self._step

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def _reset(self) -> None:
        self._step = 0
        self._run: TableRun | None = None  # the table's execution in this run (rows, buffers), from its first step
        self._x: torch.Tensor | None = None  # x_i of the current step i (EDM space)
        self._last_out: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None  # the sample shape of this run, fixed at its first step
        self._seeded: list[torch.Generator] | None = None  # per-sample generators when step gets none

    def _draw(self, like: torch.Tensor, generator: Any) -> Callable[[int], torch.Tensor]:
        """Noise vector e_k when a row first reads it: from ``set_noise``, else drawn from ``generator`` (the
        pipeline's), else from the per-sample generators seeded with the initial latents."""
        def draw(k: int) -> torch.Tensor:
            if self._noise is not None:
                return self._noise[k].to(like.device, like.dtype)
            gen = generator if generator is not None else self._seeded
            return randn_tensor(tuple(like.shape), generator=gen, device=like.device, dtype=like.dtype)

        return draw

    def _scale(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The pipeline's sample of EDM ``x`` at evaluation i: ``x / (1 + s)`` (flow) or ``x / sqrt(1 + s^2)`` (VP)."""
        s = self._sigmas32[i].to(x.device, x.dtype)
        return x / (1 + s) if self.flow else 1 / (1 + s**2).sqrt() * x

    def _unscale(self, i: int, x_in: torch.Tensor) -> torch.Tensor:
        """EDM ``x`` of the pipeline's sample at evaluation i (the inverse of ``_scale``)."""
        s = self._sigmas32[i].to(x_in.device, x_in.dtype)
        return x_in * (1 + s) if self.flow else x_in / (1 / (1 + s**2).sqrt())

    def _start(self, sample: torch.Tensor, generator: Any) -> torch.Tensor:
        """Row 0's noises from the pipeline's latents ``u = sample / init_noise_sigma`` (module docstring) and the
        table's x_0 (EDM space)."""
        _check_floating("sample", sample)
        self._shape = tuple(sample.shape)
        if self._noise is not None and tuple(self._noise.shape[1:]) != self._shape:
            raise ValueError(f"TableScheduler: set_noise gave noise of shape {tuple(self._noise.shape)}, but the "
                             f"sample has shape {self._shape}; expected [{self.table.n_noise}, *sample.shape].")
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        if self.table.n_noise > 1 and self._noise is None:
            self._seeded = _latent_generators(sample)
        draw = self._draw(x, generator)
        u = x / self.init_noise_sigma
        if len(self._first) == 1:
            j, w = self._first[0]
            noise = {j: u if w > 0 else -u}
        else:
            z = {j: draw(j) for j, _ in self._first}
            along = sum(w * z[j] for j, w in self._first)
            noise = {j: z[j] + w * (u - along) for j, w in self._first}
        self._run = TableRun(self.table, noise)
        self._x = self._run.input(0, draw)
        return self._x

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The identity: every sample this scheduler hands back is already the next network input (any batch, so
        the guidance-doubled ``[latents, latents]`` too)."""
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator: Any = None,
             return_dict: bool = True, **kwargs: Any) -> TableSchedulerOutput | tuple:
        """One evaluation of the table: ``d_i`` from the network output (eps / v / x0 as VPDenoiser converts it, or
        a flow velocity as FlowDenoiser does), then the next row (the next network input, in the pipeline's space)
        or, after the last evaluation, the sample. ``model_output`` has the sample's batch (guidance applied)."""
        n, i = self.table.nfe, self._step
        if i >= n:
            raise ValueError(f"TableScheduler: step called {i + 1} times, but the table has {n} evaluations "
                             f"(call set_timesteps before each run).")
        self._check_step_inputs(model_output, sample)
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x_in = sample.to(dtype)
        if i == 0:
            x = self._start(sample, generator)
        elif sample is self._last_out:
            x = self._x
        else:  # the pipeline changed the latents between steps (e.g. inpainting): take them as they are
            x = self._unscale(i, x_in)
        out = model_output.to(dtype)
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models: [prediction, variance]
        s = self._sigmas32[i].to(x.device, dtype)
        pred = self.config.prediction_type
        if pred == FLOW_PREDICTION:
            d = x_in - s / (1 + s) * out
        elif pred == "epsilon":
            d = x - s * out
        elif pred == "v_prediction":
            alpha = 1 / (1 + s**2).sqrt()
            d = alpha * x_in - s * alpha * out
        else:
            d = out
        self._run.record(i, x, d)  # x: the input the net saw (the pipeline's, if it changed the latents)
        if i + 1 < n:
            self._x = self._run.input(i + 1, self._draw(x, generator))
            prev = self._scale(i + 1, self._x).to(sample.dtype)
        else:
            prev = self._run.output(self._draw(x, generator)).to(sample.dtype)
        self._step = i + 1
        self._last_out = prev
        if i + 1 == n:
            self._run, self._x, self._last_out, self._seeded = None, None, None, None
        if not return_dict:
            return (prev,)
        return TableSchedulerOutput(prev_sample=prev, pred_original_sample=d.to(sample.dtype))

    def _check_step_inputs(self, model_output: Any, sample: Any) -> None:
        """Floating tensors; the sample keeps the run's shape; the output has the sample's shape (or [B, 2C, ...],
        learned variance). A guidance batch must be combined before ``step``."""
        _check_floating("sample", sample)
        _check_floating("model_output", model_output)
        got, out = tuple(sample.shape), tuple(model_output.shape)
        if self._shape is not None and got != self._shape:
            raise ValueError(f"TableScheduler: sample has shape {got} at step {self._step}, but this run started with "
                             f"shape {self._shape}; the batch and shape are fixed within a run (call set_timesteps "
                             f"to start a new one).")
        learned_variance = len(out) == len(got) >= 2 and out[0] == got[0] and out[1] == 2 * got[1] and out[2:] == got[2:]
        if out == got or learned_variance:
            return
        if len(out) == len(got) >= 1 and out[0] != got[0]:
            hint = "; apply classifier-free guidance before step()" if out[0] == 2 * got[0] else ""
            raise ValueError(f"TableScheduler: model_output has batch {out[0]} but sample has batch {got[0]}{hint} "
                             f"(model_output shape {out}, sample shape {got}).")
        raise ValueError(f"TableScheduler: model_output has shape {out} but sample has shape {got}; expected {got} "
                         f"(or twice the channels for a learned-variance model).")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at (possibly fractional) timesteps, one for the batch or one per sample: VP
        ``sqrt(abar) x0 + sqrt(1 - abar) noise`` for t in [0, T-1], flow ``(1 - t) x0 + t noise`` for
        ``t = timestep / num_train_timesteps`` in [0, 1]."""
        _check_floating("original_samples", original_samples)
        _check_floating("noise", noise)
        if noise.shape != original_samples.shape:
            raise ValueError(f"TableScheduler.add_noise: noise has shape {tuple(noise.shape)} but original_samples has "
                             f"shape {tuple(original_samples.shape)}; they must match.")
        t = torch.as_tensor(timesteps, device=original_samples.device, dtype=torch.float64).reshape(-1)
        batch = original_samples.shape[0] if original_samples.ndim else 1
        if t.numel() not in (1, batch):
            raise ValueError(f"TableScheduler.add_noise: got {t.numel()} timesteps for a batch of {batch}; "
                             f"give one timestep or one per sample.")
        top = int(self.config.num_train_timesteps) if self.flow else self._log_sigmas.numel() - 1
        bad = ~torch.isfinite(t) | (t < 0) | (t > top)
        if bool(bad.any()):
            raise ValueError(f"TableScheduler.add_noise: timestep {float(t[bad][0]):g} is outside the valid range "
                             f"[0, {top}].")
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        if self.flow:
            tt = (t / top).to(original_samples.dtype).reshape(shape)
            return (1 - tt) * original_samples + tt * noise
        log_s = self._log_sigmas.to(original_samples.device)
        lo = t.floor().long().clamp(0, log_s.numel() - 1)
        hi = (lo + 1).clamp(max=log_s.numel() - 1)
        s = (log_s[lo] + (t - lo) * (log_s[hi] - log_s[lo])).exp()
        s = s.to(original_samples.dtype).reshape(shape)
        return (original_samples + s * noise) / (1 + s**2).sqrt()

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler's name (and argument order) for ``add_noise`` (SD3's img2img calls it)."""
        if noise is None:
            raise ValueError("TableScheduler.scale_noise needs the noise to add.")
        return self.add_noise(sample, noise, timestep)


def _latent_generators(sample: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the SHA-256 of that sample's initial latents (float32 bytes): the
    noise of a pipeline that hands ``step`` no generator is then a function of the latents it drew (and of nothing
    else in the batch)."""
    rows = sample.detach().to("cpu", torch.float32).contiguous().reshape(sample.shape[0], -1).numpy()
    seeds = [int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little") & (2**63 - 1) for row in rows]
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _check_floating(name: str, value: Any) -> None:
    """A real floating-point tensor (an integer sample would be truncated by the step's casts)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"TableScheduler: {name} must be a floating-point tensor, got {kind}.")


def _jsonable(v: Any) -> bool:

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
