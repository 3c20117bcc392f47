"""An independent judge of images of the shapes world: plain pixel analysis, no network.

1. background: a linear color ramp fitted to the border pixels (robustly, as objects may touch the frame);
2. foreground: pixels far from that ramp in RGB;
3. blobs: each foreground pixel takes the nearest palette color, and connected pixels of one color form
   a blob (so two touching objects of different colors stay apart); thin blended edges are dropped;
4. each blob: color = its label, shape = nearest reference among circle / square / triangle / star in a
   small space of shape features (bounding-box fill, convex-hull solidity, top-to-bottom taper, and the
   number of points: corners standing out of the outline seen from the centroid), position = centroid;
5. against a caption: the requested objects are matched to blobs by color, then shapes and the relation
   are checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from doodl.world.shapes import MIN_CONTRAST, PALETTE, SHAPES, Description, parse_caption

FOREGROUND_DISTANCE = MIN_CONTRAST / 2  # half-way between background and the faintest object
MIN_CORE_PIXELS = 8  # blobs with fewer pixels off their own edge are blending artefacts
MIN_SOLIDITY = 0.5  # a star's is ~0.63; below this a blob is a ring or a smear, unless it has a star's points

_SHADES = np.array([shade for shades in PALETTE.values() for shade in shades], np.float32)
_SHADE_COLORS = [color for color, shades in PALETTE.items() for _ in shades]

# Reference shape features (fill, solidity, taper, points), several per shape: measured on clean renders, and
# on the embedded VAE's reconstructions of renders of one object and of two (smaller) objects, whose corners
# and points come out rounder (`python -m doodl.world.evaluate --references` measures the latter). The points
# are the shape's own count: fill and solidity alone read a triangle with concave sides (as a generator
# draws it) as a star, while its three points still say triangle.
POINTS = {"circle": 0, "square": 4, "triangle": 3, "star": 5}
SHAPE_REFERENCES = {
    shape: [(*features, POINTS[shape]) for features in references]
    for shape, references in {
        "circle": [(0.786, 0.959, 1.00), (0.781, 0.957, 0.980), (0.790, 0.945, 0.967)],
        "square": [(0.990, 0.995, 1.00), (0.926, 0.965, 0.969), (0.888, 0.947, 0.946)],
        "triangle": [(0.550, 0.918, 0.23), (0.576, 0.909, 0.270), (0.634, 0.899, 0.342)],
        "star": [(0.448, 0.622, 0.40), (0.537, 0.726, 0.469), (0.639, 0.816, 0.546)],
    }.items()
}
# Typical spread of each feature within one shape; a point miscounted weighs as much as 2.5 spreads of the
# others: enough for three points to outweigh a concave triangle's star-like fill and solidity, not so much
# that a small blurred star (on VAE reconstructions of two-object scenes its points merge into three or four
# a third of the time) turns square.
FEATURE_SCALE = np.array([0.06, 0.05, 0.15, 0.4])
POINT_BINS = 36  # directions of the outline: 10 degrees apart, so a small star's five points stay apart
POINT_PROMINENCE = 0.15  # of the mean radius: a square's corners rise ~0.3, a circle's pixel steps < 0.1


@dataclass(frozen=True)
class Blob:
    color: str
    shape: str
    center: tuple[float, float]  # (x, y)
    area: int
    features: tuple[float, float, float, float]


@dataclass(frozen=True)
class Verdict:
    color_ok: bool
    shape_ok: bool
    relation_ok: bool | None  # None for single-object captions
    blobs: tuple[Blob, ...]

    @property
    def ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.relation_ok is not False


# --- segmentation ----------------------------------------------------------------------------------


def fit_background(image: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-pixel background color: a plane in (x, y) per channel. First fitted to the frame of the image,
    then refitted to every pixel that plane explains, so that a smudged frame (a decoder's edge artefacts)
    or an object touching the border cannot drag it away from the true background."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    frame = np.zeros((h, w), bool)
    frame[:border], frame[-border:], frame[:, :border], frame[:, -border:] = True, True, True, True
    design = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], 1)
    pixels = image.reshape(-1, 3)
    keep = frame.ravel()
    for _ in range(4):
        coef, *_ = np.linalg.lstsq(design[keep], pixels[keep], rcond=None)
        residual = np.linalg.norm(pixels - design @ coef, axis=1)
        close = residual < FOREGROUND_DISTANCE
        if close.sum() < h * w // 4:  # the fit is off: keep the frame-only estimate
            break
        keep = close
    return (design @ coef).reshape(h, w, 3)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels (0 = background) by repeated min-propagation: fine for 64x64 images."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    labels = np.where(mask, labels, 0)
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(h, w)  # 0 stays 0: it is the smallest value whenever the background exists


def eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


# --- shape -----------------------------------------------------------------------------------------


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2D points (monotone chain, then the shoelace formula)."""
    points = np.unique(points, axis=0)
    if len(points) < 3:
        return 0.0

    def turns_left(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]) > 0

    def half(pts: np.ndarray) -> list:
        chain: list = []
        for p in pts:
            while len(chain) >= 2 and not turns_left(chain[-2], chain[-1], p):
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(points), half(points[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def outline_radii(mask: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """The outline's distance from the centre in POINT_BINS directions (the farthest boundary pixel in each,
    interpolated around the circle where a small blob leaves a direction empty), lightly smoothed."""
    boundary = mask & ~eroded(mask)
    by, bx = np.nonzero(boundary)
    dx, dy = bx - centre[0], by - centre[1]
    radius = np.hypot(dx, dy) + 0.5  # to the pixel's outer edge
    direction = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * POINT_BINS).astype(int) % POINT_BINS
    radii = np.full(POINT_BINS, np.nan)
    np.fmax.at(radii, direction, radius)
    seen = np.flatnonzero(~np.isnan(radii))
    around = np.concatenate([seen - POINT_BINS, seen, seen + POINT_BINS])
    radii = np.interp(np.arange(POINT_BINS), around, np.tile(radii[seen], 3))
    return (np.roll(radii, 1) + 2 * radii + np.roll(radii, -1)) / 4


def count_points(radii: np.ndarray) -> int:
    """Peaks of a circular profile that rise more than POINT_PROMINENCE of its mean above the lower of the
    two valleys separating them from higher ground (a peak's topographic prominence)."""
    n = len(radii)

    def valley(i: int, step: int) -> float:
        lowest = radii[i]
        for k in range(1, n):
            value = radii[(i + step * k) % n]
            if value > radii[i]:
                break
            lowest = min(lowest, value)
        return lowest

    peaks = [i for i in range(n) if radii[i] > radii[i - 1] and radii[i] >= radii[(i + 1) % n]]
    rise = [radii[i] - max(valley(i, -1), valley(i, 1)) for i in peaks]
    return sum(r > POINT_PROMINENCE * radii.mean() for r in rise)


def shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(fill of the bounding box, solidity, taper = width of the top third / width of the bottom third,
    points)."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = area / (height * width)
    # The hull of the pixels' outer boundary points; pixel centres alone would understate the hull.
    boundary = mask & ~eroded(mask)
    by, bx = np.nonzero(boundary)
    corners = np.concatenate([np.stack([bx + dx, by + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = area / max(hull_area(corners.astype(np.float64)), 1.0)
    rows = mask[ys.min() : ys.max() + 1].sum(1)
    third = max(1, height // 3)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1.0)
    points = count_points(outline_radii(mask, (xs.mean(), ys.mean())))
    return float(fill), float(min(solidity, 1.0)), float(min(taper, 1.5)), float(points)


def classify_shape(features: tuple[float, ...]) -> str:
    """The shape with the nearest reference point, in units of each feature's typical spread."""
    distances = {
        shape: min(float(np.linalg.norm((np.asarray(features) - ref) / FEATURE_SCALE)) for ref in refs)
        for shape, refs in SHAPE_REFERENCES.items()
    }
    return min(distances, key=distances.get)


# --- blobs -----------------------------------------------------------------------------------------


def as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float64)[..., :3]


def half_maximum(mask: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The part of a blob at least half as far from the background as its core: where a blurred edge
    crosses half coverage, which is where the sharp shape's edge was."""
    level = 0.5 * np.percentile(distance[mask], 90)
    core = mask & (distance > level)
    return core if core.sum() >= MIN_CORE_PIXELS else mask


def find_blobs(image: np.ndarray | Image.Image) -> tuple[Blob, ...]:
    """Every object-like blob in the image, most salient (area x contrast) first."""
    pixels = as_array(image)
    if pixels.max() <= 1.0:  # float images in [0, 1]
        pixels = pixels * 255
    distance = np.linalg.norm(pixels - fit_background(pixels), axis=2)
    foreground = distance > FOREGROUND_DISTANCE
    nearest = np.linalg.norm(pixels[..., None, :] - _SHADES, axis=3).argmin(2)
    color_index = np.array([list(PALETTE).index(c) for c in _SHADE_COLORS])[nearest]
    blobs, salience = [], []
    for k, color in enumerate(PALETTE):
        labels = connected_components(foreground & (color_index == k))
        for label in range(1, labels.max() + 1):
            mask = labels == label
            if eroded(mask).sum() < MIN_CORE_PIXELS:
                continue
            features = shape_features(half_maximum(mask, distance))
            # Rings and smears are not objects; a thin-armed star's solidity falls below 0.5 (a generator's,
            # down to 0.48), but its five points tell it from them.
            if features[1] < MIN_SOLIDITY and features[3] != POINTS["star"]:
                continue
            ys, xs = np.nonzero(mask)
            center = (float(xs.mean()), float(ys.mean()))
            blobs.append(Blob(color, classify_shape(features), center, int(mask.sum()), features))
            salience.append(distance[mask].sum())
    order = np.argsort(salience)[::-1]
    return tuple(blobs[i] for i in order)


# --- verdict ---------------------------------------------------------------------------------------


def relation_holds(first: Blob, second: Blob, relation: str) -> bool:
    """The relation's axis must dominate the displacement and point the right way."""
    dx, dy = first.center[0] - second.center[0], first.center[1] - second.center[1]
    vertical = abs(dy) > abs(dx)
    return {
        "above": vertical and dy < 0,
        "below": vertical and dy > 0,
        "left of": not vertical and dx < 0,
        "right of": not vertical and dx > 0,
    }[relation]


def judge_description(image: np.ndarray | Image.Image, target: Description) -> Verdict:
    blobs = find_blobs(image)
    if not blobs:
        return Verdict(False, False, None if len(target.objects) == 1 else False, blobs)
    if len(target.objects) == 1:
        (spec,) = target.objects
        main = blobs[0]
        return Verdict(main.color == spec.color, main.shape == spec.shape, None, blobs)
    # Match each requested object to the most salient blob of its color, else to the most salient left.
    matched: list[Blob | None] = []
    for spec in target.objects:
        same_color = [b for b in blobs if b.color == spec.color and b not in matched]
        matched.append(same_color[0] if same_color else None)
    color_ok = all(m is not None for m in matched)
    leftovers = [b for b in blobs if b not in matched]
    matched = [m if m is not None else (leftovers.pop(0) if leftovers else None) for m in matched]
    if any(m is None for m in matched):
        return Verdict(color_ok, False, False, blobs)
    shape_ok = all(m.shape == spec.shape for m, spec in zip(matched, target.objects, strict=True))
    return Verdict(color_ok, shape_ok, relation_holds(matched[0], matched[1], target.relation), blobs)


def judge(image: np.ndarray | Image.Image, caption: str) -> Verdict:
    """Does the image show what the caption says? Per-attribute verdicts."""
    return judge_description(image, parse_caption(caption))


__all__ = ["SHAPES", "Blob", "Verdict", "find_blobs", "judge", "judge_description"]


def fraction_right(verdict: Verdict) -> float:
    """Fraction of the judge's checks passed (colors, shapes, and the relation if any): partial credit,
    as whole captions are rarely all right with the small embedded model, unguided or not."""
    checks = [verdict.color_ok, verdict.shape_ok] + (
        [] if verdict.relation_ok is None else [verdict.relation_ok]
    )
    return sum(checks) / len(checks)
