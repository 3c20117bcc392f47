"""The baselines DOODL is compared with: one-step classifier guidance, and best-of-K unguided samples.

At each step the clean image is guessed from the current latent, x0* = (z - sqrt(1 - abar) eps) / sqrt(abar)
(a flow model's own estimate: x0* = z - s v), decoded, scored, and the loss gradient w.r.t. z is folded
into the prediction: eps' = eps + scale * sqrt(1 - abar) * grad (v' = v + scale * s * grad). It runs on
DOODL's chain (EDICT, or the plain chain for few steps) from the same initial latents, so with scale 0 it
gives exactly DOODL's unguided image, and any difference is the guidance.

Best of K (`doodl.optimize.best_of_samples`): K unguided samples of K initial noises, the one the guide's
loss prefers. Random search is often the strongest baseline at matched compute (`matched_k`: as many samples
as DOODL's UNet calls pay for); its choice is also a start for DOODL (`DoodlSettings.start_samples`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from doodl.chain import denoise
from doodl.edict import NoisePredictor, Pair, Timestep
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, conditioning, initial_latents
from doodl.pipeline import LatentDiffusion, to_pil


def one_step_guided(
    eps: NoisePredictor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    loss: Loss,
    coefficients: Callable[[Timestep], tuple[float, float]],
    scale: float,
) -> NoisePredictor:
    """Wrap a predictor so that it also pushes the one-step estimate of x_0 down the loss.

    `coefficients(t)` is (alpha, sigma) of the model's clean estimate x0 = (z - sigma f) / alpha: DDIM's
    (sqrt(abar), sqrt(1 - abar)) on a noise prediction, a flow's (1, s) on a velocity
    (`LatentDiffusion.clean_coefficients`); the gradient is folded into f with weight sigma. On a noise
    prediction that is classifier guidance; on a flow it is a choice: the exact counterpart, s / (1 - s),
    is infinite at s = 1, where SD3's and FLUX's chains start."""

    def guided_eps(z: torch.Tensor, t: Timestep) -> torch.Tensor:
        alpha, sigma = coefficients(t)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            e = eps(z, t)
            x0 = (z - sigma * e) / alpha
            (grad,) = torch.autograd.grad(loss(decode(x0)), z)
        return e.detach() + scale * sigma * grad

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
        eps = one_step_guided(eps, model.decode, loss, model.clean_coefficients, scale)
    x, y = initial_latents(model, settings) if init is None else init
    with torch.no_grad():
        x, _ = denoise(settings, eps, x, y, model, from_photo=init is not None)
        return to_pil(model.decode(x))[0]


# --- random search at matched compute -----------------------------------------------------------


def matched_k(guided_calls: int, sample_calls: int) -> int:
    """How many unguided samples cost as many UNet calls as a guided run (at least one)."""
    if guided_calls < 0 or sample_calls <= 0:
        raise ValueError(
            f"UNet calls must be positive, got {guided_calls} for the guided run and {sample_calls} a sample"
        )
    return max(1, round(guided_calls / sample_calls))
