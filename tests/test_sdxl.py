"""SDXL through the whole chain: a tiny SDXL-architecture pipeline (two text encoders, pooled text and the
image size as the UNet's added conditions) saved offline and loaded through `load_pipeline`, as a real one."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from doodl import (
    DoodlSettings,
    LatentDiffusion,
    ModelLoadError,
    edict_denoise,
    edict_invert,
    edict_schedule,
    initial_latents,
    latent_grad,
    load_pipeline,
    one_step_guidance,
    optimize,
    sample,
)
from doodl.__main__ import main
from doodl.chain import denoise, plain_chain
from doodl.pipeline import PromptEmbeds
from doodl.tiny import save_tiny_sdxl_pipeline, sdxl_turbo_scheduler

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def xl(xl_folder):
    return load_pipeline(xl_folder)


@pytest.fixture(scope="module")
def xl64(xl_folder):
    return load_pipeline(xl_folder, dtype=torch.float64)


@pytest.fixture(scope="module")
def pipe(xl_folder):
    """diffusers' own SDXL pipeline over the same folder: the reference."""
    return StableDiffusionXLPipeline.from_pretrained(xl_folder, add_watermarker=False)


def ddim_without_clipping(pipe):
    """DDIM on the pipeline's noise schedule. Its clip_sample defaults to True when SDXL's Euler config does
    not say (Euler never clips): DOODL's chain does not clip, so neither does the reference."""
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)


def gray_loss(model):
    return lambda x0, y0: ((model.decode(torch.cat([x0, y0])) - 0.3) ** 2).mean()


def test_an_sdxl_folder_loads_as_sdxl(xl):
    assert xl.xl and xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    assert xl.resolution == 64  # the UNet's sample size x 8: the real SDXL's 128 gives 1024 px
    assert xl.force_zeros_for_empty_prompt


def test_prompt_embeddings_are_those_of_diffusers_sdxl_pipeline(xl, pipe):
    ours = xl.encode_prompt(PROMPT)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPT, device="cpu")
    torch.testing.assert_close(ours.hidden, torch.cat([uncond, cond]), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, torch.cat([uncond_pooled, pooled]), rtol=0, atol=1e-5)
    assert ours.hidden[0].abs().max() == 0  # SDXL's empty negative prompt is the zero embedding
    assert ours.hidden.shape[-1] == 48  # both encoders' widths, side by side
    negative = xl.encode_prompt(PROMPT, negative_prompt="blurry")
    assert negative.hidden[0].abs().max() > 0 and negative.pooled[0].abs().max() > 0


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_samples_what_diffusers_sdxl_pipeline_samples(xl, pipe, guidance_scale):
    """Plain DDIM from the same noise: the same UNet calls with the same added conditions (pooled text,
    size and crop ids) give the same latents. Scale 1: the conditional half only, as diffusers' "off"."""
    steps = 4
    settings = DoodlSettings(steps=steps, sampler="ddim", guidance_scale=guidance_scale, seed=5)
    eps = xl.noise_predictor(xl.encode_prompt(PROMPT), guidance_scale)
    x, y = initial_latents(xl, settings)
    with torch.no_grad():
        ours, _ = denoise(settings, eps, x, y, xl)
    pipe.scheduler = ddim_without_clipping(pipe)
    theirs = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=x.float(),
        output_type="latent",
    ).images
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)


def test_the_image_size_conditions_the_unet(xl):
    """The size ids follow the latents: at 64 and 96 px the same noise predictor feeds different ids."""
    eps = xl.noise_predictor(xl.encode_prompt(PROMPT), 7.5)
    seen = []
    handle = xl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()),
        with_kwargs=True,
    )
    try:
        for side in (8, 12):
            eps(torch.zeros(1, 4, side, side, dtype=torch.float64), 500)
    finally:
        handle.remove()
    assert seen[0].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert seen[1].tolist() == [[96, 96, 0, 0, 96, 96]] * 2


def test_edict_round_trip_is_exact(xl):
    eps = xl.noise_predictor(xl.encode_prompt(PROMPT), 7.5)
    x, y = initial_latents(xl, DoodlSettings(seed=3))
    y = y + 0.01 * torch.randn_like(y)
    schedule = edict_schedule(xl.scheduler, 50)
    with torch.no_grad():
        back = edict_invert(eps, *edict_denoise(eps, x, y, schedule), schedule)
    assert max((b - a).abs().max().item() for a, b in zip((x, y), back)) <= 1e-10


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_gradient_equals_autograd(xl, mode):
    eps = xl.noise_predictor(xl.encode_prompt(PROMPT), 7.5)
    x, y = initial_latents(xl, DoodlSettings(seed=1))
    schedule = edict_schedule(xl.scheduler, 12)
    reference = latent_grad(eps, x, y, schedule, gray_loss(xl), "autograd")
    result = latent_grad(eps, x, y, schedule, gray_loss(xl), mode)
    g, g_ref = (torch.cat([v.flatten() for v in r.grad]) for r in (result, reference))
    assert g_ref.norm() > 0
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) >= 0.9999
    assert (g - g_ref).norm() / g_ref.norm() <= 1e-4


def test_reversible_gradient_equals_finite_differences(xl64):
    eps = xl64.noise_predictor(xl64.encode_prompt(PROMPT), 7.5)
    z, _ = initial_latents(xl64, DoodlSettings(seed=2))
    schedule = edict_schedule(xl64.scheduler, 8)
    loss = gray_loss(xl64)
    gx, gy = latent_grad(eps, z, z.clone(), schedule, loss, "reversible").grad
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=z.dtype)
    h = 1e-5
    with torch.no_grad():
        up, down = (
            loss(*edict_denoise(eps, z + s * h * direction, z + s * h * direction, schedule)) for s in (1, -1)
        )
    numeric = (up - down).item() / (2 * h)
    assert numeric != 0
    assert ((gx + gy) * direction).sum().item() == pytest.approx(numeric, rel=1e-5)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from doodl import load_pipeline, initial_latents, DoodlSettings, edict_schedule, latent_grad
    torch.set_num_threads(1)
    folder, steps = sys.argv[1], int(sys.argv[2])
    model = load_pipeline(folder)
    eps = model.noise_predictor(model.encode_prompt("a red circle"), 7.5)
    x, y = initial_latents(model, DoodlSettings())
    loss = lambda a, b: model.decode(torch.cat([a, b])).mean()
    latent_grad(eps, x, y, edict_schedule(model.scheduler, steps), loss, "reversible")
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    """
)


def test_reversible_memory_is_flat_in_steps(tmp_path):
    folder = save_tiny_sdxl_pipeline(tmp_path / "xl32", sample_size=32)

    def peak_mb(steps):
        args = [sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(steps)]
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    peaks = {steps: peak_mb(steps) for steps in (5, 40)}
    assert peaks[40] <= 1.05 * peaks[5], peaks


def test_doodl_and_the_one_step_baseline_lower_a_loss(xl):
    settings = DoodlSettings(steps=6, iterations=4, grad_clip=0.05, seed=4)
    loss = lambda images: ((images - 0.8) ** 2).mean()  # noqa: E731
    result = optimize(xl, PROMPT, loss, settings)
    unguided = loss(to_unit(sample(xl, PROMPT, settings))).item()
    assert result.losses[0] == pytest.approx(unguided, abs=1e-2)  # iteration 0: the unguided sample
    assert min(result.losses[1:]) < result.losses[0]
    assert loss(to_unit(one_step_guidance(xl, PROMPT, loss, 50.0, settings))).item() < unguided


def to_unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def test_an_already_loaded_sdxl_pipeline_becomes_a_doodl_model(pipe, xl):
    model = LatentDiffusion.from_pipeline(pipe)
    assert model.xl and model.unet is pipe.unet and model.text_encoder_2 is pipe.text_encoder_2
    settings = DoodlSettings(steps=6)
    assert np.array_equal(
        np.asarray(sample(model, PROMPT, settings)), np.asarray(sample(xl, PROMPT, settings))
    )


@pytest.fixture(scope="module")
def fixed_vae(xl_folder, tmp_path_factory):
    """The model's VAE, saved apart and marked safe in float16 (as madebyollin/sdxl-vae-fp16-fix is)."""
    vae = AutoencoderKL.from_pretrained(xl_folder, subfolder="vae")
    vae.register_to_config(force_upcast=False)
    folder = tmp_path_factory.mktemp("vae-fp16-fix")
    vae.save_pretrained(folder)
    return folder


def test_a_float16_sdxl_vae_is_upcast_unless_replaced(xl_folder, fixed_vae, tmp_path):
    """SDXL's VAE overflows in float16 (its config says force_upcast): it is kept in float32, as diffusers'
    SDXL pipeline does; a VAE fixed for float16 given with `vae=` stays in float16."""
    half = load_pipeline(xl_folder, dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    replaced = load_pipeline(xl_folder, dtype=torch.float16, vae=fixed_vae)
    assert replaced.vae.dtype == torch.float16 and not replaced.vae.config.force_upcast
    assert load_pipeline(xl_folder, vae=xl_folder).vae.config.force_upcast  # a pipeline folder's vae/
    with pytest.raises(ModelLoadError, match="could not load the VAE"):
        load_pipeline(xl_folder, vae=tmp_path / "nothing-here")


def test_an_sdxl_refiner_or_another_pipeline_is_refused_clearly(xl_folder, tmp_path):
    index = json.loads((xl_folder / "model_index.json").read_text())
    for name, message in (
        ("PixArtAlphaPipeline", "not a pipeline DOODL runs"),
        ("KandinskyV22Pipeline", "not a pipeline DOODL runs"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": name}))
        with pytest.raises(ModelLoadError, match=message):
            load_pipeline(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_folder, add_watermarker=False)
    pipe.text_encoder = None  # what a refiner ships
    with pytest.raises(ModelLoadError, match="the pipeline has no text_encoder"):
        LatentDiffusion.from_pipeline(pipe)


def test_a_single_prompt_row_is_refused(xl):
    one_row = PromptEmbeds(xl.encode_prompt(PROMPT).hidden[:1])
    with pytest.raises(ValueError, match="unconditional, conditional"):
        xl.noise_predictor(one_row, 7.5)


# --- SDXL-Turbo: trailing timesteps, one to four steps, guidance off ---------------------------------


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(
        tmp_path_factory.mktemp("tiny-sdxl-turbo"), scheduler=sdxl_turbo_scheduler()
    )


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_samples_what_diffusers_samples(turbo_folder, steps):
    turbo = load_pipeline(turbo_folder)
    settings = DoodlSettings(steps=steps, guidance_scale=1.0, seed=6)
    assert plain_chain(settings)
    eps = turbo.noise_predictor(turbo.encode_prompt(PROMPT), 1.0)
    x, y = initial_latents(turbo, settings)
    with torch.no_grad():
        ours, _ = denoise(settings, eps, x, y, turbo)
    pipe = StableDiffusionXLPipeline.from_pretrained(turbo_folder, add_watermarker=False)
    pipe.scheduler = ddim_without_clipping(pipe)
    theirs = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=x.float(), output_type="latent"
    )
    torch.testing.assert_close(ours.float(), theirs.images, rtol=1e-4, atol=1e-4)


def test_cli_runs_sdxl_and_sdxl_turbo(xl_folder, turbo_folder, tmp_path, capsys):
    for folder, extra in (
        (xl_folder, ["--steps", "4", "--vae", str(xl_folder)]),  # a pipeline folder: its vae/
        (turbo_folder, ["--steps", "1", "--guidance-scale", "1"]),
    ):
        out = tmp_path / f"{folder.name}.png"
        args = ["--model", str(folder), "--prompt", PROMPT, "--loss", "symmetry", "--iterations", "2",
                "--out", str(out), "--baseline-scale", "5", *extra]  # fmt: skip
        assert main(args) == 0
        assert capsys.readouterr().out.count("iteration  ") == 2
        assert Image.open(out).size == (64, 64)
        assert Image.open(out.with_name(f"{out.stem}-one-step.png")).size == (64, 64)


def test_the_apps_text_tab_runs_on_sdxl(xl_folder, tmp_path):
    """Through the app's own run function, as a click on the text tab with the model field set to SDXL."""
    import app
    from doodl.serving import ModelNames, Serving
    from doodl.tiny import save_tiny_clip

    serving = Serving(ModelNames(sd=str(xl_folder), clip=str(save_tiny_clip(tmp_path / "clip"))))
    asked = {"steps": 2, "iterations": 2, "cutouts": 2, "seed": 0, "compare": False}
    updates = list(
        app.run_tab(
            serving,
            "text",
            progress=lambda *args, **kwargs: None,
            model=str(xl_folder),
            prompt=PROMPT,
            guides={"clip": serving.names.clip},
            settings=asked,
        )
    )
    assert app.MODELS.pipeline(str(xl_folder)).xl
    _, status, curve, best, _, _ = updates[-1]
    assert status.startswith("Done: iteration 2 of 2"), status
    assert len(curve) == 2 and Image.open(best).size == (64, 64)


def test_the_app_serves_its_model_with_the_hosts_vae_and_no_other(xl_folder, fixed_vae, tiny_folder):
    import app
    from doodl.serving import ModelCache, request

    serving = app.serving_of(app.parse_args(["--model", str(xl_folder), "--vae", str(fixed_vae)]))
    models = ModelCache("cpu", torch.float32)
    own = request(serving, "text", str(xl_folder), PROMPT, {}, {})
    assert own.vae == str(fixed_vae)
    assert not models.pipeline(own.model, own.vae).vae.config.force_upcast  # the host's VAE
    other = request(serving, "text", str(tiny_folder), PROMPT, {}, {})  # a local visitor's own model
    assert other.vae == "" and models.pipeline(other.model, other.vae).vae.config.force_upcast
