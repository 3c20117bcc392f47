"""Starting from a photo: the partial chain of `DoodlSettings.photo_strength`, the trust region of
`DoodlSettings.fidelity`, the tied step that keeps an inverted pair's difference, and a photo request on every
tab through `doodl.serving.request` and `doodl.showcase.run`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from doodl import DoodlSettings, edict_denoise
from doodl.chain import denoise, schedule_of
from doodl.losses import WeightedSum
from doodl.optimize import TrustRegion, invert_image, optimize
from doodl.pipeline import count_unet_calls
from doodl.serving import SETTING_NAMES, ModelCache, ModelNames, Serving, request, run_options
from doodl.showcase import final, run
from tests.test_app import prepare_models

PROMPT = "a red circle"
pytestmark = pytest.mark.usefixtures("one_thread")


def mean_gray_loss(images: torch.Tensor) -> torch.Tensor:
    return ((images - 0.5) ** 2).mean()


def test_projection_keeps_each_latent_within_its_radius():
    generator = torch.Generator().manual_seed(0)
    starts = tuple(torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    region = TrustRegion.around(starts, DoodlSettings(fidelity=0.9))
    assert region.radii == pytest.approx(tuple(0.1 * float(z.norm()) for z in starts))
    far = tuple(z + torch.randn(z.shape, generator=generator, dtype=torch.float64) for z in starts)
    near = tuple(z + 1e-3 * torch.ones_like(z) for z in starts)
    for z, start, radius in zip(region.project(far), starts, region.radii):
        assert float((z - start).norm()) == pytest.approx(radius, rel=1e-12)  # onto the ball's edge
    for z, moved in zip(region.project(near), near):
        assert torch.equal(z, moved)  # inside: left alone
    # The projection is the nearest point of the ball: along the offset, not elsewhere.
    offset, projected = far[0] - starts[0], region.project(far)[0] - starts[0]
    cosine = float((offset * projected).sum() / (offset.norm() * projected.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-12)


def test_fidelity_zero_sets_no_region_and_bad_values_are_refused():
    z = torch.ones(1, 4, 2, 2)
    assert TrustRegion.around((z, z), DoodlSettings(fidelity=0)) is None
    assert TrustRegion.around((z, z), DoodlSettings(fidelity=1)).radii == (0.0, 0.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fidelity"):
            DoodlSettings(fidelity=bad)


@pytest.fixture(scope="module")
def photo_latents(tiny):
    photo = Image.new("RGB", (64, 64), (30, 70, 205))
    return invert_image(tiny, photo, PROMPT, DoodlSettings(steps=6))


def test_a_run_from_a_photo_stays_in_its_trust_region(tiny, photo_latents):
    # A large rate and clip: unbounded, the latents would leave a 5 % ball within one step.
    loose = DoodlSettings(steps=6, iterations=4, learning_rate=1e4, grad_clip=0.5, fidelity=0)
    tight = replace(loose, fidelity=0.95)
    far = optimize(tiny, PROMPT, mean_gray_loss, loose, init=photo_latents)
    steps = []
    near = optimize(tiny, PROMPT, mean_gray_loss, tight, init=photo_latents, callback=steps.append)
    for step in steps:
        for z, start in zip(step.latents, photo_latents):
            assert float((z - start).norm()) <= 0.05 * float(start.norm()) * (1 + 1e-9)
    distance = [float((r.last.latents[0] - photo_latents[0]).norm()) for r in (far, near)]
    assert distance[0] > 2 * distance[1], distance  # the region is what held it back


def test_the_tied_step_keeps_an_inverted_pairs_difference(tiny, photo_latents):
    x0, y0 = photo_latents
    assert float((x0 - y0).norm()) > 0  # EDICT's inversion is an untied pair
    settings = DoodlSettings(steps=6, iterations=2, fidelity=0, perturbation=0)
    x, y = optimize(tiny, PROMPT, mean_gray_loss, settings, init=photo_latents).last.latents
    # Both latents took the same step (renormalized each to its own norm): their difference stays, where
    # averaging them, as the paper does from noise, would erase it.
    assert torch.allclose(x - y, x0 - y0, atol=1e-2 * float((x0 - y0).abs().max()))


def test_fidelity_changes_nothing_from_noise(tiny):
    settings = DoodlSettings(steps=5, iterations=3, learning_rate=100.0, fidelity=0)
    free = optimize(tiny, PROMPT, mean_gray_loss, settings)
    held = optimize(tiny, PROMPT, mean_gray_loss, replace(settings, fidelity=0.99))
    assert free.losses == held.losses
    x, y = held.last.latents
    assert torch.equal(x, y)  # tied from noise: one latent, as the paper's averaging keeps it


def test_the_photo_weight_prices_the_distance_to_the_photos_reconstruction(tiny, photo_latents):
    settings = DoodlSettings(steps=6, iterations=2, learning_rate=100.0, fidelity=0, photo_weight=300.0)
    steps = []
    optimize(tiny, PROMPT, mean_gray_loss, settings, photo_latents, steps.append)
    eps = tiny.noise_predictor(tiny.encode_prompt(PROMPT), settings.guidance_scale)
    schedule = schedule_of(settings, tiny, from_photo=True)
    with torch.no_grad():
        reconstruction = tiny.decode(edict_denoise(eps, *photo_latents, schedule)[0])
        images = [tiny.decode(z) for z in edict_denoise(eps, *steps[1].latents, schedule)]
    # Iteration 2's loss, written out: the guide plus the weight times the mean squared pixel distance to
    # the reconstruction, averaged over the pair's two images.
    expected = sum(mean_gray_loss(i) + 300.0 * ((i - reconstruction) ** 2).mean() for i in images) / 2
    assert steps[1].loss == pytest.approx(float(expected), rel=1e-4)
    assert float(((images[0] - reconstruction) ** 2).mean()) > 0  # the term was not zero: it was tested
    # At the reconstruction itself the distance is zero: iteration 1 reports the guide's loss alone.
    assert steps[0].loss == pytest.approx(float(mean_gray_loss(reconstruction)), rel=1e-4)
    # Each weighted term is reported beside the sum, for its curve: the guide's and the distance's.
    guide = sum(mean_gray_loss(i) for i in images) / 2
    assert steps[1].terms == pytest.approx(
        {"guide": float(guide), "closeness to the photo": float(expected - guide)}, rel=1e-4
    )
    assert steps[0].terms["closeness to the photo"] == pytest.approx(0.0, abs=1e-6)


def test_a_weighted_guide_keeps_its_terms_beside_the_photos(tiny, photo_latents):
    settings = DoodlSettings(steps=4, iterations=2, fidelity=0, photo_weight=10.0)
    guide = WeightedSum([("gray", 1.0, mean_gray_loss), ("gray again", 0.5, mean_gray_loss)])
    result = optimize(tiny, PROMPT, guide, settings, photo_latents)
    terms = result.last.terms
    assert list(terms) == ["gray", "gray again", "closeness to the photo"]
    assert terms["gray again"] == pytest.approx(0.5 * terms["gray"], rel=1e-6)
    assert sum(terms.values()) == pytest.approx(result.last.loss, rel=1e-5)


def test_the_photo_weight_changes_nothing_from_noise(tiny):
    settings = DoodlSettings(steps=5, iterations=3, learning_rate=100.0)
    assert optimize(tiny, PROMPT, mean_gray_loss, settings).losses == (
        optimize(tiny, PROMPT, mean_gray_loss, replace(settings, photo_weight=1e3)).losses
    )
    with pytest.raises(ValueError, match="photo_weight"):
        DoodlSettings(photo_weight=-1)


def test_a_photos_chain_is_the_last_strength_of_the_steps(tiny):
    settings = DoodlSettings(steps=10, photo_strength=0.4)
    full, part = schedule_of(settings, tiny), schedule_of(settings, tiny, from_photo=True)
    assert len(full) == 10 and len(part) == 4
    assert (part.timesteps, part.a, part.b) == (full.timesteps[6:], full.a[6:], full.b[6:])
    assert len(schedule_of(replace(settings, photo_strength=0.01), tiny, from_photo=True)) == 1  # never none
    assert len(schedule_of(replace(settings, photo_strength=1.0), tiny, from_photo=True)) == 10
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="photo_strength"):
            DoodlSettings(photo_strength=bad)
    with pytest.raises(ValueError, match="no last 11 steps"):
        full.last(11)


@pytest.mark.parametrize("sampler", ["auto", "ddim"])  # a photo's chain is EDICT's whatever the sampler
def test_a_partial_inversion_regenerates_the_photo_in_its_own_steps(tiny, sampler):
    settings = DoodlSettings(steps=10, photo_strength=0.4, sampler=sampler)
    photo = Image.new("RGB", (64, 64), (200, 40, 40))
    with count_unet_calls(tiny.unet) as calls:
        x, y = invert_image(tiny, photo, PROMPT, settings)
    assert calls.calls == 2 * 4  # two half-steps of each of the last 4 steps, and no more
    eps = tiny.noise_predictor(tiny.encode_prompt(PROMPT), settings.guidance_scale)
    with torch.no_grad():
        x0, _ = denoise(settings, eps, x, y, tiny, from_photo=True)
        encoded = tiny.encode(torch.tensor([200, 40, 40]).div(255).view(1, 3, 1, 1).expand(1, 3, 64, 64))
        whole = invert_image(tiny, photo, PROMPT, replace(settings, photo_strength=1.0))
    assert (x0 - encoded.double()).abs().max() < 1e-5  # exact: EDICT's inverse, on fewer steps
    # Stopped at an intermediate timestep, the latent is still mostly the photo's: nearer to it than the
    # whole inversion, which reaches the noise.
    assert float((x - encoded).norm()) < float((whole[0] - encoded).norm())
    with count_unet_calls(tiny.unet) as calls:
        steps = optimize(tiny, PROMPT, mean_gray_loss, replace(settings, iterations=2), init=(x, y))
    assert steps.losses[0] == pytest.approx(float(mean_gray_loss(tiny.decode(x0))), rel=1e-3)
    assert calls.calls == 2 * (2 * 4 + 2 * 4)  # an iteration: 4 steps forward, then back


def test_the_photo_strength_changes_nothing_from_noise(tiny):
    settings = DoodlSettings(steps=5, iterations=2, learning_rate=100.0)
    assert optimize(tiny, PROMPT, mean_gray_loss, settings).losses == (
        optimize(tiny, PROMPT, mean_gray_loss, replace(settings, photo_strength=0.2)).losses
    )


def test_fidelity_and_the_photo_weight_are_run_settings():
    assert {"fidelity", "photo_weight", "photo_strength"} <= set(SETTING_NAMES)
    assert run_options(fidelity=0.5).settings.fidelity == 0.5
    assert run_options(photo_strength=0.5).settings.photo_strength == 0.5
    assert run_options(photo_weight=30).settings.photo_weight == 30.0
    with pytest.raises(ValueError, match="fidelity"):
        run_options(fidelity=2.0)
    with pytest.raises(ValueError, match="photo_weight"):
        run_options(photo_weight=-1)
    with pytest.raises(ValueError, match="photo_strength"):
        run_options(photo_strength=0)


# --- every tab from a photo, through the checks and the run the page shows ---------------------------

FAST = {"steps": 2, "iterations": 2, "cutouts": 2, "seed": 0, "compare": True}


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> ModelNames:
    return prepare_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (48, 40), (30, 70, 205)).save(folder / "photo.png")
    Image.new("RGB", (48, 40), (245, 110, 130)).save(folder / "reference.png")
    (folder / "not-an-image.png").write_text("text")
    Image.new("RGB", (5000, 1)).save(folder / "huge.png")
    return folder


TAB_EXTRAS = {
    "text": {},
    "vocabulary": {"target_class": "rose"},
    "personalization": {"references": ["reference.png"]},
    "aesthetic": {},
}


def extras(tab: str, folder) -> dict:
    given = dict(TAB_EXTRAS[tab])
    if "references" in given:
        given["references"] = [str(folder / name) for name in given["references"]]
    return given


@pytest.mark.parametrize("tab", list(TAB_EXTRAS))
def test_every_tab_starts_from_a_photo(tab, names, images):
    serving = Serving(names)
    asked = request(
        serving, tab, names.sd, PROMPT, {}, FAST, photo=str(images / "photo.png"), **extras(tab, images)
    )
    assert asked.photo is not None and asked.photo.size == (48, 40)
    shown = final(run(asked, ModelCache("cpu", torch.float32)))
    captions = [caption for _, caption in shown.gallery]
    assert captions[:2] == ["Uploaded photo", "Unguided reconstruction"]
    assert captions[2].startswith("One-step") and captions[3].startswith("DOODL")
    assert Image.open(shown.gallery[0][0]).size == (48, 40)  # the upload itself, as given


@pytest.mark.parametrize("tab", list(TAB_EXTRAS))
@pytest.mark.parametrize(
    "file, message",
    [
        ("not-an-image.png", "the photo not-an-image.png is not an image that can be read"),
        ("huge.png", "the photo huge.png is 5000x1 px: the largest side allowed is 4096 px"),
    ],
)
def test_a_bad_photo_is_refused_with_a_clear_message(tab, file, message, names, images):
    with pytest.raises(ValueError, match=message):
        request(
            Serving(names), tab, names.sd, PROMPT, {}, FAST, photo=str(images / file), **extras(tab, images)
        )
