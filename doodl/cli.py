"""The command lines' flags, owned here: what a run is made with (the generator, the losses with their guides
and targets, the settings, the device) and what an app serves (its models and its budget per run).
`python -m doodl` (one image), `python -m doodl batch` (a prompt set) and `app.py` (the host's choices)
read them from here.

A model is named in one form everywhere, flags, the app's fields and its API alike (`ModelNames`): a
folder, a file, a hub id, or two words where one model needs two names: an open_clip architecture and its
weights tag ("ViT-L-14 openai"), an HPSv2 file and its architecture, PickScore and its processor.
`--clip-pretrained TAG` and `--aesthetic-pretrained TAG` are taken as that second word where the model
flag names an architecture alone.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from doodl.capabilities import (
    GUIDE_KINDS,
    LOSSES,
    Crops,
    Target,
    build_weighted,
    capability_of,
    load_guide,
    load_guides,
    weighted_terms,
)
from doodl.embedded import presets
from doodl.guides import PICKSCORE_MODEL
from doodl.losses import Loss
from doodl.optimize import DoodlSettings
from doodl.serving import BUDGETS, ModelNames, Serving, locate, reachable_by_others

# --- models ---------------------------------------------------------------------------------------


APP_MODELS = ModelNames()  # the embedded models, and no reward model unless the host names one


def add_model_arguments(parser: argparse.ArgumentParser, defaults: ModelNames = APP_MODELS) -> None:
    """The models a run or an app uses, one flag each (`ModelNames`); by default the embedded ones."""
    models = parser.add_argument_group(
        "models (an app's: the host's choice, read-only to visitors when public)"
    )
    models.add_argument(
        "--model",
        default=defaults.sd,
        help="generator: SD 1.x / 2.x / XL, SD3 / SD3.5, FLUX.1; folder or hub id",
    )
    models.add_argument("--vae", default=defaults.vae, help="replace --model's VAE: folder or hub id")
    models.add_argument(
        "--clip",
        default=defaults.clip,
        help="CLIP of text guidance and personalization: folder, hf-hub:ID, or 'ARCHITECTURE TAG'",
    )
    models.add_argument(
        "--clip-pretrained", metavar="TAG", help="--clip's weights tag, if --clip is an architecture"
    )
    models.add_argument(
        "--classifier",
        default=defaults.classifier,
        help="classifier of vocabulary expansion: folder or hub id",
    )
    models.add_argument(
        "--aesthetic-clip", default=defaults.aesthetic_clip, help="CLIP of the aesthetic scorer"
    )
    models.add_argument("--aesthetic-pretrained", metavar="TAG", help="--aesthetic-clip's weights tag")
    models.add_argument(
        "--aesthetic-head", default=defaults.aesthetic_head, help="aesthetic head file; 'laion'"
    )
    models.add_argument("--pickscore", default=defaults.pickscore, help="PickScore model: folder or hub id")
    models.add_argument(
        "--pickscore-processor", default=defaults.pickscore_processor, help="its CLIP processor"
    )
    models.add_argument("--hps", default=defaults.hps, metavar="FILE", help="HPSv2 checkpoint file")
    models.add_argument(
        "--hps-architecture", default=defaults.hps_architecture, help="open_clip architecture of --hps"
    )
    models.add_argument(
        "--imagereward", default=defaults.imagereward, metavar="FILE", help="ImageReward checkpoint file"
    )
    models.add_argument(
        "--imagereward-tokenizer", default=defaults.imagereward_tokenizer, help="its BERT tokenizer"
    )


def with_second_word(name: str, second: str | None, flag: str) -> str:
    """`name` with its second word given apart (`--clip ViT-L-14 --clip-pretrained openai`); refused where
    the name has one already, or is a folder or a hub model that takes none, so that a model is never
    named two ways at once."""
    if not second:
        return name
    if len(name.split()) > 1:
        raise ValueError(f"'{name}' names its second word already: drop {flag} {second}")
    if name.startswith(("hf-hub:", "local-dir:")) or Path(locate(name)).expanduser().exists():
        raise ValueError(f"'{name}' is a whole model, not an architecture: drop {flag} {second}")
    return f"{name} {second}"


def model_names(args: argparse.Namespace) -> ModelNames:
    """The models the flags name, as given (a relative path is found in the app's folder where it is
    loaded: `doodl.serving.locate`)."""
    given = {
        "sd": args.model,
        "vae": args.vae or "",
        "clip": with_second_word(args.clip, args.clip_pretrained, "--clip-pretrained"),
        "classifier": args.classifier,
        "aesthetic_clip": with_second_word(
            args.aesthetic_clip, args.aesthetic_pretrained, "--aesthetic-pretrained"
        ),
        "aesthetic_head": args.aesthetic_head,
        "pickscore": args.pickscore,
        "pickscore_processor": args.pickscore_processor,
        "hps": args.hps,
        "hps_architecture": args.hps_architecture,
        "imagereward": args.imagereward,
        "imagereward_tokenizer": args.imagereward_tokenizer,
    }
    return ModelNames(**{role: name or "" for role, name in given.items()})


# --- one run: losses, targets, settings ------------------------------------------------------------

# A run's reward models default to the published ones, where an app offers none unless its host names them.
RUN_MODELS = ModelNames(pickscore=PICKSCORE_MODEL)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the losses with their guides and targets, the settings and the device: what one image
    and a batch of them are made with."""
    add_model_arguments(parser, RUN_MODELS)
    parser.add_argument(
        "--loss",
        action="append",
        metavar="NAME[=WEIGHT]",
        help=f"guidance loss, repeatable for a weighted sum: {', '.join(LOSSES)} (default clip-text)",
    )
    guide = parser.add_argument_group("targets of the guides")
    guide.add_argument("--text", help="text the CLIP and reward losses aim at (default: the prompt)")
    guide.add_argument("--reference", action="append", default=[], help="reference image (clip-image)")
    guide.add_argument("--target", help="the classifier's target class: a label or an index")
    guide.add_argument("--aesthetic-target", type=float, help="aim at this score instead of maximizing")
    guide.add_argument(
        "--cutouts", type=int, help="random views per image (default: the preset's; paper: 16)"
    )
    guide.add_argument("--cut-power", type=float, default=0.3)
    run = parser.add_argument_group(
        "optimization (defaults: the model's preset for the first loss, as in the app: the embedded model's "
        "own; the paper's, with SD3's and FLUX's published steps and guidance, for any other)"
    )
    for field in fields(DoodlSettings):
        if field.type in ("int", "float", "str", "bool") and field.name not in ("height", "width"):
            kind = {"int": int, "float": float, "str": str, "bool": boolean}[field.type]
            run.add_argument(f"--{field.name.replace('_', '-')}", type=kind)
    for side in ("height", "width"):
        run.add_argument(
            f"--{side}",
            type=int,
            help=f"image {side} in px: a multiple of 8 for SD, of 16 for SD3 and FLUX, a quarter to twice "
            "the model's resolution (the default)",
        )
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def open_image(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from error


def chosen_settings(args: argparse.Namespace) -> tuple[DoodlSettings, int]:
    """(settings, cutouts): the model's preset for the first loss, with what the command line sets."""
    first = (args.loss or ["clip-text"])[0].partition("=")[0]
    preset = presets(locate(model_names(args).sd))[capability_of(first)]
    given = {
        f.name: getattr(args, f.name)
        for f in fields(DoodlSettings)
        if getattr(args, f.name, None) is not None
    }
    cutouts = preset.cutouts if args.cutouts is None else args.cutouts
    return replace(preset.settings, **given), cutouts


def loss_terms(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(loss, weight) of each --loss; an unknown name fails before any guide loads."""
    return weighted_terms(args.loss or ["clip-text"])


def load_cli_guides(args: argparse.Namespace, device: str) -> dict:
    """The guides of every --loss, by role, each loaded once."""
    names = model_names(args)
    models = {role: names.guide(role) for role in GUIDE_KINDS}
    return load_guides(
        [name for name, _ in loss_terms(args)],
        models,
        lambda kind, name: load_guide(kind, locate(name), device),
    )


def cli_target(args: argparse.Namespace, prompt: str) -> Target:
    """What the losses aim at: the prompt (or --text), --reference images, the --target class, a score."""
    return Target(
        text=args.text or prompt,
        references=tuple(open_image(path) for path in args.reference),
        target_class=int(args.target) if args.target and args.target.isdigit() else args.target,
        score=args.aesthetic_target,
    )


def build_loss(args: argparse.Namespace, cutouts: int, device: str, generator: torch.Generator) -> Loss:
    """The weighted sum of the named losses, each with its guidance model loaded."""
    terms, target = loss_terms(args), cli_target(args, args.prompt)
    return build_weighted(
        terms, load_cli_guides(args, device), target, Crops(cutouts, args.cut_power, generator)
    )


# --- an app: where it serves and its budget -------------------------------------------------------


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    serve = parser.add_argument_group("serving")
    # Hugging Face Spaces say where to serve through gradio's environment variables.
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    serve.add_argument("--host", default=host, help="address to serve on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=int(port))
    serve.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    serve.add_argument(
        "--compile",
        action="store_true",
        help="run the generator through torch.compile (CUDA graphs on a GPU): faster once the first run "
        "has compiled, which takes minutes",
    )
    serve.add_argument(
        "--allow-model-choice",
        action="store_true",
        help="let visitors name other models (always allowed when only this machine can reach the app)",
    )
    public, public_real = Serving.public(), Serving.public(ModelNames(sd="a real model"))
    budget = parser.add_argument_group(
        "budget of one run (no limit for a local app; when others can reach it, the defaults shown)"
    )
    for field in BUDGETS:
        embedded, real = getattr(public, field), getattr(public_real, field)
        default = (
            f"{embedded}" if embedded == real else f"{embedded} with the embedded model, {real} with others"
        )
        budget.add_argument("--" + field.replace("_", "-"), type=int, help=f"public default {default}")
    budget.add_argument(
        "--max-file-size", help=f"of an upload, e.g. 8mb; public default {public.max_file_size}"
    )


def serving_of(args: argparse.Namespace) -> Serving:
    """The host's choices: a public app serves its models only within a budget, unless told otherwise;
    a local one is open, with only the limits given."""
    names = model_names(args)
    limits = {name: getattr(args, name) for name in (*BUDGETS, "max_file_size")}
    if reachable_by_others(args.host, args.share):
        return Serving.public(
            names, allow_model_choice=args.allow_model_choice or None, compile=args.compile, **limits
        )
    return Serving(names, allow_model_choice=True, compile=args.compile, **limits)
