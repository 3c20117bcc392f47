"""Random-weight models of the real architectures, saved to folders and loaded as users load theirs.

No download: the configurations of Stable Diffusion 1.5 / 2.1 / XL base 1.0 (from their model cards'
config.json files) and of open_clip's ViT-L-14 are written out here, the weights are random. Memory and
time depend on the architecture and the sizes, not on the weights' values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from doodl import tiny
from doodl.tiny import save_sd_pipeline, save_sdxl_pipeline, sd_scheduler, sdxl_scheduler

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1: what differs between the two.
SD_ARCHITECTURES = {
    "sd15": {
        "unet": {"attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                 "num_hidden_layers": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
        "prediction_type": "epsilon",
    },
    "sd21": {
        "unet": {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
                 "use_linear_projection": True, "upcast_attention": True},
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                 "num_hidden_layers": 23, "hidden_act": "gelu", "projection_dim": 512},
        "prediction_type": "v_prediction",
    },
}  # fmt: skip

# stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/, text_encoder_2/ config.json files.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_TEXT = (  # CLIP ViT-L's text tower, then OpenCLIP ViT-bigG's (the one with a projection)
    {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
     "hidden_act": "quick_gelu", "projection_dim": 768},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
     "hidden_act": "gelu", "projection_dim": 1280},
)  # fmt: skip
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE: SD's architecture, its own scaling factor, overflows in float16

GUIDE_ARCHITECTURE = "ViT-L-14"  # the DOODL paper's text guide and LAION's aesthetic predictor's tower


ARCHITECTURES = (*SD_ARCHITECTURES, "sdxl")


def save_random_sd(folder: str | Path, arch: str = "sd15", dtype: torch.dtype = torch.float16) -> Path:
    """Save a random pipeline of a real SD architecture (weights stored in `dtype`, to halve the disk)."""
    if arch == "sdxl":
        return save_random_sdxl(folder, dtype)
    if arch not in SD_ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}': expected one of {', '.join(ARCHITECTURES)}")
    spec = SD_ARCHITECTURES[arch]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32,
        **spec["unet"],
    )
    vae = sd_vae(spec["unet"]["sample_size"] * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    scheduler = sd_scheduler(spec["prediction_type"])
    return save_sd_pipeline(folder, unet, vae, text_encoder, scheduler, dtype)


def sd_vae(sample_size: int, **config: object) -> AutoencoderKL:
    """Stable Diffusion's VAE at its real size (1.x, 2.x and XL share its architecture)."""
    return tiny.sd_vae(sample_size, (128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, **config)


def save_random_sdxl(folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a random SDXL base 1.0 pipeline, weights stored in `dtype`.

    Each part is cast to `dtype` as soon as it is built, so that building never holds all 3.5 billion
    parameters in float32 at once (14 GB): the float32 UNet (10.3 GB) is the most held.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
    vae = sd_vae(SDXL_UNET["sample_size"] * 8, scaling_factor=SDXL_VAE_SCALING, force_upcast=True).to(dtype)
    encoders = [
        encoder_class(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)).to(dtype)
        for encoder_class, config in zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT, strict=True)
    ]
    return save_sdxl_pipeline(folder, unet, vae, *encoders, sdxl_scheduler())


def save_random_clip(folder: str | Path, arch: str = GUIDE_ARCHITECTURE) -> Path:
    """Save a random open_clip model of a built-in architecture as a folder `load_clip` reads."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model(arch)
    config = {
        "model_cfg": open_clip.get_model_config(arch),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder
