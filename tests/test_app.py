"""The app end to end: served in-process, every tab called through gradio_client as an API user would.

It runs on the embedded models when they have been trained, else on tiny random models of the same
kinds; either way with a few steps and iterations, since only the wiring is under test here.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a test server

import gradio as gr
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image
from safetensors.torch import save_file

import app
from doodl import ModelLoadError, load_pipeline
from doodl.embedded import CAPABILITIES, EXAMPLES, FLOW_EXAMPLES
from doodl.serving import ROOT, ModelNames, Serving, locate
from doodl.showcase import ExampleStore, Showcase
from doodl.tiny import (
    TINY_CLIP,
    register_tiny_clip_architecture,
    save_tiny_classifier,
    save_tiny_clip,
    save_tiny_clip_checkpoint,
    save_tiny_imagereward,
    save_tiny_pickscore,
    save_tiny_pipeline,
)

LABELS = ("maroon", "crimson", "scarlet", "rose", "not red")  # the embedded classifier's labels
# Enough to go through every code path (an SGD update, the comparison) in seconds.
FAST = {"steps": 2, "iterations": 2, "cutouts": 2, "seed": 0, "compare": False}


def embedded_models_present() -> bool:
    names = ModelNames()
    needed = [f"{names.sd}/model_index.json", names.clip, names.classifier, names.aesthetic_head]
    return all((ROOT / name).exists() for name in needed)


def save_tiny_guides(folder: Path) -> ModelNames:
    """A tiny random CLIP, shade classifier and aesthetic head, saved the way the embedded ones are."""
    clip = save_tiny_clip(folder / "clip")
    classifier = save_tiny_classifier(folder / "classifier", LABELS)
    head = folder / "aesthetic_head.safetensors"
    # A bias mid-scale keeps random scores inside the clamped 1-10 range, where gradients flow.
    save_file(
        {
            "weight": 0.5
            * torch.randn(1, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(0)),
            "bias": torch.tensor([5.5]),
        },
        head,
    )
    return ModelNames(
        sd=str(folder / "sd"),
        clip=str(clip),
        classifier=str(classifier),
        aesthetic_clip=str(clip),
        aesthetic_head=str(head),
    )


def prepare_models(folder: Path) -> ModelNames:
    """The embedded models if trained, else tiny random ones written under `folder`."""
    if embedded_models_present():
        return ModelNames()
    names = save_tiny_guides(folder)
    save_tiny_pipeline(names.sd)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(serving: Serving):
    """Launch the app in a thread on a free port; return the demo and its URL."""
    demo = app.build_app(serving)
    _, url, _ = app.launch(demo, port=free_port(), block=False, max_file_size=serving.max_file_size)
    return demo, url


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> ModelNames:
    return prepare_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def client(names):
    # The models are small: extra intra-op threads only synchronize, and stall on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    demo, url = serve(Serving(names))
    yield Client(url, verbose=False)
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def public(names):
    """The app as served to strangers: the host's models only, within the public budget."""
    demo, url = serve(Serving.public(names))
    yield demo, Client(url, verbose=False)
    demo.close()


@pytest.fixture(scope="module")
def side(names) -> int:
    return app.MODELS.pipeline(names.sd).resolution


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "reference.png"
    Image.new("RGB", (48, 40), (245, 110, 130)).save(path)
    return path


def best_image(result) -> Image.Image:
    preview, status, curve, best, comparison, iterations = result
    assert status.startswith("Done")
    return Image.open(best)


def test_text_guidance(client, names, side):
    result = client.predict(
        model=names.sd,
        prompt="a red circle above a blue square",
        clip=names.clip,
        **{**FAST, "compare": True},
        api_name="/text_guidance",
    )
    assert best_image(result).size == (side, side)
    captions = [item["caption"] for item in result[4]]
    assert [c.split(",")[0] for c in captions] == ["Unguided", "One-step guidance", "DOODL"]


def test_vocabulary_expansion(client, names, side):
    result = client.predict(
        model=names.sd,
        prompt="a red circle",
        classifier=names.classifier,
        target="Rose",  # labels match whatever the case
        **FAST,
        api_name="/vocabulary_expansion",
    )
    assert best_image(result).size == (side, side)


def test_personalization(client, names, side, reference):
    result = client.predict(
        model=names.sd,
        prompt="a red star",
        references=[handle_file(reference)],
        clip=names.clip,
        **FAST,
        api_name="/personalization",
    )
    assert best_image(result).size == (side, side)


@pytest.mark.parametrize("with_photo", [False, True], ids=["generated", "photo"])
def test_aesthetic(client, names, side, reference, with_photo):
    result = client.predict(
        model=names.sd,
        prompt="a red circle",
        photo=handle_file(reference) if with_photo else None,
        clip=names.aesthetic_clip,
        head=names.aesthetic_head,
        **{**FAST, "compare": with_photo},
        api_name="/aesthetic",
    )
    assert best_image(result).size == (side, side)
    if with_photo:
        assert result[4][0]["caption"] == "Uploaded photo"


def test_every_endpoint_takes_an_optional_photo(client, names, reference):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/text_guidance", "/vocabulary_expansion", "/personalization", "/aesthetic"):
        parameters = [parameter["parameter_name"] for parameter in api[endpoint]["parameters"]]
        assert "photo" in parameters and "fidelity" in parameters, endpoint
    result = client.predict(
        model=names.sd,
        prompt="a red circle",
        clip=names.clip,
        photo=handle_file(reference),
        **{**FAST, "compare": True},
        api_name="/text_guidance",
    )
    captions = [item["caption"] for item in result[4]]
    assert captions[:2] == ["Uploaded photo", "Unguided reconstruction"]


def test_bad_inputs_come_back_as_clear_messages(client, names, reference, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    disguised = tmp_path / "photo.png"  # an image by name only
    disguised.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 1)).save(huge)

    def text(**changes):
        kwargs = {"model": names.sd, "prompt": "a red circle", "clip": names.clip, **FAST, **changes}
        return client.predict(**kwargs, api_name="/text_guidance")

    def vocabulary(target):
        kwargs = {"model": names.sd, "prompt": "a red circle", "classifier": names.classifier, **FAST}
        return client.predict(**kwargs, target=target, api_name="/vocabulary_expansion")

    def personalization(references):
        kwargs = {"model": names.sd, "prompt": "a red star", "clip": names.clip, **FAST}
        return client.predict(**kwargs, references=references, api_name="/personalization")

    def aesthetic(photo):
        kwargs = {"model": names.sd, "prompt": "a red star", "clip": names.aesthetic_clip}
        return client.predict(
            **kwargs, photo=handle_file(photo), head=names.aesthetic_head, **FAST, api_name="/aesthetic"
        )

    cases = [
        (lambda: text(prompt="  "), "the prompt is empty"),
        (lambda: text(steps=0), "setting steps=0 is out of range"),
        (lambda: text(cutouts=-1), "setting cutouts=-1 is out of range"),
        (lambda: text(grad_clip=0), "setting grad_clip=0.0 is out of range"),
        (lambda: text(model=str(tmp_path)), "no model_index.json"),
        (lambda: text(clip=str(tmp_path / "missing")), "is neither a folder nor"),
        (lambda: vocabulary("roze"), "class 'roze' is not a label of this classifier; close labels: 'rose'"),
        (lambda: personalization([]), "no reference image"),
        (lambda: aesthetic(disguised), "the photo photo.png is not an image that can be read"),
        (lambda: aesthetic(huge), "the photo huge.png is 5000x1 px: the largest side allowed is 4096 px"),
        (lambda: aesthetic(text_file), "Invalid file type"),  # refused by the upload widget itself
    ]
    for call, message in cases:
        with pytest.raises(AppError) as error:
            call()
        assert message in str(error.value)


def test_class_list_comes_from_the_classifier(names):
    assert app.class_labels(names.classifier) == list(LABELS)
    assert app.class_choices(names.classifier, "rose").value == "rose"
    assert app.class_choices(names.classifier, "blue").value == LABELS[0]
    with pytest.warns(UserWarning, match="does not exist"):  # a warning, not an error: the user may be typing
        assert app.class_labels("no/such/classifier/folder") == []


def test_command_line_overrides_every_model(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args(["--model", "m", "--clip", "c", "--classifier", "k", "--aesthetic-head", "h.pth"])
    assert (args.model, args.clip, args.classifier, args.aesthetic_head) == ("m", "c", "k", "h.pth")
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert args.aesthetic_clip == ModelNames().aesthetic_clip


def test_relative_model_paths_are_found_from_any_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert locate("assets/examples") == str(ROOT / "assets" / "examples")
    assert locate("org/repo") == "org/repo"  # not a path here: a hub id


def test_updates_stream_each_iteration_and_a_stopped_run_keeps_the_best(client, names):
    kwargs = {"model": names.sd, "prompt": "a red circle", "clip": names.clip, **FAST, "iterations": 1000}
    job = client.submit(**kwargs, api_name="/text_guidance")
    deadline = time.monotonic() + 120
    while len(job.outputs()) < 3 and time.monotonic() < deadline:  # the start, then two iterations
        time.sleep(0.2)
    assert job.cancel()  # what the Stop button does
    updates = job.outputs()
    assert updates[0][1].startswith("Loading models")
    assert [update[1].split(":")[0] for update in updates[1:3]] == [
        "Iteration 1 of 1000",
        "Iteration 2 of 1000",
    ]
    preview, status, curve, best, comparison, iterations = updates[-1]
    assert Image.open(best).size == Image.open(preview).size
    assert job.status().code == Status.CANCELLED


def loaded_names() -> set[str]:
    return app.MODELS.loaded()


def test_public_app_serves_the_hosts_models_only(public, names, tmp_path):
    demo, client = public
    fast = {**FAST, "steps": 2}
    elsewhere = {"model": str(tmp_path), "clip": "/etc/passwd", "head": "/etc/does-not-exist"}
    asks = [
        ("/text_guidance", {"model": elsewhere["model"], "clip": names.clip}),
        ("/text_guidance", {"model": names.sd, "clip": elsewhere["clip"]}),
        ("/text_guidance", {"model": "org/some-model", "clip": names.clip}),  # a hub id: no download either
    ]
    for api_name, models in asks:
        with pytest.raises(AppError) as error:
            client.predict(prompt="a red circle", **models, **fast, api_name=api_name)
        message = str(error.value)
        assert "its host chose" in message and "--allow-model-choice" in message
        assert str(tmp_path) not in message and "passwd" not in message and "some-model" not in message
    with pytest.raises(AppError, match="aesthetic head its host chose"):
        client.predict(
            model=names.sd,
            prompt="a red circle",
            photo=None,
            clip=names.aesthetic_clip,
            head=elsewhere["head"],
            **fast,
            api_name="/aesthetic",
        )
    assert not loaded_names() & {str(tmp_path), "/etc/passwd", "org/some-model", elsewhere["head"]}
    # The host's own models run, and the class list is not a second way in.
    result = client.predict(
        model=names.sd, prompt="a red circle", clip=names.clip, **fast, api_name="/text_guidance"
    )
    assert result[1].startswith("Done")
    assert "/class_choices" not in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    model_fields = [
        c for c in demo.blocks.values() if isinstance(c, gr.Textbox) and "model" in (c.label or "")
    ]
    assert model_fields and not any(field.interactive for field in model_fields)


def test_public_app_refuses_runs_over_its_budget(public, names, reference):
    _, client = public
    budget = Serving.public(names)

    def text(**changes):
        kwargs = {"model": names.sd, "prompt": "a red circle", "clip": names.clip, **FAST, **changes}
        return client.predict(**kwargs, api_name="/text_guidance")

    cases = [
        (lambda: text(steps=budget.max_steps + 1), f"steps={budget.max_steps + 1} is over this app's limit"),
        (
            lambda: text(iterations=10_000),
            f"limit of {budget.max_iterations} per run (set by the host: --max-it",
        ),
        (lambda: text(cutouts=budget.max_cutouts + 1), "cutouts=17 is over this app's limit of 16"),
        (
            lambda: text(start_samples=budget.max_start_samples + 1),
            f"start samples={budget.max_start_samples + 1} is over this app's limit of "
            f"{budget.max_start_samples} per run (set by the host: --max-start-samples)",
        ),
        (lambda: text(start_samples=0), "setting start_samples=0 is out of range: 1 or more samples"),
        (lambda: text(seed=-1), "setting seed=-1 is out of range: a whole number from 0 to"),
        (lambda: text(seed=2**63), f"setting seed={2**63} is out of range"),
        (
            lambda: client.predict(
                model=names.sd,
                prompt="a red star",
                references=[handle_file(reference)] * (budget.max_references + 1),
                clip=names.clip,
                **FAST,
                api_name="/personalization",
            ),
            f"reference images={budget.max_references + 1} is over this app's limit",
        ),
    ]
    for call, message in cases:
        with pytest.raises(AppError) as error:
            call()
        assert message in str(error.value)


def test_local_app_lets_the_user_choose_models_and_budgets(client, names, tiny_folder):
    settings = {**FAST, "steps": 21}  # over the public budget
    result = client.predict(
        model=str(tiny_folder), prompt="a red circle", clip=names.clip, **settings, api_name="/text_guidance"
    )
    assert result[1].startswith("Done")
    assert str(tiny_folder) in loaded_names()


def test_class_list_lookup_waits_for_the_device_like_a_run(names):
    functions = {fn.api_name: fn for fn in app.build_app(Serving(names)).fns.values()}
    lookup, run = functions["class_choices"], functions["vocabulary_expansion"]
    assert lookup.queue and lookup.concurrency_id == run.concurrency_id == "device"


@pytest.mark.parametrize(
    ("argv", "env", "public"),
    [
        ([], {}, False),
        (["--share"], {}, True),
        (["--host", "0.0.0.0"], {}, True),
        ([], {"SPACE_ID": "someone/doodl"}, True),
    ],
)
def test_an_app_others_can_reach_is_locked_unless_the_host_opens_it(monkeypatch, argv, env, public):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    serving = app.serving_of(app.parse_args(argv))
    assert serving.allow_model_choice is not public
    assert (serving.max_steps is not None) is public and (serving.queue_size is not None) is public
    opened = app.serving_of(app.parse_args([*argv, "--allow-model-choice", "--max-steps", "7"]))
    assert opened.allow_model_choice and opened.max_steps == 7


def test_a_hub_id_fails_at_once_without_the_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    app.offline_unless_hub_reachable(reachable=lambda: True)
    assert not constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"  # a reachable hub: online
    app.offline_unless_hub_reachable(reachable=lambda: False)
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelLoadError, match="not a local folder"):
        load_pipeline("org/not-a-model")


def test_shipped_examples_are_those_of_this_app():
    """The embedded models' examples, each generator's, are run in advance (python app.py --cache-examples),
    for the local and the public defaults alike: rebuild them when the models, the presets or the examples
    change."""
    for host in (Serving(), Serving.public()):
        showcase = Showcase.of(host)
        assert showcase.complete(), "assets/cached_examples is stale: run python app.py --cache-examples"
        for serving, store in zip(showcase.servings, showcase.stores, strict=True):
            assert store.folder == ExampleStore.shipped(serving).folder
            for tab, rows in serving.examples().rows.items():
                for index, row in enumerate(rows):
                    shown = store.load(tab, index)
                    assert (
                        shown.status.startswith("Done")
                        and len(shown.losses) == serving.presets()[tab].settings.iterations
                    )
                    assert [caption.split(",")[0] for _, caption in shown.gallery][-3:] == [
                        "Unguided reconstruction" if tab == "aesthetic" and row[1] else "Unguided",
                        "One-step guidance",
                        "DOODL",
                    ]


def test_the_page_lists_each_embedded_generators_examples_and_a_click_chooses_its_generator():
    """Beside the UNet's, the flow transformer's own examples; each row names its generator (a click sets
    the Generator field) and shows that generator's stored run, whichever generator was chosen before."""
    host = Serving()
    showcase = Showcase.of(host)
    flow = host.generators()[1]
    for name in CAPABILITIES:
        rows = showcase.rows(name)
        assert [row[0] for row in rows] == [host.names.sd] * len(EXAMPLES.rows[name]) + [flow] * len(
            FLOW_EXAMPLES.rows[name]
        )
        assert [row[1:] for row in rows] == EXAMPLES.rows[name] + FLOW_EXAMPLES.rows[name]
        with pytest.raises(IndexError):
            showcase.find(name, len(rows))
        if not FLOW_EXAMPLES.rows[name]:
            continue  # (text: no candidate showed DOODL on the flow model)
        tab = app.Tab(name, host, host.presets()[name], showcase, model=None)
        last = len(rows) - 1
        serving, store, index = showcase.find(name, last)
        assert serving.names.sd == flow and index == len(FLOW_EXAMPLES.rows[name]) - 1
        assert store.folder != showcase.stores[0].folder
        for chosen in (host.names.sd, flow, "another/generator"):
            assert tab.stored((last, None), chosen)[1] == store.load(name, index).status
            assert tab.stored((0, None), chosen)[1] == showcase.stores[0].load(name, 0).status
    assert sum(map(len, FLOW_EXAMPLES.rows.values())) >= 4


def test_text_guidance_with_the_reward_models_the_host_names(names, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    imagereward, bert = save_tiny_imagereward(folder / "imagereward")
    rewarded = replace(
        names,
        pickscore=str(save_tiny_pickscore(folder / "pickscore")),
        hps=str(save_tiny_clip_checkpoint(folder / "HPS_v2.1_compressed.pt", "hps")),
        hps_architecture=register_tiny_clip_architecture(folder),
        imagereward=str(imagereward),
        imagereward_tokenizer=str(bert),
    )
    demo, url = serve(Serving(rewarded))
    client = Client(url, verbose=False)
    run = {
        "model": names.sd,
        "prompt": "a red circle",
        "clip": names.clip,
        **FAST,
        "api_name": "/text_guidance",
    }
    try:
        for guide in ("PickScore", "HPSv2", "ImageReward"):
            result = client.predict(guide=guide, **run)
            assert result[1].startswith("Done")
            assert curves_of(result[2]) == {"loss"}
        assert {rewarded.pickscore, f"{rewarded.hps} {rewarded.hps_architecture}"} <= loaded_names()
        assert f"{imagereward} {bert}" in loaded_names()
        # A weighted sum of guides: each weighted term's curve beside the loss, adding up to it.
        result = client.predict(guide="CLIP=1, ImageReward=0.5", **run)
        assert result[1].startswith("Done")
        rows = result[2]["data"]
        assert curves_of(result[2]) == {"loss", "clip-text", "imagereward"}
        by = {(curve, i): value for i, value, curve in rows}
        for i in range(1, FAST["iterations"] + 1):
            assert by[("loss", i)] == pytest.approx(by[("clip-text", i)] + by[("imagereward", i)], rel=1e-5)
        assert len(result[5]) == FAST["iterations"]  # every iteration's image, in its gallery
        for guide, message in (
            (
                "Aesthetic",
                "guide 'Aesthetic' is not served here: choose among CLIP, PickScore, HPSv2, ImageReward",
            ),
            ("CLIP=-1", "the weight of CLIP is -1: it must be a number of 0 or more"),
            ("CLIP=0", "no guide has a weight above 0"),
        ):
            with pytest.raises(AppError, match=re.escape(message)):
                client.predict(guide=guide, **run)
    finally:
        demo.close()


def curves_of(plot: dict) -> set[str]:
    """The curves a LinePlot's value draws."""
    return {row[2] for row in plot["data"]}


def test_image_size_is_a_setting(client, names, side):
    kwargs = {"model": names.sd, "prompt": "a red circle", "clip": names.clip, **FAST}
    result = client.predict(**kwargs, height=side + 16, width=side - 16, api_name="/text_guidance")
    assert Image.open(result[3]).size == (side - 16, side + 16)
    with pytest.raises(AppError, match="setting width=.* must be a multiple of 8"):
        client.predict(**kwargs, height=side, width=side + 4, api_name="/text_guidance")
    with pytest.raises(AppError, match="setting height=.* is out of this model's range"):
        client.predict(**kwargs, height=4 * side, width=side, api_name="/text_guidance")


def test_an_example_not_stored_is_run_at_its_first_click_then_shown_from_the_store(names, tmp_path):
    """Other models than the embedded ones have no shipped runs: the first click runs the example."""
    host = Serving(names, max_steps=2, max_iterations=2, max_cutouts=2)  # a host's budget: a quick run
    store = ExampleStore(tmp_path / "store")
    tab = app.Tab("vocabulary", host, host.presets()["vocabulary"], Showcase((host,), (store,)), model=None)
    host = names.sd
    assert tab.stored((0, None), host) == app.UNCHANGED  # nothing to show yet: the inputs are filled only
    updates = list(tab.run_missing((0, None), host))
    assert updates[0][1].startswith("Loading models") and updates[-1][1].startswith("Done: iteration 2 of 2")
    shown = store.load("vocabulary", 0)
    assert shown.status == updates[-1][1] and len(shown.gallery) == 3
    assert all(Path(image).is_file() for image, _ in shown.gallery)
    assert tab.stored((0, None), host)[1] == shown.status
    assert list(tab.run_missing((0, None), host)) == [app.UNCHANGED]  # stored: never run twice
    # The stored runs are the host generator's: with another chosen, a click fills the inputs only.
    assert tab.stored((0, None), "another/generator") == app.UNCHANGED
    assert list(tab.run_missing((1, None), "another/generator")) == [app.UNCHANGED]
    assert store.load("vocabulary", 1) is None


def test_zerogpu_duration_follows_the_chain():
    """A GPU is asked for as long as the run's UNet calls take: DDIM makes one a step, EDICT two, a photo
    runs EDICT over its part of the chain; settings the run refuses still get an estimate."""
    edict = app.gpu_seconds(steps=20, iterations=20, sampler="edict") - app.GPU_START_SECONDS
    ddim = app.gpu_seconds(steps=20, iterations=20, sampler="ddim") - app.GPU_START_SECONDS
    assert ddim == pytest.approx(edict / 2, abs=1)
    photo = app.gpu_seconds(steps=20, iterations=20, sampler="ddim", photo="x.png", photo_strength=0.5)
    assert photo - app.GPU_START_SECONDS == pytest.approx(edict / 2, abs=1)
    assert app.gpu_seconds(steps=20, sampler="bogus") == app.gpu_seconds(steps=20, sampler="edict")
