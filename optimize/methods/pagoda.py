"""PaGoDA: grow a one-step generator past its teacher's resolution (Kim, Lai, Liao, Takida, Murata, Uesaka, Mitsufuji,
Ermon, "PaGoDA: Progressive Growing of a One-Step Generator from a Low-Resolution Diffusion Teacher", NeurIPS 2024;
code sony/pagoda).

Stage 1, latents: each real training image (and its mirror) is area-downsampled to the teacher's resolution r and
carried to noise by the teacher's probability-flow ODE run forward, ``dx/ds = (x - D(x, s)) / s`` from sigma_min to
sigma_max (deterministic Heun on a Karras grid, a solver table from ``encode_table`` run by ``samplers.sample``)::

    z = ODE_{sigma_min -> sigma_max}(avgpool(x)),      cached on disk by teacher fingerprint and settings.

Stage 2 (base, r x r): the generator ``G(z) = F(c_in(sigma_max) z, log(sigma_max)/4)`` is a copy of the teacher net F
with its raw output as the image (``samplers.nets.PaGoDAGenerator``, served by ``denoisers.InputScaled``). Stages
3.. (2r, 4r, ...): a x2 up-sampling stage whose last convolutions start at zero is added on the last features, the
earlier blocks are frozen. At the stage of resolution R, with the real image x_R (area-downsampled to R) and a
discriminator D_R at R (a new one per stage)::

    L_rec = d(G(z), x_R)      d: feature distance on a frozen net + pixel L2 + amplitude-spectrum L1 (``FeatureDistance``)
    L_G   = -E D_R(G(sigma_max e)),  e ~ N(0, I)         fresh noise
    L     = L_rec + w_R * lambda * L_G,   lambda = clip(|grad_W L_rec| / |grad_W L_G|, 0.01, 10)
    L_D   = E relu(1 - D_R(x_R)) + E relu(1 + D_R(G(sigma_max e)))      (hinge)

with W the weight of the convolution that writes the stage's image, w = 0.2 at the base and 1.0 when growing. One
step updates G, then D ``d_steps`` times (on fresh noise each). The exported generator of each resolution is the EMA of the trained weights (a network file
``samplers.nets`` builds) with the 1-NFE table ``x_0 = sigma_max e_0``, output ``d_0`` (the output has the stage's
resolution, the noise the teacher's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from samplers import SolverTable, baselines, sample, schedules
from samplers.artifact import atomic_save, atomic_write_bytes
from samplers.images import write_png_grid
from samplers.nets import PaGoDAGenerator, build_net, load_denoiser, read_net_header, save_net
from samplers.table import FORMAT_VERSION

from optimize import data
from optimize.base import ConfigError, as_list, resolve_path
from optimize.training.checkpoints import pick_resume, resume_path
from optimize.evaluation.classifier import CLASSIFIER_FORMAT, load_classifier
from optimize.training.distill import one_step_table
from optimize.evaluation.evaluate import draw, evaluate, format_table, load_model, write_results
from optimize.evaluation.judge import REAL_N, Judge, feature_maps
from optimize.base.keys import Key, count, rate
from optimize.evaluation.results import add_paired_columns, verdict
from optimize.training.runs import (
    NaNLossError,
    TrainingModule,
    ema_update,
    start_distillation,
    ticks,
    trainer_parts,
)

KEYS = {  # this method's typed keys (optimize.base.keys; shared ones are declared there)
    "stages": count(8), "base_steps": count(10**8, low=0), "encode_steps": count(100_000, low=2), "d_lr": rate(),
    "pixel_weight": Key("num", 0), "freq_weight": Key("num", 0), "d_steps": count(100)}
PATCH_RESOLUTIONS = (8, 16, 32)  # optimize.data.patches
PATCH_CHANNELS = 3  # the patches are RGB


# --- stage 1: latents by the teacher's ODE run forward --------------------------------------------------------------
def encode_table(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> SolverTable:
    """Heun (EDM's 2nd-order step, Euler on the last) on the ``steps``-point Karras grid run UP from sigma_min to
    sigma_max: input ``x_0 = e_0`` (the image itself, taken as the state at sigma_min), output the state at sigma_max.
    NFE = 2 (steps - 1) - 1."""
    if steps < 2:
        raise ValueError(f"the encoding grid needs at least 2 points, got {steps}.")
    grid = schedules.make("karras", int(steps), float(sigma_min), float(sigma_max), rho=float(rho))[::-1].copy()
    sigmas, coef = baselines.heun(grid[:-1], final=float(grid[-1]))
    assert np.count_nonzero(coef[:, 0]) == 1 and coef[0, 0] == grid[0]  # e_0 is read by row 0 alone
    coef[0, 0] = 1.0
    return SolverTable(sigmas, coef, {"format_version": FORMAT_VERSION, "method": "pf_ode_forward", "base_solver": "heun",
                                      "nfe": len(sigmas), "schedule": {"schedule": "karras", "rho": rho, "steps": int(steps),
                                                                       "sigma_min": sigma_min, "sigma_max": sigma_max}})


def decode_table(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> SolverTable:
    """The same grid run down (the teacher's Heun sampler from ``sigma_max e_0`` to 0): ``steps`` - 1 Heun steps and
    an Euler step to 0; with ``e_0 = z / sigma_max`` it maps a latent back to its image."""
    return baselines.build("heun", 2 * int(steps) - 1, sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))


def run_ode(table: SolverTable, denoiser: Any, start: torch.Tensor, batch_size: int = 1000, desc: str | None = None) -> torch.Tensor:
    """``sample(table, denoiser, start[None])`` in batches (no grad), with a progress bar when ``desc`` is given."""
    out = torch.empty_like(start)
    bar = None
    if desc:
        bar = tqdm(total=len(start), desc=desc, unit="img")
    with torch.no_grad():
        for b in range(0, len(start), batch_size):
            x = sample(table, denoiser, start[b:b + batch_size][None])
            if not torch.isfinite(x).all():
                raise FloatingPointError("the teacher's ODE left the finite numbers.")
            out[b:b + len(x)] = x
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    return out


def encode(denoiser: Any, images: torch.Tensor, steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0, batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """Latents ``z = ODE_{sigma_min -> sigma_max}(images)`` (images at the teacher's resolution)."""
    table = encode_table(steps, sigma_min, sigma_max, rho)
    return run_ode(table, denoiser, images, batch_size, f"pagoda latents ({table.nfe}-NFE Heun up)" if progress else None)


def decode(denoiser: Any, latents: torch.Tensor, steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0, batch_size: int = 1000) -> torch.Tensor:
    """Images ``ODE_{sigma_max -> 0}(z)`` on the same grid (the inverse of ``encode`` up to discretisation)."""
    return run_ode(decode_table(steps, sigma_min, sigma_max, rho), denoiser, latents / sigma_max, batch_size)


def training_images(n: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """The ``n`` training crops (``optimize.data.patches`` "train", seed ``seed``) at ``resolution``, then their mirrors:
    ``[2n, 3, R, R]``."""
    x = data.patches("train", n, seed=seed, resolution=resolution)
    return torch.cat([x, x.flip(-1)])


def area_downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Means over ``(R / resolution)^2`` pixel blocks (the area filter ``optimize.data.patches`` uses)."""
    f = x.shape[-1] // int(resolution)
    return x if f == 1 else F.avg_pool2d(x.to(torch.float64), f).to(x.dtype)


def load_or_encode(model: Any, cfg: Any, progress: bool = True) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """The cached latents of ``cfg`` for the teacher ``model`` (an evaluate.Model), encoding them once."""

    r = int(model.shape[-1])
    settings = {"data": "patches", "n_data": int(cfg.n_data), "seed": int(cfg.data_seed), "flips": True, "resolution": r,
                "steps": int(cfg.encode_steps), "sigma_min": float(cfg.sigma_min), "sigma_max": float(cfg.sigma_max),
                "rho": float(cfg.rho), "dtype": str(model.dtype)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(str(resolve_path(str(cfg.data_cache_dir))), f"pagoda-{model.fingerprint}-{key}.safetensors")
    if os.path.isfile(path):  # with the encoding time of the run that made it

        with safe_open(path, framework="pt") as f:
            made = json.loads((f.metadata() or {}).get("settings", "{}"))
        return load_file(path)["latent"], path, {**settings, "seconds": made.get("seconds")}
    t0 = time.perf_counter()
    low = training_images(int(cfg.n_data), r, int(cfg.data_seed)).to(model.dtype)
    z = encode(model.denoiser, low, int(cfg.encode_steps), float(cfg.sigma_min), float(cfg.sigma_max), float(cfg.rho),
               int(cfg.data_batch_size), progress).float()
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"latent": z.contiguous()}, path, {"settings": json.dumps(settings), "model_fingerprint": model.fingerprint})
    return z, path, settings


# --- losses and the discriminator ---------------------------------------------------------------------------------
def amplitude(x: torch.Tensor) -> torch.Tensor:
    """``|FFT2(x)|`` per channel, orthonormal (Parseval: the squared amplitudes sum to the squared pixels)."""
    return torch.fft.fft2(x.float(), norm="ortho").abs()


class FeatureDistance(nn.Module):
    """``d(a, b) = sum_l mean_{h,w} |n(f_l(a)) - n(f_l(b))|^2 + pixel_weight * mean (a - b)^2
    + freq_weight * mean ||FFT a| - |FFT b||`` per image, with f_l the ReLU outputs of a frozen feature net's
    convolutions (the patch feature net ``optimize.evaluation.classifier.PatchCNN``, on inputs bilinearly resized to its
    32x32) and n the unit normalisation over channels (LPIPS without its learned weights; PaGoDA's code uses the same
    normalised distance on frozen CNN/ViT features). ``features=None``: no feature term. The amplitude term ignores the
    phase: where the latent does not pin down fine detail (beyond the teacher's resolution) the pixel L2 is lowest for
    the blurred mean, while the amplitude L1 asks for the real image's power at every frequency."""

    def __init__(self, features: nn.Module | None = None, pixel_weight: float = 1.0, size: int = 32, freq_weight: float = 0.0):
        super().__init__()
        if features is not None and not hasattr(features, "convs"):
            raise ValueError("the reconstruction feature net must be a patch_cnn feature net (it has no .convs).")
        self.features = features.eval().requires_grad_(False) if features is not None else None
        self.pixel_weight = float(pixel_weight)
        self.freq_weight = float(freq_weight)
        self.size = int(size)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        assert self.features is not None
        h = x if x.shape[-1] == self.size else F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        maps = []
        for i, conv in enumerate(self.features.convs):
            h = F.relu(conv(h))
            maps.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i % 2 == 1:
                h = F.max_pool2d(h, 2)
        return maps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distances ``[B]``."""
        d = self.pixel_weight * (a - b).pow(2).flatten(1).mean(1)
        if self.freq_weight:
            d = d + self.freq_weight * (amplitude(a) - amplitude(b)).abs().flatten(1).mean(1).to(d.dtype)
        if self.features is not None:
            for fa, fb in zip(self._maps(a), self._maps(b)):
                d = d + (fa - fb).pow(2).sum(1).flatten(1).mean(1)
        return d


D_DOWNSAMPLE = ("strided", "pool")


class Discriminator(nn.Module):
    """A small conv net on ``[B, C, R, R]``: conv3x3, then per halving LeakyReLU and either a 4x4 convolution of stride 2
    (``strided``, DCGAN-style) or a 2x average pool and a conv3x3 (``pool``), down to 4x4 with the width doubling up to
    ``max_channels``, then a linear map of the flattened 4x4 features to one logit per image. The pooled net hardly
    sees pixel-level detail: it took ~250 Adam steps to tell real 32x32 patches from their 8x8 versions nearest-upsampled
    (the strided one ~100), and in training its hinge loss stayed at 2, so the GAN term did next to nothing."""

    def __init__(self, resolution: int, in_channels: int = 3, channels: int = 32, max_channels: int = 128,
                 downsample: str = "strided"):
        super().__init__()
        if downsample not in D_DOWNSAMPLE:
            raise ValueError(f"downsample must be one of {', '.join(D_DOWNSAMPLE)}, got {downsample!r}.")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        c, r = channels, int(resolution)
        while r > 4:
            c2 = min(2 * c, max_channels)
            down = [nn.Conv2d(c, c2, 4, stride=2, padding=1)] if downsample == "strided" else [nn.AvgPool2d(2), nn.Conv2d(c, c2, 3, padding=1)]
            layers += [nn.LeakyReLU(0.2), *down]
            c, r = c2, r // 2
        self.body = nn.Sequential(*layers, nn.LeakyReLU(0.2), nn.Flatten())
        self.head = nn.Linear(c * r * r, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)


def hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss ``E relu(1 - D(x_real)) + E relu(1 + D(x_fake))`` (2 at chance: D = 0)."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def adaptive_weight(loss_rec: torch.Tensor, loss_gan: torch.Tensor, last_layer: torch.Tensor, low: float = 0.01,
                    high: float = 10.0) -> torch.Tensor:
    """``lambda = clip(|grad_W L_rec| / (|grad_W L_G| + 1e-4), low, high)`` on the last layer W (no grad through it)."""
    g_rec = torch.autograd.grad(loss_rec, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(loss_gan, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(low, high).detach()


# --- the generator --------------------------------------------------------------------------------------------------
def generator_config(teacher_config: dict[str, Any], growth: Sequence[int], stage_blocks: int, shape: Sequence[int]) -> dict[str, Any]:
    """The network-file config of the generator of a ``unet`` teacher (served with ``precond: input``)."""
    cfg = {k: v for k, v in teacher_config.items() if k not in ("arch", "precond")}
    return {**cfg, "arch": "pagoda_generator", "precond": "input", "growth": [int(c) for c in growth],
            "stage_blocks": int(stage_blocks), "shape": [int(s) for s in shape]}


def truncated(config: dict[str, Any], state: dict[str, torch.Tensor], stages: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and weights of the generator cut after its first ``stages`` grown stages."""
    cfg = {**config, "growth": list(config["growth"])[:stages]}
    keep = {k: v for k, v in state.items() if not (k.startswith("stages.") and int(k.split(".")[1]) >= stages)}
    return cfg, keep


def net_only(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("precond", "sigma_data")}


class PaGoDAModule(TrainingModule):
    """All stages of one PaGoDA run: the first ``base_steps`` steps train stage 0 (the base at the teacher's resolution),
    then each grown stage k gets ``steps`` steps with the earlier blocks frozen at their EMA weights. Manual optimisation: one Adam per
    stage for the generator's new blocks and one per stage's discriminator; every step updates G, then D.

    ``attach`` gives the latents ``[N, C, r, r]`` and the real images at every stage's resolution; each step's batch and
    noise are drawn from a generator seeded by (seed, step), so a resumed run continues exactly. Clock, NaN stop and the
    loss history in checkpoints come from ``optimize.training.runs.TrainingModule``; the EMA (per stage, manual optimisation)
    uses its ``ema_update``.
    """

    method = "pagoda"

    def __init__(self, config: dict[str, Any], stages: int = 3, steps: int = 1000, base_steps: int | None = None, sigma_max: float = 80.0,
                 gan_weights: Sequence[float] = (0.2, 1.0), lr: float = 2e-4, d_lr: float = 2e-4, betas: Sequence[float] = (0.5, 0.99),
                 d_channels: int = 32, ema_decay: float = 0.995, batch_size: int = 64, seed: int = 0, d_downsample: str = "strided",
                 d_steps: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.config = dict(config)
        if len(self.config["growth"]) != stages - 1:
            raise ValueError(f"the generator config grows {len(self.config['growth'])} stages; {stages} stages need {stages - 1}.")
        self.generator: PaGoDAGenerator = build_net(net_only(self.config))
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        res = int(self.config["shape"][-1])
        self.discriminators = nn.ModuleList(Discriminator(res * 2**k, int(self.config["shape"][0]), d_channels, downsample=d_downsample)
                                            for k in range(stages))
        self.rec: FeatureDistance = FeatureDistance(None)
        self.latents: torch.Tensor | None = None
        self.reals: list[torch.Tensor] = []
        self.active = -1

    # --- set-up ---------------------------------------------------------------------------------------------------
    def init_from(self, teacher_net: nn.Module) -> "PaGoDAModule":
        """Copy the teacher's weights into the base of the generator and of its EMA (grown stages keep their init)."""
        missing, unexpected = self.generator.load_state_dict(teacher_net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("stages.") for k in missing):
            raise ValueError(f"teacher weights do not fit the generator (missing {missing[:3]}, unexpected {unexpected[:3]}).")
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        return self

    def attach(self, latents: torch.Tensor, reals: Sequence[torch.Tensor], rec: FeatureDistance) -> "PaGoDAModule":
        """Training pairs: ``latents [N, ...]`` and ``reals[k] [N, C, r 2^k, r 2^k]``; the reconstruction distance."""
        if len(reals) != self.hparams.stages or any(len(x) != len(latents) for x in reals):
            raise ValueError(f"need the real images at each of the {self.hparams.stages} stage resolutions, paired with the latents.")
        self.latents, self.reals, self.rec = latents, list(reals), rec
        return self

    def stage_of(self, it: int) -> int:
        base = self.stage_start(1)
        return 0 if it < base else min(1 + (int(it) - base) // int(self.hparams.steps), int(self.hparams.stages) - 1)

    def stage_start(self, k: int) -> int:
        """The first step of stage ``k``: the base runs ``base_steps`` (default ``steps``), every grown stage ``steps``."""
        base = int(self.hparams.steps if self.hparams.get("base_steps") is None else self.hparams.base_steps)
        return 0 if k == 0 else base + (k - 1) * int(self.hparams.steps)

    def total_steps(self) -> int:
        return self.stage_start(int(self.hparams.stages))

    def stage_parameters(self, k: int) -> list[nn.Parameter]:
        """The generator parameters stage ``k`` trains: the base (k = 0) or grown stage k."""
        if k == 0:
            return [p for n, p in self.generator.named_parameters() if not n.startswith("stages.")]
        return list(self.generator.stages[k - 1].parameters())

    def begin_stage(self, k: int) -> None:
        """Freeze everything below stage ``k`` at its EMA weights; only stage k (and its discriminator) train."""
        with torch.no_grad():
            for j in range(k):
                for p, pe in zip(self.stage_parameters(j), self._ema_parameters(j)):
                    p.copy_(pe)
        self.generator.requires_grad_(False)
        for p in self.stage_parameters(k):
            p.requires_grad_(True)
        self.active = k

    def _ema_parameters(self, k: int) -> list[nn.Parameter]:
        if k == 0:
            return [p for n, p in self.ema.named_parameters() if not n.startswith("stages.")]
        return list(self.ema.stages[k - 1].parameters())

    # --- one step ---------------------------------------------------------------------------------------------------
    def generate(self, z: torch.Tensor, stages: int, ema: bool = False) -> torch.Tensor:
        """``G(z) = F(c_in z, log(sigma_max)/4)`` through the base and ``stages`` grown stages (raw output)."""
        s, sd = float(self.hparams.sigma_max), float(self.config.get("sigma_data", 0.5))
        c_noise = torch.full((z.shape[0],), math.log(s) / 4, dtype=z.dtype, device=z.device)
        return (self.ema if ema else self.generator)(z / math.sqrt(s * s + sd * sd), c_noise, stages=stages)

    def step_generator(self, it: int) -> torch.Generator:
        return torch.Generator().manual_seed((int(self.hparams.seed) * 1_000_003 + int(it)) % 2**63)

    def optimiser_steps(self) -> int:
        """Optimiser steps per training step: one of G, ``d_steps`` of D (Lightning's global_step counts each)."""
        return 1 + int(self.hparams.get("d_steps", 1))

    def iteration(self) -> int:
        """Completed training steps."""
        return int(self.global_step) // self.optimiser_steps()

    def losses(self, k: int, z: torch.Tensor, real: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's ``loss = L_rec + w lambda L_G`` with its parts, and the fakes from ``noise`` (detached)."""
        weights = list(self.hparams.gan_weights)
        w = float(weights[min(k, len(weights) - 1)])
        rec = self.rec(self.generate(z, k), real).mean()
        fake = self.generate(noise, k)
        gan = -self.discriminators[k](fake).mean()
        lam = adaptive_weight(rec, gan, self.generator.last_layer(k)) if w > 0 else torch.zeros(())
        return {"loss": rec + w * lam * gan, "rec": rec, "gan": gan, "lambda": lam, "fake": fake.detach()}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        it = self.iteration()
        k = self.stage_of(it)
        if k != self.active:
            self.begin_stage(k)
        assert self.latents is not None, "attach() the training pairs first"
        gen = self.step_generator(it)
        idx = torch.randint(len(self.latents), (int(self.hparams.batch_size),), generator=gen)
        z, real = self.latents[idx].to(self.device), self.reals[k][idx].to(self.device)
        noise = (torch.randn(z.shape, generator=gen) * float(self.hparams.sigma_max)).to(self.device, z.dtype)
        opts = self.optimizers()
        opt_g, opt_d = opts[2 * k], opts[2 * k + 1]
        out = self.losses(k, z, real, noise)
        self.check_loss(out["loss"], f"step {it} (stage {k})")
        opt_g.zero_grad()
        self.manual_backward(out["loss"])
        opt_g.step()
        self._ema_update(it)
        d = self.discriminators[k]
        fake = out["fake"]
        for j in range(int(self.hparams.get("d_steps", 1))):
            if j:  # more D steps: fresh noise, the real batch again
                with torch.no_grad():
                    e = (torch.randn(z.shape, generator=gen) * float(self.hparams.sigma_max)).to(self.device, z.dtype)
                    fake = self.generate(e, k)
            loss_d = hinge_loss(d(real), d(fake))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
        row = [it, k, *(float(out[key].detach()) for key in ("rec", "gan")), float(loss_d.detach()), float(out["lambda"]),
               self.train_seconds()]  # rec, g, d, lambda, training seconds so far (resumed runs included)
        self.history.append(row)
        self.log_dict({"stage": float(k), "loss_rec": row[2], "loss_g": row[3], "loss_d": row[4], "lambda": row[5]},
                      prog_bar=True, on_step=True)

    def _ema_update(self, it: int) -> None:
        """``w_ema <- beta w_ema + (1 - beta) w`` on the active stage, beta = min(decay, (1+t)/(10+t)), t the step in the stage."""
        ema_update(self._ema_parameters(self.active), self.stage_parameters(self.active), it - self.stage_start(self.active),
                   float(self.hparams.ema_decay))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opts = []
        for k in range(int(hp.stages)):
            opts.append(torch.optim.Adam(self.stage_parameters(k), lr=float(hp.lr), betas=tuple(hp.betas)))
            opts.append(torch.optim.Adam(self.discriminators[k].parameters(), lr=float(hp.d_lr), betas=tuple(hp.betas)))
        return opts

    def export(self, stages: int, path: str, extra_metadata: dict | None = None) -> str:
        """Save the EMA generator through its first ``stages`` grown stages as a network file."""
        cfg, state = truncated(self.config, self.ema.state_dict(), stages)
        net = build_net(net_only(cfg))
        net.load_state_dict(state, strict=True)
        meta = {"trainer": "optimize.pagoda", **(extra_metadata or {})}
        return save_net(net, cfg, path, extra_metadata=meta)


def write_history(history: list[list[float]], path: str) -> str:
    """The loss curve (kept in the Lightning checkpoint, so it survives resume) as CSV; ``seconds``: training time at
    the end of the step (empty in rows of a checkpoint written before it was recorded)."""
    lines = ["step,stage,loss_rec,loss_g,loss_d,lambda,seconds"]
    lines += [f"{int(h[0])},{int(h[1])}," + ",".join(f"{v:.6g}" for v in h[2:6]) + (f",{h[6]:.1f}" if len(h) > 6 else ",")
              for h in history]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def stage_seconds(history: list[list[float]], stages: int) -> list[float] | None:
    """Training seconds spent in each stage (the step's ``seconds`` where the stage ends minus where the one before it
    ended); None when any row lacks the time (a run resumed from a checkpoint written before it was recorded)."""
    if not history or any(len(h) < 7 for h in history):
        return None
    ends = [max((h[6] for h in history if int(h[1]) == k), default=None) for k in range(stages)]
    out, before = [], 0.0
    for end in ends:
        out.append(0.0 if end is None else round(end - before, 1))
        before = before if end is None else end
    return out


def plot_loss(history: list[list[float]], path: str) -> str:
    """Reconstruction, generator and discriminator losses and lambda against the step (smoothed over 20 steps)."""
    import matplotlib  # heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray([row[:6] for row in history], dtype=np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    w = max(1, min(20, len(h) // 10))
    smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid")  # noqa: E731
    steps = h[w - 1:, 0]
    axes[0].plot(steps, smooth(h[:, 2]), color="k")
    axes[0].set_yscale("log")
    axes[0].set_title("reconstruction loss")
    axes[1].plot(steps, smooth(h[:, 3]), label="G: -D(fake)")
    axes[1].plot(steps, smooth(h[:, 4]), label="D: hinge")
    axes[1].legend(fontsize=7)
    axes[1].set_title("GAN losses")
    axes[2].plot(steps, smooth(h[:, 5]), color="C2")
    axes[2].set_yscale("log")
    axes[2].set_title("adaptive lambda")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for s in np.flatnonzero(np.diff(h[:, 1])):
            ax.axvline(h[s + 1, 0], color="gray", ls=":", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command ------------------------------------------------------------------------------------------------------
def stage_resolutions(teacher_resolution: int, stages: int) -> list[int]:
    return [int(teacher_resolution) * 2**k for k in range(int(stages))]


def validate(cfg: Any) -> None:
    """PaGoDA's own checks, made before any work (called by the CLI)."""
    stages = int(cfg.stages)  # typed (a positive integer) by the CLI
    if cfg.model.kind != "net":
        raise ConfigError(f"pagoda grows a network teacher; model {cfg.model.name} is {cfg.model.kind!r} (use model=patches8).")
    if cfg.model.get("data") != "patches":
        raise ConfigError(f"pagoda trains on the patches data set (model=patches8); model {cfg.model.name} has data {cfg.model.get('data')!r}.")
    teacher = resolve_path(str(cfg.model.checkpoint))
    config = read_net_header(str(teacher))[0]
    if config.get("arch") != "unet":
        raise ConfigError(f"pagoda copies a U-Net teacher; {teacher} holds a {config.get('arch')!r} network.")
    channels = config.get("in_channels", 1)
    if channels != PATCH_CHANNELS or config.get("out_channels") not in (None, PATCH_CHANNELS):
        raise ConfigError(f"pagoda grows a teacher of the RGB patches ({PATCH_CHANNELS} channels); model.checkpoint {teacher} "
                          f"takes {channels} channel(s) (use model=patches8).")
    r = int(config.get("resolution", 8))
    data_res = cfg.data_resolution
    if isinstance(data_res, bool) or not isinstance(data_res, int):
        raise ConfigError(f"data_resolution must be an integer, got {data_res!r}.")
    if data_res < r:
        raise ConfigError(f"data_resolution ({data_res}) is below the teacher's resolution ({r}); the real images must be at least as large.")
    if data_res not in PATCH_RESOLUTIONS:
        raise ConfigError(f"data_resolution must be one of {', '.join(map(str, PATCH_RESOLUTIONS))} (the patches' sizes), got {data_res}.")
    top = stage_resolutions(r, stages)[-1]
    if top > data_res:
        raise ConfigError(f"stages={stages} grows the {r}x{r} teacher to {top}x{top}, beyond data_resolution {data_res}; "
                          f"use stages <= {int(math.log2(data_res // r)) + 1}.")
    growth = as_list(cfg.growth)
    if len(growth) < stages - 1 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in growth):
        raise ConfigError(f"growth must list a positive channel count for each of the {stages - 1} grown stages, got {list(growth)}.")
    weights = as_list(cfg.gan_weights)
    if not weights or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf") for w in weights):
        raise ConfigError(f"gan_weights must be a non-empty list of non-negative numbers (base stage first), got {list(weights)}.")
    for key in ("encode_steps", "stage_blocks", "d_channels"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < (2 if key == "encode_steps" else 1):
            raise ConfigError(f"{key} must be an integer >= {2 if key == 'encode_steps' else 1}, got {cfg[key]!r}.")
    if cfg.d_downsample not in D_DOWNSAMPLE:
        raise ConfigError(f"d_downsample must be one of {', '.join(D_DOWNSAMPLE)}, got {cfg.d_downsample!r}.")
    if not float(cfg.d_lr) > 0 or not float(cfg.pixel_weight) >= 0 or not float(cfg.freq_weight) >= 0:
        raise ConfigError(f"need d_lr > 0, pixel_weight >= 0 and freq_weight >= 0, got {cfg.d_lr}, {cfg.pixel_weight} and {cfg.freq_weight}.")
    if cfg.rec_features is not None:
        rec_features_net(resolve_path(str(cfg.rec_features)))
    if cfg.rec_features is None and float(cfg.pixel_weight) == 0 and float(cfg.freq_weight) == 0:
        raise ConfigError("rec_features=null, pixel_weight=0 and freq_weight=0 leave no reconstruction loss.")
    if cfg.get("base_generator") is not None:
        base_generator(cfg, config, load_denoiser(str(teacher)).fingerprint())
    elif int(cfg.base_steps) == 0:
        raise ConfigError("base_steps=0 leaves the teacher's raw output at sigma_max as the base; train it (base_steps >= 1) "
                          "or start from a trained one (base_generator=PATH).")
    path = resume_path(cfg.get("resume"))
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"resume checkpoint {path} does not exist.")


def base_generator(cfg: Any, teacher_config: dict[str, Any], teacher_fingerprint: str) -> tuple[nn.Module, str]:
    """``(net, fingerprint)`` of ``base_generator=PATH``: a PaGoDA generator network file of this teacher (its
    ``teacher_fingerprint``) whose config is the teacher's as ``generator_config`` makes it; its grown stages, if any,
    are not used. One ConfigError for anything else (a missing or non-network file, another teacher, another
    architecture)."""
    path = resolve_path(str(cfg.base_generator))
    expect = "a PaGoDA generator file of this teacher, e.g. checkpoints/pagoda-patches8.safetensors"
    if not os.path.isfile(path):
        raise ConfigError(f"base_generator {path} does not exist ({expect}).")
    try:
        config, meta = read_net_header(str(path))
    except Exception as err:  # noqa: BLE001 - not a network file (a pickle is never loaded): one sentence
        raise ConfigError(f"base_generator {path} is not a network file ({str(err).splitlines()[0][:120]}); expected {expect}.") from None
    if config.get("arch") != "pagoda_generator":
        raise ConfigError(f"base_generator {path} holds a {config.get('arch')!r} network; expected {expect}.")
    if meta.get("teacher_fingerprint") != teacher_fingerprint:
        raise ConfigError(f"base_generator {path} was not grown from this teacher (teacher_fingerprint "
                          f"{meta.get('teacher_fingerprint')!r}, this one {teacher_fingerprint!r}).")
    expected = generator_config(teacher_config, config.get("growth", []), config.get("stage_blocks", 1), config.get("shape", []))
    diff = sorted(k for k in set(config) | set(expected) if config.get(k) != expected.get(k))
    if diff:
        raise ConfigError(f"base_generator {path} has another base than the teacher's network ({diff[0]}: "
                          f"{config.get(diff[0])!r} vs {expected.get(diff[0])!r}).")
    base = load_denoiser(str(path))
    return base.net, base.fingerprint()


def build_module(cfg: Any, teacher_config: dict[str, Any], shape: Sequence[int]) -> PaGoDAModule:
    """The module of a composed config (the teacher's weights not yet copied)."""
    stages = int(cfg.stages)
    config = generator_config(teacher_config, [int(c) for c in as_list(cfg.growth)][: stages - 1], int(cfg.stage_blocks), shape)
    return PaGoDAModule(config, stages=stages, steps=int(cfg.steps), base_steps=int(cfg.base_steps), sigma_max=float(cfg.sigma_max),
                        gan_weights=[float(w) for w in as_list(cfg.gan_weights)], lr=float(cfg.lr), d_lr=float(cfg.d_lr),
                        d_channels=int(cfg.d_channels), ema_decay=float(cfg.ema), batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                        d_downsample=str(cfg.d_downsample), d_steps=int(cfg.d_steps))


def rec_features_net(path: Any) -> nn.Module:
    """The patch_cnn feature net of ``rec_features=PATH``; one ConfigError for anything else (a missing file, a pickle
    or other non-safetensors file, which is never unpickled, a table or network file, another feature architecture)."""
    expect = "a patch_cnn feature-net file such as checkpoints/features-patches.safetensors, or null for pixels only"
    if not os.path.isfile(path):
        raise ConfigError(f"rec_features {path} does not exist ({expect}).")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        arch = json.loads(header.get("config", "{}")).get("arch") if header.get("format") == CLASSIFIER_FORMAT else None
    except Exception:  # noqa: BLE001 - not a readable safetensors file (a pickle is never loaded)
        raise ConfigError(f"rec_features {path} is not a safetensors feature-net file (expected {expect}; "
                          f"pickles are never loaded).") from None
    if header.get("format") != CLASSIFIER_FORMAT:
        raise ConfigError(f"rec_features {path} is not a feature-net file (format {header.get('format')!r}); expected {expect}.")
    if arch != "patch_cnn":
        raise ConfigError(f"rec_features {path} holds a {arch!r} feature net; the reconstruction loss needs {expect}.")
    try:
        return load_classifier(str(path))
    except Exception as err:  # noqa: BLE001 - truncated or mismatched weights: one sentence
        raise ConfigError(f"rec_features {path} is unreadable ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__}).") from None


def rec_distance(cfg: Any) -> FeatureDistance:
    net = rec_features_net(resolve_path(str(cfg.rec_features))) if cfg.rec_features is not None else None
    return FeatureDistance(net, float(cfg.pixel_weight), freq_weight=float(cfg.freq_weight))


def run(cfg: Any) -> dict[str, Any]:
    """`python -m optimize pagoda model=patches8 stages=3`: latents (cached), Lightning training of every stage (CSV
    logs, checkpoints in <out_dir>/lightning, resume), then per resolution R the EMA generator
    ``pagoda-patches<R>.safetensors`` and its 1-NFE table ``pagoda-patches<R>-1nfe.safetensors`` (the top one also at
    ``export`` / ``export_table`` when given), the loss curve, and (``evaluate_at_end``) FD/KID per stage.
    Returns {"generators", "tables", "rows", "train_seconds", "data_seconds"}."""

    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen feature net, on purpose
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")  # saved after the G and D steps
    out_dir, model, teacher_net, teacher_config = start_distillation(cfg)
    t0 = time.perf_counter()
    latents, data_path, settings = load_or_encode(model, cfg, progress=bool(cfg.progress_bar))
    data_seconds = time.perf_counter() - t0
    print(f"pagoda latents: {len(latents)} images encoded by the teacher's ODE ({2 * int(cfg.encode_steps) - 3} NFE Heun up) "
          f"in {data_path} ({data_seconds:.0f} s)", flush=True)
    res = stage_resolutions(int(model.shape[-1]), int(cfg.stages))
    high = training_images(int(cfg.n_data), int(cfg.data_resolution), int(cfg.data_seed))
    reals = [area_downsample(high, r) for r in res]
    del high
    base, base_fingerprint = (teacher_net, None) if cfg.get("base_generator") is None else \
        base_generator(cfg, teacher_config, model.fingerprint)
    module = build_module(cfg, teacher_config, model.shape).init_from(base).attach(latents, reals, rec_distance(cfg))
    module.run_settings = {"model": str(cfg.model.name), "model_fingerprint": model.fingerprint, "data": settings["n_data"],
                           "base_generator": base_fingerprint,
                           "data_resolution": int(cfg.data_resolution), "rec_features": str(cfg.rec_features),
                           "pixel_weight": float(cfg.pixel_weight), "freq_weight": float(cfg.freq_weight)}
    ckpt_path = pick_resume(cfg.get("resume"), out_dir, {**dict(module.hparams), **module.run_settings})
    total = module.total_steps()
    trainer = L.Trainer(accelerator=str(cfg.accelerator), devices=1, max_steps=module.optimiser_steps() * total, **trainer_parts(cfg, out_dir),
                        log_every_n_steps=max(1, min(10, total // 2)), enable_model_summary=False, default_root_dir=out_dir,
                        enable_progress_bar=bool(cfg.progress_bar))
    n_grown = sum(p.numel() for p in module.generator.stages.parameters())
    print(f"pagoda: stages at {', '.join(f'{r}x{r}' for r in res)}, {cfg.base_steps} + {cfg.steps} per grown stage steps of batch "
          f"{cfg.batch_size} (the progress bar counts {module.optimiser_steps()} optimiser steps per step) "
          f"(generator {sum(p.numel() for p in module.generator.parameters()):,} parameters, {n_grown:,} grown)", flush=True)
    try:
        trainer.fit(module, ticks(), ckpt_path=ckpt_path, weights_only=True)
    except NaNLossError as err:
        raise ConfigError(str(err)) from None
    train_seconds = module.train_seconds()
    done = module.iteration()
    if done < total:
        print(f"note: pagoda stopped after {done} of {total} steps (max_minutes); resume=true continues.", flush=True)
    top = module.stage_of(max(done - 1, 0))
    generators, tables = [], []
    base_meta = {"model": str(cfg.model.name), "teacher_fingerprint": model.fingerprint, "train_seconds": round(train_seconds, 1),
                 "data": {k: v for k, v in settings.items()}, "data_resolution": int(cfg.data_resolution),
                 "rec_features": None if cfg.rec_features is None else str(cfg.rec_features), "pixel_weight": float(cfg.pixel_weight),
                 "freq_weight": float(cfg.freq_weight), "d_steps": int(cfg.d_steps), "d_lr": float(cfg.d_lr),
                 "base_generator": None if cfg.get("base_generator") is None else str(cfg.base_generator),
                 "threads": torch.get_num_threads(), "stage_seconds": stage_seconds(module.history, int(cfg.stages))}
    for k in range(top + 1):
        tag = f"pagoda-{cfg.model.data}{res[k]}"
        gen_path = os.path.join(out_dir, f"{tag}.safetensors")
        table_path = os.path.join(out_dir, f"{tag}-1nfe.safetensors")
        if k == top and cfg.export:
            gen_path = str(resolve_path(str(cfg.export)))
            table_path = str(resolve_path(str(cfg.export_table))) if cfg.export_table else os.path.splitext(gen_path)[0] + "-1nfe.safetensors"
        steps_done = min(done, module.stage_start(k + 1)) - module.stage_start(k)
        module.export(k, gen_path, {**base_meta, "stage": k, "resolution": res[k], "steps": steps_done})
        gen = load_denoiser(gen_path)
        meta = {"format_version": FORMAT_VERSION, "method": "pagoda", "base_solver": "pagoda", "nfe": 1,
                "model_fingerprint": gen.fingerprint(), "teacher_fingerprint": model.fingerprint,
                "generator": os.path.basename(gen_path), "resolution": res[k], "noise_shape": list(model.shape),
                "cost_note": f"1 call of the teacher U-Net plus {k} up-sampling stage(s)",
                "config": {k2: v for k2, v in OmegaConf.to_container(cfg, resolve=True).items() if not isinstance(v, (dict, list))}}
        one_step_table(float(cfg.sigma_max), meta).save(table_path)
        generators.append(gen_path)
        tables.append(table_path)
    tag = f"pagoda-{cfg.model.name}"
    if module.history:
        plot_loss(module.history, os.path.join(out_dir, f"{tag}-loss.png"))
        write_history(module.history, os.path.join(out_dir, f"{tag}-loss.csv"))
    print(f"pagoda: {done} steps in {train_seconds:.0f} s -> {', '.join(generators)}", flush=True)
    rows: list[dict[str, Any]] = []
    if cfg.evaluate_at_end:
        rows = evaluate_stages(cfg, generators, tables, res, out_dir)
    return {"generators": generators, "tables": tables, "rows": rows, "train_seconds": train_seconds, "data_seconds": data_seconds}


# --- evaluation ---------------------------------------------------------------------------------------------------
def high_frequency_share(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Per image ``[B]``: the share of its power (mean removed per channel, ``|FFT2|^2`` summed over channels) at
    frequencies an ``resolution`` x ``resolution`` image cannot hold, ``max(|k_x|, |k_y|) > resolution / 2`` cycles per
    image (beyond the teacher's Nyquist frequency): 0 for a teacher sample upsampled by an ideal filter."""
    size = x.shape[-1]
    k = torch.fft.fftfreq(size, d=1.0 / size).abs()
    high = torch.maximum(k[:, None], k[None, :]) > resolution / 2
    power = torch.fft.fft2(x.double() - x.double().mean((-2, -1), keepdim=True), norm="ortho").abs().pow(2).sum(1)
    return (power * high).flatten(1).sum(1) / power.flatten(1).sum(1).clamp_min(1e-30)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def judge_at(mcfg: Any, resolution: int, **kw: Any) -> Any:
    """The patches judge at ``resolution``: real training-region crops (seed 1) and the held-out set at that size,
    samples and real images alike resized bicubically to the feature nets' 32x32 (``judge.feature_maps``)."""
    real = {"train": data.patches("train", REAL_N, seed=1, resolution=resolution), "heldout": data.patches("heldout", resolution=resolution)}
    return Judge(features=feature_maps(mcfg.features), real=real, clip=bool(mcfg.get("clip", True)), **kw)


def evaluate_stages(cfg: Any, generators: Sequence[str], tables: Sequence[str], res: Sequence[int], out_dir: str) -> list[dict[str, Any]]:
    """FD/KID (both feature nets, train and held-out splits) of each stage's generator at its resolution on seeds
    ``seed .. seed+n-1``, and at the top resolution the baseline PaGoDA exists to beat: the teacher's converged solve
    (``baseline_solver`` at ``baseline_nfe``) from the same seeds, bicubically upsampled, with paired differences
    (``d<key>_vs_upsampled``). Writes results.csv/json and a sample grid per row (upscaled x4 for viewing)."""
    rows = []
    seeds = list(range(int(cfg.seed), int(cfg.seed) + int(cfg.n)))
    judges = {r: judge_at(cfg.model, r) for r in res}
    for path, table_path, r in zip(generators, tables, res):
        gen = load_denoiser(path)
        table = SolverTable.load(table_path, fingerprint=gen.fingerprint())
        out = evaluate(gen, table, judge=judges[r], shape=gen.shape, seeds=seeds, batch_size=int(cfg.eval_batch_size))
        x = out.pop("samples")
        gen_share = high_frequency_share(x.clamp(-1, 1), res[0])  # the last (top) stage's is paired below
        write_png_grid(x[:64].clamp(-1, 1), os.path.join(out_dir, f"grid-pagoda{r}.png"), scale=max(1, 128 // r))
        hf, hf_se = _mean_se(gen_share)
        rows.append({"method": f"pagoda{r}", "model": str(cfg.model.name), "resolution": r, **out, "hf_share": hf, "hf_share_se": hf_se})
    top = res[len(rows) - 1]
    if top > res[0]:
        teacher = load_model(cfg.model, "cpu")
        table = baselines.build(str(cfg.baseline_solver), int(cfg.baseline_nfe), sigma_min=float(cfg.sigma_min),
                                sigma_max=float(cfg.sigma_max), rho=float(cfg.rho))
        t0 = time.perf_counter()
        low = draw(table, teacher.denoiser, teacher.shape, seeds, teacher.dtype, batch_size=int(cfg.eval_batch_size))
        up = F.interpolate(low.clamp(-1, 1), size=top, mode="bicubic", align_corners=False)
        seconds = time.perf_counter() - t0
        share = high_frequency_share(up, res[0])
        base = {"method": f"{cfg.model.name}-{cfg.baseline_solver}@{cfg.baseline_nfe}-bicubic{top}", "model": str(cfg.model.name),
                "resolution": top, "nfe": table.nfe, "ref_rmse": None, **judges[top].score(up), "seconds": seconds,
                **dict(zip(("hf_share", "hf_share_se"), _mean_se(share)))}
        real = high_frequency_share(judges[top].real["train"], res[0])  # the real crops FD compares with
        for row in (rows[-1], base):
            row["hf_share_real"], row["hf_share_real_se"] = _mean_se(real)
        rows[-1]["dhf_share_vs_upsampled"], rows[-1]["dhf_share_vs_upsampled_se"] = _mean_se(gen_share - share)
        write_png_grid(up[:64].clamp(-1, 1), os.path.join(out_dir, f"grid-upsampled{top}.png"), scale=max(1, 128 // top))
        keys = [k for k in base if k.startswith(("fd_", "kid_")) and "_se_" not in k and not k.startswith(("fd_se", "kid_se"))]
        add_paired_columns([rows[-1], base], base, keys, tag="vs_upsampled")
        rows.append(base)
    for r in dict.fromkeys(row["resolution"] for row in rows):  # one table per resolution (one judge each)
        print(f"at {r}x{r}:\n" + format_table([row for row in rows if row["resolution"] == r]))

    paired_keys = [k[1:-len("_vs_upsampled")] for k in rows[-2] if k.endswith("_vs_upsampled") and k.startswith(("dfd_", "dkid_"))] \
        if top > res[0] else []  # lower is better for these; the power share is printed below
    for key in paired_keys:
        diff, se = rows[-2][f"d{key}_vs_upsampled"], rows[-2][f"d{key}_vs_upsampled_se"]
        print(f"  {rows[-2]['method']} - {rows[-1]['method']}: {key} {diff:+.4g} ± {se:.2g} -> {verdict(diff, se)}")
    if top > res[0]:
        print(f"  power beyond the {res[0]}x{res[0]} Nyquist frequency (share, ± se): " + ", ".join(
            f"{r['method']} {r['hf_share']:.4f} ± {r['hf_share_se']:.4f}" for r in rows[-2:])
            + f", real patches {rows[-1]['hf_share_real']:.4f} ± {rows[-1]['hf_share_real_se']:.4f}")
    write_results(rows, out_dir, cfg)
    return rows
