"""Tiny random pipelines of Stable Diffusion's architecture, for tests and benchmarks offline.

They are saved with `save_pretrained` and loaded back through `load_pipeline`, the very path a real
model takes: same classes, same files, only smaller.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from doodl.tokenizer import clip_tokenizer


def save_tiny_pipeline(
    folder: str | Path,
    sample_size: int = 8,
    channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Save a random SD-architecture pipeline whose latents are sample_size x sample_size."""
    torch.manual_seed(seed)
    text_width = 32
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(channels) - 1),
        up_block_types=("UpBlock2D",) * (len(channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),  # four levels: 8x downsampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return Path(folder)
