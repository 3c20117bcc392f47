"""Rule-based measurements of generated images of the shapes world, for the quality benchmark.

None of them is a network: the text judge (`doodl.world.judge`) checks colors, shapes and relations;
the helpers here read an object's shade from its pixels and estimate the scene an image shows, so that
the world's beauty rule (`doodl.world.beauty`), defined on scenes, can score pixels.
"""

from __future__ import annotations

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
