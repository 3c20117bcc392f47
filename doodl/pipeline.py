"""Loading a Stable Diffusion model (SD 1.x, 2.x, SDXL) and the three calls DOODL makes of it.

This is the only module that imports diffusers and transformers for the generator. It turns a hub id
or a local folder into a `LatentDiffusion`: a noise predictor with classifier-free guidance, and the
VAE's encoder and decoder. The sampler only ever sees the noise predictor, a plain callable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from doodl.edict import NoisePredictor  # the type `noise_predictor` returns; benchmarks import it from here

# On the CPU, oneDNN's per-call set-up outweighs the arithmetic of a UNet on tiny latents (the embedded
# model's 8x8: 40 -> 29 ms a call, 72 -> 52 ms with its VJP, on one core); ATen's own kernels do better there.
ONEDNN_MIN_LATENT_SIDE = 16


class ModelLoadError(RuntimeError):
    """A Stable Diffusion model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt as the UNet reads it, rows stacked as [unconditional, conditional]."""

    hidden: torch.Tensor  # (rows, tokens, width): the cross-attention context
    pooled: torch.Tensor | None = None  # (rows, width): SDXL's added text embedding, else None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def row(self, i: int) -> PromptEmbeds:
        pooled = None if self.pooled is None else self.pooled[i : i + 1]
        return PromptEmbeds(self.hidden[i : i + 1], pooled)


@dataclass(frozen=True)
class LatentDiffusion:
    """The parts of a Stable-Diffusion-style pipeline that DOODL needs, frozen for inference.

    SDXL adds a second text encoder (with a projection: its pooled output conditions the UNet beside the
    image size) and reads the penultimate hidden layer of both encoders, concatenated.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL: an empty negative prompt is the zero embedding, not the embedding of "" (its model_index.json).
    force_zeros_for_empty_prompt: bool = False

    @classmethod
    def from_pipeline(
        cls,
        pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
        device: str | torch.device | None = None,
    ) -> LatentDiffusion:
        """A DOODL model of an already loaded diffusers SD or SDXL pipeline (LoRA weights loaded, any
        scheduler): its modules are shared, not copied, and frozen in place (eval, no parameter gradients),
        moved to `device` if given. Sampling uses DDIM coefficients of the pipeline's own noise schedule.

        An SDXL VAE that asks for it (`force_upcast`: it overflows in float16) is moved to float32, as
        diffusers' SDXL pipeline does before decoding; pass an fp16-safe VAE to keep it in float16.
        """
        xl = isinstance(pipe, StableDiffusionXLPipeline)
        needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        missing = [
            name
            for name in needed + ("text_encoder_2", "tokenizer_2") * xl
            if getattr(pipe, name, None) is None
        ]
        if missing:
            raise ModelLoadError(
                f"the pipeline has no {missing[0]}: DOODL needs a text-to-image Stable Diffusion pipeline's "
                "parts (an SDXL refiner, which has no first text encoder, cannot generate from noise)"
            )
        encoders = (pipe.text_encoder, pipe.text_encoder_2) if xl else (pipe.text_encoder,)
        for part in (pipe.unet, pipe.vae, *encoders):
            (part if device is None else part.to(device)).eval().requires_grad_(False)
        if xl and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
            text_encoder_2=pipe.text_encoder_2 if xl else None,
            tokenizer_2=pipe.tokenizer_2 if xl else None,
            force_zeros_for_empty_prompt=xl and bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def xl(self) -> bool:
        """SDXL: two text encoders, the pooled text and the image size as the UNet's added conditions."""
        return self.text_encoder_2 is not None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side the UNet was trained for."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def size_range(self) -> tuple[int, int]:
        """The image sides (px) this model is run at: a quarter to twice its trained side.

        Beyond twice, Stable Diffusion repeats its subject (two heads, tiled scenes); below a quarter its
        deepest UNet level is one or two cells wide and images fall apart.
        """
        return max(self.vae_scale, self.resolution // 4), 2 * self.resolution

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """The (1, C, h, w) latent of an image of height x width px (default: the model's resolution).

        Each side must be a multiple of the VAE's downsampling factor and within `size_range`."""
        height, width = height or self.resolution, width or self.resolution
        low, high = self.size_range
        for name, side in (("height", height), ("width", width)):
            if side % self.vae_scale:
                raise ValueError(
                    f"setting {name}={side} must be a multiple of {self.vae_scale}, the VAE's downsampling "
                    "factor"
                )
            if not low <= side <= high:
                raise ValueError(
                    f"setting {name}={side} is out of this model's range, {low} to {high} px "
                    f"(a quarter to twice the {self.resolution} px it was trained at)"
                )
        return (1, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """Text embeddings stacked as [unconditional, conditional].

        SD: the text encoder's last hidden layer. SDXL, as its pipeline does: both encoders' penultimate
        hidden layers side by side, and the second encoder's projected output as the pooled embedding.
        """
        if not self.xl:
            return PromptEmbeds(self.text_encoder(self.tokens(self.tokenizer, [negative_prompt, prompt]))[0])
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(self.tokens(tokenizer, [negative_prompt, prompt]), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        embeds = PromptEmbeds(torch.cat(hidden, dim=-1), pooled)
        if self.force_zeros_for_empty_prompt and not negative_prompt:
            embeds.hidden[0].zero_()
            embeds.pooled[0].zero_()
        return embeds

    def tokens(self, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
        padded = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return padded.input_ids.to(self.device)

    def added_conditions(self, pooled: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning: the pooled text and (original size, crop top-left, target size), here
        the generated image's size and no crop, as diffusers' SDXL pipeline sets them by default."""
        height, width = (side * self.vae_scale for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        return {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(pooled), -1)}

    def noise_predictor(self, prompt_embeds: PromptEmbeds, guidance_scale: float) -> NoisePredictor:
        """eps(latents, t) with classifier-free guidance, in ONE batched UNet call per evaluation.

        The guided prediction is uncond + guidance_scale * (cond - uncond). At guidance_scale 1 it is the
        conditional prediction and at 0 the unconditional one, so only that half of the batch is run:
        guidance off costs half. Few-step models distilled to sample without guidance (SD-Turbo) want 1;
        note that diffusers' pipelines read any scale <= 1 as "off" (conditional), here 0 ignores the prompt.
        """
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        v_prediction = self.scheduler.config.prediction_type == "v_prediction"
        halves = guidance_halves(prompt_embeds, guidance_scale)

        def eps(latents: torch.Tensor, t: int) -> torch.Tensor:
            n = latents.shape[0]
            unet_in = latents.repeat(len(halves), 1, 1, 1)
            context = torch.cat([half.hidden.expand(n, -1, -1) for half in halves]).to(self.dtype)
            added = None
            if self.xl:
                added = self.added_conditions(
                    torch.cat([half.pooled.expand(n, -1) for half in halves]), latents
                )
            with onednn(max(latents.shape[-2:]) > ONEDNN_MIN_LATENT_SIDE):
                out = self.unet(
                    unet_in.to(self.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added
                ).sample
            out = out.to(latents.dtype)
            if v_prediction:  # SD 2.x predicts v = sqrt(abar) eps - sqrt(1 - abar) x; EDICT needs eps.
                abar = alphas_cumprod[t].to(latents.dtype)
                out = abar.sqrt() * out + (1 - abar).sqrt() * unet_in
            if len(halves) == 1:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return eps

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], differentiable."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        if getattr(config, "latents_mean", None) is not None:  # VAEs with per-channel latent statistics
            mean, std = (
                torch.tensor(v).view(1, -1, 1, 1).to(latents)
                for v in (config.latents_mean, config.latents_std)
            )
            scaled = latents * std / config.scaling_factor + mean
        else:
            scaled = latents / config.scaling_factor
        # At least float32, so that half-precision models give guidance models full-precision pixels.
        images = self.vae.decode(scaled).sample.to(torch.promote_types(self.dtype, torch.float32))
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to latents: the posterior mean, so a real image has one inversion."""
        config = self.vae.config
        mean = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
        if getattr(config, "latents_mean", None) is not None:
            shift, std = (
                torch.tensor(v).view(1, -1, 1, 1).to(mean) for v in (config.latents_mean, config.latents_std)
            )
            return (mean - shift) * config.scaling_factor / std
        return mean * config.scaling_factor


def guidance_halves(prompt_embeds: PromptEmbeds, guidance_scale: float) -> tuple[PromptEmbeds, ...]:
    """The text embeddings the UNet must see: (uncond, cond), or only the one a scale of 0 or 1 keeps."""
    if len(prompt_embeds) != 2:
        raise ValueError(
            f"prompt_embeds must stack [unconditional, conditional] (2 rows), got {len(prompt_embeds)}"
        )
    uncond, cond = prompt_embeds.row(0), prompt_embeds.row(1)
    if guidance_scale == 1:
        return (cond,)
    if guidance_scale == 0:
        return (uncond,)
    return uncond, cond


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Turn oneDNN (mkldnn) on or off for a block; unlike torch's `flags()`, it touches no other setting."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextmanager
def decoder_checkpointing(vae: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """diffusers' gradient checkpointing in the VAE on (or off) for a block, then off again if it was.

    With it, a decode under autograd keeps only the inputs of the decoder's pieces and recomputes each
    piece in the backward pass (`checkpoint_resnets`). The block must hold the backward too: a checkpoint
    recomputed under other flags would not rebuild the tensors its forward saved. A VAE class without
    support is left as it is.
    """
    if not getattr(vae, "_supports_gradient_checkpointing", False):
        yield
        return
    before = any(getattr(m, "gradient_checkpointing", False) for m in vae.modules())
    if enabled:
        vae.enable_gradient_checkpointing(checkpoint_resnets)
    else:
        vae.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if not before:
            vae.disable_gradient_checkpointing()


def checkpoint_resnets(module: torch.nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
    """diffusers' checkpointing function, one resnet at a time in the decoder's up blocks.

    diffusers checkpoints whole blocks: the backward of SD's last up block (three resnets on 128 channels
    at full resolution) then rebuilds all of them at once, more than a UNet VJP (SD 1.5 at 512 px: 3.2 GB
    for the checkpointed decode vs 3.0 GB). An UpDecoderBlock2D is resnets then upsamplers (its forward).
    """
    if type(module) is UpDecoderBlock2D:
        hidden, temb = args
        for resnet in module.resnets:
            hidden = checkpoint(resnet, hidden, temb, use_reentrant=False)
        for upsampler in module.upsamplers or ():
            hidden = checkpoint(upsampler, hidden, use_reentrant=False)
        return hidden
    return checkpoint(module.__call__, *args, use_reentrant=False)


def load_pipeline(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: str | Path | None = None,
) -> LatentDiffusion:
    """Load a Stable-Diffusion-style diffusers model from a local folder or a hub id.

    SD 1.x (epsilon prediction), SD 2.x (v prediction) and SDXL (its model_index.json says which) all
    work, and their few-step distillations (SD-Turbo, SDXL-Turbo). Whatever scheduler the model ships
    with, sampling uses DDIM coefficients built from its noise schedule. `vae` replaces the model's VAE
    by another (a folder or hub id of an AutoencoderKL), e.g. an SDXL VAE fixed to run in float16.
    """
    source = pipeline_source(model)
    pipeline_class = pipeline_class_of(source)
    parts = {} if vae is None else {"vae": load_vae(vae, dtype)}
    if pipeline_class is StableDiffusionPipeline:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    else:
        parts |= {"add_watermarker": False}
    try:
        pipe = pipeline_class.from_pretrained(source, dtype=dtype, **parts)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model '{source}'.{DOWNLOAD_HINT}\n({error_line(error)})"
        ) from error
    return LatentDiffusion.from_pipeline(pipe, device)


DOWNLOAD_HINT = (
    " It is not a local folder, and the hub id is unknown or the hub cannot be reached. Download the model"
    " once (e.g. `huggingface-cli download <id> --local-dir <folder>`) and pass the folder instead."
)


def error_line(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def pipeline_source(model: str | Path) -> str:
    """A local pipeline folder (checked to be one) or a hub id, as a string for diffusers."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return str(model)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{model}' is not a diffusers pipeline folder: it has no model_index.json. "
            "Point to a folder saved with save_pretrained (one holding unet/, vae/, text_encoder/, "
            "tokenizer/, scheduler/)."
        )
    return str(path)


def pipeline_class_of(source: str) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """Which diffusers pipeline loads `source`, from its model_index.json: SDXL's or SD's."""
    try:
        name = DiffusionPipeline.load_config(source).get("_class_name", "")
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model '{source}'.{DOWNLOAD_HINT}\n({error_line(error)})"
        ) from error
    if name.startswith("StableDiffusionXL"):
        return StableDiffusionXLPipeline
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return StableDiffusionPipeline
    raise ModelLoadError(
        f"'{source}' holds a {name or 'pipeline of unknown class'}, not a Stable Diffusion (1.x, 2.x or XL) "
        "pipeline: DOODL needs a UNet with a VAE and CLIP text encoders."
    )


def load_vae(vae: str | Path, dtype: torch.dtype) -> AutoencoderKL:
    """An AutoencoderKL from a folder or hub id: the VAE itself, or a pipeline folder holding vae/."""
    path = Path(str(vae)).expanduser()
    source = str(path) if path.exists() else str(vae)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the VAE '{vae}': give a folder holding an AutoencoderKL's config.json and "
            "weights (or a pipeline folder with vae/), or a hub id such as madebyollin/sdxl-vae-fp16-fix."
            f"\n({error_line(error)})"
        ) from error


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [0, 1], shape (B, 3, H, W), to PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image to a (1, 3, H, W) tensor in [0, 1], resized to size = (width, height)."""
    image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float().contiguous() / 255


@dataclass
class UnetCalls:
    calls: int = 0
    grad_calls: int = 0  # calls made with autograd on, i.e. that a backward pass goes through
    latents: int = 0  # latents evaluated, summed over batches: a cond + uncond batch counts two

    @property
    def passes(self) -> int:
        """Forward calls and the backward passes through them, one each: the UNet work matched compute
        compares, whether a gradient recomputes its forwards or stores them. A backward costs about two
        forwards, so a guided run is still undercounted."""
        return self.calls + self.grad_calls


@contextmanager
def count_unet_calls(unet: torch.nn.Module) -> Iterator[UnetCalls]:
    """Count the UNet's forward calls inside the block."""
    counts = UnetCalls()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        counts.calls += 1
        counts.grad_calls += torch.is_grad_enabled()
        counts.latents += (args[0] if args else kwargs["sample"]).shape[0]

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()
