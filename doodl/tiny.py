"""Tiny random pipelines of the generators' architectures (SD, SDXL, SD3, FLUX), for tests and benchmarks
offline.

They are saved with `save_pretrained` and loaded back through `load_pipeline`, the very path a real
model takes: same classes, same files, only smaller.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from doodl.tokenizer import clip_tokenizer, t5_tokenizer


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for the block, and give the caller its own state back afterwards.

    Module constructors draw their initial weights from that generator, so seeding it is what makes a build
    reproducible; restoring it keeps a build from changing what the caller draws next. Only the CPU
    generator is seeded (models are built on the CPU), so the GPUs' generators are left untouched too.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def save_tiny_pipeline(
    folder: str | Path,
    sample_size: int = 8,
    channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
    seed: int = 0,
    scheduler: SchedulerMixin | None = None,
) -> Path:
    """Save a random SD-architecture pipeline whose latents are sample_size x sample_size.

    `scheduler` replaces SD 1.x's DDIM scheduler, and then sets the prediction type: e.g. `turbo_scheduler()`.
    """
    with seeded_torch(seed):
        unet, vae, text_encoder = tiny_sd_models(sample_size, channels)
    return save_sd_pipeline(folder, unet, vae, text_encoder, scheduler or sd_scheduler(prediction_type))


def tiny_sd_models(
    sample_size: int, channels: tuple[int, ...]
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Randomly initialised UNet, VAE and text encoder of SD's architecture, drawn from torch's global RNG."""
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
    vae = sd_vae(sample_size * 8)
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
    return unet, vae, text_encoder


def sd_vae(
    sample_size: int,
    channels: tuple[int, ...] = (8, 8, 16, 16),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    **config: object,
) -> AutoencoderKL:
    """A random VAE of Stable Diffusion's architecture (1.x, 2.x and XL share it; four levels: 8x
    downsampling), small by default; SD's own is channels (128, 256, 512, 512), 2 layers, 32 groups."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        **{"latent_channels": 4, **config},
    )


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM scheduler (SD 1.5's config; SD 2.1's with "v_prediction")."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def save_sd_pipeline(
    folder: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler: SchedulerMixin,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save the parts as a StableDiffusionPipeline folder (offline CLIP tokenizer, no safety checker)."""
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
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(folder)
    return Path(folder)


def turbo_scheduler(prediction_type: str = "v_prediction") -> EulerDiscreteScheduler:
    """The scheduler a few-step model such as SD-Turbo ships: Euler, SD's noise schedule, trailing timesteps
    (one step starts from t=999), and no set_alpha_to_one entry (DDIM's default, True, then applies)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type=prediction_type,
    )


def save_tiny_turbo_pipeline(
    folder: str | Path, prediction_type: str = "v_prediction", seed: int = 0
) -> Path:
    """Save a random pipeline configured like SD-Turbo: SD 2.x's kind of scheduler, trailing timesteps."""
    return save_tiny_pipeline(folder, seed=seed, scheduler=turbo_scheduler(prediction_type))


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

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": TINY_CLIP_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with seeded_torch(seed):
        model = open_clip.CLIP(**TINY_CLIP)
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder


TINY_CLIP_ARCHITECTURE = "doodl-tiny-clip"


def register_tiny_clip_architecture(folder: str | Path) -> str:
    """Make TINY_CLIP a built-in open_clip architecture, as ViT-H-14 is, so that checkpoint files load by
    name (`load_clip(name, file)`); returns the name. open_clip keeps it for the rest of the process."""
    import open_clip

    path = Path(folder) / f"{TINY_CLIP_ARCHITECTURE}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return TINY_CLIP_ARCHITECTURE


# Layouts of a CLIP checkpoint file: open_clip's state dict, HPSv2's (the same under 'state_dict'),
# OpenAI's release (a TorchScript archive) and a state dict taken from it (with its non-weight entries).
CHECKPOINT_LAYOUTS = ("open_clip", "hps", "openai", "openai-state-dict")


def save_tiny_clip_checkpoint(path: str | Path, layout: str = "open_clip", seed: int = 0) -> Path:
    """Save a random TINY_CLIP as one checkpoint file in one of CHECKPOINT_LAYOUTS."""
    import open_clip

    if layout not in CHECKPOINT_LAYOUTS:
        choices = ", ".join(CHECKPOINT_LAYOUTS)
        raise ValueError(f"unknown checkpoint layout {layout!r}: choose one of {choices}")
    with seeded_torch(seed):
        model = open_clip.CLIP(**TINY_CLIP, quick_gelu=layout.startswith("openai")).eval()
    path = Path(path)
    if layout == "openai":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; OpenAI's files are it
            torch.jit.save(torch.jit.script(model), str(path))
        return path
    state = model.state_dict()
    if layout == "openai-state-dict":
        state |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77)}
        state["vocab_size"] = torch.tensor(49408)
    torch.save({"state_dict": state} if layout == "hps" else state, path)
    return path


def save_tiny_pickscore(folder: str | Path, seed: int = 0) -> Path:
    """Save a random transformers CLIPModel with a CLIPProcessor (tokenizer + image processor) beside it:
    PickScore's classes and files, a few thousand times smaller."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    with seeded_torch(seed):
        model = CLIPModel(config)
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return Path(folder)


# A tiny ImageReward: BLIP's ViT and BERT at 64-wide heads, in the released checkpoint's names and layout.
TINY_IMAGEREWARD = {"image": 32, "patch": 16, "vision": 64, "text": 64, "layers": 2}
TINY_BERT_WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "star", "of", "photo", "the")


def save_tiny_bert_tokenizer(folder: str | Path) -> Path:
    """A BERT word-piece tokenizer of a few words (what ImageReward's bert-base-uncased is, much smaller)."""
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def tiny_imagereward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of ImageReward.pt's every tensor, named as the released checkpoint names them (BLIP's
    ViT and BERT, unused projections included, and the reward's MLP)."""
    size = TINY_IMAGEREWARD
    d, t, patch = size["vision"], size["text"], size["patch"]
    vocabulary = 5 + len(TINY_BERT_WORDS) + 2  # with BLIP's [DEC] and [ENC]
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return scale * torch.randn(shape, generator=generator)

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + tensor(width, scale=0.1), f"{prefix}.bias": tensor(width, scale=0.1)}

    def linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": tensor(out, inp), f"{prefix}.bias": tensor(out, scale=0.05)}

    v = "blip.visual_encoder"
    state = {
        f"{v}.cls_token": tensor(1, 1, d),
        f"{v}.pos_embed": tensor(1, (size["image"] // patch) ** 2 + 1, d),
    }
    state |= {
        f"{v}.patch_embed.proj.weight": tensor(d, 3, patch, patch),
        f"{v}.patch_embed.proj.bias": tensor(d),
    }
    for i in range(size["layers"]):
        b = f"{v}.blocks.{i}"
        state |= norm(f"{b}.norm1", d) | linear(f"{b}.attn.qkv", 3 * d, d) | linear(f"{b}.attn.proj", d, d)
        state |= norm(f"{b}.norm2", d) | linear(f"{b}.mlp.fc1", 4 * d, d) | linear(f"{b}.mlp.fc2", d, 4 * d)
    state |= norm(f"{v}.norm", d)
    e = "blip.text_encoder"
    state |= {f"{e}.embeddings.word_embeddings.weight": tensor(vocabulary, t)}
    state |= {f"{e}.embeddings.position_embeddings.weight": tensor(40, t)}
    state |= {f"{e}.embeddings.position_ids": torch.arange(40)[None]} | norm(f"{e}.embeddings.LayerNorm", t)
    for i in range(size["layers"]):
        layer = f"{e}.encoder.layer.{i}"
        for attention, width in (("attention", t), ("crossattention", d)):
            state |= linear(f"{layer}.{attention}.self.query", t, t)
            state |= linear(f"{layer}.{attention}.self.key", t, width)
            state |= linear(f"{layer}.{attention}.self.value", t, width)
            state |= linear(f"{layer}.{attention}.output.dense", t, t) | norm(
                f"{layer}.{attention}.output.LayerNorm", t
            )
        state |= linear(f"{layer}.intermediate.dense", 4 * t, t)
        state |= linear(f"{layer}.output.dense", t, 4 * t) | norm(f"{layer}.output.LayerNorm", t)
    state |= linear("blip.vision_proj", 16, d) | linear("blip.text_proj", 16, t)
    widths = (t, 1024, 128, 64, 16, 1)
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state |= linear(f"mlp.layers.{index}", out, inp)
    return state


def save_tiny_imagereward(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint, tokenizer folder) of a tiny ImageReward, as `load_imagereward` takes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_imagereward_state(seed), folder / "ImageReward.pt")
    return folder / "ImageReward.pt", save_tiny_bert_tokenizer(folder / "tokenizer")


def save_tiny_classifier(folder: str | Path, labels: Sequence[str], seed: int = 0) -> Path:
    """Save a random transformers ResNet image classifier, with its image processor, for `load_classifier`."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    with seeded_torch(seed):
        model = ResNetForImageClassification(config)
    model.save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_sdxl_pipeline(
    folder: str | Path,
    sample_size: int = 8,
    seed: int = 0,
    scheduler: SchedulerMixin | None = None,
    force_upcast: bool = True,
) -> Path:
    """Save a random SDXL-architecture pipeline (two text encoders, the second projected; a UNet conditioned
    on their pooled text and on the image size) whose latents are sample_size x sample_size.

    `scheduler` replaces SDXL's Euler scheduler: e.g. `sdxl_turbo_scheduler()`.
    """
    with seeded_torch(seed):
        unet, vae, text_encoder, text_encoder_2 = tiny_sdxl_models(sample_size, force_upcast)
    return save_sdxl_pipeline(folder, unet, vae, text_encoder, text_encoder_2, scheduler or sdxl_scheduler())


def tiny_sdxl_models(
    sample_size: int, force_upcast: bool = True
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's architecture in miniature (the shapes of diffusers' own SDXL tests), from torch's global RNG."""
    widths = (16, 32)  # the two encoders' hidden sizes; SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG)
    time_width = 8  # SDXL: 256 per size/crop number, six numbers
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(widths),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=6 * time_width + widths[1],
        norm_num_groups=8,
    )
    vae = sd_vae(sample_size * 8, scaling_factor=0.13025, force_upcast=force_upcast)  # SDXL VAE's config
    encoders = [
        clip_text_encoder(encoder_class, width, heads=4)
        for encoder_class, width in zip((CLIPTextModel, CLIPTextModelWithProjection), widths, strict=True)
    ]
    return unet, vae, *encoders


def clip_text_encoder(
    encoder_class: type[CLIPTextModel], width: int, heads: int, layers: int = 2, widening: int = 2
) -> CLIPTextModel:
    """A random CLIP text tower (with a projection of its width, for the classes that have one) on CLIP's
    vocabulary and 77 positions, from torch's global RNG."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=widening * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=width,
    )
    return encoder_class(config)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler (its scheduler_config.json): Euler on SD's noise schedule, leading spacing."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


def sdxl_turbo_scheduler() -> EulerAncestralDiscreteScheduler:
    """SDXL-Turbo's scheduler: Euler ancestral on SDXL's noise schedule, trailing timesteps (one step starts
    from t=999)."""
    return EulerAncestralDiscreteScheduler.from_config(sdxl_scheduler().config, timestep_spacing="trailing")


def save_sdxl_pipeline(
    folder: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    scheduler: SchedulerMixin,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save the parts as a StableDiffusionXLPipeline folder (offline CLIP tokenizers, no watermarker)."""
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(folder)
    return Path(folder)


# --- flow-matching transformers (SD3 / SD3.5, FLUX.1) ----------------------------------------------

# The widths of the tiny flow models' text encoders: two CLIPs (SD3; FLUX uses the first) and T5, whose
# width is the transformer's joint attention width. SD3 pads the CLIPs' hidden states, side by side, to it.
FLOW_CLIP_WIDTHS = (8, 16)
FLOW_T5_WIDTH = 32
FLOW_T5_MAX_LENGTH = 16  # tokens a prompt is padded to (SD3: 256; FLUX.1-dev: 512)


# The latents' normalisation of SD3's and of FLUX's VAE (their vae/config.json files).
FLOW_VAE_FACTORS = {
    "SD3": {"shift_factor": 0.0609, "scaling_factor": 1.5305},
    "FLUX": {"shift_factor": 0.1159, "scaling_factor": 0.3611},
}


def flow_vae(sample_size: int, family: str, **size: object) -> AutoencoderKL:
    """A random VAE of SD3's or FLUX's architecture (SD's, with 16 latent channels, no quant convs and a
    shift factor), small by default; `size` as `sd_vae`'s (channels, layers_per_block, norm_num_groups)."""
    return sd_vae(
        sample_size,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **FLOW_VAE_FACTORS[family],
        **size,
    )


def flow_text_encoders(projection: bool) -> tuple[list[CLIPTextModel], T5EncoderModel]:
    """Random CLIP text encoders (with a projection for SD3, the pooled output for FLUX) and a T5 encoder."""
    encoder_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    clips = [clip_text_encoder(encoder_class, width, heads=2) for width in FLOW_CLIP_WIDTHS]
    vocab = len(t5_tokenizer())
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=FLOW_T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, the encoder SD3 and FLUX use
            is_encoder_decoder=False,
        )
    )
    return clips, t5


def flow_scheduler(shift: float = 3.0, dynamic: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler: SD3's (shift 3.0), FLUX.1-dev's (`dynamic`: the shift grows with
    the image's token count, base 0.5 to max 1.15), FLUX.1-schnell's (shift 1.0, none)."""
    if dynamic:
        return FlowMatchEulerDiscreteScheduler(
            shift=shift,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def save_tiny_sd3_pipeline(folder: str | Path, sample_size: int = 8, seed: int = 0) -> Path:
    """Save a random SD3.5-architecture pipeline (MMDiT with dual attention and QK norm; two CLIPs and T5)
    whose latents are 16 x sample_size x sample_size."""
    with seeded_torch(seed):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=FLOW_T5_WIDTH,
            caption_projection_dim=16,
            pooled_projection_dim=sum(FLOW_CLIP_WIDTHS),
            pos_embed_max_size=2 * sample_size,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = flow_vae(sample_size * 8, "SD3")
        (clip, clip_2), t5 = flow_text_encoders(projection=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer(max_length=FLOW_T5_MAX_LENGTH),
        scheduler=flow_scheduler(shift=3.0),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def save_tiny_flux_pipeline(
    folder: str | Path, sample_size: int = 8, guidance_embeds: bool = True, seed: int = 0
) -> Path:
    """Save a random FLUX.1-architecture pipeline (double- and single-stream blocks, rotary positions over
    2x2-packed latents; CLIP's pooled output and T5) whose latents are 16 x sample_size x sample_size.

    `guidance_embeds`: FLUX.1-dev's guidance embedding and resolution-dependent shift; without, schnell's."""
    with seeded_torch(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=FLOW_T5_WIDTH,
            pooled_projection_dim=FLOW_CLIP_WIDTHS[0],
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        vae = flow_vae(sample_size * 8, "FLUX")
        (clip, _), t5 = flow_text_encoders(projection=False)
    pipe = FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(max_length=FLOW_T5_MAX_LENGTH),
        scheduler=flow_scheduler(shift=3.0, dynamic=True) if guidance_embeds else flow_scheduler(shift=1.0),
    )
    pipe.save_pretrained(folder)
    return Path(folder)
