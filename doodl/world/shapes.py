"""A tiny procedural world: one or two flat shapes on a soft background, with a caption.

Everything the embedded models learn comes from here. A scene is a small structured description
(`Scene`); `render` draws it, `caption` says it in words, `parse_caption` turns words back into the
part of a scene a caption pins down (`Description`), which is what the judge checks.

Each color comes in four *shades* that captions never name, so a generator trained on these captions
can draw every shade but cannot be asked for one; the fine-grained classifier tells them apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, like a smooth generator's

SHAPES = ("circle", "square", "triangle", "star")
RELATIONS = ("above", "below", "left of", "right of")

# Four shades per color: dark, deep, bright, pale. Base colors sit ~60 degrees apart in hue.
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((128, 16, 28), (200, 20, 60), (245, 50, 20), (245, 110, 130)),
    "yellow": ((190, 160, 0), (225, 195, 15), (250, 225, 40), (250, 240, 140)),
    "green": ((20, 100, 30), (30, 160, 50), (70, 215, 60), (140, 225, 130)),
    "cyan": ((0, 115, 125), (0, 170, 180), (40, 215, 225), (150, 235, 240)),
    "blue": ((25, 35, 130), (30, 70, 205), (50, 120, 245), (125, 160, 245)),
    "purple": ((85, 20, 110), (135, 40, 170), (180, 75, 215), (205, 150, 235)),
}
COLORS = tuple(PALETTE)
SHADE_NAMES = {"red": ("maroon", "crimson", "scarlet", "rose")}  # the classifier's labels

# Backgrounds stay unsaturated so that "the colored thing" is always the object.
MIN_CONTRAST = 70.0  # RGB distance between every shade in a scene and every background pixel


@dataclass(frozen=True)
class Object:
    shape: str
    color: str
    shade: int  # index into PALETTE[color]; never in the caption
    center: tuple[float, float]  # (x, y) in pixels, y pointing down
    size: float  # radius of the shape's circumscribing circle, in pixels


@dataclass(frozen=True)
class Background:
    start: tuple[int, int, int]
    end: tuple[int, int, int]
    direction: str  # "plain", "vertical" (start at the top) or "horizontal" (start at the left)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Object, ...]
    background: Background
    relation: str | None = None  # for two objects: objects[0] <relation> objects[1]
    size: int = IMAGE_SIZE


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str


@dataclass(frozen=True)
class Description:
    """What a caption asks for: the objects' colors and shapes, and how the first relates to the second."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    extra: dict = field(default_factory=dict, compare=False)


# --- drawing ---------------------------------------------------------------------------------------


def shape_polygon(shape: str, center: tuple[float, float], size: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape, radius `size`, upright (triangle and star point up)."""
    cx, cy = center
    if shape == "square":
        h = size * 0.8  # a square's corners reach past its circle, so shrink it to look the same size
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Centered on its bounding box (not its centroid) so that "center" means the same for every shape.
        r = size * 1.1
        half_height, half_width = r * 0.75, r * np.sqrt(3) / 2
        return [
            (cx, cy - half_height),
            (cx + half_width, cy + half_height),
            (cx - half_width, cy + half_height),
        ]
    if shape == "star":
        r_out, r_in = size * 1.1, size * 0.5
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r_out, r_in)
        dy = r_out * (1 - np.cos(np.pi / 5)) / 2  # a star's bottom points sit higher than its top point
        return [(cx + r * np.cos(a), cy + dy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]
    raise ValueError(f"not a polygon: {shape}")


def render_background(background: Background, size: int) -> np.ndarray:
    """The background as float32 HxWx3 in [0, 255]."""
    start, end = np.asarray(background.start, np.float32), np.asarray(background.end, np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if background.direction == "plain":
        t = np.zeros_like(t)
    ramp = start + (end - start) * t[:, None]  # size x 3
    if background.direction == "horizontal":
        return np.broadcast_to(ramp[None, :, :], (size, size, 3)).copy()
    return np.broadcast_to(ramp[:, None, :], (size, size, 3)).copy()


def object_mask(obj: Object, size: int) -> np.ndarray:
    """Coverage of one object in [0, 1], anti-aliased, float32 size x size."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = obj.center[0] * SUPERSAMPLE, obj.center[1] * SUPERSAMPLE
    r = obj.size * SUPERSAMPLE
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(shape_polygon(obj.shape, (cx, cy), r), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: uint8 HxWx3. Later objects are drawn over earlier ones."""
    image = render_background(scene.background, scene.size)
    for obj in scene.objects:
        alpha = object_mask(obj, scene.size)[..., None]
        color = np.asarray(PALETTE[obj.color][obj.shade], np.float32)
        image = image * (1 - alpha) + color * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- words -----------------------------------------------------------------------------------------


def object_phrase(obj: Object | ObjectSpec, with_color: bool = True) -> str:
    return f"a {obj.color} {obj.shape}" if with_color else f"a {obj.shape}"


def join_phrases(phrases: Sequence[str], relation: str | None) -> str:
    """'a red circle', or 'a red circle above a blue square'."""
    return f" {relation} ".join(phrases)


def caption(scene: Scene) -> str:
    return join_phrases([object_phrase(obj) for obj in scene.objects], scene.relation)


def describe(scene: Scene) -> Description:
    """The part of a scene its caption pins down."""
    specs = tuple(ObjectSpec(o.color, o.shape) for o in scene.objects)
    return Description(specs, scene.relation if len(specs) == 2 else None)


_OBJECT = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^\s*{_OBJECT}(?:\s+({'|'.join(RELATIONS)})\s+{_OBJECT})?\s*$")


def parse_caption(text: str) -> Description:
    """Invert `caption`. Raises ValueError for text outside the world's grammar."""
    match = _CAPTION.match(text.lower())
    if match is None:
        raise ValueError(f"not a caption of this world: {text!r}")
    color1, shape1, relation, color2, shape2 = match.groups()
    objects = (ObjectSpec(color1, shape1),)
    if relation is not None:
        objects += (ObjectSpec(color2, shape2),)
    return Description(objects, relation)


# --- sampling --------------------------------------------------------------------------------------


def contrast(color: tuple[int, int, int], background: Background) -> float:
    """Smallest RGB distance between a color and any point of a (linear) background."""
    ends = np.asarray([background.start, background.end], np.float32)
    return float(np.linalg.norm(ends - np.asarray(color, np.float32), axis=1).min())


def random_background(rng: np.random.Generator) -> Background:
    """Light or dark, plain or a soft two-tone gradient, always nearly grey."""
    light = rng.random() < 0.5
    base = rng.uniform(200, 245) if light else rng.uniform(15, 60)

    def tone() -> tuple[int, int, int]:
        level = base + rng.uniform(-15, 15)
        tint = rng.uniform(-12, 12, size=3)
        return tuple(int(v) for v in np.clip(level + tint, 0, 255))

    direction = rng.choice(["plain", "plain", "vertical", "horizontal"])
    start = tone()
    return Background(start, start if direction == "plain" else tone(), str(direction))


def random_object(rng: np.random.Generator, size_range: tuple[float, float], canvas: int) -> Object:
    size = rng.uniform(*size_range)
    margin = size + 1
    center = (float(rng.uniform(margin, canvas - margin)), float(rng.uniform(margin, canvas - margin)))
    color = COLORS[rng.integers(len(COLORS))]
    return Object(str(rng.choice(SHAPES)), color, int(rng.integers(4)), center, float(size))


def place_pair(
    rng: np.random.Generator, relation: str, sizes: tuple[float, float], canvas: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centers for two objects so that the first is clearly <relation> the second and both fit."""
    along_gap = sizes[0] + sizes[1] + rng.uniform(3, 8)  # separation on the relation's axis
    across = rng.uniform(-0.25, 0.25) * along_gap  # small drift on the other axis keeps it unambiguous
    lo = max(sizes) + 1
    # Centre the pair with some jitter, then clamp so both stay inside.
    mid_along = rng.uniform(lo + along_gap / 2, canvas - lo - along_gap / 2)
    mid_across = rng.uniform(lo + abs(across) / 2, canvas - lo - abs(across) / 2)
    a_along, b_along = mid_along - along_gap / 2, mid_along + along_gap / 2  # a comes first on the axis
    a_across, b_across = mid_across - across / 2, mid_across + across / 2
    vertical = relation in ("above", "below")
    first_first = relation in ("above", "left of")
    first = (a_along, a_across) if first_first else (b_along, b_across)
    second = (b_along, b_across) if first_first else (a_along, a_across)
    if vertical:  # along-axis is y
        return (first[1], first[0]), (second[1], second[0])
    return first, second


def random_scene(rng: np.random.Generator, n_objects: int = 1, size: int = IMAGE_SIZE) -> Scene:
    """A random scene with 1 or 2 objects; two objects always differ in color."""
    background = random_background(rng)
    while True:
        if n_objects == 1:
            objects = (random_object(rng, (10.0, 20.0), size),)
            relation = None
        else:
            sizes = (float(rng.uniform(9.0, 13.0)), float(rng.uniform(9.0, 13.0)))
            relation = str(rng.choice(RELATIONS))
            centers = place_pair(rng, relation, sizes, size)
            colors = rng.choice(len(COLORS), size=2, replace=False)
            objects = tuple(
                Object(str(rng.choice(SHAPES)), COLORS[c], int(rng.integers(4)), centre, s)
                for c, centre, s in zip(colors, centers, sizes, strict=True)
            )
        if all(contrast(PALETTE[o.color][o.shade], background) >= MIN_CONTRAST for o in objects):
            return Scene(objects, background, relation, size)
        background = random_background(rng)


def random_scenes(seed: int, count: int, two_object_fraction: float = 0.5) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, 2 if rng.random() < two_object_fraction else 1) for _ in range(count)]


def render_dataset(scenes: list[Scene]) -> np.ndarray:
    """Render many scenes into one uint8 N x H x W x 3 array."""
    return np.stack([render(s) for s in scenes])


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)
