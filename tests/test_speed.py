"""What keeps a denoiser call as cheap as diffusers' own: no host synchronisation inside the chain, and the
denoiser compiled on demand (`DoodlSettings.compile`).

On a GPU, reading a tensor on the host (`.item()`, `float(t)`, `.cpu()`, `.tolist()`, `bool(t)`) waits for
every queued kernel, and copying host data to the device (`torch.tensor(..., device=...)`, what a UNet
does with a Python-number timestep) synchronises too. On the CPU neither costs anything, but the calls
are recorded all the same, so that one added inside a step fails here, not on a GPU later.
"""

import argparse
import functools
import time
from dataclasses import fields, replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import doodl.pipeline
from doodl import load_pipeline
from doodl.chain import schedule_of
from doodl.cli import add_model_arguments, add_serving_arguments, serving_of
from doodl.edict import ddim_denoise, ddim_step, edict_denoise, edict_invert
from doodl.embedded import EMBEDDED_PRESETS
from doodl.gradient import MODES, PerLatentLoss, latent_grad
from doodl.optimize import conditioning, initial_latents
from doodl.pipeline import count_unet_calls
from doodl.serving import Serving, preset_values, request
from doodl.settings import DoodlSettings
from doodl.tiny import (
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    save_tiny_sdxl_pipeline,
    save_tiny_turbo_pipeline,
)

PROMPT = "a red circle"
# Tensor methods and functions that read a tensor on the host, or copy host data to a device.
HOST_SYNCS = frozenset(
    {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "tensor", "as_tensor"}
)


class HostSyncs(TorchFunctionMode):
    """Records every call of HOST_SYNCS made while it is on, whatever the tensor's device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def host_syncs(run, *args) -> list[str]:
    with HostSyncs() as mode:
        run(*args)
    return mode.calls


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """SD (noise prediction), SD-Turbo's kind (v-prediction, converted to noise on the device), SDXL
    (its added conditions: the image size, made on the device once), SD3 and FLUX (velocities; FLUX's
    position ids made once per size)."""
    return {
        "sd": tiny,
        "v-prediction": load_pipeline(save_tiny_turbo_pipeline(tmp_path_factory.mktemp("turbo"))),
        "sdxl": load_pipeline(save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("xl"))),
        "sd3": load_pipeline(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))),
        "flux": load_pipeline(save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))),
    }


def chain_runs(model, steps: int) -> dict[str, object]:
    """Each run a step of which must not synchronise, as a function of a fresh predictor (whose first call
    is in the run)."""
    settings = DoodlSettings(steps=steps, guidance_scale=7.5)
    schedule = schedule_of(settings, model)
    x, y = initial_latents(model, settings)
    loss = PerLatentLoss(lambda latent: latent.square().mean())
    runs = {
        "edict_denoise": lambda eps: edict_denoise(eps, x, y, schedule),
        "edict_invert": lambda eps: edict_invert(eps, x, y, schedule),
        "ddim_denoise": lambda eps: ddim_denoise(eps, x, y, schedule),
    }
    runs = {name: torch.no_grad()(run) for name, run in runs.items()}
    for mode in MODES:
        runs[f"latent_grad {mode}"] = lambda eps, mode=mode: latent_grad(eps, x, y, schedule, loss, mode)
    for mode in ("checkpoint", "autograd"):
        runs[f"latent_grad ddim {mode}"] = lambda eps, mode=mode: latent_grad(
            eps, x, y, schedule, loss, mode, ddim_step
        )
    return runs


@pytest.mark.parametrize("family", ["sd", "v-prediction", "sdxl", "sd3", "flux"])
def test_no_host_sync_inside_a_step(one_thread, models, family):
    """Each run records the same at 2 and 4 steps: nothing per step. The chains record nothing but SDXL's
    image-size ids, copied to the device at a predictor's first call; a gradient adds the final loss's
    value, read once per latent judged."""
    model = models[family]
    first_call = ["tensor"] if family == "sdxl" else []  # SDXL's image-size ids
    two, four = chain_runs(model, 2), chain_runs(model, 4)

    def eps():
        return conditioning(model, PROMPT, DoodlSettings(guidance_scale=7.5))

    for name in two:
        syncs = host_syncs(four[name], eps())
        assert host_syncs(two[name], eps()) == syncs, name
        chain_only = name.endswith(("denoise", "invert"))
        assert syncs == first_call + ([] if chain_only else ["__float__"] * 2), name


def test_a_python_number_timestep_would_be_seen(one_thread, tiny):
    """The check has teeth: a schedule whose timesteps stay numbers (not `on` the device) makes the
    predictor copy each to the device, once per call."""
    settings = DoodlSettings(steps=3)
    eps = conditioning(tiny, PROMPT, settings)
    x, y = initial_latents(tiny, settings)
    numbers = tiny.schedule(settings.steps, settings.p, settings.leapfrog)
    tensors = numbers.on(tiny.device)
    with torch.no_grad():
        assert host_syncs(edict_denoise, eps, x, y, numbers) == ["tensor"] * 6
        assert host_syncs(edict_denoise, eps, x, y, tensors) == []


def test_a_schedule_on_the_device_keeps_its_numbers(tiny):
    schedule = tiny.schedule(10, 0.93, True)
    on = schedule.on(tiny.device)
    assert on == schedule and on.timesteps == schedule.timesteps
    assert [int(t) for t in on.tensors] == list(schedule.timesteps)
    assert [int(t) for t in on.last(4).tensors] == list(schedule.timesteps[-4:])
    assert schedule.timestep(0) == schedule.timesteps[0] and on.timestep(0) is on.tensors[0]


# --- compiled calls --------------------------------------------------------------------------------


COMPILE_LIMIT_S = 120  # the whole check, compiles included (aot_eager: about 10 s on one busy core)


def test_compiled_denoiser_samples_and_differentiates_as_eager(one_thread, tiny_folder, monkeypatch):
    """A short chain and a reversible gradient, compiled (aot_eager: the capture without inductor's minutes
    of C++ generation on a CPU), equal eager's; one graph without gradients and one with, whatever the
    timestep; the calls still counted."""
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    monkeypatch.setattr(
        doodl.pipeline,
        "compiled_denoiser",
        functools.partial(doodl.pipeline.compiled_denoiser, backend=counting),
    )
    begin = time.perf_counter()
    model = load_pipeline(tiny_folder)  # its own: the compiled copy is cached on the model
    eager_settings = DoodlSettings(steps=3, guidance_scale=7.5)
    settings = replace(eager_settings, compile=True)
    schedule = schedule_of(settings, model)
    x, y = initial_latents(model, settings)

    def loss(latent: torch.Tensor) -> torch.Tensor:
        return model.decode(latent).square().mean()

    results = {}
    for name, s in (("eager", eager_settings), ("compiled", settings)):
        eps = conditioning(model, PROMPT, s)
        with count_unet_calls(model.denoiser) as calls:
            with torch.no_grad():
                sample = edict_denoise(eps, x, y, schedule)
            grad = latent_grad(eps, x, y, schedule, PerLatentLoss(loss))
        results[name] = (sample, grad, calls.calls)
    (sample, grad, calls), (compiled_sample, compiled_grad, compiled_calls) = results.values()
    for a, b in zip((*sample, *grad.grad), (*compiled_sample, *compiled_grad.grad)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert compiled_grad.loss == pytest.approx(grad.loss, rel=1e-5)
    assert compiled_calls == calls == 6 + 12  # a sample's 2 a step; the gradient's 2 forwards and 2 VJPs
    assert len(graphs) == 2  # no gradients, and with them; not one per timestep
    assert model.compiled is model.compiled and model.compiled.vae is model.vae
    assert isinstance(model.compiled.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    assert model.denoiser is model.unet and not isinstance(
        model.unet, torch._dynamo.eval_frame.OptimizedModule
    )
    assert time.perf_counter() - begin < COMPILE_LIMIT_S


def test_compile_is_the_last_setting_and_leaves_stored_keys_as_they_were():
    assert fields(DoodlSettings)[-1].name == "compile" and DoodlSettings().compile is False
    preset = EMBEDDED_PRESETS["text"]
    assert "compile" not in preset.settings.changed() and "compile" not in preset.key()
    compiled = replace(preset, settings=replace(preset.settings, compile=True))
    assert compiled.key() == preset.key() and compiled.key(from_noise=True) == preset.key(from_noise=True)


def test_compile_from_the_command_line_and_the_host():
    from doodl.cli import add_run_arguments, chosen_settings

    run = argparse.ArgumentParser()
    add_run_arguments(run)
    assert chosen_settings(run.parse_args(["--compile", "true"]))[0].compile
    assert not chosen_settings(run.parse_args([]))[0].compile

    host = argparse.ArgumentParser()
    add_model_arguments(host)
    add_serving_arguments(host)
    for argv, compiled in (([], False), (["--compile"], True), (["--compile", "--share"], True)):
        serving = serving_of(host.parse_args(argv))
        assert serving.compile is compiled
        settings = {**preset_values(serving.presets()["text"]), "compare": False}
        asked = request(serving, "text", serving.names.sd, PROMPT, {}, settings)
        assert asked.options.settings.compile is compiled
    assert Serving().compile is False
