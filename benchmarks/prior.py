"""What the embedded generator draws for a prompt, as the judge reads it: why personalization stays weak.

    python -m benchmarks.prior            # 8 seeds per full caption, 32 per shape-only prompt
    python -m benchmarks.prior --quick

Personalization's prompts name the shape only ("a triangle"); the references give the color. Three
readings, all by the rule-based judge of the quality benchmark (`doodl.world.judge`), at the personalization
preset (its CFG, steps and chain), unguided:
- the judge on the world's own renders, one object each, and on the embedded VAE's reconstructions of them
  (what a generator that drew the scene perfectly would show): how well it reads a clean shape;
- full captions ("a red triangle"), the only kind the generator was trained on: how often the judge reads
  the caption's shape and color, and what it reads instead;
- shape-only prompts: how often the generator draws nothing, and which colors it draws at all. A color it
  never draws is one that no start, and no best of K samples, offers DOODL: the guide has to walk the hue
  there through the whole chain;
- personalization tasks as the quality benchmark makes them (references, prompt, guide, judge), on prompts
  of their own seed: the best of K unguided samples picked by the judge itself (a ceiling for any pick, the
  app's best-of-4 start included) and by the guide (the app's pick), alone and with CLIP's distance to
  the prompt added (does asking for the prompt's shape too pick better?).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from benchmarks.common import EMBEDDED, markdown_table, parser, start, write_report
from benchmarks.quality import (
    CAPABILITIES,
    image_loss,
    load_guides,
    mean_and_error,
    measured_preset,
)
from doodl import capabilities, load_pipeline, sample
from doodl.embedded import EMBEDDED_PRESETS
from doodl.optimize import candidate_seeds
from doodl.world import judge, shapes
from doodl.world.evaluate import reconstructions

BLANK = "nothing"
PERSONALIZATION = next(c for c in CAPABILITIES if c.name == "personalization")


def read(image: Image.Image | np.ndarray) -> tuple[str, str]:
    """(color, shape) of the most salient blob the judge finds, or (nothing, nothing)."""
    blobs = judge.find_blobs(image)
    return (blobs[0].color, blobs[0].shape) if blobs else (BLANK, BLANK)


def rendered_reads(model, n: int, seed: int) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """[(true shape, read of the render, read of its VAE reconstruction)] for n one-object renders."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(rng, 1) for _ in range(n)]
    renders = shapes.render_dataset(scenes)
    return [
        (scene.objects[0].shape, read(image), read(decoded))
        for scene, image, decoded in zip(scenes, renders, reconstructions(model.vae, renders), strict=True)
    ]


def sampled_reads(
    model, prompts: list[str], seeds: int, steps: int | None = None
) -> dict[str, list[tuple[str, str]]]:
    """{prompt: the judge's read of its unguided sample at each of `seeds` seeds}, at the personalization
    preset (`steps`: fewer, for --quick)."""
    preset = measured_preset(PERSONALIZATION).settings
    preset = dataclasses.replace(preset, steps=steps or preset.steps)
    found = {}
    for prompt in prompts:
        images = (sample(model, prompt, dataclasses.replace(preset, seed=s)) for s in range(seeds))
        found[prompt] = [read(image) for image in images]
        print(prompt, collections.Counter(found[prompt]).most_common(3), flush=True)
    return found


def best_picks(
    model, guides, n: int, k: int, seed: int, text_weights: tuple[float, ...] = (), steps: int | None = None
) -> list[list[object]]:
    """The judge's score of the best of k unguided samples of n personalization tasks, picked by the judge
    and by the guide, against the seed's own sample; and picked by the guide plus each of `text_weights`
    times CLIP's distance to the prompt (e.g. "a star"), a guide that also asks for the prompt's shape."""
    preset = measured_preset(PERSONALIZATION).settings
    crops = capabilities.Crops(EMBEDDED_PRESETS[PERSONALIZATION.name].cutouts)
    rng = np.random.default_rng(seed)
    with_text = {w: f"the guide's pick, plus {w:g} x the prompt's CLIP text loss" for w in text_weights}
    picks: dict[str, list[float]] = {
        "the seed's own sample": [],
        "the guide's pick": [],
        **{label: [] for label in with_text.values()},
        "the judge's pick": [],
    }
    for i in range(n):
        task = PERSONALIZATION.make_task(guides, rng)
        settings = dataclasses.replace(preset, seed=seed * 1000 + i, steps=steps or preset.steps)
        torch.manual_seed(settings.seed)  # the guide's random views, as the quality benchmark draws them
        images = [
            sample(model, task.prompt, dataclasses.replace(settings, seed=s))
            for s in candidate_seeds(settings.seed, k)
        ]
        scores = [task.score(image) for image in images]
        losses = np.array([image_loss(task, image) for image in images])
        guides_pick = int(np.argmin(losses))
        picks["the seed's own sample"].append(scores[0])
        picks["the guide's pick"].append(scores[guides_pick])
        if text_weights:
            text = capabilities.build_loss("clip-text", guides, capabilities.Target(text=task.prompt), crops)
            text_losses = np.array([image_loss(dataclasses.replace(task, loss=text), im) for im in images])
            for w, label in with_text.items():
                picks[label].append(scores[int(np.argmin(losses + w * text_losses))])
        picks["the judge's pick"].append(max(scores))
        print(task.prompt, scores, "guide's pick", guides_pick, flush=True)
    return [[name, "{:.3f} ± {:.3f}".format(*mean_and_error(v))] for name, v in picks.items()]


def share(hits: list[bool]) -> str:
    return f"{sum(hits) / len(hits):.2f}"


def most_common_other(reads: list[str], right: str) -> str:
    others = collections.Counter(r for r in reads if r != right)
    return ", ".join(f"{name} {count}" for name, count in others.most_common(2)) or "-"


def render_table(renders: list[tuple[str, tuple[str, str], tuple[str, str]]]) -> list[list[object]]:
    rows = []
    for shape in shapes.SHAPES:
        reads = [(r, d) for s, r, d in renders if s == shape]
        rows.append(
            [
                shape,
                len(reads),
                share([r[1] == shape for r, _ in reads]),
                share([d[1] == shape for _, d in reads]),
            ]
        )
    return rows


def caption_table(found: dict[str, list[tuple[str, str]]]) -> list[list[object]]:
    """Per shape, over every color's caption: shape read right, color read right, blank, misreads."""
    rows = []
    for shape in shapes.SHAPES:
        reads = [(color, r) for color in shapes.COLORS for r in found[f"a {color} {shape}"]]
        rows.append(
            [
                shape,
                len(reads),
                share([r[1] == shape for _, r in reads]),
                share([r[0] == color for color, r in reads]),
                share([r == (BLANK, BLANK) for _, r in reads]),
                most_common_other([r[1] for _, r in reads], shape),
            ]
        )
    return rows


def shape_only_table(found: dict[str, list[tuple[str, str]]]) -> list[list[object]]:
    """Per shape-only prompt: blank, shape read right, the colors drawn and how many of the world's."""
    rows = []
    for shape in shapes.SHAPES:
        reads = found[f"a {shape}"]
        colors = collections.Counter(color for color, _ in reads if color != BLANK)
        drawn = ", ".join(f"{color} {count}" for color, count in colors.most_common())
        rows.append(
            [
                f"a {shape}",
                len(reads),
                share([r == (BLANK, BLANK) for r in reads]),
                share([r[1] == shape for r in reads]),
                f"{len(colors)} of {len(shapes.COLORS)}",
                drawn or "-",
            ]
        )
    return rows


def plot(captions: list[list[object]], shape_only: list[list[object]]) -> Figure:
    figure = Figure(figsize=(7, 2.8))
    ax = figure.subplots()
    x = np.arange(len(shapes.SHAPES))
    ax.bar(x - 0.2, [float(r[2]) for r in captions], 0.4, label="full caption: shape read right")
    ax.bar(x + 0.2, [float(r[3]) for r in shape_only], 0.4, label="shape only: shape read right")
    ax.set(xticks=x, xticklabels=shapes.SHAPES, ylim=(0, 1), ylabel="share of samples")
    ax.legend(fontsize=7)
    return figure


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=8, help="samples per full caption")
    p.add_argument("--shape-only-seeds", type=int, default=32, help="samples per shape-only prompt")
    p.add_argument("--renders", type=int, default=400, help="world renders the judge reads")
    p.add_argument("--tasks", type=int, default=20, help="personalization tasks for the best-of-k picks")
    p.add_argument("--k", type=int, default=12, help="samples a pick is made from")
    p.add_argument("--seed", type=int, default=7000, help="of the tasks: not the quality benchmark's")
    p.add_argument(
        "--text-weights",
        type=float,
        nargs="*",
        default=[0.5, 1, 2],
        help="picks by the guide plus these times CLIP's distance to the prompt",
    )
    p.add_argument(
        "--assets", type=Path, default=EMBEDDED, help="folder of sd/ and the guides (a candidate generator's)"
    )
    args = p.parse_args()
    steps = None
    if args.quick:
        args.seeds, args.shape_only_seeds, args.renders, args.tasks, args.k, steps = 1, 2, 8, 1, 2, 3
    out = start(args)
    model = load_pipeline(args.assets / "sd", "cpu")
    renders = render_table(rendered_reads(model, args.renders, seed=7))
    captions = [f"a {color} {shape}" for shape in shapes.SHAPES for color in shapes.COLORS]
    captioned = caption_table(sampled_reads(model, captions, args.seeds, steps))
    shape_only = shape_only_table(
        sampled_reads(model, [f"a {shape}" for shape in shapes.SHAPES], args.shape_only_seeds, steps)
    )
    guides = load_guides(args.assets, "cpu")
    picks = best_picks(model, guides, args.tasks, args.k, args.seed, tuple(args.text_weights), steps)
    notes = (
        "Unguided samples at the personalization preset (CFG, steps, chain; seeds 0, 1, ...), read by the "
        "judge of the quality benchmark: the color and shape of the most salient blob. Shares are of samples."
    )
    write_report(
        out,
        "prior",
        "What the embedded generator draws, read by the judge",
        [
            notes,
            "The judge on the world's one-object renders (seed 7), and on the embedded VAE's "
            "reconstructions of them:\n\n"
            + markdown_table(["shape", "renders", "shape read right", "on the reconstruction"], renders),
            "Full captions, every color of each shape:\n\n"
            + markdown_table(
                ["shape", "samples", "shape read right", "color read right", "nothing drawn", "read instead"],
                captioned,
            ),
            "Shape-only prompts (personalization's):\n\n"
            + markdown_table(
                ["prompt", "samples", "nothing drawn", "shape read right", "colors drawn", "which"],
                shape_only,
            ),
            f"Best of {args.k} unguided samples of {args.tasks} personalization tasks (seed {args.seed}), "
            "scored by the judge (fraction of color and shape right, mean ± standard error):\n\n"
            + markdown_table(["pick", "judge"], picks),
        ],
        plot(captioned, shape_only),
    )


if __name__ == "__main__":
    main()
