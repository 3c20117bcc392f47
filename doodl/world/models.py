"""Architectures of the embedded models: Stable Diffusion's, shrunk to the shapes world.

Sizes are set by the CPU budget: a 50-step guided sample (100 UNet calls at batch 2) must take
under two seconds on two cores, and the whole set of weights must ship in a few tens of MB.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ResNetConfig,
    ResNetForImageClassification,
)

from doodl.world.shapes import IMAGE_SIZE, SHADE_NAMES

LATENT_SIZE = IMAGE_SIZE // 8  # SD's 8x VAE downsampling
TEXT_WIDTH = 64  # hidden size of the generator's text encoder = the UNet's cross-attention width
# The world's captions are at most 11 CLIP tokens: the flow generator reads 16, so its joint attention spends
# little on padding (the causal text tower gives the first tokens the same states at any length).
FLOW_TEXT_TOKENS = 16
CLIP_EMBED_DIM = 64
CLASSIFIER_COLOR = "red"  # the fine-grained classifier tells apart the shades of this color
# ... and names every other color as one more class: without it, any color is one of the shades, and DOODL
# pleased the classifier by turning the object yellow (benchmarks/results/vocabulary_failures.md).
CLASSIFIER_OTHER = f"not {CLASSIFIER_COLOR}"
CLASSIFIER_LABELS = (*SHADE_NAMES[CLASSIFIER_COLOR], CLASSIFIER_OTHER)


def tiny_vae() -> AutoencoderKL:
    # Four blocks (three downsamplings) as in SD, so an image of side s has latents of side s / 8.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=16,
    )


def text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(text_config())


def flow_text_encoder() -> CLIPTextModelWithProjection:
    """The flow generator's text tower: the UNet's, with the projection SD3 pools its prompt through."""
    return CLIPTextModelWithProjection(text_config())


def flow_transformer() -> SD3Transformer2DModel:
    """SD3.5's MMDiT (joint attention over text and image tokens, QK norm), shrunk to the world: one token
    per latent pixel (patch 1; at SD3's patch 2 an 8x8 latent is 16 tokens), reading the two CLIP towers'
    features side by side, as SD3 reads CLIP-L's and CLIP-G's."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=LATENT_SIZE,
        qk_norm="rms_norm",
    )


def clip_config() -> dict:
    """open_clip's local-dir config: a small ViT image tower and a CLIP text tower on SD's vocabulary."""
    return {
        "model_cfg": {
            "embed_dim": CLIP_EMBED_DIM,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "layers": 4,
                "width": 128,
                "head_width": 32,
                "patch_size": 8,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
        },
        "preprocess_cfg": {
            "size": IMAGE_SIZE,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def shade_classifier() -> ResNetForImageClassification:
    labels = CLASSIFIER_LABELS
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return ResNetForImageClassification(config)
