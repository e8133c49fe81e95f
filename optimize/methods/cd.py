"""Consistency distillation (Song, Dhariwal, Chen, Sutskever, "Consistency models", ICML 2023, Algorithm 2; code
openai/consistency_models, PyTorch, and openai/consistency_models_cifar10, JAX).

The student is a consistency function with the EDM-style boundary-condition scalings
(``samplers.nets.ConsistencyPrecond``, ``sd = sigma_data``, ``s_min = sigma_min``)::

    f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, log(s)/4),
    c_skip = sd^2 / ((s - s_min)^2 + sd^2),   c_out = sd (s - s_min) / sqrt(s^2 + sd^2),   f(x, s_min) = x,

its raw net F a copy of the teacher's (the public code's ``finetune``), so at the start f is nearly the teacher's
denoiser D.

Boundaries: Karras ``t_0 = sigma_max > t_1 > ... > t_{N-1} = sigma_min`` (rho 7). Loss (eq. 7; the public code's
``consistency_losses``, uniform weighting)::

    n ~ U{0 .. N-2},  z ~ N(0, I),  x = x0 + t_n z,
    x_hat = Heun step of the teacher's probability-flow ODE dx/ds = (x - D(x, s)) / s from t_n to t_{n+1},
    L = E[ d(f_theta(x, t_n), f_target(x_hat, t_{n+1})) ],   target = stop-grad, EMA of theta with rate mu,

with ``d`` the mean squared error over pixels (``loss=l2``, the paper's L2 metric) or the pseudo-Huber metric
``sqrt(|a - b|^2 + c^2) - c``, ``c = 0.00054 sqrt(dim)`` (``loss=pseudo_huber``; Song & Dhariwal 2023, "Improved
techniques for training consistency models", section 3.3). After each Adam step ``target <- mu target + (1-mu) theta``;
a second EMA (``ema``, with the project's warm-up) is the exported network, as the public code serves its
``ema_rate`` copy.

x0 (``x0_source``): ``real``, the data the teacher was trained on (the public code trains on the real data set;
the default), or ``teacher``, the teacher's own Heun samples (``teacher_nfe``) from the data seeds 4,000,000+.

Served artifact: the EMA network (a ``samplers`` network file with ``precond: consistency``) with two tables that
need no new runtime code: 1-NFE ``x = f(sigma_max e_0)``, and the multistep sampler (Algorithm 1) at the levels
``taus``: ``x_0 = sigma_max e_0``, ``x_i = f(x_{i-1}, s_{i-1}) + sqrt(tau_i^2 - s_min^2) e_i``, output
``f(x_last, tau_last)`` (fresh noise e_i per step, K = 1 + len(taus) noise columns). The public sampler also
clamps each f to [-1, 1], which a linear table cannot; the project clips only the final samples (``model.clip``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from samplers import SolverTable, baselines, make_noise, sample, schedules
from samplers.artifact import atomic_write_bytes
from samplers.denoisers import EDMPrecond
from samplers.nets import ConsistencyPrecond, build_net, load_denoiser, read_net_header, save_net
from samplers.table import FORMAT_VERSION

from optimize import data
from optimize.base import ConfigError, as_list, repo_relative, resolve_path
from optimize.base.keys import Key, count
from optimize.base.seeds import DATA_SEED_OFFSET, seed_range
from optimize.evaluation.evaluate import Judge, evaluate_jobs
from optimize.training.checkpoints import resume_path
from optimize.training.distill import one_step_table
from optimize.training.runs import (
    NaNLossError,
    TrainingModule,
    compare_tables,
    fit_student,
    start_distillation,
    step_batch_index,
)

KEYS = {  # this method's typed keys (optimize.base.keys; steps, lr, ema, n_data, ... are SHARED)
    "N": count(100_000, low=2), "target_ema": Key("num", 0, 1)}
LOSSES = ("l2", "pseudo_huber")
SOURCES = ("real", "teacher")
TEACHER_ARCHS = ("unet", "mlp")


# --- the maths --------------------------------------------------------------------------------------
def boundaries(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The N Karras boundaries ``t_0 = sigma_max > ... > t_{N-1} = sigma_min`` (the public code's
    ``(t_max^(1/rho) + i/(N-1) (t_min^(1/rho) - t_max^(1/rho)))^rho``)."""
    if n < 2:
        raise ValueError(f"N (boundaries) must be at least 2, got {n}.")
    return [float(s) for s in schedules.make("karras", n, sigma_min, sigma_max, rho=rho)]


def heun_step(denoiser: Any, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Heun step of the probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` from ``t`` to ``t_next`` (per-sample
    ``[B]``; EDM's Algorithm 1 without the last-step exception)::

        d = (x - D(x, t)) / t,  x_e = x + (t_next - t) d,  d' = (x_e - D(x_e, t_next)) / t_next,
        x_hat = x + (t_next - t) (d + d') / 2
    """
    shape = (-1, *([1] * (x.ndim - 1)))
    tb, nb = t.reshape(shape), t_next.reshape(shape)
    d = (x - denoiser(x, t)) / tb
    x_e = x + (nb - tb) * d
    d_next = (x_e - denoiser(x_e, t_next)) / nb
    return x + (nb - tb) * (d + d_next) / 2


def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Per-sample ``d(a, b)`` ``[B]``: ``mean_pixels (a - b)^2`` (l2) or ``sqrt(|a - b|^2 + c^2) - c`` with
    ``c = 0.00054 sqrt(dim)`` (pseudo_huber, Song & Dhariwal 2023)."""
    diff = (a - b).flatten(1)
    if loss == "l2":
        return diff.pow(2).mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.pow(2).sum(1) + c**2).sqrt() - c


def multistep_table(sigma_max: float, taus: Sequence[float], sigma_min: float,
                    metadata: dict[str, Any] | None = None) -> SolverTable:
    """The consistency model's multistep sampler (Algorithm 1) as a table with N = 1 + len(taus) evaluations and
    K = N noises: ``x_0 = sigma_max e_0``; ``x_i = d_{i-1} + sqrt(tau_i^2 - sigma_min^2) e_i``; output ``d_{N-1}``.
    With no taus it is ``one_step_table``'s table."""
    sig = [float(sigma_max), *(float(t) for t in taus)]
    n = k = len(sig)
    coef = torch.zeros(n + 1, k + 2 * n, dtype=torch.float64)
    coef[0, 0] = sig[0]
    for i in range(1, n):
        coef[i, k + n + i - 1] = 1.0                      # d_{i-1} = f(x_{i-1}, s_{i-1})
        coef[i, i] = math.sqrt(sig[i] ** 2 - sigma_min**2)  # fresh noise e_i
    coef[n, k + 2 * n - 1] = 1.0
    return SolverTable(torch.tensor(sig, dtype=torch.float64), coef, metadata)


# --- data ---------------------------------------------------------------------------------------------
def real_data(mcfg: Any) -> torch.Tensor:
    """The teacher's training set (``optimize.data.training_data``), with its mirrors appended when the teacher
    trained with ``hflip``."""
    x = data.training_data(mcfg)
    if x is None:
        raise ConfigError(f"x0_source=real: model {mcfg.name} has no teacher training set (data {mcfg.data!r}); use "
                          f"x0_source=teacher.")
    return torch.cat([x, x.flip(-1)]) if mcfg.get("teacher", {}).get("hflip", False) else x


def teacher_samples(denoiser: Any, shape: Sequence[int], seeds: Sequence[int], nfe: int, sigma_min: float,
                    sigma_max: float, batch_size: int = 1024) -> torch.Tensor:
    """The teacher's own samples: a Heun solve with ``nfe`` evaluations (EDM's end: the last step to 0) from
    ``sigma_max e`` of each seed (``make_noise``)."""
    table = baselines.build("heun", nfe, sigma_min=sigma_min, sigma_max=sigma_max)
    seeds, out = list(seeds), []
    with torch.no_grad():
        for b in range(0, len(seeds), batch_size):
            y = sample(table, denoiser, make_noise(table, shape, seeds[b:b + batch_size]))
            if not torch.isfinite(y).all():
                raise NaNLossError(f"cd stopped before training: the teacher's Heun solve ({nfe} NFE) gave "
                                   f"non-finite samples.")
            out.append(y.float())
    return torch.cat(out)


# --- the student ----------------------------------------------------------------------------------------
def student_config(teacher_config: dict[str, Any], sigma_min: float) -> dict[str, Any]:
    """The network-file config of the student: the teacher's architecture with ``precond: consistency``."""
    return {**teacher_config, "precond": "consistency", "sigma_min": float(sigma_min)}


def arch_config(config: dict[str, Any]) -> dict[str, Any]:
    """A network-file config without its preconditioning keys (what ``build_net`` takes)."""
    return {k: v for k, v in config.items() if k not in ("precond", "sigma_data", "sigma_min")}


class CDModule(TrainingModule):
    """The online consistency function, its target (EMA rate ``target_ema``, never trained) and the exported EMA
    (``ema_decay``); the teacher (``attach``) is held outside the module's state, so checkpoints hold only the student.

    Step t draws its batch (``step_batch_index``), boundary indices and noise from generators seeded by
    (seed, t), so a resumed run continues exactly as the uninterrupted one; the target and the EMA are in the
    checkpoint. EMA, clock, NaN stop and history come from ``optimize.training.runs.TrainingModule``.
    """

    method = "cd"

    def __init__(self, config: dict[str, Any], sigmas: Sequence[float], loss: str = "l2", lr: float = 4e-4,
                 warmup_steps: int = 100, target_ema: float = 0.95, ema_decay: float = 0.999, seed: int = 0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if len(sigmas) < 2:
            raise ValueError(f"need at least 2 boundaries, got {len(sigmas)}.")
        self.save_hyperparameters()
        self.config = dict(config)
        self.online = ConsistencyPrecond(build_net(arch_config(config)), float(config.get("sigma_data", 0.5)),
                                         float(config["sigma_min"]))
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.ema = copy.deepcopy(self.online).requires_grad_(False)
        self.sigmas = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)  # float64 on the CPU, not a buffer
        self.x0: torch.Tensor | None = None
        self.batch_size = 0
        object.__setattr__(self, "teacher", None)  # not a submodule: kept out of state_dict and checkpoints

    def init_from(self, teacher_net: nn.Module) -> "CDModule":
        """Copy the teacher's raw net F into the online, target and EMA students."""
        for student in (self.online, self.target, self.ema):
            student.net.load_state_dict(teacher_net.state_dict(), strict=True)
        return self

    def attach(self, teacher: Any, x0: torch.Tensor, batch_size: int) -> "CDModule":
        """The teacher denoiser D (its Heun steps make the targets) and the clean data ``x0 [n, *shape]``."""
        object.__setattr__(self, "teacher", teacher)
        self.x0, self.batch_size = x0, min(int(batch_size), len(x0))
        return self

    def on_fit_start(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(self.device)

    def step_generator(self) -> torch.Generator:
        """The CPU generator of this step's boundary indices and noise, seeded by (seed, global_step)."""
        return torch.Generator().manual_seed((int(self.hparams.seed) * 1_000_000_007 + int(self.global_step)) % 2**63)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's ``(x0, n, z)``: a pure function of seed and global step."""
        assert self.x0 is not None, "attach() the teacher and the data first"
        idx = step_batch_index(len(self.x0), self.batch_size, int(self.hparams.seed), int(self.global_step))
        x0, gen = self.x0[idx], self.step_generator()
        n = torch.randint(0, len(self.sigmas) - 1, (len(x0),), generator=gen)
        z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        return x0.to(self.device), n.to(self.device), z.to(self.device)

    def losses(self, x0: torch.Tensor, n: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-sample ``d(f_theta(x0 + t_n z, t_n), f_target(heun(x0 + t_n z; t_n -> t_{n+1}), t_{n+1}))``."""
        n = n.cpu()
        t, t_next = (self.sigmas[i].to(x0.device, x0.dtype) for i in (n, n + 1))
        x = x0 + t.reshape(-1, *([1] * (x0.ndim - 1))) * z
        with torch.no_grad():
            target = self.target(heun_step(self.teacher, x, t, t_next), t_next)
        return distance(self.online(x, t), target, str(self.hparams.loss))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The mean distance on this step's inputs; raises NaNLossError on a non-finite loss."""
        loss = self.losses(*self.step_inputs()).mean()
        self.check_loss(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        self.history.append([int(self.global_step), float(loss.detach())])
        return loss

    def ema_pairs(self) -> tuple[Any, Any]:
        return self.ema.parameters(), self.online.parameters()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Adam step and the exported EMA (``TrainingModule``), then the target ``<- mu target + (1 - mu) theta``."""
        super().optimizer_step(*args, **kwargs)
        mu = float(self.hparams.target_ema)
        with torch.no_grad():
            for pt, p in zip(self.target.parameters(), self.online.parameters()):
                pt.lerp_(p.detach(), 1 - mu)

    def configure_optimizers(self) -> Any:
        """Adam; linear warm-up over ``warmup_steps``, then constant (the public code's ``lr_anneal_steps 0``)."""
        opt = torch.optim.Adam(self.online.parameters(), lr=self.hparams.lr)
        warm = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, path: str, extra_metadata: dict | None = None) -> str:
        """Save the EMA student as a network file (``samplers.nets.load_denoiser`` serves it as ConsistencyPrecond)."""
        meta = {"trainer": "optimize.cd", "global_step": int(self.global_step), **(extra_metadata or {})}
        return save_net(self.ema.net, self.config, path, extra_metadata=meta)


def write_history(history: list[list[float]], path: str) -> str:
    """The loss curve (kept in the Lightning checkpoint, so it survives resume) as CSV: step, loss."""
    lines = ["step,loss", *(f"{int(h[0])},{h[1]:.6g}" for h in history)]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


# --- the command -------------------------------------------------------------------------------------------
def check_taus(taus: Any, sigma_min: float, sigma_max: float) -> list[float]:
    """``taus`` as floats: a list of decreasing noise levels strictly inside (sigma_min, sigma_max); ConfigError else."""
    try:
        values = [float(t) for t in as_list(taus)]
    except (TypeError, ValueError):
        raise ConfigError(f"taus must be a list of numbers, got {taus!r}.") from None
    if any(not sigma_min < t < sigma_max for t in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ConfigError(f"taus must decrease strictly inside (sigma_min, sigma_max) = ({sigma_min:g}, {sigma_max:g}), "
                          f"got {values}.")
    return values


def validate(cfg: Any) -> None:
    """CD's own checks, made before any work (called by the CLI)."""
    for key in ("N", "steps", "batch_size", "n_data", "teacher_nfe", "n", "eval_batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}.")
    if int(cfg.N) < 2:
        raise ConfigError(f"N (Karras boundaries sigma_max .. sigma_min) must be at least 2, got {cfg.N}.")
    for key in ("target_ema", "ema"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or not 0 <= float(cfg[key]) < 1:
            raise ConfigError(f"{key} (an EMA rate) must lie in [0, 1), got {cfg[key]!r}.")
    if not float(cfg.lr) > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}.")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}.")
    if cfg.x0_source not in SOURCES:
        raise ConfigError(f"x0_source must be one of {', '.join(SOURCES)}, got {cfg.x0_source!r}.")
    if cfg.max_minutes is not None and float(cfg.max_minutes) <= 0:
        raise ConfigError(f"max_minutes must be positive or null, got {cfg.max_minutes}.")
    check_taus(cfg.taus, float(cfg.sigma_min), float(cfg.sigma_max))
    if cfg.model.kind != "net":
        raise ConfigError(f"cd distils a network teacher; model {cfg.model.name} is {cfg.model.kind!r} (use model=edm).")
    teacher = resolve_path(str(cfg.model.checkpoint))
    if not teacher.is_file():
        raise ConfigError(f"cd needs the teacher network file {teacher}, which does not exist.")
    config = read_net_header(str(teacher))[0]
    if config.get("arch") not in TEACHER_ARCHS or config.get("precond", "edm") != "edm":
        raise ConfigError(f"cd copies an EDM-preconditioned {' or '.join(TEACHER_ARCHS)} teacher; {teacher} holds a "
                          f"{config.get('arch')!r} network with precond {config.get('precond', 'edm')!r}.")
    if cfg.x0_source == "real" and cfg.model.data != "digits" and "teacher" not in cfg.model:
        raise ConfigError(f"x0_source=real: model {cfg.model.name} has no teacher training set; use x0_source=teacher.")
    try:
        baselines.check_nfe("heun", int(cfg.teacher_nfe))
        seed_range(DATA_SEED_OFFSET, int(cfg.seed), int(cfg.n_data))
    except ValueError as err:
        raise ConfigError(f"teacher_nfe / n_data: {err}") from None
    for nfe in as_list(cfg.compare_nfe):
        compare_tables(cfg, as_list(cfg.compare), int(nfe))
    path = resume_path(cfg.get("resume"))
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"resume checkpoint {path} does not exist.")


def build_module(cfg: Any, teacher_config: dict[str, Any]) -> CDModule:
    """The module of a composed config (weights not yet copied from the teacher)."""
    smin, smax = float(cfg.sigma_min), float(cfg.sigma_max)
    return CDModule(student_config(teacher_config, smin), boundaries(int(cfg.N), smin, smax, float(cfg.rho)),
                    loss=str(cfg.loss), lr=float(cfg.lr), warmup_steps=int(cfg.warmup_steps),
                    target_ema=float(cfg.target_ema), ema_decay=float(cfg.ema), seed=int(cfg.seed))


def clean_data(cfg: Any, teacher: Any, shape: Sequence[int]) -> torch.Tensor:
    """x0 of ``x0_source``: the teacher's training set, or its Heun samples from the data seeds."""
    if cfg.x0_source == "real":
        return real_data(cfg.model).float()
    seeds = seed_range(DATA_SEED_OFFSET, int(cfg.seed), int(cfg.n_data))
    return teacher_samples(teacher, shape, seeds, int(cfg.teacher_nfe), float(cfg.sigma_min), float(cfg.sigma_max),
                           int(cfg.data_batch_size))


def run(cfg: Any) -> dict[str, Any]:
    """`python -m optimize cd model=edm`: Lightning training (CSV logs, checkpoints in <out_dir>/lightning, resume),
    export of the EMA student ``cd-<model>.safetensors``, its 1-NFE table ``cd-<model>-1nfe.safetensors`` and its
    multistep table ``cd-<model>-<1+len(taus)>nfe.safetensors``, the loss curve, then evaluation of both tables beside
    ``compare`` x ``compare_nfe`` classics. Returns {"student", "tables", "rows", "train_seconds", "data_seconds"}."""
    out_dir, model, teacher_net, teacher_config = start_distillation(cfg)
    teacher = EDMPrecond(teacher_net, sigma_data=float(teacher_config.get("sigma_data", 0.5))).eval().requires_grad_(False)
    t0 = time.perf_counter()
    x0 = clean_data(cfg, teacher, model.shape)
    data_seconds = time.perf_counter() - t0
    module = build_module(cfg, teacher_config).init_from(teacher_net).attach(teacher, x0, int(cfg.batch_size))
    module.run_settings = {"model": str(cfg.model.name), "model_fingerprint": model.fingerprint,
                           "x0_source": str(cfg.x0_source), "n_x0": len(x0),
                           "teacher_nfe": int(cfg.teacher_nfe) if cfg.x0_source == "teacher" else None}
    sig = module.sigmas.tolist()
    print(f"cd: {len(x0)} x0 ({cfg.x0_source}, {data_seconds:.0f} s), N={cfg.N} Karras boundaries {sig[0]:g} .. "
          f"{sig[-1]:g}, target EMA {cfg.target_ema}, export EMA {cfg.ema}, loss {cfg.loss}, {cfg.steps} steps of "
          f"batch {module.batch_size}", flush=True)
    train_seconds = fit_student(cfg, module, out_dir)
    tag = f"cd-{cfg.model.name}"
    student_path = str(resolve_path(str(cfg.export))) if cfg.export else os.path.join(out_dir, f"{tag}.safetensors")
    folder = str(resolve_path(str(cfg.tables_dir))) if cfg.get("tables_dir") else os.path.dirname(student_path)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, os.path.splitext(os.path.basename(student_path))[0])
    module.export(student_path, {"model": str(cfg.model.name), "teacher_fingerprint": model.fingerprint,
                                 "steps": int(module.global_step), "train_seconds": round(train_seconds, 1),
                                 "x0_source": str(cfg.x0_source), "loss": str(cfg.loss), "N": int(cfg.N)})
    student = load_denoiser(student_path)
    taus = check_taus(cfg.taus, float(cfg.sigma_min), float(cfg.sigma_max))
    base = {"format_version": FORMAT_VERSION, "method": "cd", "base_solver": "cd", "model_fingerprint": student.fingerprint(),
            "teacher_fingerprint": model.fingerprint, "student": repo_relative(student_path), "N": int(cfg.N),
            "config": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not isinstance(v, (dict, list))}}
    one = one_step_table(float(cfg.sigma_max), {**base, "nfe": 1})
    multi = multistep_table(float(cfg.sigma_max), taus, float(cfg.sigma_min), {**base, "nfe": 1 + len(taus), "taus": taus})
    tables = [one.save(f"{stem}-1nfe.safetensors")]
    if taus:
        tables.append(multi.save(f"{stem}-{multi.nfe}nfe.safetensors"))
    write_history(module.history, os.path.join(out_dir, f"{tag}-loss.csv"))
    steps_run = max(1, len(module.history))
    print(f"cd: {module.global_step} steps in {train_seconds:.0f} s ({1000 * train_seconds / steps_run:.0f} ms/step) -> "
          f"{student_path}, {', '.join(tables)}", flush=True)
    rows: list[dict[str, Any]] = []
    if cfg.evaluate_at_end:
        judge = Judge.for_model(cfg.model, model.shape, "cpu", n_boot=int(cfg.n_boot))
        fp = student.fingerprint()
        jobs = [("cd", SolverTable.load(tables[0], fingerprint=fp), {"_denoiser": student})]
        if taus:
            jobs.append((f"cd-{multi.nfe}step", SolverTable.load(tables[1], fingerprint=fp), {"_denoiser": student}))
        for nfe in as_list(cfg.compare_nfe):
            jobs += [(label, table, {}) for label, table in compare_tables(cfg, as_list(cfg.compare), int(nfe))]
        rows = evaluate_jobs(cfg, model, judge, jobs, batch_size=int(cfg.eval_batch_size))
    return {"student": student_path, "tables": tables, "rows": rows, "train_seconds": train_seconds,
            "data_seconds": data_seconds}
