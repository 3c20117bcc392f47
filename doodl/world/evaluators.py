"""Rule-based measurements of generated images of the shapes world: evaluators for benchmarks and tests.

None of them is a network: the text judge (`doodl.world.judge`) checks colors, shapes and relations;
the helpers here read an object's shade from its pixels and estimate the scene an image shows, so that
the world's beauty rule (`doodl.world.beauty`), defined on scenes, can score pixels. `verdict` reads a
finished example's side by side: does it show what DOODL does (`benchmarks/examples.py` chooses the app's
examples by it, `tests/test_examples.py` checks every shipped one)?
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from doodl.world import beauty, judge, shapes

# Side of a shape's bounding box over its radius, as `shapes.shape_polygon` draws it (max of width, height).
EXTENT = {"circle": 2.0, "square": 1.6, "triangle": 1.1 * np.sqrt(3), "star": 2.2 * np.cos(np.pi / 10)}
_SHADES = [
    (color, shade, np.array(rgb)) for color, rgbs in shapes.PALETTE.items() for shade, rgb in enumerate(rgbs)
]


def segments(image: Image.Image | np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image as float RGB in [0, 255], and the masks of its foreground blobs, largest first."""
    pixels = judge.as_array(image)
    foreground = np.linalg.norm(pixels - judge.fit_background(pixels), axis=2) > judge.FOREGROUND_DISTANCE
    labels = judge.connected_components(foreground)
    masks = [labels == k for k in range(1, labels.max() + 1)]
    masks = [m for m in masks if judge.eroded(m).sum() >= judge.MIN_CORE_PIXELS]
    return pixels, sorted(masks, key=lambda m: -m.sum())


def nearest_shade(pixels: np.ndarray, mask: np.ndarray) -> tuple[str, int]:
    """(color, shade index) of the palette entry closest to the median of the blob's inner pixels."""
    core = judge.eroded(mask)
    rgb = np.median(pixels[core if core.any() else mask], axis=0)
    color, shade, _ = min(_SHADES, key=lambda entry: np.linalg.norm(entry[2] - rgb))
    return color, shade


def measured_shade(image: Image.Image | np.ndarray, color: str) -> int | None:
    """The shade index of the largest blob of `color`, or None if there is none."""
    pixels, masks = segments(image)
    for mask in masks:
        found, shade = nearest_shade(pixels, mask)
        if found == color:
            return shade
    return None


def _center(low: int, high: int, side: float, canvas: int) -> float:
    """Centre of a blob's extent on one axis, assuming a blob cut by the frame continues past it."""
    if low == 0 and high < canvas - 1:
        return high + 1 - side / 2
    if high == canvas - 1 and low > 0:
        return low + side / 2
    return (low + high + 1) / 2


def estimated_object(pixels: np.ndarray, mask: np.ndarray) -> shapes.Object:
    """The object behind a blob: shape, color and shade from its pixels, size and centre from its extent.

    The side not cut by the frame gives the object's full extent (the shapes are about as wide as tall),
    so a half-visible object is placed half outside the canvas, as the beauty rule needs.
    """
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    shape = judge.classify_shape(judge.shape_features(mask))
    color, shade = nearest_shade(pixels, mask)
    canvas = mask.shape[0]
    center = (_center(xs.min(), xs.max(), side, canvas), _center(ys.min(), ys.max(), side, canvas))
    return shapes.Object(shape, color, shade, center, side / EXTENT[shape])


def estimated_scene(image: Image.Image | np.ndarray) -> shapes.Scene | None:
    """The scene (at most two objects, background from the frame) an image shows; None if empty."""
    pixels, masks = segments(image)
    if not masks:
        return None
    background = judge.fit_background(pixels)
    corners = (tuple(int(v) for v in background[0, 0]), tuple(int(v) for v in background[-1, -1]))
    objects = tuple(estimated_object(pixels, mask) for mask in masks[:2])
    return shapes.Scene(objects, shapes.Background(*corners, "vertical"), size=pixels.shape[0])


def pixel_beauty(image: Image.Image | np.ndarray) -> float:
    """The world's beauty score (1-10) of the scene estimated from the pixels; 1 for an empty image."""
    scene = estimated_scene(image)
    return 1.0 if scene is None else float(beauty.beauty(scene))


def beauty_agreement(n: int = 200, seed: int = 7) -> float:
    """Correlation of `pixel_beauty` of rendered scenes with the beauty of the true scenes."""
    rng = np.random.default_rng(seed)
    scenes = [beauty.random_composition(rng) for _ in range(n)]
    estimated = [pixel_beauty(shapes.render(scene)) for scene in scenes]
    return float(np.corrcoef(estimated, [beauty.beauty(scene) for scene in scenes])[0, 1])


POSITION_TOLERANCE = 3.0  # px an object may move and still be where it was


def same_scene(before: tuple[judge.Blob, ...], after: tuple[judge.Blob, ...]) -> bool:
    """The same objects (color and shape), each within POSITION_TOLERANCE px of its place, none added."""
    if len(before) != len(after):
        return False
    left = list(after)
    for blob in before:
        near = [
            b
            for b in left
            if (b.color, b.shape) == (blob.color, blob.shape)
            and np.hypot(b.center[0] - blob.center[0], b.center[1] - blob.center[1]) <= POSITION_TOLERANCE
        ]
        if not near:
            return False
        left.remove(near[0])
    return True


AESTHETIC_GAIN = 1.0  # beauty points over the unguided image an aesthetic example must gain
EXAMPLE_METHODS = (
    "unguided",
    "one-step",
    "DOODL",
)  # the images of a finished example, as the app labels them


# --- the verdict on the app's examples ------------------------------------------------------------


def gallery_images(gallery: tuple[tuple[str, str], ...]) -> dict[str, Image.Image]:
    """The side by side of a finished run by method: unguided (or the photo's reconstruction), one-step,
    DOODL, and the uploaded photo if any."""
    names = {"Uploaded photo": "photo", "Unguided": "unguided", "One-step": "one-step", "DOODL": "DOODL"}
    found = {}
    for path, caption in gallery:
        name = next(name for prefix, name in names.items() if caption.startswith(prefix))
        found[name] = Image.open(path).convert("RGB")
    return found


def read(tab: str, image: Image.Image) -> str:
    """What the judge sees: each object's color and shape, most salient first (vocabulary: the shade of
    the red object)."""
    if tab == "vocabulary":
        shade = measured_shade(image, "red")
        return "no red object" if shade is None else f"{shapes.SHADE_NAMES['red'][shade]} red"
    return ", ".join(f"{b.color} {b.shape}" for b in judge.find_blobs(image)) or "nothing"


def scores(tab: str, row: list[Any], images: dict[str, Image.Image]) -> dict[str, float]:
    """The evaluator's score of each method's image: a fraction right, 1/0, or the beauty rule."""
    if tab == "text":
        return {m: judge.fraction_right(judge.judge(images[m], row[0])) for m in EXAMPLE_METHODS}
    if tab == "vocabulary":
        shade = shapes.SHADE_NAMES["red"].index(row[1])
        return {m: float(measured_shade(images[m], "red") == shade) for m in EXAMPLE_METHODS}
    if tab == "personalization":
        identity = judge.find_blobs(Image.open(row[1][0]).convert("RGB"))[0]
        target = shapes.Description((shapes.ObjectSpec(identity.color, identity.shape),))
        return {m: judge.fraction_right(judge.judge_description(images[m], target)) for m in EXAMPLE_METHODS}
    return {m: pixel_beauty(images[m]) for m in EXAMPLE_METHODS}


def shows_doodl(tab: str, row: list[Any], score: dict[str, float], images: dict[str, Image.Image]) -> bool:
    """The unguided image fails and DOODL's succeeds (see the module's docstring)."""
    if tab != "aesthetic":
        return score["unguided"] < 1.0 and score["DOODL"] == 1.0
    kept = "photo" not in images or same_scene(
        judge.find_blobs(images["photo"]), judge.find_blobs(images["DOODL"])
    )
    # A beauty read from a mess of blobs is no success to a visitor: DOODL's image must still show the prompt.
    return (
        score["DOODL"] >= score["unguided"] + AESTHETIC_GAIN
        and kept
        and judge.judge(images["DOODL"], row[0]).ok
    )


def verdict(tab: str, row: list[Any], gallery: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The evaluator on a finished run's side by side: scores, what it read, and whether it shows DOODL."""
    images = gallery_images(gallery)
    score = scores(tab, row, images)
    return {
        "scores": score,
        "read": {m: read(tab, images[m]) for m in ("photo", *EXAMPLE_METHODS) if m in images},
        "shows_doodl": shows_doodl(tab, row, score, images),
    }
