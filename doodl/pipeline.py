"""Loading a Stable Diffusion model and the three calls DOODL makes of it.

This is the only module that imports diffusers and transformers for the generator. It turns a hub id
or a local folder into a `LatentDiffusion`: a noise predictor with classifier-free guidance, and the
VAE's encoder and decoder. The sampler only ever sees the noise predictor, a plain callable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from doodl.edict import NoisePredictor  # the type `noise_predictor` returns; benchmarks import it from here

# On the CPU, oneDNN's per-call set-up outweighs the arithmetic of a UNet on tiny latents (the embedded
# model's 8x8: 40 -> 29 ms a call, 72 -> 52 ms with its VJP, on one core); ATen's own kernels do better there.
ONEDNN_MIN_LATENT_SIDE = 16


class ModelLoadError(RuntimeError):
    """A Stable Diffusion model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LatentDiffusion:
    """The parts of a Stable-Diffusion-style pipeline that DOODL needs, frozen for inference."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @classmethod
    def from_pipeline(
        cls, pipe: StableDiffusionPipeline, device: str | torch.device | None = None
    ) -> LatentDiffusion:
        """A DOODL model of an already loaded diffusers Stable Diffusion pipeline (LoRA weights loaded, any
        scheduler): its modules are shared, not copied, and frozen in place (eval, no parameter gradients),
        moved to `device` if given. Sampling uses DDIM coefficients of the pipeline's own noise schedule."""
        missing = [
            name
            for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
            if getattr(pipe, name, None) is None
        ]
        if missing:
            raise ModelLoadError(
                f"the pipeline has no {missing[0]}: DOODL needs a Stable Diffusion pipeline's parts"
            )
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            (part if device is None else part.to(device)).eval().requires_grad_(False)
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

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
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> torch.Tensor:
        """Text embeddings stacked as [unconditional, conditional], shape (2, tokens, width)."""
        tokens = self.tokenizer(
            [negative_prompt, prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(tokens)[0].to(self.dtype)

    def noise_predictor(self, prompt_embeds: torch.Tensor, guidance_scale: float) -> NoisePredictor:
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
            context = torch.cat([half.expand(n, -1, -1) for half in halves])
            with onednn(max(latents.shape[-2:]) > ONEDNN_MIN_LATENT_SIDE):
                out = self.unet(unet_in.to(self.dtype), t, encoder_hidden_states=context).sample
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
        scaled = latents.to(self.dtype) / self.vae.config.scaling_factor
        # At least float32, so that half-precision models give guidance models full-precision pixels.
        images = self.vae.decode(scaled).sample.to(torch.promote_types(self.dtype, torch.float32))
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to latents: the posterior mean, so a real image has one inversion."""
        moments = self.vae.encode((images * 2 - 1).to(self.device, self.dtype)).latent_dist
        return moments.mean * self.vae.config.scaling_factor


def guidance_halves(prompt_embeds: torch.Tensor, guidance_scale: float) -> tuple[torch.Tensor, ...]:
    """The text embeddings the UNet must see: (uncond, cond), or only the one a scale of 0 or 1 keeps."""
    if prompt_embeds.shape[0] != 2:
        raise ValueError(
            f"prompt_embeds must stack [unconditional, conditional] (2 rows), got {prompt_embeds.shape[0]}"
        )
    uncond, cond = prompt_embeds.chunk(2)
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
    model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LatentDiffusion:
    """Load a Stable-Diffusion-style diffusers model from a local folder or a hub id.

    SD 1.x (epsilon prediction) and SD 2.x (v prediction) both work. Whatever scheduler the model
    ships with, sampling uses DDIM coefficients built from its noise schedule.
    """
    model = str(model)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"'{model}' is not a diffusers pipeline folder: it has no model_index.json. "
                "Point to a folder saved with save_pretrained (one holding unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/)."
            )
        pipeline_class = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        if "StableDiffusion" not in pipeline_class:
            raise ModelLoadError(f"'{model}' holds a {pipeline_class}, not a Stable Diffusion pipeline.")
        model = str(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the Stable Diffusion model '{model}': it is not a local folder, and the hub "
            "id is unknown or the hub cannot be reached. Download the model once (e.g. "
            "`huggingface-cli download <id> --local-dir <folder>`) and pass the folder instead."
            f"\n({type(error).__name__}: {error})"
        ) from error
    return LatentDiffusion.from_pipeline(pipe, device)


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
