"""What the benchmark scripts share: arguments, models, UNet call counting, timing and reports."""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import diffusers
import torch
import transformers
from matplotlib.figure import Figure

from doodl import DoodlSettings, LatentDiffusion, initial_latents, load_pipeline
from doodl.gradient import FinalLoss
from doodl.losses import symmetry_loss
from doodl.optimize import final_loss
from doodl.pipeline import NoisePredictor
from doodl.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EMBEDDED = ROOT / "assets" / "embedded"
PROMPT = "a red circle above a blue square"  # a caption of the embedded model's world
GUIDANCE = 7.5  # classifier-free guidance, the DOODL default

# Loading bars would bury the tables in the logs.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


# --- arguments and output -------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run on tiny sizes (CI)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results, or its quick/)")
    # One thread by default: on a shared machine, oversubscribed OpenMP threads spin and wreck timings.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def start(args: argparse.Namespace) -> Path:
    """Apply the common options; return the results folder (quick runs never overwrite full results)."""
    torch.set_num_threads(args.threads)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line saying where and when the numbers were measured."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"Measured {date.today()} on {os.cpu_count()} CPU cores (load average {load}: a shared machine), "
        f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}."
    )


def write_report(out: Path, name: str, title: str, sections: Sequence[str], figure: Figure) -> None:
    """Write NAME.md (title, machine line, sections, the last one a table) and NAME.png; print it all."""
    text = "\n\n".join([f"# {title}", machine(), *sections]) + "\n"
    (out / f"{name}.md").write_text(text)
    figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    print(f"\nwrote {out / name}.md and .png\n\n{text}")


def device_seconds(work: Callable[[], object], device: str) -> float:
    """Wall seconds of `work`, the device's queue drained before and after (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


# --- models ---------------------------------------------------------------------------------------


@functools.cache
def tiny_folder(sample_size: int) -> Path:
    """A random SD-architecture pipeline with latents of this side, saved once per process."""
    folder = Path(tempfile.mkdtemp(prefix=f"doodl-tiny{sample_size}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_tiny_pipeline(folder, sample_size=sample_size)


def embedded_folder() -> Path | None:
    """The embedded Stable Diffusion model, once it has been trained and saved."""
    folder = EMBEDDED / "sd"
    return folder if (folder / "model_index.json").is_file() else None


def model_folders(tiny_size: int, embedded: bool) -> dict[str, Path]:
    """Models to benchmark by name: the tiny random one, and the embedded one when asked and present."""
    folders = {f"tiny {tiny_size}x{tiny_size} latents": tiny_folder(tiny_size)}
    if embedded and embedded_folder() is not None:
        folders["embedded (8x8 latents)"] = embedded_folder()
    return folders


@dataclass(frozen=True)
class Problem:
    """A model, the guided noise predictor of a prompt, initial latents and a loss on the final pair."""

    model: LatentDiffusion
    eps: NoisePredictor
    latents: tuple[torch.Tensor, torch.Tensor]
    loss: FinalLoss


def problem(
    folder: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: torch.dtype = torch.float64,
    seed: int = 0,
) -> Problem:
    """The gradient problem every benchmark times: the UNet in `dtype`, the coupling in `precision`."""
    model = load_pipeline(folder, device, dtype)
    eps = model.noise_predictor(model.encode_prompt(PROMPT), GUIDANCE)
    latents = initial_latents(model, DoodlSettings(seed=seed, precision=precision))
    # Each latent decoded and scored for mirror symmetry in turn, as DOODL does; cheap, so the UNet dominates.
    return Problem(model, eps, latents, final_loss(model, symmetry_loss()))


# --- measuring ------------------------------------------------------------------------------------


def interleaved_medians(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each task over `repeats` rounds, after one untimed warm-up round.

    Each round runs every task once, starting at a different task each time, so that load from other
    processes on a shared machine falls on all tasks alike and their ratios stay meaningful.
    """
    names = list(tasks)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            tasks[name]()
            if round_ > 0:
                seconds[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in seconds.items()}
