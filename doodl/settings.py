"""DOODL's settings, the paper's defaults (Sec. 4) and what a run may change, with their checks. Data
alone: how the settings and a model choose the chain is `doodl.chain`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from doodl.gradient import MODES

DECODER_CHECKPOINTING = ("auto", "on", "off")
SAMPLERS = ("auto", "edict", "ddim")
# How a gradient becomes a step, and what keeps the noise Gaussian: `doodl.update.Update`.
STEP_RULES = ("sgd", "nesterov", "adam")
REGULARIZERS = ("renormalize", "norm", "white", "none")
# What only a run from given latents (a photo's) reads: a run from noise is the same whatever they are.
PHOTO_SETTINGS = ("fidelity", "photo_weight", "photo_strength")
# How a run's calls are computed, not what it makes (the same images to float rounding): stored runs made
# either way are alike.
SPEED_SETTINGS = ("compile",)


@dataclass(frozen=True)
class DoodlSettings:
    """Defaults are the paper's (Sec. 4) and the official code's `gen()`. Settings alone: how they choose a
    model's chain, its gradient and what is checkpointed is `doodl.chain`'s."""

    # --- the paper's optimization and sampling ---------------------------------------------------
    steps: int = 50  # DDIM / EDICT steps (paper: 50)
    iterations: int = 50  # optimization steps (official: num_traversal_steps=50)
    learning_rate: float = 1.0  # loss multiplier before clipping (official: grad_scale=1)
    momentum: float = 0.9  # SGD momentum (Adam: its first moment's decay); Nesterov did not help (paper)
    grad_clip: float = 1e-3  # element-wise gradient clip (official: clip_grad_val)
    # Scale each gradient to an RMS element of grad_clip before the rate and the clip, so that the step no
    # longer depends on the loss's scale, which varies by prompt: on the embedded guides 0 to 82 % of the
    # elements exceed the clip (benchmarks/results/steps.md). Off: the paper's raw gradient; on, the
    # embedded model's evaluators scored the same (benchmarks/results/quality-normalized/).
    normalized: bool = False
    perturbation: float = 1e-4  # std of the noise added to the latent each step (official)
    p: float = 0.93  # EDICT mixing weight (paper)
    guidance_scale: float = 7.5  # classifier-free guidance (official: sd_guidance_scale)
    leapfrog: bool = True  # alternate the update order of the pair (official EDICT)
    # The step rule: "sgd", the paper's (element-wise clip, momentum); "nesterov", ReNO's (norm clip,
    # Nesterov momentum); "adam". grad_clip bounds what each is fed per element (`doodl.update.Update`).
    step_rule: str = "sgd"
    # What keeps the noise a likely draw of N(0, I): "renormalize", the paper's (each latent keeps its
    # start's norm); "norm", ReNO's penalty on an unlikely norm, of weight regularizer_weight (ReNO: 0.01);
    # "white", a projection onto white noise's per-channel mean, variance and spectrum; "none".
    regularizer: str = "renormalize"
    regularizer_weight: float = 0.01
    tied: bool = True  # average x_T and y_T into one latent after each step (paper)
    # --- the run: its noise, its size, its chain and gradient, its memory -----------------------------
    # How the gradient is computed: reversible, checkpoint or autograd (a plain chain, which has no exact
    # inverse, takes "reversible" as one of the other two: `doodl.chain.gradient_mode`).
    mode: str = "reversible"
    seed: int = 0
    height: int | None = None  # default: the model's resolution
    width: int | None = None
    precision: torch.dtype = torch.float64  # of the coupling arithmetic (official EDICT: float64)
    # Judge x_0 alone instead of the mean of x_0 and y_0 (official: optimize_first_edict_image_only):
    # half the decoding and scoring. Off by default: the paper judges both latents of the pair.
    first_image_only: bool = False
    # Gradient checkpointing in the VAE decoder: "on", "off", or "auto" (on for large latents, see
    # doodl.chain.LARGE_LATENT_SIDE). Same gradient; one more decoder forward per judged latent.
    decoder_checkpointing: str = "auto"
    # Gradient checkpointing inside the denoiser's VJP (diffusers' own, block by block): each VJP keeps its
    # blocks' inputs instead of their activations and recomputes them, for about one more forward. Where
    # one call's activations are an iteration's peak (a large transformer at a high resolution): SD3.5
    # Medium's iteration with and without it in benchmarks/results/memory-sd3-medium.md.
    denoiser_checkpointing: bool = False
    # Decode, score and back-propagate x_0 and y_0 one at a time: "on", "off" (both in one batch, on the
    # same random views), or "auto": apart from doodl.chain.LARGE_LATENT_SIDE up, where holding both
    # graphs costs most (SD 1.5 at 256 px: 2.86 GB for both, 1.47 GB for one); below, one batch is faster.
    separate_decoding: str = "auto"
    # The chain: "edict"; "ddim", the model's plain chain (DDIM; Euler on a flow model), one call a step
    # (EDICT's make two), what the gradient needs stored on the way forward (`doodl.chain.gradient_mode`):
    # memory grows with the steps, which is small beside a call's for few steps or small latents (the
    # embedded presets); or "auto": the plain chain below doodl.edict.FEW_STEPS steps from noise, where
    # EDICT's coupled chain is no longer the model's own sample (few-step models such as SD-Turbo and
    # FLUX.1-schnell), else EDICT.
    sampler: str = "auto"
    # --- from a photo: what keeps its content ------------------------------------------------------
    # From given latents (`init`, e.g. a photo's EDICT inversion): keep each latent within a trust region
    # around its start, of radius (1 - fidelity) x the start's norm, projected back after every step, so
    # that the image keeps the photo's content. 0: no limit. From noise it has no effect. Default 0.99, with
    # photo_strength 0.4: on 10 photos of the embedded world the scene stayed on 10 (text) and 9 (aesthetic),
    # beauty rose by 0.06 and 0.12; 8 on vocabulary and personalization, whose embedded presets take 0.995
    # (benchmarks/results/photo-defaults/); at 0.97, 5 of the aesthetic tab's stayed; through the whole
    # chain, 4 at any fidelity (python -m benchmarks.photo, benchmarks/results/photo.md).
    fidelity: float = 0.99
    # From given latents: add this weight x the mean squared pixel distance to their unguided image (the
    # photo's EDICT reconstruction) to the loss, so that moving an object costs more than recoloring it.
    # 0: none. From noise it has no effect. Default 0: on the aesthetic tab's photos, 30 kept one scene
    # more of 10 but lowered beauty, 100 and more froze the image (benchmarks/results/photo.md).
    photo_weight: float = 0.0
    # From given latents: the fraction of the chain a photo is inverted through and DOODL optimizes, as
    # img2img's strength (official EDICT editing: init_image_strength=0.8). 1: to noise, the paper's. Less
    # stops at an intermediate timestep, whose latent still holds the photo's layout, so that the guide
    # changes what the last steps decide (colors, contrast, size) rather than where the objects are; and an
    # iteration's chain is that fraction as long. Default 0.4: see fidelity.
    photo_strength: float = 0.4
    # --- from noise -------------------------------------------------------------------------------
    # From noise: start from the best of this many unguided samples by the same loss (the seed's own first,
    # `best_of_samples`), then optimize that sample's seed. 1: the paper's, the seed's own noise. A sample is
    # the chain forward alone, about a third of an iteration. On the embedded model, DOODL from the best
    # of 4 was ahead of DOODL from the seed in the mean on every tab with EDICT's chain
    # (benchmarks/results/edict/quality.md).
    start_samples: int = 1
    # --- how the calls run (last: stored runs' keys follow the fields' order) ------------------------
    # Run the denoiser through torch.compile (`doodl.pipeline.compiled_denoiser`; on CUDA with CUDA graphs
    # and channels_last): the same images to float rounding, faster once the first calls have compiled
    # (minutes). Off: eager, no compile to wait for.
    compile: bool = False

    def __post_init__(self) -> None:
        check = {
            "steps": self.steps >= 1,
            "iterations": self.iterations >= 1,
            "learning_rate": self.learning_rate > 0,
            "momentum": 0 <= self.momentum < 1,
            "regularizer_weight": self.regularizer_weight >= 0,
            "grad_clip": self.grad_clip > 0,
            "perturbation": self.perturbation >= 0,
            "p": 0 < self.p <= 1,
            "guidance_scale": self.guidance_scale >= 0,
            "fidelity": 0 <= self.fidelity <= 1,
            "photo_weight": self.photo_weight >= 0,
            "photo_strength": 0 < self.photo_strength <= 1,
            "start_samples": isinstance(self.start_samples, int) and self.start_samples >= 1,
            # The model's own range is checked against the model: `LatentDiffusion.latent_shape`.
            "height": self.height is None or (isinstance(self.height, int) and self.height > 0),
            "width": self.width is None or (isinstance(self.width, int) and self.width > 0),
        }
        for name, ok in check.items():
            if not ok:
                raise ValueError(f"setting {name}={getattr(self, name)!r} is out of range")
        if self.mode not in MODES:
            raise ValueError(f"unknown gradient mode {self.mode!r}: choose one of {', '.join(MODES)}")
        for name, choices in (
            ("sampler", SAMPLERS),
            ("step_rule", STEP_RULES),
            ("regularizer", REGULARIZERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"setting {name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name in ("decoder_checkpointing", "separate_decoding"):
            if getattr(self, name) not in DECODER_CHECKPOINTING:
                raise ValueError(
                    f"setting {name}={getattr(self, name)!r} is not one of {', '.join(DECODER_CHECKPOINTING)}"
                )

    def changed(self, from_noise: bool = False) -> dict[str, Any]:
        """The settings that differ from the defaults: what keys of stored runs hold, so that a new setting
        at its default leaves them valid, and how the calls run (SPEED_SETTINGS) is not said. `from_noise`:
        without those only a run from a photo reads."""
        skip = (*SPEED_SETTINGS, *(PHOTO_SETTINGS if from_noise else ()))
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default and f.name not in skip
        }

    def samples_to_start(self, from_photo: bool) -> int:
        """How many samples a run picks its start from: a photo's inversion is its own start."""
        return 1 if from_photo else self.start_samples

    def trust_radius(self, start: torch.Tensor) -> float | None:
        """How far (L2) a latent that started at `start` may move; None: no limit."""
        return None if self.fidelity == 0 else (1 - self.fidelity) * float(start.norm())
