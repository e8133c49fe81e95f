"""RANDOM tiny text-to-image pipeline folders for tests (not a test module): ``save_tiny_sd`` writes a
``StableDiffusionPipeline`` folder and ``save_tiny_sd3`` a ``StableDiffusion3Pipeline`` folder, both in diffusers' and
transformers' own classes, saved with ``save_pretrained`` (safetensors) and loadable offline with
``from_pretrained(DIR, use_safetensors=True)``. The tokenizers are written from a small word list (no download):
CLIP's byte-level BPE files and a unigram vocabulary for T5, both by ``optimize.data.tokenizer``. Weights are random
(seeded): the folders exercise the pipelines' code paths, not image quality. Each builds in about a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from optimize.data.tokenizer import clip_tokenizer as package_clip_tokenizer
from optimize.data.tokenizer import t5_tokenizer as package_t5_tokenizer

WORDS = ("a an the on of in with digit zero one two three four five six seven eight nine red green blue yellow "
         "white black orange purple grey background plain wood stone grass sky picture photo small large").split()
MAX_TOKENS = 16  # the tokenizers' model_max_length: short prompts keep the text encoders and attention tiny
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon")  # Stable Diffusion 1.x/2.x base


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer over WORDS (the package's tokenizer files, ``optimize.data.tokenizer``), MAX_TOKENS long."""
    return package_clip_tokenizer(folder, WORDS, MAX_TOKENS)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over WORDS plus single letters (``optimize.data.tokenizer``; unknown words still tokenize)."""
    return package_t5_tokenizer(WORDS, MAX_TOKENS)


def _clip_config(tok: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=projection,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def tiny_vae(shift_factor: float | None = None, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """32x32x3 images <-> 4x8x8 latents (two downsamplings)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                         block_out_channels=(8, 8, 8), norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def save_tiny_sd(folder: str | Path, seed: int = 0, width: tuple[int, int] = (16, 32), text_width: int = 16,
                 scheduler: str = "pndm") -> Path:
    """A random ``StableDiffusionPipeline`` folder: tiny VAE, CLIPTextModel (``text_width``) + CLIPTokenizer,
    UNet2DConditionModel of ``width`` channels with cross-attention, SD's scheduler config (PNDM as SD 1.5 ships it,
    or ``scheduler="ddim"``; scaled-linear betas 0.00085..0.012, 1000 steps, epsilon), no safety checker."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_tokenizer(folder / "_tokenizer_src")
    text = CLIPTextModel(_clip_config(tok, text_width, text_width)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=width,
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=text_width,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    if scheduler == "pndm":
        sched = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    elif scheduler == "ddim":
        sched = DDIMScheduler(**SD_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    else:
        raise ValueError(f"scheduler must be pndm or ddim, got {scheduler!r}.")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tokenizer_src")
    return folder


def save_tiny_sd3(folder: str | Path, seed: int = 0, width: int = 16, shift: float = 3.0) -> Path:
    """A random ``StableDiffusion3Pipeline`` folder with all three text encoders SD3 takes: tiny VAE (SD3's
    shift/scaling factors), two CLIPTextModelWithProjection encoders (widths 16 and 24) sharing one CLIP tokenizer, a
    tiny T5EncoderModel with a unigram tokenizer, an SD3Transformer2DModel (patch 2, ``width`` = heads x head dim, a
    multiple of 8) and FlowMatchEulerDiscreteScheduler with ``shift``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_tokenizer(folder / "_tokenizer_src")
    text1 = CLIPTextModelWithProjection(_clip_config(tok, 16, 16)).eval()
    text2 = CLIPTextModelWithProjection(_clip_config(tok, 24, 24)).eval()
    joint = 48  # >= 16 + 24: the two CLIP hidden states side by side, zero-padded to T5's width
    tok3 = t5_tokenizer()
    text3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=joint, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                    pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id,
                                    decoder_start_token_id=tok3.pad_token_id)).eval()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=width // 8, joint_attention_dim=joint,
                                        caption_projection_dim=width, pooled_projection_dim=16 + 24,
                                        pos_embed_max_size=8).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=tiny_vae(0.0609, 1.5305),
                                    text_encoder=text1, tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok,
                                    text_encoder_3=text3, tokenizer_3=tok3)
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tokenizer_src")
    return folder


def _remove_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()
