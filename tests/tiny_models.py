"""A tiny diffusers UNet2DModel folder (1x8x8, seed 0) for the tests of model loading: one builder, so every test of
a diffusers folder starts from the same net (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel


def save_tiny(folder: Path, prediction_type: str = "epsilon", classes: int | None = None,
              width: tuple[int, int] = (8, 16)) -> Path:
    """``folder/unet`` (safetensors) + ``folder/scheduler``: a two-level UNet2DModel of ``width`` channels, class
    embeddings when ``classes`` is given, DDPM's default schedule with ``prediction_type``."""
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=width, layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                num_class_embeds=classes).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder
