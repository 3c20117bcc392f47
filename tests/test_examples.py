"""Every example the app ships shows DOODL: in its stored run, the side by side a visitor sees, the quality
benchmark's evaluators say the unguided image fails and DOODL's succeeds (`benchmarks/examples.py`, whose
scan chose them). And that verdict tells a right image from a wrong one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from doodl.embedded import CAPABILITIES, Examples, Preset
from doodl.optimize import DoodlSettings
from doodl.serving import ModelCache, Serving
from doodl.showcase import (
    ExampleStore,
    Showcase,
    example_notes,
    example_request,
    final,
    folder_digest,
    run,
)
from doodl.world import shapes
from doodl.world.evaluators import verdict


def test_an_example_run_again_by_todays_code_still_shows_doodl():
    """The stored runs above were made by the code of their day; the first vocabulary example (the
    cheapest guide) is run again, as a click on a configuration without stored runs would."""
    serving, tab = Serving(), "vocabulary"
    row = serving.examples().rows[tab][0]
    asked = example_request(serving, tab, row, serving.presets()[tab])
    judged = verdict(tab, row, final(run(asked, ModelCache("cpu", torch.float32))).gallery)
    assert judged["shows_doodl"], judged


# Each embedded generator's examples, as the page lists them: the UNet's, then the flow transformer's.
GENERATORS = Showcase.of(Serving()).servings


@pytest.mark.parametrize("serving", GENERATORS, ids=lambda serving: Path(serving.names.sd).name)
@pytest.mark.parametrize("tab", CAPABILITIES)
def test_every_shipped_example_shows_doodl_in_its_stored_run(tab, serving):
    store, rows = ExampleStore.shipped(serving), serving.examples().rows[tab]
    assert rows or serving is not GENERATORS[0], "a tab without examples"
    for index, row in enumerate(rows):
        shown = store.load(tab, index)
        assert shown is not None, f"{tab} example {index} has no stored run: python app.py --cache-examples"
        judged = verdict(tab, row, shown.gallery)
        assert judged["shows_doodl"], (tab, row, judged)


def test_every_example_has_a_note_saying_what_changed():
    assert len(GENERATORS) == 2, "the flow transformer is missing from assets/embedded"
    for serving in GENERATORS:
        examples = serving.examples()
        for tab in CAPABILITIES:
            assert len(examples.notes[tab]) == len(examples.rows[tab]), tab
            assert all(note.strip() for note in examples.notes[tab]), tab


def test_the_notes_number_the_examples_as_listed_and_say_where_a_generator_has_none():
    first = Examples("the first generator", "a.md", {"text": [["p", 1], ["q", 2]]}, {"text": ["A", "B"]})
    empty = Examples("the second generator", "b.md", {"text": []}, {"text": []})
    last = Examples("the third generator", "c.md", {"text": [["r", 3]]}, {"text": ["C"]})
    notes = example_notes("text", [first, empty, last])
    assert "1. A\n2. B" in notes and "\n3. C" in notes and "2. C" not in notes
    assert "the second generator: none, no candidate shows DOODL (b.md)" in notes
    assert notes.index("the first") < notes.index("the second") < notes.index("the third")


def scene(first: str, relation: str, second: str) -> shapes.Scene:
    """Two objects, the first at the left or on top, the second across from it."""
    background = shapes.Background((235, 235, 235), (235, 235, 235), "plain")
    (c1, s1), (c2, s2) = first.split(), second.split()
    places = {"left of": ((18, 32), (46, 32)), "above": ((32, 18), (32, 46))}[relation]
    objects = tuple(
        shapes.Object(shape, color, 0, center, 10.0)
        for (color, shape), center in zip(((c1, s1), (c2, s2)), places, strict=True)
    )
    return shapes.Scene(objects, background, relation, 64)


def gallery(tmp_path: Path, **scenes: shapes.Scene) -> tuple[tuple[str, str], ...]:
    captions = {
        "unguided": "Unguided",
        "one_step": "One-step guidance, scale 1",
        "doodl": "DOODL, iteration 3",
    }
    paths = []
    for name, caption in captions.items():
        path = tmp_path / f"{name}.png"
        shapes.to_pil(shapes.render(scenes[name])).save(path)
        paths.append((str(path), caption))
    return tuple(paths)


def test_the_text_verdict_needs_a_wrong_unguided_image_and_a_right_doodl_image(tmp_path):
    caption = "a red circle left of a blue square"
    right = scene("red circle", "left of", "blue square")
    wrong = scene("blue square", "left of", "red circle")
    assert verdict("text", [caption], gallery(tmp_path, unguided=wrong, one_step=wrong, doodl=right))[
        "shows_doodl"
    ]
    for unguided, doodl in ((right, right), (wrong, wrong), (right, wrong)):
        judged = verdict("text", [caption], gallery(tmp_path, unguided=unguided, one_step=wrong, doodl=doodl))
        assert not judged["shows_doodl"], judged


def test_stored_runs_are_keyed_by_what_a_preset_changes():
    """A setting added at its default keeps the stored runs (the key holds only what differs from the
    defaults); any setting a preset changes, or the crops, changes the key."""
    preset = Preset(DoodlSettings(steps=20, grad_clip=0.01), one_step_scale=0.3)
    assert preset.settings.changed() == {"steps": 20, "grad_clip": 0.01}
    assert DoodlSettings().changed() == {}
    assert preset.key() == Preset(replace(preset.settings, start_samples=1), preset.cutouts, 0.3).key()
    others = [
        replace(preset, settings=replace(preset.settings, start_samples=4)),
        replace(preset, settings=replace(preset.settings, grad_clip=0.02)),
        replace(preset, cutouts=preset.cutouts + 1),
        replace(preset, one_step_scale=1.0),
    ]
    assert len({preset.key(), *(other.key() for other in others)}) == 5
    # A photo's settings key runs that may start from a photo (the app's examples), not those from noise.
    held = Preset(replace(preset.settings, fidelity=0.5, photo_strength=1.0), preset.cutouts, 0.3)
    assert held.key() != preset.key() and held.key(from_noise=True) == preset.key(from_noise=True)


def test_the_models_digest_reads_through_linked_folders_and_skips_training_logs(tmp_path):
    """The digest keys stored runs and saved benchmark outcomes: a folder of links to other weights (how a
    candidate generator is measured) must not hash as an empty folder and reuse another model's results."""
    real, linked, empty = tmp_path / "real", tmp_path / "linked", tmp_path / "empty"
    (real / "sd").mkdir(parents=True)
    (real / "sd" / "unet.safetensors").write_bytes(b"weights")
    linked.mkdir()
    (linked / "sd").symlink_to(real / "sd")
    empty.mkdir()
    before = folder_digest(real)
    assert folder_digest(linked) == before != folder_digest(empty)
    (real / "sd" / "training_log.txt").write_text("step 1")
    assert folder_digest(linked) == before
    (real / "sd" / "unet.safetensors").write_bytes(b"retrained")
    assert folder_digest(linked) != before
