"""A run as a page shows it: every iteration's image, a status line and the loss curve, the best image so far,
and at the end unguided / one-step guidance / DOODL side by side. Also the examples' finished runs, stored
so that a page shows them at once. No interface code: the app maps `Shown` onto its widgets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from doodl.baseline import one_step_guidance
from doodl.capabilities import Crops, build_weighted, load_guides
from doodl.embedded import FLOW, SD, Examples, Preset
from doodl.optimize import Result, Step, doodl, invert_image, result_of
from doodl.serving import ROOT, ModelCache, Request, Serving, locate, preset_values, request

Progress = Callable[..., None]  # progress(fraction, desc=...), as gradio's tracker is called


def quiet(*_: Any, **__: Any) -> None:
    """Progress reporting that reports nothing (examples computed in advance, tests)."""


@dataclass(frozen=True)
class Shown:
    """What the page shows of a run at one moment; images are file paths (`RunImages`)."""

    preview: str | None
    status: str
    losses: tuple[float, ...]
    best: str | None
    gallery: tuple[tuple[str, str], ...] | None  # (image, caption); None: unchanged since the last update
    # A weighted sum of guides: each weighted term's value at every iteration (they add up to `losses`).
    terms: tuple[tuple[str, tuple[float, ...]], ...] = ()
    iterations: tuple[tuple[str, str], ...] = ()  # every iteration's image so far, with its caption


STARTING = Shown(None, "Loading models and starting...", (), None, ())


# Iterations are numbered from 1 everywhere on the page, as the command line does: iteration 1 is the
# unguided image of the initial noise, each later one follows one update of it.
def number(step: Step) -> int:
    return step.iteration + 1


def status_line(result: Result, total: int, done: bool = False) -> str:
    best, last = result.best, result.last
    state = "Done: iteration" if done else "Iteration"
    return (
        f"{state} {number(last)} of {total}: loss {last.loss:.4f}, "
        f"best {best.loss:.4f} (iteration {number(best)}), {last.seconds:.1f} s"
    )


# Every run writes its images into a folder of its own, each image once. Gradio stores a PIL image at a path
# named by its bytes, rewriting the file in place each time: two runs making the same image (identical
# requests) rewrote a file while it was being served, and a visitor got a truncated one.
RUN_FOLDERS = Path(tempfile.gettempdir()) / "doodl-runs"
# A page copies each update's files as the update is sent, so a folder this old is no longer read; the
# next run removes it.
RUN_FOLDER_SECONDS = 3600


class RunImages:
    """One run's images as PNG files in a new folder; the same image object is written once."""

    def __init__(self, root: Path = RUN_FOLDERS) -> None:
        root.mkdir(parents=True, exist_ok=True)
        remove_old_folders(root, RUN_FOLDER_SECONDS)
        self.folder = Path(tempfile.mkdtemp(dir=root))
        self._paths: dict[int, tuple[Image.Image, str]] = {}  # keeps each image alive, so ids stay unique

    def path(self, image: Image.Image | None) -> str | None:
        if image is None:
            return None
        if id(image) not in self._paths:
            path = self.folder / f"{len(self._paths)}.png"
            image.save(path)
            self._paths[id(image)] = (image, str(path))
        return self._paths[id(image)][1]


def remove_old_folders(root: Path, seconds: float) -> None:
    now = time.time()
    for folder in root.iterdir():
        with suppress(OSError):  # another process may be removing it too
            if folder.is_dir() and now - folder.stat().st_mtime > seconds:
                shutil.rmtree(folder)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(asked: Request, models: ModelCache, progress: Progress = quiet) -> Iterator[Shown]:
    """Load what a checked request needs, run DOODL and show every iteration; with the side-by-side on,
    end with the unguided, one-step-guided and DOODL images from the same initial noise. Every update
    carries the best image so far, so a stopped run keeps it."""
    yield STARTING
    progress(0, desc="loading models")
    guides = load_guides([name for name, _ in asked.terms], asked.guides, models.guide)
    options = asked.options

    def make_loss(generator: torch.Generator):
        crops = Crops(options.cutouts, generator=generator)
        return build_weighted(asked.terms, guides, asked.target, crops)

    # Built before the generator loads: a bad target (an unknown class) fails now. The loss's crops are
    # drawn from a generator seeded by the run's seed: same seed, same run.
    loss = make_loss(seeded(options.settings.seed))
    model = models.pipeline(asked.model, asked.vae)
    init = None
    if asked.photo is not None:
        progress(0, desc="inverting the photo with EDICT")
        init = invert_image(model, asked.photo, asked.prompt, options.settings)
    total, steps, files = options.settings.iterations, [], RunImages()
    starts = options.settings.samples_to_start(from_photo=init is not None)
    if starts > 1:
        progress(0, desc=f"sampling {starts} starts, keeping the one the guide prefers")
    for step in doodl(model, asked.prompt, loss, options.settings, init):
        steps.append(step)
        progress(number(step) / total, desc=f"DOODL iteration {number(step)}/{total}")
        result, (terms, iterations) = result_of(steps), what_happened(steps, files)
        status = status_line(result, total)
        preview, best = files.path(step.image), files.path(result.image)
        yield Shown(preview, status, tuple(result.losses), best, None, terms, iterations)
    result, gallery = result_of(steps), ()
    if options.compare:
        progress(1.0, desc="one-step guidance, for comparison")
        # From DOODL's start: with start_samples > 1, the chosen sample's seed.
        start = replace(options.settings, seed=steps[0].seed, start_samples=1)
        one_step = one_step_guidance(
            model, asked.prompt, make_loss(seeded(start.seed)), options.one_step_scale, start, init
        )
        photo = asked.photo
        gallery = (
            *([(files.path(photo), "Uploaded photo")] if photo is not None else []),
            # DOODL's iteration 1 is the unguided sample (or, from a photo, its EDICT reconstruction).
            (files.path(steps[0].image), unguided_caption(starts, photo is not None)),
            (files.path(one_step), f"One-step guidance, scale {options.one_step_scale:g}"),
            (files.path(result.image), f"DOODL, iteration {number(result.best)}"),
        )
    status = status_line(result, total, done=True)
    preview, best = files.path(result.last.image), files.path(result.image)
    yield Shown(preview, status, tuple(result.losses), best, gallery, terms, iterations)


def what_happened(
    steps: Sequence[Step], files: RunImages
) -> tuple[tuple[tuple[str, tuple[float, ...]], ...], tuple[tuple[str, str], ...]]:
    """(each weighted term's curve, every iteration's image with its caption) of the steps so far."""
    names = list(steps[0].terms)
    terms = tuple((name, tuple(step.terms[name] for step in steps)) for name in names)
    iterations = tuple((files.path(step.image), f"{number(step)}: loss {step.loss:.4f}") for step in steps)
    return terms, iterations


def unguided_caption(starts: int, from_photo: bool) -> str:
    if from_photo:
        return "Unguided reconstruction"
    return "Unguided" if starts == 1 else f"Unguided, the best of {starts} samples by the guide"


# --- examples -------------------------------------------------------------------------------------

# Each tab's examples say what to compare in the side by side, which shows every example's run.
LOOK_AT = {
    "text": "Examples: in the side by side, check each image against the prompt: its colors, its shapes, "
    "and which one is above or left of the other.",
    "vocabulary": "Examples: in the side by side, compare the shape's shade with the target's swatch above: "
    "the prompt cannot name the shade, the classifier can.",
    "personalization": "Examples: in the side by side, compare each image's shape and color with the "
    "reference image's.",
    "aesthetic": "Examples: in the side by side, look for what the scorer rewards: a whole shape near the "
    "middle, of a fair size, standing out from its background.",
}


def example_notes(tab: str, shown: Sequence[Examples]) -> str:
    """What each of a tab's examples shows, numbered as the page lists them, as `benchmarks/examples.py`
    judged its stored run."""
    parts, first = [], 1
    for examples in shown:
        notes = examples.notes[tab]
        if not notes:
            parts.append(f"Drawn by {examples.drawn_by}: none, no candidate shows DOODL ({examples.report}).")
            continue
        numbered = "\n".join(f"{i}. {note}" for i, note in enumerate(notes, first))
        parts.append(
            f"Drawn by {examples.drawn_by} (judged from the pixels: {examples.report}):\n\n{numbered}"
        )
        first += len(notes)
    return "What the examples show. " + "\n\n".join(parts)


def example_request(serving: Serving, tab: str, row: Sequence[Any], preset: Preset) -> Request:
    """An example of a tab (a row of `doodl.embedded.Examples`: prompt, the tab's input if it has one, seed)
    as a run of the host's models at the tab's preset."""
    prompt, seed, given = row[0], row[-1], row[1] if len(row) > 2 else None
    settings = {**preset_values(preset), "compare": True, "seed": seed}
    extra = {
        "text": {},
        "vocabulary": {"target_class": given},
        "personalization": {"references": given},
        "aesthetic": {"photo": given},
    }[tab]
    return request(serving, tab, serving.names.sd, prompt, {}, settings, **extra)


# What a stored run holds and how (raise it when that changes).
STORE_FORMAT = 4


def models_digest(serving: Serving) -> str:
    """The embedded models' content, for the store's key; other models are known by their names only."""
    if not serving.embedded():
        return ""
    generator = Path(locate(serving.names.sd))
    others = [path.name for path in (SD, FLOW) if path.resolve() != generator.resolve()]
    return folder_digest(generator.parent, skip=others)  # the other generator changes none of its runs


def folder_digest(folder: Path, skip: Sequence[str] = ()) -> str:
    """A hash of every file's path and bytes under `folder` but its subfolders named in `skip`, its training
    logs (.txt) aside: they change no output. Linked folders are followed, so a folder of links to the models
    hashes as the models do."""
    digest, skipped = hashlib.sha256(), set(skip)
    files = [
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)
        if not skipped & set(Path(root).relative_to(folder).parts[:1])
        for name in names
    ]
    for path in sorted(files):
        if path.suffix != ".txt":
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def store_key(serving: Serving) -> str:
    """Names the examples' runs by all they depend on: the models, each tab's settings and the examples.
    Another model or budget never shows stale images."""
    presets = {tab: preset.key() for tab, preset in serving.presets().items()}
    key = repr((serving.names, presets, serving.examples().rows, models_digest(serving), STORE_FORMAT))
    return hashlib.sha256(key.replace(str(ROOT), ".").encode()).hexdigest()[:16]


SHIPPED_EXAMPLES = ROOT / "assets" / "cached_examples"
LOCAL_EXAMPLES = Path(tempfile.gettempdir()) / "doodl-examples"


class ExampleStore:
    """The examples' finished runs of one configuration, a folder per example: its images and a run.json.

    The embedded models' store ships in assets/cached_examples (`python app.py --cache-examples`); any
    other configuration's is filled as visitors click its examples."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def of(cls, serving: Serving) -> ExampleStore:
        """The shipped store of this configuration if there is one, else a local one."""
        shipped = cls.shipped(serving)
        return shipped if shipped.folder.is_dir() else cls(LOCAL_EXAMPLES / shipped.folder.name)

    @classmethod
    def shipped(cls, serving: Serving) -> ExampleStore:
        return cls(SHIPPED_EXAMPLES / store_key(serving))

    def _place(self, tab: str, index: int) -> Path:
        return self.folder / tab / str(index)

    def load(self, tab: str, index: int) -> Shown | None:
        place = self._place(tab, index)
        if not (place / "run.json").is_file():
            return None
        run = json.loads((place / "run.json").read_text())
        return Shown(
            str(place / run["preview"]),
            run["status"],
            tuple(run["losses"]),
            str(place / run["best"]),
            tuple((str(place / image), caption) for image, caption in run["gallery"]),
            tuple((name, tuple(curve)) for name, curve in run["terms"]),
            tuple((str(place / image), caption) for image, caption in run["iterations"]),
        )

    def save(self, tab: str, index: int, shown: Shown) -> None:
        """Store a finished run, whole or not at all: written aside, then renamed into place."""
        place = self._place(tab, index)
        place.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=place.parent))
        gallery = shown.gallery or ()
        images = {"preview.png": shown.preview, "best.png": shown.best}
        images |= {f"{i}.png": image for i, (image, _) in enumerate(gallery)}
        steps = [(f"iteration-{i}.png", *item) for i, item in enumerate(shown.iterations, 1)]
        images |= {name: image for name, image, _ in steps}
        for name, source in images.items():
            shutil.copyfile(source, staging / name)
        run = {
            "status": shown.status,
            "losses": list(shown.losses),
            "preview": "preview.png",
            "best": "best.png",
            "gallery": [(f"{i}.png", caption) for i, (_, caption) in enumerate(gallery)],
            "terms": [(name, list(curve)) for name, curve in shown.terms],
            "iterations": [(name, caption) for name, _, caption in steps],
        }
        (staging / "run.json").write_text(json.dumps(run, indent=1))
        shutil.rmtree(place, ignore_errors=True)
        with suppress(OSError):  # another process stored the same run first: its copy is as good
            staging.rename(place)
        shutil.rmtree(staging, ignore_errors=True)

    def complete(self, rows: dict[str, list[list[Any]]]) -> bool:
        """Whether every example of every tab is stored."""
        return all(self.load(tab, i) is not None for tab, each in rows.items() for i in range(len(each)))


@dataclass(frozen=True)
class Showcase:
    """The examples a page lists: those of each generator the host serves (`Serving.generators`), the host's
    first, each generator with the serving that runs its examples and the store of their runs."""

    servings: tuple[Serving, ...]
    stores: tuple[ExampleStore, ...]

    @classmethod
    def of(cls, serving: Serving) -> Showcase:
        servings = tuple(serving.with_generator(generator) for generator in serving.generators())
        return cls(servings, tuple(ExampleStore.of(each) for each in servings))

    def several(self) -> bool:
        """Whether the page lists the examples of more than one generator (each row then names its own)."""
        return len(self.servings) > 1

    def rows(self, tab: str) -> list[list[Any]]:
        """A tab's examples as the page lists them: the generator first where there are several."""
        lead = self.several()
        return [
            [serving.names.sd, *row] if lead else row
            for serving in self.servings
            for row in serving.examples().rows[tab]
        ]

    def find(self, tab: str, index: int) -> tuple[Serving, ExampleStore, int]:
        """The example listed at `index`: its generator's serving and store, and its place among that
        generator's examples."""
        for serving, store in zip(self.servings, self.stores, strict=True):
            count = len(serving.examples().rows[tab])
            if index < count:
                return serving, store, index
            index -= count
        raise IndexError(f"no example {index} in the {tab} tab")

    def complete(self) -> bool:
        """Whether every example's run is stored."""
        return all(
            store.complete(serving.examples().rows)
            for serving, store in zip(self.servings, self.stores, strict=True)
        )

    def notes(self, tab: str) -> str:
        return example_notes(tab, [serving.examples() for serving in self.servings])


def final(updates: Iterator[Shown]) -> Shown:
    *_, last = updates
    return last


def build_examples(serving: Serving, store: ExampleStore, models: ModelCache) -> None:
    """Run every example of every tab not stored yet at the tab's preset, and store it (a store is keyed by
    all its runs depend on: those stored are today's)."""
    for tab, preset in serving.presets().items():
        for index, row in enumerate(serving.examples().rows[tab]):
            if store.load(tab, index) is not None:
                continue
            shown = final(run(example_request(serving, tab, row, preset), models))
            store.save(tab, index, shown)
