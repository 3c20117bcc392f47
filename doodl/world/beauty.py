"""A rule-based beauty score for scenes of the shapes world: the target of the embedded aesthetic head.

    score = 1 + 9 * visibility * (0.4 centering + 0.3 size + 0.3 contrast),   in [1, 10]

- visibility: fraction of the objects' extent inside the canvas (a clipped shape is ugly), squared so that
  cutting an object in half costs most of the score;
- centering: 1 when the objects' size-weighted centroid sits at the canvas centre, falling linearly to 0 at
  the canvas edge (a centred single shape is also mirror-symmetric, which the rule rewards through this);
- size: 1 when the objects together cover about a quarter of the canvas side in radius, falling off
  (on a log scale) for tiny specks and for shapes that crowd the frame;
- contrast: 1 when every object stands out from the background by a wide RGB distance.

Pure function of the scene, so it can label any number of rendered images for free.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from doodl.world.shapes import PALETTE, Scene, contrast, random_scene

IDEAL_RADIUS = 0.25  # of the canvas side: a shape that fills the middle without touching the frame


def visibility(scene: Scene) -> float:
    """Fraction of the objects' bounding extent that lies inside the canvas (area-weighted)."""
    inside, total = 0.0, 0.0
    for obj in scene.objects:
        (cx, cy), r = obj.center, obj.size
        width = max(0.0, min(cx + r, scene.size) - max(cx - r, 0.0))
        height = max(0.0, min(cy + r, scene.size) - max(cy - r, 0.0))
        inside += width * height
        total += 4 * r * r
    return inside / total


def centering(scene: Scene) -> float:
    weights = np.array([o.size**2 for o in scene.objects])
    centers = np.array([o.center for o in scene.objects])
    centroid = (weights[:, None] * centers).sum(0) / weights.sum()
    offset = np.abs(centroid - scene.size / 2).max() / (scene.size / 2)
    return float(np.clip(1 - offset, 0, 1))


def size_fitness(scene: Scene) -> float:
    radius = np.sqrt(sum(o.size**2 for o in scene.objects)) / scene.size
    return float(np.clip(1 - abs(np.log2(radius / IDEAL_RADIUS)) / 2, 0, 1))


def contrast_fitness(scene: Scene) -> float:
    worst = min(contrast(PALETTE[o.color][o.shade], scene.background) for o in scene.objects)
    return float(np.clip((worst - 40) / 160, 0, 1))


def beauty(scene: Scene) -> float:
    """The beauty score of a scene, 1 (ugly) to 10 (beautiful)."""
    pleasing = 0.4 * centering(scene) + 0.3 * size_fitness(scene) + 0.3 * contrast_fitness(scene)
    return 1 + 9 * visibility(scene) ** 2 * pleasing


def random_composition(rng: np.random.Generator) -> Scene:
    """A world scene, then moved and rescaled freely: the full range of beauty, clipped shapes included."""
    scene = random_scene(rng, 1 if rng.random() < 0.6 else 2)
    shift = rng.uniform(-0.45, 0.45, size=2) * scene.size * rng.random()
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(1.8))))
    centre = scene.size / 2
    objects = tuple(
        dataclasses.replace(
            o,
            center=(
                centre + (o.center[0] - centre) * scale + shift[0],
                centre + (o.center[1] - centre) * scale + shift[1],
            ),
            size=o.size * scale,
        )
        for o in scene.objects
    )
    return dataclasses.replace(scene, objects=objects)
