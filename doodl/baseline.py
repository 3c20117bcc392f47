"""The baselines DOODL is compared with: one-step classifier guidance, and best-of-K unguided samples.

At each step the clean image is guessed from the current latent, x0* = (z - sqrt(1 - abar) eps) / sqrt(abar),
decoded, scored, and the loss gradient w.r.t. z is folded into the noise prediction:
eps' = eps + scale * sqrt(1 - abar) * grad. It runs on DOODL's chain (EDICT, or DDIM for few steps) from
the same initial latents, so with scale 0 it gives exactly DOODL's unguided image, and any difference is
the guidance.

Best of K (`doodl.optimize.best_of_samples`): K unguided samples of K initial noises, the one the guide's
loss prefers. Random search is often the strongest baseline at matched compute (`matched_k`: as many samples
as DOODL's UNet calls pay for); its choice is also a start for DOODL (`DoodlSettings.start_samples`).
"""

from __future__ import annotations

import torch
from PIL import Image

from doodl.edict import NoisePredictor, Pair
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, conditioning, initial_latents
from doodl.pipeline import LatentDiffusion, to_pil


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


# --- random search at matched compute -----------------------------------------------------------


def matched_k(guided_calls: int, sample_calls: int) -> int:
    """How many unguided samples cost as many UNet calls as a guided run (at least one)."""
    if guided_calls < 0 or sample_calls <= 0:
        raise ValueError(
            f"UNet calls must be positive, got {guided_calls} for the guided run and {sample_calls} a sample"
        )
    return max(1, round(guided_calls / sample_calls))
