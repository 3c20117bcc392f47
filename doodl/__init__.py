"""DOODL: steer a text-to-image model with any differentiable model of the final image.

The initial noise is optimized through the whole EDICT sampling chain, with a reversible backward pass
whose memory does not grow with the number of steps: Stable Diffusion's UNets (1.x, 2.x, XL) and the
flow-matching transformers (SD3 / SD3.5, FLUX.1).
"""

from doodl.baseline import one_step_guidance
from doodl.edict import (
    EdictSchedule,
    edict_denoise,
    edict_invert,
    edict_schedule,
    edict_step,
    edict_unstep,
    flow_schedule,
)
from doodl.flow import FlowTransformer, Flux, StableDiffusion3  # importing a family makes it loadable
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
from doodl.pipeline import LatentDiffusion, ModelLoadError, PromptEmbeds, StableDiffusion, load_pipeline

__all__ = [
    "MODES",
    "DoodlSettings",
    "EdictSchedule",
    "FlowTransformer",
    "Flux",
    "LatentDiffusion",
    "LatentGrad",
    "ModelLoadError",
    "PromptEmbeds",
    "Result",
    "StableDiffusion",
    "StableDiffusion3",
    "Step",
    "best_of_samples",
    "doodl",
    "edict_denoise",
    "edict_invert",
    "edict_schedule",
    "edict_step",
    "edict_unstep",
    "flow_schedule",
    "initial_latents",
    "invert_image",
    "latent_grad",
    "load_pipeline",
    "one_step_guidance",
    "optimize",
    "sample",
]
