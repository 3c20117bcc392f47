"""Command line: optimize one image and save it.

    python -m doodl --prompt "a red circle above a blue square" --loss clip-text --out out.png
    python -m doodl --prompt "a red circle" --loss classifier --target crimson --out crimson.png
    python -m doodl --prompt "a photo" --loss clip-text --loss aesthetic=0.5 \
        --model runwayml/stable-diffusion-v1-5 --clip "ViT-L-14 laion2b_s32b_b82k" \
        --aesthetic-clip "ViT-L-14 openai" --aesthetic-head laion --device cuda --out photo.png

Every model defaults to the embedded one in assets/embedded, so the command works offline on a CPU.
A prompt set, on one or many devices: `python -m doodl batch --help` (`doodl.batch`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from doodl.baseline import one_step_guidance
from doodl.batch import main as batch
from doodl.cli import add_run_arguments, build_loss, chosen_settings, model_names, open_image
from doodl.optimize import Step, invert_image, optimize
from doodl.pipeline import ModelLoadError, load_pipeline
from doodl.serving import locate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m doodl", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", required=True, help="what the generator is asked to draw")
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


# Model cards of few-step models (SD-Turbo) write guidance_scale=0.0 for "guidance off", diffusers' reading
# of any scale <= 1; here the scale is taken literally, and 0 is the unconditional prediction.
UNCONDITIONAL_NOTE = (
    "note: --guidance-scale 0 ignores the prompt (the unconditional prediction); to sample with the prompt "
    "and no classifier-free guidance, as few-step models like SD-Turbo do, use --guidance-scale 1"
)


def report(step: Step, total: int) -> None:
    """One line per iteration: the loss, each weighted term of a sum of guides, the time so far."""
    terms = "".join(f"  {name} {value:.5f}" for name, value in step.terms.items())
    print(
        f"iteration {step.iteration + 1:3d}/{total}  loss {step.loss:.5f}{terms}  {step.seconds:7.1f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # python -m doodl batch ...: a prompt set, see doodl.batch
        return batch(argv[1:])
    args = parse_args(argv)
    try:
        settings, cutouts = chosen_settings(args)
        names = model_names(args)
        model = load_pipeline(locate(names.sd), args.device, vae=locate(names.vae) or None)
        model.latent_shape(settings.height, settings.width)  # a bad size is refused before guides load
        if settings.guidance_scale == 0 and model.classifier_free:
            print(UNCONDITIONAL_NOTE, file=sys.stderr)
        model.release_text_encoders(keep=[args.prompt])  # the run's one prompt: T5-XXL freed after it
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
