"""Every benchmark's --quick mode runs to the end, writes its report and prints its table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from benchmarks.common import EMBEDDED
from benchmarks.quality import (
    ASSETS,
    CAPABILITIES,
    MATCHED,
    METHODS,
    OVERRIDES,
    STARTED,
    Outcome,
    RawStore,
    Task,
    rescored,
    run_task,
    verdict,
)
from doodl import DoodlSettings

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "cost",
    "memory",
    "fidelity",
    "quality",
    "smoothness",
    "batch",
    "photo",
    "examples",
    "unet_call",
    "steps",
    "samplers",
    "prior",
    "vocabulary_failures",
    "flow_mixing",
)
NEEDS_EMBEDDED = ("quality", "examples", "steps", "samplers", "prior", "vocabulary_failures")
MISSING = [a for a in ASSETS if not (EMBEDDED / a).exists()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (return code, output, results folder)}; all start at once, as they mostly wait on imports."""
    out = tmp_path_factory.mktemp("benchmarks")
    started = {}
    for name in SCRIPTS:
        if name in NEEDS_EMBEDDED and MISSING:
            continue
        log = (out / f"{name}.log").open("w")
        command = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)]
        started[name] = (subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    results = {}
    for name, (process, log) in started.items():
        process.wait(timeout=600)
        log.close()
        results[name] = (process.returncode, (out / f"{name}.log").read_text(), out)
    return results


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_prints_its_table(runs, name):
    if name in NEEDS_EMBEDDED and MISSING:
        pytest.skip(f"{name} needs the embedded models, not trained yet: {MISSING}")
    returncode, output, out = runs[name]
    assert returncode == 0, output[-3000:]
    table = output.rstrip().splitlines()
    assert table[-1].startswith("|") and any(line.startswith("|---") for line in table), output[-3000:]
    assert (out / f"{name}.md").is_file() and (out / f"{name}.png").stat().st_size > 0


def test_quality_methods_sample_the_whole_chain_from_the_seeds_noise(runs):
    """Given latents are a photo's, run through its partial chain: every method here starts from noise, so
    the start of k samples costs k unguided samples and DOODL's iterations cost the same from either start."""
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    saved = list((runs["quality"][2] / "quality-raw").glob("*.json"))
    assert saved
    for path in saved:
        for prompt in json.loads(path.read_text())["prompts"]:
            calls = {method: outcome["calls"] for method, outcome in prompt.items()}
            assert calls["one-step"] == 2 * calls["unguided"]  # each call, and the backward through it
            assert calls[STARTED] == 2 * calls["unguided"] + calls["DOODL"]  # --quick starts from 2 samples


def test_quality_reports_saved_outcomes_without_running_anything(runs, tmp_path):
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    out = runs["quality"][2]
    (tmp_path / "quality-raw").mkdir()
    for path in (out / "quality-raw").glob("*.json"):
        saved = json.loads(path.read_text())
        for prompt in saved["prompts"]:
            del prompt[MATCHED]  # as if random search had not run yet
        (tmp_path / "quality-raw" / path.name).write_text(json.dumps(saved))
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--saved-only", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "quality.md").read_text()
    full = (out / "quality.md").read_text()
    row = next(line for line in full.splitlines() if line.startswith("| text | judge"))
    cells = row.split(" | ")
    cells[5] = "-"  # best of K samples: not saved, not run
    calls = cells[7].removesuffix(" |").split("/")
    calls[3] = "-"
    cells[7] = "/".join(calls) + " |"
    assert " | ".join(cells) in report.splitlines()


def test_quality_rescores_the_saved_images_without_running_anything(runs, tmp_path):
    """A mended evaluator scores the saved final images again: scores spoiled in the JSON come back."""
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    raw = tmp_path / "quality-raw"
    shutil.copytree(runs["quality"][2] / "quality-raw", raw)
    truth = {path.name: json.loads(path.read_text()) for path in raw.glob("*.json")}
    for name, saved in truth.items():
        spoiled = json.loads(json.dumps(saved))
        for prompt in spoiled["prompts"]:
            for outcome in prompt.values():
                outcome["score"] = -1.0
        (raw / name).write_text(json.dumps(spoiled))
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--saved-only", "--rescore"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, saved in truth.items():
        assert json.loads((raw / name).read_text()) == saved, name


def test_quality_verdict_calls_a_difference_within_noise_a_tie():
    def outcomes(scores, loss):
        return [Outcome(score, loss, calls=1) for score in scores]

    scores = {
        "DOODL": outcomes([1, 0] * 5, loss=0.5),
        "unguided": outcomes([0, 0] * 5, loss=1.0),  # DOODL right on 5 more of 10: a clear win
        "one-step": outcomes([0, 1] * 5, loss=0.5),  # as often right, on other prompts: a tie
        MATCHED: outcomes([1, 1] * 3, loss=0.2),  # 6 prompts only, all right: a loss
        STARTED: [],  # not run: no sentence on it
    }
    said = verdict("text", scores)
    assert "DOODL beats unguided (+0.500 ± 0.167; better on 5, worse on 0 of 10)" in said
    assert "ties with one-step (+0.000 ± 0.333; better on 5, worse on 5 of 10)" in said
    assert "loses to best of K samples (-0.500 ± 0.224; better on 0, worse on 3 of 6)" in said
    assert "lower on 10 of 10 vs unguided (-0.500 ± 0.000), 0 of 10 vs one-step" in said
    assert STARTED not in said


def test_quality_verdict_compares_doodl_from_the_best_start_with_every_other_method():
    def outcomes(scores, loss):
        return [Outcome(score, loss, calls=1) for score in scores]

    scores = {
        "DOODL": outcomes([0, 0, 1, 0], loss=0.5),
        "unguided": outcomes([0, 0, 0, 0], loss=1.0),
        "one-step": outcomes([0, 0, 0, 0], loss=1.0),
        MATCHED: outcomes([1, 0, 1, 0], loss=0.4),
        STARTED: outcomes([1, 1, 1, 1], loss=0.3),  # right on every prompt
    }
    said = verdict("personalization", scores).split(STARTED)[1]
    assert said.startswith(" beats unguided (+1.000 ± 0.000; better on 4, worse on 0 of 4); beats one-step")
    assert "; beats DOODL (+0.750 ± 0.250; better on 3, worse on 0 of 4);" in said
    # Right on 2 more of 4, but within two standard errors: a tie.
    assert "ties with best of K samples (+0.500 ± 0.289; better on 2, worse on 0 of 4)" in said
    assert "its guidance loss is lower on 4 of 4 vs unguided (-0.700 ± 0.000)" in said
    assert ", 4 of 4 vs DOODL (-0.200 ± 0.000)," in said


def test_quality_outcomes_are_saved_per_prompt_and_reused_only_with_the_same_settings(tmp_path):
    assets = tmp_path / "assets"
    for part in ("sd", "clip", "classifier", "aesthetic"):
        (assets / part).mkdir(parents=True)
        (assets / part / "weights.bin").write_bytes(b"one")
    overrides = dict.fromkeys(OVERRIDES)
    args = SimpleNamespace(steps=None, iterations=None, seed=2024, start_k=4, assets=assets, **overrides)
    capability = CAPABILITIES[2]
    first = {m: Outcome(0.5, 0.25, 40, (0.3, 0.25)) for m in METHODS[:3]}
    RawStore.open(tmp_path, capability, args).save(0, first)

    again = RawStore.open(tmp_path, capability, args)
    assert again.outcomes(0, METHODS[:3]) == first  # curves come back as tuples, as saved
    assert again.outcomes(0, METHODS) is None  # the random-search runs were not saved: run them
    assert again.partial(0) == first  # ... beside the saved three, which are not run again
    assert again.partial(1) == {}
    assert again.outcomes(1, METHODS[:3]) is None
    with pytest.raises(ValueError, match="prompt 2 saved before prompt 1"):
        again.save(2, first)
    # A run of a few methods (--methods) adds to the prompt's saved outcomes and keeps the others'.
    searched = {METHODS[3]: Outcome(1.0, 0.1, 800, ())}
    again.save(0, searched)
    assert RawStore.open(tmp_path, capability, args).partial(0) == first | searched
    assert RawStore.open(tmp_path, capability, SimpleNamespace(**{**vars(args), "start_k": 2})).prompts == []
    for override in (
        {"clip": 0.1},
        {"guidance_scale": 2.0},
        {"normalized": True},
        {"learning_rate": 3.0},
        {"sampler": "ddim"},
    ):
        assert (
            RawStore.open(tmp_path, capability, SimpleNamespace(**{**vars(args), **override})).prompts == []
        )
    assert capability.name == "personalization"  # guided by CLIP alone
    (assets / "classifier" / "weights.bin").write_bytes(b"two")  # a guide it does not use, retrained
    assert RawStore.open(tmp_path, capability, args).partial(0) == first | searched
    (assets / "clip" / "weights.bin").write_bytes(b"two")  # its guide retrained: nothing is reused
    assert RawStore.open(tmp_path, capability, args).prompts == []
    RawStore.open(tmp_path, capability, args).save(0, first)
    (assets / "sd" / "weights.bin").write_bytes(b"two")  # the generator retrained: nothing is reused
    assert RawStore.open(tmp_path, capability, args).prompts == []


def test_quality_final_images_are_saved_beside_their_outcomes_and_scored_again(tmp_path):
    (tmp_path / "assets").mkdir()
    overrides = dict.fromkeys(OVERRIDES)
    args = SimpleNamespace(
        steps=None, iterations=None, seed=2024, start_k=4, assets=tmp_path / "assets", **overrides
    )
    capability = CAPABILITIES[0]
    dark, light = Image.new("RGB", (8, 8), (10, 10, 10)), Image.new("RGB", (8, 8), (250, 250, 250))
    store = RawStore.open(tmp_path, capability, args)
    store.save(0, {"unguided": Outcome(0.0, 0.5, 20, (), dark), "one-step": Outcome(0.0, 0.5, 20, (), light)})
    store.save(0, {"DOODL": Outcome(0.0, 0.4, 800, (0.5, 0.4))})  # an outcome saved without its image
    reopened = RawStore.open(tmp_path, capability, args)
    saved, images = reopened.partial(0), reopened.images(0)
    assert all(o.image is None for o in saved.values())  # outcomes are read without their images ...
    assert images["unguided"].getpixel((0, 0)) == (10, 10, 10)  # ... which are read only when asked for
    assert images["one-step"].getpixel((0, 0)) == (250, 250, 250)
    assert "DOODL" not in images
    brightness = Task("a red circle", loss=None, score=lambda image: image.getpixel((0, 0))[0] / 250)
    again = rescored(brightness, saved, images)
    assert {m: o.score for m, o in again.items()} == {"unguided": 0.04, "one-step": 1.0}  # DOODL: no image
    assert again["unguided"].loss == 0.5 and again["unguided"].calls == 20
    # Saving rescored outcomes writes their scores and leaves the images as they were.
    for method in images:
        os.utime(reopened.image_path(0, method), ns=(0, 0))  # marked: a rewrite would set today's time
    reopened.save(0, again)
    assert all(reopened.image_path(0, m).stat().st_mtime_ns == 0 for m in images)
    assert RawStore.open(tmp_path, capability, args).partial(0)["one-step"].score == 1.0


# --- the real-architecture and GPU paths of benchmarks/memory.py, run at tiny sizes on the CPU ----------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from doodl.tiny import save_tiny_clip, save_tiny_pipeline

    folder = tmp_path_factory.mktemp("arch")
    return save_tiny_pipeline(folder / "sd"), save_tiny_clip(folder / "clip")


def test_every_memory_piece_runs(tiny_models):
    import torch

    from benchmarks.memory import Case, arch_cases, measure_case

    threads = torch.get_num_threads()
    cases = arch_cases([64, 128], [1, 2], whole_512=False)
    cases.append(Case("guided iteration", "iteration", 64, 1, True, guide=True))
    try:
        for case in cases:
            before, top = measure_case(*tiny_models, case, "cpu", 1)
            assert before > 0 and top > 0, case
    finally:
        torch.set_num_threads(threads)


def test_every_flow_memory_piece_runs(tmp_path, tiny_models):
    """SD3.5 Medium's cases on a tiny SD3: the transformer's call + VJP and whole iterations, with and
    without its gradient checkpointing, and the verdicts that compare them."""
    import torch

    from benchmarks.memory import flow_cases, flow_verdicts, measure_case
    from doodl.tiny import save_tiny_sd3_pipeline

    sd3 = save_tiny_sd3_pipeline(tmp_path / "sd3")
    threads = torch.get_num_threads()
    cases = flow_cases([64], [1, 2])
    assert sum(c.checkpoint_denoiser for c in cases) == 3 and sum(c.piece == "iteration" for c in cases) == 4
    try:
        growth = []
        for case in cases:
            before, top = measure_case(sd3, tiny_models[1], case, "cpu", 1)
            assert before > 0 and top > 0, case
            growth.append((top - before) / 2**30)
    finally:
        torch.set_num_threads(threads)
    said = flow_verdicts(cases, growth)
    assert len(said) == 2 and all("at 64 px" in line for line in said)
    assert "the transformer checkpointed" in said[1]


@pytest.mark.parametrize("mode", ["reversible", "checkpoint", "autograd"])
def test_gpu_timing_runs_on_the_cpu(tiny_models, mode):
    import torch

    from benchmarks.memory import time_iteration

    threads = torch.get_num_threads()
    try:
        result = time_iteration(*tiny_models, mode, 64, 3, "cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(threads)
    assert "oom" not in result
    assert result["iteration_s"] > 0 and result["sample_s"] > 0 and result["weights"] > 0


def test_gpu_timing_reports_out_of_memory(tiny_models, monkeypatch):
    import torch

    import benchmarks.memory as memory

    real = memory.latent_grad

    def short_of_memory(eps, x, y, schedule, *args):
        if len(schedule) > 1:  # the 1-step warm-up fits, the measured iteration does not
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(eps, x, y, schedule, *args)

    monkeypatch.setattr(memory, "latent_grad", short_of_memory)
    threads = torch.get_num_threads()
    try:
        result = memory.time_iteration(*tiny_models, "autograd", 64, 3, "cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(threads)
    assert result["oom"] is True and "iteration_s" not in result


# --- SDXL (issue #19): the same paths on a tiny SDXL-architecture model ----------------------------------


@pytest.fixture(scope="module")
def tiny_xl_models(tmp_path_factory):
    from doodl.tiny import save_tiny_clip, save_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("xl")
    return save_tiny_sdxl_pipeline(folder / "sdxl"), save_tiny_clip(folder / "clip")


def test_every_sdxl_memory_piece_runs(tiny_xl_models):
    import torch

    from benchmarks.memory import measure_case, time_iteration, xl_cases

    cases = xl_cases([64], [1, 2])
    assert [(c.piece, c.steps) for c in cases] == [
        ("unet-vjp", 1),
        ("iteration", 1),
        ("decode", 1),
        ("guide", 1),
        ("iteration", 2),
    ]
    threads = torch.get_num_threads()
    try:
        for case in cases:
            before, top = measure_case(*tiny_xl_models, case, "cpu", 1)
            assert before > 0 and top > 0, case  # in-process: the peak can read a page under before
        result = time_iteration(*tiny_xl_models, "reversible", 64, 2, "cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(threads)
    assert result["iteration_s"] > 0 and result["peak"] > 0 and result["weights"] > 0


def test_sdxl_text_encoders_are_dropped_once_the_prompt_is_encoded(tiny_xl_models):
    import torch

    from benchmarks.memory import free_text_encoders
    from doodl.pipeline import load_pipeline

    model = load_pipeline(tiny_xl_models[0])
    eps = model.noise_predictor(model.encode_prompt("a red circle"), 7.5)
    free_text_encoders(model)
    encoders = [*model.text_encoder.parameters(), *model.text_encoder_2.parameters()]
    assert encoders and all(p.is_meta for p in encoders)
    assert eps(torch.zeros(model.latent_shape(64, 64)), 500).isfinite().all()  # the UNet still runs


def test_sdxl_verdict_holds_a_whole_iteration_to_one_unet_vjp_plus_ten_percent(tmp_path):
    from benchmarks.memory import xl_cases, xl_extrapolation, xl_verdicts

    cases = xl_cases([512], [1, 2])  # unet-vjp, iteration 1, decode, guide, iteration 2
    assert xl_verdicts(cases, [2.0, 2.1, 1.5, 1.0, 2.2])[0].startswith("**PASS** at 512 px")
    assert xl_verdicts(cases, [2.0, 2.3, 1.5, 1.0, 2.3])[0].startswith("**FAIL**")  # +15%
    assert xl_verdicts(cases, [2.0, 1.6, 1.5, 1.0, 1.9])[0].startswith("**FAIL**")  # grows with steps
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "guide"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "w.safetensors").write_bytes(b"\0" * 2**20)
    # At 1024 px in float16: UNet 2.0 * 4 / 2 = 4.0, decode 1.5 * 4 = 6.0 (float32 VAE), guide 0.5; an
    # iteration grew 2.2 / 2.0 = 1.1x its largest piece at 512 px: 6.6 GB.
    said = xl_extrapolation(cases, [2.0, 2.1, 1.5, 1.0, 2.2], tmp_path, tmp_path / "guide")
    assert "UNet VJP 4.00 GB, decode (float32) 6.00 GB, guide 0.50 GB" in said
    assert "1.10x its largest piece" in said and "about 6.6 GB above" in said


def test_compare_pairs_a_levers_prompts_with_the_references(tmp_path, capsys, monkeypatch):
    from benchmarks import compare

    for name, values in (("base", [0.0, 0.5, 1.0]), ("lever", [1.0, 0.5])):  # the lever ran 2 prompts
        (tmp_path / name).mkdir()
        prompts = [{"DOODL": {"score": v}, "unguided": {"score": 0.0}} for v in values]
        (tmp_path / name / "text.json").write_text(json.dumps({"key": {}, "prompts": prompts}))
    assert compare.row("text", [0.0, 0.5, 1.0], [1.0, 0.5]) == [
        "text",
        2,
        "0.250",
        "0.750",
        "+0.500 ± 0.500",
        1,
        0,
    ]
    monkeypatch.setattr(sys, "argv", ["compare", str(tmp_path / "base"), str(tmp_path / "lever")])
    compare.main()
    assert "| text | 2 | 0.250 | 0.750 | +0.500 ± 0.500 | 1 | 0 |" in capsys.readouterr().out


def test_a_resumed_quality_run_gives_what_a_fresh_one_gives(tiny):
    """Saved methods are not run again, so a method's random views must not depend on which ran before it."""

    def loss(images):  # random weights per pixel, drawn as the guides draw their views
        return ((images - 0.3) ** 2 * torch.rand(images.shape[-2:])).mean()

    task = Task("a red circle", loss, lambda image: 0.0)
    settings = DoodlSettings(steps=3, iterations=3, seed=5)
    methods = ("unguided", "one-step", STARTED)
    fresh = run_task(tiny, task, settings, 0.3, methods, 2)
    resumed = run_task(tiny, task, settings, 0.3, methods, 2, {m: fresh[m] for m in methods[:2]})
    assert resumed[STARTED].curve == fresh[STARTED].curve
    assert resumed[STARTED].loss == fresh[STARTED].loss
