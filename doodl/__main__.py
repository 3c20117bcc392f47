"""Command line: optimize one image and save it.

    python -m doodl --prompt "a red circle above a blue square" --loss clip-text --out out.png
    python -m doodl --prompt "a red circle" --loss classifier --target crimson --out crimson.png
    python -m doodl --prompt "a photo" --loss clip-text --loss aesthetic=0.5 \
        --model runwayml/stable-diffusion-v1-5 --clip ViT-L-14 --clip-pretrained laion2b_s32b_b82k \
        --aesthetic-clip ViT-L-14 --aesthetic-pretrained openai --device cuda --out photo.png

Every model defaults to the embedded one in assets/embedded, so the command works offline on a CPU.
A prompt set, on one or many devices: `python -m doodl batch --help` (`doodl.batch`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from doodl import embedded
from doodl.baseline import one_step_guidance
from doodl.capabilities import (
    LOSSES,
    Crops,
    Target,
    build_weighted,
    capability_of,
    load_guide,
    load_guides,
    loss_kind,
)
from doodl.guides import HPS_ARCHITECTURE, PICKSCORE_MODEL, PICKSCORE_PROCESSOR
from doodl.losses import Loss
from doodl.optimize import DoodlSettings, Step, invert_image, optimize
from doodl.pipeline import ModelLoadError, load_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m doodl", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", required=True, help="what Stable Diffusion is asked to draw")
    parser.add_argument("--out", default="doodl.png", help="where to save the best image")
    add_run_arguments(parser)
    parser.add_argument(
        "--photo",
        "--init-image",
        dest="init_image",
        metavar="FILE",
        help="start from this photo, EDICT-inverted, instead of noise (the prompt says what it shows; "
        "--fidelity and --photo-weight: how close the result stays to it)",
    )
    parser.add_argument("--baseline-scale", type=float, help="also save one-step guidance at this scale")
    return parser.parse_args(argv)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the losses with their guides and targets, the settings and the device: what one image
    and a batch of them are made with."""
    parser.add_argument("--model", default=str(embedded.SD), help="diffusers SD / SDXL folder or hub id")
    parser.add_argument("--vae", help="replace the model's VAE: folder or hub id (e.g. SDXL's fp16 fix)")
    parser.add_argument(
        "--loss",
        action="append",
        metavar="NAME[=WEIGHT]",
        help=f"guidance loss, repeatable for a weighted sum: {', '.join(LOSSES)} (default clip-text)",
    )
    guide = parser.add_argument_group("guidance models and targets")
    guide.add_argument("--clip", default=str(embedded.CLIP), help="open_clip name, hf-hub:, or folder")
    guide.add_argument("--clip-pretrained", help="open_clip weights tag, for a built-in architecture")
    guide.add_argument("--text", help="text the CLIP and reward losses aim at (default: the prompt)")
    guide.add_argument("--reference", action="append", default=[], help="reference image (clip-image)")
    guide.add_argument("--classifier", default=str(embedded.CLASSIFIER), help="transformers id or folder")
    guide.add_argument("--target", help="the classifier's target class: a label or an index")
    guide.add_argument("--aesthetic-clip", default=str(embedded.CLIP))
    guide.add_argument("--aesthetic-pretrained")
    guide.add_argument("--aesthetic-head", default=str(embedded.AESTHETIC_HEAD), help="'laion': download")
    guide.add_argument("--aesthetic-target", type=float, help="aim at this score instead of maximizing")
    guide.add_argument("--pickscore", default=PICKSCORE_MODEL, help="PickScore model: hub id or folder")
    guide.add_argument(
        "--pickscore-processor", help=f"its CLIP processor (default: the model's, or {PICKSCORE_PROCESSOR})"
    )
    guide.add_argument("--hps", metavar="FILE", help="HPSv2 checkpoint file, e.g. HPS_v2.1_compressed.pt")
    guide.add_argument("--hps-architecture", default=HPS_ARCHITECTURE, help="open_clip architecture of --hps")
    guide.add_argument(
        "--cutouts", type=int, help="random views per image (default: the preset's; paper: 16)"
    )
    guide.add_argument("--cut-power", type=float, default=0.3)
    run = parser.add_argument_group(
        "optimization (defaults: the embedded model's settings for the first loss, as in the app; the "
        "paper's for any other model)"
    )
    for field in fields(DoodlSettings):
        if field.type in ("int", "float", "str", "bool") and field.name not in ("height", "width"):
            kind = {"int": int, "float": float, "str": str, "bool": _boolean}[field.type]
            run.add_argument(f"--{field.name.replace('_', '-')}", type=kind)
    for side in ("height", "width"):
        run.add_argument(
            f"--{side}",
            type=int,
            help=f"image {side} in px: a multiple of 8 for SD, a quarter to twice the model's resolution "
            "(the default)",
        )
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _boolean(text: str) -> bool:
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
    preset = embedded.presets(args.model)[capability_of(first)]
    given = {
        f.name: getattr(args, f.name)
        for f in fields(DoodlSettings)
        if getattr(args, f.name, None) is not None
    }
    cutouts = preset.cutouts if args.cutouts is None else args.cutouts
    return replace(preset.settings, **given), cutouts


def _joined(name: str | None, second: str | None) -> str:
    return f"{name} {second}" if name and second else name or ""


def guide_models(args: argparse.Namespace) -> dict[str, str]:
    """The model of each guide role (`doodl.capabilities`), as the command line names it."""
    return {
        "clip": _joined(args.clip, args.clip_pretrained),
        "classifier": args.classifier,
        "aesthetic_clip": _joined(args.aesthetic_clip, args.aesthetic_pretrained),
        "aesthetic_head": args.aesthetic_head,
        "pickscore": _joined(args.pickscore, args.pickscore_processor),
        "hps": _joined(args.hps, args.hps_architecture),
    }


def loss_terms(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(loss, weight) of each --loss; an unknown name fails before any guide loads."""
    terms = [
        (name, float(weight or 1.0))
        for name, _, weight in (t.partition("=") for t in args.loss or ["clip-text"])
    ]
    for name, _ in terms:
        loss_kind(name)
    return terms


def load_cli_guides(args: argparse.Namespace, device: str) -> dict:
    """The guides of every --loss, by role, each loaded once."""
    names = [name for name, _ in loss_terms(args)]
    return load_guides(names, guide_models(args), partial(load_guide, device=device))


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


# Model cards of few-step models (SD-Turbo) write guidance_scale=0.0 for "guidance off", diffusers' reading
# of any scale <= 1; here the scale is taken literally, and 0 is the unconditional prediction.
UNCONDITIONAL_NOTE = (
    "note: --guidance-scale 0 ignores the prompt (the unconditional prediction); to sample with the prompt "
    "and no classifier-free guidance, as few-step models like SD-Turbo do, use --guidance-scale 1"
)


def report(step: Step, total: int) -> None:
    print(
        f"iteration {step.iteration + 1:3d}/{total}  loss {step.loss:.5f}  {step.seconds:7.1f} s", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # python -m doodl batch ...: a prompt set, see doodl.batch
        from doodl.batch import main as batch

        return batch(argv[1:])
    args = parse_args(argv)
    try:
        settings, cutouts = chosen_settings(args)
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        model = load_pipeline(args.model, args.device, dtype, vae=args.vae)
        model.latent_shape(settings.height, settings.width)  # a bad size is refused before guides load
        if settings.guidance_scale == 0 and model.classifier_free:
            print(UNCONDITIONAL_NOTE, file=sys.stderr)
        model.encode_prompt(args.prompt)  # the one prompt of the run: encoded, then its encoders freed
        model.release_text_encoders()
        loss = build_loss(args, cutouts, args.device, torch.Generator().manual_seed(settings.seed))
        init = None
        if args.init_image:
            init = invert_image(model, open_image(args.init_image), args.prompt, settings)
        result = optimize(
            model, args.prompt, loss, settings, init, lambda step: report(step, settings.iterations)
        )
    except (ValueError, TypeError, OSError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    result.best.image.save(out)
    print(f"best loss {result.best.loss:.5f} at iteration {result.best.iteration + 1}; saved {out}")
    starts = settings.samples_to_start(from_photo=init is not None)
    if starts > 1:
        print(f"started from seed {result.best.seed}, the best of {starts} samples")
    if args.baseline_scale is not None:
        start = replace(settings, seed=result.best.seed, start_samples=1)  # from DOODL's start
        baseline = one_step_guidance(model, args.prompt, loss, args.baseline_scale, start, init)
        baseline_path = out.with_name(f"{out.stem}-one-step{out.suffix}")
        baseline.save(baseline_path)
        print(f"one-step guidance at scale {args.baseline_scale}: saved {baseline_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
