"""The app end to end: served in-process, every tab called through gradio_client as an API user would.

It runs on the embedded models when they have been trained, else on tiny random models of the same
kinds; either way with a few steps and iterations, since only the wiring is under test here.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a test server

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image
from safetensors.torch import save_file

import app
from doodl.tiny import TINY_CLIP, save_tiny_classifier, save_tiny_clip, save_tiny_pipeline

LABELS = ("maroon", "crimson", "scarlet", "rose")  # the embedded classifier's, so tests read the same
# Enough to go through every code path (an SGD update, the comparison) in seconds.
FAST = {"steps": 2, "iterations": 2, "cutouts": 2, "seed": 0, "compare": False}


def embedded_models_present() -> bool:
    names = app.ModelNames()
    needed = [f"{names.sd}/model_index.json", names.clip, names.classifier, names.aesthetic_head]
    return all((app.ROOT / name).exists() for name in needed)


def save_tiny_guides(folder: Path) -> app.ModelNames:
    """A tiny random CLIP, shade classifier and aesthetic head, saved the way the embedded ones are."""
    clip = save_tiny_clip(folder / "clip")
    classifier = save_tiny_classifier(folder / "classifier", LABELS)
    head = folder / "aesthetic_head.safetensors"
    # A bias mid-scale keeps random scores inside the clamped 1-10 range, where gradients flow.
    save_file({"weight": 0.5 * torch.randn(1, TINY_CLIP["embed_dim"]), "bias": torch.tensor([5.5])}, head)
    return app.ModelNames(
        sd=str(folder / "sd"),
        clip=str(clip),
        classifier=str(classifier),
        aesthetic_clip=str(clip),
        aesthetic_head=str(head),
    )


def prepare_models(folder: Path) -> app.ModelNames:
    """The embedded models if trained, else tiny random ones written under `folder`."""
    if embedded_models_present():
        return app.ModelNames()
    names = save_tiny_guides(folder)
    save_tiny_pipeline(names.sd)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(names: app.ModelNames):
    """Launch the app in a thread on a free port; return the demo and its URL."""
    demo = app.build_app(names)
    _, url, _ = app.launch(demo, port=free_port(), block=False)
    return demo, url


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> app.ModelNames:
    return prepare_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def client(names):
    # The models are small: extra intra-op threads only synchronize, and stall on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    demo, url = serve(names)
    yield Client(url, verbose=False)
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def side(names) -> int:
    return app.MODELS.pipeline(names.sd).resolution


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "reference.png"
    Image.new("RGB", (48, 40), (245, 110, 130)).save(path)
    return path


def best_image(result) -> Image.Image:
    preview, status, curve, best, comparison = result
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
    assert args.aesthetic_clip == app.ModelNames().aesthetic_clip


def test_relative_model_paths_are_found_from_any_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert app.locate("assets/examples") == str(app.ROOT / "assets" / "examples")
    assert app.locate("org/repo") == "org/repo"  # not a path here: a hub id


def test_clip_reference_splits_architecture_and_tag():
    assert app.clip_reference("ViT-L-14 openai") == ("ViT-L-14", "openai")
    assert app.clip_reference("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    assert app.clip_reference(" ViT-B-32 ") == ("ViT-B-32", None)


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
    preview, status, curve, best, comparison = updates[-1]
    assert Image.open(best).size == Image.open(preview).size
    assert job.status().code == Status.CANCELLED
