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


# Each capability's examples, in the embedded world's captions: the app's (the first is filled in on
# arrival) and the runs the cost benchmark times. Each shows the guidance at work at the capability's
# settings; an illustration, benchmarks/quality.py is the evidence.
EXAMPLES = {
    "text": [["a red circle above a blue square"], ["a green triangle left of a yellow star"]],
    "vocabulary": [["a red circle", "crimson"], ["a red square", "rose"]],
    "personalization": [
        ["a star", [str(EXAMPLE_IMAGES / "rose_star.png")]],
        ["a star above a blue square", [str(EXAMPLE_IMAGES / "rose_star_dark.png")]],
    ],
    "aesthetic": [["a blue circle", None], ["a blue circle", str(EXAMPLE_IMAGES / "corner_circle.png")]],
}


def is_embedded(model: str | Path) -> bool:
    """Whether a Stable Diffusion folder is the embedded one."""
    return Path(model).expanduser().resolve() == SD.resolve()


def presets(model: str | Path) -> dict[str, Preset]:
    """Each capability's settings for a model: the embedded model's own, else the paper's."""
    if is_embedded(model):
        return dict(EMBEDDED_PRESETS)
    return dict.fromkeys(CAPABILITIES, PAPER)
