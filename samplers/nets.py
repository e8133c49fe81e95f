"""Pure-torch networks of the shipped teachers and one-step students (DESIGN.md, "nets.py").

A network file is safetensors weights whose header holds the JSON ``config`` the net is built from,
so the runtime rebuilds it without pickles or project code outside this module:

    {"arch": "unet", "in_channels": 1, "resolution": 8, "channels": 24, "channel_mult": [1, 2],
     "num_classes": 0, "precond": "edm", "sigma_data": 0.5}
    {"arch": "mlp", "in_dim": 2, "hidden": 128, "depth": 3, "precond": "edm", "sigma_data": 0.5}

Raw nets are called as ``net(x_in, c_noise)`` or ``net(x_in, c_noise, cond)`` (EDM's F); the EDM
preconditioning (c_skip, c_out, c_in, c_noise = log(sigma)/4) lives in ``denoisers.EDMPrecond``, the consistency
model's (``precond: consistency`` with ``sigma_min``, f(x, sigma_min) = x) in ``ConsistencyPrecond`` below.
``cond`` is integer class labels ``[B]`` or a float ``[B, num_classes]`` (one-hot or zeros for the
unconditional branch of classifier-free guidance); ``cond=None`` adds no class embedding.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from .artifact import atomic_save, package_version, read_header, short_error
from .denoisers import EDMPrecond, InputScaled, _bcast, _module_fingerprint, _sigma_like

NET_FORMAT = "samplers.net"
NET_FORMAT_VERSION = 1

UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": None,  # None: same as in_channels
    "resolution": 8,
    "channels": 24,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "emb_dim": 64,
    "groups": 8,
    "num_classes": 0,
    "max_freq": 100.0,
}
MLP_DEFAULTS: dict[str, Any] = {
    "in_dim": 2,
    "hidden": 128,
    "depth": 3,
    "emb_dim": 32,
    "num_classes": 0,
    "max_freq": 100.0,
}


class NetError(ValueError):
    """A network config or file is not valid; the message is one sentence."""


# --- building blocks -----------------------------------------------------------------------------
class NoiseEmbedding(nn.Module):
    """Fourier features of c_noise (cos, sin at geometric frequencies 1..max_freq) -> MLP -> ``dim``.

    Optional class conditioning adds a learned embedding of the label (or of a float label vector).
    """

    def __init__(self, dim: int, max_freq: float = 100.0, num_classes: int = 0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, c_noise: torch.Tensor, batch: int, cond: Any = None) -> torch.Tensor:
        c = torch.as_tensor(c_noise, device=self.freqs.device).to(self.freqs.dtype).reshape(-1)
        c = c.expand(batch) if c.numel() == 1 else c
        angle = c[:, None] * self.freqs[None]
        emb = self.mlp(torch.cat([angle.cos(), angle.sin()], dim=1))
        if cond is not None:
            if self.label is None:
                raise ValueError("this network is unconditional; call it with cond=None.")
            cond = torch.as_tensor(cond, device=emb.device)
            if cond.is_floating_point():
                emb = emb + cond.to(emb.dtype) @ self.label.weight
            else:
                emb = emb + self.label(cond.long().reshape(-1))
        return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the embedding as a per-channel shift, GroupNorm-SiLU-conv, residual."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net for [C, R, R] images: ``len(channel_mult)`` levels of ``num_res_blocks`` residual
    blocks, 2x average-pool down, nearest up, skip connections by concatenation."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        resolution: int = 8,
        channels: int = 24,
        channel_mult: Any = (1, 2),
        num_res_blocks: int = 1,
        emb_dim: int = 64,
        groups: int = 8,
        num_classes: int = 0,
        max_freq: float = 100.0,
    ):
        super().__init__()
        levels = len(channel_mult)
        if resolution % (2 ** (levels - 1)) != 0:
            raise NetError(f"unet resolution {resolution} must be divisible by 2^{levels - 1} for {levels} levels.")
        out_channels = in_channels if out_channels is None else out_channels
        self.embed = NoiseEmbedding(emb_dim, max_freq, num_classes)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * int(m) for m in channel_mult]
        self.down = nn.ModuleList()
        skips, c = [], channels
        for w in widths:
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, w, emb_dim, groups))
                c = w
            self.down.append(blocks)
            skips.append(c)
        self.mid = ResBlock(c, c, emb_dim, groups)
        self.up = nn.ModuleList()
        for w, s in zip(reversed(widths), reversed(skips)):
            self.up.append(ResBlock(c + s, w, emb_dim, groups))
            c = w
        self.norm_out = nn.GroupNorm(min(groups, c), c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def hidden(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, emb)``: the last up-path features ``[B, channels * channel_mult[0], R, R]`` and the embedding."""
        emb = self.embed(c_noise, x.shape[0], cond).to(x.dtype)
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for level, block in enumerate(self.up):
            if level > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return h, emb

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        h, _ = self.hidden(x, c_noise, cond)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):
    """Residual MLP for flat data ``[B, in_dim]`` (other shapes are flattened and restored); each block
    adds the c_noise embedding before its second linear layer."""

    def __init__(
        self,
        in_dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 32,
        num_classes: int = 0,
        max_freq: float = 100.0,
    ):
        super().__init__()
        self.embed = NoiseEmbedding(emb_dim, max_freq, num_classes)
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(emb_dim, hidden), nn.Linear(hidden, hidden)]) for _ in range(depth)
        )
        self.out = nn.Linear(hidden, in_dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        emb = self.embed(c_noise, x.shape[0], cond).to(x.dtype)
        h = self.inp(x.reshape(x.shape[0], -1))
        for fc1, proj, fc2 in self.blocks:
            h = h + fc2(F.silu(fc1(F.silu(h)) + proj(emb)))
        return self.out(F.silu(h)).reshape(x.shape)


# --- DSNO student (Zheng et al. 2023, "Fast sampling of diffusion models via operator learning") ----
DSNO_UNET_DEFAULTS: dict[str, Any] = {
    **UNET_DEFAULTS,
    "sigmas": [80.0],   # the M output times (noise levels); slice m gets the teacher's embedding of c_noise(sigma_m)
    "modes": 2,         # lowest temporal Fourier modes kept (<= M//2 + 1)
    "temporal": True,   # False: the same student without temporal convolutions (plain one-step distillation)
}


class SpectralConv1d(nn.Module):
    """Temporal Fourier layer over the M axis of ``h [B, M, C, H, W]`` (DSNO's temporal convolution):

        out = irfft_M( W_k * rfft_M(h)_k  for k < modes ),   W in C^{C x C x modes}

    the lowest ``modes`` frequencies of every pixel's channel vector are mixed by complex matrices, the
    rest are dropped. Weights are stored real ``[C, C, modes, 2]``; the FFT runs in float32 at least.
    A new layer's weights are uniform in ``[0, init_scale)``, by default ``1/C^2`` (DSNO's code), so it starts
    small, not at zero; ``init_scale=0`` gives exact zeros (a network file's weights replace either when loaded).
    """

    def __init__(self, channels: int, modes: int, init_scale: float | None = None):
        super().__init__()
        self.modes = int(modes)
        scale = 1.0 / (channels * channels) if init_scale is None else float(init_scale)
        self.weight = nn.Parameter(scale * torch.rand(channels, channels, self.modes, 2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = h.shape[1]
        dtype = torch.promote_types(h.dtype, torch.float32)
        h_ft = torch.fft.rfft(h.to(dtype), dim=1)[:, : self.modes]                       # [B, modes, C, H, W]
        w = torch.view_as_complex(self.weight.to(dtype).contiguous())                    # [C_in, C_out, modes]
        out_ft = torch.einsum("bkihw,iok->bkohw", h_ft, w)
        return torch.fft.irfft(out_ft, n=m, dim=1).to(h.dtype)                           # zero-pads to M//2+1 modes


class TemporalBlock(nn.Module):
    """``h + LeakyReLU(SpectralConv1d(h))`` on ``[B*M, C, H, W]`` viewed as ``[B, M, C, H, W]``: identity at zero
    weights, near it at the default small random init (``SpectralConv1d``). Zero weights still get a gradient:
    PyTorch's LeakyReLU has slope 0.01 at 0, so ``dL/dW`` there is 0.01 times that of ``SpectralConv1d`` alone."""

    def __init__(self, channels: int, modes: int, num_times: int, init_scale: float | None = None):
        super().__init__()
        self.num_times = int(num_times)
        self.conv = SpectralConv1d(channels, modes, init_scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bm, *rest = h.shape
        t = h.reshape(bm // self.num_times, self.num_times, *rest)
        return (t + F.leaky_relu(self.conv(t))).reshape(h.shape)


class DSNOUNet(UNet):
    """The teacher U-Net (same parameter names, so its weights load as they are) run on all M output times at
    once, with a temporal block after every non-resampling residual block and after the middle block.

    The input convolution runs once on the noise and is repeated over the M times; residual blocks run on
    ``[B*M, C, H, W]`` (row ``b*M + m`` is time m) with the embedding of ``c_noise(sigma_m) = log(sigma_m)/4``;
    the output head gives ``F_m`` per time. ``trajectory(x)`` returns ``[B, M, C, H, W]``; ``forward(x, c_noise)``
    returns the last time (the sample), so ``EDMPrecond`` serves it as a denoiser: the preconditioning uses the
    noise level of the input (sigma_max in the 1-NFE table) and the ``c_noise`` argument is not used, since the
    output times are fixed by ``sigmas``. With zero temporal weights, time m is the teacher's net at
    ``(x_in, c_noise(sigma_m))``. A freshly built net's temporal weights are small and random (``SpectralConv1d``),
    so with the teacher's weights copied it is near the teacher, not equal to it; ``optimize.methods.dsno``'s
    ``temporal_init=zero`` zeroes them. A loaded file's weights are used as stored.
    """

    def __init__(self, sigmas: Any = (80.0,), modes: int = 2, temporal: bool = True, **unet: Any):
        super().__init__(**unet)
        sig = torch.as_tensor([float(s) for s in sigmas], dtype=torch.float64)
        if sig.numel() < 1 or not bool(torch.all(sig > 0)):
            raise NetError(f"dsno_unet needs at least one positive output sigma, got {list(sigmas)}.")
        m = int(sig.numel())
        if not 1 <= int(modes) <= m // 2 + 1:
            raise NetError(f"dsno_unet modes must lie in 1..M//2+1 = 1..{m // 2 + 1} for M = {m} times, got {modes}.")
        self.num_times = m
        self.register_buffer("c_noise_times", (sig.log() / 4).to(torch.float32), persistent=False)
        widths = [b.conv2.out_channels for blocks in self.down for b in blocks] + [self.mid.conv2.out_channels] + \
            [b.conv2.out_channels for b in self.up]
        self.temporal = nn.ModuleList(TemporalBlock(w, modes, m) for w in widths) if temporal else None

    def _temporal(self, h: torch.Tensor, i: int) -> torch.Tensor:
        return h if self.temporal is None else self.temporal[i](h)

    def trajectory(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``F_m`` for every output time: ``[B, M, C_out, H, W]`` from the preconditioned input ``x [B, C, H, W]``."""
        b, m = x.shape[0], self.num_times
        if cond is not None:
            cond = torch.as_tensor(cond, device=x.device).repeat_interleave(m, dim=0)
        emb = self.embed(self.c_noise_times.repeat(b), b * m, cond).to(x.dtype)   # row b*M + m: time m
        h = self.conv_in(x).repeat_interleave(m, dim=0)                            # once, then M copies
        skips, i = [], 0
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = self._temporal(block(h, emb), i)
                i += 1
            skips.append(h)
        h = self._temporal(self.mid(h, emb), i)
        i += 1
        for level, block in enumerate(self.up):
            if level > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self._temporal(block(torch.cat([h, skips.pop()], dim=1), emb), i)
            i += 1
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.reshape(b, m, *out.shape[1:])

    def forward(self, x: torch.Tensor, c_noise: Any = None, cond: Any = None) -> torch.Tensor:
        """The last output time ``F_M`` (the sample); ``c_noise`` is ignored (the times are fixed)."""
        return self.trajectory(x, cond)[:, -1]


# --- PaGoDA generator (Kim et al. 2024, "PaGoDA: progressive growing of a one-step generator from a low-resolution
# diffusion teacher") --------------------------------------------------------------------------------------------
PAGODA_DEFAULTS: dict[str, Any] = {
    **UNET_DEFAULTS,
    "growth": [],        # channels of each x2 stage grown on top of the base (8x8 -> 16x16 -> 32x32: two entries)
    "stage_blocks": 2,   # residual blocks per grown stage (the first one up-samples)
}


class UpStage(nn.Module):
    """One x2 stage: ``h <- ResBlocks(nearest_up(h))``, image ``y <- nearest_up(y) + to_rgb(h)``.

    ``to_rgb`` (GroupNorm-SiLU-conv3x3) and the second convolution of every residual block start at zero, so a freshly
    grown stage returns the nearest-upsampled image of the stages below it."""

    def __init__(self, cin: int, cout: int, out_channels: int, emb_dim: int, groups: int, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, emb_dim, groups) for i in range(blocks))
        self.norm_out = nn.GroupNorm(min(groups, cout), cout)
        self.to_rgb = nn.Conv2d(cout, out_channels, 3, padding=1)
        for conv in [b.conv2 for b in self.blocks] + [self.to_rgb]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, y: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        for block in self.blocks:
            h = block(h, emb)
        y = F.interpolate(y, scale_factor=2.0, mode="nearest") + self.to_rgb(F.silu(self.norm_out(h)))
        return h, y


class PaGoDAGenerator(UNet):
    """PaGoDA's one-step generator: the teacher U-Net (same parameter names, so its weights load as they are) whose
    raw output at the input's noise level is an image at the teacher's resolution R, followed by ``len(growth)``
    up-sampling stages (``UpStage``) on its last features: the output is ``[B, C, R 2^S, R 2^S]``.

    Served with ``precond: input`` (``denoisers.InputScaled``): ``G(x) = F(c_in(s) x, log(s)/4)`` with no c_skip or
    c_out, as in the paper's code; the 1-NFE table calls it at ``s = sigma_max``."""

    def __init__(self, growth: Any = (), stage_blocks: int = 2, **unet: Any):
        super().__init__(**unet)
        out = self.conv_out.out_channels
        widths = [self.norm_out.num_channels] + [int(c) for c in growth]
        emb_dim, groups = self.embed.mlp[-1].out_features, unet.get("groups", UNET_DEFAULTS["groups"])
        self.stages = nn.ModuleList(UpStage(widths[i], widths[i + 1], out, emb_dim, groups, int(stage_blocks))
                                    for i in range(len(widths) - 1))

    def last_layer(self, stage: int | None = None) -> torch.Tensor:
        """The weight of the convolution that writes the image of stage ``stage`` (0: the base; default: the top)."""
        stage = len(self.stages) if stage is None else int(stage)
        return self.conv_out.weight if stage == 0 else self.stages[stage - 1].to_rgb.weight

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None, stages: int | None = None) -> torch.Tensor:
        """The image after the base and the first ``stages`` grown stages (default: all)."""
        h, emb = self.hidden(x, c_noise, cond)
        y = self.conv_out(F.silu(self.norm_out(h)))
        for stage in self.stages[: len(self.stages) if stages is None else int(stages)]:
            h, y = stage(h, y, emb)
        return y


# --- consistency models (Song, Dhariwal, Chen, Sutskever 2023, "Consistency models"; code openai/consistency_models) --
class ConsistencyPrecond(EDMPrecond):
    """Raw net F as a consistency function (the paper's appendix C; ``get_scalings_for_boundary_condition`` of
    openai/consistency_models), with ``sd = sigma_data`` and ``s_min = sigma_min``::

        f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)),
        c_skip = sd^2 / ((s - s_min)^2 + sd^2),   c_out = sd (s - s_min) / sqrt(s^2 + sd^2),
        c_in = 1 / sqrt(s^2 + sd^2),              c_noise = log(s) / 4 (EDMPrecond's, so a teacher's F starts it),

    so ``f(x, s_min) = x`` exactly (c_skip = 1, c_out = 0). A network file says ``precond: consistency`` and gives
    ``sigma_min``; ``sigma_min`` is also the lowest noise level the model is defined at."""

    adapter = "consistency"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(net, sigma_data=sigma_data)
        if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not 0 < sigma_min < float("inf"):
            raise ValueError(f"sigma_min must be a positive finite number, got {sigma_min!r}.")
        self.sigma_min = float(sigma_min)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` at ``sigma`` (any shape; elementwise)."""
        sd, lo = self.sigma_data, self.sigma_min
        return sd**2 / ((sigma - lo) ** 2 + sd**2), sd * (sigma - lo) / (sigma**2 + sd**2).sqrt()

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """``c_skip x + c_out F(c_in x, c_noise[, cond])`` with the boundary-condition scalings."""
        sigma = _sigma_like(sigma, x)
        c_skip, c_out = self.scalings(_bcast(sigma, x))
        return c_skip * x + c_out * self.raw(x, sigma, cond)

    def fingerprint(self) -> str:
        """Hash of the net's state dict, sigma_data and sigma_min."""
        return _module_fingerprint(self.net, {}, {"adapter": self.adapter, "sigma_data": self.sigma_data,
                                                  "sigma_min": self.sigma_min})


ARCHS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {"unet": (UNet, UNET_DEFAULTS), "mlp": (MLP, MLP_DEFAULTS)}
ARCHS["dsno_unet"] = (DSNOUNet, DSNO_UNET_DEFAULTS)  # one-step student: a network file like any teacher
ARCHS["pagoda_generator"] = (PaGoDAGenerator, PAGODA_DEFAULTS)  # one-step generator whose output grows past its input
_NON_ARCH_KEYS = {"arch", "precond", "sigma_data", "sigma_min", "shape"}  # sigma_min: precond consistency only
# architectures that are one-step students: their config's arch says they serve 1-NFE tables only (a classic or
# learned multi-step table would feed them their own outputs, a use they were never trained for)
ONE_STEP_ARCHS = ("dsno_unet", "pagoda_generator")


# --- config, files ---------------------------------------------------------------------------------
# Bounds of the integer options of any architecture that has them, and of the parameter count: a file asking for
# more is refused with one sentence before anything is allocated (a bad header cannot ask for terabytes).
INT_LIMITS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64), "out_channels": (1, 64), "resolution": (1, 1024), "channels": (1, 4096),
    "num_res_blocks": (1, 64), "emb_dim": (2, 8192), "groups": (1, 1024), "num_classes": (0, 100_000),
    "in_dim": (1, 1_000_000), "hidden": (1, 65_536), "depth": (0, 1000), "modes": (1, 1024), "stage_blocks": (1, 64),
}
MAX_PARAMETERS = 2_000_000_000


def _check_values(cfg: dict) -> None:
    """Types and ranges of a filled-in config (INT_LIMITS, channel_mult, max_freq, sigma_data, shape) and its size."""
    arch = cfg["arch"]
    for key, (low, high) in INT_LIMITS.items():
        if key not in cfg or (key == "out_channels" and cfg[key] is None):
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise NetError(f"{arch} network config {key} must be an integer in {low}..{high}, got {value!r}.")
    mult = cfg.get("channel_mult", [1])
    if not isinstance(mult, (list, tuple)) or not 1 <= len(mult) <= 10 or \
            any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 64 for m in mult):
        raise NetError(f"{arch} network config channel_mult must be a list of 1 to 10 integers in 1..64, got {mult!r}.")
    for key in ("max_freq", "sigma_data", "sigma_min"):
        value = cfg.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise NetError(f"{arch} network config {key} must be a positive finite number, got {value!r}.")
    growth = cfg.get("growth", [])
    if not isinstance(growth, (list, tuple)) or len(growth) > 8 or \
            any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 4096 for c in growth):
        raise NetError(f"{arch} network config growth must be a list of at most 8 integers in 1..4096, got {growth!r}.")
    shape = cfg.get("shape", [1])
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4 or \
            any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 65_536 for d in shape):
        raise NetError(f"{arch} network config shape must be a list of 1 to 4 positive integers, got {shape!r}.")
    size = estimated_parameters(cfg)
    if size > MAX_PARAMETERS:
        raise NetError(f"{arch} network config asks for about {size:.3g} parameters (limit {MAX_PARAMETERS:.0g}).")


def estimated_parameters(cfg: dict) -> float:
    """An upper estimate of a config's parameter count (to refuse absurd sizes before allocating them)."""
    emb = float(cfg.get("emb_dim", 64))
    if "hidden" in cfg:  # mlp
        h, d = float(cfg["hidden"]), float(cfg.get("depth", 1))
        return d * (2 * h * h + emb * h) + 2 * float(cfg.get("in_dim", 1)) * h + 4 * emb * emb
    width = float(cfg.get("channels", 1)) * max(cfg.get("channel_mult", [1]))
    blocks = len(cfg.get("channel_mult", [1])) * (float(cfg.get("num_res_blocks", 1)) + 1) + 1
    grown = sum(float(cfg.get("stage_blocks", 1)) * (9 * 2 * float(c) * max(width, float(c)) + emb * float(c)) for c in cfg.get("growth", []))
    return blocks * (9 * 2 * width * width + 9 * width * width + emb * width) * 2 + 4 * emb * emb \
        + emb * float(cfg.get("num_classes", 0)) + grown


def full_config(config: dict) -> dict:
    """``config`` with the architecture's defaults filled in; NetError on unknown keys, wrong types or absurd sizes."""
    if not isinstance(config, dict):
        raise NetError(f"network config must be a JSON object, got {type(config).__name__}.")
    arch = config.get("arch")
    if not isinstance(arch, str):
        raise NetError(f"unknown network architecture {arch!r}; valid: {', '.join(ARCHS)}.")
    if arch not in ARCHS:
        raise NetError(f"unknown network architecture {arch!r}; valid: {', '.join(ARCHS)}.")
    defaults = ARCHS[arch][1]
    unknown = set(config) - set(defaults) - _NON_ARCH_KEYS
    if unknown:
        raise NetError(f"{arch} network config has unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(defaults)}.")
    cfg = {"arch": arch, **defaults, **config}
    _check_values(cfg)
    return cfg


def data_shape(config: dict) -> tuple[int, ...]:
    """Shape of one sample the net takes: ``[C, R, R]`` for a unet, ``[in_dim]`` (or ``shape``) for an mlp."""
    cfg = full_config(config)
    if "shape" in cfg:
        return tuple(int(s) for s in cfg["shape"])
    if cfg["arch"] == "unet":
        return (int(cfg["in_channels"]), int(cfg["resolution"]), int(cfg["resolution"]))
    return (int(cfg["in_dim"]),)


def output_shape(config: dict) -> tuple[int, ...]:
    """Shape of one sample the net returns: its input's (``data_shape``), but ``R 2^len(growth)`` pixels a side for a
    ``pagoda_generator``."""
    cfg, shape = full_config(config), data_shape(config)
    if cfg["arch"] != "pagoda_generator":
        return shape
    out = cfg["out_channels"] or cfg["in_channels"]
    return (int(out), *(int(d) * 2 ** len(cfg["growth"]) for d in shape[1:]))


def build_net(config: dict) -> nn.Module:
    """Build a freshly initialised network from its config dict (``arch`` plus the arch's options)."""
    cfg = full_config(config)
    cls, defaults = ARCHS[cfg["arch"]]
    try:
        return cls(**{k: cfg[k] for k in defaults})
    except (TypeError, ValueError) as err:
        if isinstance(err, NetError):
            raise
        raise NetError(f"cannot build {cfg['arch']} network from config ({err}).") from None


def save_net(net: nn.Module, config: dict, path: str, extra_metadata: dict | None = None) -> str:
    """Write ``net``'s weights and ``config`` (JSON in the header) atomically to ``path``."""
    cfg = full_config(config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    header = {
        "format": NET_FORMAT,
        "format_version": str(NET_FORMAT_VERSION),
        "config": json.dumps(cfg, sort_keys=True),
        "metadata": json.dumps({"package_version": package_version(), **(extra_metadata or {})}, sort_keys=True),
    }
    return atomic_save(tensors, path, header)


def read_net_header(path: str) -> tuple[dict, dict]:
    """``(config, metadata)`` from a network file's header, without loading the weights."""

    if not os.path.isfile(path):
        raise NetError(f"{path}: no such network file.")
    header = read_header(path, "network", NetError)
    if header.get("format") != NET_FORMAT:
        raise NetError(f"{path}: not a network file (format {header.get('format')!r}, expected {NET_FORMAT!r}).")
    if header.get("format_version") != str(NET_FORMAT_VERSION):
        raise NetError(f"{path}: network format version {header.get('format_version')} is not supported (expected {NET_FORMAT_VERSION}).")
    try:
        config, metadata = json.loads(header.get("config", "")), json.loads(header.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise NetError(f"{path}: network config is not valid JSON ({getattr(err, 'msg', 'too deeply nested')}).") from None
    for name, value in (("config", config), ("metadata", metadata)):
        if not isinstance(value, dict):
            raise NetError(f"{path}: network {name} must be a JSON object, got {type(value).__name__}.")
    return config, metadata


def load_net(path: str) -> tuple[nn.Module, dict]:
    """Rebuild the network stored at ``path`` and load its weights (strict); returns ``(net, config)``."""

    config, _ = read_net_header(path)
    try:
        net = build_net(config)
    except NetError as err:
        raise NetError(f"{path}: {err}") from None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise NetError(f"{path}: truncated or corrupt network file ({short_error(err)}).") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(first[1:2] or first[:1]).strip().rstrip(".")
        raise NetError(f"{path}: weights do not match the stored config ({detail}).") from None
    return net.eval(), full_config(config)


def load_denoiser(path: str, device: torch.device | str | None = None) -> nn.Module:
    """The network at ``path`` wrapped in its preconditioning (``precond``: ``edm``, ``input`` or ``consistency``) as a
    sigma-space denoiser.

    The returned module carries ``config``, ``shape`` (one input sample's shape), ``out_shape`` (one output's:
    the same but for a generator that grows, ``output_shape``) and ``max_nfe`` (1 for a one-step student's
    ONE_STEP_ARCHS, else None: the tables it serves, checked by ``SolverTable.check_for``) attributes.
    """
    net, config = load_net(path)
    precond = config.get("precond", "edm")
    wrappers = {"edm": EDMPrecond, "input": InputScaled, "consistency": ConsistencyPrecond}
    if precond not in wrappers:
        raise NetError(f"{path}: unknown preconditioning {precond!r}; valid: {', '.join(wrappers)}.")
    options = {"sigma_data": float(config.get("sigma_data", 0.5))}
    if precond == "consistency":
        if "sigma_min" not in config:
            raise NetError(f"{path}: a network with precond consistency must give sigma_min in its config.")
        options["sigma_min"] = float(config["sigma_min"])
    denoiser = wrappers[precond](net, **options)
    denoiser.config = config
    denoiser.shape = data_shape(config)
    denoiser.out_shape = output_shape(config)
    denoiser.max_nfe = 1 if config["arch"] in ONE_STEP_ARCHS else None
    return denoiser.to(device).eval() if device is not None else denoiser.eval()
