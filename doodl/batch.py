"""Research runs over prompt sets: one image and one JSON record per (prompt, seed, method).

    python -m doodl batch prompts.txt --out runs --seeds 0 1 --methods unguided one-step doodl best-of-k
    accelerate launch --num_processes 8 -m doodl.batch prompts.jsonl --out runs --model ... --device cuda
    python -m doodl batch --summarize runs --score "clip-text=ViT-B-32 laion2b_s34b_b79k"

The prompt file has one prompt a line, or is JSONL: records with "prompt" and, if wanted, "seed" or "seeds",
"target" (the classifier's class), "references" (image paths), "text" (what text losses aim at); any other
field (GenEval's "tag", "include") is kept in the metadata. Models, losses and settings are the command
line's (`python -m doodl --help`). The methods, their UNet-pass accounting and the outcome store (GenEval's
layout, resumed after a kill) are `doodl.experiment`'s. Under accelerate, the (prompt, seed) pairs are split
between the processes by `PartialState.split_between_processes`, one device each; a process runs every
method of its pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from doodl.capabilities import Crops, Target, build_weighted, capability_of
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
from doodl.experiment import METHODS, Contest, OutcomeStore, Trial, run_trial
from doodl.losses import Loss
from doodl.optimize import DoodlSettings
from doodl.pipeline import ModelLoadError, load_pipeline
from doodl.serving import locate
from doodl.settings import SPEED_SETTINGS
from doodl.summary import summarize


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


def trials_of(records: list[dict[str, Any]], seeds: list[int]) -> list[Trial]:
    """Every (prompt, seed) pair, in a fixed order: each process takes the same list and its own share."""
    trials = []
    for index, record in enumerate(records):
        own = record.get("seeds", [record["seed"]] if "seed" in record else seeds)
        trials += [Trial(index, record["prompt"], int(seed), record) for seed in own]
    return trials


def package_version() -> str:
    try:
        return version("doodl")
    except PackageNotFoundError:
        return "source"


def target_record(trial: Trial, target: Target) -> dict[str, Any]:
    return {
        "text": target.text,
        "target_class": target.target_class,
        "references": list(trial.metadata.get("references", [])),
        "score": target.score,
    }


def seeded_loss(
    terms: list[tuple[str, float]], guides: dict[str, Any], target: Target, cutouts: int, cut_power: float
) -> Callable[[int], Loss]:
    """seed -> the weighted loss, its views drawn from that seed: every method of a pair judged alike."""

    def loss_of(seed: int) -> Loss:
        return build_weighted(
            terms, guides, target, Crops(cutouts, cut_power, torch.Generator().manual_seed(seed))
        )

    return loss_of


# --- the command ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m doodl batch", description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="?", help="prompt file: .txt (one a line) or .jsonl")
    parser.add_argument("--out", help="results folder (resumed if it holds results made alike)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds of every prompt without its own"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--best-of", type=int, help="K of best-of-k (default: DOODL's UNet passes' worth)")
    parser.add_argument(
        "--start-k", type=int, default=4, help="samples best-of-k+doodl starts from the best of"
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


def run_key(args: argparse.Namespace, settings: DoodlSettings, cutouts: int, scale: float) -> dict[str, Any]:
    """What every result of a run is made with: a folder is resumed only by a run made alike."""
    return {
        "models": asdict(model_names(args)),
        "losses": loss_terms(args),
        "settings": {
            name: value
            for name, value in asdict(replace(settings, seed=0)).items()
            if name not in SPEED_SETTINGS
        },
        "cutouts": cutouts,
        "cut_power": args.cut_power,
        "one_step_scale": scale,
        "best_of": args.best_of,
        "start_k": args.start_k,
    }


def run_batch(args: argparse.Namespace) -> int:
    """This process's share of the run; returns the number of results it made or found."""
    from accelerate import PartialState  # imported by a batch alone: it looks for devices

    if not args.prompts or not args.out:
        raise ValueError("a batch needs a prompt file and --out")
    state = PartialState(cpu=not args.device.startswith("cuda"))
    device = str(state.device) if args.device.startswith("cuda") else args.device
    settings, cutouts = chosen_settings(args)
    terms = loss_terms(args)
    names = model_names(args)
    scale = args.one_step_scale
    if scale is None:
        scale = presets(locate(names.sd))[capability_of(terms[0][0])].one_step_scale
    trials = trials_of(read_prompts(args.prompts), args.seeds)
    key = run_key(args, settings, cutouts, scale)
    if state.is_main_process:
        OutcomeStore.open(Path(args.out), key).remove_leftovers()
    state.wait_for_everyone()  # before anyone writes again
    store = OutcomeStore.open(Path(args.out), key)
    model = load_pipeline(locate(names.sd), device, vae=locate(names.vae) or None)
    guides = load_cli_guides(args, device)
    common = {
        "losses": terms,
        "cutouts": cutouts,
        "device": device,
        "process": state.process_index,
        "processes": state.num_processes,
        "version": package_version(),
    }
    count = 0
    with state.split_between_processes(trials) as mine:
        bar = tqdm(
            total=len(mine) * len(args.methods),
            desc=f"process {state.process_index}",
            position=state.process_index,
            disable=None,
        )
        for trial in mine:
            target = trial_target(args, trial)
            loss_of = seeded_loss(terms, guides, target, cutouts, args.cut_power)
            contest = Contest(model, loss_of, settings, scale, args.start_k, args.best_of)
            fields = {
                **common,
                "target": target_record(trial, target),
                "settings": asdict(replace(settings, seed=trial.seed)),
            }
            for _ in run_trial(contest, trial, args.methods, store, lambda made, fields=fields: fields):
                count += 1
                bar.update()
        bar.close()
    return count


def trial_target(args: argparse.Namespace, trial: Trial) -> Target:
    """The command line's target, with what the pair's record says instead."""
    record = trial.metadata
    target = cli_target(args, record.get("text") or trial.prompt)
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
