"""Adversarial training of the embedded guides, so that following their gradients changes what a person sees.

A guide trained on clean renders only has gradients that point at pixel patterns no person notices: DOODL
then lowers the guide's loss while the image stays as it was. Adversarially trained models have
perceptually aligned gradients (Santurkar et al. 2019, "Image Synthesis with a Single (Robust) Classifier";
Kawar et al. 2022, robust classifier guidance for diffusion). The recipe is the standard one: each batch is
augmented, attacked by a few steps of PGD inside an L-inf ball, and the model learns on clean and attacked
images alike. Pixels here are in [0, 1]; the models of the shapes world read 2 * pixels - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from doodl.losses import small_image_views

# L-inf radius of the attacks, in [0, 1] pixels: far below the gap between two shades of the palette (the
# closest pair differs by ~45/255 in a channel), so an attack cannot turn one real shade into another.
EPSILON = 8 / 255
TRAIN_PGD_STEPS = 3  # the attack used while training (more steps: slower, a little more robust)
EVAL_PGD_STEPS = 10  # the attack that measures robustness afterwards


def pgd(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    steps: int,
    epsilon: float = EPSILON,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [0, 1] moved within `epsilon` (L-inf) to *raise* `loss_of`, by projected signed gradient
    ascent from a random start (Madry et al. 2018). Returns detached images."""
    step = 2.5 * epsilon / steps
    noise = torch.rand(images.shape, generator=generator) * 2 - 1
    adversarial = (images + epsilon * noise.to(images)).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(adversarial), adversarial)
        adversarial = adversarial.detach() + step * grad.sign()
        adversarial = (images + (adversarial - images).clamp(-epsilon, epsilon)).clamp(0, 1)
    return adversarial.detach()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (in [0, 1]) through its own random view, as DOODL's losses will show it to the guide:
    a random resized crop, maybe mirrored, with pixel noise."""
    size = images.shape[-1]
    return torch.cat([small_image_views(image[None], 1, size, generator, flip=True) for image in images])


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels to the [-1, 1] the shapes world's models read (mean = std = 0.5)."""
    return images * 2 - 1


def accuracy(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> tuple[float, float]:
    """(clean, robust) accuracy: on the images, and on them attacked by EVAL_PGD_STEPS of PGD."""

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(x), labels)

    with torch.no_grad():
        clean = (logits_of(images).argmax(1) == labels).float().mean()
    attacked = pgd(loss_of, images, EVAL_PGD_STEPS, generator=generator)
    with torch.no_grad():
        robust = (logits_of(attacked).argmax(1) == labels).float().mean()
    return float(clean), float(robust)
