"""Reward models as guides (PickScore, HPSv2) and OpenAI-format CLIP files, with tiny random models of the
same classes saved locally and loaded through the loaders' own paths."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from doodl.__main__ import main
from doodl.guides import GuideNotFoundError, load_clip, load_hps, load_pickscore
from doodl.losses import hps_loss, hps_score, pickscore, pickscore_loss
from doodl.tiny import (
    TINY_CLIP,
    register_tiny_clip_architecture,
    save_tiny_clip_checkpoint,
    save_tiny_pickscore,
)

PROMPT = "a red circle above a blue square"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def architecture(tmp_path_factory):
    """A built-in open_clip architecture name for the tiny CLIP, as "ViT-H-14" is for HPSv2."""
    return register_tiny_clip_architecture(tmp_path_factory.mktemp("arch"))


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory):
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt", "hps")


def pixel_image(seed: int = 0, size: int = 32) -> tuple[Image.Image, torch.Tensor]:
    """The same image as PIL and as a (1, 3, H, W) tensor in [0, 1]: exact in 8 bits, at the guide's size."""
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


# --- PickScore ---------------------------------------------------------------------------------------


def test_pickscore_loads_model_and_processor_from_a_folder(pickscore_folder):
    guide = load_pickscore(pickscore_folder)
    assert guide.image_size == 32 and guide.mean == pytest.approx(OPENAI_MEAN)
    assert guide.logit_scale == pytest.approx(float(np.exp(2.6592)), rel=1e-4)  # CLIP's initial temperature
    assert not any(p.requires_grad for p in guide.model.parameters())


def test_pickscore_is_the_reward_models_own_score(pickscore_folder):
    """logits_per_image of the CLIPModel on the processor's inputs: how PickScore's authors score."""
    guide = load_pickscore(pickscore_folder)
    model = CLIPModel.from_pretrained(pickscore_folder)
    processor = CLIPProcessor.from_pretrained(pickscore_folder)
    texts = [PROMPT, "a photo of a dog"]
    image, pixels = pixel_image()
    with torch.no_grad():
        inputs = processor(text=texts, images=image, return_tensors="pt", padding=True)
        expected = model(**inputs).logits_per_image[0]
    assert (expected[0] - expected[1]).abs() > 1e-3  # the texts are told apart: the check means something
    torch.testing.assert_close(pickscore(guide, pixels, texts)[0], expected, rtol=0, atol=1e-4)
    whole_image = pickscore_loss(guide, PROMPT, cutouts=0)
    assert whole_image(pixels).item() == pytest.approx(-expected[0].item(), abs=1e-4)


def test_pickscore_loss_has_a_descent_direction_in_pixels(pickscore_folder):
    guide = load_pickscore(pickscore_folder)
    loss = pickscore_loss(guide, PROMPT, cutouts=0)
    _, pixels = pixel_image(1)
    pixels.requires_grad_(True)
    value = loss(pixels)
    (grad,) = torch.autograd.grad(value, pixels)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # First order: a small step against the gradient lowers the loss by about step * |grad|^2.
    step = 1e-3 / grad.norm()
    with torch.no_grad():
        lowered = loss(pixels - step * grad)
    assert (value - lowered).item() == pytest.approx((step * grad.norm() ** 2).item(), rel=0.1)


def test_pickscore_views_scored_in_chunks_give_the_same_loss_and_gradient(pickscore_folder):
    guide = load_pickscore(pickscore_folder)
    results = []
    for per_chunk in (None, 3):
        loss = pickscore_loss(
            guide, PROMPT, cutouts=8, generator=torch.Generator().manual_seed(0), views_per_chunk=per_chunk
        )
        pixels = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2), requires_grad=True)
        value = loss(pixels)
        results.append((value, torch.autograd.grad(value, pixels)[0]))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def test_pickscore_refuses_what_it_cannot_use(tmp_path, pickscore_folder):
    with pytest.raises(GuideNotFoundError, match="reward model .* does not exist"):
        load_pickscore(tmp_path / "missing")
    with pytest.raises(ValueError, match="non-empty prompt"):
        pickscore_loss(load_pickscore(pickscore_folder), "  ")


# --- HPSv2 -------------------------------------------------------------------------------------------


def test_hps_loads_a_state_dict_wrapped_like_hpsv2(architecture, hps_file):
    clip = load_hps(hps_file, architecture)
    saved = torch.load(hps_file, weights_only=True)["state_dict"]
    for key, value in clip.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    assert type(clip.model.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU  # ViT-H-14 is GELU


def test_hps_score_is_100_times_open_clips_cosine(architecture, hps_file):
    clip = load_hps(hps_file, architecture)
    image, pixels = pixel_image(3)
    preprocess = open_clip.image_transform(32, is_train=False, mean=clip.mean, std=clip.std)
    tokens = open_clip.get_tokenizer(architecture)([PROMPT])
    with torch.no_grad():
        image_features, text_features, _ = clip.model(preprocess(image)[None], tokens)
    expected = 100 * (image_features @ text_features.T).item()
    assert hps_score(clip, pixels, [PROMPT]).item() == pytest.approx(expected, abs=1e-3)
    assert hps_loss(clip, PROMPT, cutouts=0)(pixels).item() == pytest.approx(-expected, abs=1e-3)


def test_hps_refuses_missing_or_foreign_checkpoints(architecture, tmp_path):
    with pytest.raises(GuideNotFoundError, match="HPS_v2.1_compressed.pt from https://"):
        load_hps(tmp_path / "nowhere.pt", architecture)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"not.a.clip.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(ValueError, match="does not load into the 'doodl-tiny-clip' architecture"):
        load_hps(foreign, architecture)


# --- OpenAI-format CLIP files -------------------------------------------------------------------------


def embeddings_of(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(pixels)


@pytest.mark.parametrize("layout", ["openai", "openai-state-dict"])
def test_openai_files_get_quickgelu(architecture, tmp_path, layout):
    path = save_tiny_clip_checkpoint(tmp_path / "openai.pt", layout)
    clip = load_clip(architecture, str(path))
    activations = {type(m).__name__ for m in clip.model.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}
    state = clip.model.state_dict()
    quick, plain = (open_clip.CLIP(**TINY_CLIP, quick_gelu=q).eval() for q in (True, False))
    for reference in (quick, plain):
        reference.load_state_dict(state)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = embeddings_of(clip.model, pixels)
    torch.testing.assert_close(got, embeddings_of(quick, pixels), rtol=0, atol=1e-6)
    # What the bug did: the same weights with GELU give other features.
    assert (got - embeddings_of(plain, pixels)).abs().max() > 1e-3


def test_open_clip_files_keep_their_configured_activation(architecture, tmp_path):
    clip = load_clip(architecture, str(save_tiny_clip_checkpoint(tmp_path / "laion.pt", "open_clip")))
    assert {type(m).__name__ for m in clip.model.modules() if "GELU" in type(m).__name__} == {"GELU"}


# --- registry and command line -----------------------------------------------------------------------


def test_cli_guides_with_pickscore_and_hps(
    tiny_folder, pickscore_folder, hps_file, architecture, tmp_path, capsys
):
    base = ["--model", str(tiny_folder), "--prompt", PROMPT, "--steps", "2", "--iterations", "2",
            "--cutouts", "2", "--out", str(tmp_path / "reward.png")]  # fmt: skip
    assert main(base + ["--loss", "hps"]) == 2
    error = capsys.readouterr().err
    assert "the HPSv2 checkpoint" in error and "is not given" in error
    rewards = ["--loss", "pickscore", "--pickscore", str(pickscore_folder), "--loss", "hps=0.5",
               "--hps", str(hps_file), "--hps-architecture", architecture]  # fmt: skip
    assert main(base + rewards) == 0
    assert capsys.readouterr().out.count("iteration  ") == 2
    assert Image.open(tmp_path / "reward.png").size == (64, 64)
