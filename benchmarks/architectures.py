"""Random-weight models of the real architectures, saved to folders and loaded as users load theirs.

No download: the configurations of Stable Diffusion 1.5 / 2.1 (from their model cards' config.json files)
and of open_clip's ViT-L-14 are written out here, the weights are random. Memory and time depend on the
architecture and the sizes, not on the weights' values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from doodl.tiny import save_sd_pipeline, sd_scheduler

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

GUIDE_ARCHITECTURE = "ViT-L-14"  # the DOODL paper's text guide and LAION's aesthetic predictor's tower


def save_random_sd(folder: str | Path, arch: str = "sd15", dtype: torch.dtype = torch.float16) -> Path:
    """Save a random pipeline of a real SD architecture (weights stored in `dtype`, to halve the disk)."""
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=spec["unet"]["sample_size"] * 8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    scheduler = sd_scheduler(spec["prediction_type"])
    return save_sd_pipeline(folder, unet, vae, text_encoder, scheduler, dtype)


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
