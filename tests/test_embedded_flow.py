"""The embedded flow generator: the world's training stage writes an ordinary SD3 folder, which loads through
`load_pipeline` and reads its prompts exactly as it was trained to; the app offers it beside the UNet."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from doodl.embedded import (
    EMBEDDED_FLOW_GUIDANCE,
    EMBEDDED_FLOW_PRESETS,
    EMBEDDED_PRESETS,
    FLOW,
    FLOW_CAVEAT,
    SD,
    presets,
)
from doodl.flow import FLOW_MIX, StableDiffusion3
from doodl.pipeline import load_pipeline
from doodl.serving import EMBEDDED, ModelNames, Serving
from doodl.showcase import folder_digest
from doodl.world import models, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The flow stage run for a few steps on a few hundred renders, beside the shipped UNet's folder."""
    out = tmp_path_factory.mktemp("world")
    (out / "sd").symlink_to(SD)
    settings = train.TrainSettings(
        out=str(out), cache=str(out / "cache"), n_images=200, flow_steps=3, flow_batch=4, warmup_steps=1
    )
    log = train.Log(out / "training_log.txt")
    train.stage_data(settings, log)
    train.stage_flow(settings, log)
    return out / "flow", log.path


def test_the_flow_stage_saves_an_sd3_folder_without_t5_that_load_pipeline_loads(trained):
    folder, log = trained
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    model = load_pipeline(folder, "cpu")
    assert isinstance(model, StableDiffusion3)
    assert model.transformer.dtype == torch.float32  # stored in float16, loaded as asked
    assert model.max_sequence_length == models.FLOW_TEXT_TOKENS  # T5's place: as many zeros as in training
    assert model.side_step[0] == 8 and model.resolution == 64  # one token per latent pixel
    assert "flow: 3 steps" in log.read_text()


def test_training_reads_a_prompt_exactly_as_the_pipeline_does(trained):
    model = load_pipeline(trained[0], "cpu")
    pipe = model.pipe
    ids = pipe.tokenizer(
        ["a red circle left of a blue star"],
        padding="max_length",
        max_length=models.FLOW_TEXT_TOKENS,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden, pooled = train.flow_prompt_embeds(pipe.text_encoder, ids)
        embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            "a red circle left of a blue star",
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=model.max_sequence_length,
        )
    assert hidden.shape == embeds.shape == (1, 2 * models.FLOW_TEXT_TOKENS, 2 * models.TEXT_WIDTH)
    torch.testing.assert_close(hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, pooled_embeds, rtol=0, atol=0)


def test_the_flow_generator_has_the_unets_presets_at_its_own_guidance_mixing_and_strengths():
    """Steps, iterations, chain, views, start and photo settings are the UNet's; CFG, the mixing weight and
    the two strengths (`--tune` chose them on this generator) its own."""
    flow, unet = presets(FLOW), presets(SD)
    assert flow == EMBEDDED_FLOW_PRESETS and unet == EMBEDDED_PRESETS
    for name, preset in flow.items():
        own = {
            "guidance_scale": EMBEDDED_FLOW_GUIDANCE,
            "p": FLOW_MIX,
            "grad_clip": preset.settings.grad_clip,
        }
        assert preset.settings == replace(unet[name].settings, **own)
        assert preset.cutouts == unet[name].cutouts
        assert preset.settings.grad_clip >= unet[name].settings.grad_clip  # the flow takes larger steps


def test_a_public_app_of_the_embedded_world_offers_both_generators_and_nothing_else():
    public = Serving.public()
    assert public.generators() == (f"{EMBEDDED}/sd", f"{EMBEDDED}/flow")
    assert public.model("sd", f"{EMBEDDED}/flow") == f"{EMBEDDED}/flow"
    with pytest.raises(ValueError, match="visitors cannot name another"):
        public.model("sd", "runwayml/stable-diffusion-v1-5")
    hosted = Serving.public(ModelNames(sd="stabilityai/stable-diffusion-3.5-medium"))
    assert hosted.generators() == ("stabilityai/stable-diffusion-3.5-medium",)
    with pytest.raises(ValueError, match="visitors cannot name another"):
        hosted.model("sd", f"{EMBEDDED}/flow")
    assert public.presets(f"{EMBEDDED}/flow")["text"].settings.p == FLOW_MIX


def test_the_other_generator_changes_no_stored_examples_key(tmp_path):
    """The UNet's stored example runs stay valid when the flow generator is added or retrained."""
    for part in ("sd", "clip", "flow"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "weights.bin").write_bytes(part.encode())
    before = folder_digest(tmp_path, skip=["flow"])
    (tmp_path / "flow" / "weights.bin").write_bytes(b"retrained")
    (tmp_path / "flow" / "more.bin").write_bytes(b"added")
    assert folder_digest(tmp_path, skip=["flow"]) == before
    assert folder_digest(tmp_path) != before
    (tmp_path / "clip" / "weights.bin").write_bytes(b"retrained")  # a guide both generators use
    assert folder_digest(tmp_path, skip=["flow"]) != before


def test_the_page_offers_the_flow_generator_and_says_it_draws_worse():
    import gradio as gr

    import app

    demo = app.build_app(Serving())
    (generator,) = [c for c in demo.blocks.values() if isinstance(c, gr.Dropdown) and c.label == "Generator"]
    assert [value for _, value in generator.choices] == [f"{EMBEDDED}/sd", f"{EMBEDDED}/flow"]
    assert FLOW_CAVEAT in generator.info
