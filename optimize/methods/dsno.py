"""DSNO: distil the teacher into a one-step neural operator (Zheng, Nie, Vahdat, Azizzadenesheli, Anandkumar,
"Fast sampling of diffusion models via operator learning", ICML 2023; code devzhk/DSNO-pytorch).

One forward pass maps the initial noise ``x_T = sigma_max e`` to the teacher's x0-predictions at M output times
``sigma_1 > ... > sigma_M`` of its probability-flow trajectory; the last one is the sample.

Student (``samplers.nets.DSNOUNet``): the teacher U-Net, weights copied, run on ``[B*M, C, H, W]`` with the
teacher's embedding of ``c_noise(sigma_m) = log(sigma_m)/4`` per time, a temporal block
``h + LeakyReLU(irfft(W . rfft_M(h)[:modes]))`` after every non-resampling residual block and after the middle
block, and the EDM preconditioning of the input's noise level::

    S_m(x) = c_skip(sigma_max) x + c_out(sigma_max) F_m(c_in(sigma_max) x),     m = 1..M

With zero temporal weights every block is the identity and ``F_m`` is the teacher's net at
``(c_in x, c_noise(sigma_m))``; evaluated at an input whose noise level is sigma_m it is exactly the teacher's
denoiser ``D(x, sigma_m)`` (tests/test_dsno.py). Where training starts is ``temporal_init``: ``random`` (the
default, DSNO's code) draws W uniform in [0, 1/C^2) (C the block's channels), which on the digits teacher leaves the
slices within about 0.02 of the teacher's (largest pixel difference, data in [-1, 1]); ``zero`` starts exactly at
the teacher. Zero weights still learn: PyTorch's LeakyReLU has slope 0.01 at 0, so ``dL/dW`` at W = 0 is 0.01 times
that of the linear map ``irfft(W . rfft(h))``, nonzero, and Adam's first step is about lr per weight whatever the
gradient's scale.

Times (DSNO's "quad" spacing): ``t_m = (1 - m/M)^2`` of the cosine schedule, ``sigma(t) = tan(pi t / 2)`` in EDM
space (logSNR = -2 log tan(pi t/2)), clamped to [sigma_min, sigma_max]; M = 4 gives sigma = 1.22, 0.414, 0.098 and
sigma_min. The data store the 8 times ``t_j = (j/8)^2`` (j = 7..0), so every M dividing 8 trains on one data set.

Data: deterministic teacher solves (``data_solver``, default DPM-Solver++(2M) on ``data_steps`` Karras steps merged
with the 8 stored sigmas) from ``sigma_max e`` through ``samplers.sample``; its callback keeps the x0-predictions
``d_i`` at the stored sigmas. Noise seeds come from ``optimize.base.seeds.DATA_SEED_OFFSET`` (never the evaluation
seeds). Cached once as safetensors under ``data_cache_dir``, keyed by the teacher's fingerprint and settings.

Loss::

    L = mean_m  w_m d_m,     d_m = mean_{b, pixels} dist(S_m(x_b), x0_hat(sigma_m; x_b))

with dist = |.| (``loss=l1``, the paper's ImageNet choice) or (.)^2 (``l2``) and the weights of ``weighting``:

- ``snr`` (DSNO's, the default): ``w_m = clamp(sqrt(SNR_m), 1, 1e4) = clamp(1/sigma_m, 1, 1e4)`` (SNR = 1/sigma^2 in
  EDM space, where ``x = x0 + sigma n``). At M = 4, w = 1, 2.41, 10.2, 500: the sample's slice has 97% of the weight.
- ``uniform``: weight 1 on each slice's distance measured in units of the EDM output scaling at its noise level,
  ``w_m = 1 / c_out(sigma_m)^p`` with ``c_out(sigma) = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``, p = 1 for
  l1 and p = 2 for l2 (EDM's lambda(sigma)). As c_out ~ sigma for small sigma, it stays close to snr: at M = 4,
  w = 2.16, 3.13, 10.4, 500 for l1 (97% on the last slice) and their squares for l2 (99.9%).
- ``normalised``: every slice's term is divided by a running estimate of its own size, ``w_m = 1 / s_m``, where
  ``s_m`` is an exponential moving average (decay ``NORM_DECAY`` = 0.99) of the detached ``d_m`` over the training
  batches, started at the first batch and including the current one: ``s_m = d_m`` at the first step, then
  ``s_m <- 0.99 s_m + 0.01 d_m``. Each term ``w_m d_m`` is then about 1 (exactly 1 at the first step), so all slices
  contribute equally; the gradient is ``mean_m grad(d_m) / s_m``, about that of ``mean_m log d_m``. ``s`` is kept in
  the checkpoint (exact resume).

The module tracks ``s`` under every weighting (a record of the per-slice distances); only ``normalised`` uses it.
Adam, linear warm-up then cosine decay, EMA weights exported. The served artifact is the EMA student (a network
file, whose metadata records ``weighting``, ``loss_weights`` at the end and ``temporal_init``) plus a 1-NFE table
(``x_0 = sigma_max e_0``, output ``d_0``; the same keys in its metadata): one network call, whose cost is about M
teacher forwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from samplers import SolverTable, baselines, make_noise, sample, schedules
from samplers.artifact import atomic_save, atomic_write_bytes
from samplers.nets import DSNOUNet, build_net, load_denoiser, read_net_header, save_net
from samplers.table import FORMAT_VERSION

from optimize.base import ConfigError, as_list, resolve_path
from optimize.training.checkpoints import resume_path
from optimize.evaluation.evaluate import Judge, evaluate_jobs
from optimize.base.keys import count
from optimize.training.runs import (
    TrainingModule,
    compare_tables,
    fit_student,
    start_distillation,
    step_batch_index,
)
from optimize.base.seeds import DATA_SEED_OFFSET, seed_range
from optimize.training.distill import one_step_table

KEYS = {  # this method's typed keys (optimize.base.keys; shared ones are declared there)
    "M": count(4096), "modes": count(4096), "data_steps": count(100_000)}
STORE_POINTS = 8  # stored data times t_j = (j/8)^2, j = 7..0: M must divide 8
LOSSES = ("l1", "l2")
WEIGHTINGS = ("snr", "uniform", "normalised")  # per-slice loss weights (module docstring)
NORM_DECAY = 0.99  # EMA decay of the per-slice distance estimate s_m of weighting=normalised
TEMPORAL_INITS = ("random", "zero")  # where the temporal weights start (module docstring)


# --- times, weights, tables ---------------------------------------------------------------------------
def store_times(points: int = STORE_POINTS) -> list[float]:
    """Cosine-schedule times of the stored trajectory points, noisy to clean: ``t_j = (j/points)^2``, j = points-1..0."""
    return [(j / points) ** 2 for j in range(points - 1, -1, -1)]


def output_times(m: int) -> list[float]:
    """DSNO's quadratic spacing toward the data: ``t_k = (1 - k/M)^2``, k = 1..M (the last is t = 0, the sample)."""
    return [(1 - k / m) ** 2 for k in range(1, m + 1)]


def sigma_of_t(t: float, sigma_min: float, sigma_max: float) -> float:
    """EDM sigma of cosine-schedule time t: ``tan(pi t / 2)``, clamped to [sigma_min, sigma_max]."""
    return float(min(max(math.tan(math.pi * t / 2), sigma_min), sigma_max))


def output_sigmas(m: int, sigma_min: float, sigma_max: float) -> list[float]:
    """The M output noise levels (decreasing; the last is sigma_min)."""
    return [sigma_of_t(t, sigma_min, sigma_max) for t in output_times(m)]


def store_index(m: int, points: int = STORE_POINTS) -> list[int]:
    """Positions of the M output times among the stored points (``t_k = (j/points)^2`` with j = points (M-k)/M)."""
    if m < 1 or points % m:
        raise ValueError(f"M must divide the {points} stored data times (M in {[d for d in range(1, points + 1) if points % d == 0]}), got {m}.")
    return [points - 1 - points * (m - k) // m for k in range(1, m + 1)]


def c_out(sigma: float, sigma_data: float = 0.5) -> float:
    """EDM's output scaling ``c_out(sigma) = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``."""
    return sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)


def loss_weights(sigmas: Sequence[float], weighting: str = "snr", loss: str = "l1", sigma_data: float = 0.5,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-slice weights ``w_m`` of ``L = mean_m w_m d_m`` (float32 ``[M]``):

    - ``snr``: ``clamp(sqrt(SNR_m), 1, 1e4)`` with ``SNR = 1/sigma^2`` (EDM space);
    - ``uniform``: ``1 / c_out(sigma_m)^p``, p = 1 for ``l1`` and 2 for ``l2``;
    - ``normalised``: ``1 / s_m`` for the running per-slice distances ``scale`` (``update_scale``), floored at 1e-12.
    """
    sig = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if weighting == "snr":
        return (1.0 / sig).clamp(1.0, 1e4).to(torch.float32)
    if weighting == "uniform":
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        power = LOSSES.index(loss) + 1  # l1: c_out, l2: c_out^2
        return torch.tensor([c_out(float(s), sigma_data) ** -power for s in sig], dtype=torch.float32)
    if weighting == "normalised":
        if scale is None:
            raise ValueError("weighting normalised needs the running per-slice distances (scale).")
        return 1.0 / scale.detach().to(torch.float32).clamp_min(1e-12)
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")


def update_scale(scale: torch.Tensor, dist: torch.Tensor, first: bool, decay: float = NORM_DECAY) -> torch.Tensor:
    """The running per-slice distance: ``s = d`` at the first step, else ``s <- decay s + (1 - decay) d`` (d detached)."""
    d = dist.detach().to(scale.dtype)
    return d.clone() if first else decay * scale + (1 - decay) * d


def data_table(solver: str, steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
               points: int = STORE_POINTS) -> tuple[SolverTable, list[float]]:
    """The deterministic data solver: ``steps`` Karras sigmas merged with the stored sigmas (a stored sigma within 1%
    of a Karras sigma uses that one), and the stored sigmas as they appear in its grid."""
    grid = list(schedules.make("karras", steps, sigma_min, sigma_max, rho=rho))
    stored = []
    for s in (sigma_of_t(t, sigma_min, sigma_max) for t in store_times(points)):
        near = [g for g in grid if abs(math.log(g / s)) < 1e-2]
        if near:
            stored.append(near[0])
        else:
            grid.append(s)
            stored.append(s)
    grid = sorted(set(grid), reverse=True)
    table = baselines.build(solver, len(grid), sigmas=grid)
    n = table.nfe
    out_row = table.coef[n].numpy()
    if not (out_row[table.d(n - 1)] == 1.0 and np.count_nonzero(out_row) == 1):
        raise ValueError(f"data solver {solver} does not output its last x0-prediction d_{n - 1}; use a solver that does "
                         f"(euler, dpmpp_2m, dpmpp_3m, unipc).")
    return table, stored


# --- data -------------------------------------------------------------------------------------------
def generate(denoiser: Any, table: SolverTable, stored: Sequence[float], seeds: Sequence[int], shape: Sequence[int],
             batch_size: int = 1024, dtype: torch.dtype = torch.float32, progress: bool = True) -> dict[str, torch.Tensor]:
    """Teacher trajectories from ``sigma_max e`` (e from each seed, as ``make_noise``): ``noise [n, *shape]`` and the
    x0-predictions at the stored sigmas ``x0 [n, S, *shape]``, read from the executor's callback."""
    where = {int(np.argmin(np.abs(np.log(table.sigmas.numpy() / s)))): p for p, s in enumerate(stored)}
    seeds = list(seeds)
    noise = torch.empty(len(seeds), *shape)
    x0 = torch.empty(len(seeds), len(stored), *shape)
    bar = None
    if progress:
        bar = tqdm(total=len(seeds), desc=f"dsno data ({table.nfe}-step {table.metadata.get('method')})", unit="traj")
    with torch.no_grad():
        for b in range(0, len(seeds), batch_size):
            e = make_noise(table, shape, seeds[b:b + batch_size], dtype=dtype)
            rows = slice(b, b + e.shape[1])
            noise[rows] = e[0].float()

            def keep(i: int, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> None:
                if i in where:
                    x0[rows, where[i]] = d.float()

            last = sample(table, denoiser, e, callback=keep)
            if not torch.isfinite(last).all():
                raise FloatingPointError("the teacher produced non-finite trajectories.")
            if bar is not None:
                bar.update(e.shape[1])
    if bar is not None:
        bar.close()
    return {"noise": noise, "x0": x0}


def data_key(fingerprint: str, settings: dict[str, Any]) -> str:
    """Cache file stem: the teacher's fingerprint and a hash of the data settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"dsno-{fingerprint}-{h}"


def load_or_generate(model: Any, cfg: Any, progress: bool = True) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """The cached data of ``cfg`` for the teacher ``model`` (an evaluate.Model), generating it once."""

    smin, smax = float(cfg.sigma_min), float(cfg.sigma_max)
    table, stored = data_table(str(cfg.data_solver), int(cfg.data_steps), smin, smax, float(cfg.rho))
    seeds = seed_range(DATA_SEED_OFFSET, int(cfg.seed), int(cfg.n_data))
    settings = {"solver": str(cfg.data_solver), "nfe": table.nfe, "sigmas": [float(s) for s in table.sigmas],
                "stored": stored, "seeds": [seeds[0], len(seeds)], "shape": list(model.shape), "dtype": str(model.dtype)}
    path = os.path.join(str(resolve_path(str(cfg.data_cache_dir))), data_key(model.fingerprint, settings) + ".safetensors")
    if os.path.isfile(path):
        return load_file(path), path, settings
    t0 = time.perf_counter()
    data = generate(model.denoiser, table, stored, seeds, model.shape, int(cfg.data_batch_size), model.dtype, progress)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save(data, path, {"settings": json.dumps(settings), "model_fingerprint": model.fingerprint})
    return data, path, settings


# --- the student ------------------------------------------------------------------------------------
def student_config(teacher_config: dict[str, Any], sigmas: Sequence[float], modes: int, temporal: bool,
                   shape: Sequence[int]) -> dict[str, Any]:
    """The network-file config of the student of a ``unet`` teacher (precond, sigma_data and shape kept)."""
    cfg = {k: v for k, v in teacher_config.items() if k != "arch"}
    return {**cfg, "arch": "dsno_unet", "sigmas": [float(s) for s in sigmas], "modes": int(modes), "temporal": bool(temporal),
            "shape": [int(s) for s in shape]}


def make_student(teacher_net: nn.Module, config: dict[str, Any], temporal_init: str = "random") -> DSNOUNet:
    """A DSNOUNet with the teacher's weights copied; its temporal blocks keep their init (``random``: uniform in
    [0, 1/C^2), ``samplers.nets.SpectralConv1d``) or are set to zero (``zero``: every slice is the teacher's net)."""
    if temporal_init not in TEMPORAL_INITS:
        raise ValueError(f"temporal_init must be one of {', '.join(TEMPORAL_INITS)}, got {temporal_init!r}.")
    net = build_net({k: v for k, v in config.items() if k not in ("precond", "sigma_data")})
    missing, unexpected = net.load_state_dict(teacher_net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("temporal.") for k in missing):
        raise ValueError(f"teacher weights do not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if temporal_init == "zero" and net.temporal is not None:
        with torch.no_grad():
            for p in net.temporal.parameters():
                p.zero_()
    return net


def trajectory(net: DSNOUNet, x: torch.Tensor, sigma: float, sigma_data: float = 0.5, cond: Any = None) -> torch.Tensor:
    """``S_m(x) = c_skip(s) x + c_out(s) F_m(c_in(s) x)`` for all m: ``[B, M, *shape]`` (s: the input's noise level)."""
    s2, sd = sigma**2, sigma_data
    c_skip, c_out, c_in = sd**2 / (s2 + sd**2), sigma * sd / math.sqrt(s2 + sd**2), 1 / math.sqrt(s2 + sd**2)
    return c_skip * x[:, None] + c_out * net.trajectory(c_in * x, cond)


class DSNOModule(TrainingModule):
    """The DSNO student trained on teacher trajectories; keeps EMA weights for export.

    Batches are ``(noise [B, *shape], x0 [B, M, *shape])``: the student's input is ``sigma_max * noise``. After
    ``attach_data`` each step draws its own batch from (seed, global step), so a resumed run continues exactly as the
    uninterrupted one (same batches, same learning rates; tests/test_dsno.py compares the weights bit for bit). EMA,
    clock, NaN stop and the loss history in checkpoints come from ``optimize.training.runs.TrainingModule``. The
    running per-slice distances ``dist_scale`` (``update_scale``; the weights of ``weighting=normalised``) are a
    persistent buffer, so they are in the checkpoint too.
    """

    method = "dsno"

    def __init__(self, config: dict[str, Any], sigma_max: float = 80.0, sigma_data: float = 0.5, loss: str = "l1",
                 lr: float = 1e-3, warmup_steps: int = 100, steps: int = 1000, min_lr_ratio: float = 0.05,
                 ema_decay: float = 0.995, seed: int = 0, weighting: str = "snr", temporal_init: str = "random"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")
        if temporal_init not in TEMPORAL_INITS:
            raise ValueError(f"temporal_init must be one of {', '.join(TEMPORAL_INITS)}, got {temporal_init!r}.")
        self.save_hyperparameters()
        self.config = dict(config)
        self.student = build_net({k: v for k, v in config.items() if k not in ("precond", "sigma_data")})
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        m = len(config["sigmas"])
        fixed = loss_weights(config["sigmas"], weighting, loss, sigma_data) if weighting != "normalised" else torch.ones(m)
        self.register_buffer("weights", fixed, persistent=False)
        self.register_buffer("dist_scale", torch.zeros(m))  # s_m (update_scale); all zero: no training step yet
        self.data: tuple[torch.Tensor, torch.Tensor] | None = None  # set by attach_data
        self.batch_size = 0

    def attach_data(self, data: dict[str, torch.Tensor], index: Sequence[int], batch_size: int) -> "DSNOModule":
        """Train on ``data`` (noise and the stored x0 at positions ``index``): step t uses the batch
        ``optimize.training.runs.step_batch_index`` gives for (seed, t)."""
        self.data = (data["noise"], data["x0"][:, list(index)].contiguous())
        self.batch_size = min(int(batch_size), len(self.data[0]))
        return self

    def step_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's ``(noise, x0)`` from the attached data (a pure function of seed and global step)."""
        assert self.data is not None
        idx = step_batch_index(len(self.data[0]), self.batch_size, int(self.hparams.seed), int(self.global_step))
        return self.data[0][idx].to(self.device), self.data[1][idx].to(self.device)

    def init_from(self, teacher_net: nn.Module) -> "DSNOModule":
        """Copy the teacher's weights into the student and its EMA (temporal weights as ``temporal_init``)."""
        self.student = make_student(teacher_net, self.config, str(self.hparams.temporal_init))
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        return self

    def forward(self, noise: torch.Tensor, ema: bool = False) -> torch.Tensor:
        net = self.ema if ema else self.student
        return trajectory(net, self.hparams.sigma_max * noise, self.hparams.sigma_max, self.hparams.sigma_data)

    def distances(self, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The per-time distances ``d_m = mean_{b, pixels} dist(S_m, x0_m)``: ``[M]``."""
        diff = self(noise) - x0
        return (diff.abs() if self.hparams.loss == "l1" else diff.pow(2)).transpose(0, 1).flatten(1).mean(1)

    def slice_weights(self, dist: torch.Tensor | None = None) -> torch.Tensor:
        """The current ``w_m``: fixed for snr and uniform; ``1 / s_m`` for normalised (before any training step,
        ``s = dist``, this batch's own distances)."""
        if self.hparams.weighting != "normalised":
            return self.weights
        fresh = not bool(self.dist_scale.any())
        if fresh and dist is None:
            raise ValueError("weighting normalised has no distance estimate before its first step; pass dist.")
        return loss_weights(self.config["sigmas"], "normalised", scale=dist if fresh else self.dist_scale)

    def losses(self, noise: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, per-time distances [M])`` with ``L = mean_m w_m d_m`` at the current weights (no update)."""
        dist = self.distances(noise, x0)
        return (self.slice_weights(dist) * dist).mean(), dist

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One weighted distance on this step's batch (the attached data's, else the loader's), after folding the
        batch's distances into ``s`` (``update_scale``); raises NaNLossError on a non-finite loss."""
        noise, x0 = self.step_batch() if self.data is not None else batch
        dist = self.distances(noise, x0)
        if bool(torch.isfinite(dist).all()):  # a non-finite batch is stopped below, without spoiling s
            self.dist_scale = update_scale(self.dist_scale, dist, first=not bool(self.dist_scale.any()))
        loss = (self.slice_weights(dist) * dist).mean()
        self.check_loss(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        for m, v in enumerate(dist):
            self.log(f"dist_t{m + 1}", v, on_step=True)
        self.history.append([int(self.global_step), float(loss.detach()), *[float(v) for v in dist.detach()]])  # step, loss, loss_1..M
        return loss

    def final_weights(self) -> list[float] | None:
        """The weights ``w_m`` now, as a list (None for normalised before any step)."""
        if self.hparams.weighting == "normalised" and not bool(self.dist_scale.any()):
            return None
        return [float(w) for w in self.slice_weights()]

    def ema_pairs(self) -> tuple[Any, Any]:
        return self.ema.parameters(), self.student.parameters()

    def configure_optimizers(self) -> Any:
        """Adam; linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr at ``steps``."""
        hp = self.hparams
        opt = torch.optim.Adam(self.student.parameters(), lr=hp.lr)

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / max(1, hp.warmup_steps)
            t = min(1.0, (step - hp.warmup_steps) / max(1, hp.steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}}

    def export(self, path: str, extra_metadata: dict | None = None) -> str:
        """Save the EMA student as a network file (``samplers.nets.load_denoiser`` serves it)."""
        meta = {"trainer": "optimize.dsno", "global_step": int(self.global_step), "weighting": str(self.hparams.weighting),
                "loss_weights": self.final_weights(), "temporal_init": str(self.hparams.temporal_init), **(extra_metadata or {})}
        return save_net(self.ema, self.config, path, extra_metadata=meta)


# --- loss curve ------------------------------------------------------------------------------------
def write_history(history: list[list[float]], m: int, path: str) -> str:
    """The whole loss curve (kept in the Lightning checkpoint, so it survives resume) as CSV: step, loss, dist_1..M."""
    lines = [",".join(["step", "loss", *[f"dist_{k + 1}" for k in range(m)]])]
    lines += [",".join([str(int(h[0])), *[f"{v:.6g}" for v in h[1:]]]) for h in history]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


# --- plots -------------------------------------------------------------------------------------------
def plot_loss(history: list[list[float]], sigmas: Sequence[float], path: str) -> str:
    """Weighted loss and per-time distances against the step (log scale, smoothed over 20 steps)."""
    import matplotlib  # heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(history, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    w = max(1, min(20, len(h) // 10))
    smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid")  # noqa: E731
    ax.plot(h[w - 1:, 0], smooth(h[:, 1]), label="weighted loss", color="k")
    for m, s in enumerate(sigmas):
        ax.plot(h[w - 1:, 0], smooth(h[:, 2 + m]), label=f"dist at sigma {s:.3g}", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command -------------------------------------------------------------------------------------
def validate(cfg: Any) -> None:
    """DSNO's own checks, made before any work (called by the CLI)."""
    try:
        m, modes = int(cfg.M), int(cfg.modes)
    except (TypeError, ValueError):
        raise ConfigError(f"M and modes must be integers, got M={cfg.M!r} and modes={cfg.modes!r}.") from None
    if m < 1:
        raise ConfigError(f"M (output times) must be at least 1, got {m}.")
    if not 1 <= modes <= m // 2 + 1:
        raise ConfigError(f"modes must lie in 1..M//2+1 = 1..{m // 2 + 1} for M = {m}, got {modes}.")
    try:
        store_index(m)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}.")
    if cfg.weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {cfg.weighting!r}.")
    if cfg.temporal_init not in TEMPORAL_INITS:
        raise ConfigError(f"temporal_init must be one of {', '.join(TEMPORAL_INITS)}, got {cfg.temporal_init!r}.")
    for key in ("n_data", "data_steps", "data_batch_size", "steps", "batch_size", "n", "eval_batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}.")
    if int(cfg.n_data) < int(cfg.batch_size):
        raise ConfigError(f"n_data ({cfg.n_data}) must be at least batch_size ({cfg.batch_size}).")
    if not float(cfg.lr) > 0 or not 0 <= float(cfg.min_lr_ratio) <= 1 or not 0 <= float(cfg.ema) < 1:
        raise ConfigError(f"need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= ema < 1, got {cfg.lr}, {cfg.min_lr_ratio} and {cfg.ema}.")
    if cfg.max_minutes is not None and float(cfg.max_minutes) <= 0:
        raise ConfigError(f"max_minutes must be positive or null, got {cfg.max_minutes}.")
    if cfg.model.kind != "net":
        raise ConfigError(f"dsno distils a network teacher; model {cfg.model.name} is {cfg.model.kind!r} (use model=edm).")
    teacher = resolve_path(str(cfg.model.checkpoint))
    if not teacher.is_file():
        raise ConfigError(f"dsno needs the teacher network file {teacher}, which does not exist.")
    arch = read_net_header(str(teacher))[0].get("arch")
    if arch != "unet":
        raise ConfigError(f"dsno copies a U-Net teacher; {teacher} holds a {arch!r} network.")
    try:
        data_table(str(cfg.data_solver), int(cfg.data_steps), float(cfg.sigma_min), float(cfg.sigma_max), float(cfg.rho))
        baselines.build(str(cfg.ref_solver), int(cfg.ref_nfe), sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for nfe in as_list(cfg.compare_nfe):
        compare_tables(cfg, as_list(cfg.compare), int(nfe))
    path = resume_path(cfg.get("resume"))
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"resume checkpoint {path} does not exist.")


def build_module(cfg: Any, teacher_config: dict[str, Any], shape: Sequence[int]) -> DSNOModule:
    """The module of a composed config (weights not yet copied from the teacher)."""
    sigmas = output_sigmas(int(cfg.M), float(cfg.sigma_min), float(cfg.sigma_max))
    config = student_config(teacher_config, sigmas, int(cfg.modes), bool(cfg.temporal), shape)
    return DSNOModule(config, sigma_max=float(cfg.sigma_max), sigma_data=float(teacher_config.get("sigma_data", 0.5)),
                      loss=str(cfg.loss), lr=float(cfg.lr), warmup_steps=int(cfg.warmup_steps), steps=int(cfg.steps),
                      min_lr_ratio=float(cfg.min_lr_ratio), ema_decay=float(cfg.ema), seed=int(cfg.seed),
                      weighting=str(cfg.weighting), temporal_init=str(cfg.temporal_init))


def run(cfg: Any) -> dict[str, Any]:
    """`python -m optimize dsno model=edm`: teacher trajectories (cached), Lightning training (CSV logs, checkpoints in
    <out_dir>/lightning, resume), export of the EMA student ``dsno-<model>.safetensors`` and its 1-NFE table
    ``dsno-<model>-1nfe.safetensors`` with a loss plot, then evaluation beside ``compare`` x ``compare_nfe`` classics.
    Returns {"student", "table", "rows", "train_seconds", "data_seconds"}."""

    out_dir, model, teacher_net, teacher_config = start_distillation(cfg)
    t0 = time.perf_counter()
    data, data_path, settings = load_or_generate(model, cfg, progress=bool(cfg.progress_bar))
    data_seconds = time.perf_counter() - t0
    print(f"dsno data: {len(data['noise'])} teacher trajectories ({settings['solver']}, {settings['nfe']} NFE) "
          f"in {data_path} ({data_seconds:.0f} s)", flush=True)
    module = build_module(cfg, teacher_config, model.shape).init_from(teacher_net)
    module.attach_data(data, store_index(int(cfg.M)), int(cfg.batch_size))
    module.run_settings = {"model": str(cfg.model.name), "model_fingerprint": model.fingerprint}
    sigmas = module.config["sigmas"]
    n_temporal = sum(p.numel() for n, p in module.student.named_parameters() if n.startswith("temporal."))
    print(f"dsno student: M={cfg.M} times (sigmas {', '.join(f'{s:.3g}' for s in sigmas)}), modes={cfg.modes}, "
          f"temporal={bool(cfg.temporal)} ({n_temporal:,} temporal parameters, init {cfg.temporal_init}), "
          f"{cfg.loss} loss weighted {cfg.weighting}, {cfg.steps} steps of batch {cfg.batch_size}", flush=True)
    train_seconds = fit_student(cfg, module, out_dir)
    tag = f"dsno-{cfg.model.name}"
    student_path = str(resolve_path(str(cfg.export))) if cfg.export else os.path.join(out_dir, f"{tag}.safetensors")
    table_path = (os.path.splitext(student_path)[0] + "-1nfe.safetensors")
    module.export(student_path, {"model": str(cfg.model.name), "teacher_fingerprint": model.fingerprint,
                                 "steps": int(module.global_step), "train_seconds": round(train_seconds, 1),
                                 "data": {k: v for k, v in settings.items() if k != "sigmas"}, "loss": str(cfg.loss)})
    student = load_denoiser(student_path)
    meta = {"format_version": FORMAT_VERSION, "method": "dsno", "base_solver": "dsno", "nfe": 1,
            "model_fingerprint": student.fingerprint(), "teacher_fingerprint": model.fingerprint,
            "student": os.path.basename(student_path), "M": int(cfg.M), "output_sigmas": sigmas,
            "weighting": str(cfg.weighting), "loss_weights": module.final_weights(), "temporal_init": str(cfg.temporal_init),
            "cost_note": f"1 network call that runs {cfg.M} time slice{'s' if int(cfg.M) > 1 else ''} (about {cfg.M} teacher "
                         f"forward{'s' if int(cfg.M) > 1 else ''})",
            "config": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not isinstance(v, (dict, list))}}
    one_step_table(float(cfg.sigma_max), meta).save(table_path)
    plot_loss(module.history, sigmas, os.path.join(out_dir, f"{tag}-loss.png"))
    write_history(module.history, len(sigmas), os.path.join(out_dir, f"{tag}-loss.csv"))
    print(f"dsno: {module.global_step} steps in {train_seconds:.0f} s -> {student_path}, {table_path}", flush=True)
    rows: list[dict[str, Any]] = []
    if cfg.evaluate_at_end:
        judge = Judge.for_model(cfg.model, model.shape, "cpu", n_boot=int(cfg.n_boot))
        jobs = [("dsno", SolverTable.load(table_path, fingerprint=student.fingerprint()), {"_denoiser": student})]
        for nfe in as_list(cfg.compare_nfe):
            jobs += [(label, table, {}) for label, table in compare_tables(cfg, as_list(cfg.compare), int(nfe))]
        rows = evaluate_jobs(cfg, model, judge, jobs, batch_size=int(cfg.eval_batch_size))
    return {"student": student_path, "table": table_path, "rows": rows, "train_seconds": train_seconds, "data_seconds": data_seconds}
