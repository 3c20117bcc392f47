"""Few-step models (SD-Turbo style): trailing timesteps from the scheduler's config, guidance off at half
the UNet batch, exact inversion and gradient parity at 1, 2 and 4 steps, and the CLI taking such a model;
and the chain a run samples with (EDICT or plain DDIM), a run setting."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from doodl import (
    DoodlSettings,
    doodl,
    edict_denoise,
    edict_invert,
    edict_schedule,
    initial_latents,
    latent_grad,
    sample,
)
from doodl.__main__ import main
from doodl.chain import chain_of, denoise, plain_chain
from doodl.edict import FEW_STEPS, ddim_denoise, ddim_step
from doodl.embedded import EMBEDDED_PRESETS
from doodl.pipeline import PromptEmbeds, count_unet_calls, load_pipeline
from doodl.serving import preset_values, run_options
from doodl.tiny import save_tiny_turbo_pipeline

PROMPT = "a red circle above a blue square"
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory):
    """A tiny random pipeline saved with SD-Turbo's kind of scheduler: Euler, trailing, v-prediction."""
    return save_tiny_turbo_pipeline(tmp_path_factory.mktemp("tiny-turbo"))


@pytest.fixture(scope="module")
def turbo(turbo_folder):
    return load_pipeline(turbo_folder)


def reference_coefficients(abar: torch.Tensor, t: int, abar_prev: torch.Tensor) -> tuple[float, float]:
    """DDIM's a_t, b_t written out from the notes (Eq. 5)."""
    a = (abar_prev / abar[t]).sqrt()
    b = (1 - abar_prev).sqrt() - (abar_prev * (1 - abar[t]) / abar[t]).sqrt()
    return float(a), float(b)


# --- the schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, expected",
    [(1, (999,)), (2, (999, 499)), (3, (999, 666, 332)), (4, (999, 749, 499, 249))],
)
def test_trailing_steps_land_on_the_next_listed_timestep(turbo, steps, expected):
    schedule = edict_schedule(turbo.scheduler, steps)
    assert schedule.timesteps == expected
    abar = turbo.scheduler.alphas_cumprod.double()
    # SD-Turbo's config has no set_alpha_to_one: DDIM's default (True) ends the chain at abar = 1.
    prevs = [abar[t] for t in expected[1:]] + [torch.tensor(1.0, dtype=torch.float64)]
    for i, (t, prev) in enumerate(zip(expected, prevs, strict=True)):
        expected_ab = reference_coefficients(abar, t, prev)
        assert (schedule.a[i], schedule.b[i]) == pytest.approx(expected_ab, rel=1e-12)


def test_one_trailing_step_is_the_clean_latent_estimate(turbo):
    """One step from t=999 to abar=1 is x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): what SD-Turbo samples."""
    schedule = edict_schedule(turbo.scheduler, 1)
    abar = turbo.scheduler.alphas_cumprod.double()[999]
    assert schedule.a[0] == pytest.approx(float(1 / abar.sqrt()), rel=1e-12)
    assert schedule.b[0] == pytest.approx(float(-(1 - abar).sqrt() / abar.sqrt()), rel=1e-12)


def test_linspace_spacing_is_read_from_the_config():
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="linspace", set_alpha_to_one=False)
    schedule = edict_schedule(scheduler, 4)
    assert schedule.timesteps == (999, 666, 333, 0)
    abar = scheduler.alphas_cumprod.double()
    # the stride 1000 // 4 = 250 would send 666 to 416: the step must land on 333.
    assert schedule.a[1] == pytest.approx(reference_coefficients(abar, 666, abar[333])[0], rel=1e-12)
    assert schedule.a[3] == pytest.approx(reference_coefficients(abar, 0, abar[0])[0], rel=1e-12)


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333])
def test_leading_spacing_keeps_the_sd15_schedule_bit_for_bit(steps):
    """SD 1.5's config ("leading", steps_offset 1): previous timestep t - 1000 // steps, as before."""
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    schedule = edict_schedule(scheduler, steps)
    abar = scheduler.alphas_cumprod.double()
    for i, t in enumerate(schedule.timesteps):
        prev = t - 1000 // steps
        abar_prev = abar[prev] if prev >= 0 else abar[0]  # set_alpha_to_one=False: the final abar is abar[0]
        assert (schedule.a[i], schedule.b[i]) == reference_coefficients(abar, t, abar_prev)


def test_a_schedule_past_the_training_timesteps_is_refused():
    scheduler = DDIMScheduler(**SD_BETAS, steps_offset=1)
    with pytest.raises(ValueError, match="beyond the model's 1000 training timesteps"):
        edict_schedule(scheduler, 1000)  # leading spacing with offset 1 would start at t=1000


# --- guidance off ------------------------------------------------------------------------------------


def full_cfg(model, embeds, scale, latents, t):
    """Classifier-free guidance computed in full: both halves through the UNet, v converted to eps."""
    out = model.unet(
        latents.repeat(2, 1, 1, 1).float(), t, encoder_hidden_states=embeds.hidden
    ).sample.double()
    abar = model.scheduler.alphas_cumprod.double()[t]
    out = abar.sqrt() * out + (1 - abar).sqrt() * latents.repeat(2, 1, 1, 1)
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def unet_batches(model, eps, latents, t):
    sizes = []
    handle = model.unet.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            eps(latents, t)
    finally:
        handle.remove()
    return sizes


@pytest.mark.parametrize("scale, batch", [(1.0, 1), (0.0, 1), (3.0, 2)])
def test_guidance_off_runs_half_the_batch_and_gives_the_full_cfg_value(turbo, scale, batch):
    embeds = turbo.encode_prompt(PROMPT)
    eps = turbo.noise_predictor(embeds, scale)
    latents, _ = initial_latents(turbo, DoodlSettings(seed=4))
    assert unet_batches(turbo, eps, latents, 999) == [batch]
    with torch.no_grad():
        got, expected = eps(latents, 999), full_cfg(turbo, embeds, scale, latents, 999)
    assert expected.abs().max() > 0.1
    # float32 UNet at batch 1 vs 2: agreement to its rounding; a wrong half would be off by O(1).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_single_prompt_embedding_is_refused(turbo):
    with pytest.raises(ValueError, match="unconditional, conditional"):
        turbo.noise_predictor(PromptEmbeds(turbo.encode_prompt(PROMPT).hidden[:1]), 1.0)


# --- exactness and gradients at 1, 2 and 4 steps -------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_inversion_is_exact_at_few_steps(turbo, steps):
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo, DoodlSettings(seed=5))
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    schedule = edict_schedule(turbo.scheduler, steps)
    with torch.no_grad():
        final = edict_denoise(eps, x, y, schedule)
        back = edict_invert(eps, *final, schedule)
    assert (final[0] - x).abs().max() > 0.05  # the chain moved the latents: the round trip is not trivial
    # float64 coupling: ~1e-15 here; float32 coupling would leave ~5e-7.
    assert max((b - a).abs().max().item() for a, b in zip((x, y), back)) <= 1e-10


def test_one_step_without_mixing_samples_what_the_model_samples(turbo):
    """At p=1 the x latent of a one-step chain is the model's own one-step sample, x0 = (x - sqrt(1 - abar)
    eps(x)) / sqrt(abar). (With p < 1, or from 2 steps on, EDICT's second half-step evaluates eps at t on a
    latent far less noisy than t, and the pair leaves the model's own trajectory.)"""
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, _ = initial_latents(turbo, DoodlSettings(seed=8))
    with torch.no_grad():
        x0, _ = edict_denoise(eps, x, x.clone(), edict_schedule(turbo.scheduler, 1, p=1.0))
        abar = turbo.scheduler.alphas_cumprod.double()[999]
        expected = (x - (1 - abar).sqrt() * eps(x, 999)) / abar.sqrt()
    torch.testing.assert_close(x0, expected, rtol=1e-12, atol=1e-12)


def decode_pair_loss(model):
    return lambda x0, y0: ((model.decode(torch.cat([x0, y0])) - 0.3) ** 2).mean()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_three_gradient_modes_agree_at_few_steps(turbo, steps):
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo, DoodlSettings(seed=7))
    schedule = edict_schedule(turbo.scheduler, steps)
    reference = latent_grad(eps, x, y, schedule, decode_pair_loss(turbo), "autograd")
    g_ref = torch.cat([g.flatten() for g in reference.grad])
    assert g_ref.norm() > 0
    for mode in ("reversible", "checkpoint"):
        result = latent_grad(eps, x, y, schedule, decode_pair_loss(turbo), mode)
        g = torch.cat([g.flatten() for g in result.grad])
        assert (g - g_ref).norm() / g_ref.norm() <= 1e-4, mode
        assert result.loss == pytest.approx(reference.loss, rel=1e-9), mode


# --- plain DDIM below FEW_STEPS ---------------------------------------------------------------------


def diffusers_ddim(model, eps, x, steps):
    """The same DDIM chain run by diffusers' scheduler, on our noise predictor (which returns epsilon)."""
    scheduler = DDIMScheduler.from_config(
        model.scheduler.config, prediction_type="epsilon", clip_sample=False
    )
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_few_steps_sample_what_the_model_samples(turbo, steps):
    settings = DoodlSettings(steps=steps, guidance_scale=1.0, seed=3)
    assert plain_chain(settings) and not plain_chain(settings, from_photo=True)
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo, settings)
    with torch.no_grad():
        x0, y0 = denoise(settings, eps, x, y, turbo)
        expected = diffusers_ddim(turbo, eps, x, steps)
    assert x0 is y0
    torch.testing.assert_close(x0, expected.to(x0.dtype), rtol=1e-5, atol=1e-5)
    # EDICT over so few steps leaves the model's trajectory: what the DDIM chain avoids.
    with torch.no_grad():
        edict_x0, _ = edict_denoise(eps, x, y, edict_schedule(turbo.scheduler, steps))
    assert (edict_x0 - expected).norm() > 0.1 * expected.norm()


def test_the_chain_is_edict_from_few_steps_up_unless_set():
    assert not plain_chain(DoodlSettings(steps=FEW_STEPS))
    assert plain_chain(DoodlSettings(steps=FEW_STEPS, sampler="ddim"))
    assert not plain_chain(DoodlSettings(steps=1, sampler="edict"))
    # A photo's latents are EDICT's inversion: only EDICT's chain regenerates them.
    assert not plain_chain(DoodlSettings(steps=2), from_photo=True)
    assert not plain_chain(DoodlSettings(sampler="ddim"), from_photo=True)
    with pytest.raises(ValueError, match="setting sampler='euler' is not one of auto, edict, ddim"):
        DoodlSettings(sampler="euler")


@pytest.fixture(scope="module")
def turbo64(turbo_folder):
    """The same model in float64, for finite differences."""
    return load_pipeline(turbo_folder, dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_gradients_agree_between_modes_and_with_finite_differences(turbo64, steps):
    eps = turbo64.noise_predictor(turbo64.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo64, DoodlSettings(seed=9))
    schedule = edict_schedule(turbo64.scheduler, steps)
    loss = decode_pair_loss(turbo64)
    reference = latent_grad(eps, x, y, schedule, loss, "autograd", ddim_step)
    stored = latent_grad(eps, x, y, schedule, loss, "checkpoint", ddim_step)
    torch.testing.assert_close(stored.grad, reference.grad, rtol=1e-5, atol=1e-9)
    assert reference.grad[1].abs().max() == 0  # the chain reads x_T only
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(10), dtype=x.dtype)
    h = 1e-4
    with torch.no_grad():
        up, down = (loss(*ddim_denoise(eps, x + s * h * direction, y, schedule)) for s in (1, -1))
    numeric = (up - down).item() / (2 * h)
    analytic = (reference.grad[0] * direction).sum().item()
    assert analytic == pytest.approx(numeric, rel=1e-3)  # the decoder clamps pixels: kinks
    with pytest.raises(ValueError, match="reversible gradient needs the EDICT chain"):
        latent_grad(eps, x, y, schedule, loss, "reversible", ddim_step)


def test_doodl_over_a_few_step_model_starts_from_its_sample_and_lowers_the_loss(turbo):
    settings = DoodlSettings(steps=2, iterations=4, guidance_scale=1.0, grad_clip=0.05, seed=4)
    loss = lambda images: ((images - 0.8) ** 2).mean()  # noqa: E731
    steps = list(doodl(turbo, PROMPT, loss, settings))
    assert steps[0].image.tobytes() == sample(turbo, PROMPT, settings).tobytes()
    assert min(s.loss for s in steps[1:]) < steps[0].loss


# --- the command line ---------------------------------------------------------------------------------


def test_cli_runs_a_few_step_model_without_guidance(turbo_folder, tmp_path, capsys):
    out = tmp_path / "turbo.png"
    base = ["--model", str(turbo_folder), "--prompt", PROMPT, "--loss", "symmetry", "--steps", "1",
            "--iterations", "2", "--out", str(out)]  # fmt: skip
    assert main(base + ["--guidance-scale", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("iteration  ") == 2 and "unconditional" not in captured.err
    assert Image.open(out).size == (64, 64)
    # Scale 0 is allowed (an unconditional image) but, as model cards say guidance_scale=0.0 for
    # "guidance off", the CLI says what it does.
    assert main(base + ["--guidance-scale", "0"]) == 0
    assert "ignores the prompt" in capsys.readouterr().err


def test_the_chain_is_a_run_setting():
    assert run_options(sampler="edict").settings.sampler == "edict"
    assert plain_chain(run_options(sampler="ddim", steps=20).settings)
    assert preset_values(EMBEDDED_PRESETS["text"])["sampler"] == "ddim"  # the embedded presets' chain
    with pytest.raises(ValueError, match="sampler"):
        run_options(sampler="euler")


def test_a_ddim_chain_stores_its_graph_on_small_latents_and_step_inputs_on_large(turbo):
    """Same gradient either way (test above); the graph saves recomputing each step's forward, step inputs
    save a large UNet's activations."""
    settings = DoodlSettings(steps=2)
    assert turbo.latent_shape()[-1] < 32 and chain_of(settings, turbo).mode == "autograd"
    large = SimpleNamespace(latent_shape=lambda height, width: (1, 4, 64, 64))  # SD at 512 px
    assert chain_of(settings, large).mode == "checkpoint"
    assert chain_of(replace(settings, mode="checkpoint"), turbo).mode == "checkpoint"
    assert chain_of(settings, turbo, from_photo=True).mode == "reversible"  # a photo's chain is EDICT's


def test_matched_compute_counts_the_backward_through_each_call(turbo):
    """Storing a DDIM chain's graph makes half the forward calls of recomputing it, not half the UNet work:
    random search at matched compute gets the samples of forward calls plus backward passes."""
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo, DoodlSettings(seed=2))
    schedule, counted = edict_schedule(turbo.scheduler, 4), {}
    for mode in ("autograd", "checkpoint"):
        with count_unet_calls(turbo.unet) as counted[mode]:
            latent_grad(eps, x, y, schedule, decode_pair_loss(turbo), mode, ddim_step)
    assert (counted["autograd"].calls, counted["autograd"].passes) == (4, 8)
    assert (counted["checkpoint"].calls, counted["checkpoint"].passes) == (8, 12)
