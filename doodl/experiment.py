"""Methods compared at matched compute: the runner under `python -m doodl batch` and the quality benchmark.

Each (prompt, seed) pair is a `Trial`; every method makes one image of it from the noise of its seed, and is
judged by the guide's loss on the pair's own views, drawn afresh from its seed: two methods differ only by
what they do. Cost is counted in UNet passes (`count_unet_calls`: a backward through a call is one more).

- unguided: one sample.
- one-step: one-step guidance at the contest's scale (`doodl.baseline`).
- doodl: DOODL from the pair's own noise, as the paper runs it.
- best-of-k: random search, the guide's pick of K samples, K as many as DOODL's passes pay for (`matched_k`)
  unless fixed; the pair's own seed is the first candidate.
- best-of-k+doodl: DOODL from the best of k samples (the app's presets' `start_samples`), those samples'
  passes on top of DOODL's.

Outcomes lie in GenEval's layout, one tree per method: ROOT/<method>/<index:05d>/metadata.jsonl,
samples/<seed:04d>.png and records/<seed:04d>.json; ROOT/key.json says what they were made with. A record on
disk is a finished result (the image is written first, each file under a temporary name then renamed), so a
stopped run resumes where it stood.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from doodl.baseline import matched_k, one_step_guidance
from doodl.chain import denoise
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, best_of_samples, conditioning, initial_latents, optimize, sample
from doodl.pipeline import LatentDiffusion, count_unet_calls, to_tensor

METHODS = ("unguided", "one-step", "doodl", "best-of-k", "best-of-k+doodl")
BASELINE = "unguided"  # what paired differences are taken from


@dataclass(frozen=True)
class Trial:
    """One (prompt, seed) pair: every method makes one image of it."""

    index: int  # the prompt's place in its set
    prompt: str
    seed: int
    metadata: Mapping[str, Any] = field(default_factory=dict)  # what GenEval's evaluator reads of the prompt


@dataclass(frozen=True)
class Contest:
    """What every method of a trial runs with."""

    model: LatentDiffusion
    loss_of: Callable[[int], Loss]  # seed -> the guide's loss, its random views drawn from that seed
    settings: DoodlSettings  # the trial's seed replaces theirs
    one_step_scale: float
    start_k: int = 4  # samples best-of-k+doodl picks its start from
    best_of: int | None = None  # best-of-k's K; None: as many samples as DOODL's passes pay for


@dataclass(frozen=True)
class Made:
    image: Image.Image
    loss: float  # the guide's, on the final image, with the trial's own views: comparable across methods
    passes: int
    extra: dict[str, Any]


def judged(contest: Contest, seed: int, image: Image.Image) -> float:
    with torch.no_grad():
        return float(contest.loss_of(seed)(to_tensor(image, image.size)))


def sample_passes(contest: Contest, trial: Trial) -> int:
    """UNet passes of one unguided sample: the chain alone, not decoded."""
    settings = replace(contest.settings, seed=trial.seed)
    eps = conditioning(contest.model, trial.prompt, settings)
    x, y = initial_latents(contest.model, settings)
    with count_unet_calls(contest.model.denoiser) as calls, torch.no_grad():
        denoise(settings, eps, x, y, contest.model)
    return calls.passes


def best_of_k(contest: Contest, trial: Trial, before: Mapping[str, Mapping[str, Any]]) -> int:
    """K of best-of-k: the contest's, or as many samples as DOODL's passes on this trial pay for."""
    if contest.best_of is not None:
        return contest.best_of
    if "doodl" not in before:
        raise ValueError("best-of-k matches DOODL's UNet passes: run doodl too, or fix K")
    per_sample = before["unguided"]["unet_calls"] if "unguided" in before else sample_passes(contest, trial)
    return matched_k(before["doodl"]["unet_calls"], per_sample)


def make(method: str, contest: Contest, trial: Trial, before: Mapping[str, Mapping[str, Any]]) -> Made:
    """One method's image of a trial; `before` holds the records of the trial's earlier methods."""
    model, prompt, seed = contest.model, trial.prompt, trial.seed
    settings = replace(contest.settings, seed=seed, start_samples=1)
    k = best_of_k(contest, trial, before) if method == "best-of-k" else 0  # sizing it costs it nothing
    extra: dict[str, Any] = {}
    with count_unet_calls(model.denoiser) as calls:
        if method == "unguided":
            image = sample(model, prompt, settings)
        elif method == "one-step":
            image = one_step_guidance(model, prompt, contest.loss_of(seed), contest.one_step_scale, settings)
            extra = {"one_step_scale": contest.one_step_scale}
        elif method in ("doodl", "best-of-k+doodl"):
            if method == "best-of-k+doodl":
                settings = replace(settings, start_samples=contest.start_k)
            result = optimize(model, prompt, contest.loss_of(seed), settings)
            image = result.image
            extra = {"curve": result.losses, "best_iteration": result.best.iteration + 1}
            extra["start_seed"] = result.best.seed
        elif method == "best-of-k":
            best = best_of_samples(model, prompt, lambda pixels: contest.loss_of(seed)(pixels), settings, k)
            image = best.image
            extra = {"candidates": k, "candidate_losses": list(best.losses), "chosen": best.chosen}
        else:
            raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}")
    return Made(image, judged(contest, seed, image), calls.passes, extra)


def run_trial(
    contest: Contest,
    trial: Trial,
    methods: Sequence[str],
    store: OutcomeStore,
    fields: Callable[[Made], Mapping[str, Any]] = lambda made: {},
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each asked method's record, read from the store or made and saved now, in `METHODS` order (DOODL
    before the random search that matches it). `fields` adds to a new record (an evaluator's score)."""
    # What sizes best-of-k, even when saved by an earlier run that did not ask for it again.
    before = store.records_of(trial, ("unguided", "doodl"))
    for method in sorted(set(methods), key=METHODS.index):
        record = before.get(method) or store.record(method, trial)
        if record is None:
            start = time.perf_counter()
            made = make(method, contest, trial, before)
            record = {
                "prompt": trial.prompt,
                "index": trial.index,
                "seed": trial.seed,
                "method": method,
                "loss": made.loss,
                "unet_calls": made.passes,
                "seconds": time.perf_counter() - start,
                **made.extra,
                **fields(made),
            }
            store.save(method, trial, record, made.image)
        before[method] = record
        yield method, record


# --- the outcome store ----------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def as_json(value: Any) -> Any:
    """The value as JSON reads it back: tuples become lists, paths strings."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class OutcomeStore:
    root: Path

    @classmethod
    def open(cls, root: Path, key: Mapping[str, Any], *, replace_other: bool = False) -> OutcomeStore:
        """The store at `root` for outcomes made with `key`. Outcomes made with another key are removed
        (`replace_other`) or refused: a resumed run never mixes settings."""
        root, key = Path(root), as_json(key)
        saved = root / "key.json"
        if saved.is_file() and json.loads(saved.read_text()) != key:
            if not replace_other:
                other = json.loads(saved.read_text())
                changed = sorted(k for k in key.keys() | other.keys() if key.get(k) != other.get(k))
                raise ValueError(
                    f"{root} holds outcomes made with other {', '.join(changed)}: use another folder"
                )
            shutil.rmtree(root)
        if not saved.is_file():
            write_atomically(saved, lambda p: p.write_text(json.dumps(key, indent=1)))
        return cls(root)

    def paths(self, method: str, trial: Trial) -> tuple[Path, Path]:
        """(image, record) of a result."""
        folder = self.root / method / f"{trial.index:05d}"
        return folder / "samples" / f"{trial.seed:04d}.png", folder / "records" / f"{trial.seed:04d}.json"

    def record(self, method: str, trial: Trial) -> dict[str, Any] | None:
        path = self.paths(method, trial)[1]
        return json.loads(path.read_text()) if path.is_file() else None

    def records_of(self, trial: Trial, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
        found = {method: self.record(method, trial) for method in methods}
        return {method: record for method, record in found.items() if record is not None}

    def image(self, method: str, trial: Trial) -> Image.Image | None:
        path = self.paths(method, trial)[0]
        return Image.open(path).convert("RGB") if path.is_file() else None

    def save(self, method: str, trial: Trial, record: Mapping[str, Any], image: Image.Image | None) -> None:
        """The image (if given), then the record: a record on disk means a finished result."""
        image_path, record_path = self.paths(method, trial)
        metadata = image_path.parent.parent / "metadata.jsonl"
        if not metadata.exists():
            line = json.dumps({"prompt": trial.prompt, **trial.metadata}) + "\n"
            write_atomically(metadata, lambda p: p.write_text(line))
        if image is not None:
            write_atomically(image_path, lambda p: image.save(p, format="PNG"))
        write_atomically(record_path, lambda p: p.write_text(json.dumps(record, indent=1, default=str)))

    def remove_leftovers(self) -> None:
        """Temporary files of a killed run: never results (`write_atomically`), so removed on restart."""
        for leftover in self.root.glob("**/.*.tmp"):
            leftover.unlink(missing_ok=True)

    def all_records(self) -> list[dict[str, Any]]:
        """Every finished result's record, with the path of its image."""
        records = []
        for path in sorted(self.root.glob("*/*/records/*.json")):
            record = json.loads(path.read_text())
            record["image"] = str(path.parent.parent / "samples" / f"{path.stem}.png")
            records.append(record)
        return records


# --- paired statistics ----------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class Paired:
    """ours - theirs over the trials both have."""

    mean: float
    se: float
    n: int
    higher: int  # trials where ours is higher
    lower: int

    @property
    def word(self) -> str:
        """A difference within two standard errors is a tie."""
        return "beats" if self.mean > 2 * self.se else "loses to" if self.mean < -2 * self.se else "ties with"


def paired(ours: Sequence[float], theirs: Sequence[float]) -> Paired:
    """The paired difference of two methods' values, trial by trial (equal lengths)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"pairs need values of the same trials, got {len(ours)} and {len(theirs)}")
    diffs = [a - b for a, b in zip(ours, theirs)]
    return Paired(*mean_se(diffs), len(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
