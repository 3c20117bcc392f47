"""Flow-matching transformers (SD3 / SD3.5, FLUX.1 dev and schnell) as DOODL generators.

A rectified flow's latent at noise level s is (1 - s) x0 + s noise; the transformer predicts the velocity
v = noise - x0, and its scheduler's Euler step x' = x + (s' - s) v is EDICT's half-step with a = 1 and
b = s' - s (`doodl.edict.flow_schedule`): the coupled chain, its inverse and the reversible gradient run
unchanged. What differs between SD3 and FLUX is how the prompt is encoded and the transformer called,
which each family does with its diffusers pipeline's own pieces.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from doodl.edict import EdictSchedule, NoisePredictor, Timestep, flow_schedule
from doodl.pipeline import (
    LatentDiffusion,
    ModelLoadError,
    PromptEmbeds,
    cached_first,
    guidance_halves,
    timestep_tensor,
)

# EDICT's mixing weight on flow models (DDIM's: the paper's 0.93). From 28 steps the coupled sample is as
# close to plain Euler at any p from 0.8 to 1 (1.1-1.4 %, a quarter of Euler's own error), while the round
# trip is 10-100x tighter at 0.97 than at 0.93 over 50 steps: benchmarks/results/flow_mixing.md.
FLOW_MIX = 0.97

# Prompts whose embeddings a model keeps, so that a run's samples, its baseline and its DOODL iterations
# encode each prompt once, and prompts encoded before `release_text_encoders` stay usable after it.
PROMPT_CACHE = 16


@dataclass(frozen=True)
class FlowTransformer(LatentDiffusion):
    """A flow-matching transformer, its VAE and its flow scheduler; the prompt is encoded by the diffusers
    pipeline's own `encode_prompt`, once per prompt."""

    pipe: DiffusionPipeline  # its text encoders and tokenizers encode prompts
    transformer: torch.nn.Module
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    max_sequence_length: int  # T5 tokens a prompt is padded to, as the pipeline's default
    _prompts: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    gpu_dtype: ClassVar[torch.dtype] = torch.bfloat16  # as their makers run them: float16 overflows
    # The transformer's class, the pipeline's text encoders (those it cannot run without), the default of
    # its `max_sequence_length` and its T5 tokenizer.
    transformer_class: ClassVar[type[torch.nn.Module]]
    text_encoders: ClassVar[tuple[str, ...]] = ()
    required_text_encoders: ClassVar[tuple[str, ...]] = ()
    default_sequence_length: ClassVar[int] = 256
    t5_tokenizer: ClassVar[str] = ""

    @classmethod
    def of_pipeline(cls, pipe: Any, device: str | torch.device | None = None) -> FlowTransformer:
        """The model of a loaded SD3 or FLUX pipeline: its modules shared, frozen, moved to `device`."""
        required = ("transformer", "vae", "scheduler", *cls.required_text_encoders)
        missing = [name for name in required if getattr(pipe, name, None) is None]
        if missing:
            raise ModelLoadError(
                f"the pipeline has no {missing[0]}: DOODL needs a text-to-image {cls.__name__} pipeline's "
                "parts"
            )
        cls.check_transformer(pipe.transformer)
        encoders = [
            getattr(pipe, name) for name in cls.text_encoders if getattr(pipe, name, None) is not None
        ]
        for part in (pipe.transformer, pipe.vae, *encoders):
            (part if device is None else part.to(device)).eval().requires_grad_(False)
        return cls(
            pipe=pipe,
            transformer=pipe.transformer,
            vae=pipe.vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            max_sequence_length=cls.sequence_length(pipe),
        )

    @classmethod
    def published_settings(cls, source: str) -> dict[str, Any]:
        """The makers' steps and guidance for this transformer (`published_for`), and the coupling's mixing
        weight for flows (FLOW_MIX)."""
        try:
            config = cached_first(cls.transformer_class.load_config, source, subfolder="transformer")
        except (OSError, ValueError):
            return {"p": FLOW_MIX}
        return {**cls.published_for(config), "p": FLOW_MIX}

    @classmethod
    def published_for(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def check_transformer(cls, transformer: torch.nn.Module) -> None:
        """Refuse a transformer that takes more than a noisy latent (FLUX Fill's or Control's inputs)."""

    @classmethod
    def sequence_length(cls, pipe: Any) -> int:
        """The pipeline's default prompt length, no longer than its T5 tokenizer takes."""
        tokenizer = getattr(pipe, cls.t5_tokenizer, None)
        longest = getattr(tokenizer, "model_max_length", None) or cls.default_sequence_length
        return min(cls.default_sequence_length, int(longest))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def side_step(self) -> tuple[int, str]:
        return 2 * self.vae_scale, "the VAE's downsampling factor times the transformer's 2x2 patches"

    def schedule(
        self, steps: int, p: float, leapfrog: bool, shape: tuple[int, ...] | None = None
    ) -> EdictSchedule:
        """The flow scheduler's Euler steps, spaced and shifted as the model's pipeline does it for this
        image size (FLUX.1-dev's shift grows with the image's token count)."""
        _, _, height, width = shape or self.latent_shape()
        sigmas, mu = self.spacing(steps, (height // 2) * (width // 2))
        return flow_schedule(self.scheduler, steps, p, leapfrog, sigmas=sigmas, mu=mu)

    def spacing(self, steps: int, tokens: int) -> tuple[list[float] | None, float | None]:
        """(sigmas before the shift, mu): what the pipeline passes the scheduler for an image of `tokens`
        2x2 patches; None: the scheduler's own. SD3's pipeline lets the scheduler space its sigmas, and
        passes a shift only to one that asks for it."""
        return None, self.shift_for(tokens) if self.scheduler.config.use_dynamic_shifting else None

    def shift_for(self, tokens: int) -> float:
        """mu, the resolution-dependent shift of a scheduler with `use_dynamic_shifting`."""
        config = self.scheduler.config
        return calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )

    def clean_coefficients(self, t: Timestep) -> tuple[float, float]:
        """x0 = z - s v at noise level s = t / the training timesteps (alpha 1, sigma s)."""
        return 1.0, float(t) / self.scheduler.config.num_train_timesteps

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """The prompt's embeddings, computed once and kept (the last PROMPT_CACHE prompts)."""
        key = (prompt, negative_prompt)
        with self._lock:
            if key in self._prompts:
                self._prompts.move_to_end(key)
                return self._prompts[key]
        if self.text_encoders_released():
            raise ValueError(
                f"the prompt {prompt!r} was not encoded before the text encoders were released: load the "
                "model again to encode new prompts"
            )
        with torch.no_grad():
            embeds = self.encode_new_prompt(prompt, negative_prompt)
        with self._lock:
            self._prompts[key] = embeds
            while len(self._prompts) > PROMPT_CACHE:
                self._prompts.popitem(last=False)
        return embeds

    @abstractmethod
    def encode_new_prompt(self, prompt: str, negative_prompt: str) -> PromptEmbeds:
        """The embeddings of a prompt not encoded yet, by the pipeline's own `encode_prompt`."""

    def release_text_encoders(self, keep: Sequence[str] = ()) -> None:
        """Encode the prompts `keep`, then free the text encoders (FLUX's and SD3's T5-XXL alone is 9 GB in
        bf16): the prompts encoded stay usable, a new one is refused. The encoders are dropped from the
        pipeline this model shares (`from_pipeline`: the caller's own); call it where no other thread
        encodes a prompt at the same time."""
        for prompt in keep:
            self.encode_prompt(prompt)
        for name in self.text_encoders:
            setattr(self.pipe, name, None)

    def text_encoders_released(self) -> bool:
        return all(getattr(self.pipe, name, None) is None for name in self.required_text_encoders)


@dataclass(frozen=True)
class StableDiffusion3(FlowTransformer):
    """SD3 / SD3.5 (Medium, Large, their Turbo): an MMDiT on 2x2 patches of 16-channel latents, conditioned
    on two CLIPs' and T5's hidden states (side by side, then along the sequence) and on the CLIPs' pooled
    outputs; classifier-free guidance in one batched call, as the UNet's."""

    pipelines: ClassVar[tuple[type[DiffusionPipeline], ...]] = (StableDiffusion3Pipeline,)
    transformer_class: ClassVar[type[torch.nn.Module]] = SD3Transformer2DModel
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # SD3 runs without T5 (its pipeline then reads zeros in T5's place): only the CLIPs are needed.
    required_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    default_sequence_length: ClassVar[int] = 256  # StableDiffusion3Pipeline's max_sequence_length
    t5_tokenizer: ClassVar[str] = "tokenizer_3"

    @classmethod
    def published_for(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The model cards' examples: SD3.5 Medium (dual attention) 40 steps at CFG 4.5, SD3.5 Large (QK
        norm) 28 at 3.5, SD3 Medium 28 at 7.0. SD3.5 Large Turbo shares Large's transformer config: run it
        with its card's 4 steps and no guidance (here --guidance-scale 1, the conditional prediction)."""
        if config.get("dual_attention_layers"):
            return {"steps": 40, "guidance_scale": 4.5}
        if config.get("qk_norm"):
            return {"steps": 28, "guidance_scale": 3.5}
        return {"steps": 28, "guidance_scale": 7.0}

    @property
    def side_step(self) -> tuple[int, str]:
        patch = self.transformer.config.patch_size
        return (
            patch * self.vae_scale,
            f"the VAE's downsampling factor times the transformer's {patch}x{patch} patches",
        )

    @property
    def size_range(self) -> tuple[int, int]:
        """As any model's, and no larger than the transformer's table of patch positions."""
        low, high = super().size_range
        config = self.transformer.config
        return low, min(high, config.pos_embed_max_size * config.patch_size * self.vae_scale)

    def encode_new_prompt(self, prompt: str, negative_prompt: str) -> PromptEmbeds:
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled]))

    def noise_predictor(self, prompt_embeds: PromptEmbeds, guidance_scale: float) -> NoisePredictor:
        """v(latents, t) with classifier-free guidance, in one batched transformer call per evaluation; at
        guidance_scale 1 the conditional prediction alone, at 0 the unconditional one (half the batch)."""
        halves = guidance_halves(prompt_embeds, guidance_scale)

        def velocity(latents: torch.Tensor, t: Timestep) -> torch.Tensor:
            n = latents.shape[0]
            rows = len(halves) * n
            out = self.transformer(
                hidden_states=latents.repeat(len(halves), 1, 1, 1).to(self.dtype),
                timestep=timestep_tensor(t, self.device).to(torch.float32).expand(rows),
                encoder_hidden_states=torch.cat([h.hidden.expand(n, -1, -1) for h in halves]).to(self.dtype),
                pooled_projections=torch.cat([h.pooled.expand(n, -1) for h in halves]).to(self.dtype),
                return_dict=False,
            )[0].to(latents.dtype)
            if len(halves) == 1:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return velocity


@dataclass(frozen=True)
class Flux(FlowTransformer):
    """FLUX.1 dev and schnell: double- and single-stream blocks over 2x2-packed 16-channel latents with rotary
    position ids, conditioned on T5's hidden states and CLIP's pooled output. Guidance-distilled: one call
    per evaluation, the guidance scale given as an embedding (dev) or not at all (schnell)."""

    pipelines: ClassVar[tuple[type[DiffusionPipeline], ...]] = (FluxPipeline,)
    classifier_free: ClassVar[bool] = False
    transformer_class: ClassVar[type[torch.nn.Module]] = FluxTransformer2DModel
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    required_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    default_sequence_length: ClassVar[int] = 512  # FluxPipeline's max_sequence_length
    t5_tokenizer: ClassVar[str] = "tokenizer_2"

    @classmethod
    def published_for(cls, config: dict[str, Any]) -> dict[str, Any]:
        """dev: FluxPipeline's defaults, 28 steps at guidance 3.5 (the model card's example takes 50 steps);
        schnell (no guidance embedding): its card's 4 steps, no guidance (sampled by plain Euler below
        doodl.edict.FEW_STEPS, as any few-step model)."""
        if config.get("guidance_embeds"):
            return {"steps": 28, "guidance_scale": 3.5}
        return {"steps": 4, "guidance_scale": 1.0}

    @classmethod
    def check_transformer(cls, transformer: torch.nn.Module) -> None:
        if transformer.config.in_channels != 64:
            raise ModelLoadError(
                f"this FLUX transformer takes {transformer.config.in_channels} input features, not a packed "
                "latent's 64: it is a Fill, Control or other conditioned variant, which DOODL cannot sample "
                "from noise alone"
            )

    @classmethod
    def sequence_length(cls, pipe: Any) -> int:
        # FLUX.1-schnell's model card samples with max_sequence_length=256; dev with the pipeline's 512.
        longest = super().sequence_length(pipe)
        return longest if pipe.transformer.config.guidance_embeds else min(longest, 256)

    @property
    def resolution(self) -> int:
        # The transformer has no trained size in its config; the VAE's says it (1024 for FLUX.1).
        return self.vae.config.sample_size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev: the guidance scale is an input of the transformer; schnell takes none."""
        return bool(self.transformer.config.guidance_embeds)

    def spacing(self, steps: int, tokens: int) -> tuple[list[float] | None, float | None]:
        """FluxPipeline's: sigmas evenly spaced from 1 to 1/steps, and mu for its packed token count."""
        sigmas = None if self.scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        return (None if sigmas is None else sigmas.tolist()), self.shift_for(tokens)

    def encode_new_prompt(self, prompt: str, negative_prompt: str) -> PromptEmbeds:
        """The conditional row alone: a guidance-distilled model makes no unconditional call. A negative
        prompt would need FLUX's "true CFG" (two calls a step), which is not offered."""
        if negative_prompt:
            raise ValueError("FLUX.1 is guidance-distilled: it takes no negative prompt here")
        hidden, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden, pooled)

    def noise_predictor(self, prompt_embeds: PromptEmbeds, guidance_scale: float) -> NoisePredictor:
        """v(latents, t): the unpacked latents are packed into 2x2 patches with their position ids, the
        transformer called once, its output unpacked. `guidance_scale` is dev's guidance embedding."""
        cond = prompt_embeds.row(len(prompt_embeds) - 1)
        hidden, pooled = cond.hidden.to(self.dtype), cond.pooled.to(self.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32)
        image_ids: dict[tuple[int, int], torch.Tensor] = {}  # made on the host: once per size, not per call

        def velocity(latents: torch.Tensor, t: Timestep) -> torch.Tensor:
            n, channels, height, width = latents.shape
            packed = FluxPipeline._pack_latents(latents.to(self.dtype), n, channels, height, width)
            if (height, width) not in image_ids:
                image_ids[height, width] = FluxPipeline._prepare_latent_image_ids(
                    n, height // 2, width // 2, self.device, self.dtype
                )
            out = self.transformer(
                hidden_states=packed,
                timestep=timestep_tensor(t, self.device).to(self.dtype).expand(n) / 1000,
                guidance=guidance.expand(n) if self.guidance_distilled else None,
                pooled_projections=pooled.expand(n, -1),
                encoder_hidden_states=hidden.expand(n, -1, -1),
                txt_ids=text_ids,
                img_ids=image_ids[height, width],
                return_dict=False,
            )[0]
            pixels = (height * self.vae_scale, width * self.vae_scale)
            return FluxPipeline._unpack_latents(out, *pixels, self.vae_scale).to(latents.dtype)

        return velocity
