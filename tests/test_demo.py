"""What the demo rests on: robust embedded guides and one set of per-capability settings. That the examples
show DOODL at work is tests/test_examples.py's."""

from __future__ import annotations

import pytest
import torch

from doodl import embedded
from doodl.__main__ import chosen_settings, parse_args
from doodl.guides import load_aesthetic_head, load_classifier, load_clip
from doodl.serving import Serving
from doodl.world import robust
from doodl.world.train import TrainSettings, classifier_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def classifier_renders(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of single objects, in [0, 1], with their classes (a shade of red, or not red); drawn from a
    seed the classifier's training never used."""
    images, labels = classifier_data(TrainSettings(seed=11, classifier_images=n))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


def test_embedded_guides_load_through_the_loaders_and_resist_invisible_changes():
    clip = load_clip(str(embedded.CLIP))
    head = load_aesthetic_head(embedded.AESTHETIC_HEAD)
    classifier = load_classifier(embedded.CLASSIFIER)
    assert clip.image_size == 64 and head.in_features == clip.model.visual.output_dim
    pixels, labels = classifier_renders(48)
    # An attack inside the 8/255 ball flips a classifier trained on clean renders nearly always (2 % of
    # held-out renders survive it); the shipped, adversarially trained one keeps its answers.
    clean, attacked = robust.accuracy(classifier.logits, pixels, labels, torch.Generator().manual_seed(0))
    assert clean >= 0.95 and attacked >= 0.85
    # An object of another color is "not red", not the nearest shade: DOODL cannot reach a shade by
    # turning the object yellow.
    other = labels == classifier.class_index("not red")
    with torch.no_grad():
        assert other.sum() >= 5 and (classifier.logits(pixels[other]).argmax(1) == labels[other]).all()


def test_app_and_command_line_use_the_same_settings_per_capability(tiny_folder):
    for serving in (Serving(), Serving.public()):  # the public budget leaves them whole
        assert serving.presets() == embedded.EMBEDDED_PRESETS
    for loss, capability in (("clip-text", "text"), ("classifier", "vocabulary"), ("aesthetic", "aesthetic")):
        settings, cutouts = chosen_settings(parse_args(["--prompt", "x", "--loss", loss]))
        assert settings == embedded.EMBEDDED_PRESETS[capability].settings
        assert cutouts == embedded.EMBEDDED_PRESETS[capability].cutouts
    settings, _ = chosen_settings(parse_args(["--prompt", "x", "--model", str(tiny_folder), "--steps", "7"]))
    assert settings.iterations == embedded.PAPER.settings.iterations and settings.steps == 7
