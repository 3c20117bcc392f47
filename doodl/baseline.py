"""The baselines DOODL is compared with: one-step classifier guidance, and best-of-K unguided samples.

At each step the clean image is guessed from the current latent, x0* = (z - sqrt(1 - abar) eps) / sqrt(abar),
decoded, scored, and the loss gradient w.r.t. z is folded into the noise prediction:
eps' = eps + scale * sqrt(1 - abar) * grad. It runs on DOODL's chain (EDICT, or DDIM for few steps) from
the same initial latents, so with scale 0 it gives exactly DOODL's unguided image, and any difference is
the guidance.

Best of K (`best_of_samples`): K unguided samples of K initial noises, the one the guide's loss prefers.
Random search is often the strongest baseline at matched compute (`matched_k`: as many samples as DOODL's
UNet calls pay for); its chosen latents are also a start for DOODL (`optimize(..., init=best.latents)`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from doodl.edict import NoisePredictor, Pair
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, conditioning, initial_latents, sample
from doodl.pipeline import LatentDiffusion, count_unet_calls, to_pil, to_tensor


def one_step_guided(
    eps: NoisePredictor, decode, loss: Loss, alphas_cumprod: torch.Tensor, scale: float
) -> NoisePredictor:
    """Wrap a noise predictor so that it also pushes the one-step estimate of x_0 down the loss."""

    def guided_eps(z: torch.Tensor, t: int) -> torch.Tensor:
        abar = alphas_cumprod[t].to(z)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            e = eps(z, t)
            x0 = (z - (1 - abar).sqrt() * e) / abar.sqrt()
            (grad,) = torch.autograd.grad(loss(decode(x0)), z)
        return e.detach() + scale * (1 - abar).sqrt() * grad

    return guided_eps


def one_step_guidance(
    model: LatentDiffusion,
    prompt: str,
    loss: Loss,
    scale: float,
    settings: DoodlSettings = DoodlSettings(),
    init: Pair | None = None,
) -> Image.Image:
    """Sample with one-step classifier guidance of strength `scale` (0: unguided)."""
    if scale < 0:
        raise ValueError(f"the guidance scale must be non-negative, got {scale}")
    eps = conditioning(model, prompt, settings)
    if scale > 0:
        eps = one_step_guided(eps, model.decode, loss, model.scheduler.alphas_cumprod.double(), scale)
    x, y = initial_latents(model, settings) if init is None else init
    with torch.no_grad():
        x, _ = settings.denoise(eps, x, y, model, from_photo=init is not None)
        return to_pil(model.decode(x))[0]


# --- best of K unguided samples -------------------------------------------------------------------


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
        """The chosen sample's seed: DOODL from it is `optimize(..., replace(settings, seed=best.seed))`.
        A seed, not latents passed as `init`: `init` is a photo's inversion (EDICT chain, trust region)."""
        return self.seeds[self.chosen]


def candidate_seed(seed: int, k: int) -> int:
    """The k-th candidate's seed (k >= 1; the 0th is `seed` itself): spread far from the settings' seed,
    so that nearby seeds' candidates never overlap, and the same on every machine."""
    return int(hashlib.sha256(f"{seed}/{k}".encode()).hexdigest()[:15], 16)


def candidate_seeds(seed: int, k: int) -> tuple[int, ...]:
    """The seeds of K candidates: `seed` first, so the first candidate is the unguided sample."""
    return (seed, *(candidate_seed(seed, i) for i in range(1, k)))


def matched_k(guided_calls: int, sample_calls: int) -> int:
    """How many unguided samples cost as many UNet calls as a guided run (at least one)."""
    if guided_calls < 0 or sample_calls <= 0:
        raise ValueError(
            f"UNet calls must be positive, got {guided_calls} for the guided run and {sample_calls} a sample"
        )
    return max(1, round(guided_calls / sample_calls))


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
    with count_unet_calls(model.unet) as calls:
        for seed in seeds:
            images.append(sample(model, prompt, replace(settings, seed=seed)))
            with torch.no_grad():
                losses.append(float(loss(to_tensor(images[-1], images[-1].size))))
    chosen = min(range(k), key=losses.__getitem__)
    return BestOf(images[chosen], chosen, seeds, tuple(losses), calls.calls)
