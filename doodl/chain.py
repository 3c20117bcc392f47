"""How a run's chain is chosen: from the settings and the model, the steps (EDICT's coupled chain, or the
model's plain one), their schedule, how the gradient is taken and what is checkpointed. Pure functions of
(settings, model): the one place where a new family of models or a new chain plugs in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from doodl.edict import (
    FEW_STEPS,
    EdictSchedule,
    NoisePredictor,
    Pair,
    ddim_denoise,
    ddim_step,
    edict_denoise,
    edict_step,
)
from doodl.gradient import ChainStep
from doodl.pipeline import LatentDiffusion, decoder_checkpointing, gradient_checkpointing
from doodl.settings import DoodlSettings

# denoise(eps, x_T, y_T, schedule) -> (x_0, y_0): `edict_denoise`, or `ddim_denoise` for few-step chains.
ChainDenoise = Callable[[NoisePredictor, torch.Tensor, torch.Tensor, EdictSchedule], Pair]

# "auto" checkpoints the VAE decoder from this latent side up (256 px in SD). Measured with SD 1.5's VAE
# and UNet in float32 (python -m benchmarks.memory --arch sd15): decoding one latent with its backward
# grows memory more than a UNet VJP from 32x32 latents on (1.47 GB vs 0.79 GB; 5.82 vs 3.02 GB at 64x64;
# checkpointed: 0.58 GB at 32x32), while at the embedded model's 8x8 the decoder is small and
# checkpointing would only add a forward. From the same side up, a DDIM chain's gradient stores each step's
# input rather than its whole graph (`gradient_mode`).
LARGE_LATENT_SIDE = 32


@dataclass(frozen=True)
class Chain:
    """The sampling chain of a run and how its gradient is taken, as `chain_of` decides."""

    step: ChainStep
    denoise: ChainDenoise
    mode: str  # the gradient mode of `latent_grad`
    few_steps: bool  # the plain chain: the pair carries one sample, x_0 = y_0


def schedule_of(settings: DoodlSettings, model: LatentDiffusion, from_photo: bool = False) -> EdictSchedule:
    """The chain's steps for the settings' image size, their timesteps on the model's device; from a photo,
    the last `photo_strength` of them (at least one)."""
    shape = model.latent_shape(settings.height, settings.width)
    schedule = model.schedule(settings.steps, settings.p, settings.leapfrog, shape).on(model.device)
    if not from_photo:
        return schedule
    return schedule.last(max(1, round(settings.photo_strength * settings.steps)))


def plain_chain(settings: DoodlSettings, from_photo: bool = False) -> bool:
    """Whether the chain is the model's plain one (DDIM; Euler on a flow). A photo's latents stay with
    EDICT, whatever the sampler: they are EDICT's inversion of it, which only EDICT's chain regenerates."""
    if from_photo:
        return False
    if settings.sampler != "auto":
        return settings.sampler == "ddim"
    return settings.steps < FEW_STEPS


def chain_of(settings: DoodlSettings, model: LatentDiffusion, from_photo: bool = False) -> Chain:
    """The chain the settings sample the model with, and the gradient mode it takes."""
    if not plain_chain(settings, from_photo):
        return Chain(edict_step, edict_denoise, settings.mode, few_steps=False)
    return Chain(ddim_step, ddim_denoise, gradient_mode(settings, model), few_steps=True)


def gradient_mode(settings: DoodlSettings, model: LatentDiffusion) -> str:
    """A plain chain cannot be run backwards exactly, so "reversible" stores instead of rebuilding: each
    step's input (checkpoint) on large latents, where a call's activations are dear; the whole graph
    (autograd) on small ones, where they are not and it saves recomputing every step's forward, a quarter
    of an iteration on the embedded model (python -m benchmarks.cost --only-default-runs --mode
    checkpoint). Both give the same gradient, bit for bit on the CPU."""
    if settings.mode != "reversible":
        return settings.mode
    return "checkpoint" if large_latents("auto", settings, model) else "autograd"


def denoise(
    settings: DoodlSettings,
    eps: NoisePredictor,
    x: torch.Tensor,
    y: torch.Tensor,
    model: LatentDiffusion,
    from_photo: bool = False,
) -> Pair:
    """The whole chain, from (x_T, y_T) to (x_0, y_0), with the settings' sampler; from a photo's latents,
    its last `photo_strength` (`schedule_of`)."""
    return chain_of(settings, model, from_photo).denoise(eps, x, y, schedule_of(settings, model, from_photo))


def checkpoints_decoder(settings: DoodlSettings, model: LatentDiffusion) -> bool:
    """Whether the VAE decoder runs with gradient checkpointing for this model and image size."""
    return large_latents(settings.decoder_checkpointing, settings, model)


def decodes_separately(settings: DoodlSettings, model: LatentDiffusion) -> bool:
    """Whether x_0 and y_0 are decoded and judged one at a time for this model and image size."""
    return large_latents(settings.separate_decoding, settings, model)


def large_latents(choice: str, settings: DoodlSettings, model: LatentDiffusion) -> bool:
    """An "on" / "off" / "auto" choice: "auto" is on from LARGE_LATENT_SIDE up."""
    if choice != "auto":
        return choice == "on"
    _, _, height, width = model.latent_shape(settings.height, settings.width)
    return min(height, width) >= LARGE_LATENT_SIDE


@contextmanager
def checkpointing(model: LatentDiffusion, settings: DoodlSettings) -> Iterator[None]:
    """The gradient checkpointing these settings ask of the model's VAE and denoiser, for a gradient."""
    with decoder_checkpointing(model.vae, checkpoints_decoder(settings, model)):
        if not settings.denoiser_checkpointing:
            yield
            return
        with gradient_checkpointing(model.denoiser, True):
            yield
