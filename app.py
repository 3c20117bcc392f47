"""The DOODL app: the paper's four demonstrations, one tab each, wired to the `doodl` package.

    python app.py [--model SD] [--clip CLIP] [--classifier CLASSIFIER] [--aesthetic-clip CLIP]
                  [--aesthetic-head FILE] [--host 127.0.0.1] [--port 7860] [--share]
                  [--allow-model-choice] [--max-steps N] [--max-iterations N] [--max-cutouts N] ...

Everything here is interface: sampling, optimization, losses and model loading live in `doodl`.
Models are loaded on first use and kept in `MODELS`, so importing this module loads none of them.
An app others can reach (a shared link, a non-loopback host, a Space) serves the host's models only,
within a per-run budget: see `Serving`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import gradio as gr
import pandas as pd
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image

from doodl import (
    MODES,
    DoodlSettings,
    LatentDiffusion,
    ModelLoadError,
    Step,
    doodl,
    invert_image,
    load_pipeline,
    one_step_guidance,
)
from doodl.embedded import EXAMPLES, Preset, is_embedded, presets
from doodl.guides import (
    HPS_ARCHITECTURE,
    Classifier,
    Clip,
    GuideNotFoundError,
    TransformersClip,
    load_aesthetic_head,
    load_classifier,
    load_clip,
    load_hps,
    load_pickscore,
)
from doodl.losses import (
    Loss,
    aesthetic_loss,
    classifier_loss,
    clip_image_loss,
    clip_text_loss,
    hps_loss,
    pickscore_loss,
)
from doodl.optimize import Result, result_of
from doodl.world.shapes import PALETTE, SHADE_NAMES

try:  # On a Hugging Face ZeroGPU Space, `spaces.GPU` lends a GPU to each run; elsewhere nothing is needed.
    import spaces
except ImportError:
    spaces = None

# ZeroGPU holds a GPU for the duration a run asks for. The estimate: the official code's ~10 s per 50-step
# iteration on an A100, i.e. 0.2 s per step and iteration; the one-step comparison costs about two
# iterations more, and loading the models a fixed start.
GPU_SECONDS_PER_STEP_ITERATION = 0.2
GPU_START_SECONDS = 30


def gpu_seconds(
    *inputs: Any, steps: float = 50, iterations: float = 50, compare: bool = True, **_: Any
) -> int:
    """Seconds a run with these settings holds a ZeroGPU GPU (`spaces.GPU` calls it with the run's inputs)."""
    work = float(steps) * (float(iterations) + (2 if compare else 0))
    return int(GPU_START_SECONDS + GPU_SECONDS_PER_STEP_ITERATION * work)


def gpu(function: Callable, duration: Callable[..., int] | int = gpu_seconds) -> Callable:
    return function if spaces is None else spaces.GPU(duration=duration)(function)


ROOT = Path(__file__).resolve().parent
EMBEDDED = "assets/embedded"  # relative to ROOT, as shown in the UI

# Larger uploads are refused before decoding: the model sees 64-1024 px, and a huge file only costs memory.
MAX_IMAGE_SIDE = 4096

TEXT_EXAMPLES, VOCABULARY_EXAMPLES, PERSONALIZATION_EXAMPLES, AESTHETIC_EXAMPLES = (
    EXAMPLES[name] for name in ("text", "vocabulary", "personalization", "aesthetic")
)

# Small models make small images: the UI scales them up, without blurring.
CSS = ".pixels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
IMAGE = {"format": "png", "interactive": False, "elem_classes": "pixels"}

# Seeds feed torch generators, which take 64-bit integers; the run draws its crops from seed + 1.
MAX_SEED = 2**63 - 1

# The errors `doodl` raises for bad input or a model it cannot load: shown to the user, never a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ModelLoadError, GuideNotFoundError)

CLIP_HELP = (
    "A folder (open_clip_config.json + weights), hf-hub:org/repo, or an architecture and tag: ViT-L-14 openai"
)
CLASSIFIER_HELP = "A transformers image classifier: a folder or hub id"
HEAD_HELP = "A linear head on the CLIP's image embeddings: a .safetensors or .pth file"


# --- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNames:
    """Where each model comes from (a folder, a file or a hub id); by default the embedded ones."""

    sd: str = f"{EMBEDDED}/sd"
    clip: str = f"{EMBEDDED}/clip"
    classifier: str = f"{EMBEDDED}/classifier"
    aesthetic_clip: str = f"{EMBEDDED}/clip"
    aesthetic_head: str = f"{EMBEDDED}/aesthetic/aesthetic_head.safetensors"
    # Reward models text guidance may use instead of CLIP; none unless the host names them.
    pickscore: str = ""  # a transformers CLIPModel folder or hub id
    pickscore_processor: str = ""  # its CLIP processor; blank: the model's own
    hps: str = ""  # an HPSv2 checkpoint file
    hps_architecture: str = HPS_ARCHITECTURE

    def text_guides(self) -> list[str]:
        """The guides text guidance offers: CLIP, and the reward models the host named."""
        return ["CLIP"] + ["PickScore"] * bool(self.pickscore) + ["HPSv2"] * bool(self.hps)


# How each model field is named in messages, keyed by `ModelNames`' fields.
MODEL_KINDS = {
    "sd": "Stable Diffusion model",
    "clip": "CLIP model",
    "classifier": "classifier",
    "aesthetic_clip": "CLIP model of the scorer",
    "aesthetic_head": "aesthetic head",
}


@dataclass(frozen=True)
class Serving:
    """What the host serves and what visitors may ask of it: the models, whether they may name others,
    and the most work one run may cost (None: no limit). `public()` gives the defaults of an app that
    others can reach; the default instance is a local app's: anything goes."""

    names: ModelNames = ModelNames()
    allow_model_choice: bool = True
    max_steps: int | None = None
    max_iterations: int | None = None
    max_cutouts: int | None = None
    max_references: int | None = None
    queue_size: int | None = None  # runs waiting for the device beyond the one running
    max_file_size: str | None = None  # of an upload, in gradio's notation ("8mb"); checked before saving

    @classmethod
    def public(cls, names: ModelNames = ModelNames(), **overrides: Any) -> Serving:
        """The host's models only, and runs of about a minute: on two CPU cores, the embedded model's
        presets (20 steps x 10 iterations, ~50-65 s per tab: benchmarks/results/default-runs.md); on a GPU,
        a real model's 50 steps x 8 iterations (~10 s per iteration for the official code on an A100)."""
        embedded = is_embedded(locate(names.sd))
        defaults = {
            "allow_model_choice": False,
            "max_steps": 20 if embedded else 50,
            "max_iterations": 10 if embedded else 8,
            "max_cutouts": 16,
            "max_references": 8,
            "queue_size": 10,
            "max_file_size": "8mb",
        }
        chosen = {name: value for name, value in overrides.items() if value is not None}
        return cls(names, **{**defaults, **chosen})

    def model(self, kind: str, requested: str | None) -> str:
        """The model a run may use for `kind` (a `ModelNames` field) when a visitor asks for `requested`.

        Without model choice, only the host's is served (a blank field means it too), and the refusal says
        nothing of the requested name: whether a file exists on the server is not a visitor's business."""
        if self.allow_model_choice:
            return required(requested, MODEL_KINDS[kind])
        chosen = getattr(self.names, kind)
        if requested is None or requested.strip() in ("", chosen):
            return chosen
        raise ValueError(
            f"this app serves the {MODEL_KINDS[kind]} its host chose, {chosen}; visitors cannot name "
            "another (the host allows it with --allow-model-choice)"
        )

    def check(self, options: RunOptions, references: int = 0) -> None:
        """Refuse a run that asks for more than the host allows, naming the limit."""
        limits = [
            ("steps", options.settings.steps, self.max_steps, "--max-steps"),
            ("iterations", options.settings.iterations, self.max_iterations, "--max-iterations"),
            ("cutouts", options.cutouts, self.max_cutouts, "--max-cutouts"),
            ("reference images", references, self.max_references, "--max-references"),
        ]
        for name, value, limit, flag in limits:
            if limit is not None and value > limit:
                raise ValueError(
                    f"{name}={value} is over this app's limit of {limit} per run (set by the host: {flag})"
                )

    def within_budget(self, preset: Preset) -> Preset:
        """A tab's preset, cut down to the budget so that its defaults always run."""
        settings = preset.settings
        steps, iterations = settings.steps, settings.iterations
        settings = replace(
            settings,
            steps=min(steps, self.max_steps or steps),
            iterations=min(iterations, self.max_iterations or iterations),
        )
        return replace(
            preset, settings=settings, cutouts=min(preset.cutouts, self.max_cutouts or preset.cutouts)
        )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def on_space() -> bool:
    """Whether the app runs on a Hugging Face Space (which sets SPACE_ID in every Space's environment)."""
    return bool(os.environ.get("SPACE_ID"))


def reachable_by_others(host: str, share: bool) -> bool:
    return share or host not in LOOPBACK or on_space()


def pick_device() -> tuple[str, torch.dtype]:
    """The GPU in half precision when there is one, else the CPU in full precision."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def locate(name: str) -> str:
    """A model name as given, or, for a relative path found in the app's folder (like the defaults), that
    path: the app then runs from any working directory."""
    name = name.strip()
    if Path(name).expanduser().exists() or not (ROOT / name).exists():
        return name
    return str(ROOT / name)


def clip_reference(text: str) -> tuple[str, str | None]:
    """Split 'ViT-L-14 openai' into an open_clip architecture and its pretrained tag; pass paths whole."""
    text = locate(text)
    if text.startswith(("hf-hub:", "local-dir:")) or Path(text).expanduser().exists():
        return text, None
    name, _, pretrained = text.partition(" ")
    return name, pretrained.strip() or None


class ModelCache:
    """Models loaded on first use and kept, keyed by (kind, name, device).

    The least recently used model is dropped beyond `capacity`, so that trying models in the UI does not
    pile up copies in GPU memory; the default leaves room for the paper's set (SD, two CLIPs, a classifier,
    a head). A model that fails to load is not remembered: fixing its name and retrying works.
    """

    def __init__(self, device: str, dtype: torch.dtype, capacity: int = 6) -> None:
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self._models: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # the class-list lookup and a run may ask for the same model at once

    def get(self, kind: str, name: str, load: Callable[[], Any]) -> Any:
        key = (kind, name, self.device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= self.capacity:  # make room first: peak memory stays at capacity
                self._models.popitem(last=False)
            self._models[key] = load()
            return self._models[key]

    def pipeline(self, name: str) -> LatentDiffusion:
        name = locate(required(name, "Stable Diffusion model"))
        return self.get("sd", name, lambda: load_pipeline(name, self.device, self.dtype))

    def clip(self, name: str) -> Clip:
        model, pretrained = clip_reference(required(name, "CLIP model"))
        return self.get("clip", locate(name), lambda: load_clip(model, pretrained, self.device, self.dtype))

    def classifier(self, name: str) -> Classifier:
        name = locate(required(name, "classifier"))
        return self.get("classifier", name, lambda: load_classifier(name, self.device, self.dtype))

    def aesthetic_head(self, path: str) -> torch.nn.Linear:
        path = locate(required(path, "aesthetic head"))
        return self.get("aesthetic-head", path, lambda: load_aesthetic_head(path).to(self.device))

    def pickscore(self, name: str, processor: str) -> TransformersClip:
        name, processor = locate(name), locate(processor) if processor else None
        key = f"{name} {processor or ''}"
        return self.get("pickscore", key, lambda: load_pickscore(name, processor, self.device, self.dtype))

    def hps(self, checkpoint: str, architecture: str) -> Clip:
        path = locate(checkpoint)
        return self.get("hps", path, lambda: load_hps(path, architecture, self.device, self.dtype))


MODELS = ModelCache(*pick_device())
LOCAL = Serving()

# The run functions' `progress` default: gradio sees it and passes each run a tracker of its own.
PROGRESS = gr.Progress()


# --- inputs ---------------------------------------------------------------------------------------


@contextmanager
def user_errors() -> Iterator[None]:
    """Show what went wrong with the user's input or models as a message in the UI."""
    try:
        yield
    except USER_ERRORS as error:
        raise gr.Error(str(error), print_exception=False) from error


def required(text: str | None, what: str, hint: str = "") -> str:
    if not text or not text.strip():
        raise ValueError(f"the {what} is empty" + (f": {hint}" if hint else ""))
    return text.strip()


def required_prompt(prompt: str | None) -> str:
    return required(prompt, "prompt", "describe the image to generate")


def read_image(path: str | Path, what: str) -> Image.Image:
    """Open an uploaded image, refusing files that are not images or are too large to decode safely."""
    name = Path(path).name
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before decoding
            if max(image.size) > MAX_IMAGE_SIDE:
                raise ValueError(
                    f"the {what} {name} is {image.width}x{image.height} px: "
                    f"the largest side allowed is {MAX_IMAGE_SIDE} px"
                )
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"the {what} {name} is not an image that can be read (PNG, JPEG, WebP...)"
        ) from error


@dataclass(frozen=True)
class RunOptions:
    """A run's DOODL settings, plus what the app adds: the loss's crops and the side-by-side view."""

    settings: DoodlSettings
    cutouts: int
    compare: bool
    one_step_scale: float


def run_options(
    steps: float,
    iterations: float,
    learning_rate: float,
    grad_clip: float,
    p: float,
    guidance_scale: float,
    cutouts: float,
    seed: float,
    mode: str,
    compare: bool,
    one_step_scale: float,
    height: float | None = None,
    width: float | None = None,
) -> RunOptions:
    """Settings from the accordion's widgets; DoodlSettings and the model name any value out of range.
    A height or width of 0 (or none) is the model's own."""
    given = {name: value for name, value in locals().items() if name not in ("height", "width")}
    blank = [name for name, value in given.items() if value is None]  # an API call may send nulls
    if blank:
        raise ValueError(f"setting {blank[0]} is empty")
    if cutouts < 0:
        raise ValueError(f"setting cutouts={cutouts!r} is out of range: 0 (whole image) or more crops")
    if one_step_scale < 0:
        raise ValueError(f"setting one_step_scale={one_step_scale!r} is out of range: it must be 0 or more")
    if not 0 <= seed <= MAX_SEED or seed != int(seed):
        raise ValueError(f"setting seed={seed!r} is out of range: a whole number from 0 to {MAX_SEED}")
    settings = DoodlSettings(
        steps=int(steps),
        iterations=int(iterations),
        learning_rate=float(learning_rate),
        grad_clip=float(grad_clip),
        p=float(p),
        guidance_scale=float(guidance_scale),
        seed=int(seed),
        mode=mode,
        height=whole(height, "height") or None,
        width=whole(width, "width") or None,
    )
    return RunOptions(settings, int(cutouts), bool(compare), float(one_step_scale))


def whole(value: float | None, name: str) -> int:
    if value is None:
        return 0
    if value != int(value):
        raise ValueError(f"setting {name}={value!r} is not a whole number of pixels")
    return int(value)


# --- running --------------------------------------------------------------------------------------

# What every run streams, in the order of `Outputs.components`: the current iteration's image, a status
# line, the loss curve, the best image so far, and the side-by-side comparison.
Update = tuple[Any, str, Any, Any, Any]
LossFactory = Callable[[torch.Generator], Loss]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Iterations are numbered from 1 everywhere on the page, as the command line does: iteration 1 is the
# unguided image of the initial noise, each later one follows one update of it.
def number(step: Step) -> int:
    return step.iteration + 1


def loss_curve(losses: Sequence[float]) -> pd.DataFrame:
    return pd.DataFrame({"iteration": range(1, len(losses) + 1), "loss": losses})


# Every run writes its images into a folder of its own, each image once, and hands gradio their paths. Gradio
# stores a PIL image at a path named by its bytes, rewriting the file in place each time: two runs making the
# same image (identical requests) rewrote a file while it was being served, and a visitor got a truncated
# one. A file path it copies into its cache under a temporary name, then renames: never seen half-written.
RUN_FOLDERS = Path(tempfile.gettempdir()) / "doodl-runs"
# Gradio copies each update's files as the update is sent (cached examples: as the run returns), so a
# folder this old is no longer read; the next run removes it.
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


def status_line(result: Result, total: int, done: bool = False) -> str:
    best, last = result.best, result.last
    state = "Done: iteration" if done else "Iteration"
    return (
        f"{state} {number(last)} of {total}: loss {last.loss:.4f}, "
        f"best {best.loss:.4f} (iteration {number(best)}), {last.seconds:.1f} s"
    )


def stream_doodl(
    model: LatentDiffusion,
    prompt: str,
    make_loss: LossFactory,
    options: RunOptions,
    progress: gr.Progress,
    init: Any = None,
    photo: Image.Image | None = None,
) -> Iterator[Update]:
    """Run DOODL and stream every iteration; each update carries the best image so far, so a stopped
    run keeps it. With `compare`, end with the unguided, one-step-guided and DOODL images side by side."""
    total = options.settings.iterations
    steps: list[Step] = []
    files = RunImages()
    # The loss's crops are drawn from a generator seeded by the run's seed: same seed, same run.
    for step in doodl(model, prompt, make_loss(seeded(options.settings.seed)), options.settings, init):
        steps.append(step)
        progress(number(step) / total, desc=f"DOODL iteration {number(step)}/{total}")
        result = result_of(steps)
        status, curve = status_line(result, total), loss_curve(result.losses)
        yield files.path(step.image), status, curve, files.path(result.image), gr.skip()
    result = result_of(steps)
    gallery = []
    if options.compare:
        progress(1.0, desc="one-step guidance, for comparison")
        one_step = one_step_guidance(
            model,
            prompt,
            make_loss(seeded(options.settings.seed)),
            options.one_step_scale,
            options.settings,
            init,
        )
        gallery = [
            *([(files.path(photo), "Uploaded photo")] if photo is not None else []),
            # DOODL's iteration 0 is the unguided sample (or, from a photo, its EDICT reconstruction).
            (files.path(steps[0].image), "Unguided" if photo is None else "Unguided reconstruction"),
            (files.path(one_step), f"One-step guidance, scale {options.one_step_scale:g}"),
            (files.path(result.image), f"DOODL, iteration {number(result.best)}"),
        ]
    status = status_line(result, total, done=True)
    yield files.path(result.last.image), status, loss_curve(result.losses), files.path(result.image), gallery


def starting(progress: gr.Progress) -> Update:
    """The first update of a run: clear the previous run's results while models load."""
    progress(0, desc="loading models")
    return None, "Loading models and starting...", None, None, []


@gpu
def text_guidance(
    model: str,
    prompt: str,
    clip: str,
    guide: str = "CLIP",
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 1: steer the image towards the prompt by CLIP similarity, or by a reward model's
    score of the image for the prompt (PickScore, HPSv2) when the host provides one."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        serving.check(options)
        model, clip = serving.model("sd", model), serving.model("clip", clip)
        names = serving.names
        if guide not in names.text_guides():
            raise ValueError(
                f"guide {guide!r} is not served here: choose one of {', '.join(names.text_guides())}"
            )
        yield starting(progress)
        if guide == "PickScore":
            reward = MODELS.pickscore(names.pickscore, names.pickscore_processor)
            score = partial(pickscore_loss, reward)
        elif guide == "HPSv2":
            score = partial(hps_loss, MODELS.hps(names.hps, names.hps_architecture))
        else:
            score = partial(clip_text_loss, MODELS.clip(clip))
        pipeline = MODELS.pipeline(model)

        def make_loss(generator: torch.Generator) -> Loss:
            return score(prompt, cutouts=options.cutouts, generator=generator)

        yield from stream_doodl(pipeline, prompt, make_loss, options, progress)


@gpu
def vocabulary_expansion(
    model: str,
    prompt: str,
    classifier: str,
    target: str,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 2: a generic prompt, steered to a class the classifier knows and the text does not."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        serving.check(options)
        model, classifier = serving.model("sd", model), serving.model("classifier", classifier)
        target = required(target, "target class")
        yield starting(progress)
        guide = MODELS.classifier(classifier)
        guide.class_index(target)  # an unknown class fails now, naming close ones, not after loading SD
        pipeline = MODELS.pipeline(model)

        def make_loss(generator: torch.Generator) -> Loss:
            return classifier_loss(guide, target, cutouts=options.cutouts, generator=generator)

        yield from stream_doodl(pipeline, prompt, make_loss, options, progress)


@gpu
def personalization(
    model: str,
    prompt: str,
    references: list[str] | None,
    clip: str,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 3: the scene of the prompt, with the entity of the reference images (CLIP vision)."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        if not references:
            raise ValueError("no reference image: upload at least one image of the entity to draw")
        serving.check(options, references=len(references))
        model, clip = serving.model("sd", model), serving.model("clip", clip)
        images = [read_image(path, "reference image") for path in references]
        yield starting(progress)
        guide, pipeline = MODELS.clip(clip), MODELS.pipeline(model)

        def make_loss(generator: torch.Generator) -> Loss:
            return clip_image_loss(guide, images, cutouts=options.cutouts, generator=generator)

        yield from stream_doodl(pipeline, prompt, make_loss, options, progress)


@gpu
def aesthetic(
    model: str,
    prompt: str,
    photo: str | None,
    clip: str,
    head: str,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 4: raise the predicted aesthetic score of a generated image, or of an uploaded photo
    after EDICT inversion (the prompt then describes the photo)."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        serving.check(options)
        model = serving.model("sd", model)
        clip, head = serving.model("aesthetic_clip", clip), serving.model("aesthetic_head", head)
        image = read_image(photo, "photo") if photo else None
        yield starting(progress)
        guide, scorer, pipeline = MODELS.clip(clip), MODELS.aesthetic_head(head), MODELS.pipeline(model)
        init = None
        if image is not None:
            progress(0, desc="inverting the photo with EDICT")
            init = invert_image(pipeline, image, prompt, options.settings)

        def make_loss(generator: torch.Generator) -> Loss:
            return aesthetic_loss(guide, scorer, cutouts=options.cutouts, generator=generator)

        yield from stream_doodl(pipeline, prompt, make_loss, options, progress, init, image)


def class_labels(classifier: str) -> list[str]:
    """The classifier's labels; one that will not load only warns (the user may be typing its path), and
    the run will report why."""
    try:
        return list(MODELS.classifier(classifier).labels)
    except USER_ERRORS as error:
        gr.Warning(str(error))
        return []


def class_choices(classifier: str, target: str | None) -> gr.Dropdown:
    """The target-class list of a newly chosen classifier, keeping the chosen class if it has it."""
    labels = class_labels(classifier)
    return gr.Dropdown(choices=labels, value=target if target in labels else next(iter(labels), None))


# --- interface ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    preview: gr.Image
    status: gr.Markdown
    curve: gr.LinePlot
    best: gr.Image
    comparison: gr.Gallery

    @property
    def components(self) -> list[gr.Component]:
        return [self.preview, self.status, self.curve, self.best, self.comparison]


def settings_accordion(preset: Preset) -> dict[str, gr.Component]:
    """The DOODL settings, keyed by the run functions' keyword arguments (and the API's parameter names)."""
    defaults = preset.settings
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            steps = gr.Number(defaults.steps, label="Sampling steps", precision=0, info="paper: 50")
            iterations = gr.Number(
                defaults.iterations, label="Optimization iterations", precision=0, info="paper: 50"
            )
            seed = gr.Number(defaults.seed, label="Seed", precision=0, info="of the noise and the crops")
        with gr.Row():
            learning_rate = gr.Number(defaults.learning_rate, label="Learning rate", info="paper: 1")
            # The clip, not the rate, sets the step: nearly every gradient element exceeds it.
            grad_clip = gr.Number(
                defaults.grad_clip, label="Gradient clip", info="largest step per element; paper: 0.001"
            )
            cutouts = gr.Number(
                preset.cutouts, label="Cutouts", precision=0, info="random views scored per image"
            )
            mode = gr.Dropdown(
                list(MODES), value=defaults.mode, label="Backpropagation", info="reversible: EDICT"
            )
        p = gr.Slider(
            0.5, 1.0, value=defaults.p, step=0.01, label="EDICT mixing weight p", info="paper: 0.93"
        )
        guidance_scale = gr.Slider(
            0.0, 20.0, value=defaults.guidance_scale, step=0.5, label="Classifier-free guidance scale"
        )
        one_step_scale = gr.Number(
            preset.one_step_scale,
            label="One-step guidance scale",
            info="strength of the baseline shown side by side",
        )
        with gr.Row():
            size = "pixels, a multiple of the VAE's 8; 0: the model's own"
            height = gr.Number(preset.settings.height or 0, label="Height", precision=0, info=size)
            width = gr.Number(preset.settings.width or 0, label="Width", precision=0, info=size)
    compare = gr.Checkbox(True, label="Show unguided / one-step guidance / DOODL side by side")
    return {
        "steps": steps,
        "iterations": iterations,
        "learning_rate": learning_rate,
        "grad_clip": grad_clip,
        "p": p,
        "guidance_scale": guidance_scale,
        "cutouts": cutouts,
        "seed": seed,
        "mode": mode,
        "compare": compare,
        "one_step_scale": one_step_scale,
        "height": height,
        "width": width,
    }


def output_panel(loss_help: str) -> Outputs:
    with gr.Column():
        status = gr.Markdown("Press Run: the current iteration and the best image so far update live.")
        with gr.Row():
            preview = gr.Image(label="Current iteration", height=280, **IMAGE)
            best = gr.Image(label="Best image", height=280, **{**IMAGE, "elem_classes": ["pixels", "best"]})
        curve = gr.LinePlot(x="iteration", y="loss", label=f"Loss: {loss_help}", height=220)
        comparison = gr.Gallery(
            label="Side by side, from the same initial noise",
            columns=4,
            height=260,
            format="png",
            elem_classes="pixels",
        )
    return Outputs(preview, status, curve, best, comparison)


def wire_run(
    run: gr.Button,
    stop: gr.Button,
    fn: Callable,
    inputs: list[gr.Component],
    settings: dict[str, gr.Component],
    outputs: Outputs,
    api_name: str,
) -> None:
    event = run.click(
        fn,
        inputs=inputs,
        inputs_kwargs=settings,
        outputs=outputs.components,
        api_name=api_name,
        api_description=getattr(fn, "func", fn).__doc__,  # a partial's own doc says only "partial(...)"
        concurrency_id="device",  # all four tabs share one queue slot: one job at a time on the device
        show_progress_on=[outputs.status],  # keep the live preview visible under the progress bar
    )
    # Cancelling leaves the last update on screen, and every update carries the best image so far.
    stop.click(None, cancels=[event])


# --- examples -------------------------------------------------------------------------------------


def preset_inputs(preset: Preset) -> dict[str, Any]:
    """A preset as the run functions' settings keywords, side-by-side included."""
    settings = preset.settings
    return {
        "steps": settings.steps,
        "iterations": settings.iterations,
        "learning_rate": settings.learning_rate,
        "grad_clip": settings.grad_clip,
        "p": settings.p,
        "guidance_scale": settings.guidance_scale,
        "cutouts": preset.cutouts,
        "seed": settings.seed,
        "mode": settings.mode,
        "compare": True,
        "one_step_scale": preset.one_step_scale,
        "height": settings.height,
        "width": settings.width,
    }


def quiet(*_: Any, **__: Any) -> None:
    """Progress reporting for cached examples, which gradio runs outside any visitor's page."""


@dataclass(frozen=True)
class ExampleCache:
    """Where gradio keeps the examples' outputs, and whether it computes them at start-up or at first click.

    Outputs depend on the models, the settings and the examples, so the folder is named by a hash of the
    three (and of what a row holds): another model or budget never shows stale images. For the embedded
    models a cache is shipped in assets/ (`python app.py --cache-examples`): a visitor lands on the first
    example's results and every click is instant."""

    folder: Path
    eager: bool


SHIPPED_EXAMPLES = ROOT / "assets" / "cached_examples"
LOCAL_EXAMPLES = Path(tempfile.gettempdir()) / "doodl-examples"  # gradio serves files from the temp dir
# gradio's cache logs hold absolute file paths: shipped, they stand for the folder the cache is in.
CACHE_FOLDER = "{cache folder}"


def models_digest(names: ModelNames) -> str:
    """The embedded models' content, for cache keys; other models are known by their names only."""
    if not is_embedded(locate(names.sd)):
        return ""
    digest = hashlib.sha256()
    folder = ROOT / EMBEDDED
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix != ".txt":  # the training log changes no output
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


# What a cached row holds and how (raise it when that changes: the loss curve is stored as an update since 2).
CACHE_FORMAT = 2


def cache_key(serving: Serving, tabs: dict[str, Preset]) -> str:
    outputs = [field.name for field in fields(Outputs)]  # what each cached row holds, in order
    key = repr((serving.names, tabs, EXAMPLES, models_digest(serving.names), outputs, CACHE_FORMAT))
    return hashlib.sha256(key.replace(str(ROOT), ".").encode()).hexdigest()[:16]


def relocate(source: Path, destination: Path, old: str, new: str) -> None:
    """Copy a gradio example cache, rewriting the absolute paths of its logs."""
    shutil.copytree(source, destination, dirs_exist_ok=True)
    for log in destination.rglob("log.csv"):
        log.write_text(log.read_text().replace(old, new))


def example_cache(serving: Serving, tabs: dict[str, Preset], build: bool = False) -> ExampleCache:
    """The cache of this configuration: the shipped one if there is one, else filled at first click;
    `build` computes every example at start-up (then `ship` it)."""
    name = cache_key(serving, tabs)
    local, shipped = LOCAL_EXAMPLES / name, SHIPPED_EXAMPLES / name
    if shipped.is_dir() and not build:
        relocate(shipped, local, CACHE_FOLDER, str(local))
    return ExampleCache(local, eager=build or shipped.is_dir())


def ship(cache: ExampleCache) -> Path:
    """Copy a built cache into assets/, where the app finds it at start-up."""
    shipped = SHIPPED_EXAMPLES / cache.folder.name
    shutil.rmtree(shipped, ignore_errors=True)
    relocate(cache.folder, shipped, str(cache.folder), CACHE_FOLDER)
    return shipped


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


def examples(
    tab: str,
    rows: list[list[Any]],
    inputs: list[gr.Component],
    outputs: Outputs,
    show: Callable[..., Update],
    cache: ExampleCache,
) -> gr.Examples:
    """Examples whose outputs (side-by-side, loss curve, best image) come from the cache at a click, under a
    line saying what to look at. Eager: computed at start-up unless already there, and the first one is
    shown on arrival."""
    shown = gr.Examples(
        rows,
        label=LOOK_AT[tab],
        elem_id=f"{tab}-examples",
        inputs=inputs,
        outputs=outputs.components,
        fn=show,
        cache_examples=True,
        cache_mode="eager" if cache.eager else "lazy",
        preload=0 if cache.eager else False,
    )
    # gradio names the folder by a component id, which a process counts across every page it builds:
    # named by the tab, the cache is found by any process.
    shown.cached_folder = cache.folder / tab
    shown.cached_file = shown.cached_folder / "log.csv"
    shown.cached_indices_file = shown.cached_folder / "indices.csv"
    return shown


def example_runner(run: Callable, preset: Preset, serving: Serving, models: Callable[..., list]) -> Callable:
    """A tab's run to the end at its preset, for the cache: `models(*example)` gives the run's inputs."""
    inputs = preset_inputs(preset)

    def show(*example: Any) -> Update:
        *_, (preview, status, curve, best, comparison) = run(
            *models(*example), progress=quiet, serving=serving, **inputs
        )
        # As an update: gradio's cache reads an update's dict back whole, but a plot's own cell as an
        # unparsed JSON string, which the page cannot draw (it froze the page on arrival).
        return preview, status, gr.update(value=curve), best, comparison

    return gpu(show, duration=gpu_seconds(**inputs))


# --- interface ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tab:
    """What every tab is built from: the host's choices, its settings and its example cache."""

    serving: Serving
    preset: Preset
    cache: ExampleCache
    model: gr.Textbox

    def model_field(self, kind: str, label: str, info: str) -> gr.Textbox:
        """A model's name: editable when visitors may choose models, else shown read-only."""
        value = getattr(self.serving.names, kind)
        return gr.Textbox(value, label=label, info=info, interactive=self.serving.allow_model_choice)

    def first(self, value: Any) -> dict[str, Any]:
        """An input's value on arrival, as keywords: the first example's, unless the cache preloads it
        (gradio preloads only inputs built with no value at all)."""
        return {} if self.cache.eager else {"value": value}

    def run(self, fn: Callable) -> Callable:
        return partial(fn, serving=self.serving)


def run_controls(preset: Preset) -> tuple[dict[str, gr.Component], gr.Button, gr.Button]:
    """Below a tab's own inputs: the settings, Run and Stop."""
    settings = settings_accordion(preset)
    with gr.Row():
        run, stop = gr.Button("Run", variant="primary"), gr.Button("Stop", variant="stop")
    return settings, run, stop


def text_guidance_tab(tab: Tab) -> None:
    names = tab.serving.names
    with gr.Tab("Text guidance"):
        gr.Markdown("CLIP similarity to the prompt steers the whole sampling chain towards it.")
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(label="Prompt", **tab.first(TEXT_EXAMPLES[0][0]))
                guides = names.text_guides()
                guide = gr.Radio(
                    guides,
                    value="CLIP",
                    label="Guide",
                    info="CLIP similarity, or a reward model's score of the image for the prompt",
                    visible=len(guides) > 1,
                )
                clip = tab.model_field("clip", "CLIP model", CLIP_HELP)
                settings, run, stop = run_controls(tab.preset)
            outputs = output_panel(
                "CLIP's spherical distance between the image and the prompt (a reward model: minus its score)"
            )
        with left:

            def models(prompt: str) -> list:
                return [names.sd, prompt, names.clip]

            show = example_runner(text_guidance, tab.preset, tab.serving, models)
            examples("text", TEXT_EXAMPLES, [prompt], outputs, show, tab.cache)
    inputs = [tab.model, prompt, clip, guide]
    wire_run(run, stop, tab.run(text_guidance), inputs, settings, outputs, "text_guidance")


def shade_swatches() -> str:
    """The embedded classifier's four shades of red, as colored squares with their names (HTML)."""
    cells = [
        f'<span style="display:inline-block;margin-right:1em"><span style="display:inline-block;'
        f'width:1.2em;height:1.2em;vertical-align:middle;background:rgb{rgb}"></span> {name}</span>'
        for name, rgb in zip(SHADE_NAMES["red"], PALETTE["red"])
    ]
    return "<div>The embedded classifier's shades of red: " + "".join(cells) + "</div>"


def vocabulary_tab(tab: Tab) -> None:
    names = tab.serving.names
    with gr.Tab("Vocabulary expansion"):
        gr.Markdown("A fine-grained classifier steers a generic prompt to a class the text cannot ask for.")
        if is_embedded(locate(names.sd)):
            gr.HTML(shade_swatches())
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(label="Generic prompt", **tab.first(VOCABULARY_EXAMPLES[0][0]))
                classifier = tab.model_field("classifier", "Classifier", CLASSIFIER_HELP)
                # Custom values too: an API call may name a class in any case, as the classifier allows.
                labels = class_labels(names.classifier)
                first = VOCABULARY_EXAMPLES[0][1]
                target = gr.Dropdown(
                    labels,
                    **tab.first(first if first in labels else next(iter(labels), None)),
                    label="Target class",
                    allow_custom_value=True,
                )
                settings, run, stop = run_controls(tab.preset)
            outputs = output_panel("cross-entropy of the classifier to the target class")
        with left:

            def models(prompt: str, target: str) -> list:
                return [names.sd, prompt, names.classifier, target]

            show = example_runner(vocabulary_expansion, tab.preset, tab.serving, models)
            examples("vocabulary", VOCABULARY_EXAMPLES, [prompt, target], outputs, show, tab.cache)
    if tab.serving.allow_model_choice:  # the class list follows the classifier, loaded as a run's are
        gr.on(
            [classifier.submit, classifier.blur],
            class_choices,
            [classifier, target],
            target,
            concurrency_id="device",
        )
    inputs = [tab.model, prompt, classifier, target]
    wire_run(run, stop, tab.run(vocabulary_expansion), inputs, settings, outputs, "vocabulary_expansion")


def thumbnails(paths: list[str] | None) -> list[str]:
    return list(paths or [])


def personalization_tab(tab: Tab) -> None:
    names = tab.serving.names
    with gr.Tab("Personalization"):
        gr.Markdown("CLIP similarity to reference images puts their entity into the prompt's scene.")
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(label="Scene prompt", **tab.first(PERSONALIZATION_EXAMPLES[0][0]))
                references = gr.File(
                    file_count="multiple", file_types=["image"], label="Reference images", height=140
                )
                shown = gr.Gallery(
                    label="References", columns=6, height=110, elem_classes="pixels", interactive=False
                )
                clip = tab.model_field("clip", "CLIP model", CLIP_HELP)
                settings, run, stop = run_controls(tab.preset)
            outputs = output_panel("CLIP's spherical distance between the image and the references")
        with left:

            def models(prompt: str, references: list[str]) -> list:
                return [names.sd, prompt, references, names.clip]

            show = example_runner(personalization, tab.preset, tab.serving, models)
            examples(
                "personalization", PERSONALIZATION_EXAMPLES, [prompt, references], outputs, show, tab.cache
            )
    references.change(thumbnails, references, shown, queue=False)
    inputs = [tab.model, prompt, references, clip]
    wire_run(run, stop, tab.run(personalization), inputs, settings, outputs, "personalization")


def aesthetic_tab(tab: Tab) -> None:
    names = tab.serving.names
    with gr.Tab("Aesthetic improvement"):
        gr.Markdown(
            "An aesthetic scorer on CLIP image embeddings improves a generated image, or a real photo "
            "after exact EDICT inversion. The loss is minus the predicted score (1 to 10): lower is "
            "more beautiful."
        )
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(
                    label="Prompt",
                    **tab.first(AESTHETIC_EXAMPLES[0][0]),
                    info="With a photo: what the photo shows",
                )
                photo = gr.File(
                    file_types=["image"], label="Photo to improve (optional: else generate one)", height=140
                )
                with gr.Row():
                    clip = tab.model_field("aesthetic_clip", "CLIP model of the scorer", CLIP_HELP)
                    head = tab.model_field("aesthetic_head", "Aesthetic head", HEAD_HELP)
                settings, run, stop = run_controls(tab.preset)
            outputs = output_panel("minus the predicted aesthetic score")
        with left:

            def models(prompt: str, photo: str | None) -> list:
                return [names.sd, prompt, photo, names.aesthetic_clip, names.aesthetic_head]

            show = example_runner(aesthetic, tab.preset, tab.serving, models)
            examples("aesthetic", AESTHETIC_EXAMPLES, [prompt, photo], outputs, show, tab.cache)
    inputs = [tab.model, prompt, photo, clip, head]
    wire_run(run, stop, tab.run(aesthetic), inputs, settings, outputs, "aesthetic")


EMBEDDED_WORLD = (
    "The embedded model draws a small world: flat circles, squares, triangles and stars in six colors "
    "(red, yellow, green, cyan, blue, purple, four shades each) on light or dark backgrounds, at 64 x 64 "
    "pixels. It runs on a CPU with no download; pass `--model` and the guide flags for Stable Diffusion "
    "and real guides."
)


def app_presets(serving: Serving) -> dict[str, Preset]:
    """Each tab's settings: those the quality benchmark chose for the embedded model, else the paper's;
    cut down to the host's budget."""
    return {name: serving.within_budget(preset) for name, preset in presets(locate(serving.names.sd)).items()}


def build_app(serving: Serving = LOCAL, build_cache: bool = False) -> gr.Blocks:
    """The whole UI, queued so that one job at a time runs on the device. Loads no model but the
    classifier whose labels the vocabulary tab lists."""
    names = serving.names
    tabs = app_presets(serving)
    cache = example_cache(serving, tabs, build_cache)
    with gr.Blocks(title="DOODL", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DOODL: Direct Optimization Of Diffusion Latents\n"
            "The initial noise of Stable Diffusion is optimized through the whole EDICT sampling chain "
            "against a loss on the final image."
            + (f"\n\n{EMBEDDED_WORLD}" if is_embedded(locate(names.sd)) else "")
        )
        with gr.Row():
            model = gr.Textbox(
                names.sd,
                label="Stable Diffusion model",
                info="A diffusers folder or hub id",
                scale=3,
                interactive=serving.allow_model_choice,
            )
            gr.Markdown(device_note(serving))
        text_guidance_tab(Tab(serving, tabs["text"], cache, model))
        vocabulary_tab(Tab(serving, tabs["vocabulary"], cache, model))
        personalization_tab(Tab(serving, tabs["personalization"], cache, model))
        aesthetic_tab(Tab(serving, tabs["aesthetic"], cache, model))
    return demo.queue(default_concurrency_limit=1, max_size=serving.queue_size)


def device_note(serving: Serving) -> str:
    note = f"Running on **{MODELS.device}**."
    if is_embedded(locate(serving.names.sd)):
        note += (
            " Each tab's settings are the embedded model's: fewer steps and iterations than the paper's "
            "50 and 50, chosen by the quality benchmark (see README)."
        )
    limits = [
        f"{limit} {name}"
        for name, limit in (
            ("steps", serving.max_steps),
            ("iterations", serving.max_iterations),
            ("cutouts", serving.max_cutouts),
            ("reference images", serving.max_references),
        )
        if limit is not None
    ]
    if limits:
        note += " A run here takes at most " + ", ".join(limits) + "."
    if not serving.allow_model_choice:
        note += " The models are the host's."
    return note


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    max_file_size: str | None = None,
) -> tuple[Any, str, str | None]:
    """Serve the app; with block=False, return at once (the server runs in a thread).

    Returns gradio's (server app, local URL, public URL if shared)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        prevent_thread_lock=not block,
        css=CSS,
        max_file_size=max_file_size,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = ModelNames()
    parser = argparse.ArgumentParser(description="Serve the DOODL app.")
    models = parser.add_argument_group("models (the host's choice; visitors see them read-only when public)")
    models.add_argument("--model", default=default.sd, help="Stable Diffusion: diffusers folder or hub id")
    models.add_argument("--clip", default=default.clip, help="CLIP of text guidance and personalization")
    models.add_argument("--classifier", default=default.classifier, help="classifier of vocabulary expansion")
    models.add_argument(
        "--aesthetic-clip", default=default.aesthetic_clip, help="CLIP of the aesthetic scorer"
    )
    models.add_argument("--aesthetic-head", default=default.aesthetic_head, help="aesthetic head file")
    models.add_argument("--pickscore", default="", help="offer PickScore in text guidance: folder or hub id")
    models.add_argument("--pickscore-processor", default="", help="its CLIP processor (default: the model's)")
    models.add_argument("--hps", default="", help="offer HPSv2 in text guidance: its checkpoint file")
    models.add_argument(
        "--hps-architecture", default=default.hps_architecture, help="open_clip name of --hps"
    )
    serve = parser.add_argument_group("serving")
    # Hugging Face Spaces say where to serve through gradio's environment variables.
    host, port = (
        os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        os.environ.get("GRADIO_SERVER_PORT", "7860"),
    )
    serve.add_argument("--host", default=host, help="address to serve on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=int(port))
    serve.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    serve.add_argument(
        "--allow-model-choice",
        action="store_true",
        help="let visitors name other models (always allowed when only this machine can reach the app)",
    )
    public, public_real = Serving.public(), Serving.public(ModelNames(sd="a real model"))
    budget = parser.add_argument_group(
        "budget of one run (no limit for a local app; when others can reach it, the defaults shown)"
    )
    for field in ("max_steps", "max_iterations", "max_cutouts", "max_references", "queue_size"):
        flag = "--" + field.replace("_", "-")
        embedded, real = getattr(public, field), getattr(public_real, field)
        default = (
            f"{embedded}" if embedded == real else f"{embedded} with the embedded model, {real} with others"
        )
        budget.add_argument(flag, type=int, help=f"public default {default}")
    budget.add_argument(
        "--max-file-size", help=f"of an upload, e.g. 8mb; public default {public.max_file_size}"
    )
    parser.add_argument(
        "--cache-examples",
        action="store_true",
        help="compute every example's outputs into assets/cached_examples, then exit",
    )
    return parser.parse_args(argv)


def serving_of(args: argparse.Namespace) -> Serving:
    """The host's choices: a public app serves its models only within a budget, unless told otherwise;
    a local one is open, with only the limits given."""
    names = ModelNames(
        args.model,
        args.clip,
        args.classifier,
        args.aesthetic_clip,
        args.aesthetic_head,
        args.pickscore,
        args.pickscore_processor,
        args.hps,
        args.hps_architecture,
    )
    limits = {
        field.name: getattr(args, field.name)
        for field in fields(Serving)
        if field.name not in ("names", "allow_model_choice")
    }
    if reachable_by_others(args.host, args.share):
        return Serving.public(names, allow_model_choice=args.allow_model_choice or None, **limits)
    return Serving(names, allow_model_choice=True, **limits)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection, within `timeout` seconds."""
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_unless_hub_reachable() -> None:
    """Without the hub, make every hub lookup fail at once instead of after network retries (tens of
    seconds for a mistyped id): the hub library's own offline mode, which still loads cached models."""
    if not hf_constants.HF_HUB_OFFLINE and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read it later
        hf_constants.HF_HUB_OFFLINE = True  # read at import, so set where diffusers and transformers look


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    offline_unless_hub_reachable()
    serving = serving_of(args)
    if args.cache_examples:  # gradio computes eager examples as the app starts
        shutil.rmtree(example_cache(serving, app_presets(serving), build=True).folder, ignore_errors=True)
        demo = build_app(serving, build_cache=True)
        launch(demo, "127.0.0.1", args.port, block=False)
        demo.close()
        print(f"examples cached in {ship(example_cache(serving, app_presets(serving), build=True))}")
        return
    demo = build_app(serving)
    launch(demo, args.host, args.port, args.share, max_file_size=serving.max_file_size)


if __name__ == "__main__":
    main()
