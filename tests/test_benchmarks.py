"""Every benchmark's --quick mode runs to the end, writes its report and prints its table."""

import json
import shutil
import subprocess
import sys
from argparse import ArgumentTypeError
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from benchmarks.common import EMBEDDED
from benchmarks.optimizers import configured, rows, store
from benchmarks.quality import ASSETS, CAPABILITIES, OVERRIDES, Outcome, store_of, verdict
from doodl.experiment import METHODS, Trial
from doodl.settings import DoodlSettings

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "cost",
    "memory",
    "fidelity",
    "quality",
    "batch",
    "photo",
    "examples",
    "unet_call",
    "flow_mixing",
    "speed",
    "optimizers",
)
NEEDS_EMBEDDED = ("quality", "examples", "optimizers")
REPORTS = {"speed": "speed-tiny-cpu"}  # a report named by what it ran on
MISSING = [a for a in ("sd/model_index.json", *ASSETS) if not (EMBEDDED / a).exists()]


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
    report = REPORTS.get(name, name)
    assert (out / f"{report}.md").is_file() and (out / f"{report}.png").stat().st_size > 0


def saved_records(raw: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(raw.glob("*/*/records/*.json"))]


def test_quality_methods_sample_the_whole_chain_from_the_seeds_noise(runs):
    """Given latents are a photo's, run through its partial chain: every method here starts from noise, so
    the start of k samples costs k unguided samples and DOODL's iterations cost the same from either start."""
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    raw = runs["quality"][2] / "quality-raw"
    for capability in CAPABILITIES:
        calls = {r["method"]: r["unet_calls"] for r in saved_records(raw / capability.name)}
        assert calls.keys() == set(METHODS), capability.name
        assert calls["one-step"] == 2 * calls["unguided"]  # each call, and the backward through it
        assert calls["best-of-k+doodl"] == 2 * calls["unguided"] + calls["doodl"]  # --quick: 2 samples


def test_quality_reports_saved_outcomes_without_running_anything(runs, tmp_path):
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    out = runs["quality"][2]
    shutil.copytree(out / "quality-raw", tmp_path / "quality-raw")
    for searched in (tmp_path / "quality-raw").glob("*/best-of-k"):
        shutil.rmtree(searched)  # as if random search had not run yet
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--saved-only", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "quality.md").read_text()
    full = (out / "quality.md").read_text()
    row = next(line for line in full.splitlines() if line.startswith("| text | judge"))
    cells = row.split(" | ")
    cells[5] = "-"  # best-of-k: not saved, not run
    calls = cells[7].removesuffix(" |").split("/")
    calls[3] = "-"
    cells[7] = "/".join(calls) + " |"
    assert " | ".join(cells) in report.splitlines()


def test_quality_rescores_the_saved_images_without_running_anything(runs, tmp_path):
    """A mended evaluator scores the saved final images again: scores spoiled in the records come back."""
    if MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    raw = tmp_path / "quality-raw"
    shutil.copytree(runs["quality"][2] / "quality-raw", raw)
    paths = sorted(raw.glob("*/*/*/records/*.json"))
    truth = {path: json.loads(path.read_text()) for path in paths}
    images = {path: path.read_bytes() for path in raw.glob("*/*/*/samples/*.png")}
    for path, record in truth.items():
        path.write_text(json.dumps(record | {"score": -1.0}))
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--saved-only", "--rescore"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {path: json.loads(path.read_text()) for path in paths} == truth
    assert {path: path.read_bytes() for path in images} == images  # the images are read, never rewritten


def test_quality_verdict_calls_a_difference_within_noise_a_tie():
    def outcomes(scores, loss):
        return [Outcome(score, loss, calls=1) for score in scores]

    scores = {
        "doodl": outcomes([1, 0] * 5, loss=0.5),
        "unguided": outcomes([0, 0] * 5, loss=1.0),  # DOODL right on 5 more of 10: a clear win
        "one-step": outcomes([0, 1] * 5, loss=0.5),  # as often right, on other prompts: a tie
        "best-of-k": outcomes([1, 1] * 3, loss=0.2),  # 6 prompts only, all right: a loss
        "best-of-k+doodl": [],  # not run: no sentence on it
    }
    said = verdict("text", scores)
    assert "doodl beats unguided (+0.500 ± 0.167; better on 5, worse on 0 of 10)" in said
    assert "ties with one-step (+0.000 ± 0.333; better on 5, worse on 5 of 10)" in said
    assert "loses to best-of-k (-0.500 ± 0.224; better on 0, worse on 3 of 6)" in said
    assert "lower on 10 of 10 vs unguided (-0.500 ± 0.000), 0 of 10 vs one-step" in said
    assert "best-of-k+doodl" not in said


def test_quality_verdict_compares_doodl_from_the_best_start_with_every_other_method():
    def outcomes(scores, loss):
        return [Outcome(score, loss, calls=1) for score in scores]

    scores = {
        "doodl": outcomes([0, 0, 1, 0], loss=0.5),
        "unguided": outcomes([0, 0, 0, 0], loss=1.0),
        "one-step": outcomes([0, 0, 0, 0], loss=1.0),
        "best-of-k": outcomes([1, 0, 1, 0], loss=0.4),
        "best-of-k+doodl": outcomes([1, 1, 1, 1], loss=0.3),  # right on every prompt
    }
    said = verdict("personalization", scores).split("best-of-k+doodl")[1]
    assert said.startswith(" beats unguided (+1.000 ± 0.000; better on 4, worse on 0 of 4); beats one-step")
    assert "; beats doodl (+0.750 ± 0.250; better on 3, worse on 0 of 4);" in said
    # Right on 2 more of 4, but within two standard errors: a tie.
    assert "ties with best-of-k (+0.500 ± 0.289; better on 2, worse on 0 of 4)" in said
    assert "its guidance loss is lower on 4 of 4 vs unguided (-0.700 ± 0.000)" in said
    assert ", 4 of 4 vs doodl (-0.200 ± 0.000)," in said


def test_quality_outcomes_are_reused_only_with_the_same_settings_and_models(tmp_path):
    assets = tmp_path / "assets"
    for part in ("sd", "clip", "classifier", "aesthetic"):
        (assets / part).mkdir(parents=True)
        (assets / part / "weights.bin").write_bytes(b"one")
    overrides = dict.fromkeys(OVERRIDES)
    args = SimpleNamespace(
        steps=None, iterations=None, seed=2024, start_k=4, assets=assets, generator="sd", **overrides
    )
    capability = CAPABILITIES[2]
    trial = Trial(0, "a circle", 2000)
    record = {"score": 0.5, "loss": 0.25, "unet_calls": 40, "curve": [0.3, 0.25]}

    def saved(**changed) -> dict | None:
        store = store_of(tmp_path, capability, SimpleNamespace(**{**vars(args), **changed}))
        return store.record("doodl", trial)

    store_of(tmp_path, capability, args).save("doodl", trial, record, Image.new("RGB", (8, 8)))
    assert saved() == record
    changes = ({"clip": 0.1}, {"guidance_scale": 2.0}, {"normalized": True}, {"sampler": "ddim"})
    for override in (*changes, {"step_rule": "adam"}, {"regularizer": "white"}):
        store_of(tmp_path, capability, args).save("doodl", trial, record, None)
        assert saved(**override) is None, override  # another setting: the outcomes are removed
    store_of(tmp_path, capability, args).save("doodl", trial, record, None)
    assert saved(start_k=2) is None
    store_of(tmp_path, capability, args).save("doodl", trial, record, None)
    assert capability.name == "personalization"  # guided by CLIP alone
    (assets / "classifier" / "weights.bin").write_bytes(b"two")  # a guide it does not use, retrained
    assert saved() == record
    (assets / "clip" / "weights.bin").write_bytes(b"two")  # its guide retrained: nothing is reused
    assert saved() is None
    store_of(tmp_path, capability, args).save("doodl", trial, record, None)
    (assets / "sd" / "weights.bin").write_bytes(b"two")  # the generator retrained: nothing is reused
    assert saved() is None


# --- the real-architecture and GPU paths of benchmarks/memory.py, run at tiny sizes on the CPU ----------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from doodl.tiny import save_tiny_clip, save_tiny_pipeline

    folder = tmp_path_factory.mktemp("arch")
    return save_tiny_pipeline(folder / "sd"), save_tiny_clip(folder / "clip")


def test_every_memory_piece_runs(tiny_models):

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

    from benchmarks.memory import time_iteration

    threads = torch.get_num_threads()
    try:
        result = time_iteration(*tiny_models, mode, 64, 3, "cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(threads)
    assert "oom" not in result
    assert result["iteration_s"] > 0 and result["sample_s"] > 0 and result["weights"] > 0


def test_gpu_timing_reports_out_of_memory(tiny_models, monkeypatch):

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


def test_optimizer_report_counts_prompts_where_the_guide_prefers_a_method_to_random_search():
    """The report says on how many prompts DOODL's image has a lower guide's loss than best-of-k's: whether
    the optimizer, not the evaluator, is what falls short."""

    def records(scores: list[float], losses: list[float]) -> list[dict]:
        return [{"score": score, "loss": loss, "unet_calls": 800} for score, loss in zip(scores, losses)]

    kept = {
        "unguided": records([0.0, 0.0, 0.5], [3, 3, 3]),
        "best-of-k": records([1.0, 0.5, 0.5], [1, 2, 0.5]),
        "sgd/white": records([1.0, 1.0, 0.0], [0.5, 2, 1]),
    }
    unguided, best, white = rows("text", kept, ["sgd/white"])
    assert unguided[:5] == ["text", "unguided", "0.17 ± 0.17", "3.000", "800"]
    assert best[3] == "1.167" and white[3] == "1.167"
    assert white[5] == "1 of 3"  # 0.5 < 1 only: an equal loss is not lower
    assert white[6].startswith("+0.00 ± 0.29") and "1 up, 1 down" in white[6]


def test_optimizer_outcomes_of_every_prompt_share_one_store(tmp_path):
    """Each prompt has its own seed: the store's key leaves it out, or each prompt would wipe the last's."""
    if MISSING:
        pytest.skip(f"optimizers needs the embedded models, not trained yet: {MISSING}")
    args = SimpleNamespace(seed=1, assets=EMBEDDED, generator="sd")
    first, second = (DoodlSettings(seed=seed, steps=3) for seed in (0, 1))
    trial = Trial(0, "a red circle", 0)
    store(tmp_path, CAPABILITIES[0], args, "reference", first).save("doodl", trial, {"score": 1.0}, None)
    again = store(tmp_path, CAPABILITIES[0], args, "reference", second)
    assert again.record("doodl", trial) == {"score": 1.0}
    # Another configuration keeps its outcomes apart.
    adam, start = configured(second, "adam/white@0.03")
    assert (adam.step_rule, adam.regularizer, adam.grad_clip, start) == ("adam", "white", 0.03, 1)
    assert store(tmp_path, CAPABILITIES[0], args, "adam/white@0.03", adam).record("doodl", trial) is None
    # A search first: the best of 20 samples, then 10 iterations.
    hybrid, start = configured(second, "sgd/renormalize,start=20,iterations=10")
    assert (hybrid.step_rule, hybrid.iterations, start) == ("sgd", 10, 20)
    # A clip relative to each tab's preset: x10 its own clip.
    scaled, _ = configured(second, "adam/renormalize@x10")
    assert scaled.grad_clip == pytest.approx(10 * second.grad_clip) and scaled.step_rule == "adam"
    for bad in ("sgd/white,start=0", "sgd,steps=3", "lion/white", "sgd/white@x0", "adam/white@fast"):
        with pytest.raises(ArgumentTypeError, match="expected RULE/REGULARIZER"):
            configured(second, bad)
