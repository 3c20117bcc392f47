"""The DOODL loop: gradient descent on the initial noise through the whole EDICT chain (paper, Sec. 4)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from doodl.chain import chain_of, checkpointing, decodes_separately, denoise, schedule_of
from doodl.edict import NoisePredictor, Pair, edict_invert
from doodl.gradient import BOTH_LATENTS, FIRST_LATENT_ONLY, FinalLoss, PerLatentLoss, latent_grad
from doodl.losses import Loss, WeightedSum, distance_to  # benchmarks import Loss from here too
from doodl.pipeline import LatentDiffusion, count_unet_calls, to_pil, to_tensor
from doodl.settings import DoodlSettings  # the package's callers import it from here too
from doodl.update import Update


@dataclass(frozen=True)
class Step:
    """One optimization iteration, reported as it happens."""

    iteration: int
    loss: float
    image: Image.Image  # decoded x_0 of the latent this loss belongs to
    seconds: float  # since the optimization started, the start's samples included
    latents: Pair  # the (x_T, y_T) that produced this image
    seed: int  # of the run's noise and perturbations: with start_samples > 1, the chosen sample's
    terms: dict[str, float] = field(default_factory=dict)  # a weighted sum's weighted terms; else empty


@dataclass(frozen=True)
class Result:
    best: Step
    last: Step
    losses: list[float] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.best.image


def conditioning(model: LatentDiffusion, prompt: str, settings: DoodlSettings) -> NoisePredictor:
    """The guided noise predictor for a prompt, of the compiled denoiser if the settings ask; an empty prompt
    is refused (it would be unguided)."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    predicting = model.compiled if settings.compile else model
    return predicting.noise_predictor(model.encode_prompt(prompt), settings.guidance_scale)


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
        schedule = schedule_of(settings, model, from_photo=True)
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
    schedule = schedule_of(settings, model, from_photo=init is not None)
    x, y = initial_latents(model, settings) if init is None else (v.to(settings.precision) for v in init)
    update = Update((x, y), settings, from_photo=init is not None)
    # A trust region around given latents keeps a photo's content (DoodlSettings.fidelity).
    region = None if init is None else TrustRegion.around((x, y), settings)

    decoded: list[torch.Tensor] = []  # x_0's image, kept from the loss's own decoding, not decoded again
    chain = chain_of(settings, model, from_photo=init is not None)
    if init is not None and settings.photo_weight > 0:
        anchor = distance_to(reconstruction(model, eps, x, y, settings))
        guide = loss.terms if isinstance(loss, WeightedSum) else (("guide", 1.0, loss),)
        loss = WeightedSum([*guide, ("closeness to the photo", settings.photo_weight, anchor)])
    separately = decodes_separately(settings, model)
    # A DDIM chain carries one sample (x_0 = y_0): judged once.
    loss_of_final = final_loss(model, loss, settings.first_image_only or chain.few_steps, decoded, separately)

    terms_of(loss)  # forget the start's samples' terms
    for iteration in range(settings.iterations):
        with checkpointing(model, settings):
            result = latent_grad(eps, x, y, schedule, loss_of_final, chain.mode, chain.step)
        image = to_pil(decoded[0])[0]
        decoded.clear()
        seconds = time.perf_counter() - start
        yield Step(iteration, result.loss, image, seconds, (x, y), settings.seed, terms_of(loss))
        if iteration + 1 < settings.iterations:
            x, y = update((x, y), result.grad)
            if region is not None:
                x, y = region.project((x, y))


def terms_of(loss: Loss) -> dict[str, float]:
    """A weighted sum's weighted terms since they were last taken; nothing for another loss."""
    return loss.take() if isinstance(loss, WeightedSum) else {}


def reconstruction(
    model: LatentDiffusion, eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, settings: DoodlSettings
) -> torch.Tensor:
    """The image (1, 3, H, W) that given latents, e.g. a photo's inversion, sample to unguided."""
    with torch.no_grad():
        x0, _ = denoise(settings, eps, x, y, model, from_photo=True)
        return model.decode(x0)


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
        x, _ = denoise(settings, eps, x, y, model, from_photo=init is not None)
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
