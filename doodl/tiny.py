"""Tiny random pipelines of Stable Diffusion's architecture, for tests and benchmarks offline.

They are saved with `save_pretrained` and loaded back through `load_pipeline`, the very path a real
model takes: same classes, same files, only smaller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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


# A CLIP of open_clip's own architecture, a few thousand times smaller than ViT-B-32.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_CLIP_PREPROCESS = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a random open_clip model as a folder `load_clip` reads (open_clip's local-dir layout)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": TINY_CLIP_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "open_clip_model.safetensors")
    return folder


def save_tiny_classifier(folder: str | Path, labels: Sequence[str], seed: int = 0) -> Path:
    """Save a random transformers ResNet image classifier, with its image processor, for `load_classifier`."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ResNetForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return Path(folder)
