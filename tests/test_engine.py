"""The engine: EDICT sampling and inversion, the three gradients, the optimizer, the baseline, the loader."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from doodl import (
    MODES,
    DoodlSettings,
    ModelLoadError,
    edict_denoise,
    edict_invert,
    edict_schedule,
    edict_step,
    initial_latents,
    invert_image,
    latent_grad,
    load_pipeline,
    one_step_guidance,
    optimize,
    sample,
)
from doodl.chain import schedule_of
from doodl.tiny import save_tiny_pipeline

PROMPT = "a red circle above a blue square"


def noise_predictor(model, prompt=PROMPT, guidance_scale=7.5):
    return model.noise_predictor(model.encode_prompt(prompt), guidance_scale)


def mean_gray_loss(images):
    return ((images - 0.3) ** 2).mean()


def decode_pair_loss(model, loss=mean_gray_loss):
    return lambda x0, y0: loss(model.decode(torch.cat([x0, y0])))


# --- EDICT ------------------------------------------------------------------------------------------


def reference_edict(eps, x, y, scheduler, steps, p, leapfrog):
    """Eq. 5 written out independently, straight from alphas_cumprod."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    abar = ddim.alphas_cumprod.double()
    for i, t in enumerate(ddim.timesteps.tolist()):
        prev = t - 1000 // steps
        abar_prev = abar[prev] if prev >= 0 else torch.as_tensor(ddim.final_alpha_cumprod).double()
        a = (abar_prev / abar[t]).sqrt()
        b = (1 - abar_prev).sqrt() - (abar_prev * (1 - abar[t]) / abar[t]).sqrt()
        if leapfrog and i % 2 == 1:
            y_inter = a * y + b * eps(x, t)
            x_inter = a * x + b * eps(y_inter, t)
        else:
            x_inter = a * x + b * eps(y, t)
            y_inter = a * y + b * eps(x_inter, t)
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
    return x, y


@pytest.mark.parametrize("leapfrog", [False, True])
def test_denoise_matches_equation_5(tiny, leapfrog):
    eps = noise_predictor(tiny)
    x, y = initial_latents(tiny, DoodlSettings())
    schedule = edict_schedule(tiny.scheduler, 12, 0.93, leapfrog)
    with torch.no_grad():
        ours = edict_denoise(eps, x, y, schedule)
        ref = reference_edict(eps, x, y, tiny.scheduler, 12, 0.93, leapfrog)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_half_step_without_coupling_is_ddim(tiny):
    eps = noise_predictor(tiny)
    z, _ = initial_latents(tiny, DoodlSettings())
    schedule = edict_schedule(tiny.scheduler, 20, p=1.0, leapfrog=False)
    ddim = DDIMScheduler.from_config(tiny.scheduler.config)
    ddim.set_timesteps(20)
    with torch.no_grad():
        for i in (0, 7, 19):
            x, _ = edict_step(eps, z, z, schedule, i)  # p = 1: no mixing, x's half-step sees y = z
            t = schedule.timesteps[i]
            expected = ddim.step(eps(z, t), t, z, eta=0.0).prev_sample
            # diffusers steps in float32: agreement to its rounding, far below any wrong coefficient.
            assert torch.allclose(x, expected.double(), rtol=0, atol=1e-5), i


def round_trip_error(model, x, y, steps=50):
    eps = noise_predictor(model)
    schedule = edict_schedule(model.scheduler, steps)
    with torch.no_grad():
        back = edict_invert(eps, *edict_denoise(eps, x, y, schedule), schedule)
    return max((b - a).abs().max().item() for a, b in zip((x, y), back))


def untied_pair(model, seed=3):
    x, y = initial_latents(model, DoodlSettings(seed=seed))
    return x + 0.01 * torch.randn_like(x), y


def test_invert_denoise_is_exact_at_50_steps(tiny64):
    """The sampler's algebra: with a float64 UNet the inverse recovers the start to float64 rounding."""
    assert round_trip_error(tiny64, *untied_pair(tiny64)) <= 1e-10


def test_invert_denoise_with_a_float32_unet_is_exact_to_its_rounding(tiny):
    """The app's path: the float64 coupling feeds a float32 UNet, whose input is rounded to float32.

    Forward and inverse usually round identically (1e-12 here), but on another CPU a float64 ulp can
    flip one rounding, changing eps by float32 rounding (~1e-7) and the start by ~1e-6 after 50 steps.
    A wrong coefficient or step order misses by 1e-2 or more.
    """
    assert round_trip_error(tiny, *untied_pair(tiny)) <= 1e-5


def test_float32_coupling_is_measurably_less_exact(tiny64):
    """The float64 default matters: the same round trip with the coupling in float32 drifts far more."""
    x, y = initial_latents(tiny64, DoodlSettings())
    dtypes = (torch.float64, torch.float32)
    errors = {dtype: round_trip_error(tiny64, x.to(dtype), y.to(dtype)) for dtype in dtypes}
    assert errors[torch.float64] * 1e3 < errors[torch.float32]


def test_one_batched_unet_call_per_noise_prediction(tiny):
    calls = []
    handle = tiny.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            edict_denoise(
                noise_predictor(tiny),
                *initial_latents(tiny, DoodlSettings()),
                edict_schedule(tiny.scheduler, 5),
            )
    finally:
        handle.remove()
    assert calls == [2] * 10  # two half-steps per step, cond + uncond in one batch


# --- gradients -------------------------------------------------------------------------------------


def flat(pair):
    return torch.cat([g.flatten() for g in pair])


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_gradient_matches_autograd(tiny, mode):
    eps = noise_predictor(tiny)
    x, y = initial_latents(tiny, DoodlSettings(seed=1))
    schedule = edict_schedule(tiny.scheduler, 20)
    reference = latent_grad(eps, x, y, schedule, decode_pair_loss(tiny), "autograd")
    result = latent_grad(eps, x, y, schedule, decode_pair_loss(tiny), mode)
    g, g_ref = flat(result.grad), flat(reference.grad)
    assert g_ref.norm() > 0
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) >= 0.9999
    assert (g - g_ref).norm() / g_ref.norm() <= 1e-4
    assert result.loss == pytest.approx(reference.loss, rel=1e-9)


def test_reversible_gradient_matches_finite_differences(tiny64):
    eps = noise_predictor(tiny64)
    z, _ = initial_latents(tiny64, DoodlSettings(seed=2))
    schedule = edict_schedule(tiny64.scheduler, 10)
    loss_of_final = decode_pair_loss(tiny64)
    gx, gy = latent_grad(eps, z, z.clone(), schedule, loss_of_final, "reversible").grad
    grad_z = (gx + gy).flatten()  # x_T = y_T = z

    def loss_at(v):
        with torch.no_grad():
            return loss_of_final(*edict_denoise(eps, v, v.clone(), schedule)).item()

    h = 1e-4
    for index in (0, 37, 101, 200):
        bump = torch.zeros_like(z).flatten()
        bump[index] = h
        bump = bump.view_as(z)
        numeric = (loss_at(z + bump) - loss_at(z - bump)) / (2 * h)
        assert numeric == pytest.approx(grad_z[index].item(), rel=1e-4, abs=1e-9), index


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from doodl import load_pipeline, initial_latents, DoodlSettings, edict_schedule, latent_grad
    torch.set_num_threads(1)
    folder, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = load_pipeline(folder)
    eps = model.noise_predictor(model.encode_prompt("a red circle"), 7.5)
    x, y = initial_latents(model, DoodlSettings())
    loss = lambda a, b: model.decode(torch.cat([a, b])).mean()
    latent_grad(eps, x, y, edict_schedule(model.scheduler, steps), loss, mode)
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    """
)


def peak_rss_mb(folder, mode, steps):
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(folder), mode, str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reversible_memory_is_flat_in_steps_while_autograd_grows(tmp_path):
    # Large latents, so that a step's activations are visible next to the interpreter's own memory.
    folder = save_tiny_pipeline(tmp_path / "sd", sample_size=32)
    reversible = {steps: peak_rss_mb(folder, "reversible", steps) for steps in (10, 50)}
    autograd = {steps: peak_rss_mb(folder, "autograd", steps) for steps in (10, 50)}
    assert reversible[50] <= 1.05 * reversible[10], reversible
    assert autograd[50] >= 1.3 * autograd[10], autograd


# --- the optimizer ---------------------------------------------------------------------------------


def test_optimizer_lowers_the_loss_and_keeps_the_norm(tiny):
    settings = DoodlSettings(steps=8, iterations=6, learning_rate=100.0)
    init = initial_latents(tiny, settings)
    steps = []
    result = optimize(tiny, PROMPT, mean_gray_loss, settings, callback=steps.append)
    assert [s.iteration for s in steps] == list(range(6))
    assert result.losses[-1] < result.losses[0]
    assert result.best.loss == min(result.losses)
    for step in steps:
        for z, z0 in zip(step.latents, init):
            assert z.norm().item() == pytest.approx(z0.norm().item(), rel=1e-12)
        assert isinstance(step.image, Image.Image) and step.image.size == (64, 64)
        assert step.seconds > 0


def test_optimizer_is_deterministic_from_the_seed(tiny):
    settings = DoodlSettings(steps=5, iterations=3, learning_rate=100.0, seed=7)
    first = optimize(tiny, PROMPT, mean_gray_loss, settings)
    second = optimize(tiny, PROMPT, mean_gray_loss, settings)
    assert first.losses == second.losses
    assert torch.equal(first.last.latents[0], second.last.latents[0])
    other = optimize(tiny, PROMPT, mean_gray_loss, DoodlSettings(steps=5, iterations=3, seed=8))
    assert other.losses[0] != first.losses[0]


def test_normalized_steps_do_not_depend_on_the_loss_scale(tiny):
    def scaled(factor):
        return lambda images: factor * mean_gray_loss(images)

    def last_latent(loss, normalized):
        settings = DoodlSettings(steps=4, iterations=3, grad_clip=0.05, normalized=normalized, perturbation=0)
        return optimize(tiny, PROMPT, loss, settings).last.latents[0]

    start = initial_latents(tiny, DoodlSettings())[0]
    small, large = (last_latent(scaled(f), normalized=True) for f in (1e-3, 10.0))
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)  # float32 UNet: rounding differs
    # Each step moves the RMS element by the clip, momentum adding the last: about 0.05 * (1 + 1.9) in all.
    moved = (small - start).square().mean().sqrt().item()
    assert 0.05 < moved < 0.05 * 2.9
    # The paper's raw gradient: the small loss barely moves the latents, the large one moves them far.
    raw_small, raw_large = (last_latent(scaled(f), normalized=False) for f in (1e-3, 10.0))
    assert (raw_small - start).abs().max() < 0.01 * (raw_large - start).abs().max()


def test_callback_can_stop_the_run(tiny):
    settings = DoodlSettings(steps=4, iterations=10)
    result = optimize(tiny, PROMPT, mean_gray_loss, settings, callback=lambda step: step.iteration < 2)
    assert len(result.losses) == 3
    assert result.last.iteration == 2


def test_iteration_zero_is_the_unguided_sample(tiny):
    settings = DoodlSettings(steps=6, iterations=1)
    result = optimize(tiny, PROMPT, mean_gray_loss, settings)
    # Decoded in a batch of two rather than alone: equal up to rounding of the last 8-bit level.
    difference = np.asarray(result.last.image, float) - np.asarray(sample(tiny, PROMPT, settings), float)
    assert np.abs(difference).max() <= 1


def test_real_image_inversion_regenerates_it(tiny):
    settings = DoodlSettings(steps=10)
    photo = Image.new("RGB", (100, 80), (200, 40, 40))
    x, y = invert_image(tiny, photo, PROMPT, settings)
    eps = noise_predictor(tiny, PROMPT, settings.guidance_scale)
    with torch.no_grad():
        x0, _ = edict_denoise(eps, x, y, schedule_of(settings, tiny, from_photo=True))
        encoded = tiny.encode(
            torch.tensor([[[[200 / 255]], [[40 / 255]], [[40 / 255]]]]).expand(1, 3, 64, 64)
        )
    assert (x0 - encoded.double()).abs().max() < 1e-5
    steps = optimize(tiny, PROMPT, mean_gray_loss, DoodlSettings(steps=10, iterations=2), init=(x, y))
    assert steps.losses[0] == pytest.approx(mean_gray_loss(tiny.decode(torch.cat([x0, x0]))).item(), rel=1e-3)


# --- the baseline -----------------------------------------------------------------------------------


def test_one_step_guidance_at_scale_zero_is_the_unguided_sample(tiny):
    settings = DoodlSettings(steps=6)
    unguided = sample(tiny, PROMPT, settings)
    assert list(one_step_guidance(tiny, PROMPT, mean_gray_loss, 0.0, settings).getdata()) == list(
        unguided.getdata()
    )


def test_one_step_guidance_moves_the_image_down_the_loss(tiny):
    settings = DoodlSettings(steps=10)

    def loss_of(image):
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float64) / 255
        return ((pixels - 0.3) ** 2).mean().item()

    unguided = loss_of(one_step_guidance(tiny, PROMPT, mean_gray_loss, 0.0, settings))
    guided = loss_of(one_step_guidance(tiny, PROMPT, mean_gray_loss, 300.0, settings))
    assert guided < unguided


# --- loading and bad input --------------------------------------------------------------------------


def test_v_prediction_model_loads_and_samples(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")
    model = load_pipeline(folder)
    assert model.scheduler.config.prediction_type == "v_prediction"
    image = sample(model, PROMPT, DoodlSettings(steps=4))
    assert image.size == (64, 64)


def test_v_prediction_is_converted_to_noise(tmp_path):
    """With v-prediction, eps(z, t) must equal sqrt(abar) v + sqrt(1 - abar) z for the UNet's v."""
    eps_model = load_pipeline(save_tiny_pipeline(tmp_path / "e", seed=5))
    v_model = load_pipeline(save_tiny_pipeline(tmp_path / "v", seed=5, prediction_type="v_prediction"))
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    t = 501
    abar = v_model.scheduler.alphas_cumprod.double()[t]
    raw = noise_predictor(eps_model, guidance_scale=1.0)(z, t)  # same weights: the raw UNet output
    converted = noise_predictor(v_model, guidance_scale=1.0)(z, t)
    assert torch.allclose(converted, abar.sqrt() * raw + (1 - abar).sqrt() * z, atol=1e-6)


def test_loader_errors_are_clear(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="nobody/no-such-model"):
        load_pipeline("nobody/no-such-model")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(steps=0), "steps"),
        (dict(iterations=0), "iterations"),
        (dict(p=0.0), "p="),
        (dict(p=1.5), "p="),
        (dict(mode="magic"), "magic"),
        (dict(grad_clip=-1.0), "grad_clip"),
    ],
)
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        DoodlSettings(**bad)


def test_bad_inputs_are_refused(tiny):
    with pytest.raises(ValueError, match="prompt is empty"):
        optimize(tiny, "  ", mean_gray_loss, DoodlSettings(steps=2, iterations=1))
    with pytest.raises(TypeError, match="PIL image"):
        invert_image(tiny, "not-an-image.png", PROMPT)
    with pytest.raises(ValueError, match="multiple of 8"):
        sample(tiny, PROMPT, DoodlSettings(steps=2, height=60))
    with pytest.raises(ValueError, match="steps"):
        edict_schedule(tiny.scheduler, -3)
    with pytest.raises(ValueError, match="gradient mode"):
        latent_grad(None, None, None, None, None, "sideways")
    assert set(MODES) == {"reversible", "checkpoint", "autograd"}


def test_an_already_loaded_pipeline_becomes_a_doodl_model_without_reloading(tiny_folder):
    from types import SimpleNamespace

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from doodl import LatentDiffusion, ModelLoadError, load_pipeline, sample

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    # A user's own scheduler: only its noise schedule is used, so the samples are those of the folder.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    model = LatentDiffusion.from_pipeline(pipe)
    assert model.unet is pipe.unet and model.vae is pipe.vae  # shared, not copied
    assert not any(p.requires_grad for p in pipe.unet.parameters()) and not pipe.unet.training
    settings = DoodlSettings(steps=12, iterations=1)
    shared = np.asarray(sample(model, "a red circle", settings))
    assert np.array_equal(shared, np.asarray(sample(load_pipeline(tiny_folder), "a red circle", settings)))
    with pytest.raises(ModelLoadError, match="the pipeline has no text_encoder"):
        LatentDiffusion.from_pipeline(SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoder=None))
