"""The public app under a burst of identical requests: every accepted run returns its whole result, the rest
are told the queue is full. Loopback only, a bounded number of requests, each a few seconds of work."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from PIL import Image

import app
from doodl.serving import ModelNames, Serving, preset_values
from doodl.showcase import RUN_FOLDER_SECONDS, RunImages, quiet
from tests.test_app import prepare_models, serve

QUEUE = 10  # runs waiting beyond the one running
BURST = QUEUE + 4  # more than the queue holds
DEADLINE = 300  # seconds for the whole burst
RUN = {"steps": 2, "iterations": 4, "cutouts": 2, "seed": 0, "compare": True}


@pytest.fixture(scope="module")
def public_url(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = prepare_models(tmp_path_factory.mktemp("models"))
    demo, url = serve(Serving.public(names, queue_size=QUEUE))
    yield url, names
    demo.close()
    torch.set_num_threads(threads)


def outcome(url: str, names: ModelNames) -> tuple | str:
    """One visitor's request: its result, or the message it was refused with."""
    client = Client(url, verbose=False)
    job = client.submit(
        model=names.sd, prompt="a red circle", clip=names.clip, **RUN, api_name="/text_guidance"
    )
    try:
        return job.result(timeout=DEADLINE)
    except Exception as error:  # noqa: BLE001 - the refusal's kind is gradio_client's; its words are checked
        return str(error)


def test_identical_requests_beyond_the_queue_all_get_a_whole_answer(public_url):
    url, names = public_url
    Client(url, verbose=False)  # the server is up before the burst
    start = time.monotonic()
    with ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(lambda _: outcome(url, names), range(BURST)))
    assert time.monotonic() - start < DEADLINE
    results = [o for o in outcomes if not isinstance(o, str)]
    refusals = [o for o in outcomes if isinstance(o, str)]
    assert all("Queue is full" in refusal for refusal in refusals), refusals
    assert len(results) >= QUEUE + 1, f"only {len(results)} of {BURST} accepted: {refusals}"
    assert refusals, "the queue held more than its size"
    first = None
    for preview, status, curve, best, comparison, iterations in results:
        assert status.startswith("Done"), status
        assert len(curve["data"]) == len(iterations) == RUN["iterations"]
        shown = [item["image"] for item in (*comparison, *iterations)]
        images = [Image.open(best), Image.open(preview), *(Image.open(path) for path in shown)]
        for image in images:
            image.load()  # a truncated file fails here
        assert [item["caption"].split(",")[0] for item in comparison] == [
            "Unguided",
            "One-step guidance",
            "DOODL",
        ]
        pixels = Image.open(best).tobytes()
        first = first or pixels
        assert pixels == first  # identical requests, identical images


def image_paths(update: tuple) -> list[str]:
    preview, _, _, best, comparison, iterations = update
    galleries = [g for g in (comparison, iterations) if g is not None and not isinstance(g, dict)]
    return [path for path in (preview, best, *(path for g in galleries for path, _ in g)) if path is not None]


def test_each_run_writes_its_images_once_into_a_folder_of_its_own(public_url):
    """What a served file never is: rewritten, or written by two runs (the cause of truncated downloads)."""
    _, names = public_url
    serving = Serving.public(names)
    settings = {**preset_values(serving.presets()["text"]), **RUN}
    written: dict[str, bytes] = {}
    runs = []
    for _ in range(2):
        paths = set()
        for update in app.text_guidance(
            names.sd, "a red circle", names.clip, progress=quiet, serving=serving, **settings
        ):
            for path in image_paths(update):
                content = Path(path).read_bytes()
                assert written.setdefault(path, content) == content, f"{path} was rewritten"
                paths.add(path)
        runs.append(paths)
    assert runs[0] and runs[1] and not runs[0] & runs[1]
    assert {Path(path).parent for path in runs[0]} != {Path(path).parent for path in runs[1]}


def test_a_run_removes_only_the_folders_of_old_runs(tmp_path):
    old, recent = RunImages(tmp_path), RunImages(tmp_path)
    hour_ago = time.time() - RUN_FOLDER_SECONDS - 1
    os.utime(old.folder, (hour_ago, hour_ago))
    RunImages(tmp_path)
    assert not old.folder.exists() and recent.folder.exists()
