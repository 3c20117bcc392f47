"""The shapes world: rendering, captions, the judge, the beauty score and the shipped models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from doodl.world import beauty, judge, shapes

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "embedded"


def scene_list(seed: int, count: int, n_objects: int) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.random_scene(rng, n_objects) for _ in range(count)]


def test_render_is_deterministic_from_seed():
    first = shapes.render_dataset(shapes.random_scenes(7, 20))
    second = shapes.render_dataset(shapes.random_scenes(7, 20))
    other = shapes.render_dataset(shapes.random_scenes(8, 20))
    assert first.dtype == np.uint8 and first.shape == (20, 64, 64, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_captions_parse_back_to_their_scenes():
    for scene in shapes.random_scenes(3, 200):
        assert shapes.parse_caption(shapes.caption(scene)) == shapes.describe(scene)
    with pytest.raises(ValueError):
        shapes.parse_caption("a dog in sunglasses")


@pytest.mark.parametrize("n_objects", [1, 2])
def test_judge_is_right_on_clean_renders(n_objects):
    scenes = scene_list(100 + n_objects, 100, n_objects)
    verdicts = [judge.judge(shapes.render(s), shapes.caption(s)) for s in scenes]
    assert np.mean([v.ok for v in verdicts]) >= 0.95


def test_judge_survives_blur():
    scenes = scene_list(5, 60, 1)
    blurred = [
        np.asarray(Image.fromarray(shapes.render(s)).filter(ImageFilter.GaussianBlur(1.0))) for s in scenes
    ]
    verdicts = [judge.judge(image, shapes.caption(s)) for image, s in zip(blurred, scenes, strict=True)]
    assert np.mean([v.ok for v in verdicts]) >= 0.9


def test_judge_rejects_wrong_captions():
    scene = scene_list(9, 1, 1)[0]
    obj = scene.objects[0]
    other_color = next(c for c in shapes.COLORS if c != obj.color)
    other_shape = next(s for s in shapes.SHAPES if s != obj.shape)
    image = shapes.render(scene)
    assert not judge.judge(image, f"a {other_color} {obj.shape}").color_ok
    assert not judge.judge(image, f"a {obj.color} {other_shape}").shape_ok


def drawn(outline: np.ndarray, color: tuple[int, int, int] = (200, 20, 60)) -> np.ndarray:
    """An outline (x, y in a 64-pixel frame) filled on a pale background, anti-aliased like a render."""
    scale = shapes.SUPERSAMPLE
    canvas = Image.new("RGB", (64 * scale, 64 * scale), (230, 230, 225))
    ImageDraw.Draw(canvas).polygon([(x * scale, y * scale) for x, y in outline], fill=color)
    return np.asarray(canvas.resize((64, 64), Image.BOX))


def concave_triangle(bulge: float) -> np.ndarray:
    """The world's triangle with each side bowed inward by `bulge` of its distance to the centre, as the
    embedded generator draws triangles."""
    corners = np.array(shapes.shape_polygon("triangle", (32.0, 34.0), 18.0))
    centre = corners.mean(0)
    sides = []
    for a, b in zip(corners, np.roll(corners, -1, 0), strict=True):
        control = (a + b) / 2 + bulge * 2 * (centre - (a + b) / 2)  # a quadratic curve's control point
        t = np.linspace(0, 1, 12, endpoint=False)[:, None]
        sides.append((1 - t) ** 2 * a + 2 * t * (1 - t) * control + t**2 * b)
    return np.concatenate(sides)


def thin_star(inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 20.0, 20.0 * inner)
    return np.stack([32 + radii * np.cos(angles), 33 + radii * np.sin(angles)], 1)


@pytest.mark.parametrize("bulge", [0.1, 0.15, 0.2])  # the generator's triangles lie in this range
def test_judge_reads_a_triangle_with_concave_sides_as_a_triangle(bulge):
    (blob,) = judge.find_blobs(drawn(concave_triangle(bulge)))
    assert blob.shape == "triangle", blob.features


@pytest.mark.parametrize("inner", [0.3, 0.35, 0.45])
def test_judge_reads_a_thin_armed_star_as_a_star(inner):
    (blob,) = judge.find_blobs(drawn(thin_star(inner)))
    assert blob.shape == "star", blob.features


def test_beauty_prefers_a_centred_shape_to_a_clipped_one():
    background = shapes.Background((230, 230, 230), (230, 230, 230), "plain")
    centred = shapes.Scene((shapes.Object("circle", "blue", 1, (32.0, 32.0), 15.0),), background)
    clipped = dataclasses.replace(
        centred, objects=(dataclasses.replace(centred.objects[0], center=(60.0, 6.0)),)
    )
    assert beauty.beauty(centred) > beauty.beauty(clipped) + 3
    assert 1 <= beauty.beauty(clipped) < beauty.beauty(centred) <= 10


def needs(*paths: str) -> pytest.MarkDecorator:
    missing = [p for p in paths if not (ASSETS / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"embedded weights not trained yet: {missing}")


@needs("sd/model_index.json")
def test_embedded_pipeline_loads_and_samples():
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        ASSETS / "sd", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert pipeline.vae.config.scaling_factor != 0.18215  # its own measured factor, not SD's
    assert pipeline.text_encoder.config.hidden_size == pipeline.unet.config.cross_attention_dim


@needs("clip/open_clip_model.safetensors")
def test_embedded_clip_loads_with_open_clip():
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ASSETS / 'clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ASSETS / 'clip'}")
    image = preprocess(Image.fromarray(shapes.render(scene_list(0, 1, 1)[0]))).unsqueeze(0)
    with torch.no_grad():
        features = model.encode_image(image, normalize=True)
        text = model.encode_text(tokenizer(["a red circle"]), normalize=True)
    assert features.shape == text.shape == (1, 64)


@needs("classifier/config.json", "aesthetic/aesthetic_head.safetensors")
def test_embedded_classifier_and_aesthetic_head_load():
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(ASSETS / "classifier")
    processor = AutoImageProcessor.from_pretrained(ASSETS / "classifier")
    assert tuple(classifier.config.id2label[i] for i in range(5)) == (*shapes.SHADE_NAMES["red"], "not red")
    inputs = processor(Image.fromarray(shapes.render(scene_list(0, 1, 1)[0])), return_tensors="pt")
    assert classifier(**inputs).logits.shape == (1, 5)
    head = load_file(ASSETS / "aesthetic" / "aesthetic_head.safetensors")
    assert head["weight"].shape == (1, 64) and head["bias"].shape == (1,)


def safetensors_weights(folder: Path) -> dict:
    """Every tensor saved under a folder, keyed by file and name."""
    from safetensors.torch import load_file

    return {
        f"{path.relative_to(folder)}:{name}": tensor
        for path in sorted(folder.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def test_tiny_build_repeats_from_its_seed_and_leaves_the_global_rng_alone(tmp_path):
    import torch

    from doodl.tiny import save_tiny_pipeline

    state = torch.get_rng_state()
    first = safetensors_weights(save_tiny_pipeline(tmp_path / "first", seed=5))
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.rand(3)  # a caller that has drawn numbers of its own gets the same model
        second = safetensors_weights(save_tiny_pipeline(tmp_path / "second", seed=5))
    other = safetensors_weights(save_tiny_pipeline(tmp_path / "other", seed=6))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert torch.equal(torch.get_rng_state(), state)


def test_seeded_stage_draws_from_the_seed_and_leaves_the_global_rng_alone():
    import torch

    from doodl.world.train import TrainSettings, seeded_stage

    drawn = []
    stage = seeded_stage(lambda s, log: drawn.append(torch.rand(3)))
    state = torch.get_rng_state()
    stage(TrainSettings(seed=4), print)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(drawn[0], torch.rand(3, generator=torch.Generator().manual_seed(4)))


def test_fit_follows_the_schedule_and_logs_averaged_losses():
    import torch

    from doodl.world.train import Progress, StepLog, StepLoss, fit, learning_rate

    weight = torch.nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    lines, rates, losses = [], [], []

    def step_loss() -> StepLoss:
        loss = (weight - 1) ** 2
        losses.append(loss.item())
        return StepLoss(loss, (loss, 2 * loss))

    steps = fit(
        optimizer,
        step_loss,
        Progress(steps=4, minutes=1e9),  # the wall-clock cap out of reach: the schedule follows the steps
        lr=0.1,
        warmup=2,
        logging=StepLog(lines.append, "toy", losses="loss {:.4f} twice {:.4f}", every=2),
        after_step=lambda step: rates.append(optimizer.param_groups[0]["lr"]),
    )
    assert steps == 4
    assert rates == pytest.approx([learning_rate(0.1, step, step / 4, 2) for step in range(4)])
    assert losses[1] < losses[0]  # the steps were taken
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        f"toy step {n} loss {np.mean(losses[n - 2 : n]):.4f} twice {2 * np.mean(losses[n - 2 : n]):.4f}"
        for n in (2, 4)
    ]


def test_training_captions_leave_out_colors_and_whole_captions_at_their_rates():
    import torch

    from doodl.tokenizer import clip_tokenizer
    from doodl.world.train import TrainSettings, caption_tokens, caption_variants, training_captions

    assert caption_variants("a red star") == ["a red star", "a star"]
    assert caption_variants("a red circle above a blue square") == [
        "a red circle above a blue square",
        "a red circle above a square",
        "a circle above a blue square",
        "a circle above a square",
    ]
    captions = ["a red star", "a green circle left of a yellow square"]
    tokens = caption_tokens(captions)
    decode = clip_tokenizer().batch_decode

    def texts(color_dropout: float, cfg_dropout: float) -> set[str]:
        s = TrainSettings(color_dropout=color_dropout, cfg_dropout=cfg_dropout)
        ids = training_captions(tokens, torch.tensor([0, 1] * 50), s, torch.Generator().manual_seed(0))
        return set(decode(ids, skip_special_tokens=True))

    assert texts(0.0, 0.0) == set(captions)
    assert texts(1.0, 0.0) == {
        "a star",
        "a green circle left of a square",
        "a circle left of a yellow square",
        "a circle left of a square",
    }
    assert texts(0.5, 0.0) > set(captions)
    assert texts(0.0, 1.0) == {""}
