"""Flow-matching transformers through the whole chain: tiny SD3.5- and FLUX.1-architecture pipelines (MMDiT,
double/single-stream blocks; two CLIPs and T5, CLIP and T5) saved offline and loaded through `load_pipeline`,
as a real one."""

import itertools
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from doodl import (
    DoodlSettings,
    Flux,
    LatentDiffusion,
    ModelLoadError,
    StableDiffusion3,
    edict_denoise,
    edict_invert,
    initial_latents,
    invert_image,
    latent_grad,
    load_pipeline,
    one_step_guidance,
    optimize,
    sample,
)
from doodl.chain import plain_chain, schedule_of
from doodl.edict import ddim_denoise
from doodl.tiny import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

PROMPT = "a red circle above a blue square"
KINDS = ("sd3", "flux-dev", "flux-schnell")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flow")
    return {
        "sd3": save_tiny_sd3_pipeline(root / "sd3"),
        "flux-dev": save_tiny_flux_pipeline(root / "flux-dev"),
        "flux-schnell": save_tiny_flux_pipeline(root / "flux-schnell", guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def models(folders):
    return {kind: load_pipeline(folder) for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def models64(folders):
    return {kind: load_pipeline(folder, dtype=torch.float64) for kind, folder in folders.items()}


def diffusers_pipeline(folder):
    """diffusers' own pipeline over the same folder: the reference."""
    index = json.loads((folder / "model_index.json").read_text())
    return {"FluxPipeline": FluxPipeline, "StableDiffusion3Pipeline": StableDiffusion3Pipeline}[
        index["_class_name"]
    ].from_pretrained(folder)


def gray_loss(model):
    return lambda x0, y0: ((model.decode(torch.cat([x0, y0])) - 0.3) ** 2).mean()


def flat(pair):
    return torch.cat([g.flatten() for g in pair])


# --- loading ---------------------------------------------------------------------------------------


def test_each_folder_loads_as_its_family(models):
    assert type(models["sd3"]) is StableDiffusion3
    assert type(models["flux-dev"]) is Flux and models["flux-dev"].guidance_distilled
    assert type(models["flux-schnell"]) is Flux and not models["flux-schnell"].guidance_distilled
    for model in models.values():
        assert model.resolution == 64  # the real ones' 1024 px: SD3's transformer, FLUX's VAE config
        assert model.latent_shape() == (1, 16, 8, 8)
        assert model.denoiser is model.transformer
        with pytest.raises(ValueError, match="multiple of 16"):  # 8 px of VAE x the 2x2 patches
            model.latent_shape(height=72)


def test_prompt_embeddings_are_those_of_diffusers_pipelines(models, folders):
    sd3 = models["sd3"].encode_prompt(PROMPT, negative_prompt="blurry")
    cond, uncond, pooled, uncond_pooled = diffusers_pipeline(folders["sd3"]).encode_prompt(
        PROMPT, None, None, negative_prompt="blurry", device="cpu", max_sequence_length=16
    )
    torch.testing.assert_close(sd3.hidden, torch.cat([uncond, cond]), rtol=0, atol=1e-6)
    torch.testing.assert_close(sd3.pooled, torch.cat([uncond_pooled, pooled]), rtol=0, atol=1e-6)
    assert sd3.hidden.shape[1] == 77 + 16  # the CLIPs' tokens, then T5's
    flux = models["flux-dev"].encode_prompt(PROMPT)
    hidden, pooled, _ = diffusers_pipeline(folders["flux-dev"]).encode_prompt(
        PROMPT, None, device="cpu", max_sequence_length=16
    )
    assert len(flux) == 1  # guidance-distilled: the conditional row alone
    torch.testing.assert_close(flux.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(flux.pooled, pooled, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="negative prompt"):
        models["flux-dev"].encode_prompt(PROMPT, negative_prompt="blurry")


@pytest.mark.parametrize(
    "kind, steps, guidance_scale",
    [("sd3", 6, 5.0), ("sd3", 6, 1.0), ("flux-dev", 6, 3.5), ("flux-schnell", 4, 0.0)],
)
def test_the_plain_chain_samples_what_diffusers_samples(models, folders, kind, steps, guidance_scale):
    """The Euler chain of the model's own scheduler, spaced and shifted as its pipeline does, with CFG (SD3),
    without (scale 1), with FLUX.1-dev's guidance embedding and schnell's four unshifted steps."""
    model = models[kind]
    noise = torch.randn(model.latent_shape(), generator=torch.Generator().manual_seed(1))
    eps = model.noise_predictor(model.encode_prompt(PROMPT), guidance_scale)
    ours, _ = ddim_denoise(eps, noise.double(), noise.double(), model.schedule(steps, 0.93, True))
    pipe = diffusers_pipeline(folders[kind])
    asked = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
    asked |= dict(height=64, width=64, max_sequence_length=model.max_sequence_length)
    if isinstance(model, Flux):
        packed = FluxPipeline._pack_latents(noise, *noise.shape)
        theirs = FluxPipeline._unpack_latents(pipe(PROMPT, latents=packed, **asked).images, 64, 64, 8)
    else:
        theirs = pipe(PROMPT, latents=noise, **asked).images
    assert theirs.abs().max() > 1  # a sample, not zeros
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)


def test_flux_dev_shifts_its_steps_by_the_image_size_and_schnell_does_not(models):
    dev, schnell = models["flux-dev"], models["flux-schnell"]
    small, large = (dev.schedule(8, 0.93, True, dev.latent_shape(side, side)) for side in (64, 128))
    assert large.timesteps[1] > small.timesteps[1]  # more tokens, more of the chain spent on high noise
    assert schnell.schedule(4, 0.93, True).timesteps == (1000.0, 750.0, 500.0, 250.0)
    for schedule in (small, large):
        assert set(schedule.a) == {1.0} and sum(schedule.b) == pytest.approx(-1.0)  # from noise (1) to 0


# --- exactness of the coupled chain ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_coupled_round_trip_is_exact(models64, kind):
    model = models64[kind]
    eps = model.noise_predictor(model.encode_prompt(PROMPT), 3.5)
    x, y = initial_latents(model, DoodlSettings(seed=3))
    schedule = model.schedule(12, 0.93, True)
    with torch.no_grad():
        x0, y0 = edict_denoise(eps, x, y, schedule)
        xT, yT = edict_invert(eps, x0, y0, schedule)
    assert (x0 - x).abs().max() > 0.1  # the chain moved
    assert max((xT - x).abs().max(), (yT - y).abs().max()) <= 1e-10


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_gradient_equals_autograd(models, kind, mode):
    model = models[kind]
    eps = model.noise_predictor(model.encode_prompt(PROMPT), 3.5)
    x, y = initial_latents(model, DoodlSettings(seed=1))
    schedule = model.schedule(10, 0.93, True)
    reference = latent_grad(eps, x, y, schedule, gray_loss(model), "autograd")
    result = latent_grad(eps, x, y, schedule, gray_loss(model), mode)
    g, g_ref = flat(result.grad), flat(reference.grad)
    assert g_ref.norm() > 0
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) >= 0.9999
    assert (g - g_ref).norm() / g_ref.norm() <= 1e-4


# SD3.5's QK RMSNorm computes its variance in float32 even in a float64 model (diffusers' RMSNorm): the
# step must be large enough for its round-off (at 1e-4 one element is 0.9 % off, at 1e-2 all within 1e-5).
@pytest.mark.parametrize("kind, h", [("sd3", 1e-2), ("flux-dev", 1e-4)])
def test_reversible_gradient_equals_finite_differences(models64, kind, h):
    model = models64[kind]
    eps = model.noise_predictor(model.encode_prompt(PROMPT), 3.5)
    z, _ = initial_latents(model, DoodlSettings(seed=2))
    schedule = model.schedule(8, 0.93, True)
    loss_of_final = gray_loss(model)
    gx, gy = latent_grad(eps, z, z.clone(), schedule, loss_of_final, "reversible").grad
    grad_z = (gx + gy).flatten()  # x_T = y_T = z

    def loss_at(v):
        with torch.no_grad():
            return loss_of_final(*edict_denoise(eps, v, v.clone(), schedule)).item()

    for index in (0, 77, 500, 1023):
        bump = torch.zeros(z.numel(), dtype=z.dtype)
        bump[index] = h
        bump = bump.view_as(z)
        numeric = (loss_at(z + bump) - loss_at(z - bump)) / (2 * h)
        assert numeric == pytest.approx(grad_z[index].item(), rel=1e-4, abs=1e-9), index


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from doodl import load_pipeline, initial_latents, DoodlSettings, latent_grad
    torch.set_num_threads(1)
    folder, steps = sys.argv[1], int(sys.argv[2])
    model = load_pipeline(folder)
    eps = model.noise_predictor(model.encode_prompt("a red circle"), 3.5)
    x, y = initial_latents(model, DoodlSettings())
    loss = lambda a, b: model.decode(torch.cat([a, b])).mean()
    latent_grad(eps, x, y, model.schedule(steps, 0.93, True), loss, "reversible")
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    """
)


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_reversible_memory_is_flat_in_steps(tmp_path, kind):
    # Large latents (32x32: 256 tokens), so that a call's activations show beside the interpreter's memory.
    save = save_tiny_sd3_pipeline if kind == "sd3" else save_tiny_flux_pipeline
    folder = save(tmp_path / kind, sample_size=32)

    def peak_mb(steps):
        args = [sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(steps)]
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    peaks = {steps: peak_mb(steps) for steps in (5, 40)}
    assert peaks[40] <= 1.05 * peaks[5], peaks


# --- DOODL, the baseline and photos on a flow model ---------------------------------------------------


def to_unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_doodl_and_the_one_step_baseline_lower_a_loss(models, kind):
    model = models[kind]
    settings = DoodlSettings(steps=12, iterations=4, grad_clip=0.05, guidance_scale=3.5, seed=4)
    loss = lambda images: ((images - 0.8) ** 2).mean()  # noqa: E731
    result = optimize(model, PROMPT, loss, settings)
    unguided = loss(to_unit(sample(model, PROMPT, settings))).item()
    assert result.losses[0] == pytest.approx(unguided, abs=1e-2)  # iteration 0: the unguided sample
    assert min(result.losses[1:]) < result.losses[0]
    assert np.array_equal(  # at scale 0, the one-step baseline is the unguided sample
        np.asarray(one_step_guidance(model, PROMPT, loss, 0.0, settings)),
        np.asarray(sample(model, PROMPT, settings)),
    )
    assert loss(to_unit(one_step_guidance(model, PROMPT, loss, 50.0, settings))).item() < unguided


def test_the_one_step_estimate_is_the_flows_own(models):
    model = models["flux-dev"]
    assert model.clean_coefficients(750.0) == (1.0, 0.75)  # x0 = z - 0.75 v


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_a_photo_inverted_through_the_coupled_chain_is_regenerated(models, kind):
    model = models[kind]
    settings = DoodlSettings(steps=10, guidance_scale=3.5, photo_strength=1.0)
    photo = Image.new("RGB", (100, 80), (200, 40, 40))
    x, y = invert_image(model, photo, PROMPT, settings)
    eps = model.noise_predictor(model.encode_prompt(PROMPT), settings.guidance_scale)
    with torch.no_grad():
        x0, _ = edict_denoise(eps, x, y, schedule_of(settings, model, from_photo=True))
        color = torch.tensor([200, 40, 40]).view(1, 3, 1, 1) / 255
        encoded = model.encode(color.expand(1, 3, 64, 64))
    assert (x - encoded.double()).abs().max() > 0.1  # inverted to somewhere else than the photo's latent
    assert (x0 - encoded.double()).abs().max() < 1e-4
    steps = optimize(model, PROMPT, lambda im: ((im - 0.3) ** 2).mean(), settings, init=(x, y))
    assert len(steps.losses) == settings.iterations


def test_text_encoders_are_released_and_encoded_prompts_stay(folders):
    model = load_pipeline(folders["flux-dev"])
    before = model.encode_prompt(PROMPT)
    model.release_text_encoders()
    assert model.pipe.text_encoder is None and model.pipe.text_encoder_2 is None
    assert model.encode_prompt(PROMPT) is before  # encoded once, kept
    settings = DoodlSettings(steps=4, guidance_scale=3.5)
    assert sample(model, PROMPT, settings).size == (64, 64)
    with pytest.raises(ValueError, match="released"):
        model.encode_prompt("another prompt")


def test_an_already_loaded_flow_pipeline_becomes_a_doodl_model(folders, models):
    pipe = diffusers_pipeline(folders["sd3"])
    model = LatentDiffusion.from_pipeline(pipe)
    assert type(model) is StableDiffusion3 and model.transformer is pipe.transformer and model.vae is pipe.vae
    assert not any(p.requires_grad for p in pipe.transformer.parameters()) and not pipe.transformer.training
    settings = DoodlSettings(steps=6, guidance_scale=3.5)
    assert np.array_equal(
        np.asarray(sample(model, PROMPT, settings)), np.asarray(sample(models["sd3"], PROMPT, settings))
    )


def test_a_conditioned_flux_variant_is_refused_clearly(folders):
    pipe = diffusers_pipeline(folders["flux-dev"])
    pipe.transformer.register_to_config(in_channels=384)  # FLUX.1 Fill's: image and mask beside the latent
    with pytest.raises(ModelLoadError, match="Fill, Control"):
        LatentDiffusion.from_pipeline(pipe)


# --- the command line, batch runs and every tab of the app --------------------------------------------


def test_cli_runs_sd3_and_flux(folders, tmp_path, capsys):
    from doodl.__main__ import main

    for kind in KINDS:
        out = tmp_path / f"{kind}.png"
        args = ["--model", str(folders[kind]), "--prompt", PROMPT, "--loss", "symmetry", "--iterations", "2",
                "--steps", "4", "--out", str(out), "--baseline-scale", "5"]  # fmt: skip
        assert main(args) == 0
        assert capsys.readouterr().out.count("iteration  ") == 2
        assert Image.open(out).size == (64, 64)
        assert Image.open(out.with_name(f"{out.stem}-one-step.png")).size == (64, 64)


def test_a_batch_runs_on_flux(folders, tmp_path):
    from doodl.batch import main
    from doodl.experiment import METHODS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "runs"
    args = [str(prompts), "--out", str(out), "--model", str(folders["flux-dev"]), "--loss", "symmetry"]
    assert main([*args, "--steps", "2", "--iterations", "1", "--cutouts", "2"]) == 0
    records = [json.loads(path.read_text()) for path in out.glob("*/*/records/*.json")]
    assert sorted(record["method"] for record in records) == sorted(METHODS)


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    """A tiny random CLIP, classifier and aesthetic head, as a host names them."""
    from safetensors.torch import save_file

    from doodl.tiny import TINY_CLIP, save_tiny_classifier, save_tiny_clip

    folder = tmp_path_factory.mktemp("guides")
    head = folder / "aesthetic_head.safetensors"
    weight = 0.5 * torch.randn(1, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(0))
    save_file({"weight": weight, "bias": torch.tensor([5.5])}, head)
    clip = str(save_tiny_clip(folder / "clip"))
    classifier = str(save_tiny_classifier(folder / "classifier", ("crimson", "scarlet")))
    return {"clip": clip, "classifier": classifier, "aesthetic_clip": clip, "aesthetic_head": str(head)}


@pytest.mark.parametrize("kind", ["sd3", "flux-schnell"])
def test_every_tab_of_the_app_runs_on_a_flow_model(folders, guides, tmp_path, kind):
    """Through the app's own run function, as a click on each tab with the model field set to the folder,
    from noise and from a photo (its EDICT inversion through the coupled flow chain)."""
    import app
    from doodl.serving import ModelNames, Serving

    model = str(folders[kind])
    serving = Serving(ModelNames(sd=model, **guides))
    reference = tmp_path / "reference.png"
    Image.new("RGB", (48, 40), (245, 110, 130)).save(reference)
    asked = {"steps": 4, "iterations": 2, "cutouts": 2, "seed": 0, "compare": True, "guidance_scale": 3.5}
    tabs = {
        "text": dict(guides={"clip": guides["clip"]}),
        "vocabulary": dict(guides={"classifier": guides["classifier"]}, target_class="scarlet"),
        "personalization": dict(guides={"clip": guides["clip"]}, references=[str(reference)]),
        "aesthetic": dict(guides={r: guides[r] for r in ("aesthetic_clip", "aesthetic_head")}),
    }
    for (tab, inputs), photo in itertools.product(tabs.items(), (None, str(reference))):
        click = {"model": model, "prompt": PROMPT, "settings": asked, "photo": photo, **inputs}
        run = list(app.run_tab(serving, tab, lambda *a, **k: None, **click))[-1]
        _, status, curve, best, gallery, iterations = run
        assert status.startswith("Done: iteration 2 of 2"), (tab, status)
        assert len(curve) == len(iterations) == 2 and Image.open(best).size == (64, 64), tab
        assert len(gallery) == (3 if photo is None else 4), tab  # (the photo,) unguided, one-step, DOODL


def test_the_presets_of_flow_models_are_their_makers(folders):
    from doodl.embedded import presets

    sd3, dev, schnell = (presets(folders[kind])["text"].settings for kind in KINDS)
    assert (sd3.steps, sd3.guidance_scale) == (40, 4.5)  # SD3.5 Medium's card (the tiny one: dual attention)
    assert (dev.steps, dev.guidance_scale) == (28, 3.5)  # FluxPipeline's defaults
    assert (schnell.steps, schnell.guidance_scale) == (4, 1.0) and plain_chain(schnell)  # plain Euler


def test_checkpointing_inside_the_transformer_gives_the_same_run(models, monkeypatch):
    """The transformer's own gradient checkpointing in each VJP (`denoiser_checkpointing`): the same
    gradients, so the same iterations; switched off again after the run."""
    model = models["sd3"]
    loss = lambda images: ((images - 0.8) ** 2).mean()  # noqa: E731
    settings = DoodlSettings(steps=6, iterations=3, grad_clip=0.05, guidance_scale=3.5, seed=4)
    block, block_calls = model.transformer.transformer_blocks[0], []
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: block_calls.append(1) or forward(*a, **k))
    plain = optimize(model, PROMPT, loss, settings)
    calls = len(block_calls)
    checkpointed = optimize(model, PROMPT, loss, replace(settings, denoiser_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert len(block_calls) - calls > calls  # each VJP ran the block again in its backward
    assert not model.transformer.gradient_checkpointing


def test_sd3_saved_without_t5_loads_and_reads_zeros_in_its_place(folders, tmp_path):
    """SD3 runs without T5 (its pipeline reads zeros in T5's place, to save T5-XXL's memory): a folder saved
    so lists T5 as absent, and loads."""
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "no-t5")
    model = load_pipeline(tmp_path / "no-t5")
    hidden = model.encode_prompt(PROMPT).hidden
    assert hidden.shape[1] == 77 + model.max_sequence_length and hidden[:, 77:].abs().max() == 0
    assert sample(model, PROMPT, DoodlSettings(steps=4, guidance_scale=3.5)).size == (64, 64)


def test_a_family_takes_its_pipelines_and_those_named_like_them():
    """A FLUX or SD3 img2img pipeline holds a text-to-image one's parts: the family takes it, from the
    folder's class name (`load_pipeline`) as from a loaded pipeline (`from_pipeline`). On a GPU each runs
    in its makers' dtype: float16 for SD, bfloat16 for SD3 and FLUX (which overflow in float16)."""
    from diffusers import (
        FluxImg2ImgPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    from doodl.pipeline import StableDiffusion, family_of, pipeline_named

    assert (
        family_of(FluxImg2ImgPipeline) is Flux
        and family_of(StableDiffusion3Img2ImgPipeline) is StableDiffusion3
    )
    assert family_of(StableDiffusionXLImg2ImgPipeline) is StableDiffusion
    assert (
        pipeline_named("FluxImg2ImgPipeline") is FluxPipeline
        and pipeline_named("PixArtAlphaPipeline") is None
    )
    assert (StableDiffusion.gpu_dtype, Flux.gpu_dtype, StableDiffusion3.gpu_dtype) == (
        torch.float16,
        torch.bfloat16,
        torch.bfloat16,
    )
