"""Guidance losses and loaders, on tiny random models saved and loaded the way real ones are."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import huggingface_hub.constants
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from doodl import losses
from doodl.guides import (
    AESTHETIC_HEAD_FILE,
    AESTHETIC_HEAD_URL,
    Clip,
    GuideNotFoundError,
    load_aesthetic_head,
    load_classifier,
    load_clip,
)
from doodl.tiny import TINY_CLIP, save_tiny_classifier, save_tiny_clip

EMBED_DIM = TINY_CLIP["embed_dim"]
LABELS = ("Crimson Red", "scarlet_red", "Deep Blue")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def clip(clip_folder) -> Clip:
    return load_clip(str(clip_folder))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet"), LABELS)


@pytest.fixture(scope="module")
def classifier(classifier_folder):
    return load_classifier(classifier_folder)


def random_head_state() -> dict[str, torch.Tensor]:
    # A bias mid-scale keeps random scores inside the clamped 1-10 range, where gradients flow.
    generator = torch.Generator().manual_seed(0)
    return {"weight": 0.5 * torch.randn(1, EMBED_DIM, generator=generator), "bias": torch.tensor([5.5])}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "head.pth"
    torch.save(random_head_state(), path)
    return load_aesthetic_head(path)


def images(batch: int = 2, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- augmentation ---------------------------------------------------------------------------------


def test_cutouts_shape_and_range():
    batch = torch.rand(2, 3, 48, 40, generator=seeded())
    crops = losses.cutouts(batch, n=5, size=16, generator=seeded())
    assert crops.shape == (10, 3, 16, 16)
    assert crops.min() >= 0 and crops.max() <= 1 + 1e-6  # filters sum to one up to rounding
    assert losses.cutouts(batch, n=0, size=16).shape == (2, 3, 16, 16)


def test_cutouts_are_image_major():
    batch = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    crops = losses.cutouts(batch, n=3, size=8, generator=seeded())
    torch.testing.assert_close(crops[:3], torch.zeros(3, 3, 8, 8))
    torch.testing.assert_close(crops[3:], torch.ones(3, 3, 8, 8))


def test_cutouts_follow_the_generator():
    batch = images()
    first = losses.cutouts(batch, n=4, size=16, generator=seeded(1))
    assert torch.equal(first, losses.cutouts(batch, n=4, size=16, generator=seeded(1)))
    assert not torch.equal(first, losses.cutouts(batch, n=4, size=16, generator=seeded(2)))


def test_small_images_get_views_that_differ_and_pass_gradients():
    # At 64 px for a 64 px guide, every paper cutout would be the whole image: the views must still vary.
    batch = images(1, 64).requires_grad_(True)
    views = losses.cutouts(batch, n=16, size=64, generator=seeded())
    assert views.shape == (16, 3, 64, 64)
    flat = views.detach().flatten(1)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # RMS difference of each pair of views
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.05
    (grad,) = torch.autograd.grad(views.mean(), batch)
    assert (grad != 0).float().mean() > 0.9  # views cover the image: nearly every pixel is seen


def test_small_image_views_are_image_major_and_follow_the_generator():
    batch = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    views = losses.cutouts(batch, n=3, size=32, generator=seeded())
    assert views[:3].abs().mean() < 0.05 and (views[3:] - 1).abs().mean() < 0.05  # only pixel noise
    again = losses.cutouts(batch, n=3, size=32, generator=seeded())
    assert torch.equal(views, again)
    assert not torch.equal(views, losses.cutouts(batch, n=3, size=32, generator=seeded(1)))


def test_small_image_views_mirror_only_when_allowed():
    # Dark left half, bright right half: a mirrored view is bright on the left.
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1

    def mirrored(flip: bool) -> int:
        views = losses.cutouts(image, n=32, size=32, generator=seeded(), flip=flip)
        return int((views[..., :16].mean((1, 2, 3)) > views[..., 16:].mean((1, 2, 3))).sum())

    assert mirrored(False) == 0
    assert 4 < mirrored(True) < 28


def test_text_loss_mirrors_views_unless_the_prompt_says_left_or_right():
    assert losses.mentions_sides("a red circle left of a blue square")
    assert losses.mentions_sides("A star on the RIGHT")
    assert not losses.mentions_sides("a red circle above a blue square")
    assert not losses.mentions_sides("a bright star")  # 'right' inside a word is not a side


# --- loaders --------------------------------------------------------------------------------------


def test_load_clip_from_folder_and_local_dir(clip, clip_folder):
    again = load_clip("local-dir:" + str(clip_folder))
    assert (clip.image_size, clip.mean, clip.std) == (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert not any(p.requires_grad for p in clip.model.parameters())
    batch = images()
    embeddings = clip.embed_images(batch)
    assert embeddings.shape == (2, EMBED_DIM)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(embeddings, again.embed_images(batch))
    assert clip.embed_texts(["a red apple", "a blue car"]).shape == (2, EMBED_DIM)


def test_load_classifier_reads_labels_and_processor(classifier):
    assert classifier.labels == LABELS
    assert (classifier.image_size, classifier.mean, classifier.std) == (24, (0.5,) * 3, (0.5,) * 3)
    assert classifier.logits(images()).shape == (2, len(LABELS))


def test_load_classifier_from_module_with_overrides():
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    module(torch.zeros(1, 3, 16, 16))  # materialize the lazy layer
    classifier = load_classifier(module, labels=["cat", "dog"], image_size=16)
    assert (classifier.labels, classifier.image_size) == (("cat", "dog"), 16)
    assert classifier.logits(images(size=40)).shape == (2, 2)
    with pytest.raises(ValueError, match="labels"):
        load_classifier(module)


def test_class_index_matches_labels_loosely(classifier):
    assert classifier.class_index("crimson red") == 0
    assert classifier.class_index("Scarlet Red") == 1
    assert classifier.class_index("deep_blue") == 2
    assert classifier.class_index(2) == 2
    with pytest.raises(ValueError, match="Crimson Red"):
        classifier.class_index("crimson")
    with pytest.raises(ValueError, match="out of range"):
        classifier.class_index(3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_aesthetic_head(tmp_path, suffix):
    state = random_head_state()
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    head = load_aesthetic_head(path)
    assert (head.in_features, head.out_features) == (EMBED_DIM, 1)
    torch.testing.assert_close(head.weight, state["weight"])
    with pytest.raises(ValueError, match="768"):
        load_aesthetic_head(path, embed_dim=768)


def test_load_aesthetic_head_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "doodl").mkdir()
    torch.save(random_head_state(), tmp_path / "doodl" / AESTHETIC_HEAD_FILE)
    assert load_aesthetic_head().in_features == EMBED_DIM


def test_load_aesthetic_head_offline_says_what_to_download(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GuideNotFoundError) as error:
        load_aesthetic_head()
    message = str(error.value)
    assert AESTHETIC_HEAD_URL in message
    assert str(tmp_path / "doodl" / AESTHETIC_HEAD_FILE) in message


@pytest.fixture
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import; its flag is what requests check.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_guides_name_themselves(tmp_path, hub_offline):
    missing = str(tmp_path / "no-such-model")
    for load, name in [
        (load_clip, missing),
        (load_clip, "local-dir:" + missing),
        (load_clip, "hf-hub:doodl-tests/no-such-clip"),
        (load_classifier, missing),
        (load_classifier, "doodl-tests/no-such-classifier"),
    ]:
        with pytest.raises(GuideNotFoundError, match=re.escape(name.removeprefix("local-dir:"))):
            load(name)
    with pytest.raises(GuideNotFoundError, match="could not be found locally"):
        load_clip("hf-hub:doodl-tests/no-such-clip")


def test_openai_weights_are_built_with_quick_gelu(monkeypatch):
    calls = {}

    def offline_create_model(name, **kwargs):
        calls.update(kwargs, name=name)
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model", offline_create_model)
    with pytest.raises(GuideNotFoundError, match="ViT-L/14"):
        load_clip("ViT-L/14", "openai")
    assert calls["name"] == "ViT-L-14" and calls["force_quick_gelu"]


def test_builtin_clip_needs_pretrained_weights():
    with pytest.raises(ValueError, match="laion2b_s32b_b82k"):
        load_clip("ViT-L-14")


# --- losses ---------------------------------------------------------------------------------------


def reference_image() -> Image.Image:
    pixels = (images(batch=1, size=40, seed=7)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def make_loss(kind: str, clip, classifier, head, **options) -> losses.Loss:
    if kind == "clip-text":
        return losses.clip_text_loss(clip, "a red apple", **options)
    if kind == "clip-image":
        return losses.clip_image_loss(clip, [reference_image(), images(batch=1, seed=8)[0]], **options)
    if kind == "classifier":
        return losses.classifier_loss(classifier, "scarlet red", **options)
    if kind == "aesthetic":
        return losses.aesthetic_loss(clip, head, **options)
    if kind == "aesthetic-target":
        return losses.aesthetic_loss(clip, head, target=4.5, **options)
    if kind == "symmetry":
        return losses.symmetry_loss()
    if kind == "hps":
        return losses.hps_loss(clip, "a red apple", **options)
    text, symmetry = losses.clip_text_loss(clip, "a red apple", **options), losses.symmetry_loss()
    return losses.weighted_sum([(1.0, text), (0.5, symmetry)])


KINDS = ["clip-text", "clip-image", "classifier", "aesthetic", "aesthetic-target", "symmetry", "sum"]


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_pixels(kind, clip, classifier, head):
    loss = make_loss(kind, clip, classifier, head, cutouts=3, generator=seeded())
    pixels = images().requires_grad_()
    value = loss(pixels)
    value.backward()
    assert value.ndim == 0
    assert torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", [*KINDS, "hps"])
def test_a_loss_built_without_a_generator_owns_one(kind, clip, classifier, head):
    """It leaves torch's global generator as it was, and two losses built alike draw the same views."""
    state = torch.random.get_rng_state()
    first, second = (make_loss(kind, clip, classifier, head, cutouts=4) for _ in range(2))
    # Larger and smaller than the guides' 32 px inputs: paper cutouts, then small views; then again.
    sizes = (48, 16, 48)
    values = [[loss(images(size=size)) for size in sizes] for loss in (first, second)]
    assert all(torch.equal(a, b) for a, b in zip(*values, strict=True))
    if kind != "symmetry":  # its generator moves on from call to call: the same image, other views
        assert not torch.equal(values[0][0], values[0][2])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kind", KINDS)
def test_optimizing_pixels_lowers_the_loss(kind, clip, classifier, head):
    loss = make_loss(kind, clip, classifier, head, cutouts=0)
    logits = torch.logit(images(size=32).clamp(0.05, 0.95)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    with torch.no_grad():
        before = loss(logits.sigmoid()).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss(logits.sigmoid()).backward()
        optimizer.step()
    with torch.no_grad():
        assert loss(logits.sigmoid()).item() < before


def test_weighted_sum_is_the_weighted_sum(clip, head):
    text = losses.clip_text_loss(clip, "a red apple", cutouts=0)
    aesthetic = losses.aesthetic_loss(clip, head, cutouts=0)
    symmetry = losses.symmetry_loss()
    total = losses.weighted_sum([(2.0, text), (0.1, aesthetic), (3.0, symmetry)])
    batch = images()
    expected = 2.0 * text(batch) + 0.1 * aesthetic(batch) + 3.0 * symmetry(batch)
    torch.testing.assert_close(total(batch), expected)
    # Each weighted term, for its curve: the mean over the calls since the last take, then forgotten.
    total(batch.flip(-1))
    terms = total.take()
    assert list(terms) == ["term 1", "term 2", "term 3"]
    both = torch.cat([batch, batch.flip(-1)])
    assert terms["term 3"] == pytest.approx(3.0 * float(symmetry(both)), rel=1e-5)
    assert terms["term 1"] == pytest.approx(2.0 * float(text(both)), rel=1e-5)
    assert sum(terms.values()) == pytest.approx(float(expected + total(batch.flip(-1))) / 2, rel=1e-5)
    assert list(total.take()) == list(terms)  # the call in the line above, alone
    assert total.take() == {}


def test_aesthetic_target_is_a_distance(clip, head):
    batch = images()
    scores = losses.aesthetic_score(clip, head, batch)
    assert scores.shape == (2,)
    target = float(scores.mean().clamp(1, 10))
    loss = losses.aesthetic_loss(clip, head, target=target, cutouts=0)
    torch.testing.assert_close(loss(batch), (scores.clamp(1, 10) - target).abs().mean())
    torch.testing.assert_close(losses.aesthetic_loss(clip, head, cutouts=0)(batch), -scores.mean())


def test_invalid_loss_arguments(clip, head):
    with pytest.raises(ValueError, match="prompt"):
        losses.clip_text_loss(clip, "  ")
    with pytest.raises(ValueError, match="reference"):
        losses.clip_image_loss(clip, [])
    with pytest.raises(ValueError, match="target"):
        losses.aesthetic_loss(clip, head, target=11.0)
    with pytest.raises(ValueError, match="term"):
        losses.weighted_sum([])


def test_scores_without_gradient(clip, classifier):
    batch = images()
    similarity = losses.clip_similarity(clip, batch, ["a red apple", "a blue car", "a dog"])
    assert similarity.shape == (2, 3) and similarity.abs().max() <= 1 + 1e-5
    probability = losses.class_probability(classifier, batch, "Deep Blue")
    assert probability.shape == (2,) and ((probability >= 0) & (probability <= 1)).all()
