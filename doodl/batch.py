"""Research runs over prompt sets: one image and one JSON record per (prompt, seed, method).

    python -m doodl batch prompts.txt --out runs --seeds 0 1 --methods unguided one-step doodl best-of-n
    accelerate launch --num_processes 8 -m doodl.batch prompts.jsonl --out runs --model ... --device cuda
    python -m doodl batch --summarize runs --score "clip-text=ViT-B-32 laion2b_s34b_b79k"

The prompt file has one prompt a line, or is JSONL: records with "prompt" and, if wanted, "seed" or "seeds",
"target" (the classifier's class), "references" (image paths), "text" (what text losses aim at); any other
field (GenEval's "tag", "include") is kept in the metadata. Models, losses and settings are the command
line's (`python -m doodl --help`).

Results lie in GenEval's layout, one tree per method: OUT/<method>/<index:05d>/metadata.jsonl,
samples/<seed:04d>.png (what GenEval's evaluator reads) and records/<seed:04d>.json. Under accelerate, the
(prompt, seed) pairs are split between the processes by `PartialState.split_between_processes`, one device
each; a process runs every method of its pairs, DOODL first, so that best-of-n can match its UNet calls.
A result whose record exists is skipped, so a stopped run resumes; every file is written under a temporary
name and then renamed, so a killed process never leaves half a result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from doodl.baseline import METHODS, matched_k, one_step_guidance
from doodl.capabilities import Crops, Target, build_weighted, capability_of
from doodl.chain import denoise
from doodl.cli import (
    add_run_arguments,
    chosen_settings,
    cli_target,
    load_cli_guides,
    loss_terms,
    model_names,
    open_image,
)
from doodl.embedded import presets
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, best_of_samples, conditioning, initial_latents, optimize, sample
from doodl.pipeline import LatentDiffusion, ModelLoadError, count_unet_calls, load_pipeline, to_tensor
from doodl.serving import locate
from doodl.summary import summarize


@dataclass(frozen=True)
class Job:
    """One (prompt, seed) pair: every method makes one image of it."""

    index: int
    record: dict[str, Any]
    seed: int

    @property
    def prompt(self) -> str:
        return self.record["prompt"]


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt file's records: JSONL, or one prompt a line (blank lines skipped)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if Path(path).suffix == ".jsonl":
        records = [json.loads(line) for line in lines]
        missing = [i + 1 for i, record in enumerate(records) if not str(record.get("prompt", "")).strip()]
        if missing:
            raise ValueError(f"{path}: line {missing[0]} has no prompt")
        return records
    return [{"prompt": line} for line in lines]


def jobs_of(records: list[dict[str, Any]], seeds: list[int]) -> list[Job]:
    """Every (prompt, seed) pair, in a fixed order: each process takes the same list and its own share."""
    jobs = []
    for index, record in enumerate(records):
        own = record.get("seeds", [record["seed"]] if "seed" in record else seeds)
        jobs += [Job(index, record, int(seed)) for seed in own]
    return jobs


def place(out: Path, method: str, job: Job) -> tuple[Path, Path]:
    """(image, record) of a result, in GenEval's folder layout."""
    folder = out / method / f"{job.index:05d}"
    return folder / "samples" / f"{job.seed:04d}.png", folder / "records" / f"{job.seed:04d}.json"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_result(out: Path, method: str, job: Job, image: Image.Image, record: dict[str, Any]) -> None:
    """The image, then the record: a record on disk means a finished result."""
    image_path, record_path = place(out, method, job)
    metadata = image_path.parent.parent / "metadata.jsonl"
    if not metadata.exists():
        write_atomically(metadata, lambda p: p.write_text(json.dumps(job.record) + "\n"))
    write_atomically(image_path, lambda p: image.save(p, format="PNG"))
    write_atomically(record_path, lambda p: p.write_text(json.dumps(record, indent=1, default=str)))


def remove_leftovers(out: Path) -> None:
    """Temporary files of a killed run: never results (`write_atomically`), so removed on restart."""
    for leftover in out.glob("*/*/*/.*.tmp"):
        leftover.unlink(missing_ok=True)


def finished(out: Path, method: str, job: Job) -> dict[str, Any] | None:
    _, record_path = place(out, method, job)
    return json.loads(record_path.read_text()) if record_path.exists() else None


# --- making one result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Made:
    image: Image.Image
    loss: float  # the guide's, on the final image, with the pair's own views: comparable across methods
    calls: int  # UNet calls spent, a backward through a call counted as one more (`UnetCalls.passes`)
    extra: dict[str, Any]


@dataclass
class Runner:
    """What every result of a run is made with: the model, the guides and losses, the settings."""

    model: LatentDiffusion
    guides: dict[str, Any]
    terms: list[tuple[str, float]]
    settings: DoodlSettings
    cutouts: int
    cut_power: float
    one_step_scale: float
    best_of: int | None  # None: as many samples as DOODL's UNet calls pay for
    # UNet calls of one unguided sample: the same for every pair of a run (its steps and sampler)
    per_sample: int | None = field(default=None, init=False, repr=False)

    def loss(self, job: Job, target: Target) -> Loss:
        """The pair's loss; its views are drawn from the pair's seed, so every method is judged alike."""
        crops = Crops(self.cutouts, self.cut_power, torch.Generator().manual_seed(job.seed))
        return build_weighted(self.terms, self.guides, target, crops)

    def judged(self, job: Job, target: Target, image: Image.Image) -> float:
        pixels = to_tensor(image, image.size)
        with torch.no_grad():
            return float(self.loss(job, target)(pixels))

    def make(self, method: str, job: Job, target: Target, doodl_calls: int | None) -> Made:
        settings = replace(self.settings, seed=job.seed)
        if method == "best-of-n":  # before counting: sizing it is no part of its cost
            n = self.best_of or matched_k(doodl_calls or 0, self.sample_calls(job, settings))
        with count_unet_calls(self.model.denoiser) as calls:
            if method == "unguided":
                image, extra = sample(self.model, job.prompt, settings), {}
            elif method == "one-step":
                loss = self.loss(job, target)
                image = one_step_guidance(self.model, job.prompt, loss, self.one_step_scale, settings)
                extra = {"one_step_scale": self.one_step_scale}
            elif method == "doodl":
                result = optimize(self.model, job.prompt, self.loss(job, target), settings)
                image = result.best.image
                extra = {
                    "curve": result.losses,
                    "best_iteration": result.best.iteration + 1,
                    "start_seed": result.best.seed,  # the pair's own, or the best of start_samples
                }
            else:
                image, extra = self.best_of_n(job, target, settings, n)
        return Made(image, self.judged(job, target, image), calls.passes, extra)

    def best_of_n(
        self, job: Job, target: Target, settings: DoodlSettings, n: int
    ) -> tuple[Image.Image, dict[str, Any]]:
        """n unguided samples of other seeds (the first is the pair's own), the one the guide prefers."""

        def judge(pixels: torch.Tensor) -> torch.Tensor:
            return self.loss(job, target)(pixels)  # each candidate on the pair's own views

        best = best_of_samples(self.model, job.prompt, judge, settings, n)
        return best.image, {"candidates": n, "candidate_losses": list(best.losses), "chosen": best.chosen}

    def sample_calls(self, job: Job, settings: DoodlSettings) -> int:
        """UNet calls of one unguided sample, counted once a run on the chain alone (no decoding)."""
        if self.per_sample is None:
            eps = conditioning(self.model, job.prompt, settings)
            x, y = initial_latents(self.model, settings)
            with count_unet_calls(self.model.denoiser) as calls, torch.no_grad():
                denoise(settings, eps, x, y, self.model)
            self.per_sample = calls.passes
        return self.per_sample


def package_version() -> str:
    try:
        return version("doodl")
    except PackageNotFoundError:
        return "source"


def run_job(
    runner: Runner, job: Job, target: Target, methods: list[str], out: Path, who: dict
) -> Iterator[str]:
    """Make each missing result of a pair, DOODL first; yield each method as it is done."""
    doodl_calls = None
    for method in sorted(methods, key=lambda m: m != "doodl"):
        done = finished(out, method, job)
        if done is None:
            start = time.perf_counter()
            made = runner.make(method, job, target, doodl_calls)
            done = {
                "prompt": job.prompt,
                "index": job.index,
                "seed": job.seed,
                "method": method,
                "loss": made.loss,
                "losses": runner.terms,
                "target": target_record(job, target),
                "seconds": time.perf_counter() - start,
                "unet_calls": made.calls,
                "settings": asdict(replace(runner.settings, seed=job.seed)),
                "cutouts": runner.cutouts,
                **made.extra,
                **who,
                "version": package_version(),
            }
            save_result(out, method, job, made.image, done)
        if method == "doodl":
            doodl_calls = done["unet_calls"]
        yield method


def target_record(job: Job, target: Target) -> dict[str, Any]:
    return {
        "text": target.text,
        "target_class": target.target_class,
        "references": list(job.record.get("references", [])),
        "score": target.score,
    }


# --- the command ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m doodl batch", description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="?", help="prompt file: .txt (one a line) or .jsonl")
    parser.add_argument("--out", help="results folder (resumed if it holds results)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds of every prompt without its own"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--best-of", type=int, help="samples of best-of-n (default: DOODL's UNet calls' worth)"
    )
    parser.add_argument(
        "--one-step-scale", type=float, help="one-step guidance's scale (default: the preset's)"
    )
    parser.add_argument("--summarize", metavar="DIR", help="write DIR/summary.md and summary.png, then stop")
    parser.add_argument(
        "--score",
        action="append",
        default=[],
        metavar="LOSS=MODEL",
        help="with --summarize: another scorer of every image, e.g. a held-out CLIP ('clip-text=ViT-B-32 "
        "openai'), or 'world-judge' (the embedded world's rule-based judge of the caption)",
    )
    add_run_arguments(parser)
    return parser.parse_args(argv)


def run_batch(args: argparse.Namespace) -> int:
    """This process's share of the run; returns the number of results it made or found."""
    from accelerate import PartialState  # imported by a batch alone: it looks for devices

    if not args.prompts or not args.out:
        raise ValueError("a batch needs a prompt file and --out")
    state = PartialState(cpu=not args.device.startswith("cuda"))
    device = str(state.device) if args.device.startswith("cuda") else args.device
    settings, cutouts = chosen_settings(args)
    terms = loss_terms(args)
    scale = args.one_step_scale
    names = model_names(args)
    if scale is None:
        scale = presets(locate(names.sd))[capability_of(terms[0][0])].one_step_scale
    model = load_pipeline(locate(names.sd), device, vae=locate(names.vae) or None)
    runner = Runner(
        model, load_cli_guides(args, device), terms, settings, cutouts, args.cut_power, scale, args.best_of
    )
    who = {"device": device, "process": state.process_index, "processes": state.num_processes}
    everything = jobs_of(read_prompts(args.prompts), args.seeds)
    out, count = Path(args.out), 0
    if state.is_main_process:
        remove_leftovers(out)
    state.wait_for_everyone()  # before anyone writes again
    with state.split_between_processes(everything) as mine:
        bar = tqdm(
            total=len(mine) * len(args.methods),
            desc=f"process {state.process_index}",
            position=state.process_index,
            disable=None,
        )
        for job in mine:
            target = job_target(args, job)
            for _ in run_job(runner, job, target, args.methods, out, who):
                count += 1
                bar.update()
        bar.close()
    return count


def job_target(args: argparse.Namespace, job: Job) -> Target:
    """The command line's target, with what the pair's record says instead."""
    target = cli_target(args, job.record.get("text") or job.prompt)
    record = job.record
    if "references" in record:
        target = replace(target, references=tuple(open_image(path) for path in record["references"]))
    if "target" in record:
        target = replace(target, target_class=record["target"])
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.summarize:
            report = summarize(Path(args.summarize), args.score, args.device)
            print(f"summary written to {report}")
            return 0
        run_batch(args)
    except (ValueError, TypeError, OSError, ModelLoadError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
