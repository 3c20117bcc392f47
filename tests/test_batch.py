"""Batch runs over prompt sets: every (prompt, seed, method) once, shared between processes by accelerate,
resumed after a kill without redoing finished results, and a summary whose numbers are the records'."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from doodl.batch import main, read_prompts
from doodl.experiment import METHODS, OutcomeStore, mean_se

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
# A few steps and one iteration: every method runs its whole path in seconds on the embedded model.
FAST = ["--steps", "2", "--iterations", "1", "--cutouts", "2"]


def prompts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def results(out: Path) -> list[tuple[str, int, int]]:
    """(method, prompt index, seed) of every finished result, checking its image is whole."""
    found = []
    for record_path in sorted(out.glob("*/*/records/*.json")):
        record = json.loads(record_path.read_text())
        image = record_path.parent.parent / "samples" / f"{record_path.stem}.png"
        Image.open(image).load()  # a truncated file fails here
        found.append((record["method"], record["index"], record["seed"]))
    return found


def leftovers(out: Path) -> list[Path]:
    return list(out.glob("**/.*.tmp"))


def test_every_result_is_made_once_and_a_rerun_redoes_nothing(tmp_path):
    out = tmp_path / "run"
    args = [str(prompts(tmp_path, "a red circle", "a blue square left of a green star")), "--out", str(out)]
    assert main([*args, "--seeds", "0", "1", *FAST]) == 0
    made = results(out)
    assert sorted(made) == sorted((m, i, s) for m in METHODS for i in (0, 1) for s in (0, 1))
    times = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    assert main([*args, "--seeds", "0", "1", *FAST]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == times
    metadata = json.loads((out / "doodl" / "00001" / "metadata.jsonl").read_text())
    assert metadata == {"prompt": "a blue square left of a green star"}  # GenEval's per-prompt file


def test_best_of_k_spends_doodls_unet_calls_on_samples(tmp_path):
    out = tmp_path / "run"
    assert main([str(prompts(tmp_path, "a red circle")), "--out", str(out), *FAST]) == 0
    record = {r["method"]: r for r in map(json.loads, map(Path.read_text, out.glob("*/*/records/*.json")))}
    per_sample = record["unguided"]["unet_calls"]
    best = record["best-of-k"]
    assert best["candidates"] == round(record["doodl"]["unet_calls"] / per_sample) > 1
    assert best["unet_calls"] == best["candidates"] * per_sample
    assert best["loss"] == min(best["candidate_losses"]) <= record["unguided"]["loss"] + 1e-6
    assert best["candidate_losses"][0] == pytest.approx(
        record["unguided"]["loss"], abs=1e-6
    )  # its own seed first
    assert record["doodl"]["best_iteration"] in (1, 2) and len(record["doodl"]["curve"]) == 1
    assert record["doodl"]["start_seed"] == 0  # the paper's start: the pair's own noise
    # DOODL from the best of 4 samples: those samples' UNet calls on top of DOODL's.
    started = record["best-of-k+doodl"]
    assert started["unet_calls"] == 4 * per_sample + record["doodl"]["unet_calls"]


def test_a_folder_is_resumed_only_by_a_run_made_alike(tmp_path, capsys):
    out = tmp_path / "run"
    args = [str(prompts(tmp_path, "a red circle")), "--out", str(out), "--methods", "unguided", *FAST]
    assert main(args) == 0
    assert main([*args, "--guidance-scale", "2"]) == 2
    assert "holds outcomes made with other settings" in capsys.readouterr().err
    assert len(results(out)) == 1


def test_jsonl_records_carry_their_own_seeds_and_targets(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red circle", "target": "rose", "seeds": [3], "tag": "shade"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "run"
    args = [str(path), "--out", str(out), "--loss", "classifier", "--methods", "unguided", *FAST]
    assert main(args) == 0
    (record,) = [json.loads(p.read_text()) for p in out.glob("*/*/records/*.json")]
    assert (record["seed"], record["target"]["target_class"]) == (3, "rose")
    assert json.loads((out / "unguided" / "00000" / "metadata.jsonl").read_text())["tag"] == "shade"
    assert read_prompts(path)[0]["seeds"] == [3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seed": 1}\n')
    assert main([str(bad), "--out", str(out)]) == 2


def launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "doodl.batch", *args]


def environment() -> dict[str, str]:
    # One thread per process: two processes share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_processes_share_the_work_each_result_once(tmp_path):
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "doodl.batch",
        str(prompts(tmp_path, "a red circle", "a blue square", "a green star")), "--out", str(out),
        "--seeds", "0", "1", "--methods", "unguided", "doodl", *FAST,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=environment(), cwd=ROOT, timeout=600, capture_output=True)
    made = results(out)
    assert sorted(made) == sorted((m, i, s) for m in ("unguided", "doodl") for i in range(3) for s in (0, 1))
    processes = {json.loads(p.read_text())["process"] for p in out.glob("*/*/records/*.json")}
    assert processes == {0, 1} and not leftovers(out)


def test_a_killed_run_resumes_without_redoing_what_was_finished(tmp_path):
    out = tmp_path / "run"
    lines = [f"a {color} circle" for color in ("red", "blue", "green", "yellow", "purple", "cyan")]
    args = [str(prompts(tmp_path, *lines)), "--out", str(out), "--methods", "unguided", "doodl", *FAST]
    process = subprocess.Popen(launch(*args), env=environment(), cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(results(out)) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p: p.read_bytes() for p in out.glob("*/*/records/*.json")}
    assert 3 <= len(before) < 2 * len(lines), "kill the run midway"
    subprocess.run(launch(*args), check=True, env=environment(), cwd=ROOT, timeout=600, capture_output=True)
    assert len(results(out)) == 2 * len(lines) and not leftovers(out)
    assert all(path.read_bytes() == content for path, content in before.items())  # finished: not redone


def test_the_summary_is_the_records_own_numbers(tmp_path):
    out = tmp_path / "run"
    assert main([str(prompts(tmp_path, "a red circle", "a blue star")), "--out", str(out), *FAST]) == 0
    assert main(["--summarize", str(out), "--score", "world-judge"]) == 0
    summary = json.loads((out / "summary.json").read_text())["methods"]
    records = OutcomeStore(out).all_records()
    by = {(r["method"], r["index"], r["seed"]): r for r in records}
    for method in METHODS:
        mine = [r for r in records if r["method"] == method]
        assert summary[method]["n"] == len(mine) == 2
        assert summary[method]["loss"] == pytest.approx(list(mean_se([r["loss"] for r in mine])))
        assert summary[method]["unet_calls"] == pytest.approx(statistics.fmean(r["unet_calls"] for r in mine))
        diffs = [by[(method, i, 0)]["loss"] - by[("unguided", i, 0)]["loss"] for i in (0, 1)]
        paired = summary[method]["loss vs unguided"]
        assert paired is None if method == "unguided" else paired == pytest.approx([*mean_se(diffs), 2])
        assert 0 <= summary[method]["world-judge"][0] <= 1
    table = (out / "summary.md").read_text()
    assert all(f"| {method} | 2 |" in table for method in METHODS)
    assert (out / "summary.png").stat().st_size > 10_000
