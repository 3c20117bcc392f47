"""The optimizer's step rules and the noise's regularizers (`doodl.update`): what each guarantees."""

import math

import pytest
import torch

from doodl.optimize import initial_latents, optimize
from doodl.settings import REGULARIZERS, STEP_RULES, DoodlSettings
from doodl.update import Update, channel_statistics, norm_penalty, norm_penalty_grad, ring_powers, whiten

SHAPE = (1, 4, 16, 16)


def noise(seed: int, shape=SHAPE, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def one_step(settings: DoodlSettings, z: torch.Tensor, grad: torch.Tensor, steps: int = 1) -> torch.Tensor:
    update = Update((z, z.clone()), settings)
    latents = (z, z.clone())
    for _ in range(steps):
        latents = update(latents, (grad, grad))
    return latents[0]


PLAIN = {"perturbation": 0.0, "regularizer": "none"}  # the step rule alone


def test_sgd_is_the_papers_clipped_step_with_momentum():
    z, grad = noise(0), noise(1, scale=1e-2)
    settings = DoodlSettings(learning_rate=0.5, grad_clip=2e-3, momentum=0.9, **PLAIN)
    step = (0.5 * grad).clamp(-2e-3, 2e-3)
    torch.testing.assert_close(one_step(settings, z, grad), z - step, rtol=0, atol=1e-15)
    torch.testing.assert_close(one_step(settings, z, grad, 2), z - step - 1.9 * step, rtol=0, atol=1e-15)
    assert (one_step(settings, z, grad) - z).abs().max() <= 2e-3 + 1e-15


def test_nesterov_clips_the_gradients_norm_and_looks_ahead():
    z, small, large = noise(0), noise(1, scale=1e-6), noise(2, scale=10.0)
    settings = DoodlSettings(learning_rate=1.0, grad_clip=1e-3, momentum=0.9, step_rule="nesterov", **PLAIN)
    most = 1e-3 * math.sqrt(z.numel())
    # A small gradient is not clipped; Nesterov's first step is (1 + momentum) of it.
    torch.testing.assert_close(one_step(settings, z, small), z - 1.9 * small, rtol=0, atol=1e-15)
    # A large one is cut to the norm of a step at the clip in every element, keeping its direction.
    moved = one_step(settings, z, large) - z
    assert math.isclose(float(moved.norm()), 1.9 * most, rel_tol=1e-9)
    assert torch.nn.functional.cosine_similarity(moved.flatten(), -large.flatten(), dim=0) > 1 - 1e-9


def test_adam_steps_by_its_size_whatever_the_gradients_scale():
    z, grad = noise(0), noise(1)
    settings = DoodlSettings(grad_clip=1e-3, step_rule="adam", **PLAIN)
    first = one_step(settings, z, grad) - z
    # Adam's first step is its step size against the gradient's sign in every element.
    torch.testing.assert_close(first, -1e-3 * grad.sign(), rtol=1e-3, atol=0)  # Adam eps: 1e-8
    torch.testing.assert_close(one_step(settings, z, 1e4 * grad, 3), one_step(settings, z, grad, 3))


def test_the_norm_penalty_is_least_at_the_likely_norm_and_its_gradient_is_exact():
    z = noise(0)
    d = z.numel()
    at = [
        norm_penalty(z / z.norm() * r) for r in (0.8 * math.sqrt(d - 1), math.sqrt(d - 1), 1.2 * math.sqrt(d))
    ]
    assert at[1] < at[0] and at[1] < at[2]
    leaf = z.clone().requires_grad_()
    norm_penalty(leaf).backward()
    torch.testing.assert_close(norm_penalty_grad(z), leaf.grad, rtol=1e-12, atol=1e-12)


def test_the_norm_regularizer_pulls_an_unlikely_norm_back():
    z = 1.5 * noise(0)  # far outside the shell where N(0, I)'s norms lie
    settings = DoodlSettings(grad_clip=0.05, regularizer="norm", regularizer_weight=0.01, perturbation=0)
    after = one_step(settings, z, torch.zeros_like(z), steps=10)
    likely = math.sqrt(z.numel() - 1)
    assert abs(float(after.norm()) - likely) < 0.5 * abs(float(z.norm()) - likely)
    # Without it, a zero gradient leaves the noise where it is.
    none = DoodlSettings(grad_clip=0.05, regularizer="none", perturbation=0)
    assert torch.equal(one_step(none, z, torch.zeros_like(z), steps=3), z)


def smooth(seed: int) -> torch.Tensor:
    """Colored noise: white noise blurred, then offset, so its mean, variance and spectrum are all wrong."""
    blurred = torch.nn.functional.avg_pool2d(noise(seed), 5, stride=1, padding=2, count_include_pad=False)
    return 3 * blurred + 0.5


@pytest.mark.parametrize("shape", [SHAPE, (1, 16, 12, 20)])
def test_whitening_gives_white_noises_statistics_and_is_a_projection(shape):
    colored = smooth(0)[..., : shape[-2], : shape[-1]].repeat(1, shape[1] // 4, 1, 1)
    white = whiten(colored)
    mean, variance = channel_statistics(white)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-12)
    torch.testing.assert_close(variance, torch.ones_like(variance), rtol=0, atol=1e-12)
    rings = ring_powers(white)[..., 1:]  # every ring of frequencies at the same power
    torch.testing.assert_close(rings, torch.full_like(rings, float(rings[0, 0, 0])), rtol=1e-10, atol=0)
    torch.testing.assert_close(whiten(white), white, rtol=0, atol=1e-12)  # applied twice: no more change
    assert white.shape == colored.shape and white.dtype == colored.dtype


def test_white_noise_barely_moves_colored_noise_moves_far():
    z = noise(3)
    assert (whiten(z) - z).norm() < 0.35 * z.norm()
    colored = smooth(3)
    white = whiten(colored)
    assert (white - colored).norm() > (whiten(z) - z).norm() * 3
    # The phases stay: the whitened blur still correlates with the blur it came from.
    assert torch.corrcoef(torch.stack([white.flatten(), colored.flatten()]))[0, 1] > 0.3


def test_the_white_regularizer_keeps_a_tied_pair_equal_and_white():
    z, grad = noise(0), noise(1, scale=1e-2)
    settings = DoodlSettings(grad_clip=0.05, regularizer="white")
    update = Update((z, z.clone()), settings)
    x, y = update((z, z.clone()), (grad, noise(2, scale=1e-2)))
    assert torch.equal(x, y)
    mean, variance = channel_statistics(x)
    torch.testing.assert_close(variance, torch.ones_like(variance), rtol=0, atol=1e-12)


def test_from_a_photo_every_regularizer_keeps_the_latents_norms():
    x, y = noise(0, scale=0.7), noise(1, scale=0.8)  # an inversion: neither white nor equal
    for regularizer in REGULARIZERS:
        settings = DoodlSettings(grad_clip=0.05, regularizer=regularizer)
        nx, ny = Update((x, y), settings, from_photo=True)((x, y), (noise(2), noise(3)))
        assert math.isclose(float(nx.norm()), float(x.norm()), rel_tol=1e-12)
        assert math.isclose(float(ny.norm()), float(y.norm()), rel_tol=1e-12)


@pytest.mark.parametrize("bad", [{"step_rule": "lion"}, {"regularizer": "l2"}, {"regularizer_weight": -1.0}])
def test_unknown_rules_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        DoodlSettings(**bad)


def gray(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5).square().mean()


@pytest.mark.parametrize("rule", STEP_RULES)
def test_every_rule_lowers_a_loss_through_the_chain(tiny, rule):
    settings = DoodlSettings(steps=4, iterations=6, grad_clip=0.05, normalized=True, step_rule=rule)
    result = optimize(tiny, "a photo", gray, settings)
    assert result.best.loss < result.losses[0]


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_every_regularizer_runs_through_the_chain_and_keeps_its_promise(tiny, regularizer):
    settings = DoodlSettings(steps=3, iterations=3, grad_clip=0.05, normalized=True, regularizer=regularizer)
    start = initial_latents(tiny, settings)[0]
    last = optimize(tiny, "a photo", gray, settings).last.latents[0]
    assert not torch.equal(last, start)
    if regularizer == "renormalize":
        assert math.isclose(float(last.norm()), float(start.norm()), rel_tol=1e-9)
    if regularizer == "white":
        mean, variance = channel_statistics(last)
        torch.testing.assert_close(variance, torch.ones_like(variance), rtol=0, atol=1e-9)
