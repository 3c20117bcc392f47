"""The embedded default models: the small models of the shapes world, shipped in `assets/embedded`, and the
settings each capability runs them with.

They are ordinary model folders (diffusers, open_clip, transformers, a LAION-format aesthetic head),
loaded by the same loaders as real models; only their location is special.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from doodl.losses import CUTOUTS
from doodl.optimize import DoodlSettings

ROOT = Path(__file__).resolve().parent.parent / "assets" / "embedded"
SD = ROOT / "sd"
CLIP = ROOT / "clip"
CLASSIFIER = ROOT / "classifier"
AESTHETIC_HEAD = ROOT / "aesthetic" / "aesthetic_head.safetensors"
EXAMPLE_IMAGES = ROOT.parent / "examples"

CAPABILITIES = ("text", "vocabulary", "personalization", "aesthetic")


@dataclass(frozen=True)
class Preset:
    """What a capability runs with: DOODL's settings, the loss's crops, and the one-step baseline's scale."""

    settings: DoodlSettings
    cutouts: int = CUTOUTS
    one_step_scale: float = 1.0


# The paper's settings (50 steps, 50 iterations, CFG 7.5, clip 1e-3) for any real model.
PAPER = Preset(DoodlSettings())

# The embedded model, sized to run on two CPU cores in well under a minute (benchmarks/cost.py):
# - 20 EDICT steps: 10 lose a tenth of the one-object shapes (doodl.world.evaluate --steps 10 / 20);
# - CFG 4: at the paper's 7.5 the generator draws every shade of a color alike
#   (doodl.world.evaluate --guidance 4), which leaves the guide nothing to choose;
# - 16 views per image, as the paper's 16 cutouts (`doodl.losses.cutouts`);
# - the gradient clip and the one-step scale of each capability are the ones `python -m benchmarks.quality
#   --tune --pilot 2 --clips 0.01 0.03 --scales 0.3 1 3 10` chose, by each method's own guidance loss on
#   pilot prompts (benchmarks/results/quality-tune-*.md). A sign step beyond ~0.1 per latent element
#   overshoots along the gradient, and momentum 0.9 lets the step grow to ten times the clip.
_EMBEDDED_BASE = DoodlSettings(steps=20, iterations=10, guidance_scale=4.0)
EMBEDDED_PRESETS = {
    "text": Preset(replace(_EMBEDDED_BASE, grad_clip=0.01), one_step_scale=0.3),
    "vocabulary": Preset(replace(_EMBEDDED_BASE, grad_clip=0.03), one_step_scale=10.0),
    "personalization": Preset(replace(_EMBEDDED_BASE, grad_clip=0.01), one_step_scale=0.3),
    "aesthetic": Preset(replace(_EMBEDDED_BASE, grad_clip=0.03), one_step_scale=1.0),
}


# Each capability's examples: prompt, the tab's target (a shade, reference images, a photo) if it has one,
# and seed. The app's (the first is shown on arrival) and the runs the cost benchmark times. Chosen by
# `python -m benchmarks.examples` among seeded candidates: in each, at the tab's preset, the evaluator reads
# the unguided image as wrong and DOODL's as right (benchmarks/results/examples.md, which also says how
# rarely candidates do); tests/test_examples.py holds every stored run to it. An illustration:
# benchmarks/quality.py is the evidence.
EXAMPLES = {
    "text": [["a green square below a yellow square", 3513], ["a red square below a yellow star", 1341]],
    "vocabulary": [["a red star", "scarlet", 8486], ["a red star", "maroon", 9727]],
    "personalization": [
        ["a star", [str(EXAMPLE_IMAGES / f"personalization-9-{k}.png") for k in range(3)], 2380],
        ["a circle", [str(EXAMPLE_IMAGES / f"personalization-15-{k}.png") for k in range(3)], 8688],
    ],
    "aesthetic": [["a cyan square", None, 5197]],
}

# What each example's stored run shows, as the judge of benchmarks/examples.py reads it; shown under the
# examples.
EXAMPLE_NOTES = {
    "text": [
        "Unguided, the green shape sits beside the yellow square, not below it; DOODL puts a green square "
        "below it. One-step guidance changes nothing.",
        "Unguided, the yellow shape above the red square is round; DOODL gives it a star's points. One-step "
        "guidance rounds the square as well.",
    ],
    "vocabulary": [
        "Unguided, the star is crimson; DOODL turns it scarlet, a shade no caption names. One-step guidance "
        "leaves it crimson and spoils the image.",
        "Unguided, the star is crimson; DOODL darkens it to maroon. One-step guidance leaves no red object.",
    ],
    "personalization": [
        "Unguided, the star is teal; DOODL makes it blue, as in the references. One-step guidance leaves it "
        "teal.",
        "Unguided, a purple blob; DOODL turns it into a round blue shape, the references' shape and color "
        "(a darker blue). One-step guidance leaves it purple.",
    ],
    "aesthetic": [
        "Unguided, a large cyan square crowds the frame beside a faint stray blob; DOODL draws a smaller, "
        "clean square in the middle (beauty 6.3 to 9.7 by the benchmark's rule). One-step guidance adds "
        "stray color.",
    ],
}


def is_embedded(model: str | Path) -> bool:
    """Whether a Stable Diffusion folder is the embedded one."""
    return Path(model).expanduser().resolve() == SD.resolve()


def presets(model: str | Path) -> dict[str, Preset]:
    """Each capability's settings for a model: the embedded model's own, else the paper's."""
    if is_embedded(model):
        return dict(EMBEDDED_PRESETS)
    return dict.fromkeys(CAPABILITIES, PAPER)
