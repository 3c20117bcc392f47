"""What each capability guides with: the guides a loss loads and how it builds itself from them.

One table for the app, the command line, the benchmarks and the tests. A loss names the guides it needs by
role (the role is also the field of `doodl.serving.ModelNames` and of the command line that names the
model); `load_guide` turns a kind and a name into a guide, in one place. Adding a guide is one entry in
`GUIDE_LOADERS` and one in `LOSSES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from doodl.guides import (
    HPS_ARCHITECTURE,
    HPS_CHECKPOINT_URL,
    IMAGEREWARD_CHECKPOINT_URL,
    IMAGEREWARD_TOKENIZER,
    GuideNotFoundError,
    check_clip_name,
    load_aesthetic_head,
    load_classifier,
    load_clip,
    load_hps,
    load_imagereward,
    load_pickscore,
)
from doodl.losses import (
    CUT_POWER,
    CUTOUTS,
    Loss,
    WeightedSum,
    aesthetic_loss,
    classifier_loss,
    clip_image_loss,
    clip_text_loss,
    hps_loss,
    imagereward_loss,
    pickscore_loss,
    symmetry_loss,
)

# --- guides ---------------------------------------------------------------------------------------


def split_reference(text: str) -> tuple[str, str | None]:
    """A model reference of two words, 'ViT-L-14 openai' (architecture and tag) or 'HPS_v2.1.pt ViT-H-14'
    (file and architecture), into its parts; a path that exists, or a hub reference, stays whole."""
    text = text.strip()
    if text.startswith(("hf-hub:", "local-dir:")) or Path(text).expanduser().exists():
        return text, None
    name, _, second = text.partition(" ")
    return name, second.strip() or None


def _clip(name: str, device: str, dtype: torch.dtype) -> Any:
    return load_clip(*split_reference(name), device=device, dtype=dtype)


def _classifier(name: str, device: str, dtype: torch.dtype) -> Any:
    return load_classifier(name, device, dtype)


def _aesthetic_head(name: str, device: str, dtype: torch.dtype) -> Any:
    # 'laion': the LAION ViT-L-14 head, downloaded into the cache on first use.
    return load_aesthetic_head(None if name == "laion" else name).to(device)


def _pickscore(name: str, device: str, dtype: torch.dtype) -> Any:
    model, processor = split_reference(name)
    return load_pickscore(model, processor, device, dtype)


def _hps(name: str, device: str, dtype: torch.dtype) -> Any:
    checkpoint, architecture = split_reference(name)
    return load_hps(checkpoint, architecture or HPS_ARCHITECTURE, device, dtype)


def _imagereward(name: str, device: str, dtype: torch.dtype) -> Any:
    checkpoint, tokenizer = split_reference(name)
    return load_imagereward(checkpoint, tokenizer or IMAGEREWARD_TOKENIZER, device, dtype)


# kind -> loader(name, device, dtype); a name may carry a second word (see `split_reference`).
GUIDE_LOADERS: Mapping[str, Callable[[str, str, torch.dtype], Any]] = MappingProxyType(
    {
        "clip": _clip,
        "classifier": _classifier,
        "aesthetic_head": _aesthetic_head,
        "pickscore": _pickscore,
        "hps": _hps,
        "imagereward": _imagereward,
    }
)

# role -> kind: the aesthetic scorer's CLIP is a CLIP like the text guide's, named apart.
GUIDE_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "clip": "clip",
        "classifier": "classifier",
        "aesthetic_clip": "clip",
        "aesthetic_head": "aesthetic_head",
        "pickscore": "pickscore",
        "hps": "hps",
        "imagereward": "imagereward",
    }
)

# How each role is named in messages.
GUIDE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "clip": "CLIP model",
        "classifier": "classifier",
        "aesthetic_clip": "CLIP model of the scorer",
        "aesthetic_head": "aesthetic head",
        "pickscore": "PickScore model",
        "hps": f"HPSv2 checkpoint ({HPS_CHECKPOINT_URL})",
        "imagereward": f"ImageReward checkpoint ({IMAGEREWARD_CHECKPOINT_URL})",
    }
)


def load_guide(
    kind: str, name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The guide of `kind` (a key of `GUIDE_LOADERS`) that `name` refers to: a folder, a file, a hub id,
    or an architecture and its weights tag."""
    if kind not in GUIDE_LOADERS:
        raise ValueError(f"unknown kind of guide {kind!r}: choose one of {', '.join(GUIDE_LOADERS)}")
    if not name or not name.strip():
        raise ValueError(f"the {kind} is empty")
    check_guide_name(kind, name.strip())
    return GUIDE_LOADERS[kind](name.strip(), str(device), dtype)


# Files a guide may be named by: a path to one of these is a file to find here, never a hub id.
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def check_guide_name(kind: str, name: str) -> None:
    """Refuse a guide's name that cannot work, before anything loads or downloads: a CLIP architecture
    without known weights, a path that is not here, a hub id that cannot be one."""
    first, second = split_reference(name)
    if kind == "clip":
        check_clip_name(first, second)
    elif kind == "aesthetic_head" and first == "laion":
        return
    elif kind == "hps":  # a checkpoint file not here is `load_hps`'s to explain (where to download it)
        if Path(first).expanduser().is_file():
            check_clip_name(second or HPS_ARCHITECTURE, str(Path(first).expanduser()))
    elif kind == "imagereward":  # likewise a checkpoint not here; the tokenizer: a folder or a hub id
        if second:
            check_folder_or_hub_id(second, "BERT tokenizer of ImageReward")
    elif kind == "pickscore":
        for part in (first, second) if second else (first,):
            check_folder_or_hub_id(part, "PickScore model or processor")
    else:  # a classifier or an aesthetic head: one name
        check_folder_or_hub_id(name, GUIDE_NAMES.get(kind, kind))


def check_folder_or_hub_id(name: str, what: str) -> None:
    """A path that exists, or a hub id: a name that looks like a path (or a weights file) must exist."""
    path = Path(name).expanduser()
    if path.exists():
        return
    if name.startswith(("/", ".", "~")) or path.suffix in WEIGHT_FILES:
        raise GuideNotFoundError(f"the {what} {name} does not exist here")
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise GuideNotFoundError(
            f"the {what} {name!r} does not exist here and is not a hub id ({error})"
        ) from error


# --- losses ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a loss aims at, besides its guides: the text, reference images, a class, a score."""

    text: str = ""
    references: tuple[Image.Image, ...] = ()
    target_class: int | str | None = None
    score: float | None = None  # the aesthetic score to aim at; None: as high as it goes


@dataclass(frozen=True)
class Crops:
    """The random views each guide scores (the paper's 16 cutouts; `doodl.losses.cutouts`), drawn from
    `generator`; without one, each loss draws from its own, seeded alike (`doodl.losses.own_generator`)."""

    cutouts: int = CUTOUTS
    cut_power: float = CUT_POWER
    generator: torch.Generator | None = None

    def keywords(self) -> dict[str, Any]:
        return {"cutouts": self.cutouts, "cut_power": self.cut_power, "generator": self.generator}


Build = Callable[[Sequence[Any], Target, Crops], Loss]


def _needs_text(target: Target, loss: str) -> str:
    if not target.text.strip():
        raise ValueError(f"the {loss} loss needs a text to aim at")
    return target.text


def _clip_text(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    return clip_text_loss(guides[0], _needs_text(target, "clip-text"), **crops.keywords())


def _clip_image(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    if not target.references:
        raise ValueError("no reference image: give at least one image of the entity to draw")
    return clip_image_loss(guides[0], list(target.references), **crops.keywords())


def _classifier_target(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    if target.target_class is None or str(target.target_class).strip() == "":
        raise ValueError("the target class is empty: name one of the classifier's labels")
    guides[0].class_index(target.target_class)  # an unknown class fails now, naming close ones
    return classifier_loss(guides[0], target.target_class, **crops.keywords())


def _aesthetic(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    clip, head = guides
    return aesthetic_loss(clip, head, target.score, **crops.keywords())


def _pickscore(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    return pickscore_loss(guides[0], _needs_text(target, "pickscore"), **crops.keywords())


def _hps(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    return hps_loss(guides[0], _needs_text(target, "hps"), **crops.keywords())


def _imagereward_target(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    return imagereward_loss(guides[0], _needs_text(target, "imagereward"), **crops.keywords())


def _symmetry(guides: Sequence[Any], target: Target, crops: Crops) -> Loss:
    return symmetry_loss()


@dataclass(frozen=True)
class LossKind:
    """A guidance loss: the guides it loads (by role), how it is built, and how the page names it."""

    name: str  # the command line's --loss
    label: str  # the app's guide choice
    description: str  # what the loss measures, as the loss plot says it
    guides: tuple[str, ...]
    build: Build


LOSSES: Mapping[str, LossKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            LossKind(
                "clip-text",
                "CLIP",
                "CLIP's spherical distance between the image and the prompt",
                ("clip",),
                _clip_text,
            ),
            LossKind(
                "clip-image",
                "CLIP",
                "CLIP's spherical distance between the image and the references",
                ("clip",),
                _clip_image,
            ),
            LossKind(
                "classifier",
                "Classifier",
                "cross-entropy of the classifier to the target class",
                ("classifier",),
                _classifier_target,
            ),
            LossKind(
                "aesthetic",
                "Aesthetic",
                "minus the predicted aesthetic score",
                ("aesthetic_clip", "aesthetic_head"),
                _aesthetic,
            ),
            LossKind(
                "pickscore",
                "PickScore",
                "minus PickScore's reward for the prompt",
                ("pickscore",),
                _pickscore,
            ),
            LossKind("hps", "HPSv2", "minus HPSv2's score for the prompt", ("hps",), _hps),
            LossKind(
                "imagereward",
                "ImageReward",
                "minus ImageReward's normalized reward for the prompt",
                ("imagereward",),
                _imagereward_target,
            ),
            LossKind("symmetry", "Symmetry", "left-right mirror difference", (), _symmetry),
        )
    }
)


def loss_kind(name: str) -> LossKind:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose among {', '.join(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str, guides: Mapping[str, Any], target: Target, crops: Crops = Crops()) -> Loss:
    """The loss `name` over its guides, taken by role from `guides` (see `load_guides`)."""
    kind = loss_kind(name)
    return kind.build([guides[role] for role in kind.guides], target, crops)


def roles_of(names: Sequence[str]) -> list[str]:
    """The guide roles the losses `names` need, each once, in their order."""
    return list(dict.fromkeys(role for name in names for role in loss_kind(name).guides))


def load_guides(
    names: Sequence[str],
    models: Mapping[str, str],
    load: Callable[[str, str], Any] | None = None,
) -> dict[str, Any]:
    """The guides of the losses `names`, by role, each loaded once: `models` names a model per role, and
    `load(kind, name)` loads one (by default `load_guide` on the CPU; the app passes its model cache); a
    model named for two roles (the text guide's CLIP and the scorer's) is loaded once."""
    load = load or load_guide
    roles = roles_of(names)
    missing = [role for role in roles if not (models.get(role) or "").strip()]
    if missing:
        raise ValueError(f"the {GUIDE_NAMES[missing[0]]} is not given")
    loaded: dict[tuple[str, str], Any] = {}  # one model serving two roles is loaded once
    for role in roles:
        key = (GUIDE_KINDS[role], models[role].strip())
        if key not in loaded:
            loaded[key] = load(*key)
    return {role: loaded[(GUIDE_KINDS[role], models[role].strip())] for role in roles}


def build_weighted(
    terms: Sequence[tuple[str, float]], guides: Mapping[str, Any], target: Target, crops: Crops = Crops()
) -> Loss:
    """The sum of weighted losses (e.g. text plus aesthetics), each term named by its loss for its curve;
    one unweighted term is that loss itself."""
    if len(terms) == 1 and terms[0][1] == 1.0:
        return build_loss(terms[0][0], guides, target, crops)
    return WeightedSum([(name, weight, build_loss(name, guides, target, crops)) for name, weight in terms])


def weighted_terms(
    items: Sequence[str], known: Mapping[str, str] | None = None, refusal: str = "unknown loss {!r}"
) -> list[tuple[str, float]]:
    """(loss, weight) of each 'NAME[=WEIGHT]' (weight 1 when left out): the command line's --loss, and the
    app's guides ('CLIP=1, PickScore=0.05', split at the commas). `known` maps what a caller may write (the
    page's labels) to loss names; by default the loss names themselves; another name is refused in the words
    of `refusal`. A name twice, a weight that is not a number or below 0, or no weight above 0, is
    refused."""
    known = known if known is not None else {name: name for name in LOSSES}
    terms: dict[str, float] = {}
    for item in (item.strip() for item in items if item.strip()):
        written, _, weight = (part.strip() for part in item.partition("="))
        if written not in known:
            raise ValueError(f"{refusal.format(written)}: choose among {', '.join(known)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"the weight of {written} is {weight!r}, not a number") from None
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"the weight of {written} is {weight}: it must be a number of 0 or more")
        if known[written] in terms:
            raise ValueError(f"guide {written!r} is named twice: give each guide once, with its weight")
        terms[known[written]] = value
    if not any(terms.values()):
        raise ValueError(f"no guide has a weight above 0: name at least one, e.g. {next(iter(known))}=1")
    return [(name, weight) for name, weight in terms.items() if weight > 0]


# --- capabilities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capability:
    """One of the paper's four demonstrations: the losses it may be guided by (the first is the default)."""

    name: str
    title: str
    summary: str
    losses: tuple[str, ...]
    extra: tuple[str, ...] = field(default=())  # guides the host may add (text guidance's reward models)


CAPABILITIES: Mapping[str, Capability] = MappingProxyType(
    {
        capability.name: capability
        for capability in (
            Capability(
                "text",
                "Text guidance",
                "CLIP similarity to the prompt steers the whole sampling chain towards it; from an "
                "uploaded photo (exact EDICT inversion), it edits the photo towards the prompt.",
                ("clip-text",),
                extra=("pickscore", "hps", "imagereward"),
            ),
            Capability(
                "vocabulary",
                "Vocabulary expansion",
                "A fine-grained classifier steers a generic prompt, or an uploaded photo, to a class the "
                "text cannot ask for.",
                ("classifier",),
            ),
            Capability(
                "personalization",
                "Personalization",
                "CLIP similarity to reference images puts their entity into the prompt's scene, or into an "
                "uploaded photo.",
                ("clip-image",),
            ),
            Capability(
                "aesthetic",
                "Aesthetic improvement",
                "An aesthetic scorer on CLIP image embeddings improves a generated image, or a real photo "
                "after exact EDICT inversion. The loss is minus the predicted score (1 to 10): lower is "
                "more beautiful.",
                ("aesthetic",),
            ),
        )
    }
)


def capability_of(loss: str) -> str:
    """The capability whose settings (`doodl.embedded.presets`) a loss runs with; text for any other."""
    for capability in CAPABILITIES.values():
        if loss in capability.losses + capability.extra:
            return capability.name
    return "text"
