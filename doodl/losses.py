"""Differentiable guidance losses on decoded images.

A loss maps images (B, 3, H, W) with values in [0, 1] to a scalar to minimize, the mean over the
batch, and is differentiable w.r.t. the pixels: every resize and normalization is done in torch.
Model-based losses score random crops ("cutouts") rather than the whole image, as in the DOODL
paper: averaging over crops keeps the optimization from fooling the guidance model with
adversarial pixel patterns tuned to one fixed view. A loss draws its crops from the generator it is built
with, or from one of its own (`own_generator`), never from torch's global generator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from torchvision.transforms.functional import pil_to_tensor

from doodl.guides import Classifier, Clip, ImageRewardModel, TransformersClip, resize_center_crop

# A guidance loss: images (B, 3, H, W) in [0, 1] -> scalar to minimize. What doodl.optimize steers by.
Loss = Callable[[torch.Tensor], torch.Tensor]

# Defaults of the DOODL paper's multi-crop augmentation: 16 crops, sizes biased towards large ones.
CUTOUTS = 16
CUT_POWER = 0.3

# LAION's aesthetic predictor scores on a 1-10 scale.
AESTHETIC_RANGE = (1.0, 10.0)
# Composition is what an aesthetic score judges: a crop zooms and moves the subject, so its views stay
# near the whole image (a crop of 60 % would reward subjects smaller than the score wants).
AESTHETIC_MIN_CROP = 0.85


# --- augmentation ---------------------------------------------------------------------------------

# When the image is no larger than the guide's input, every paper cutout is the whole image, and 16 copies
# of one view let the optimizer fool the guide with changes no person sees. Such images get random resized
# crops instead, in the spirit of DiffAugment (Zhao et al. 2020): a square of 60-100 % of the side at a
# random place (so also a translation), resized to the guide's input, plus a little pixel noise.
MIN_CROP = 0.6
PIXEL_NOISE = 0.02  # standard deviation, on pixels in [0, 1]


# The seed of the generator a loss built without one draws its views from: two losses built alike draw the
# same views, and no loss ever draws from (or moves) torch's global generator.
LOSS_SEED = 0


def own_generator(generator: torch.Generator | None) -> torch.Generator:
    """`generator`, or a new CPU generator seeded with LOSS_SEED: what a loss draws its random views from."""
    return generator if generator is not None else torch.Generator().manual_seed(LOSS_SEED)


def _random(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).cpu()


def cutouts(
    images: torch.Tensor,
    n: int = CUTOUTS,
    size: int = 224,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    flip: bool = False,
    min_crop: float = MIN_CROP,
) -> torch.Tensor:
    """`n` random views of every image, each resized to `size`: (B * n, 3, size, size).

    Row `b * n + k` is view k of image b; the views are the same for all images of the batch. With n=0,
    the whole image is resized once (shorter side to `size`, center square). An image larger than
    `size` gets the paper's cutouts (`paper_cutouts`); a smaller one `small_image_views`, mirrored at
    random if `flip` (leave it off when the loss cares about left and right). Random views are drawn from
    `generator`, which they then need: torch's global generator is never drawn from.
    """
    if n == 0:
        return resize_center_crop(images, size)
    if generator is None:
        raise ValueError("random views need a generator to draw them from (see own_generator)")
    if min(images.shape[-2:]) > size:
        return paper_cutouts(images, n, size, cut_power, generator)
    return small_image_views(images, n, size, generator, flip, min_crop)


def paper_cutouts(
    images: torch.Tensor, n: int, size: int, cut_power: float, generator: torch.Generator
) -> torch.Tensor:
    """The DOODL paper's square crops: sides `rand ** cut_power * (max - min) + min`, between the model
    input size and the image's shorter side, at random places."""
    height, width = images.shape[-2:]
    max_side = min(height, width)
    min_side = min(max_side, size)
    sides = (_random(generator, n) ** cut_power * (max_side - min_side) + min_side).long().tolist()
    offsets = _random(generator, n, 2)
    crops = []
    for side, (dy, dx) in zip(sides, offsets.tolist(), strict=True):
        top, left = int(dy * (height - side + 1)), int(dx * (width - side + 1))
        crops.append(resize_center_crop(images[..., top : top + side, left : left + side], size))
    return torch.stack(crops, dim=1).flatten(0, 1)


def small_image_views(
    images: torch.Tensor,
    n: int,
    size: int,
    generator: torch.Generator,
    flip: bool = False,
    min_crop: float = MIN_CROP,
) -> torch.Tensor:
    """Random resized square crops (`min_crop` to all of the shorter side, anywhere in the image),
    mirrored at random if `flip`, plus Gaussian pixel noise: one batched, differentiable resampling."""
    if not 0 < min_crop <= 1:
        raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
    batch, _, height, width = images.shape
    side = min_crop + (1 - min_crop) * _random(generator, n)
    # affine_grid's coordinates run over [-1, 1] on each axis: a square of `side` times the shorter side.
    scale_x, scale_y = side * min(height, width) / width, side * min(height, width) / height
    shift = 2 * _random(generator, n, 2) - 1
    mirror = torch.where(_random(generator, n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale_x * mirror, scale_y
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * (1 - scale_x), shift[:, 1] * (1 - scale_y)
    theta = theta.to(images.device, images.dtype).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch * n, 3, size, size], align_corners=False)
    views = F.grid_sample(
        images.repeat_interleave(n, dim=0), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    noise = PIXEL_NOISE * _normal(generator, n, 3, size, size).to(images.device, images.dtype)
    return views + noise.repeat(batch, 1, 1, 1)


_cutouts = cutouts  # the loss factories' `cutouts` argument shadows the function inside them


# --- scoring views in chunks -----------------------------------------------------------------------

# Views a guide scores at once when its loss is differentiated. A ViT-L-14 grows memory by 0.25 GB per
# 224 px view for its forward and backward (float32), so 16 views at once (3.95 GB) outgrow a 512 px SD 1.5
# UNet VJP (2.99 GB); chunks of 4 keep the guide near 1 GB, and the cost is one more guide forward.
VIEWS_PER_CHUNK = 4
# Views smaller than this side are scored at once whatever the chunk size: guides of small inputs (the
# embedded ones take 64 px) need a few MB per view, and chunks would only cost time: each chunk's forward
# runs twice.
CHUNK_MIN_VIEW_SIDE = 224


def score_views(
    score: Callable[[torch.Tensor], torch.Tensor],
    views: torch.Tensor,
    per_chunk: int | None = VIEWS_PER_CHUNK,
) -> torch.Tensor:
    """`score(views)`, per-view results along dim 0, computed `per_chunk` views at a time under autograd.

    Each chunk is checkpointed: its activations are freed after the forward and rebuilt, one chunk at a
    time, in the backward pass, so only one chunk's are ever alive. Same value and gradient as one call
    (up to float rounding of the batch size). All views are scored at once when `per_chunk` is None,
    without autograd, and for views smaller than CHUNK_MIN_VIEW_SIDE.
    """
    if per_chunk is not None and per_chunk < 1:
        raise ValueError(f"per_chunk must be at least 1, got {per_chunk}")
    differentiated = torch.is_grad_enabled() and views.requires_grad
    small = min(views.shape[-2:]) < CHUNK_MIN_VIEW_SIDE
    if per_chunk is None or per_chunk >= len(views) or small or not differentiated:
        return score(views)
    return torch.cat([checkpoint(score, chunk, use_reentrant=False) for chunk in views.split(per_chunk)])


def _per_image(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Average per-crop values (B * n,) into per-image values (B,)."""
    return values.view(batch, -1).mean(dim=1)


# --- CLIP -----------------------------------------------------------------------------------------


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between unit vectors, over the last dim (DOODL's CLIP loss)."""
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def mentions_sides(text: str) -> bool:
    """Whether a prompt says left or right: then a mirrored view no longer shows what it asks for."""
    return re.search(r"\b(left|right)\b", text, re.IGNORECASE) is not None


def _clip_target_loss(
    clip: Clip,
    target: torch.Tensor,
    n: int,
    cut_power: float,
    generator: torch.Generator,
    flip: bool,
    views_per_chunk: int | None,
) -> Loss:
    def loss(images: torch.Tensor) -> torch.Tensor:
        crops = _cutouts(images, n, clip.image_size, cut_power, generator, flip)
        return spherical_distance(score_views(clip.embed_images, crops, views_per_chunk), target).mean()

    return loss


def clip_text_loss(
    clip: Clip,
    prompt: str,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Spherical distance between CLIP embeddings of image crops (values in [0, 1]) and a prompt.

    Views of a small image are mirrored at random unless the prompt says left or right."""
    if not prompt.strip():
        raise ValueError("clip_text_loss needs a non-empty prompt")
    with torch.no_grad():
        target = clip.embed_texts([prompt])
    flip = not mentions_sides(prompt)
    return _clip_target_loss(
        clip, target, cutouts, cut_power, own_generator(generator), flip, views_per_chunk
    )


def _reference_tensor(reference: Image.Image | torch.Tensor) -> torch.Tensor:
    """A reference image as a (1, 3, H, W) float tensor in [0, 1]."""
    if isinstance(reference, Image.Image):
        return pil_to_tensor(reference.convert("RGB")).float().div(255).unsqueeze(0)
    return reference.float().unsqueeze(0) if reference.ndim == 3 else reference.float()


def clip_image_loss(
    clip: Clip,
    references: Sequence[Image.Image | torch.Tensor],
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Spherical distance between CLIP embeddings of image crops (values in [0, 1]) and references.

    The target is the renormalized mean of the references' unit embeddings (PIL images, or tensors
    (3, H, W) / (B, 3, H, W) in [0, 1]), each embedded once, whole (shorter side resized, center crop).
    """
    if len(references) == 0:
        raise ValueError("clip_image_loss needs at least one reference image")
    with torch.no_grad():
        embeddings = torch.cat(
            [clip.embed_images(_reference_tensor(ref).to(clip.device)) for ref in references]
        )
        target = F.normalize(embeddings.mean(dim=0, keepdim=True), dim=-1)
    return _clip_target_loss(
        clip, target, cutouts, cut_power, own_generator(generator), True, views_per_chunk
    )


@torch.no_grad()
def clip_similarity(clip: Clip, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity (B, T) between whole images in [0, 1] and texts; no gradient."""
    return clip.embed_images(images) @ clip.embed_texts(list(texts)).T


# --- classifier -----------------------------------------------------------------------------------


def classifier_loss(
    classifier: Classifier,
    target: int | str,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Cross-entropy of image crops (values in [0, 1]) to a target class, given by index or label."""
    index = classifier.class_index(target)
    generator = own_generator(generator)

    def loss(images: torch.Tensor) -> torch.Tensor:
        crops = _cutouts(images, cutouts, classifier.image_size, cut_power, generator, flip=True)
        logits = score_views(classifier.logits, crops, views_per_chunk)
        return F.cross_entropy(logits, torch.full((len(logits),), index, device=logits.device))

    return loss


@torch.no_grad()
def class_probability(classifier: Classifier, images: torch.Tensor, target: int | str) -> torch.Tensor:
    """Probability (B,) the classifier gives the target class on whole images in [0, 1]; no gradient."""
    return classifier.logits(images).softmax(dim=-1)[:, classifier.class_index(target)]


# --- aesthetics -----------------------------------------------------------------------------------


def _aesthetic(clip: Clip, head: torch.nn.Linear, images: torch.Tensor) -> torch.Tensor:
    """Per-image predicted aesthetic score (B,) of LAION's linear head on unit CLIP embeddings."""
    embeddings = clip.embed_images(images)
    # The head is tiny: bring the embeddings to it rather than require it on the CLIP model's device.
    scores = head(embeddings.to(head.weight.device, head.weight.dtype)).squeeze(-1)
    return scores.to(embeddings.device, torch.float32)


def aesthetic_loss(
    clip: Clip,
    head: torch.nn.Linear,
    target: float | None = None,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Minus the predicted aesthetic score of images in [0, 1], or its distance to `target` if given.

    Scores are averaged over the crops of each image and clamped to the predictor's 1-10 scale, so
    the optimization has nothing to gain from pushing the linear head past what it was trained on.
    """
    low, high = AESTHETIC_RANGE
    if target is not None and not low <= target <= high:
        raise ValueError(f"aesthetic target must be in [{low:g}, {high:g}], got {target}")
    generator = own_generator(generator)

    def loss(images: torch.Tensor) -> torch.Tensor:
        crops = _cutouts(images, cutouts, clip.image_size, cut_power, generator, True, AESTHETIC_MIN_CROP)
        per_view = score_views(lambda views: _aesthetic(clip, head, views), crops, views_per_chunk)
        scores = _per_image(per_view, len(images)).clamp(low, high)
        return -scores.mean() if target is None else (scores - target).abs().mean()

    return loss


@torch.no_grad()
def aesthetic_score(clip: Clip, head: torch.nn.Linear, images: torch.Tensor) -> torch.Tensor:
    """Predicted aesthetic score (B,) of whole images in [0, 1], unclamped; no gradient."""
    return _aesthetic(clip, head, images)


# --- human-preference rewards ----------------------------------------------------------------------

# HPSv2 is reported as 100 x the cosine similarity of image and prompt embeddings (25-35 for real images),
# the scale PickScore has by its logit scale (about 100): the two rewards weigh alike in a weighted sum.
HPS_SCALE = 100.0


def _reward_loss(
    guide: Clip | TransformersClip,
    prompt: str,
    scale: float,
    crops: tuple[int, float, torch.Generator | None],
    views_per_chunk: int | None,
) -> Loss:
    """Minus `scale` x the cosine similarity of the guide's embeddings of image views and of the prompt."""
    if not prompt.strip():
        raise ValueError("a reward loss needs a non-empty prompt")
    with torch.no_grad():
        target = guide.embed_texts([prompt])

    def rewards(views: torch.Tensor) -> torch.Tensor:
        return scale * (guide.embed_images(views) @ target.T)

    return _minus_mean_reward(rewards, prompt, guide.image_size, crops, views_per_chunk)


def _minus_mean_reward(
    rewards: Callable[[torch.Tensor], torch.Tensor],
    prompt: str,
    size: int,
    crops: tuple[int, float, torch.Generator | None],
    views_per_chunk: int | None,
) -> Loss:
    """Minus the mean of `rewards` (one per view) over views of `size` px of images in [0, 1], drawn from the
    crops' generator (mirrored unless the prompt says left or right); what every reward model's loss is."""
    n, cut_power, given = crops
    generator = own_generator(given)
    flip = not mentions_sides(prompt)

    def loss(images: torch.Tensor) -> torch.Tensor:
        views = _cutouts(images, n, size, cut_power, generator, flip)
        return -score_views(rewards, views, views_per_chunk).mean()

    return loss


def pickscore_loss(
    guide: TransformersClip,
    prompt: str,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Minus PickScore of images in [0, 1] for a prompt: logit_scale x the cosine similarity of the
    reward model's embeddings, averaged over views (PickScore of real images: about 18 to 23)."""
    crops = (cutouts, cut_power, generator)
    return _reward_loss(guide, prompt, guide.logit_scale, crops, views_per_chunk)


def hps_loss(
    clip: Clip,
    prompt: str,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Minus the HPSv2 score of images in [0, 1] for a prompt: 100 x the cosine similarity of the HPSv2
    model's (`load_hps`) embeddings, averaged over views."""
    return _reward_loss(clip, prompt, HPS_SCALE, (cutouts, cut_power, generator), views_per_chunk)


def imagereward_loss(
    guide: ImageRewardModel,
    prompt: str,
    *,
    cutouts: int = CUTOUTS,
    cut_power: float = CUT_POWER,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = VIEWS_PER_CHUNK,
) -> Loss:
    """Minus ImageReward's normalized reward of images in [0, 1] for a prompt (0: its training pairs' mean,
    1: one standard deviation better), averaged over views."""
    if not prompt.strip():
        raise ValueError("a reward loss needs a non-empty prompt")
    rewards, crops = partial(guide.rewards, prompt=prompt), (cutouts, cut_power, generator)
    return _minus_mean_reward(rewards, prompt, guide.image_size, crops, views_per_chunk)


@torch.no_grad()
def imagereward_score(guide: ImageRewardModel, images: torch.Tensor, prompt: str) -> torch.Tensor:
    """ImageReward's normalized reward (B,) of whole images in [0, 1] for a prompt; no gradient."""
    return guide.rewards(images, prompt)


@torch.no_grad()
def pickscore(guide: TransformersClip, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """PickScore (B, T) of whole images in [0, 1] for texts; no gradient."""
    return guide.logit_scale * guide.embed_images(images) @ guide.embed_texts(list(texts)).T


@torch.no_grad()
def hps_score(clip: Clip, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """HPSv2 score (B, T) of whole images in [0, 1] for texts; no gradient."""
    return HPS_SCALE * clip.embed_images(images) @ clip.embed_texts(list(texts)).T


# --- model-free and composite losses --------------------------------------------------------------


def symmetry_loss() -> Loss:
    """Mean squared difference between images in [0, 1] and their mirror images (left-right symmetry)."""

    def loss(images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(images, images.flip(-1))

    return loss


def distance_to(image: torch.Tensor) -> Loss:
    """Mean squared difference (pixels in [0, 1]) between images and a fixed image (1, 3, H, W) of their
    size: the price of leaving a photo, added to a guide so that it buys only the changes worth it."""
    image = image.detach()

    def loss(images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(images, image.to(images).expand_as(images))

    return loss


class WeightedSum:
    """The loss sum(weight * loss(images)) over named (name, weight, loss) terms, e.g. text plus aesthetics.
    Each call's weighted terms are kept, detached (`take`), for a page that draws each term's curve."""

    def __init__(self, terms: Sequence[tuple[str, float, Loss]]) -> None:
        if len(terms) == 0:
            raise ValueError("a weighted sum needs at least one (name, weight, loss) term")
        self.terms = tuple(terms)
        self.names = tuple(name for name, _, _ in self.terms)
        self._calls: list[torch.Tensor] = []  # tensors, not floats: reading them waits for the device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([weight * loss(images) for _, weight, loss in self.terms])
        self._calls.append(parts.detach())
        return parts.sum()

    def take(self) -> dict[str, float]:
        """Each weighted term's mean over the calls since the last take (an iteration's: both latents of
        the pair); then forget them. Empty when there was no call."""
        if not self._calls:
            return {}
        means = torch.stack(self._calls).mean(0).tolist()
        self._calls.clear()
        return dict(zip(self.names, means))


def weighted_sum(terms: Sequence[tuple[float, Loss]]) -> WeightedSum:
    """The loss sum(weight * loss(images)) over (weight, loss) terms, named by their place."""
    return WeightedSum([(f"term {i}", weight, loss) for i, (weight, loss) in enumerate(terms, 1)])
