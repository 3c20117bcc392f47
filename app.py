"""The DOODL app: the paper's four demonstrations, one tab each, wired to the `doodl` package.

    python app.py [--model SD] [--clip CLIP] [--classifier CLASSIFIER] [--aesthetic-clip CLIP]
                  [--aesthetic-head FILE] [--host 127.0.0.1] [--port 7860] [--share]

Everything here is interface: sampling, optimization, losses and model loading live in `doodl`.
Models are loaded on first use and kept in `MODELS`, so importing this module loads none of them.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch
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
from doodl.guides import Classifier, Clip, GuideNotFoundError, load_aesthetic_head, load_classifier, load_clip
from doodl.losses import Loss, aesthetic_loss, classifier_loss, clip_image_loss, clip_text_loss
from doodl.optimize import Result, result_of
from doodl.world.shapes import PALETTE, SHADE_NAMES

try:  # On a Hugging Face ZeroGPU Space, `spaces.GPU` lends a GPU to each run; elsewhere nothing is needed.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(function: Callable) -> Callable:
        return function


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


MODELS = ModelCache(*pick_device())

# The run functions' `progress` default: gradio sees it and passes each run a tracker of its own.
PROGRESS = gr.Progress()


def app_presets(names: ModelNames) -> dict[str, Preset]:
    """Each tab's settings: those the quality benchmark chose for the embedded model, else the paper's."""
    return presets(locate(names.sd))


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
) -> RunOptions:
    """Settings from the accordion's widgets; DoodlSettings names any value out of range."""
    blank = [name for name, value in locals().items() if value is None]  # an API call may send nulls
    if blank:
        raise ValueError(f"setting {blank[0]} is empty")
    if cutouts < 0:
        raise ValueError(f"setting cutouts={cutouts!r} is out of range: 0 (whole image) or more crops")
    if one_step_scale < 0:
        raise ValueError(f"setting one_step_scale={one_step_scale!r} is out of range: it must be 0 or more")
    settings = DoodlSettings(
        steps=int(steps),
        iterations=int(iterations),
        learning_rate=float(learning_rate),
        grad_clip=float(grad_clip),
        p=float(p),
        guidance_scale=float(guidance_scale),
        seed=int(seed),
        mode=mode,
    )
    return RunOptions(settings, int(cutouts), bool(compare), float(one_step_scale))


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
    # The loss's crops are drawn from a generator seeded by the run's seed: same seed, same run.
    for step in doodl(model, prompt, make_loss(seeded(options.settings.seed)), options.settings, init):
        steps.append(step)
        progress(number(step) / total, desc=f"DOODL iteration {number(step)}/{total}")
        result = result_of(steps)
        yield step.image, status_line(result, total), loss_curve(result.losses), result.image, gr.skip()
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
            *([(photo, "Uploaded photo")] if photo is not None else []),
            # DOODL's iteration 0 is the unguided sample (or, from a photo, its EDICT reconstruction).
            (steps[0].image, "Unguided" if photo is None else "Unguided reconstruction"),
            (one_step, f"One-step guidance, scale {options.one_step_scale:g}"),
            (result.image, f"DOODL, iteration {number(result.best)}"),
        ]
    status = status_line(result, total, done=True)
    yield result.last.image, status, loss_curve(result.losses), result.image, gallery


def starting(progress: gr.Progress) -> Update:
    """The first update of a run: clear the previous run's results while models load."""
    progress(0, desc="loading models")
    return None, "Loading models and starting...", None, None, []


@gpu
def text_guidance(
    model: str, prompt: str, clip: str, progress: gr.Progress = PROGRESS, **settings: Any
) -> Iterator[Update]:
    """Demonstration 1: steer the image towards the prompt by CLIP similarity."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        yield starting(progress)
        guide, pipeline = MODELS.clip(clip), MODELS.pipeline(model)

        def make_loss(generator: torch.Generator) -> Loss:
            return clip_text_loss(guide, prompt, cutouts=options.cutouts, generator=generator)

        yield from stream_doodl(pipeline, prompt, make_loss, options, progress)


@gpu
def vocabulary_expansion(
    model: str,
    prompt: str,
    classifier: str,
    target: str,
    progress: gr.Progress = PROGRESS,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 2: a generic prompt, steered to a class the classifier knows and the text does not."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
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
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 3: the scene of the prompt, with the entity of the reference images (CLIP vision)."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
        if not references:
            raise ValueError("no reference image: upload at least one image of the entity to draw")
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
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 4: raise the predicted aesthetic score of a generated image, or of an uploaded photo
    after EDICT inversion (the prompt then describes the photo)."""
    with user_errors():
        prompt, options = required_prompt(prompt), run_options(**settings)
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
    }


def output_panel(loss_help: str) -> Outputs:
    with gr.Column():
        status = gr.Markdown("Press Run: the current iteration and the best image so far update live.")
        with gr.Row():
            preview = gr.Image(label="Current iteration", height=280, **IMAGE)
            best = gr.Image(label="Best image", height=280, **IMAGE)
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
        concurrency_id="device",  # all four tabs share one queue slot: one job at a time on the device
        show_progress_on=[outputs.status],  # keep the live preview visible under the progress bar
    )
    # Cancelling leaves the last update on screen, and every update carries the best image so far.
    stop.click(None, cancels=[event])


def run_controls(
    preset: Preset, examples: list[list[Any]], example_inputs: list[gr.Component]
) -> tuple[dict[str, gr.Component], gr.Button, gr.Button]:
    """Below a tab's own inputs: the settings, Run and Stop, and examples that fill those inputs."""
    settings = settings_accordion(preset)
    with gr.Row():
        run, stop = gr.Button("Run", variant="primary"), gr.Button("Stop", variant="stop")
    gr.Examples(examples, inputs=example_inputs)
    return settings, run, stop


def text_guidance_tab(names: ModelNames, preset: Preset, model: gr.Textbox) -> None:
    with gr.Tab("Text guidance"):
        gr.Markdown("CLIP similarity to the prompt steers the whole sampling chain towards it.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(TEXT_EXAMPLES[0][0], label="Prompt")
                clip = gr.Textbox(names.clip, label="CLIP model", info=CLIP_HELP)
                settings, run, stop = run_controls(preset, TEXT_EXAMPLES, [prompt])
            outputs = output_panel("CLIP's spherical distance between the image and the prompt")
    wire_run(run, stop, text_guidance, [model, prompt, clip], settings, outputs, "text_guidance")


def shade_swatches() -> str:
    """The embedded classifier's four shades of red, as colored squares with their names (HTML)."""
    cells = [
        f'<span style="display:inline-block;margin-right:1em"><span style="display:inline-block;'
        f'width:1.2em;height:1.2em;vertical-align:middle;background:rgb{rgb}"></span> {name}</span>'
        for name, rgb in zip(SHADE_NAMES["red"], PALETTE["red"])
    ]
    return "<div>The embedded classifier's shades of red: " + "".join(cells) + "</div>"


def vocabulary_tab(names: ModelNames, preset: Preset, model: gr.Textbox) -> None:
    with gr.Tab("Vocabulary expansion"):
        gr.Markdown("A fine-grained classifier steers a generic prompt to a class the text cannot ask for.")
        if is_embedded(locate(names.sd)):
            gr.HTML(shade_swatches())
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(VOCABULARY_EXAMPLES[0][0], label="Generic prompt")
                classifier = gr.Textbox(names.classifier, label="Classifier", info=CLASSIFIER_HELP)
                # Custom values too: an API call may name a class in any case, as the classifier allows.
                labels = class_labels(names.classifier)
                target = gr.Dropdown(
                    labels,
                    value=VOCABULARY_EXAMPLES[0][1]
                    if VOCABULARY_EXAMPLES[0][1] in labels
                    else next(iter(labels), None),
                    label="Target class",
                    allow_custom_value=True,
                )
                settings, run, stop = run_controls(preset, VOCABULARY_EXAMPLES, [prompt, target])
            outputs = output_panel("cross-entropy of the classifier to the target class")
    # The class list follows the classifier.
    gr.on([classifier.submit, classifier.blur], class_choices, [classifier, target], target, queue=False)
    inputs = [model, prompt, classifier, target]
    wire_run(run, stop, vocabulary_expansion, inputs, settings, outputs, "vocabulary_expansion")


def thumbnails(paths: list[str] | None) -> list[str]:
    return list(paths or [])


def personalization_tab(names: ModelNames, preset: Preset, model: gr.Textbox) -> None:
    with gr.Tab("Personalization"):
        gr.Markdown("CLIP similarity to reference images puts their entity into the prompt's scene.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(PERSONALIZATION_EXAMPLES[0][0], label="Scene prompt")
                references = gr.File(
                    file_count="multiple", file_types=["image"], label="Reference images", height=140
                )
                shown = gr.Gallery(
                    label="References", columns=6, height=110, elem_classes="pixels", interactive=False
                )
                clip = gr.Textbox(names.clip, label="CLIP model", info=CLIP_HELP)
                settings, run, stop = run_controls(preset, PERSONALIZATION_EXAMPLES, [prompt, references])
            outputs = output_panel("CLIP's spherical distance between the image and the references")
    references.change(thumbnails, references, shown, queue=False)
    inputs = [model, prompt, references, clip]
    wire_run(run, stop, personalization, inputs, settings, outputs, "personalization")


def aesthetic_tab(names: ModelNames, preset: Preset, model: gr.Textbox) -> None:
    with gr.Tab("Aesthetic improvement"):
        gr.Markdown(
            "An aesthetic scorer on CLIP image embeddings improves a generated image, or a real photo "
            "after exact EDICT inversion. The loss is minus the predicted score (1 to 10): lower is "
            "more beautiful."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    AESTHETIC_EXAMPLES[0][0], label="Prompt", info="With a photo: what the photo shows"
                )
                photo = gr.File(
                    file_types=["image"], label="Photo to improve (optional: else generate one)", height=140
                )
                with gr.Row():
                    clip = gr.Textbox(names.aesthetic_clip, label="CLIP model of the scorer", info=CLIP_HELP)
                    head = gr.Textbox(names.aesthetic_head, label="Aesthetic head", info=HEAD_HELP)
                settings, run, stop = run_controls(preset, AESTHETIC_EXAMPLES, [prompt, photo])
            outputs = output_panel("minus the predicted aesthetic score")
    wire_run(run, stop, aesthetic, [model, prompt, photo, clip, head], settings, outputs, "aesthetic")


EMBEDDED_WORLD = (
    "The embedded model draws a small world: flat circles, squares, triangles and stars in six colors "
    "(red, yellow, green, cyan, blue, purple, four shades each) on light or dark backgrounds, at 64 x 64 "
    "pixels. It runs on a CPU with no download; pass `--model` and the guide flags for Stable Diffusion "
    "and real guides."
)


def build_app(names: ModelNames = ModelNames()) -> gr.Blocks:
    """The whole UI, queued so that one job at a time runs on the device. Loads no model."""
    tabs = app_presets(names)
    with gr.Blocks(title="DOODL") as demo:
        gr.Markdown(
            "# DOODL: Direct Optimization Of Diffusion Latents\n"
            "The initial noise of Stable Diffusion is optimized through the whole EDICT sampling chain "
            "against a loss on the final image."
            + (f"\n\n{EMBEDDED_WORLD}" if is_embedded(locate(names.sd)) else "")
        )
        with gr.Row():
            model = gr.Textbox(
                names.sd, label="Stable Diffusion model", info="A diffusers folder or hub id", scale=3
            )
            gr.Markdown(device_note(names))
        text_guidance_tab(names, tabs["text"], model)
        vocabulary_tab(names, tabs["vocabulary"], model)
        personalization_tab(names, tabs["personalization"], model)
        aesthetic_tab(names, tabs["aesthetic"], model)
    return demo.queue(default_concurrency_limit=1)


def device_note(names: ModelNames) -> str:
    note = f"Running on **{MODELS.device}**."
    if is_embedded(locate(names.sd)):
        note += (
            " Each tab's settings are the embedded model's: fewer steps and iterations than the paper's "
            "50 and 50, chosen by the quality benchmark (see README)."
        )
    return note


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
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
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = ModelNames()
    parser = argparse.ArgumentParser(description="Serve the DOODL app.")
    parser.add_argument("--model", default=default.sd, help="Stable Diffusion: diffusers folder or hub id")
    parser.add_argument("--clip", default=default.clip, help="CLIP of text guidance and personalization")
    parser.add_argument("--classifier", default=default.classifier, help="classifier of vocabulary expansion")
    parser.add_argument(
        "--aesthetic-clip", default=default.aesthetic_clip, help="CLIP of the aesthetic scorer"
    )
    parser.add_argument("--aesthetic-head", default=default.aesthetic_head, help="aesthetic head file")
    # Hugging Face Spaces say where to serve through gradio's environment variables.
    host, port = (
        os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        os.environ.get("GRADIO_SERVER_PORT", "7860"),
    )
    parser.add_argument("--host", default=host, help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=int(port))
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = ModelNames(args.model, args.clip, args.classifier, args.aesthetic_clip, args.aesthetic_head)
    launch(build_app(names), args.host, args.port, args.share)


if __name__ == "__main__":
    main()
