"""The DOODL loop: gradient descent on the initial noise through the whole EDICT chain (paper, Sec. 4)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from PIL import Image

from doodl.edict import (
    FEW_STEPS,
    EdictSchedule,
    NoisePredictor,
    Pair,
    ddim_denoise,
    ddim_step,
    edict_denoise,
    edict_invert,
    edict_step,
)
from doodl.gradient import (
    BOTH_LATENTS,
    FIRST_LATENT_ONLY,
    MODES,
    ChainStep,
    FinalLoss,
    PerLatentLoss,
    latent_grad,
)
from doodl.losses import Loss, distance_to, weighted_sum  # benchmarks import Loss from here too
from doodl.pipeline import (
    LatentDiffusion,
    count_unet_calls,
    decoder_checkpointing,
    gradient_checkpointing,
    to_pil,
    to_tensor,
)

# denoise(eps, x_T, y_T, schedule) -> (x_0, y_0): `edict_denoise`, or `ddim_denoise` for few-step chains.
ChainDenoise = Callable[[NoisePredictor, torch.Tensor, torch.Tensor, EdictSchedule], Pair]

DECODER_CHECKPOINTING = ("auto", "on", "off")
SAMPLERS = ("auto", "edict", "ddim")
# "auto" checkpoints the VAE decoder from this latent side up (256 px in SD). Measured with SD 1.5's VAE
# and UNet in float32 (python -m benchmarks.memory --arch sd15): decoding one latent with its backward
# grows memory more than a UNet VJP from 32x32 latents on (1.47 GB vs 0.79 GB; 5.82 vs 3.02 GB at 64x64;
# checkpointed: 0.58 GB at 32x32), while at the embedded model's 8x8 the decoder is small and
# checkpointing would only add a forward. From the same side up, a DDIM chain's gradient stores each step's
# input rather than its whole graph (`DoodlSettings._ddim_mode`).
DECODER_CHECKPOINT_MIN_LATENT_SIDE = 32


@dataclass(frozen=True)
class Chain:
    """The sampling chain of a run and how its gradient is taken, as `DoodlSettings.chain` decides."""

    step: ChainStep
    denoise: ChainDenoise
    mode: str  # the gradient mode of `latent_grad`
    few_steps: bool  # plain DDIM: the pair carries one sample, x_0 = y_0


# What only a run from given latents (a photo's) reads: a run from noise is the same whatever they are.
PHOTO_SETTINGS = ("fidelity", "photo_weight", "photo_strength")


@dataclass(frozen=True)
class DoodlSettings:
    """Defaults are the paper's (Sec. 4) and the official code's `gen()`."""

    steps: int = 50  # DDIM / EDICT steps (paper: 50)
    iterations: int = 50  # optimization steps (official: num_traversal_steps=50)
    learning_rate: float = 1.0  # loss multiplier before clipping (official: grad_scale=1)
    momentum: float = 0.9  # SGD momentum; Nesterov did not help (paper)
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
    renormalize: bool = True  # keep the latent's norm, on the Gaussian shell (paper)
    tied: bool = True  # average x_T and y_T into one latent after each step (paper)
    # How the gradient is computed: reversible, checkpoint or autograd (a DDIM chain, which has no exact
    # inverse, takes "reversible" as one of the other two: `_ddim_mode`).
    mode: str = "reversible"
    seed: int = 0
    height: int | None = None  # default: the model's resolution
    width: int | None = None
    precision: torch.dtype = torch.float64  # of the coupling arithmetic (official EDICT: float64)
    # Judge x_0 alone instead of the mean of x_0 and y_0 (official: optimize_first_edict_image_only):
    # half the decoding and scoring. Off by default: the paper judges both latents of the pair.
    first_image_only: bool = False
    # Gradient checkpointing in the VAE decoder: "on", "off", or "auto" (on for large latents, see
    # DECODER_CHECKPOINT_MIN_LATENT_SIDE). Same gradient; one more decoder forward per judged latent.
    decoder_checkpointing: str = "auto"
    # Gradient checkpointing inside the denoiser's VJP (diffusers' own, block by block): each VJP keeps its
    # blocks' inputs instead of their activations and recomputes them, for about one more forward. Where
    # one call's activations are an iteration's peak (a large transformer at a high resolution): SD3.5
    # Medium's iteration with and without it in benchmarks/results/memory-sd3-medium.md.
    denoiser_checkpointing: bool = False
    # Decode, score and back-propagate x_0 and y_0 one at a time: "on", "off" (both in one batch, on the
    # same random views), or "auto": apart from DECODER_CHECKPOINT_MIN_LATENT_SIDE up, where holding both
    # graphs costs most (SD 1.5 at 256 px: 2.86 GB for both, 1.47 GB for one); below, one batch is faster.
    separate_decoding: str = "auto"
    # The chain: "edict"; "ddim", plain DDIM, one UNet call a step (EDICT's make two), what the gradient
    # needs stored on the way forward (`_ddim_mode`): memory grows with the steps, which is small beside a
    # UNet call's for few steps or small latents (the embedded presets); or "auto": DDIM
    # below doodl.edict.FEW_STEPS steps from noise, where EDICT's coupled chain is no longer the model's own
    # sample (few-step models such as SD-Turbo), else EDICT.
    sampler: str = "auto"
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
    # From noise: start from the best of this many unguided samples by the same loss (the seed's own first,
    # `best_of_samples`), then optimize that sample's seed. 1: the paper's, the seed's own noise. A sample is
    # the chain forward alone, about a third of an iteration. On the embedded model, DOODL from the best
    # of 4 was ahead of DOODL from the seed in the mean on every tab with EDICT's chain
    # (benchmarks/results/edict/quality.md).
    start_samples: int = 1

    def __post_init__(self) -> None:
        check = {
            "steps": self.steps >= 1,
            "iterations": self.iterations >= 1,
            "learning_rate": self.learning_rate > 0,
            "momentum": 0 <= self.momentum < 1,
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
        if self.sampler not in SAMPLERS:
            raise ValueError(f"setting sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        for name in ("decoder_checkpointing", "separate_decoding"):
            if getattr(self, name) not in DECODER_CHECKPOINTING:
                raise ValueError(
                    f"setting {name}={getattr(self, name)!r} is not one of {', '.join(DECODER_CHECKPOINTING)}"
                )

    def changed(self, from_noise: bool = False) -> dict[str, Any]:
        """The settings that differ from the defaults: what keys of stored runs hold, so that a new setting
        at its default leaves them valid. `from_noise`: without those only a run from a photo reads."""
        skip = PHOTO_SETTINGS if from_noise else ()
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

    def schedule(self, model: LatentDiffusion, from_photo: bool = False) -> EdictSchedule:
        """The chain's steps; from a photo, the last `photo_strength` of them (at least one)."""
        shape = model.latent_shape(self.height, self.width)
        schedule = model.schedule(self.steps, self.p, self.leapfrog, shape)
        return schedule.last(max(1, round(self.photo_strength * self.steps))) if from_photo else schedule

    def few_step_chain(self, from_photo: bool = False) -> bool:
        """Whether the chain is plain DDIM. A photo's latents stay with EDICT, whatever the sampler: they
        are EDICT's inversion of it, which only EDICT's chain regenerates."""
        if from_photo:
            return False
        if self.sampler != "auto":
            return self.sampler == "ddim"
        return self.steps < FEW_STEPS

    def chain(self, model: LatentDiffusion, from_photo: bool = False) -> Chain:
        """The chain these settings sample with, and the gradient mode it takes."""
        if not self.few_step_chain(from_photo):
            return Chain(edict_step, edict_denoise, self.mode, few_steps=False)
        return Chain(ddim_step, ddim_denoise, self._ddim_mode(model), few_steps=True)

    def _ddim_mode(self, model: LatentDiffusion) -> str:
        """DDIM cannot be run backwards exactly, so "reversible" stores instead of rebuilding: each step's
        input (checkpoint) on large latents, where a UNet call's activations are dear; the whole graph
        (autograd) on small ones, where they are not and it saves recomputing every step's forward, a
        quarter of an iteration on the embedded model (python -m benchmarks.cost --only-default-runs
        --mode checkpoint). Both give the same gradient, bit for bit on the CPU."""
        if self.mode != "reversible":
            return self.mode
        return "checkpoint" if self._large_latents("auto", model) else "autograd"

    def denoise(
        self,
        eps: NoisePredictor,
        x: torch.Tensor,
        y: torch.Tensor,
        model: LatentDiffusion,
        from_photo: bool = False,
    ) -> Pair:
        """The whole chain, from (x_T, y_T) to (x_0, y_0), with this setting's sampler; from a photo's
        latents, its last `photo_strength` (`schedule`)."""
        return self.chain(model, from_photo).denoise(eps, x, y, self.schedule(model, from_photo))

    def checkpoints_decoder(self, model: LatentDiffusion) -> bool:
        """Whether the VAE decoder runs with gradient checkpointing for this model and image size."""
        return self._large_latents(self.decoder_checkpointing, model)

    def decodes_separately(self, model: LatentDiffusion) -> bool:
        """Whether x_0 and y_0 are decoded and judged one at a time for this model and image size."""
        return self._large_latents(self.separate_decoding, model)

    def _large_latents(self, choice: str, model: LatentDiffusion) -> bool:
        if choice != "auto":
            return choice == "on"
        _, _, height, width = model.latent_shape(self.height, self.width)
        return min(height, width) >= DECODER_CHECKPOINT_MIN_LATENT_SIDE


@dataclass(frozen=True)
class Step:
    """One optimization iteration, reported as it happens."""

    iteration: int
    loss: float
    image: Image.Image  # decoded x_0 of the latent this loss belongs to
    seconds: float  # since the optimization started, the start's samples included
    latents: Pair  # the (x_T, y_T) that produced this image
    seed: int  # of the run's noise and perturbations: with start_samples > 1, the chosen sample's


@dataclass(frozen=True)
class Result:
    best: Step
    last: Step
    losses: list[float] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.best.image


def conditioning(model: LatentDiffusion, prompt: str, settings: DoodlSettings) -> NoisePredictor:
    """The guided noise predictor for a prompt; an empty prompt is refused (it would be unguided)."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    return model.noise_predictor(model.encode_prompt(prompt), settings.guidance_scale)


def initial_latents(model: LatentDiffusion, settings: DoodlSettings) -> Pair:
    """x_T = y_T ~ N(0, I), drawn on the CPU so a seed gives the same noise on every device."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = model.latent_shape(settings.height, settings.width)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    z = z.to(model.device, settings.precision)
    return z, z.clone()


def invert_image(
    model: LatentDiffusion, image: Image.Image, prompt: str, settings: DoodlSettings = DoodlSettings()
) -> Pair:
    """The latents from which EDICT regenerates `image` (resized to the model's resolution): (x_T, y_T), or
    with `photo_strength` < 1 those of the timestep the photo's chain starts from."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    _, _, h, w = model.latent_shape(settings.height, settings.width)
    pixels = to_tensor(image, (w * model.vae_scale, h * model.vae_scale))
    z = model.encode(pixels).to(settings.precision)
    with torch.no_grad():
        schedule = settings.schedule(model, from_photo=True)
        return edict_invert(conditioning(model, prompt, settings), z, z.clone(), schedule)


def final_loss(
    model: LatentDiffusion,
    loss: Loss,
    first_image_only: bool = False,
    images: list[torch.Tensor] | None = None,
    separately: bool = True,
) -> FinalLoss:
    """DOODL's loss on the final pair: `loss` of each decoded latent, averaged (or of x_0 alone).

    `separately`, each latent is decoded and scored on its own, with its own draw of random views, as the
    official code does; `latent_grad` then back-propagates one latent at a time. Else both are decoded
    and scored in one batch, on the same views. The two agree when the loss draws nothing at random. The
    decoded images (detached, x_0 first) are appended to `images` when it is given.
    """
    if not separately and not first_image_only:

        def loss_of_pair(x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            decoded = model.decode(torch.cat([x0, y0]))
            if images is not None:
                images.append(decoded[:1].detach())
            return loss(decoded)

        return loss_of_pair

    def loss_of_latent(latent: torch.Tensor) -> torch.Tensor:
        decoded = model.decode(latent)
        if images is not None:
            images.append(decoded.detach())
        return loss(decoded)

    return PerLatentLoss(loss_of_latent, FIRST_LATENT_ONLY if first_image_only else BOTH_LATENTS)


def doodl(
    model: LatentDiffusion,
    prompt: str,
    loss: Loss,
    settings: DoodlSettings = DoodlSettings(),
    init: Pair | None = None,
) -> Iterator[Step]:
    """Optimize the initial noise so that the generated image lowers `loss`; yield every iteration.

    Iteration 0 reports the unguided image of the initial latents. Stop early by leaving the loop.
    `init` starts from a photo's latents, those of `invert_image` at the same settings: they are run
    through the photo's chain (the last `photo_strength` of the steps, EDICT) within the trust region of
    `fidelity`. Without it, from the noise of `settings.seed`, or of the best of `settings.start_samples`
    seeds' samples; other noise is another seed, not `init`.
    """
    start = time.perf_counter()  # the start's samples count in every iteration's seconds
    eps = conditioning(model, prompt, settings)
    starts = settings.samples_to_start(from_photo=init is not None)
    if starts > 1:
        # DOODL from the best of k samples is DOODL from that sample's seed: its noise, its perturbations.
        best = best_of_samples(model, prompt, loss, settings, starts)
        settings = replace(settings, seed=best.seed, start_samples=1)
    schedule = settings.schedule(model, from_photo=init is not None)
    x, y = initial_latents(model, settings) if init is None else (v.to(settings.precision) for v in init)
    norms = (x.norm(), y.norm())
    # A trust region around given latents keeps a photo's content (DoodlSettings.fidelity).
    region = None if init is None else TrustRegion.around((x, y), settings)
    velocity = (torch.zeros_like(x), torch.zeros_like(y))
    generator = torch.Generator().manual_seed(settings.seed + 1)

    decoded: list[torch.Tensor] = []  # x_0's image, kept from the loss's own decoding, not decoded again
    chain = settings.chain(model, from_photo=init is not None)
    if init is not None and settings.photo_weight > 0:
        anchor = distance_to(reconstruction(model, eps, x, y, settings))
        loss = weighted_sum([(1.0, loss), (settings.photo_weight, anchor)])
    separately = settings.decodes_separately(model)
    # A DDIM chain carries one sample (x_0 = y_0): judged once.
    loss_of_final = final_loss(model, loss, settings.first_image_only or chain.few_steps, decoded, separately)

    for iteration in range(settings.iterations):
        with checkpointing(model, settings):
            result = latent_grad(eps, x, y, schedule, loss_of_final, chain.mode, chain.step)
        image = to_pil(decoded[0])[0]
        decoded.clear()
        yield Step(iteration, result.loss, image, time.perf_counter() - start, (x, y), settings.seed)
        if iteration + 1 < settings.iterations:
            x, y, velocity = _sgd_step((x, y), result.grad, velocity, norms, settings, generator)
            if region is not None:
                x, y = region.project((x, y))


@contextmanager
def checkpointing(model: LatentDiffusion, settings: DoodlSettings) -> Iterator[None]:
    """The gradient checkpointing these settings ask of the model's VAE and denoiser, for a gradient."""
    with decoder_checkpointing(model.vae, settings.checkpoints_decoder(model)):
        if not settings.denoiser_checkpointing:
            yield
            return
        with gradient_checkpointing(model.denoiser, True):
            yield


def reconstruction(
    model: LatentDiffusion, eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, settings: DoodlSettings
) -> torch.Tensor:
    """The image (1, 3, H, W) that given latents, e.g. a photo's inversion, sample to unguided."""
    with torch.no_grad():
        x0, _ = settings.denoise(eps, x, y, model, from_photo=True)
        return model.decode(x0)


def _sgd_step(
    latents: Pair, grad: Pair, velocity: Pair, norms: Pair, s: DoodlSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Pair]:
    """SGD with momentum on clipped gradients, a small perturbation, then renormalizing.

    Tied, both latents take the same step (their mean gradient, the same noise): a pair that starts equal,
    from noise, stays equal, as the paper's averaging keeps it; a pair that does not, a photo's inversion
    (x_T != y_T), keeps the difference EDICT needs to regenerate the photo, which averaging would erase."""
    if s.tied:
        grad = ((grad[0] + grad[1]) / 2,) * 2
    noise = torch.randn(latents[0].shape, generator=generator, dtype=torch.float64)
    noise = s.perturbation * noise.to(latents[0])
    if s.normalized:
        grad = [g * (s.grad_clip / g.square().mean().sqrt().clamp_min(1e-30)) for g in grad]
    step = [(-s.learning_rate * g).clamp(-s.grad_clip, s.grad_clip) for g in grad]
    velocity = tuple(s.momentum * v + d for v, d in zip(velocity, step))
    new = [z + v + noise for z, v in zip(latents, velocity)]
    if s.renormalize:
        new = [z * norm / z.norm() for z, norm in zip(new, norms)]
    return new[0], new[1], velocity


@dataclass(frozen=True)
class TrustRegion:
    """A ball around each starting latent that the optimized latents are projected back into."""

    starts: Pair
    radii: tuple[float, float]

    @classmethod
    def around(cls, starts: Pair, settings: DoodlSettings) -> TrustRegion | None:
        """The region `settings.fidelity` sets around `starts`; None when it sets no limit."""
        radii = tuple(settings.trust_radius(z) for z in starts)
        if radii[0] is None or radii[1] is None:
            return None
        return cls((starts[0].clone(), starts[1].clone()), (radii[0], radii[1]))

    def project(self, latents: Pair) -> Pair:
        """Each latent, moved radially back onto its ball when it left it (the nearest point inside)."""
        projected = []
        for z, start, radius in zip(latents, self.starts, self.radii):
            offset = z - start
            distance = float(offset.norm())
            projected.append(z if distance <= radius else start + offset * (radius / distance))
        return projected[0], projected[1]


def optimize(
    model: LatentDiffusion,
    prompt: str,
    loss: Loss,
    settings: DoodlSettings = DoodlSettings(),
    init: Pair | None = None,
    callback: Callable[[Step], bool | None] | None = None,
) -> Result:
    """Run `doodl` to the end, or until `callback(step)` returns False; keep the best and last images."""
    steps = []
    for step in doodl(model, prompt, loss, settings, init):
        steps.append(step)
        if callback is not None and callback(step) is False:
            break
    return result_of(steps)


def result_of(steps: list[Step]) -> Result:
    if not steps:
        raise ValueError("no iteration finished")
    best = min(steps, key=lambda s: s.loss)
    return Result(best=best, last=steps[-1], losses=[s.loss for s in steps])


def sample(
    model: LatentDiffusion, prompt: str, settings: DoodlSettings = DoodlSettings(), init: Pair | None = None
) -> Image.Image:
    """One unguided sample: the image iteration 0 of `doodl` shows (`init`: a photo's latents, as there)."""
    return unguided_image(model, conditioning(model, prompt, settings), settings, init)


def unguided_image(
    model: LatentDiffusion, eps: NoisePredictor, settings: DoodlSettings, init: Pair | None = None
) -> Image.Image:
    """The unguided sample of an already conditioned noise predictor (`sample` without the prompt)."""
    x, y = initial_latents(model, settings) if init is None else init
    with torch.no_grad():
        x, _ = settings.denoise(eps, x, y, model, from_photo=init is not None)
        return to_pil(model.decode(x))[0]


# --- the best of K unguided samples: random search, and a start for DOODL ------------------------


@dataclass(frozen=True)
class BestOf:
    """K unguided samples and the one of lowest guidance loss."""

    image: Image.Image  # the chosen sample
    chosen: int  # its index among the candidates
    seeds: tuple[int, ...]  # every candidate's seed, the settings' own first
    losses: tuple[float, ...]  # every candidate's guidance loss on its final image
    calls: int  # UNet calls spent sampling (scoring makes none)

    @property
    def seed(self) -> int:
        """The chosen sample's seed, which DOODL with `start_samples` = K optimizes. A seed, not latents
        passed as `init`: `init` is a photo's inversion (EDICT chain, trust region)."""
        return self.seeds[self.chosen]


def candidate_seed(seed: int, k: int) -> int:
    """The k-th candidate's seed (k >= 1; the 0th is `seed` itself): spread far from the settings' seed,
    so that nearby seeds' candidates never overlap, and the same on every machine."""
    return int(hashlib.sha256(f"{seed}/{k}".encode()).hexdigest()[:15], 16)


def candidate_seeds(seed: int, k: int) -> tuple[int, ...]:
    """The seeds of K candidates: `seed` first, so the first candidate is the unguided sample."""
    return (seed, *(candidate_seed(seed, i) for i in range(1, k)))


def best_of_samples(
    model: LatentDiffusion,
    prompt: str,
    loss: Loss,
    settings: DoodlSettings,
    k: int,
    seeds: Sequence[int] | None = None,
) -> BestOf:
    """Sample K initial noises without guidance; keep the image of lowest `loss` (ties: the first).

    `seeds` defaults to `candidate_seeds(settings.seed, k)`. `loss` is called once per candidate, on its
    decoded image as a (1, 3, H, W) tensor in [0, 1]: one that draws random views draws new ones each
    call, unless it is built to repeat them.
    """
    seeds = candidate_seeds(settings.seed, k) if seeds is None else tuple(int(s) for s in seeds)
    if k < 1 or len(seeds) != k:
        raise ValueError(f"best of K needs K >= 1 and K seeds, got K={k} and {len(seeds)} seeds")
    images, losses = [], []
    eps = conditioning(model, prompt, settings)  # the same for every seed: the prompt is encoded once
    with count_unet_calls(model.denoiser) as calls:
        for seed in seeds:
            images.append(unguided_image(model, eps, replace(settings, seed=seed)))
            with torch.no_grad():
                losses.append(float(loss(to_tensor(images[-1], images[-1].size))))
    chosen = min(range(k), key=losses.__getitem__)
    return BestOf(images[chosen], chosen, seeds, tuple(losses), calls.passes)
