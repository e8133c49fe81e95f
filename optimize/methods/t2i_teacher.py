"""Tiny text-to-image teachers in diffusers' and transformers' own classes, trained from scratch on the captioned digits
(``optimize.data.captioned``, training digit images under training prompts only), in three stages:

- ``stage=vae``: an ``AutoencoderKL`` (32x32x3 <-> 4x8x8) with ``L = mean_pixels (D(z) - x)^2 + kl_weight *
  sum_latent KL(q(z|x) || N(0, I)) / pixels``, ``z ~ q(z|x)``; its ``scaling_factor`` is then set to ``1 / std`` of the
  latents ``z`` of the training images and saved in its config (``shift_factor`` 0: SD's and SD3's pipelines read the
  same latents). Exported as an AutoencoderKL folder.
- ``stage=sd``: a ``StableDiffusionPipeline``: CLIPTextModel + UNet2DConditionModel trained jointly with the epsilon
  loss ``|eps - eps_hat(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, E(c))|^2`` on ``z = scaling_factor * latent``,
  ``t`` uniform over SD's 1,000 scaled-linear steps (betas 0.00085..0.012).
- ``stage=sd3``: a ``StableDiffusion3Pipeline``: two CLIPTextModelWithProjection encoders and a T5 slot that outputs
  exactly zero (``zero_t5``: the pipeline's own ``text_encoder_3=None`` behaviour, 256 zero tokens, in a folder that
  ``from_pretrained`` loads) + SD3Transformer2DModel trained with the
  rectified-flow loss ``|(n - z) - v(x_t, 1000 t, E(c))|^2``, ``x_t = (1 - t) z + t n``, ``t = sigmoid(m + s u)``,
  ``u ~ N(0, 1)`` (logit-normal); ``FlowMatchEulerDiscreteScheduler`` with ``shift`` for sampling.

Caption dropout: each caption is replaced by "" with probability ``caption_dropout``, the pipelines' negative prompt, so
classifier-free guidance works. Prompts are encoded exactly as the pipelines' ``encode_prompt`` does (``sd_encode``,
``sd3_encode``). The tokenizer's vocabulary is the captions' words (``optimize.data.tokenizer``). Everything random in a
step is drawn from a generator seeded by (seed, rank, step) and batches follow the step, so ``resume=`` continues a run
exactly; the exported weights are the EMA. diffusers and transformers are imported inside the functions that build
the nets (optional dependencies).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from optimize.base import ConfigError, as_list, resolve_path
from optimize.base.keys import Key, count, rate
from optimize.data.captioned import caption, captioned_digits, prompt_split
from optimize.data.tokenizer import caption_words, clip_tokenizer, t5_tokenizer
from optimize.training.checkpoints import pick_resume
from optimize.training.runs import NaNLossError, TrainingModule, step_batch_index, ticks, trainer_parts

STAGES = ("vae", "sd", "sd3")
DEFAULTS = {  # per stage, for the keys left null: steps, batch_size, lr
    "vae": {"steps": 1500, "batch_size": 32, "lr": 5e-4},
    "sd": {"steps": 4000, "batch_size": 64, "lr": 5e-4},
    "sd3": {"steps": 5000, "batch_size": 64, "lr": 5e-4},
}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon")  # Stable Diffusion 1.x / 2.x base
T5_TOKENS = 256  # the zero "T5" tokens StableDiffusion3Pipeline appends without text_encoder_3 (max_sequence_length)
SCALE_SAMPLES = 4096  # training images whose latents set the VAE's scaling_factor

KEYS = {  # this method's typed keys (optimize.base.keys); null steps/batch_size/lr take the stage's DEFAULTS
    "steps": count(10**8, nullable=True), "batch_size": count(10**6, nullable=True), "lr": rate(1.0, nullable=True),
    "caption_dropout": Key("num", 0, 1), "kl_weight": Key("num", 0), "logit_mean": Key("num", -10, 10),
    "logit_std": rate(10), "shift": rate(100), "text_width": count(1024, low=8), "text_layers": count(24),
    "text_heads": count(64), "max_tokens": count(77, low=4), "transformer_width": count(2048, low=8),
    "transformer_layers": count(64), "patch_size": count(8), "latent_channels": count(64), "data_seed": count(low=0),
    "n_data": count(10**7),
}


# --- prompts, encoders and losses (stateless) ------------------------------------------------------
def training_prompts() -> list[str]:
    """The captions of the training prompt split (210), digit-major."""
    return [caption(*map(int, row)) for row in prompt_split("train")]


def token_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids ``[len(texts), L]`` as the pipelines tokenize: padded and truncated to ``model_max_length``."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def sd_encode(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """StableDiffusionPipeline.encode_prompt (clip_skip None): the CLIPTextModel's last hidden state ``[B, L, D]``."""
    return text_encoder(ids)[0]


def sd3_encode(encoders: tuple[nn.Module, nn.Module], ids: torch.Tensor, joint_dim: int,
               t5_tokens: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """StableDiffusion3Pipeline.encode_prompt without T5: both CLIPs' penultimate hidden states side by side, zero-padded
    to ``joint_dim``, then ``t5_tokens`` zero tokens; pooled = both projections side by side. ``([B, L + t5, joint],
    [B, P1 + P2])``."""
    hidden, pooled = [], []
    for enc in encoders:
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, joint_dim)
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def drop_captions(prompt: torch.Tensor, p: float, empty: int, generator: torch.Generator) -> torch.Tensor:
    """Each prompt index replaced by ``empty`` (the "" row) with probability ``p``."""
    drop = torch.rand(prompt.shape[0], generator=generator) < p
    return torch.where(drop, torch.full_like(prompt, empty), prompt)


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """``mean_b sum_latent KL(N(mean, e^logvar) || N(0, I)) / pixels``."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / pixels


def sd_alphas_cumprod() -> torch.Tensor:
    """abar_t of SD's scaled-linear betas (``betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2``), float64."""
    betas = torch.linspace(SD_SCHEDULE["beta_start"] ** 0.5, SD_SCHEDULE["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def epsilon_loss(unet: nn.Module, z0: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 abar: torch.Tensor) -> torch.Tensor:
    """``mean |noise - unet(sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, t, embeds)|^2`` (t integer steps)."""
    a = abar.to(z0.device)[t].to(z0.dtype).reshape(-1, 1, 1, 1)
    xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(xt, t, encoder_hidden_states=embeds, return_dict=False)[0], noise)


def flow_loss(transformer: nn.Module, z0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """``mean |(noise - z0) - v((1 - t) z0 + t noise, 1000 t)|^2`` (t in (0, 1), FlowMatchEuler's timestep scale)."""
    s = t.to(z0.dtype).reshape(-1, 1, 1, 1)
    xt = (1 - s) * z0 + s * noise
    v = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled,
                    return_dict=False)[0]
    return F.mse_loss(v, noise - z0)


class RepeatedLastToken:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``) when the LAST context token stands for ``repeat``
    identical tokens: its key gets ``+log(repeat)`` on the attention logits. Identical context tokens stay identical
    through every block (each block acts per token, and identical queries get identical outputs), so a transformer run
    on ``[clip tokens, one zero token]`` with this processor gives the outputs of the pipeline's ``[clip tokens,
    repeat zero tokens]`` exactly, at a fraction of the cost (training only; the shipped folder has the stock one)."""

    def __init__(self, repeat: int):
        self.repeat = int(repeat)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        b, n = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        eq, ek = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(self.repeat)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        hidden, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](hidden)), context


# --- the nets --------------------------------------------------------------------------------------
def build_vae(channels: list[int], latent_channels: int = 4) -> nn.Module:
    """AutoencoderKL on 32x32x3 images, ``len(channels) - 1`` downsamplings (3 widths: 8x8 latents)."""
    from diffusers import AutoencoderKL  # optional dependency: text-to-image teachers only

    groups = math.gcd(*[int(c) for c in channels], 16)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
                         layers_per_block=1, block_out_channels=tuple(int(c) for c in channels), norm_num_groups=groups,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), scaling_factor=1.0, shift_factor=0.0)


def clip_config(vocab: int, tok: Any, width: int, layers: int, heads: int, max_tokens: int, projection: int) -> Any:
    """A small CLIPTextConfig over the tokenizer ``tok`` (its special ids)."""
    from transformers import CLIPTextConfig  # optional dependency: text-to-image teachers only

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=max_tokens, projection_dim=projection,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_sd_nets(tok: Any, hp: dict[str, Any], latent_channels: int, latent_size: int) -> dict[str, nn.Module]:
    """CLIPTextModel + UNet2DConditionModel with cross-attention at every level."""
    from diffusers import UNet2DConditionModel  # optional dependency: text-to-image teachers only
    from transformers import CLIPTextModel

    width = int(hp["text_width"])
    cfg = clip_config(len(tok), tok, width, hp["text_layers"], hp["text_heads"], hp["max_tokens"], width)
    widths = tuple(int(c) for c in hp["unet_channels"])
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=widths, layers_per_block=1, norm_num_groups=math.gcd(*widths, 32),
                                cross_attention_dim=hp["text_width"], attention_head_dim=max(1, widths[0] // 16),
                                down_block_types=("CrossAttnDownBlock2D",) * len(widths),
                                up_block_types=("CrossAttnUpBlock2D",) * len(widths))
    return {"text_encoder": CLIPTextModel(cfg), "unet": unet}


def build_sd3_nets(tok: Any, hp: dict[str, Any], latent_channels: int, latent_size: int) -> dict[str, nn.Module]:
    """Two CLIPTextModelWithProjection encoders (half the text width each) + SD3Transformer2DModel (head dim 32)."""
    from diffusers import SD3Transformer2DModel  # optional dependency: text-to-image teachers only
    from transformers import CLIPTextModelWithProjection

    half = int(hp["text_width"]) // 2
    heads = max(1, min(int(hp["text_heads"]), half // 8))
    encoders = {name: CLIPTextModelWithProjection(clip_config(len(tok), tok, half, hp["text_layers"], heads,
                                                              hp["max_tokens"], half))
                for name in ("text_encoder", "text_encoder_2")}
    width = int(hp["transformer_width"])
    patch = int(hp["patch_size"])
    transformer = SD3Transformer2DModel(sample_size=latent_size, patch_size=patch, in_channels=latent_channels,
                                        out_channels=latent_channels, num_layers=int(hp["transformer_layers"]),
                                        attention_head_dim=32, num_attention_heads=width // 32,
                                        joint_attention_dim=2 * half, caption_projection_dim=width,
                                        pooled_projection_dim=2 * half, pos_embed_max_size=latent_size // patch)
    return {**encoders, "transformer": transformer}


def zero_t5(joint_dim: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """(T5EncoderModel, T5Tokenizer) whose output is exactly zero (its final RMS norm has weight 0): what
    StableDiffusion3Pipeline uses when ``text_encoder_3`` is None, in a component ``from_pretrained`` can load (it
    refuses a folder whose ``text_encoder_3`` is null). One layer of width ``joint_dim``; its other weights are unused."""
    from transformers import T5Config, T5EncoderModel  # optional dependency: text-to-image teachers only

    tok = t5_tokenizer(caption_words(), T5_TOKENS)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=joint_dim, d_kv=8, d_ff=8, num_layers=1, num_heads=1,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 decoder_start_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()
    return t5.requires_grad_(False), tok


def load_vae(folder: str) -> nn.Module:
    """A trained AutoencoderKL folder (``stage=vae``'s export, or a pipeline's ``vae/``), eval, no grad."""
    from diffusers import AutoencoderKL  # optional dependency: text-to-image teachers only

    return AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval().requires_grad_(False)


def encode_latents(vae: nn.Module, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior mean, posterior std) ``[N, C, h, w]`` of images ``x`` under the VAE (unscaled latents)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            dist = vae.encode(x[i:i + batch]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# --- the Lightning module --------------------------------------------------------------------------
class T2IModule(TrainingModule):
    """One stage of the text-to-image teachers (module docstring): ``parts`` holds the trained nets (``vae``, or the
    text encoder(s) and the denoiser), ``ema`` their exponential moving average (exported). Data are attached with
    ``attach_images`` (vae) or ``attach_latents`` (sd, sd3); step t's batch is ``step_batch_index(N, B, seed, t)``
    and its randomness comes from ``step_generator``."""

    method = "t2i_teacher"

    def __init__(self, stage: str, hp: dict[str, Any], lr: float, warmup_steps: int, ema_decay: float, seed: int,
                 tokenizer: Any = None, latent_shape: tuple[int, int, int] = (4, 8, 8)):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.stage, self.tokenizer = stage, tokenizer
        if stage == "vae":
            parts = {"vae": build_vae(hp["vae_channels"], latent_shape[0])}
        elif stage == "sd":
            parts = build_sd_nets(tokenizer, hp, latent_shape[0], latent_shape[1])
        else:
            parts = build_sd3_nets(tokenizer, hp, latent_shape[0], latent_shape[1])
            parts["transformer"].set_attn_processor(RepeatedLastToken(T5_TOKENS))
        self.parts = nn.ModuleDict(parts)
        self.ema = copy.deepcopy(self.parts).requires_grad_(False)
        self.abar = sd_alphas_cumprod()
        self.data: dict[str, torch.Tensor] = {}

    # data
    def attach_images(self, x: torch.Tensor, batch_size: int) -> "T2IModule":
        self.data, self.batch_size = {"x": x}, min(int(batch_size), len(x))
        return self

    def attach_latents(self, mean: torch.Tensor, std: torch.Tensor, scale: float, prompt: torch.Tensor, ids: torch.Tensor,
                       batch_size: int) -> "T2IModule":
        """Latent posteriors of the training images (unscaled), the VAE's scaling factor, each image's prompt index
        and the token ids ``[P + 1, L]`` of the prompts (row P: "")."""
        self.data = {"mean": mean, "std": std, "prompt": prompt, "ids": ids}
        self.scale, self.batch_size = float(scale), min(int(batch_size), len(mean))
        return self

    def step_generator(self) -> torch.Generator:
        """The CPU generator of this step's randomness, seeded by (seed, rank, global_step)."""
        seed = (int(self.hparams.seed) * 1_000_003 + int(self.global_rank)) * 1_000_000_007 + int(self.global_step)
        return torch.Generator().manual_seed(seed % 2**63)

    def step_index(self) -> torch.Tensor:
        n = len(next(iter(self.data.values())))
        return step_batch_index(n, self.batch_size, int(self.hparams.seed), int(self.global_step))

    # training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        gen, idx = self.step_generator(), self.step_index()
        hp = self.hparams.hp
        if self.stage == "vae":
            x = self.data["x"][idx].to(self.device)
            dist = self.parts["vae"].encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(x.device)
            rec = F.mse_loss(self.parts["vae"].decode(z).sample, x)
            kl = kl_per_pixel(dist.mean, dist.logvar, x[0].numel())
            loss = rec + float(hp["kl_weight"]) * kl
            self.log_dict({"rec": rec, "kl": kl}, on_step=True)
        else:
            mean, std = self.data["mean"][idx], self.data["std"][idx]
            z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scale
            empty = len(self.data["ids"]) - 1
            prompt = drop_captions(self.data["prompt"][idx], float(hp["caption_dropout"]), empty, gen)
            ids = self.data["ids"][prompt].to(self.device)
            noise = torch.randn(z0.shape, generator=gen)
            z0, noise = z0.to(self.device), noise.to(self.device)
            if self.stage == "sd":
                t = torch.randint(0, 1000, (len(idx),), generator=gen).to(self.device)
                loss = epsilon_loss(self.parts["unet"], z0, sd_encode(self.parts["text_encoder"], ids), t, noise, self.abar)
            else:
                t = torch.sigmoid(float(hp["logit_mean"]) + float(hp["logit_std"]) * torch.randn(len(idx), generator=gen))
                embeds, pooled = sd3_encode((self.parts["text_encoder"], self.parts["text_encoder_2"]), ids,
                                            int(self.parts["transformer"].config.joint_attention_dim), t5_tokens=1)
                loss = flow_loss(self.parts["transformer"], z0, embeds, pooled, t.to(self.device), noise)
        self.check_loss(loss, hint="lower lr")
        self.history.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        return loss

    def ema_pairs(self) -> tuple[Any, Any]:
        return self.ema.parameters(), self.parts.parameters()

    def configure_optimizers(self) -> Any:
        """AdamW with a linear warm-up, then a constant rate (the EMA does the averaging)."""
        opt = torch.optim.AdamW(self.parts.parameters(), lr=float(self.hparams.lr), weight_decay=0.0)
        warm = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --- export ----------------------------------------------------------------------------------------
def replace_folder(build: Any, dest: str) -> str:
    """Write a folder atomically: ``build(tmp)`` fills a temporary sibling, which then replaces ``dest``."""
    dest_path = Path(dest).resolve()
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_path.with_name(f".{dest_path.name}.tmp-{os.getpid()}")
    old = dest_path.with_name(f".{dest_path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    if dest_path.exists():
        dest_path.rename(old)
    tmp.rename(dest_path)
    shutil.rmtree(old, ignore_errors=True)
    return str(dest_path)


def latent_scale(vae: nn.Module, x: torch.Tensor, generator: torch.Generator) -> float:
    """``1 / std`` of latent samples ``z ~ q(z|x)`` of the images ``x`` (all entries pooled)."""
    mean, std = encode_latents(vae, x)
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / z.std())


def export_vae(module: T2IModule, x: torch.Tensor, dest: str, info: dict[str, Any]) -> str:
    """The EMA VAE with ``scaling_factor = latent_scale`` on ``x`` (and shift_factor 0) as an AutoencoderKL folder."""
    vae = module.ema["vae"].eval()
    scale = latent_scale(vae, x, torch.Generator().manual_seed(int(module.hparams.seed)))
    vae.register_to_config(scaling_factor=scale, shift_factor=0.0)

    def build(tmp: Path) -> None:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps({**info, "scaling_factor": scale}, indent=1, sort_keys=True) + "\n")

    return replace_folder(build, dest)


def export_pipeline(module: T2IModule, vae_dir: str, shift: float, dest: str, info: dict[str, Any]) -> str:
    """The EMA nets, the tokenizer, the VAE at ``vae_dir`` and the stage's scheduler as a pipeline folder that
    ``from_pretrained(dest, use_safetensors=True)`` loads; ``training.json`` beside it records the run."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, PNDMScheduler, StableDiffusion3Pipeline,  # optional dependency
                           StableDiffusionPipeline)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    vae, ema, tok = load_vae(vae_dir), module.ema, module.tokenizer
    if module.stage == "sd":
        sched = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema["text_encoder"].eval(), tokenizer=tok,
                                       unet=ema["unet"].eval(), scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        transformer = copy.deepcopy(ema["transformer"]).eval()
        transformer.set_attn_processor(JointAttnProcessor2_0())  # stock attention: the pipeline gives 256 zero tokens
        t5, tok3 = zero_t5(int(transformer.config.joint_attention_dim), int(module.hparams.seed))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae,
                                        text_encoder=ema["text_encoder"].eval(), tokenizer=tok,
                                        text_encoder_2=ema["text_encoder_2"].eval(), tokenizer_2=tok,
                                        text_encoder_3=t5, tokenizer_3=tok3)

    def build(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return replace_folder(build, dest)


# --- the command -----------------------------------------------------------------------------------
def settings(cfg: Any) -> dict[str, Any]:
    """The effective run settings: the stage's DEFAULTS for null steps, batch_size and lr."""
    stage = str(cfg.stage)
    return {k: (cfg[k] if cfg.get(k) is not None else v) for k, v in DEFAULTS[stage].items()}


def hyper(cfg: Any) -> dict[str, Any]:
    """The net sizes and loss settings of a run (recorded in its checkpoints, checked on resume)."""
    keys = ("vae_channels", "latent_channels", "kl_weight") if cfg.stage == "vae" else (
        "text_width", "text_layers", "text_heads", "max_tokens", "caption_dropout",
        *(("unet_channels",) if cfg.stage == "sd" else ("transformer_width", "transformer_layers", "patch_size",
                                                          "logit_mean", "logit_std")))
    return {k: (OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]) for k in keys}


def validate(cfg: Any) -> None:
    """The stage, the net sizes and the VAE folder a denoiser stage reads."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}.")
    for key in ("vae_channels", "unet_channels"):
        widths = as_list(cfg[key])
        if not 2 <= len(widths) <= 4 or any(isinstance(w, bool) or not isinstance(w, int) or not 4 <= w <= 1024
                                            for w in widths):
            raise ConfigError(f"{key} must be a list of 2 to 4 integers in [4, 1024], got {cfg[key]!r}.")
        if key == "unet_channels" and any(w % 8 for w in widths):
            raise ConfigError(f"unet_channels must be multiples of 8, got {cfg[key]!r}.")
    if int(cfg.transformer_width) % 32:
        raise ConfigError(f"transformer_width must be a multiple of 32 (heads of 32), got {cfg.transformer_width}.")
    if int(cfg.text_width) % (2 * int(cfg.text_heads)):
        raise ConfigError(f"text_width must be a multiple of 2 * text_heads, got text_width={cfg.text_width} and "
                          f"text_heads={cfg.text_heads}.")
    if cfg.stage != "vae":
        vae = resolve_path(str(cfg.vae))
        if not (vae / "config.json").is_file():
            raise ConfigError(f"vae={cfg.vae} is not an AutoencoderKL folder (no config.json); train it with stage=vae.")
        if 8 % int(cfg.patch_size):
            raise ConfigError(f"patch_size must divide the 8x8 latents (1, 2, 4 or 8), got {cfg.patch_size}.")
    if cfg.export_dir is not None and resolve_path(str(cfg.export_dir)).is_file():
        raise ConfigError(f"export_dir={cfg.export_dir} is a file; give a folder for the {cfg.stage} export.")


RESUME_IGNORE = ("steps",)  # a constant learning rate: steps only says where the run stops


def run(cfg: Any) -> str:
    """`python -m optimize t2i_teacher stage=vae|sd|sd3`: train one stage with Lightning (checkpoints every
    ``checkpoint_every`` steps in ``<out_dir>/lightning``; ``resume=`` continues), then export the EMA nets as a
    folder (``export_dir``, default ``<out_dir>/<stage>``). Returns the folder."""
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    stage, s, hp = str(cfg.stage), settings(cfg), hyper(cfg)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = captioned_digits(int(cfg.n_data), seed=int(cfg.data_seed), images="train", prompts="train")
    tok = None if stage == "vae" else clip_tokenizer(Path(out_dir) / "tokenizer-src", caption_words(), int(cfg.max_tokens))
    vae = None if stage == "vae" else load_vae(str(resolve_path(str(cfg.vae))))
    mean, std = (None, None) if vae is None else encode_latents(vae, data.x)
    latent_shape = (int(cfg.latent_channels), 8, 8) if vae is None else tuple(mean.shape[1:])
    module = T2IModule(stage, hp, lr=float(s["lr"]), warmup_steps=int(cfg.warmup_steps), ema_decay=float(cfg.ema),
                       seed=int(cfg.seed), tokenizer=tok, latent_shape=latent_shape)
    if vae is None:
        module.attach_images(data.x, int(s["batch_size"]))
    else:
        prompts = training_prompts()
        index = {p: i for i, p in enumerate(prompts)}
        prompt = torch.tensor([index[c] for c in data.captions])
        module.attach_latents(mean, std, float(vae.config.scaling_factor), prompt, token_ids(tok, prompts + [""]),
                              int(s["batch_size"]))
    module.run_settings = {"stage": stage, "n_data": int(cfg.n_data), "data_seed": int(cfg.data_seed),
                           "batch_size": int(s["batch_size"]), "steps": int(s["steps"]),
                           **({} if stage == "vae" else {"vae": str(cfg.vae)})}
    ckpt_path = pick_resume(cfg.resume, out_dir, {**dict(module.hparams), **module.run_settings}, ignore=RESUME_IGNORE)
    trainer = L.Trainer(accelerator="cpu" if str(cfg.device) == "cpu" else "auto", devices=1, max_steps=int(s["steps"]),
                        **trainer_parts(cfg, out_dir), gradient_clip_val=float(cfg.grad_clip) or None,
                        log_every_n_steps=max(1, min(25, int(s["steps"]) // 2)), enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=out_dir)
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in module.parts.items()}
    print(f"t2i_teacher {stage}: {', '.join(f'{k} {v:,}' for k, v in sizes.items())} parameters; {len(data.x)} training "
          f"images; {s['steps']} steps of {s['batch_size']}", flush=True)
    try:
        trainer.fit(module, ticks(), ckpt_path=ckpt_path, weights_only=True)
    except NaNLossError as err:
        raise ConfigError(f"{err} Lower lr, or resume from an earlier checkpoint") from None
    seconds = module.train_seconds()  # this run's and, after resume=, the earlier runs' training time
    dest = str(resolve_path(str(cfg.export_dir))) if cfg.export_dir else os.path.join(out_dir, stage)
    info = {"trainer": "optimize.methods.t2i_teacher", "stage": stage, "steps": int(module.global_step),
            "seed": int(cfg.seed), "threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
            "parameters": sizes, "final_loss": float(sum(module.history[-100:]) / max(1, len(module.history[-100:]))),
            "data": f"captioned_digits({int(cfg.n_data)}, seed={int(cfg.data_seed)}, images='train', prompts='train')",
            **module.run_settings, **hp}
    if stage == "vae":
        path = export_vae(module, data.x[:SCALE_SAMPLES], dest, info)
    else:
        vae_dir = resolve_path(str(cfg.vae))
        vae_info = vae_dir / "training.json"
        info["vae_training"] = json.loads(vae_info.read_text()) if vae_info.is_file() else None
        if stage == "sd3":
            info["shift"] = float(cfg.shift)
        path = export_pipeline(module, str(vae_dir), float(cfg.shift), dest, info)
    print(f"t2i_teacher {stage}: {module.global_step} steps in {seconds:.0f} s -> {path}", flush=True)
    return path
