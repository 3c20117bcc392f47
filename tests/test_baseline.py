"""Best of K unguided samples (`doodl.optimize.best_of_samples`): the random-search baseline DOODL is
matched against, and a start for DOODL (`DoodlSettings.start_samples`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from doodl import DoodlSettings, optimize, sample
from doodl.baseline import matched_k
from doodl.optimize import best_of_samples, candidate_seeds
from doodl.pipeline import count_unet_calls, to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "a red circle above a blue square"
# 10 steps: an EDICT chain both from a seed and from given latents (below doodl.edict.FEW_STEPS, a chain
# from a seed is plain DDIM while one from given latents stays EDICT, and the two differ).
SETTINGS = DoodlSettings(steps=10, iterations=2, seed=7)


def brightness(pixels: torch.Tensor) -> torch.Tensor:
    """A loss with no random views: the same image always gets the same loss."""
    return pixels.mean()


def test_k_spends_the_guided_runs_unet_calls_on_samples():
    assert matched_k(800, 40) == 20
    assert matched_k(810, 40) == 20  # rounded to the nearest whole sample
    assert matched_k(10, 40) == 1  # never fewer than one sample
    with pytest.raises(ValueError, match="UNet calls must be positive"):
        matched_k(800, 0)


@pytest.fixture(scope="module")
def best(tiny):
    return best_of_samples(tiny, PROMPT, brightness, SETTINGS, 4)


def test_the_chosen_candidate_has_the_lowest_loss(tiny, best):
    assert len(best.losses) == len(best.seeds) == 4
    assert len(set(best.losses)) == 4  # distinct images: the choice means something
    assert best.losses[best.chosen] == min(best.losses)
    assert float(brightness(to_tensor(best.image, best.image.size))) == pytest.approx(min(best.losses))
    # Each loss is that candidate's own image's.
    for seed, loss in zip(best.seeds, best.losses):
        image = sample(tiny, PROMPT, replace(SETTINGS, seed=seed))
        assert float(brightness(to_tensor(image, image.size))) == pytest.approx(loss)


def test_the_chosen_seed_regenerates_its_image_and_starts_doodl_there(tiny, best):
    chosen = replace(SETTINGS, seed=best.seed)
    assert best.seed == best.seeds[best.chosen]
    assert np.array_equal(np.asarray(sample(tiny, PROMPT, chosen)), np.asarray(best.image))
    start = optimize(tiny, PROMPT, brightness, chosen)
    assert start.losses[0] == pytest.approx(min(best.losses), abs=2 / 255)


def test_the_first_candidate_is_the_settings_own_seed(tiny, best):
    assert best.seeds[0] == SETTINGS.seed
    assert best.seeds == candidate_seeds(SETTINGS.seed, 4)
    assert len(set(best.seeds)) == 4
    own = sample(tiny, PROMPT, SETTINGS)
    assert best.losses[0] == pytest.approx(float(brightness(to_tensor(own, own.size))))


def test_its_calls_are_k_samples(tiny, best):
    with count_unet_calls(tiny.unet) as one:
        sample(tiny, PROMPT, SETTINGS)
    assert best.calls == 4 * one.calls > 0


def test_the_prompt_is_encoded_once_for_all_candidates(tiny, best):
    encoded = []
    handle = tiny.text_encoder.register_forward_pre_hook(lambda *_: encoded.append(1))
    try:
        again = best_of_samples(tiny, PROMPT, brightness, SETTINGS, 4)
    finally:
        handle.remove()
    assert len(encoded) == 1
    assert again.losses == best.losses


def test_bad_k_or_seeds_are_refused(tiny):
    with pytest.raises(ValueError, match="K >= 1"):
        best_of_samples(tiny, PROMPT, brightness, SETTINGS, 0)
    with pytest.raises(ValueError, match="2 seeds"):
        best_of_samples(tiny, PROMPT, brightness, SETTINGS, 3, seeds=[1, 2])


def darkness(pixels: torch.Tensor) -> torch.Tensor:
    return -pixels.mean()


def test_start_samples_is_doodl_from_the_chosen_seed(tiny):
    """DOODL from the best of 4 samples: the same run, loss for loss, as DOODL from the chosen seed, and
    every iteration says which seed it started from."""
    best = best_of_samples(tiny, PROMPT, darkness, SETTINGS, 4)
    assert best.chosen != 0  # a start other than the seed's own: the setting changes something
    started = optimize(tiny, PROMPT, darkness, replace(SETTINGS, start_samples=4))
    chosen = optimize(tiny, PROMPT, darkness, replace(SETTINGS, seed=best.seed))
    assert started.losses == chosen.losses
    assert started.best.seed == started.last.seed == best.seed != SETTINGS.seed
    assert np.array_equal(np.asarray(started.last.image), np.asarray(chosen.last.image))


def test_one_start_sample_is_the_seeds_own_noise(tiny):
    own = optimize(tiny, PROMPT, brightness, SETTINGS)
    assert own.best.seed == SETTINGS.seed
    assert own.losses == optimize(tiny, PROMPT, brightness, replace(SETTINGS, start_samples=1)).losses


def test_start_samples_leave_a_photos_latents_alone(tiny):
    x = torch.randn(tiny.latent_shape(None, None), generator=torch.Generator().manual_seed(3))
    init = (x.double(), x.double().clone())
    settings = replace(SETTINGS, iterations=1)
    with count_unet_calls(tiny.unet) as one:
        optimize(tiny, PROMPT, brightness, settings, init)
    with count_unet_calls(tiny.unet) as four:
        result = optimize(tiny, PROMPT, brightness, replace(settings, start_samples=4), init)
    assert four.calls == one.calls  # no candidate was sampled
    assert result.best.seed == SETTINGS.seed


def test_start_samples_below_one_are_refused():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="start_samples"):
            DoodlSettings(start_samples=bad)
