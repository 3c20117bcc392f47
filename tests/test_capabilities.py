"""The capability table: every loss loads its guides through `load_guide` from saved tiny models of the real
kinds, builds itself, and gives a differentiable scalar; each capability's losses are in the table."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from doodl.capabilities import (
    CAPABILITIES,
    GUIDE_KINDS,
    GUIDE_LOADERS,
    LOSSES,
    Crops,
    Target,
    build_loss,
    build_weighted,
    capability_of,
    load_guide,
    load_guides,
    split_reference,
    weighted_terms,
)
from doodl.guides import Classifier, Clip, ImageRewardModel, TransformersClip
from doodl.tiny import (
    TINY_CLIP,
    register_tiny_clip_architecture,
    save_tiny_classifier,
    save_tiny_clip,
    save_tiny_clip_checkpoint,
    save_tiny_imagereward,
    save_tiny_pickscore,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A model name for every guide role, each a tiny model saved as the real ones are."""
    folder = tmp_path_factory.mktemp("guides")
    clip = str(save_tiny_clip(folder / "clip"))
    head = folder / "head.safetensors"
    save_file(
        {
            "weight": 0.5
            * torch.randn(1, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(0)),
            "bias": torch.tensor([5.5]),
        },
        head,
    )
    architecture = register_tiny_clip_architecture(folder / "arch")
    hps = save_tiny_clip_checkpoint(folder / "HPS_v2.1_compressed.pt", "hps")
    imagereward, bert = save_tiny_imagereward(folder / "imagereward")
    return {
        "clip": clip,
        "classifier": str(save_tiny_classifier(folder / "classifier", ("maroon", "rose"))),
        "aesthetic_clip": clip,
        "aesthetic_head": str(head),
        "pickscore": str(save_tiny_pickscore(folder / "pickscore")),
        "hps": f"{hps} {architecture}",
        "imagereward": f"{imagereward} {bert}",
    }


@pytest.fixture(scope="module")
def guides(models) -> dict:
    return load_guides(list(LOSSES), models)


TARGET = Target(
    text="a red circle", references=(Image.new("RGB", (40, 40), (200, 30, 60)),), target_class="rose"
)


def test_every_role_has_a_loader_and_every_loss_names_known_roles():
    assert set(GUIDE_KINDS.values()) <= set(GUIDE_LOADERS)
    for kind in LOSSES.values():
        assert set(kind.guides) <= set(GUIDE_KINDS), kind.name


def test_load_guide_gives_each_kind_its_guide(models):
    assert isinstance(load_guide("clip", models["clip"]), Clip)
    assert isinstance(load_guide("classifier", models["classifier"]), Classifier)
    assert isinstance(load_guide("aesthetic_head", models["aesthetic_head"]), torch.nn.Linear)
    assert isinstance(load_guide("pickscore", models["pickscore"]), TransformersClip)
    assert isinstance(load_guide("hps", models["hps"]), Clip)
    assert isinstance(load_guide("imagereward", models["imagereward"]), ImageRewardModel)
    with pytest.raises(ValueError, match="unknown kind of guide 'lpips'"):
        load_guide("lpips", "x")


def test_load_guides_loads_each_role_once(models):
    calls = []

    def load(kind: str, name: str):
        calls.append((kind, name))
        return load_guide(kind, name)

    loaded = load_guides(["clip-text", "clip-image", "aesthetic"], models, load)
    assert set(loaded) == {"clip", "aesthetic_clip", "aesthetic_head"}
    assert len(calls) == len(set(calls)) == 2  # the one CLIP serves both of its roles
    assert loaded["clip"] is loaded["aesthetic_clip"]
    with pytest.raises(ValueError, match="the HPSv2 checkpoint .* is not given"):
        load_guides(["hps"], {**models, "hps": ""})


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_builds_and_has_a_gradient(guides, name):
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = build_loss(name, guides, TARGET, Crops(2, generator=torch.Generator().manual_seed(1)))
    value = loss(images)
    assert value.ndim == 0 and torch.isfinite(value)
    (gradient,) = torch.autograd.grad(value, images)
    assert gradient.abs().sum() > 0


def test_losses_refuse_what_they_cannot_aim_at(guides):
    with pytest.raises(ValueError, match="no reference image"):
        build_loss("clip-image", guides, Target(text="x"))
    with pytest.raises(ValueError, match="the target class is empty"):
        build_loss("classifier", guides, Target(text="x"))
    with pytest.raises(ValueError, match="'roze' is not a label"):
        build_loss("classifier", guides, Target(target_class="roze"))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope", guides, TARGET)


def test_a_weighted_sum_is_the_sum_of_its_terms(guides):
    images = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))

    def crops() -> Crops:
        return Crops(2, generator=torch.Generator().manual_seed(3))

    text = build_loss("clip-text", guides, TARGET, crops())(images)
    symmetry = build_loss("symmetry", guides, TARGET, crops())(images)
    weighted = build_weighted([("clip-text", 2.0), ("symmetry", 0.5)], guides, TARGET, crops())
    assert torch.allclose(weighted(images), 2.0 * text + 0.5 * symmetry)
    terms = weighted.take()  # each weighted term by its loss's name, for its curve
    assert terms == pytest.approx({"clip-text": 2.0 * float(text), "symmetry": 0.5 * float(symmetry)})


def test_weighted_terms_are_read_one_way_for_the_command_line_and_the_page():
    assert weighted_terms(["clip-text", "symmetry=0.5"]) == [("clip-text", 1.0), ("symmetry", 0.5)]
    labels = {"CLIP": "clip-text", "ImageReward": "imagereward"}
    assert weighted_terms([" CLIP = 1 ", " ImageReward=0.25", ""], labels) == [
        ("clip-text", 1.0),
        ("imagereward", 0.25),
    ]
    assert weighted_terms(["clip-text=1", "symmetry=0"]) == [("clip-text", 1.0)]  # weight 0: left out
    refused = {
        "unknown loss 'nope': choose among": ["nope=1"],
        "the weight of symmetry is 'lots', not a number": ["symmetry=lots"],
        "the weight of symmetry is -2: it must be a number of 0 or more": ["symmetry=-2"],
        "the weight of symmetry is nan": ["symmetry=nan"],
        "'clip-text' is named twice": ["clip-text=1", "clip-text=2"],
        "no guide has a weight above 0": ["clip-text=0"],
    }
    for message, items in refused.items():
        with pytest.raises(ValueError, match=message):
            weighted_terms(items)
    with pytest.raises(ValueError, match="guide 'HPSv2' is not served here: choose among CLIP, ImageReward"):
        weighted_terms(["HPSv2"], labels, refusal="guide {!r} is not served here")


def test_each_capability_runs_with_its_own_losses():
    for name, capability in CAPABILITIES.items():
        assert capability.losses and set(capability.losses + capability.extra) <= set(LOSSES)
        assert all(capability_of(loss) == name for loss in capability.losses)
    assert capability_of("symmetry") == "text"  # a loss of no capability runs with text's settings


def test_two_word_references_split_unless_a_path(tmp_path):
    assert split_reference("ViT-L-14 openai") == ("ViT-L-14", "openai")
    assert split_reference("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    assert split_reference(" ViT-B-32 ") == ("ViT-B-32", None)
    spaced = tmp_path / "a folder"
    spaced.mkdir()
    assert split_reference(str(spaced)) == (str(spaced), None)
