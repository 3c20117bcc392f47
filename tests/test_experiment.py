"""The experiment runner: methods at matched UNet passes, an outcome store that resumes and never mixes
settings, and the paired statistics every report reads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from doodl.experiment import (
    METHODS,
    Contest,
    OutcomeStore,
    Trial,
    mean_se,
    paired,
    run_trial,
)
from doodl.optimize import DoodlSettings

TRIAL = Trial(3, "a red circle", 5, {"tag": "color"})


def views_loss(seed: int):
    """A loss whose random pixel weights are drawn, as a guide's views, from a generator seeded per trial."""
    generator = torch.Generator().manual_seed(seed)

    def loss(images: torch.Tensor) -> torch.Tensor:
        return ((images - 0.3) ** 2 * torch.rand(images.shape[-2:], generator=generator)).mean()

    return loss


def contest(model) -> Contest:
    return Contest(model, views_loss, DoodlSettings(steps=3, iterations=2, seed=0), 0.3, start_k=2)


def test_every_method_runs_at_its_cost_and_doodl_sets_best_of_ks_k(tiny, tmp_path):
    store = OutcomeStore.open(tmp_path, {"run": 1})
    records = dict(run_trial(contest(tiny), TRIAL, METHODS[::-1], store))
    assert list(records) == list(METHODS)  # DOODL runs before the random search sized by it
    passes = {method: record["unet_calls"] for method, record in records.items()}
    assert passes["one-step"] == 2 * passes["unguided"]  # each call and the backward through it
    k = records["best-of-k"]["candidates"]
    assert k == round(passes["doodl"] / passes["unguided"]) > 1
    assert passes["best-of-k"] == k * passes["unguided"]
    assert passes["best-of-k+doodl"] == 2 * passes["unguided"] + passes["doodl"]
    assert records["doodl"]["start_seed"] == TRIAL.seed  # the paper's start: the trial's own noise
    # Every method judged on the trial's own views: best-of-k's first candidate is the unguided sample.
    assert records["best-of-k"]["candidate_losses"][0] == pytest.approx(records["unguided"]["loss"], abs=1e-7)
    assert records["best-of-k"]["loss"] == pytest.approx(min(records["best-of-k"]["candidate_losses"]))
    image, record = store.paths("doodl", TRIAL)
    assert Image.open(image).size == (64, 64) and json.loads(record.read_text()) == records["doodl"]
    assert json.loads(image.parent.parent.joinpath("metadata.jsonl").read_text()) == {
        "prompt": "a red circle",
        "tag": "color",
    }


def test_a_resumed_trial_gives_what_a_fresh_one_gives(tiny, tmp_path):
    """Saved methods are not run again, so a method's views must not depend on which ran before it."""
    fresh = dict(run_trial(contest(tiny), TRIAL, METHODS, OutcomeStore.open(tmp_path / "a", {})))
    resumed_store = OutcomeStore.open(tmp_path / "b", {})
    for method in ("unguided", "doodl"):
        resumed_store.save(method, TRIAL, fresh[method], None)
    resumed = dict(run_trial(contest(tiny), TRIAL, METHODS, resumed_store))
    for method in METHODS:
        assert resumed[method]["loss"] == fresh[method]["loss"], method
    assert resumed["best-of-k+doodl"]["curve"] == fresh["best-of-k+doodl"]["curve"]
    assert resumed["best-of-k"]["candidates"] == fresh["best-of-k"]["candidates"]  # sized by the saved DOODL


def test_best_of_k_needs_doodl_or_a_fixed_k(tiny, tmp_path):
    store = OutcomeStore.open(tmp_path, {})
    with pytest.raises(ValueError, match="run doodl too"):
        dict(run_trial(contest(tiny), TRIAL, ["best-of-k"], store))
    fixed = Contest(tiny, views_loss, DoodlSettings(steps=3, iterations=2), 0.3, best_of=3)
    (record,) = dict(run_trial(fixed, TRIAL, ["best-of-k"], store)).values()
    assert record["candidates"] == 3 and len(record["candidate_losses"]) == 3


def test_the_store_refuses_or_replaces_outcomes_made_otherwise(tmp_path):
    record = {"loss": 1.0, "unet_calls": 3}
    store = OutcomeStore.open(tmp_path, {"steps": 3, "models": ("a", "b")})
    store.save("unguided", TRIAL, record, Image.new("RGB", (8, 8), (10, 20, 30)))
    again = OutcomeStore.open(tmp_path, {"steps": 3, "models": ["a", "b"]})  # as JSON reads it back
    assert again.record("unguided", TRIAL) == record
    assert again.image("unguided", TRIAL).getpixel((0, 0)) == (10, 20, 30)
    assert again.record("doodl", TRIAL) is None and again.image("doodl", TRIAL) is None
    with pytest.raises(ValueError, match="other steps: use another folder"):
        OutcomeStore.open(tmp_path, {"steps": 4, "models": ["a", "b"]})
    assert again.record("unguided", TRIAL) == record  # refused: nothing removed
    replaced = OutcomeStore.open(tmp_path, {"steps": 4}, replace_other=True)
    assert replaced.record("unguided", TRIAL) is None and replaced.all_records() == []


def test_saving_a_record_alone_keeps_its_image_and_leftovers_are_removed(tmp_path):
    store = OutcomeStore.open(tmp_path, {})
    store.save("doodl", TRIAL, {"score": 0.0}, Image.new("RGB", (8, 8)))
    image, _ = store.paths("doodl", TRIAL)
    before = image.read_bytes(), image.stat().st_mtime_ns
    store.save("doodl", TRIAL, {"score": 1.0}, None)
    assert (image.read_bytes(), image.stat().st_mtime_ns) == before
    (record,) = store.all_records()
    assert record["score"] == 1.0 and record["image"] == str(image)
    leftover = image.with_name(".0005.png.123.tmp")
    leftover.write_bytes(b"half")
    store.remove_leftovers()
    assert not leftover.exists() and image.exists()


def test_paired_statistics_count_wins_and_call_two_standard_errors_a_tie():
    assert mean_se([1.0]) == (1.0, 0.0)
    assert mean_se([0.0, 2.0]) == (1.0, 1.0)
    win = paired([1, 1, 1, 0], [0, 0, 0, 0])
    assert (win.n, win.higher, win.lower) == (4, 3, 0)
    assert win.mean == 0.75 and win.se == pytest.approx(0.25) and win.word == "beats"
    assert paired([1, 0], [0, 1]).word == "ties with"
    assert paired([0, 0, 0, 0], [1, 1, 1, 0.9]).word == "loses to"
    with pytest.raises(ValueError, match="same trials"):
        paired([1, 2], [1])
