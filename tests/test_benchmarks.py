"""Every benchmark's --quick mode runs to the end, writes its report and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import EMBEDDED
from benchmarks.quality import ASSETS, Outcome, verdict

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cost", "memory", "fidelity", "quality", "smoothness", "batch")
MISSING = [a for a in ASSETS if not (EMBEDDED / a).exists()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (return code, output, results folder)}; all start at once, as they mostly wait on imports."""
    out = tmp_path_factory.mktemp("benchmarks")
    started = {}
    for name in SCRIPTS:
        if name == "quality" and MISSING:
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
    if name == "quality" and MISSING:
        pytest.skip(f"quality needs the embedded models, not trained yet: {MISSING}")
    returncode, output, out = runs[name]
    assert returncode == 0, output[-3000:]
    table = output.rstrip().splitlines()
    assert table[-1].startswith("|") and any(line.startswith("|---") for line in table), output[-3000:]
    assert (out / f"{name}.md").is_file() and (out / f"{name}.png").stat().st_size > 0


def test_quality_verdict_calls_a_difference_within_noise_a_tie():
    def outcomes(scores, loss):
        return [Outcome(score, loss, calls=1) for score in scores]

    scores = {
        "DOODL": outcomes([1, 0] * 5, loss=0.5),
        "unguided": outcomes([0, 0] * 5, loss=1.0),  # DOODL right on 5 more of 10: a clear win
        "one-step": outcomes([0, 1] * 5, loss=0.5),  # as often right, on other prompts: a tie
        "one-step best of K": outcomes([1, 1] * 3, loss=0.2),  # 6 prompts only, all right: a loss
    }
    said = verdict("text", scores)
    assert "DOODL beats unguided (+0.500 ± 0.167; better on 5, worse on 0 of 10)" in said
    assert "ties with one-step (+0.000 ± 0.333; better on 5, worse on 5 of 10)" in said
    assert "loses to one-step best of K (-0.500 ± 0.224; better on 0, worse on 3 of 6)" in said
    assert "lower on 10 of 10 vs unguided (-0.500 ± 0.000), 0 of 10 vs one-step" in said


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
