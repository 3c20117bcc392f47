"""The DOODL app: the paper's four demonstrations, one tab each, wired to the `doodl` package.

    python app.py [--model SD] [--clip CLIP] [--classifier CLASSIFIER] [--aesthetic-clip CLIP]
                  [--aesthetic-head FILE] [--host 127.0.0.1] [--port 7860] [--share]
                  [--allow-model-choice] [--max-steps N] [--max-iterations N] [--max-cutouts N] ...

Widgets and wiring only: what each capability guides with is `doodl.capabilities`, what visitors may ask
and the run settings are `doodl.serving`, a run as the page shows it and the examples' stored runs are
`doodl.showcase`. Models are loaded on first use and kept in `MODELS`, so importing this module loads none.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import gradio as gr
import pandas as pd
from huggingface_hub import constants as hf_constants

from doodl.capabilities import CAPABILITIES
from doodl.chain import plain_chain
from doodl.cli import add_model_arguments, add_serving_arguments, serving_of
from doodl.embedded import EXAMPLE_IMAGES, FLOW_CAVEAT, Preset
from doodl.guides import GuideNotFoundError
from doodl.optimize import DoodlSettings
from doodl.pipeline import ModelLoadError
from doodl.serving import (
    SETTINGS,
    ModelCache,
    Serving,
    Setting,
    hub_reachable,
    pick_device,
    preset_values,
    request,
)
from doodl.showcase import (
    LOOK_AT,
    ExampleStore,
    Showcase,
    Shown,
    build_examples,
    example_request,
    run,
)
from doodl.world.models import CLASSIFIER_OTHER
from doodl.world.shapes import PALETTE, SHADE_NAMES

try:  # On a Hugging Face ZeroGPU Space, `spaces.GPU` lends a GPU to each run; elsewhere nothing is needed.
    import spaces
except ImportError:
    spaces = None

# ZeroGPU holds a GPU for the duration a run asks for. The estimate: the official code's ~10 s per 50-step
# iteration on an A100, i.e. 0.2 s per step and iteration of EDICT (two UNet calls a step), half that with
# plain DDIM's one; the one-step comparison costs about two iterations more, each start sample beyond the
# seed's own about a quarter of one (a forward chain without the backward), and loading the models a fixed
# start. A photo's run is EDICT's, over the last `photo_strength` of the steps.
GPU_SECONDS_PER_STEP_ITERATION = 0.2
GPU_START_SECONDS = 30


def gpu_seconds(
    *inputs: Any,
    steps: float = 50,
    iterations: float = 50,
    compare: bool = True,
    start_samples: float = 1,
    sampler: str = "auto",
    photo: str | None = None,
    photo_strength: float = 1.0,
    **_: Any,
) -> int:
    """Seconds a run with these settings holds a ZeroGPU GPU (`spaces.GPU` calls it with the run's inputs)."""
    try:
        ddim = plain_chain(DoodlSettings(steps=int(steps), sampler=str(sampler)), from_photo=bool(photo))
    except ValueError:  # settings the run itself refuses, with a message
        ddim = False
    chain_steps = float(steps) * (float(photo_strength) if photo else 1.0) * (0.5 if ddim else 1.0)
    starts = (float(start_samples) - 1) / 4
    work = chain_steps * (float(iterations) + (2 if compare else 0) + starts)
    return int(GPU_START_SECONDS + GPU_SECONDS_PER_STEP_ITERATION * work)


def gpu(function: Callable, duration: Callable[..., int] | int = gpu_seconds) -> Callable:
    return function if spaces is None else spaces.GPU(duration=duration)(function)


# Small models make small images: the UI scales them up, without blurring.
CSS = ".pixels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
IMAGE = {"format": "png", "interactive": False}

# The errors `doodl` raises for bad input or a model it cannot load: shown to the user, never a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ModelLoadError, GuideNotFoundError)

CLIP_HELP = (
    "A folder (open_clip_config.json + weights), hf-hub:org/repo, or an architecture and tag: ViT-L-14 openai"
)
CLASSIFIER_HELP = "A transformers image classifier: a folder or hub id"
HEAD_HELP = "A linear head on the CLIP's image embeddings: a .safetensors or .pth file"
PHOTO_PROMPT = "With a photo: what the photo shows"

MODELS = ModelCache(*pick_device())
LOCAL = Serving()

# The run functions' `progress` default: gradio sees it and passes each run a tracker of its own.
PROGRESS = gr.Progress()


# --- running --------------------------------------------------------------------------------------

# What every run streams, in the order of `Outputs.components`: the current iteration's image, a status
# line, the loss curve, the best image so far, the side-by-side comparison, and every iteration's image.
Update = tuple[Any, str, Any, Any, Any, Any]
UNCHANGED = (gr.skip(),) * 6


@contextmanager
def user_errors() -> Iterator[None]:
    """Show what went wrong with the user's input or models as a message in the UI."""
    try:
        yield
    except USER_ERRORS as error:
        raise gr.Error(str(error), print_exception=False) from error


def loss_curve(shown: Shown) -> pd.DataFrame | None:
    """The loss at every iteration, and with a weighted sum of guides each weighted term's beside it."""
    if not shown.losses:
        return None
    curves = [("loss", shown.losses), *shown.terms]
    return pd.DataFrame(
        [(i, value, name) for name, curve in curves for i, value in enumerate(curve, 1)],
        columns=["iteration", "loss", "curve"],
    )


def update(shown: Shown) -> Update:
    gallery = gr.skip() if shown.gallery is None else list(shown.gallery)
    iterations = list(shown.iterations) or None
    return shown.preview, shown.status, loss_curve(shown), shown.best, gallery, iterations


def run_tab(serving: Serving, capability: str, progress: gr.Progress, **asked: Any) -> Iterator[Update]:
    """Check a visitor's run of a tab, then stream it."""
    with user_errors():
        checked = request(serving, capability, **asked)
        for shown in run(checked, MODELS, progress):
            yield update(shown)


@gpu
def text_guidance(
    model: str,
    prompt: str,
    clip: str,
    guide: str = "CLIP",
    photo: str | None = None,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 1: steer the image towards the prompt by CLIP similarity, by a reward model's score of
    the image for the prompt (PickScore, HPSv2, ImageReward) when the host provides one, or by a weighted
    sum of them (`guide`: "CLIP=1, PickScore=0.05"); from an uploaded photo (EDICT inversion) when one is
    given."""
    yield from run_tab(
        serving,
        "text",
        progress,
        model=model,
        prompt=prompt,
        guides={"clip": clip},
        settings=settings,
        guide=guide,
        photo=photo,
    )


@gpu
def vocabulary_expansion(
    model: str,
    prompt: str,
    classifier: str,
    target: str,
    photo: str | None = None,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 2: a generic prompt, steered to a class the classifier knows and the text does not;
    from an uploaded photo (EDICT inversion) when one is given."""
    yield from run_tab(
        serving,
        "vocabulary",
        progress,
        model=model,
        prompt=prompt,
        guides={"classifier": classifier},
        settings=settings,
        target_class=target,
        photo=photo,
    )


@gpu
def personalization(
    model: str,
    prompt: str,
    references: list[str] | None,
    clip: str,
    photo: str | None = None,
    progress: gr.Progress = PROGRESS,
    serving: Serving = LOCAL,
    **settings: Any,
) -> Iterator[Update]:
    """Demonstration 3: the scene of the prompt, with the entity of the reference images (CLIP vision);
    from an uploaded photo (EDICT inversion) when one is given."""
    yield from run_tab(
        serving,
        "personalization",
        progress,
        model=model,
        prompt=prompt,
        guides={"clip": clip},
        settings=settings,
        references=references,
        photo=photo,
    )


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
    guides = {"aesthetic_clip": clip, "aesthetic_head": head}
    yield from run_tab(
        serving,
        "aesthetic",
        progress,
        model=model,
        prompt=prompt,
        guides=guides,
        settings=settings,
        photo=photo,
    )


RUNS = {
    "text": text_guidance,
    "vocabulary": vocabulary_expansion,
    "personalization": personalization,
    "aesthetic": aesthetic,
}


def class_labels(classifier: str) -> list[str]:
    """The classifier's labels; one that will not load only warns (the user may be typing its path), and
    the run will report why."""
    try:
        return list(MODELS.guide("classifier", classifier).labels)
    except USER_ERRORS as error:
        gr.Warning(str(error))
        return []


def class_choices(classifier: str, target: str | None) -> gr.Dropdown:
    """The target-class list of a newly chosen classifier, keeping the chosen class if it has it."""
    labels = class_labels(classifier)
    return gr.Dropdown(choices=labels, value=target if target in labels else next(iter(labels), None))


# --- widgets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    preview: gr.Image
    status: gr.Markdown
    curve: gr.LinePlot
    best: gr.Image
    comparison: gr.Gallery
    iterations: gr.Gallery

    @property
    def components(self) -> list[gr.Component]:
        return [self.preview, self.status, self.curve, self.best, self.comparison, self.iterations]


def setting_widget(setting: Setting, value: Any) -> gr.Component:
    text = {"label": setting.label, "info": setting.info or None}
    if setting.slider is not None:
        low, high, step = setting.slider
        return gr.Slider(low, high, value=value, step=step, **text)
    if setting.choices:
        return gr.Dropdown(list(setting.choices), value=value, **text)
    if setting.kind is bool:
        return gr.Checkbox(value, label=setting.label)
    return gr.Number(value, precision=0 if setting.kind is int else None, **text)


def settings_panel(preset: Preset, seed: int) -> dict[str, gr.Component]:
    """The run settings of `doodl.serving.SETTINGS`, keyed by the run functions' keyword arguments (and
    the API's parameter names); the seed is the first example's, whose run the page shows on arrival."""
    values, widgets = {**preset_values(preset), "seed": seed}, {}
    with gr.Accordion("Settings", open=False):
        for row in sorted({setting.row for setting in SETTINGS if setting.row is not None}):
            with gr.Row():
                for setting in (s for s in SETTINGS if s.row == row):
                    widgets[setting.name] = setting_widget(setting, values[setting.name])
    for setting in (s for s in SETTINGS if s.row is None):
        widgets[setting.name] = setting_widget(setting, values[setting.name])
    return widgets


def output_panel(loss_help: str, shown: Shown | None) -> Outputs:
    """The run's outputs; on arrival, the stored run of the tab's first example when there is one."""
    first = update(shown) if shown is not None else (None,) * 6
    with gr.Column():
        status = gr.Markdown(
            first[1] or "Press Run: the current iteration and the best image so far update live."
        )
        with gr.Row():
            preview = gr.Image(
                first[0], label="Current iteration", height=280, elem_classes="pixels", **IMAGE
            )
            best = gr.Image(
                first[3], label="Best image", height=280, elem_classes=["pixels", "best"], **IMAGE
            )
        curve = gr.LinePlot(
            first[2], x="iteration", y="loss", color="curve", label=f"Loss: {loss_help}", height=220
        )
        comparison = gr.Gallery(
            first[4],
            label="Side by side, from the same initial noise",
            columns=4,
            height=260,
            format="png",
            elem_classes="pixels",
        )
        iterations = gr.Gallery(
            first[5],
            label="Every iteration (1: the start), with its loss",
            columns=5,
            height=240,
            format="png",
            elem_classes=["pixels", "iterations"],
        )
    return Outputs(preview, status, curve, best, comparison, iterations)


@dataclass(frozen=True)
class Tab:
    """What every tab is built from: the host's choices, its settings and the examples' stored runs."""

    name: str
    serving: Serving
    preset: Preset
    showcase: Showcase
    model: gr.Dropdown

    def model_field(self, role: str, label: str, info: str) -> gr.Textbox:
        """A model's name: editable when visitors may choose models, else shown read-only."""
        value = self.serving.names.guide(role)
        return gr.Textbox(value, label=label, info=info, interactive=self.serving.allow_model_choice)

    def first(self, column: int) -> Any:
        """An input's value on arrival: the first example's."""
        row = self.serving.examples().rows[self.name][0]
        return row[column] if column < len(row) else None

    def photo_field(self, label: str = "Photo to start from (optional: else generate one)") -> gr.File:
        """An optional photo to start from, EDICT-inverted; the prompt then says what it shows."""
        return gr.File(
            self.first(1) if self.name == "aesthetic" else None, file_types=["image"], label=label, height=140
        )

    def outputs(self) -> Outputs:
        offered = self.serving.names.offered(self.name)
        help = offered[0].description + (" (a reward model: minus its score)" if len(offered) > 1 else "")
        return output_panel(help, self.showcase.stores[0].load(self.name, 0))

    def controls(self) -> tuple[dict[str, gr.Component], gr.Button, gr.Button]:
        """Below a tab's own inputs: the settings, Run and Stop."""
        settings = settings_panel(self.preset, self.first(-1))
        with gr.Row():
            run, stop = gr.Button("Run", variant="primary"), gr.Button("Stop", variant="stop")
        return settings, run, stop

    def examples(self, inputs: list[gr.Component], outputs: Outputs) -> None:
        """The tab's examples under a line saying what to look at: a click fills the inputs and shows the
        example's stored run; one not stored yet is run on the device, then stored. Where the host serves
        two generators, each example names its own, and a click chooses it."""
        showcase = self.showcase
        examples = gr.Examples(
            showcase.rows(self.name),
            [self.model, *inputs] if showcase.several() else inputs,
            label=LOOK_AT[self.name],
            elem_id=f"{self.name}-examples",
        )
        if self.serving.embedded():  # what the notes say was measured on the embedded models only
            gr.Markdown(showcase.notes(self.name), elem_classes="example-notes")
        # Page events only, not API endpoints: the runs themselves are the API.
        shown = examples.dataset.click(
            self.stored,
            [examples.dataset, self.model],
            outputs.components,
            queue=False,
            api_visibility="private",
        )
        if not showcase.complete():
            shown.then(
                gpu(self.run_missing, duration=gpu_seconds(**preset_values(self.preset))),
                [examples.dataset, self.model],
                outputs.components,
                concurrency_id="device",
                show_progress_on=[outputs.status],
                api_visibility="private",
            )

    def shows_stored(self, model: str | None) -> bool:
        """Whether a click shows the example's stored run: always where it chooses the generator, else only
        with the host's generator chosen (another's click only fills the inputs)."""
        return self.showcase.several() or (model or "").strip() in ("", self.serving.names.sd)

    def stored(self, example: tuple[int, Any], model: str) -> Update:
        _, store, index = self.showcase.find(self.name, example[0])
        shown = store.load(self.name, index) if self.shows_stored(model) else None
        return update(shown) if shown is not None else UNCHANGED

    def run_missing(self, example: tuple[int, Any], model: str) -> Iterator[Update]:
        serving, store, index = self.showcase.find(self.name, example[0])
        if not self.shows_stored(model) or store.load(self.name, index) is not None:
            yield UNCHANGED
            return
        with user_errors():
            row = serving.examples().rows[self.name][index]
            asked = example_request(serving, self.name, row, serving.presets()[self.name])
            for shown in run(asked, MODELS):
                yield update(shown)
        store.save(self.name, index, shown)

    def wire(
        self, run: gr.Button, stop: gr.Button, inputs: list[gr.Component], settings: dict, outputs: Outputs
    ) -> None:
        fn = RUNS[self.name]
        event = run.click(
            partial(fn, serving=self.serving),
            inputs=inputs,
            inputs_kwargs=settings,
            outputs=outputs.components,
            api_name=getattr(fn, "__name__", self.name),
            api_description=fn.__doc__,
            concurrency_id="device",  # all four tabs share one queue slot: one job at a time on the device
            show_progress_on=[outputs.status],  # keep the live preview visible under the progress bar
        )
        # Cancelling leaves the last update on screen, and every update carries the best image so far.
        stop.click(None, cancels=[event])
        # Each generator runs with its own settings (the embedded flow model's, a real model's published).
        tuned = [name for name in settings if name != "seed"]
        self.model.change(
            partial(generator_settings, serving=self.serving, tab=self.name, names=tuned),
            inputs=[self.model],
            outputs=[settings[name] for name in tuned],
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )


def text_guidance_tab(tab: Tab) -> None:
    with gr.Tab(CAPABILITIES["text"].title):
        gr.Markdown(CAPABILITIES["text"].summary)
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(tab.first(0), label="Prompt", info=PHOTO_PROMPT)
                photo = tab.photo_field()
                labels = [kind.label for kind in tab.serving.names.offered("text")]
                guide = gr.Textbox(
                    labels[0],
                    label="Guides",
                    info="CLIP similarity, a reward model's score of the image for the prompt, or a weighted "
                    f"sum of them (each term's curve is drawn), e.g. {labels[0]}=1, {labels[-1]}=0.05. "
                    f"Served: {', '.join(labels)}",
                    visible=len(labels) > 1,
                )
                clip = tab.model_field("clip", "CLIP model", CLIP_HELP)
                settings, run, stop = tab.controls()
            outputs = tab.outputs()
        with left:
            tab.examples([prompt, settings["seed"]], outputs)
    tab.wire(run, stop, [tab.model, prompt, clip, guide, photo], settings, outputs)


def shade_swatches() -> str:
    """The embedded classifier's four shades of red, as colored squares with their names, and its fifth
    class (HTML)."""
    cells = [
        f'<span style="display:inline-block;margin-right:1em"><span style="display:inline-block;'
        f'width:1.2em;height:1.2em;vertical-align:middle;background:rgb{rgb}"></span> {name}</span>'
        for name, rgb in zip(SHADE_NAMES["red"], PALETTE["red"])
    ]
    return (
        "<div>The embedded classifier's shades of red: " + "".join(cells) + f"and <i>{CLASSIFIER_OTHER}</i> "
        "(any other color)</div>"
    )


def vocabulary_tab(tab: Tab) -> None:
    names = tab.serving.names
    with gr.Tab(CAPABILITIES["vocabulary"].title):
        gr.Markdown(CAPABILITIES["vocabulary"].summary)
        if tab.serving.embedded():
            gr.HTML(shade_swatches())
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(tab.first(0), label="Generic prompt", info=PHOTO_PROMPT)
                photo = tab.photo_field()
                classifier = tab.model_field("classifier", "Classifier", CLASSIFIER_HELP)
                # Custom values too: an API call may name a class in any case, as the classifier allows.
                labels = class_labels(names.classifier)
                first = tab.first(1)
                target = gr.Dropdown(
                    labels,
                    value=first if first in labels else next(iter(labels), None),
                    label="Target class",
                    allow_custom_value=True,
                )
                settings, run, stop = tab.controls()
            outputs = tab.outputs()
        with left:
            tab.examples([prompt, target, settings["seed"]], outputs)
    if tab.serving.allow_model_choice:  # the class list follows the classifier, loaded as a run's are
        gr.on(
            [classifier.submit, classifier.blur],
            class_choices,
            [classifier, target],
            target,
            concurrency_id="device",
        )
    tab.wire(run, stop, [tab.model, prompt, classifier, target, photo], settings, outputs)


def thumbnails(paths: list[str] | None) -> list[str]:
    return list(paths or [])


def personalization_tab(tab: Tab) -> None:
    with gr.Tab(CAPABILITIES["personalization"].title):
        gr.Markdown(CAPABILITIES["personalization"].summary)
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(tab.first(0), label="Scene prompt", info=PHOTO_PROMPT)
                photo = tab.photo_field()
                references = gr.File(
                    tab.first(1),
                    file_count="multiple",
                    file_types=["image"],
                    label="Reference images",
                    height=140,
                )
                shown = gr.Gallery(
                    thumbnails(tab.first(1)),
                    label="References",
                    columns=6,
                    height=110,
                    elem_classes="pixels",
                    interactive=False,
                )
                clip = tab.model_field("clip", "CLIP model", CLIP_HELP)
                settings, run, stop = tab.controls()
            outputs = tab.outputs()
        with left:
            tab.examples([prompt, references, settings["seed"]], outputs)
    references.change(thumbnails, references, shown, queue=False)
    tab.wire(run, stop, [tab.model, prompt, references, clip, photo], settings, outputs)


def aesthetic_tab(tab: Tab) -> None:
    with gr.Tab(CAPABILITIES["aesthetic"].title):
        gr.Markdown(CAPABILITIES["aesthetic"].summary)
        with gr.Row():
            with gr.Column() as left:
                prompt = gr.Textbox(tab.first(0), label="Prompt", info=PHOTO_PROMPT)
                photo = tab.photo_field("Photo to improve (optional: else generate one)")
                with gr.Row():
                    clip = tab.model_field("aesthetic_clip", "CLIP model of the scorer", CLIP_HELP)
                    head = tab.model_field("aesthetic_head", "Aesthetic head", HEAD_HELP)
                settings, run, stop = tab.controls()
            outputs = tab.outputs()
        with left:
            tab.examples([prompt, photo, settings["seed"]], outputs)
    tab.wire(run, stop, [tab.model, prompt, photo, clip, head], settings, outputs)


TABS = {
    "text": text_guidance_tab,
    "vocabulary": vocabulary_tab,
    "personalization": personalization_tab,
    "aesthetic": aesthetic_tab,
}

EMBEDDED_WORLD = (
    "The embedded model draws a small world: flat circles, squares, triangles and stars in six colors "
    "(red, yellow, green, cyan, blue, purple, four shades each) on light or dark backgrounds, at 64 x 64 "
    "pixels. It runs on a CPU with no download; pass `--model` and the guide flags for a real generator "
    "and real guides."
)


def build_app(serving: Serving = LOCAL) -> gr.Blocks:
    """The whole UI, queued so that one job at a time runs on the device. Loads no model but the
    classifier whose labels the vocabulary tab lists."""
    presets, showcase = serving.presets(), Showcase.of(serving)
    with gr.Blocks(title="DOODL", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DOODL: Direct Optimization Of Diffusion Latents\n"
            "The initial noise of a text-to-image model (Stable Diffusion, SDXL, SD3, FLUX) is optimized "
            "through the whole sampling chain (EDICT, exactly invertible, or the model's plain chain) "
            "against a loss on the final image." + (f"\n\n{EMBEDDED_WORLD}" if serving.embedded() else "")
        )
        with gr.Row():
            model = gr.Dropdown(
                list(serving.generators()),
                value=serving.names.sd,
                label="Generator",
                info=generator_help(serving),
                allow_custom_value=True,  # a name it does not serve is refused by the run, in its own words
                scale=3,
                interactive=serving.allow_model_choice or len(serving.generators()) > 1,
            )
            gr.Markdown(device_note(serving))
        for name, build in TABS.items():
            build(Tab(name, serving, presets[name], showcase, model))
    return demo.queue(default_concurrency_limit=1, max_size=serving.queue_size)


def generator_help(serving: Serving) -> str:
    pair = f"The embedded world drawn by a UNet (sd) or a flow transformer (flow); {FLOW_CAVEAT}"
    embedded = pair if len(serving.generators()) > 1 else ""
    if not serving.allow_model_choice:
        return embedded or "The host's generator"
    return (
        f"{embedded}, or a" if embedded else "A"
    ) + " diffusers folder or hub id: SD 1.x / 2.x / XL, SD3, FLUX.1"


def generator_settings(model: str, serving: Serving, tab: str, names: list[str]) -> tuple[Any, ...]:
    """A tab's settings for the generator just chosen; left as they are for a name that does not load."""
    try:
        values = preset_values(serving.presets(model)[tab])
    except (OSError, ValueError):
        return tuple(gr.skip() for _ in names)
    return tuple(values[name] for name in names)


def device_note(serving: Serving) -> str:
    note = f"Running on **{MODELS.device}**."
    if serving.embedded():
        note += (
            " Each tab's settings are the embedded model's: fewer steps and iterations than the paper's "
            "50 and 50, and plain DDIM as the chain from noise, chosen by the quality benchmark (see README)."
        )
    limits = [f"{limit} {name}" for name, limit, _ in serving.limits() if limit is not None]
    if limits:
        note += " A run here takes at most " + ", ".join(limits) + "."
    if not serving.allow_model_choice:
        note += " The models are the host's."
    return note


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    block: bool = True,
    max_file_size: str | None = None,
) -> tuple[Any, str, str | None]:
    """Serve the app; with block=False, return at once (the server runs in a thread). port=None: the first
    free port from 7860 (gradio's search).

    Returns gradio's (server app, local URL, public URL if shared)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        prevent_thread_lock=not block,
        css=CSS,
        max_file_size=max_file_size,
        allowed_paths=[str(EXAMPLE_IMAGES)],  # the examples' images, whatever the working directory
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the DOODL app.")
    add_model_arguments(parser)
    add_serving_arguments(parser)
    parser.add_argument(
        "--cache-examples",
        action="store_true",
        help="run every example not stored yet and store its run in assets/cached_examples, then exit",
    )
    return parser.parse_args(argv)


def offline_unless_hub_reachable(reachable: Callable[[], bool] = hub_reachable) -> None:
    """Without the hub, make every hub lookup fail at once instead of after network retries (tens of
    seconds for a mistyped id): the hub library's own offline mode, which still loads cached models.
    The host's start-up calls it: the process is the host's, and `doodl` changes no process-wide setting."""
    if not hf_constants.HF_HUB_OFFLINE and not reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read it later
        hf_constants.HF_HUB_OFFLINE = True  # read at import, so set where diffusers and transformers look


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    offline_unless_hub_reachable()
    try:
        serving = serving_of(args)
    except ValueError as error:  # a model named two ways at once: the host's flags, said as argparse does
        raise SystemExit(f"app.py: error: {error}") from None
    if args.cache_examples:
        for generator in map(serving.with_generator, serving.generators()):
            store = ExampleStore.shipped(generator)
            build_examples(generator, store, MODELS)
            print(f"examples of {generator.names.sd} stored in {store.folder}")
        return
    demo = build_app(serving)
    launch(demo, args.host, args.port, args.share, max_file_size=serving.max_file_size)


if __name__ == "__main__":
    main()
