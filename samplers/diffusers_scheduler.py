"""``TableScheduler``: run any solver table inside a diffusers pipeline.

    from samplers.diffusers_scheduler import TableScheduler
    pipe.scheduler = TableScheduler.from_table("ddss-ggdm-nfe5.safetensors", pipe.scheduler.config)
    images = pipe(num_inference_steps=pipe.scheduler.nfe).images

The pipeline's own loop (``set_timesteps``, ``scale_model_input``, ``step``) then makes exactly the table's N
network calls. The scheduler works in the pipeline's VP sample space: the sample it hands back after step i is
the next network input ``x_{i+1} / sqrt(1 + sigma_{i+1}^2)`` (the table's ``x`` are in EDM sigma-space), so
``scale_model_input`` is the identity, and ``init_noise_sigma = coef[0, e_0] / sqrt(1 + sigma_0^2)``: the
pipeline's initial latents divided by ``init_noise_sigma`` are the table's noise ``e_0``. Pipelines that do not
multiply by ``init_noise_sigma`` (``DDPMPipeline``) pass the raw draw, and the scheduler reads it the same way,
so from the same noise the pipeline gives the sample of ``samplers.sample(table, load_diffusers(folder),
e_0[None])`` up to float32 rounding (the conversions repeat ``samplers.denoisers.VPDenoiser`` operation by
operation, and the rows are combined, and their buffers freed, by the executor's own ``samplers.table.TableRun``).

Stochastic tables (K > 1) draw each further noise vector ``e_k`` when a row first needs it, from the
``generator`` the pipeline passes to ``step`` (or from ``set_noise([K, B, ...])`` for exact reproduction).
Timesteps are fractional (``VPDenoiser.sigma_to_t``; rounded for nets with a learned time embedding,
``quantize=True``). The table and the noise schedule live in the scheduler config, so ``save_pretrained`` /
``from_pretrained`` round-trip. This module imports diffusers; ``import samplers`` never does.
"""

from __future__ import annotations

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

from .denoisers import PREDICTION_TYPES, VPDenoiser
from .models import SCHEDULE_KEYS, alphas_cumprod_of
from .table import SolverTable, TableRun

SIGMA_RTOL = 1e-6  # a table's sigma may exceed the schedule's sigma_max by this much (float rounding)


@dataclass
class TableSchedulerOutput(BaseOutput):
    """``prev_sample``: the next network input (VP space), or the final sample after the last step;
    ``pred_original_sample``: the x0 prediction ``d_i`` of this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


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
        table_sigmas: Sequence[float] | None = None,
        table_coef: Sequence[Sequence[float]] | None = None,
        table_metadata: dict | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"TableScheduler: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}.")
        if table_sigmas is None or table_coef is None:
            raise ValueError("TableScheduler needs a table: use TableScheduler.from_table(path, pipe.scheduler.config).")
        if not isinstance(quantize, (bool, np.bool_)):
            raise ValueError(f"TableScheduler: quantize must be true or false, got {quantize!r}.")
        self.table = SolverTable(np.asarray(table_sigmas, dtype=np.float64), np.asarray(table_coef, dtype=np.float64),
                                 dict(table_metadata or {}))
        row0 = self.table.coef[0].numpy()
        if row0[0] == 0:
            raise ValueError("TableScheduler: the table's first input must use the noise e_0 (row 0, column 0 is zero).")
        abar = alphas_cumprod_of(self.config)
        self._vp = VPDenoiser(None, abar, prediction_type=prediction_type, quantize=bool(quantize))
        self._check_sigma_range()
        s0 = float(self.table.sigmas[0])
        # the pipeline's initial latents / init_noise_sigma = e_0; its first network input is c00 e_0 / sqrt(1 + s0^2)
        self.init_noise_sigma = float(row0[0]) / math.sqrt(1.0 + s0 * s0)
        self._first_needs_more = bool(np.any(row0[1:] != 0))
        self.num_inference_steps = self.table.nfe
        self._sigmas32 = self.table.sigmas.to(torch.float32)
        self.timesteps = self._timesteps(torch.device("cpu"))
        self._noise: torch.Tensor | None = None
        self._begin_index: int | None = None
        self._reset()

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: str | os.PathLike | SolverTable, config: Any = None, *, quantize: bool | None = None,
                   fingerprint: str | None = None, **overrides: Any) -> "TableScheduler":
        """A scheduler running ``table`` (a SolverTable or a table file, checked against ``fingerprint`` when
        given) with the noise schedule and prediction type of ``config`` (the pipeline's scheduler config, any
        DDPM-family scheduler). ``quantize``: integer timesteps (nets with a learned time embedding)."""
        if not isinstance(table, SolverTable):
            table = SolverTable.load(str(table), fingerprint=fingerprint)
        keys = {k: config[k] for k in SCHEDULE_KEYS if config is not None and k in config}
        if isinstance(keys.get("trained_betas"), (torch.Tensor, np.ndarray)):
            keys["trained_betas"] = [float(b) for b in keys["trained_betas"]]
        if quantize is not None:  # a non-boolean is refused by __init__, not read as its truth value
            keys["quantize"] = bool(quantize) if isinstance(quantize, (bool, np.bool_)) else quantize
        keys.update(overrides)
        meta = {k: v for k, v in table.metadata.items() if _jsonable(v)}
        return cls(**keys, table_sigmas=[float(s) for s in table.sigmas], table_coef=table.coef.tolist(), table_metadata=meta)

    def _check_sigma_range(self) -> None:
        """Every table sigma within the schedule's [sigma_min, sigma_max] (``sigma_to_t`` would clamp it silently):
        above sigma_max by at most SIGMA_RTOL (rounding), below sigma_min by at most half a training step in
        log-sigma (t > -0.5, which a quantized net rounds to 0 anyway; this admits round values like 0.01 for
        DDPM's 0.0100013)."""
        log_s = self._vp.log_sigmas
        lo, hi = float(log_s[0].exp()), float(log_s[-1].exp())
        floor = float((log_s[0] - 0.5 * (log_s[1] - log_s[0])).exp())
        for i, s in enumerate(self.table.sigmas.tolist()):
            if not floor <= s <= hi * (1 + SIGMA_RTOL):
                raise ValueError(f"TableScheduler: the table's sigma {s:.6g} (evaluation {i}) is outside this noise "
                                 f"schedule's range [sigma_min, sigma_max] = [{lo:.6g}, {hi:.6g}] (t = 0 .. "
                                 f"{log_s.numel() - 1}); build the table for this model's sigma range.")

    @property
    def nfe(self) -> int:
        """N: network calls per sample (the number of timesteps, whatever the pipeline asks for)."""
        return self.table.nfe

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def _timesteps(self, device: torch.device) -> torch.Tensor:
        t = self._vp.sigma_to_t(self._sigmas32.to(device))  # as VPDenoiser computes them, in float32
        return t.long() if self._vp.quantize else t

    # --- diffusers scheduler interface ----------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      **kwargs: Any) -> None:
        """Timesteps of the table's N evaluations (a different ``num_inference_steps`` is overridden with a
        warning: a table has exactly N evaluations); clears the state of the previous run."""
        for key in ("timesteps", "sigmas"):
            if kwargs.get(key) is not None:
                raise ValueError(f"TableScheduler: custom {key} cannot be used; the table fixes its {self.nfe} evaluations.")
        if num_inference_steps is not None and int(num_inference_steps) != self.nfe:
            warnings.warn(f"TableScheduler runs its table's {self.nfe} evaluations; num_inference_steps="
                          f"{num_inference_steps} is ignored.", stacklevel=2)
        self.num_inference_steps = self.nfe
        self.timesteps = self._timesteps(torch.device(device) if device is not None else torch.device("cpu"))
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0 (a table always starts at its first row)."""
        if begin_index != 0:
            raise ValueError("TableScheduler runs whole tables: begin_index must be 0.")
        self._begin_index = 0

    def set_noise(self, noise: torch.Tensor | None) -> None:
        """The table's noise ``[K, B, ...]`` for the next run (``noise[0]`` is ignored: e_0 comes from the
        pipeline's latents); None: further vectors are drawn from the generator given to ``step``."""
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
        self._scaled = False
        self._last_out: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None  # the sample shape of this run, fixed at its first step

    def _draw(self, like: torch.Tensor, generator: Any) -> Callable[[int], torch.Tensor]:
        """Noise vector e_k when a row first reads it: from ``set_noise``, else drawn from ``generator``."""
        def draw(k: int) -> torch.Tensor:
            if self._noise is not None:
                return self._noise[k].to(like.device, like.dtype)
            return randn_tensor(tuple(like.shape), generator=generator, device=like.device, dtype=like.dtype)

        return draw

    def _alpha(self, i: int, like: torch.Tensor) -> torch.Tensor:
        s = self._sigmas32[i].to(like.device, like.dtype)
        return 1 / (1 + s**2).sqrt()

    def _start(self, sample: torch.Tensor, generator: Any) -> torch.Tensor:
        """e_0 from the pipeline's latents and the table's x_0 (EDM space)."""
        _check_floating("sample", sample)
        self._shape = tuple(sample.shape)
        if self._noise is not None and tuple(self._noise.shape[1:]) != self._shape:
            raise ValueError(f"TableScheduler: set_noise gave noise of shape {tuple(self._noise.shape)}, but the "
                             f"sample has shape {self._shape}; expected [{self.table.n_noise}, *sample.shape].")
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        self._run = TableRun(self.table, {0: x / self.init_noise_sigma})
        self._x = self._run.input(0, self._draw(x, generator))
        return self._x

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input: the sample itself, except at the first step of a table whose first input mixes
        several noise vectors (then ``x_0 / sqrt(1 + sigma_0^2)`` with e_1.. drawn now)."""
        if self._step == 0 and self._first_needs_more:
            x0 = self._start(sample, None)
            self._scaled = True
            return (self._alpha(0, x0) * x0).to(sample.dtype)
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator: Any = None,
             return_dict: bool = True, **kwargs: Any) -> TableSchedulerOutput | tuple:
        """One evaluation of the table: ``d_i`` from the network output (eps / v / x0 as VPDenoiser converts
        it), then the next row (the next network input, VP space) or, after the last evaluation, the sample."""
        n, i = self.table.nfe, self._step
        if i >= n:
            raise ValueError(f"TableScheduler: step called {i + 1} times, but the table has {n} evaluations "
                             f"(call set_timesteps before each run).")
        self._check_step_inputs(model_output, sample)
        dtype = torch.promote_types(sample.dtype, torch.float32)
        if i == 0:
            if self._scaled:
                x = self._x
                x_in = self._alpha(0, x) * x
            else:
                x = self._start(sample, generator)
                x_in = sample.to(dtype)
                if self._first_needs_more:  # the pipeline skipped scale_model_input: the net saw only e_0's part
                    err = float((x_in / self._alpha(0, x) - x).abs().max()) / max(float(x.abs().max()), 1e-30)
                    if err > 1e-5:
                        raise ValueError("TableScheduler: this table's first input mixes several noise vectors, which "
                                         "needs a pipeline that calls scheduler.scale_model_input (DDPMPipeline does not).")
        elif sample is self._last_out:
            x = self._x
            x_in = sample.to(dtype)
        else:  # the pipeline changed the latents between steps (e.g. inpainting): take them as they are
            x_in = sample.to(dtype)
            x = x_in / self._alpha(i, x_in)
        out = model_output.to(dtype)
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models: [prediction, variance]
        s = self._sigmas32[i].to(x.device, dtype)
        pred = self.config.prediction_type
        if pred == "epsilon":
            d = x - s * out
        elif pred == "v_prediction":
            alpha = 1 / (1 + s**2).sqrt()
            d = alpha * x_in - s * alpha * out
        else:
            d = out
        self._run.record(i, x, d)  # x: the input the net saw (the pipeline's, if it changed the latents)
        if i + 1 < n:
            self._x = self._run.input(i + 1, self._draw(x, generator))
            prev = (self._alpha(i + 1, self._x) * self._x).to(sample.dtype)
        else:
            prev = self._run.output(self._draw(x, generator)).to(sample.dtype)
        self._step = i + 1
        self._last_out = prev
        if i + 1 == n:
            self._run, self._x, self._last_out = None, None, None
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
        """VP forward process at (possibly fractional) timesteps in [0, T-1]: ``sqrt(abar) x0 + sqrt(1 - abar) noise``;
        one timestep for the batch or one per sample."""
        _check_floating("original_samples", original_samples)
        _check_floating("noise", noise)
        if noise.shape != original_samples.shape:
            raise ValueError(f"TableScheduler.add_noise: noise has shape {tuple(noise.shape)} but original_samples has "
                             f"shape {tuple(original_samples.shape)}; they must match.")
        log_s = self._vp.log_sigmas.to(original_samples.device)
        t = torch.as_tensor(timesteps, device=original_samples.device, dtype=torch.float64).reshape(-1)
        batch = original_samples.shape[0] if original_samples.ndim else 1
        if t.numel() not in (1, batch):
            raise ValueError(f"TableScheduler.add_noise: got {t.numel()} timesteps for a batch of {batch}; "
                             f"give one timestep or one per sample.")
        bad = ~torch.isfinite(t) | (t < 0) | (t > log_s.numel() - 1)
        if bool(bad.any()):
            raise ValueError(f"TableScheduler.add_noise: timestep {float(t[bad][0]):g} is outside the valid range "
                             f"[0, {log_s.numel() - 1}].")
        lo = t.floor().long().clamp(0, log_s.numel() - 1)
        hi = (lo + 1).clamp(max=log_s.numel() - 1)
        s = (log_s[lo] + (t - lo) * (log_s[hi] - log_s[lo])).exp()
        s = s.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return (original_samples + s * noise) / (1 + s**2).sqrt()


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
