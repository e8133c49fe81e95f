"""Text-to-image pipelines as denoisers over their latents: a LOCAL diffusers folder saved by
``StableDiffusionPipeline`` (SD 1.x / 2.x) or a flow-matching ``StableDiffusion3Pipeline`` / ``FluxPipeline`` becomes
``D(x, sigma, cond)`` in EDM sigma-space of the latents, where ``cond`` holds one prompt index per row.

- Prompts are encoded ONCE by the pipeline's own ``encode_prompt`` (so a real SD folder goes through the same code);
  row ``i`` of a batch uses prompt ``cond[i]``; ``prompt_indices(seeds, P)`` assigns prompt ``seed mod P`` to the
  sample of each seed, so every method and every peer gets the same prompt for the same seed.
- Guidance is classifier-free, ``D_u + w (D_c - D_u)`` in one call on the doubled batch (``CFGDenoiser``), the
  unconditional row being the negative prompt ("" by default): the pipelines' own rule, since x0 is affine in
  epsilon and in velocity. ``w = 1`` or None: one unguided call, as the pipelines do at ``guidance_scale <= 1``.
- DDPM-family schedules go through ``VPDenoiser`` (epsilon or v), flow-matching ones through ``FlowDenoiser``.
- ``decode(latents)``: the pipeline's VAE, ``vae.decode(latents / scaling_factor + shift_factor)`` in [-1, 1].
- The fingerprint hashes the net, the text encoders, the schedule, the guidance scale and the negative prompt; the
  prompts themselves are the input, so a table learned on some prompts serves any other.

diffusers and transformers are imported inside the functions that need them; ``import samplers`` never does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .denoisers import CFGDenoiser, FlowDenoiser, InnerRange, VPDenoiser, fingerprint_tensors
from .schedule_config import alphas_cumprod_of, flow_sigmas_of, is_flow_config, quiet_diffusers

# pipeline class -> (its denoising net's component, the text encoder components it may have)
PIPELINES = {
    "StableDiffusionPipeline": ("unet", ("text_encoder",)),
    "StableDiffusion3Pipeline": ("transformer", ("text_encoder", "text_encoder_2", "text_encoder_3")),
    "FluxPipeline": ("transformer", ("text_encoder", "text_encoder_2")),
}
MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 1_000


def pipeline_class(folder: str | Path) -> str | None:
    """The ``_class_name`` of ``folder/model_index.json`` when it names a text-to-image pipeline this module runs,
    else None (a UNet2DModel folder, or no model_index.json)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return name if name in PIPELINES else None


def sigma_range(folder: str | Path) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the pipeline at ``folder`` from its ``scheduler/scheduler_config.json`` alone (no net
    built): a DDPM-family schedule's first and last ``sqrt((1 - abar_t) / abar_t)``, or a flow schedule's
    ``flow_sigmas_of``. ValueError naming the file."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if is_flow_config(config):
            s = flow_sigmas_of(config)
        else:
            abar = alphas_cumprod_of(config)
            s = ((1 - abar) / abar).sqrt()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: {str(err).removeprefix('scheduler config: ')}") from None
    return round(float(s[0]), 12), round(float(s[-1]), 12)


def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts, or a text file with one prompt per line (blank lines skipped); ValueError when empty,
    too many, too long or not text."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"prompts file {str(path)!r} is not a readable UTF-8 text file ({type(err).__name__}).") from None
        out = [line.strip() for line in lines if line.strip()]
    else:
        out = list(prompts)
    if not out:
        raise ValueError("no prompts given: a text-to-image model needs at least one prompt.")
    if len(out) > MAX_PROMPTS:
        raise ValueError(f"{len(out)} prompts is more than {MAX_PROMPTS}.")
    for p in out:
        if not isinstance(p, str):
            raise ValueError(f"every prompt must be a string, got {p!r}.")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"a prompt is longer than {MAX_PROMPT_CHARS} characters ({p[:40]!r}...).")
    return out


def prompt_indices(seeds: Sequence[int] | torch.Tensor, n_prompts: int) -> torch.Tensor:
    """The prompt of each seed's sample: ``seed mod n_prompts`` (int64), the same for every method and peer."""
    return torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.long) % int(n_prompts)


class TextNet(torch.nn.Module):
    """The pipeline's denoising net with the prompt embeddings fixed: ``net(x, t, cond)`` runs the net on rows
    whose prompt indices are ``cond`` [B] (index ``P`` = the negative prompt). The embeddings are buffers left out
    of ``state_dict``: the net's weights alone identify it."""

    def __init__(self, net: torch.nn.Module, kind: str, embeds: torch.Tensor, pooled: torch.Tensor | None = None):
        super().__init__()
        self.net, self.kind = net, kind
        self.register_buffer("embeds", embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(cond, device=self.embeds.device, dtype=torch.long).reshape(-1)
        if idx.numel() != x.shape[0]:
            raise ValueError(f"{idx.numel()} prompt indices for a batch of {x.shape[0]}.")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(x.dtype)
        if self.kind == "unet":
            return self.net(x, t, encoder_hidden_states=self.embeds[idx], return_dict=False)[0]
        kwargs = {"pooled_projections": self.pooled[idx]} if self.pooled is not None else {}
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=self.embeds[idx], return_dict=False, **kwargs)[0]


class PromptDenoiser(InnerRange, torch.nn.Module):
    """A text-to-image denoiser: ``cond`` [B] holds each row's prompt index (``prompt_indices``); with guidance
    ``w > 1`` the inner denoiser is a ``CFGDenoiser`` against the negative prompt. ``prompts`` are those of the
    embeddings; ``decode`` the VAE. Its fingerprint adds the guidance scale and the negative prompt to the net's and
    the text encoders' (``encoders``): a table learned at one scale is refused at another."""

    def __init__(self, denoiser: Any, prompts: list[str], guidance: float | None, negative_prompt: str, encoders: str,
                 decode: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], image_shape: tuple[int, ...],
                 pipeline: str):
        super().__init__()
        self.base = denoiser
        self.guided = guidance is not None and guidance > 1
        self.denoiser = CFGDenoiser(denoiser, float(guidance), torch.tensor([len(prompts)])) if self.guided else denoiser
        self.prompts, self.guidance, self.negative_prompt = prompts, guidance, negative_prompt
        self.encoders, self.decode, self.pipeline = encoders, decode, pipeline
        self.shape, self.image_shape = shape, image_shape  # one latent sample, one decoded image

    def forward(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a text-to-image denoiser needs the prompt index of each row (cond; prompt_indices(seeds, P)).")
        return self.denoiser(x, sigma, cond)

    def fingerprint(self) -> str:
        return self.fingerprint_at(self.guidance)

    def fingerprint_at(self, guidance: float | None) -> str:
        """The fingerprint this model would have at guidance scale ``guidance`` (w <= 1 and None: unguided)."""
        w = float(guidance) if guidance is not None and guidance > 1 else None
        return fingerprint_tensors({}, config={"base": self.base.fingerprint(), "text_encoders": self.encoders,
                                               "guidance": w, "negative_prompt": self.negative_prompt})

    def table_metadata(self) -> dict[str, Any]:
        """What a table learned on this model records beside its fingerprint: the guidance scale and negative prompt."""
        return {"guidance": self.guidance, "negative_prompt": self.negative_prompt}


def expected_fingerprint(metadata: dict[str, Any], denoiser: Any, fingerprint: str, any_guidance: bool = False,
                         option: str = "--any-guidance") -> tuple[str, str]:
    """(the fingerprint a table with ``metadata`` must match on this model, a hint for the error when it does not).
    A table learned on a text-to-image model at another guidance scale (``metadata["guidance"]``) is refused with a
    hint naming both scales, unless ``any_guidance`` asks to run it at this one or the table lists this scale among
    ``metadata["checked_guidance"]`` (the scales it was measured at and shipped for): then it must match the model's
    fingerprint at the table's scale (``option``: how the caller spells that request)."""
    if not isinstance(denoiser, PromptDenoiser) or "guidance" not in metadata:
        return fingerprint, ""
    learned, now = metadata.get("guidance"), denoiser.guidance
    same = (learned or 0) <= 1 and (now or 0) <= 1 or learned == now
    if same:
        return fingerprint, ""
    checked = [float(w) for w in metadata.get("checked_guidance") or []]
    if any_guidance or (now is not None and any(abs(float(now) - w) < 1e-9 for w in checked)):
        return denoiser.fingerprint_at(learned), ""
    also = f" (checked at {', '.join(f'{w:g}' for w in checked)})" if checked else ""
    return fingerprint, (f" It was learned at guidance {learned}{also} and this run uses {now}: use guidance {learned}, "
                         f"or ask for another scale explicitly ({option}).")


@dataclass(frozen=True)
class Encoded:
    """Prompt embeddings: ``embeds`` [P + 1, L, D] (row P: the negative prompt), ``pooled`` [P + 1, D] or None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


def encode(pipe: Any, prompts: list[str], negative_prompt: str, batch: int = 64) -> Encoded:
    """The pipeline's own ``encode_prompt`` on every prompt, then the negative prompt (no grad, in batches)."""
    rows, pooled_rows = [], []
    texts = prompts + [negative_prompt]
    device = next(pipe.text_encoder.parameters()).device
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            part = texts[i:i + batch]
            if "unet" in pipe.components:
                emb, _ = pipe.encode_prompt(part, device, 1, False)
                rows.append(emb)
            else:
                extra = {"prompt_3": part} if "text_encoder_3" in pipe.components else {}
                out = pipe.encode_prompt(part, part, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False, **extra)
                rows.append(out[0])
                pooled_rows.append(out[2] if len(out) == 4 else out[1])
    return Encoded(torch.cat(rows), torch.cat(pooled_rows) if pooled_rows else None)


def _encoders_fingerprint(pipe: Any, names: Sequence[str]) -> str:
    """Hash of the weights of the text encoders ``names`` the pipeline has (the prompts' meaning)."""
    named = {}
    for name in names:
        enc = pipe.components.get(name)
        if enc is not None:
            named.update({f"{name}.{k}": v for k, v in enc.state_dict().items()})
    return fingerprint_tensors(named)


def load_t2i(folder: str | Path, prompts: str | Sequence[str], *, guidance: float | None = None, negative_prompt: str = "",
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> PromptDenoiser:
    """The text-to-image pipeline at ``folder`` as a ``PromptDenoiser`` over its latents (``.shape``: one latent
    sample; ``.decode``: latents to images in [-1, 1]). ValueError with one sentence for a folder or prompts that
    cannot be used (ImportError without diffusers)."""
    from diffusers import DiffusionPipeline
    from transformers.utils import logging as tlog

    folder = Path(folder)
    cls = pipeline_class(folder)
    if cls is None:
        raise ValueError(f"{str(folder)!r} is not a text-to-image pipeline folder (model_index.json naming one of "
                         f"{', '.join(PIPELINES)}).")
    texts = read_prompts(prompts)
    if guidance is not None and (isinstance(guidance, bool) or not math.isfinite(float(guidance)) or guidance < 0):
        raise ValueError(f"guidance must be a non-negative number (the CFG scale w) or null, got {guidance!r}.")
    extra = {"safety_checker": None} if cls == "StableDiffusionPipeline" else {}
    level = tlog.get_verbosity()
    try:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        with quiet_diffusers():
            pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, **extra)
    except Exception as err:  # diffusers/transformers: a missing component, a corrupt file, a config mismatch
        raise ValueError(f"the pipeline at {folder} does not load ({' '.join(str(err).split())[:200]}).") from None
    finally:
        tlog.set_verbosity(level)
        tlog.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device or "cpu")
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    net_name, encoder_names = PIPELINES[cls]
    net = pipe.components[net_name].eval().requires_grad_(False)
    for name in encoder_names:
        if pipe.components.get(name) is not None:
            pipe.components[name].eval().requires_grad_(False)
    encoded = encode(pipe, texts, negative_prompt)
    text_net = TextNet(net, net_name, encoded.embeds, encoded.pooled)
    config = dict(pipe.scheduler.config)
    try:
        if is_flow_config(config):
            sigmas = flow_sigmas_of(config)
            base = FlowDenoiser(text_net, time_scale=int(config.get("num_train_timesteps", 1000)),
                                sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]))
        else:
            base = VPDenoiser(text_net, alphas_cumprod_of(config), config.get("prediction_type", "epsilon"))
    except ValueError as err:
        raise ValueError(f"{folder}/scheduler: {str(err).removeprefix('scheduler config: ')}") from None
    vae = pipe.vae.eval().requires_grad_(False)
    scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
    size = net.config.sample_size
    shape = (int(net.config.in_channels), *((size, size) if isinstance(size, int) else size))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
    image_shape = (int(vae.config.out_channels), shape[1] * factor, shape[2] * factor)

    def decode(latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Images in [-1, 1] from latents (the pipeline's VAE; ``grad``: differentiable in the latents, for a loss in
        image space)."""
        with torch.set_grad_enabled(grad):
            z = latents.to(next(vae.parameters()).device, vae.dtype) / scale + shift
            return vae.decode(z, return_dict=False)[0].clamp(-1, 1).to(latents.dtype)

    return PromptDenoiser(base, texts, guidance, negative_prompt, _encoders_fingerprint(pipe, encoder_names), decode, shape, image_shape, cls)
