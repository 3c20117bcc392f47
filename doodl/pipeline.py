"""Loading a generator and the calls DOODL makes of it.

`load_pipeline` turns a hub id or a local folder into a `LatentDiffusion`: a predictor of the model's output
at a latent (with classifier-free guidance where the model takes it), the coefficients of its sampling
chain, and the VAE's encoder and decoder. Two families: Stable Diffusion's UNet (1.x, 2.x, XL: DDIM
coefficients, here) and the flow-matching transformers (SD3 / SD3.5, FLUX.1: Euler coefficients,
`doodl.flow`). The sampler only ever sees the predictor, a plain callable, and the coefficients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

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

from doodl.edict import (  # NoisePredictor: the type `noise_predictor` returns; benchmarks import it here
    EdictSchedule,
    NoisePredictor,
    Timestep,
    edict_schedule,
)


class ModelLoadError(RuntimeError):
    """A generator could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt as the model reads it, rows stacked as [unconditional, conditional] (a guidance-distilled
    model such as FLUX.1 reads the conditional row alone)."""

    hidden: torch.Tensor  # (rows, tokens, width): the cross-attention (or joint attention) context
    pooled: torch.Tensor | None = None  # (rows, width): the pooled text of SDXL, SD3 and FLUX, else None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def row(self, i: int) -> PromptEmbeds:
        pooled = None if self.pooled is None else self.pooled[i : i + 1]
        return PromptEmbeds(self.hidden[i : i + 1], pooled)


class LatentDiffusion(ABC):
    """What DOODL needs of a latent generator, whatever its family: the model's output at a latent as a
    plain callable (`noise_predictor`), the coefficients of its chain (`schedule`), the VAE both ways, and
    the image sizes it takes.

    A family says which diffusers pipelines it takes (`pipelines`): `StableDiffusion` (here) and the flow
    transformers of `doodl.flow`. `from_pipeline` and `load_pipeline` pick the family of a pipeline.
    """

    pipelines: ClassVar[tuple[type[DiffusionPipeline], ...]] = ()
    # Whether the guidance scale is classifier-free guidance's (0: the unconditional prediction); FLUX.1
    # takes it as an input of a guidance-distilled model instead.
    classifier_free: ClassVar[bool] = True
    # The dtype it runs in on a GPU unless told another (`load_pipeline`).
    gpu_dtype: ClassVar[torch.dtype] = torch.float16
    vae: AutoencoderKL

    @classmethod
    def from_pipeline(
        cls, pipe: DiffusionPipeline, device: str | torch.device | None = None
    ) -> LatentDiffusion:
        """A DOODL model of an already loaded diffusers pipeline, of the family that takes its class: its
        modules are shared, not copied, and frozen in place (eval, no parameter gradients), moved to
        `device` if given."""
        return family_of(type(pipe)).of_pipeline(pipe, device)

    @classmethod
    @abstractmethod
    def of_pipeline(cls, pipe: Any, device: str | torch.device | None = None) -> LatentDiffusion:
        """This family's model of `pipe` (see `from_pipeline`)."""

    @classmethod
    def load_options(cls, pipeline_class: type[DiffusionPipeline]) -> dict[str, Any]:
        """What `from_pretrained` is told besides the folder and dtype (parts left out, for instance)."""
        return {}

    @classmethod
    def published_settings(cls, source: str) -> dict[str, Any]:
        """The sampling settings the model's makers publish for the model at `source` (DoodlSettings
        fields), read from its configs without loading weights; {}: the paper's."""
        return {}

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The network the chain calls (UNet or transformer): what `count_unet_calls` counts."""

    @cached_property
    def compiled(self) -> LatentDiffusion:
        """This model with its denoiser compiled (`compiled_denoiser`): what `DoodlSettings.compile` samples
        with. Made once per model, on first use."""
        return self.with_denoiser(compiled_denoiser(self.denoiser))

    def with_denoiser(self, denoiser: torch.nn.Module) -> LatentDiffusion:
        """This model calling `denoiser` (a compiled one) instead of its own, its other parts shared (each
        family is a dataclass, one field of which holds the denoiser)."""
        name = next(f.name for f in fields(self) if getattr(self, f.name) is self.denoiser)
        return replace(self, **{name: denoiser})

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side the model was trained for: its denoiser's sample size, in pixels."""
        return self.denoiser.config.sample_size * self.vae_scale

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the chain runs on (and a seed draws)."""
        return self.denoiser.config.in_channels

    @property
    def side_step(self) -> tuple[int, str]:
        """(n, why): an image side must be a multiple of n px."""
        return self.vae_scale, "the VAE's downsampling factor"

    @property
    def size_range(self) -> tuple[int, int]:
        """The image sides (px) this model is run at: a quarter to twice its trained side.

        Beyond twice, Stable Diffusion repeats its subject (two heads, tiled scenes); below a quarter its
        deepest UNet level is one or two cells wide and images fall apart.
        """
        return max(self.side_step[0], self.resolution // 4), 2 * self.resolution

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """The (1, C, h, w) latent of an image of height x width px (default: the model's resolution).

        Each side must be a multiple of `side_step` and within `size_range`."""
        height, width = height or self.resolution, width or self.resolution
        low, high = self.size_range
        step, why = self.side_step
        for name, side in (("height", height), ("width", width)):
            if side % step:
                raise ValueError(f"setting {name}={side} must be a multiple of {step}, {why}")
            if not low <= side <= high:
                raise ValueError(
                    f"setting {name}={side} is out of this model's range, {low} to {high} px "
                    f"(a quarter to twice the {self.resolution} px it was trained at)"
                )
        return (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    @abstractmethod
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """A prompt's embeddings, as `noise_predictor` takes them."""

    def release_text_encoders(self, keep: Sequence[str] = ()) -> None:
        """Free what only encodes prompts once the prompts `keep` are encoded (SD3's and FLUX's T5-XXL: 9 GB
        in bf16); a model whose text encoders are small keeps them, and encodes nothing ahead."""
        return None

    @abstractmethod
    def noise_predictor(self, prompt_embeds: PromptEmbeds, guidance_scale: float) -> NoisePredictor:
        """f(latents, t): the model's guided output at a latent (noise, or a flow's velocity), in ONE
        batched call of the denoiser per evaluation."""

    @abstractmethod
    def schedule(
        self, steps: int, p: float, leapfrog: bool, shape: tuple[int, ...] | None = None
    ) -> EdictSchedule:
        """The chain of `steps` steps for latents of `shape` (default: the model's resolution): timesteps and
        the coefficients (a, b) of each step `x' = a x + b f(x, t)`, with EDICT's mixing weight."""

    @abstractmethod
    def clean_coefficients(self, t: Timestep) -> tuple[float, float]:
        """(alpha, sigma) of the clean-image estimate at timestep t: x0 = (z - sigma f(z, t)) / alpha, and
        sigma is also the weight of a loss gradient folded into f (one-step guidance)."""

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
        else:  # SD3's and FLUX's VAEs shift their latents too
            scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0)
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
        return (mean - (getattr(config, "shift_factor", None) or 0)) * config.scaling_factor


def families() -> list[type[LatentDiffusion]]:
    """Every family of generators: the subclasses of LatentDiffusion that take some pipeline class. A family
    is one once its module is imported: the package's `__init__` imports them all (`doodl.flow`'s too),
    and every import of a doodl module runs it first."""
    found, todo = [], list(LatentDiffusion.__subclasses__())
    while todo:
        family = todo.pop(0)
        todo += family.__subclasses__()
        if family.pipelines:
            found.append(family)
    return found


def family_of(pipeline_class: type) -> type[LatentDiffusion]:
    """The family that takes pipelines of this class, or of a class named like one of its pipelines
    (`pipeline_named`: a FLUX img2img pipeline holds a FluxPipeline's parts). Any other object is taken as
    Stable Diffusion's parts (a UNet, a VAE, CLIP encoders), which its own checks then name if one is
    missing."""
    named = pipeline_named(pipeline_class.__name__)
    for family in families():
        if issubclass(pipeline_class, family.pipelines) or (named is not None and named in family.pipelines):
            return family
    return StableDiffusion


@dataclass(frozen=True)
class StableDiffusion(LatentDiffusion):
    """Stable Diffusion's UNet family (1.x, 2.x, XL and their few-step distillations), sampled with DDIM
    coefficients of the model's own noise schedule, whatever scheduler it ships.

    SDXL adds a second text encoder (with a projection: its pooled output conditions the UNet beside the
    image size) and reads the penultimate hidden layer of both encoders, concatenated.
    """

    pipelines: ClassVar[tuple[type[DiffusionPipeline], ...]] = (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

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
    def of_pipeline(
        cls,
        pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
        device: str | torch.device | None = None,
    ) -> StableDiffusion:
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

    @classmethod
    def load_options(cls, pipeline_class: type[DiffusionPipeline]) -> dict[str, Any]:
        if issubclass(pipeline_class, StableDiffusionXLPipeline):
            return {"add_watermarker": False}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet

    @property
    def xl(self) -> bool:
        """SDXL: two text encoders, the pooled text and the image size as the UNet's added conditions."""
        return self.text_encoder_2 is not None

    def schedule(
        self, steps: int, p: float, leapfrog: bool, shape: tuple[int, ...] | None = None
    ) -> EdictSchedule:
        """DDIM's coefficients of the model's noise schedule (the same at every image size)."""
        return edict_schedule(self.scheduler, steps, p, leapfrog)

    def clean_coefficients(self, t: Timestep) -> tuple[float, float]:
        abar = self.scheduler.alphas_cumprod.double()[int(t)]
        return float(abar.sqrt()), float((1 - abar).sqrt())

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
        halves = guidance_halves(prompt_embeds, guidance_scale)
        device, dtype = self.device, self.dtype  # once: each walks the UNet's parameters
        # Indexed on the device by the timestep tensor: a host index would copy to the device at every call.
        alphas_cumprod = None
        if self.scheduler.config.prediction_type == "v_prediction":
            alphas_cumprod = self.scheduler.alphas_cumprod.to(device, torch.float64)
        # The context and SDXL's added conditions of each batch size (and latent size), made at the first
        # call: SDXL's image-size ids are a host-to-device copy.
        contexts: dict[int, torch.Tensor] = {}
        added: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

        def context_of(n: int) -> torch.Tensor:
            if n not in contexts:
                contexts[n] = torch.cat([half.hidden.expand(n, -1, -1) for half in halves]).to(dtype)
            return contexts[n]

        def added_of(latents: torch.Tensor) -> dict[str, torch.Tensor] | None:
            if not self.xl:
                return None
            n, shape = latents.shape[0], tuple(latents.shape)
            if shape not in added:
                pooled = torch.cat([half.pooled.expand(n, -1) for half in halves])
                added[shape] = self.added_conditions(pooled, latents)
            return added[shape]

        def eps(latents: torch.Tensor, t: Timestep) -> torch.Tensor:
            t = timestep_tensor(t, device)
            unet_in = latents.repeat(len(halves), 1, 1, 1)
            out = self.unet(
                unet_in.to(dtype),
                t,
                encoder_hidden_states=context_of(latents.shape[0]),
                added_cond_kwargs=added_of(latents),
            ).sample
            out = out.to(latents.dtype)
            if alphas_cumprod is not None:  # SD 2.x predicts v = sqrt(abar) eps - sqrt(1 - abar) x: eps.
                abar = alphas_cumprod.index_select(0, t.reshape(1)).to(latents.dtype)
                out = abar.sqrt() * out + (1 - abar).sqrt() * unet_in
            if len(halves) == 1:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return eps


def timestep_tensor(t: Timestep, device: torch.device) -> torch.Tensor:
    """A timestep as the denoiser takes it: the schedule's device tensor (`EdictSchedule.on`) as it is, a
    number as a tensor (a compiled denoiser would otherwise make a graph per timestep)."""
    return t if isinstance(t, torch.Tensor) else torch.tensor(t, device=device)


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
def gradient_checkpointing(
    model: torch.nn.Module, enabled: bool, function: Callable[..., torch.Tensor] | None = None
) -> Iterator[None]:
    """diffusers' gradient checkpointing in a model on (or off) for a block, then off again if it was.

    With it, a call under autograd keeps only the inputs of the model's blocks and recomputes each block
    in the backward pass (with `function`, else diffusers' own). The block must hold the backward too: a
    checkpoint recomputed under other flags would not rebuild the tensors its forward saved. A model class
    without support is left as it is.
    """
    if not getattr(model, "_supports_gradient_checkpointing", False):
        yield
        return
    before = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if enabled:
        model.enable_gradient_checkpointing(function)
    else:
        model.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if not before:
            model.disable_gradient_checkpointing()


def compiled_denoiser(denoiser: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """`denoiser` through torch.compile, each call one captured graph: shapes static (another image size
    compiles anew), its hooks (`count_unet_calls`) run as before. On CUDA with inductor, replayed as CUDA
    graphs, which launch a call's hundreds of kernels at once, and its weights in place as channels_last,
    the layout the GPU's convolutions prefer. The forward and its backward (the VJPs of the gradient) are
    compiled alike; the first calls pay the compile (`backend`: torch.compile's, e.g. "aot_eager" to
    check the capture without inductor's minutes of code generation on a CPU)."""
    cuda = denoiser.device.type == "cuda"
    if cuda:
        denoiser.to(memory_format=torch.channels_last)
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    return torch.compile(denoiser, dynamic=False, backend=backend, mode=mode)


def decoder_checkpointing(vae: torch.nn.Module, enabled: bool) -> AbstractContextManager[None]:
    """Gradient checkpointing in the VAE for a block, one decoder resnet at a time (`checkpoint_resnets`)."""
    return gradient_checkpointing(vae, enabled, checkpoint_resnets)


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
    dtype: torch.dtype | None = None,
    vae: str | Path | None = None,
) -> LatentDiffusion:
    """Load a generator from a local diffusers folder or a hub id; its model_index.json says which.

    Stable Diffusion 1.x (epsilon prediction), 2.x (v prediction) and XL, and their few-step distillations
    (SD-Turbo, SDXL-Turbo): sampled with DDIM coefficients of their noise schedule, whatever scheduler they
    ship. SD3 / SD3.5 and FLUX.1 (dev, schnell): sampled with their flow scheduler's Euler steps
    (`doodl.flow`). `vae` replaces the model's VAE by another (a folder or hub id of an AutoencoderKL),
    e.g. an SDXL VAE fixed to run in float16. `dtype` defaults to float32 on the CPU and to the family's
    `gpu_dtype` on a GPU: float16 for Stable Diffusion, bfloat16 for SD3 and FLUX (which overflow in float16).
    """
    source = pipeline_source(model)
    index = pipeline_index(source)
    pipeline_class = pipeline_class_of(source, index)
    family = family_of(pipeline_class)
    if dtype is None:
        dtype = family.gpu_dtype if torch.device(device).type == "cuda" else torch.float32
    parts = absent_parts(index) | family.load_options(pipeline_class)
    parts |= {} if vae is None else {"vae": load_vae(vae, dtype)}
    try:
        pipe = pipeline_class.from_pretrained(source, dtype=dtype, **parts)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the model '{source}'.{DOWNLOAD_HINT}\n({error_line(error)})"
        ) from error
    return family.of_pipeline(pipe, device)


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
            "Point to a folder saved with save_pretrained (one holding model_index.json, vae/, the text "
            "encoders and unet/ or transformer/)."
        )
    return str(path)


def published_settings(model: str | Path) -> dict[str, Any]:
    """The sampling settings a model's makers publish (steps, guidance), as DoodlSettings fields: {} for
    Stable Diffusion (the paper's settings are SD's), and {} when the model's configs cannot be read (a
    hub id offline; loading it will then say why)."""
    try:
        source = pipeline_source(model)
        return family_of(pipeline_class_of(source, pipeline_index(source))).published_settings(source)
    except ModelLoadError:
        return {}


def pipeline_index(source: str) -> dict[str, Any]:
    """The pipeline's model_index.json: its class and the class of each part; from the hub's cache when it
    is there, so that a cached model needs no network."""
    try:
        return cached_first(DiffusionPipeline.load_config, source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the model '{source}'.{DOWNLOAD_HINT}\n({error_line(error)})"
        ) from error


def cached_first(load: Callable[..., Any], source: str, **where: Any) -> dict[str, Any]:
    """A config as diffusers' `load_config` reads it: from the hub's cache when it is there (no network
    for a cached model), else from `source` itself (a folder, or the hub for an id)."""
    try:
        return dict(load(source, local_files_only=True, **where))
    except (OSError, ValueError):
        return dict(load(source, **where))


def absent_parts(index: dict[str, Any]) -> dict[str, None]:
    """The parts a model_index.json lists as absent ([null, null]: SD3 saved without T5, say), which
    diffusers' `from_pretrained` wants told, as None, rather than leaves out."""
    return {name: None for name, value in index.items() if value == [None, None]}


def pipeline_class_of(source: str, index: dict[str, Any]) -> type[DiffusionPipeline]:
    """Which diffusers pipeline loads `source`, from the class its model_index.json names
    (`pipeline_named`)."""
    name = index.get("_class_name", "")
    pipeline = pipeline_named(name)
    if pipeline is None:
        raise ModelLoadError(
            f"'{source}' holds a {name or 'pipeline of unknown class'}, not a pipeline DOODL runs: Stable "
            "Diffusion (1.x, 2.x, XL), SD3 / SD3.5 or FLUX.1."
        )
    return pipeline


def pipeline_named(name: str) -> type[DiffusionPipeline] | None:
    """The pipeline of a family whose name is the longest start of `name` ("StableDiffusionXLImg2ImgPipeline":
    SDXL's; a FLUX img2img folder holds the parts of a FluxPipeline); None: no family's."""
    known = [pipeline for family in families() for pipeline in family.pipelines]
    matching = [p for p in known if name.startswith(p.__name__.removesuffix("Pipeline"))]
    return max(matching, key=lambda p: len(p.__name__)) if matching else None


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
    """Count the denoiser's forward calls inside the block (a UNet's, or a flow transformer's: the unit
    of matched compute whatever the family)."""
    counts = UnetCalls()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        counts.calls += 1
        counts.grad_calls += torch.is_grad_enabled()
        counts.latents += (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0]

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()
