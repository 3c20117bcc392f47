"""Random-weight models of the real architectures, saved to folders and loaded as users load theirs.

No download: the configurations of Stable Diffusion 1.5 / 2.1 / XL base 1.0, SD3.5 Medium and FLUX.1 dev /
schnell (from their config.json files) and of open_clip's ViT-L-14 are written out here, the weights are
random. Memory and time depend on the architecture and the sizes, not on the weights' values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from doodl import tiny
from doodl.tiny import (
    flow_scheduler,
    save_sd_pipeline,
    save_sdxl_pipeline,
    sd_scheduler,
    sdxl_scheduler,
    seeded_torch,
)
from doodl.tokenizer import clip_tokenizer, t5_tokenizer

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


# stabilityai/stable-diffusion-3.5-medium: transformer/config.json (MMDiT-X: dual attention in the first 13
# blocks, QK RMSNorm), about 2.5 billion parameters.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev: transformer/config.json, about 12 billion parameters (schnell: no guidance
# embedding).
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
ARCHITECTURES = (*SD_ARCHITECTURES, "sdxl", "sd3-medium", "flux", "flux-schnell")


def save_random_sd(folder: str | Path, arch: str = "sd15", dtype: torch.dtype = torch.float16) -> Path:
    """Save a random pipeline of a real SD architecture (weights stored in `dtype`, to halve the disk)."""
    if arch == "sdxl":
        return save_random_sdxl(folder, dtype)
    if arch == "sd3-medium":
        return save_random_sd3_medium(folder, dtype)
    if arch.startswith("flux"):
        return save_random_flux(folder, dtype, guidance_embeds=arch == "flux")
    if arch not in SD_ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}': expected one of {', '.join(ARCHITECTURES)}")
    spec = SD_ARCHITECTURES[arch]
    with seeded_torch(0):
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
        text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"])
        text_encoder = CLIPTextModel(text_config)
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
    with seeded_torch(0):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = sd_vae(SDXL_UNET["sample_size"] * 8, scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
        vae = vae.to(dtype)
        encoders = [
            encoder_class(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)).to(dtype)
            for encoder_class, config in zip(
                (CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT, strict=True
            )
        ]
    return save_sdxl_pipeline(folder, unet, vae, *encoders, sdxl_scheduler())


def save_random_clip(folder: str | Path, arch: str = GUIDE_ARCHITECTURE) -> Path:
    """Save a random open_clip model of a built-in architecture as a folder `load_clip` reads."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with seeded_torch(0):
        model = open_clip.create_model(arch)
    config = {
        "model_cfg": open_clip.get_model_config(arch),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder


def flow_vae(family: str, dtype: torch.dtype) -> AutoencoderKL:
    """SD3's or FLUX's VAE at its real size (1024 px): SD's channels and layers, 16 latent channels."""
    size = {"channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
    return tiny.flow_vae(1024, family, **size).to(dtype)


def text_tower(encoder_class: type[CLIPTextModel], width: int) -> CLIPTextModel:
    """A one-layer CLIP text tower of a real width: the prompt's embeddings have their real shapes, and
    are all the transformer sees of it (the towers are freed once the prompt is encoded)."""
    return tiny.clip_text_encoder(encoder_class, width, heads=width // 64, layers=1, widening=4)


def save_random_sd3_medium(folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a random SD3.5 Medium pipeline: its transformer and VAE at their real size; its CLIP-L and
    CLIP-G of their real widths but one layer each, and no T5 (SD3 runs without it, reading zeros of the
    same 256 tokens x 4096 in its place: the transformer's work is the same). T5-XXL's 4.7 billion
    parameters would not fit beside the transformer in this machine's memory in float32."""
    with seeded_torch(0):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).to(dtype)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            vae=flow_vae("SD3", dtype),
            text_encoder=text_tower(CLIPTextModelWithProjection, 768).to(dtype),
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_tower(CLIPTextModelWithProjection, 1280).to(dtype),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
            scheduler=flow_scheduler(shift=3.0),
        )
    pipe.save_pretrained(folder)
    return Path(folder)


@contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Modules built in the block get parameters of `dtype`, on the GPU when there is one (where random
    initialisation of billions of parameters takes seconds rather than minutes)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            yield
    finally:
        torch.set_default_dtype(before)


def save_random_flux(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, guidance_embeds: bool = True
) -> Path:
    """Save a random FLUX.1-dev (or schnell) pipeline: its transformer and VAE at their real size; CLIP-L of
    its real width but one layer, and a one-layer T5 of T5-XXL's width (4096): the transformer sees
    prompt embeddings of their real shapes (512 tokens x 4096, 768 pooled)."""
    scheduler = flow_scheduler(shift=3.0, dynamic=True) if guidance_embeds else flow_scheduler(shift=1.0)
    # `built_in` draws the transformer's weights on the GPU where there is one: its generators are seeded too.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(0)
        with built_in(dtype):  # 12 billion parameters: never all in float32 (48 GB)
            transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer()),
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=1,
                num_heads=64,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
            )
        ).to(dtype)
        pipe = FluxPipeline(
            transformer=transformer,
            vae=flow_vae("FLUX", dtype),
            text_encoder=text_tower(CLIPTextModel, 768).to(dtype),
            tokenizer=clip_tokenizer(),
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer(max_length=512),
            scheduler=scheduler,
        )
    pipe.save_pretrained(folder)
    return Path(folder)
