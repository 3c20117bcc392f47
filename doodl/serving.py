"""Serving DOODL to visitors: which models the host serves, what one run may cost, the run settings' one
schema, and the checks every request passes before anything loads. No interface code: the app shows
what is here, and tests use it without a browser.

An app others can reach (a shared link, a non-loopback host, a Space) serves the host's models only,
within a per-run budget (`Serving.public`); a local app lets its user name any model.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from PIL import Image

from doodl.capabilities import (
    CAPABILITIES,
    GUIDE_NAMES,
    LOSSES,
    LossKind,
    Target,
    load_guide,
    roles_of,
    weighted_terms,
)
from doodl.edict import FEW_STEPS
from doodl.embedded import FLOW, PAPER, SD, Examples, Preset, examples, is_embedded, presets
from doodl.gradient import MODES
from doodl.guides import HPS_ARCHITECTURE, IMAGEREWARD_TOKENIZER
from doodl.pipeline import LatentDiffusion, load_pipeline
from doodl.settings import REGULARIZERS, SAMPLERS, STEP_RULES, DoodlSettings

ROOT = Path(__file__).resolve().parent.parent  # the app's folder: default model paths are relative to it
EMBEDDED = "assets/embedded"  # relative to ROOT, as shown on the page

# Larger uploads are refused before decoding: the model sees 64-1024 px, and a huge file only costs memory.
MAX_IMAGE_SIDE = 4096
# Seeds feed torch generators, which take 64-bit integers; a run draws its crops from the same seed.
MAX_SEED = 2**63 - 1


def locate(name: str) -> str:
    """A model name as given, or, for a relative path found in the app's folder (like the defaults), that
    path: the app then runs from any working directory. In a name of two words (`ModelNames`), the first
    is found so too."""
    name = name.strip()
    first, _, second = name.partition(" ")
    for path, rest in ((name, ""), (first, second)):
        if Path(path).expanduser().exists():
            return name
        if (ROOT / path).exists():
            return f"{ROOT / path} {rest}".strip()
    return name


# --- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNames:
    """Where each model comes from (a folder, a file or a hub id); by default the embedded ones. The
    guide fields are `doodl.capabilities` roles."""

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
    imagereward: str = ""  # an ImageReward checkpoint file (ImageReward.pt)
    imagereward_tokenizer: str = IMAGEREWARD_TOKENIZER  # its BERT tokenizer: a hub id or folder
    # Replaces the VAE of the host's generator (e.g. SDXL's fixed for float16); blank: its own.
    vae: str = ""

    def guide(self, role: str) -> str:
        """The model of a guide role, with its second word where it has one (`split_reference`)."""
        if role == "pickscore":
            return f"{self.pickscore} {self.pickscore_processor}".strip() if self.pickscore else ""
        if role == "hps":
            return f"{self.hps} {self.hps_architecture}".strip() if self.hps else ""
        if role == "imagereward":
            return f"{self.imagereward} {self.imagereward_tokenizer}".strip() if self.imagereward else ""
        return getattr(self, role)

    def offered(self, capability: str) -> list[LossKind]:
        """The losses a capability offers: its own, and those of the extra guides the host named."""
        spec = CAPABILITIES[capability]
        extra = [name for name in spec.extra if all(self.guide(role) for role in LOSSES[name].guides)]
        return [LOSSES[name] for name in (*spec.losses, *extra)]


# How each model a visitor may name is called in messages.
MODEL_KINDS = {"sd": "generator model", **GUIDE_NAMES}


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

    def loaded(self) -> set[str]:
        """The names of the models held now."""
        return {name for _, name, _ in self._models}

    def pipeline(self, name: str, vae: str = "") -> LatentDiffusion:
        """A generator (SD, SDXL, SD3, FLUX), with another VAE when `vae` names one (cached apart from its
        own)."""
        name, vae = locate(required(name, MODEL_KINDS["sd"])), vae and locate(vae)
        key = f"{name} + {vae}" if vae else name
        # In its family's dtype for the device (`load_pipeline`: float32 on a CPU; FLUX in bfloat16 on a GPU).
        return self.get("sd", key, lambda: load_pipeline(name, self.device, vae=vae or None))

    def guide(self, kind: str, name: str) -> Any:
        name = locate(required(name, kind))
        return self.get(kind, name, lambda: load_guide(kind, name, self.device, self.dtype))


def pick_device() -> tuple[str, torch.dtype]:
    """The GPU in half precision when there is one, else the CPU in full precision."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


# --- the run settings: one schema for the widgets, the checks and the presets -----------------------


@dataclass(frozen=True)
class Setting:
    """One run setting: its keyword (the run functions' and the API's), how the page shows it, and its
    default in a tab's preset."""

    name: str
    label: str
    kind: type  # int, float, str or bool
    default: Callable[[Preset], Any]
    info: str = ""
    row: int | None = 0  # settings of one row sit side by side; None: outside the settings panel
    slider: tuple[float, float, float] | None = None  # (minimum, maximum, step)
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # checked here; DoodlSettings checks its own fields
    range_note: str = ""


_SIZE = "pixels, a multiple of the VAE's 8; 0: the model's own"

SETTINGS: tuple[Setting, ...] = (
    Setting("steps", "Sampling steps", int, lambda p: p.settings.steps, "paper: 50"),
    Setting("iterations", "Optimization iterations", int, lambda p: p.settings.iterations, "paper: 50"),
    Setting(
        "seed",
        "Seed",
        int,
        lambda p: p.settings.seed,
        "of the noise and the crops",
        minimum=0,
        range_note=f"a whole number from 0 to {MAX_SEED}",
    ),
    Setting(
        "start_samples",
        "Start from the best of",
        int,
        lambda p: p.settings.start_samples,
        "unguided samples, by the guide; paper: 1, the seed's own",
        minimum=1,
        range_note="1 or more samples",
    ),
    Setting("learning_rate", "Learning rate", float, lambda p: p.settings.learning_rate, "paper: 1", row=1),
    # Elements above the clip step by the clip, the rest by rate x gradient; on the embedded guides, from 0 to
    # 82 % of them are above it, by prompt (benchmarks/results/steps.md).
    Setting(
        "grad_clip",
        "Gradient clip",
        float,
        lambda p: p.settings.grad_clip,
        "largest step per element; paper: 0.001",
        row=1,
    ),
    Setting(
        "cutouts",
        "Cutouts",
        int,
        lambda p: p.cutouts,
        "random views scored per image",
        row=1,
        minimum=0,
        range_note="0 (whole image) or more crops",
    ),
    Setting(
        "mode", "Backpropagation", str, lambda p: p.settings.mode, "reversible: EDICT", row=1, choices=MODES
    ),
    Setting(
        "sampler",
        "Sampling chain",
        str,
        lambda p: p.settings.sampler,
        "edict: the paper's, exactly invertible; ddim: the model's plain chain (DDIM, Euler on SD3 / FLUX), "
        f"one call a step, stored for the gradient; auto: ddim below {FEW_STEPS} steps. A photo's is EDICT's",
        row=2,
        choices=SAMPLERS,
    ),
    Setting(
        "p",
        "EDICT mixing weight p",
        float,
        lambda p: p.settings.p,
        "paper: 0.93",
        row=2,
        slider=(0.5, 1.0, 0.01),
    ),
    Setting(
        "guidance_scale",
        "Guidance scale",
        float,
        lambda p: p.settings.guidance_scale,
        "classifier-free (1: the prompt alone); FLUX.1-dev: its guidance embedding; schnell: none",
        row=3,
        slider=(0.0, 20.0, 0.5),
    ),
    Setting(
        "one_step_scale",
        "One-step guidance scale",
        float,
        lambda p: p.one_step_scale,
        "strength of the baseline shown side by side",
        row=4,
        minimum=0,
        range_note="it must be 0 or more",
    ),
    # Only a run from a photo uses it (DoodlSettings.fidelity); from noise it changes nothing.
    Setting(
        "fidelity",
        "Fidelity to the photo",
        float,
        lambda p: p.settings.fidelity,
        "from a photo: its latents stay within (1 - fidelity) x their norm of its inversion; 0: no limit",
        row=4,
        slider=(0.0, 1.0, 0.01),
    ),
    # Only a run from a photo uses it too (DoodlSettings.photo_weight).
    Setting(
        "photo_weight",
        "Closeness to the photo",
        float,
        lambda p: p.settings.photo_weight,
        "from a photo: weight of the pixel distance to it in the loss; 0: none",
        row=4,
        minimum=0,
        range_note="it must be 0 or more",
    ),
    # Only a run from a photo uses it too (DoodlSettings.photo_strength).
    Setting(
        "photo_strength",
        "Strength of the edit",
        float,
        lambda p: p.settings.photo_strength,
        "from a photo: the fraction of the chain it is inverted through and edited; 1: all of it (paper)",
        row=4,
        slider=(0.05, 1.0, 0.05),
    ),
    Setting(
        "step_rule",
        "Step rule",
        str,
        lambda p: p.settings.step_rule,
        "sgd: the paper's (element-wise clip, momentum); nesterov: ReNO's (norm clip); adam",
        row=3,
        choices=STEP_RULES,
    ),
    Setting(
        "regularizer",
        "Keep the noise Gaussian by",
        str,
        lambda p: p.settings.regularizer,
        "renormalize: the paper's (its norm kept); norm: ReNO's penalty; white: a projection onto white "
        "noise's statistics and spectrum; from a photo: renormalize",
        row=3,
        choices=REGULARIZERS,
    ),
    Setting(
        "regularizer_weight",
        "Norm penalty weight",
        float,
        lambda p: p.settings.regularizer_weight,
        "of the norm regularizer; ReNO: 0.01",
        row=3,
        minimum=0,
        range_note="it must be 0 or more",
    ),
    Setting("height", "Height", int, lambda p: p.settings.height or 0, _SIZE, row=5),
    Setting("width", "Width", int, lambda p: p.settings.width or 0, _SIZE, row=5),
    Setting(
        "compare", "Show unguided / one-step guidance / DOODL side by side", bool, lambda p: True, row=None
    ),
)

SETTING_NAMES = tuple(setting.name for setting in SETTINGS)


def preset_values(preset: Preset) -> dict[str, Any]:
    """A preset as the run settings' keywords."""
    return {setting.name: setting.default(preset) for setting in SETTINGS}


@dataclass(frozen=True)
class RunOptions:
    """A run's DOODL settings, plus what the app adds: the loss's crops and the side-by-side view."""

    settings: DoodlSettings
    cutouts: int
    compare: bool
    one_step_scale: float


def _checked(setting: Setting, value: Any) -> Any:
    if value is None:  # an API call may send nulls
        if setting.name in ("height", "width"):
            return 0
        raise ValueError(f"setting {setting.name} is empty")
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(f"setting {setting.name}={value!r} is out of range: {setting.range_note}")
    if setting.kind is int and value != int(value):
        unit = " of pixels" if setting.name in ("height", "width") else ""
        raise ValueError(f"setting {setting.name}={value!r} is not a whole number{unit}")
    if setting.name == "seed" and value > MAX_SEED:
        raise ValueError(f"setting seed={value!r} is out of range: {setting.range_note}")
    return setting.kind(value)


def run_options(**values: Any) -> RunOptions:
    """Run settings from their keywords (widgets or an API call), each checked by the schema;
    DoodlSettings and the model name any value out of their range. Height or width 0: the model's own."""
    unknown = set(values) - set(SETTING_NAMES)
    if unknown:
        raise ValueError(f"unknown setting {sorted(unknown)[0]!r}")
    paper = preset_values(PAPER)  # what a caller leaves out
    given = {s.name: _checked(s, values.get(s.name, paper[s.name])) for s in SETTINGS}
    doodl_fields = {field.name for field in fields(DoodlSettings)}
    sizes = {"height": given["height"] or None, "width": given["width"] or None}
    settings = DoodlSettings(
        **{name: value for name, value in {**given, **sizes}.items() if name in doodl_fields}
    )
    return RunOptions(settings, given["cutouts"], given["compare"], given["one_step_scale"])


# --- what a visitor may ask -----------------------------------------------------------------------


def required(text: str | None, what: str, hint: str = "") -> str:
    if not text or not text.strip():
        raise ValueError(f"the {what} is empty" + (f": {hint}" if hint else ""))
    return text.strip()


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


# The budgets of one run, `Serving` fields; each has its host flag (`doodl.cli`).
BUDGETS = ("max_steps", "max_iterations", "max_cutouts", "max_references", "max_start_samples", "queue_size")


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
    max_start_samples: int | None = None
    queue_size: int | None = None  # runs waiting for the device beyond the one running
    max_file_size: str | None = None  # of an upload, in gradio's notation ("8mb"); checked before saving
    compile: bool = False  # every run's denoiser through torch.compile (`DoodlSettings.compile`)

    @classmethod
    def public(cls, names: ModelNames = ModelNames(), **overrides: Any) -> Serving:
        """The host's models only, and runs of about a minute: on two CPU cores, the embedded model's
        presets (20 steps x 20 DDIM iterations: benchmarks/results/default-runs.md); on a GPU, a real
        model's 50 steps x 8 iterations (~10 s per iteration for the official code on an A100)."""
        max_steps, max_iterations = 50, 8
        sd = locate(names.sd)
        if is_embedded(sd):
            own = [preset.settings for preset in presets(sd).values()]
            max_steps, max_iterations = max(s.steps for s in own), max(s.iterations for s in own)
        defaults = {
            "allow_model_choice": False,
            "max_steps": max_steps,
            "max_iterations": max_iterations,
            "max_cutouts": 16,
            "max_references": 8,
            "max_start_samples": 4,
            "queue_size": 10,
            "max_file_size": "8mb",
        }
        chosen = {name: value for name, value in overrides.items() if value is not None}
        return cls(names, **{**defaults, **chosen})

    def model(self, role: str, requested: str | None) -> str:
        """The model a run may use for `role` ("sd" or a guide role) when a visitor asks for `requested`.

        Without model choice, only the host's is served (a blank field means it too), and the refusal says
        nothing of the requested name: whether a file exists on the server is not a visitor's business."""
        if self.allow_model_choice:
            return required(requested, MODEL_KINDS[role])
        chosen = self.names.guide(role) if role != "sd" else self.names.sd
        if requested is None or requested.strip() in ("", chosen):
            return chosen
        if role == "sd" and requested.strip() in self.generators():
            return requested.strip()
        raise ValueError(
            f"this app serves the {MODEL_KINDS[role]} its host chose, {chosen}; visitors cannot name "
            "another (the host allows it with --allow-model-choice)"
        )

    def limits(self) -> list[tuple[str, int | None, str]]:
        """(what, limit, flag) of each budget of one run."""
        return [
            ("steps", self.max_steps, "--max-steps"),
            ("iterations", self.max_iterations, "--max-iterations"),
            ("cutouts", self.max_cutouts, "--max-cutouts"),
            ("reference images", self.max_references, "--max-references"),
            ("start samples", self.max_start_samples, "--max-start-samples"),
        ]

    def check(self, options: RunOptions, references: int = 0) -> None:
        """Refuse a run that asks for more than the host allows, naming the limit."""
        settings = options.settings
        asked = (settings.steps, settings.iterations, options.cutouts, references, settings.start_samples)
        for (name, limit, flag), value in zip(self.limits(), asked):
            if limit is not None and value > limit:
                raise ValueError(
                    f"{name}={value} is over this app's limit of {limit} per run (set by the host: {flag})"
                )

    def hosted(self, options: RunOptions) -> RunOptions:
        """A visitor's run as the host runs it: how the calls run is the host's choice, not a setting."""
        return replace(options, settings=replace(options.settings, compile=self.compile))

    def within_budget(self, preset: Preset) -> Preset:
        """A tab's preset, cut down to the budget so that its defaults always run."""
        settings = preset.settings
        steps, iterations, starts = settings.steps, settings.iterations, settings.start_samples
        settings = replace(
            settings,
            steps=min(steps, self.max_steps or steps),
            iterations=min(iterations, self.max_iterations or iterations),
            start_samples=min(starts, self.max_start_samples or starts),
        )
        return replace(
            preset, settings=settings, cutouts=min(preset.cutouts, self.max_cutouts or preset.cutouts)
        )

    def presets(self, model: str | None = None) -> dict[str, Preset]:
        """Each tab's settings for a generator (the host's by default): those the quality benchmark chose
        for the embedded models, else the paper's; cut down to the budget."""
        chosen = locate(model or self.names.sd)
        return {name: self.within_budget(preset) for name, preset in presets(chosen).items()}

    def examples(self) -> Examples:
        """The examples the host's generator shows (the embedded flow transformer's own, else the UNet's)."""
        return examples(locate(self.names.sd))

    def with_generator(self, model: str) -> Serving:
        """The same host serving another of its generators (`generators`) as its own."""
        return replace(self, names=replace(self.names, sd=model))

    def generators(self) -> tuple[str, ...]:
        """The generators a visitor picks from: the host's, and beside the embedded UNet the embedded flow
        transformer (both the host's when it serves the embedded world)."""
        flow = f"{EMBEDDED}/flow"
        pair = Path(locate(self.names.sd)).resolve() == SD.resolve() and (FLOW / "model_index.json").is_file()
        return (self.names.sd, flow) if pair else (self.names.sd,)

    def embedded(self) -> bool:
        return is_embedded(locate(self.names.sd))


@dataclass(frozen=True)
class Request:
    """A run a visitor asked for, checked: every model is one the host serves, every setting in range."""

    capability: str
    terms: tuple[tuple[str, float], ...]  # (`doodl.capabilities.LOSSES` name, weight): the guide's loss
    model: str
    prompt: str
    guides: Mapping[str, str]  # role -> model name
    target: Target
    options: RunOptions
    photo: Image.Image | None = None  # start from this photo (EDICT inversion) instead of noise
    vae: str = ""  # the host's VAE for its own model (`ModelNames.vae`); never for another model


def request(
    serving: Serving,
    capability: str,
    model: str | None,
    prompt: str | None,
    guides: Mapping[str, str | None],
    settings: Mapping[str, Any],
    guide: str | None = None,
    target_class: str | None = None,
    references: Sequence[str] | None = None,
    photo: str | None = None,
) -> Request:
    """Check a visitor's run of `capability` before anything loads: the prompt, the settings and the budget,
    the guides chosen (their labels, weighted: 'CLIP=1, PickScore=0.05'; one label alone weighs 1), the
    models, the uploaded images.

    `guides` holds the models the visitor may name, by role; the rest are the host's."""
    prompt = required(prompt, "prompt", "describe the image to generate")
    options = serving.hosted(run_options(**settings))
    offered = {kind.label: kind.name for kind in serving.names.offered(capability)}
    written = (guide or next(iter(offered))).split(",")
    terms = weighted_terms(written, offered, refusal="guide {!r} is not served here")
    if capability == "personalization" and not references:
        raise ValueError("no reference image: upload at least one image of the entity to draw")
    serving.check(options, references=len(references or ()))
    model = serving.model("sd", model)
    names = {
        role: serving.model(role, guides[role]) if role in guides else serving.names.guide(role)
        for role in roles_of([name for name, _ in terms])
    }
    if capability == "vocabulary":
        target_class = required(target_class, "target class")
    target = Target(
        text=prompt,
        references=tuple(read_image(path, "reference image") for path in references or ()),
        target_class=target_class,
    )
    image = read_image(photo, "photo") if photo else None
    vae = serving.names.vae if model == serving.names.sd else ""
    return Request(capability, tuple(terms), model, prompt, names, target, options, image, vae)


# --- who can reach the app, and the hub ------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def on_space() -> bool:
    """Whether the app runs on a Hugging Face Space (which sets SPACE_ID in every Space's environment)."""
    return bool(os.environ.get("SPACE_ID"))


def reachable_by_others(host: str, share: bool) -> bool:
    return share or host not in LOOPBACK or on_space()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection, within `timeout` seconds."""
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
