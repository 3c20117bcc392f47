"""DOODL: steer Stable Diffusion with any differentiable model of the final image.

The initial noise is optimized through the whole EDICT sampling chain, with a reversible backward pass
whose memory does not grow with the number of steps.
"""

from doodl.baseline import one_step_guidance
from doodl.edict import EdictSchedule, edict_denoise, edict_invert, edict_schedule, edict_step, edict_unstep
from doodl.gradient import MODES, LatentGrad, latent_grad
from doodl.optimize import (
    DoodlSettings,
    Result,
    Step,
    best_of_samples,
    doodl,
    initial_latents,
    invert_image,
    optimize,
    sample,
)
from doodl.pipeline import LatentDiffusion, ModelLoadError, PromptEmbeds, load_pipeline

__all__ = [
    "MODES",
    "DoodlSettings",
    "EdictSchedule",
    "LatentDiffusion",
    "LatentGrad",
    "ModelLoadError",
    "PromptEmbeds",
    "Result",
    "Step",
    "best_of_samples",
    "doodl",
    "edict_denoise",
    "edict_invert",
    "edict_schedule",
    "edict_step",
    "edict_unstep",
    "initial_latents",
    "invert_image",
    "latent_grad",
    "load_pipeline",
    "one_step_guidance",
    "optimize",
    "sample",
]
