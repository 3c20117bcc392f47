"""Reward models as guides (PickScore, HPSv2) and OpenAI-format CLIP files, with tiny random models of the
same classes saved locally and loaded through the loaders' own paths."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from doodl.__main__ import main
from doodl.guides import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    GuideNotFoundError,
    load_clip,
    load_hps,
    load_imagereward,
    load_pickscore,
)
from doodl.losses import hps_loss, hps_score, imagereward_loss, imagereward_score, pickscore, pickscore_loss
from doodl.tiny import (
    TINY_CLIP,
    TINY_IMAGEREWARD,
    register_tiny_clip_architecture,
    save_tiny_clip_checkpoint,
    save_tiny_imagereward,
    save_tiny_pickscore,
)

PROMPT = "a red circle above a blue square"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def architecture(tmp_path_factory):
    """A built-in open_clip architecture name for the tiny CLIP, as "ViT-H-14" is for HPSv2."""
    return register_tiny_clip_architecture(tmp_path_factory.mktemp("arch"))


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    return save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


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


# --- ImageReward --------------------------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps
    )


def _linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / split[0].shape[-1] ** 0.5
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :]) * -10000.0  # BERT's additive mask
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).flatten(-2)


def reference_imagereward(
    state: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ImageReward's forward written from BLIP's ViT and med.py BERT on the checkpoint's own names: BLIP's
    normalization, pre-norm ViT blocks (LayerNorm eps 1e-6), post-norm BERT layers with cross-attention to
    every image token, the first token through the MLP, the reward normalized."""
    gelu, heads = torch.nn.functional.gelu, TINY_IMAGEREWARD["vision"] // 64
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    v = {
        k[len("blip.visual_encoder.") :]: t for k, t in state.items() if k.startswith("blip.visual_encoder.")
    }
    patches = torch.nn.functional.conv2d(
        (pixels - mean) / std, v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=16
    )
    x = patches.flatten(2).transpose(1, 2)
    x = torch.cat([v["cls_token"].expand(len(x), -1, -1), x], 1) + v["pos_embed"]
    for i in range(TINY_IMAGEREWARD["layers"]):
        h = _layer_norm(x, v, f"blocks.{i}.norm1", 1e-6)
        q, k, w = _linear(h, v, f"blocks.{i}.attn.qkv").chunk(3, -1)
        x = x + _linear(_attention(q, k, w, heads), v, f"blocks.{i}.attn.proj")
        h = _layer_norm(x, v, f"blocks.{i}.norm2", 1e-6)
        x = x + _linear(gelu(_linear(h, v, f"blocks.{i}.mlp.fc1")), v, f"blocks.{i}.mlp.fc2")
    image = _layer_norm(x, v, "norm", 1e-6)
    t = {k[len("blip.text_encoder.") :]: w for k, w in state.items() if k.startswith("blip.text_encoder.")}
    e = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = _layer_norm(e, t, "embeddings.LayerNorm", 1e-12)
    for i in range(TINY_IMAGEREWARD["layers"]):
        layer = f"encoder.layer.{i}"
        for kind, source, attend in (("attention", h, mask), ("crossattention", image, None)):
            q, k, w = (
                _linear(x, t, f"{layer}.{kind}.self.{n}")
                for x, n in ((h, "query"), (source, "key"), (source, "value"))
            )
            context = _attention(q, k, w, TINY_IMAGEREWARD["text"] // 64, attend)
            h = _layer_norm(
                _linear(context, t, f"{layer}.{kind}.output.dense") + h,
                t,
                f"{layer}.{kind}.output.LayerNorm",
                1e-12,
            )
        inner = gelu(_linear(h, t, f"{layer}.intermediate.dense"))
        h = _layer_norm(_linear(inner, t, f"{layer}.output.dense") + h, t, f"{layer}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = _linear(r, state, f"mlp.layers.{index}")
    return (r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def test_imagereward_is_blips_forward_on_the_released_checkpoints_names(imagereward_files):
    checkpoint, tokenizer = imagereward_files
    guide = load_imagereward(checkpoint, tokenizer)
    assert guide.image_size == TINY_IMAGEREWARD["image"]
    assert not any(p.requires_grad for m in (guide.vision, guide.text, guide.head) for p in m.parameters())
    _, pixels = pixel_image(1)
    pixels = torch.cat([pixels, pixel_image(2)[1]])
    tokens = guide.tokenizer([PROMPT] * 2, padding="max_length", max_length=35, return_tensors="pt")
    assert tokens["input_ids"][0, 0] == guide.tokenizer.cls_token_id  # as ImageReward's `score` reads it
    state = torch.load(checkpoint, weights_only=True)
    expected = reference_imagereward(state, pixels, tokens["input_ids"], tokens["attention_mask"].float())
    torch.testing.assert_close(imagereward_score(guide, pixels, PROMPT), expected, rtol=1e-4, atol=1e-5)
    assert expected[0] != expected[1]  # the image matters
    assert not torch.allclose(imagereward_score(guide, pixels, "a blue star"), expected)  # so does the prompt


def test_imagereward_loss_has_a_descent_direction_in_pixels(imagereward_files):
    guide = load_imagereward(*imagereward_files)
    loss = imagereward_loss(guide, PROMPT, cutouts=0)
    pixels = pixel_image(3)[1].requires_grad_()
    value = loss(pixels)
    torch.testing.assert_close(value, -imagereward_score(guide, pixels.detach(), PROMPT).mean())
    value.backward()
    step = pixels.detach() - 1e-2 * pixels.grad / pixels.grad.abs().max()
    assert loss(step) < value


def test_imagereward_refuses_what_it_cannot_use(tmp_path, imagereward_files):
    checkpoint, tokenizer = imagereward_files
    with pytest.raises(GuideNotFoundError, match="ImageReward.pt from https://huggingface.co/THUDM"):
        load_imagereward(tmp_path / "missing.pt", tokenizer)
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / "towers.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        load_imagereward(tmp_path / "towers.pt", tokenizer)
    torch.save({k: v for k, v in state.items() if "blocks.1.mlp.fc2" not in k}, tmp_path / "cut.pt")
    with pytest.raises(RuntimeError, match="fc2"):
        load_imagereward(tmp_path / "cut.pt", tokenizer)


# --- registry and command line -----------------------------------------------------------------------


def test_cli_guides_with_pickscore_and_hps(
    tiny_folder, pickscore_folder, hps_file, imagereward_files, architecture, tmp_path, capsys
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
    # ImageReward beside CLIP, with another step rule and regularizer: each iteration prints every term.
    checkpoint, tokenizer = imagereward_files
    mixed = ["--loss", "clip-text=1", "--loss", "imagereward=0.5", "--imagereward", str(checkpoint),
             "--imagereward-tokenizer", str(tokenizer),
             "--step-rule", "adam", "--regularizer", "white"]  # fmt: skip
    assert main(base + mixed) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration")]
    assert len(lines) == 2 and all("clip-text " in line and "imagereward " in line for line in lines)
