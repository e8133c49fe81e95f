"""EDM teacher training (Karras et al. 2022, "Elucidating the design space", section 5).

A raw net F (``samplers.nets.build_net``) is wrapped in EDM preconditioning
``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, log(s)/4)`` (``samplers.denoisers.EDMPrecond``) and
trained with

    ln s ~ N(P_mean, P_std^2),      x = x0 + s n,  n ~ N(0, I),
    lambda(s) = (s^2 + sd^2) / (s sd)^2,
    L = E[ lambda(s) * mean_pixels (D(x, s) - x0)^2 ],

which makes the effective target of F unit-variance at every noise level. The exported weights are an
exponential moving average ``w_ema <- beta w_ema + (1 - beta) w`` updated after every optimiser step.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from samplers.denoisers import EDMPrecond
from samplers.nets import build_net, save_net

from optimize import data
from optimize.base import ConfigError, resolve_path
from optimize.training.checkpoints import pick_resume, resume_path
from optimize.base.keys import Key, rate
from optimize.training.runs import NaNLossError, TrainingModule, step_batch_index, ticks, trainer_parts

KEYS = {"p_mean": Key("num"), "p_std": rate()}  # this method's typed keys (optimize.base.keys; shared ones are declared there)


def sample_sigma(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` noise levels with ``ln sigma ~ N(p_mean, p_std^2)``."""
    return (torch.randn(n, generator=generator, device=device) * p_std + p_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (= 1 / c_out(s)^2)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mean_b lambda(s_b) * mean_pixels (D(x0_b + s_b n_b, s_b) - x0_b)^2``."""
    sd = float(getattr(denoiser, "sigma_data", 0.5))
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    d = denoiser(x0 + s * noise, sigma)
    per_sample = (d - x0).pow(2).flatten(1).mean(1)
    return (edm_weight(sigma, sd) * per_sample).mean()


class TeacherModule(TrainingModule):
    """EDM-preconditioned net trained with the EDM loss; keeps EMA weights for export.

    ``net_config`` is a ``samplers.nets`` config (e.g. ``{"arch": "unet"}``); the saved file adds
    ``precond: edm`` and ``sigma_data``. Batches are tensors ``x0`` (or tuples whose first item is x0).
    Learning rate: linear warm-up over ``warmup_steps`` then constant.

    Everything random in a step (its noise levels, noise, flips and, after ``attach_data``, which training
    samples it sees) is drawn from a generator seeded by ``(seed, rank, global_step)``, so a run resumed from a
    checkpoint continues exactly as the uninterrupted run would (same batches, same loss curve). EMA, clock, NaN stop
    and checkpointed settings come from ``optimize.training.runs.TrainingModule``.
    """

    method = "teacher"

    def __init__(self, net_config: dict[str, Any], sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 lr: float = 2e-3, warmup_steps: int = 200, ema_decay: float = 0.999, hflip: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net_config = dict(net_config)
        self.denoiser = EDMPrecond(build_net(self.net_config), sigma_data=sigma_data)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.data: torch.Tensor | None = None  # set by attach_data: batches then follow the step, not the loader
        self.batch_size = 0

    def attach_data(self, x: torch.Tensor, batch_size: int) -> "TeacherModule":
        """Train on ``x``: step t uses batch ``t mod E`` of epoch ``t // E``'s seeded permutation (E = len(x) // batch_size)."""
        self.data, self.batch_size = x, min(int(batch_size), len(x))
        return self

    def step_generator(self) -> torch.Generator:
        """The CPU generator of this step's randomness, seeded by (seed, rank, global_step)."""
        seed = (int(self.hparams.get("seed", 0)) * 1_000_003 + int(self.global_rank)) * 1_000_000_007 + int(self.global_step)
        return torch.Generator().manual_seed(seed % 2**63)

    def step_batch(self) -> torch.Tensor:
        """This step's training batch from the attached data (a pure function of seed and global step)."""
        assert self.data is not None
        idx = step_batch_index(len(self.data), self.batch_size, int(self.hparams.get("seed", 0)), int(self.global_step))
        return self.data[idx].to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One EDM loss evaluation on this step's batch (the attached data's, else the loader's); raises NaNLossError
        on a non-finite loss."""
        x0 = self.step_batch() if self.data is not None else (batch[0] if isinstance(batch, (tuple, list)) else batch)
        gen = self.step_generator()
        if self.hparams.hflip:
            flip = (torch.rand(x0.shape[0], generator=gen) < 0.5).to(x0.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        sigma = sample_sigma(x0.shape[0], self.hparams.p_mean, self.hparams.p_std, generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        loss = edm_loss(self.denoiser, x0, sigma, noise)
        self.check_loss(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        return loss

    def ema_pairs(self) -> tuple[Any, Any]:
        """The exported EMA weights follow the trained denoiser's (buffers are constants: frequencies)."""
        return self.ema.parameters(), self.denoiser.parameters()

    def configure_optimizers(self) -> Any:
        """Adam with a linear learning-rate warm-up."""
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=self.hparams.lr)
        warm = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def file_config(self) -> dict[str, Any]:
        """The net config as written to the safetensors header."""
        return {**self.net_config, "precond": "edm", "sigma_data": float(self.hparams.sigma_data)}

    def export(self, path: str, extra_metadata: dict | None = None) -> str:
        """Save the EMA net so ``samplers.nets.load_denoiser(path)`` rebuilds the EMA denoiser."""
        meta = {"trainer": "optimize.teacher", "global_step": int(self.global_step), **(extra_metadata or {})}
        return save_net(self.ema.net, self.file_config(), path, extra_metadata=meta)


def data_loader(x: torch.Tensor, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """Shuffled (seeded), drop-last loader over the tensor ``x``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=min(batch_size, len(x)), shuffle=True,
                                       drop_last=True, generator=gen)


# --- the command ----------------------------------------------------------------------------------
def training_data(mcfg: Any) -> torch.Tensor:
    """The training set of a model config (``optimize.data.training_data``); one ConfigError for a model without one."""
    x = data.training_data(mcfg)
    if x is None:
        raise ConfigError(f"model {mcfg.name}: no teacher training for data {mcfg.data!r} (valid: digits, toy2d, shapes, "
                          f"patches).")
    return x


def validate(cfg: Any) -> None:
    """Teacher checks made before any work (called by the CLI)."""
    if cfg.model.kind != "net" or "teacher" not in cfg.model:
        raise ConfigError(f"model {cfg.model.name} has nothing to train (kind {cfg.model.kind}); teachers exist for edm, toy2d, shapes.")
    for key in ("steps", "batch_size"):
        if int(cfg[key]) <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]}.")
    ckpt = resume_path(cfg.resume)
    if ckpt is not None and not os.path.isfile(ckpt):
        raise ConfigError(f"resume checkpoint {ckpt} does not exist.")


# Settings that do not change what a resumed run computes (steps only says where a constant-lr run stops).
RESUME_IGNORE = ("steps",)


def run_settings(cfg: Any, n_data: int) -> dict[str, Any]:
    """What a teacher checkpoint records besides its hyper-parameters, so resume= only continues the same run."""
    return {"model": str(cfg.model.name), "data": str(cfg.model.data), "n_data": int(n_data), "batch_size": int(cfg.batch_size),
            "steps": int(cfg.steps)}


def build_module(cfg: Any) -> TeacherModule:
    """The module of a composed teacher config (no data attached yet)."""
    tcfg = cfg.model.teacher
    net_config = OmegaConf.to_container(tcfg.net, resolve=True)
    return TeacherModule(net_config, sigma_data=float(cfg.sigma_data), p_mean=float(cfg.p_mean), p_std=float(cfg.p_std),
                         lr=float(cfg.lr), warmup_steps=int(cfg.warmup_steps), ema_decay=float(cfg.ema),
                         hflip=bool(tcfg.get("hflip", False)), seed=int(cfg.seed))


def run(cfg: Any) -> str:
    """`python -m optimize teacher model=...`: EDM training with Lightning (CSV logs, checkpoints every
    ``checkpoint_every`` steps in ``<out_dir>/lightning``, ``resume=PATH`` continues), then the EMA net is
    exported to ``export`` (default ``<out_dir>/teacher.safetensors``). Returns the exported path."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    x = training_data(cfg.model)
    module = build_module(cfg).attach_data(x, int(cfg.batch_size))
    module.run_settings = run_settings(cfg, len(x))
    out_dir = str(cfg.out_dir)
    ckpt_path = pick_resume(cfg.resume, out_dir, {**dict(module.hparams), **module.run_settings}, ignore=RESUME_IGNORE)
    parts = trainer_parts(cfg, out_dir)
    trainer = L.Trainer(accelerator="auto", devices="auto", max_steps=int(cfg.steps), **parts,
                        log_every_n_steps=max(1, min(10, int(cfg.steps) // 2)), enable_model_summary=False, default_root_dir=out_dir)
    n_params = sum(p.numel() for p in module.denoiser.parameters())
    print(f"teacher {cfg.model.name}: {n_params:,} parameters, {len(x)} training samples, {cfg.steps} steps", flush=True)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, ticks(), ckpt_path=ckpt_path, weights_only=True)
    except NaNLossError as err:
        raise ConfigError(f"{err} Lower lr, or resume from an earlier checkpoint") from None
    seconds = time.perf_counter() - t0
    path = str(cfg.export) if cfg.export else os.path.join(out_dir, "teacher.safetensors")
    if trainer.is_global_zero:
        path = module.export(str(resolve_path(path)) if cfg.export else path,
                             {"model": str(cfg.model.name), "steps": int(module.global_step), "batch_size": int(cfg.batch_size),
                              "seed": int(cfg.seed), "data": str(cfg.model.data), "n_data": len(x),
                              "train_seconds": round(seconds, 1)})
        print(f"teacher {cfg.model.name}: {module.global_step} steps in {seconds:.0f} s -> {path}", flush=True)
    return path
