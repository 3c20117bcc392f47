"""Does a photo stay itself? DOODL started from photos (EDICT inversion), at each tab's preset, with and
without the trust region of `DoodlSettings.fidelity`, the distance to the photo in the loss
(`DoodlSettings.photo_weight`), and inverted through the whole chain or only its last part
(`DoodlSettings.photo_strength`) (issue #17, item 4).

The photos are renders of the embedded world's scenes (`doodl.world.shapes`), so what they show is known.
For each photo and tab: invert it, run DOODL at the tab's preset (20 steps, 20 iterations; EDICT, as every
photo) with each fidelity and photo weight, and read the scene back from the pixels of the best image with
the world's judge (`doodl.world.judge.find_blobs`: each object's color, shape and centre). A scene is
*unchanged* when the result has the photo's objects, each with its color and shape and its centre within
`POSITION_TOLERANCE` pixels, and no other object. Beside it: the beauty rule read from the pixels
(`pixel_beauty`, the aesthetic tab's evaluator) and the guide's own loss, first iteration (the photo's
reconstruction) to best.

What each tab asks of a photo, so that the scene may stay while the guide gains:
- text: the photo's own caption as the prompt and CLIP's target;
- vocabulary: a photo whose first object is red, and the classifier's target another shade of red (the
  judge reads the color name, not the shade): also reported, whether the measured shade became the target;
- personalization: a reference image of the photo's first object in another shade, alone in the middle;
- aesthetic: the photo's caption as the prompt, the aesthetic scorer as the guide.

    python -m benchmarks.photo --n 6                  # records in results/photo-raw/runs.jsonl, then photo.md
    python -m benchmarks.photo --n 6 --tabs aesthetic --json /tmp/photo-aesthetic.jsonl   # one process a tab
    python -m benchmarks.photo --report /tmp/photo-*.jsonl     # writes benchmarks/results/photo.md
    python -m benchmarks.photo --n 10 --tabs aesthetic --fidelities 0.9 --photo-weights 0 30 100
    python -m benchmarks.photo --n 10 --tabs aesthetic --fidelities 0.97 0.99 --strengths 0.6 0.4 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from benchmarks.common import markdown_table, parser, start, write_report
from doodl import embedded
from doodl.capabilities import CAPABILITIES, Crops, Target, build_loss, load_guide, load_guides
from doodl.optimize import DoodlSettings, doodl, invert_image, result_of
from doodl.pipeline import LatentDiffusion, load_pipeline
from doodl.serving import ModelNames, locate
from doodl.world import judge, shapes
from doodl.world.evaluators import POSITION_TOLERANCE, measured_shade, pixel_beauty, same_scene

# An object may move this many pixels (of 64) and still be the same object in the same place: a sixth of
# the smallest object's diameter (18 px, `shapes.random_scene`); the EDICT reconstruction itself moved
# the judge's centres by at most 1 px on the first photos tried.


@dataclasses.dataclass(frozen=True)
class Case:
    """A photo and what one tab asks of it."""

    tab: str
    index: int
    photo: Any  # PIL image
    prompt: str
    target: Target
    shade: int | None = None  # vocabulary: the target shade's index


def reference_of(scene: shapes.Scene, shade: int) -> Any:
    """The scene's first object in another shade, alone in the middle of the scene's background."""
    first = scene.objects[0]
    alone = dataclasses.replace(
        first, shade=shade, center=(scene.size / 2, scene.size / 2), size=scene.size / 4
    )
    return shapes.to_pil(shapes.render(dataclasses.replace(scene, objects=(alone,), relation=None)))


def case(tab: str, index: int, scene: shapes.Scene) -> Case:
    """What `tab` asks of the photo of `scene` (see the module's docstring)."""
    other = (scene.objects[0].shade + 2) % 4
    if tab == "vocabulary":
        red = dataclasses.replace(scene.objects[0], color="red")
        scene = dataclasses.replace(scene, objects=(red, *scene.objects[1:]))
    prompt, photo = shapes.caption(scene), shapes.to_pil(shapes.render(scene))
    target = {
        "text": Target(text=prompt),
        "vocabulary": Target(text=prompt, target_class=shapes.SHADE_NAMES["red"][other]),
        "personalization": Target(text=prompt, references=(reference_of(scene, other),)),
        "aesthetic": Target(text=prompt),
    }[tab]
    return Case(tab, index, photo, prompt, target, other if tab == "vocabulary" else None)


# --quick: a smoke run of the whole script in seconds, nothing measured.
QUICK = {"steps": 4, "iterations": 2}


def photo_settings(
    tab: str, fidelity: float, photo_weight: float, guidance_scale: float, strength: float, quick: bool
) -> DoodlSettings:
    """The tab's preset with this fidelity, photo weight, CFG and strength (--quick: a few steps)."""
    fixed = {
        "fidelity": fidelity,
        "photo_weight": photo_weight,
        "guidance_scale": guidance_scale,
        "photo_strength": strength,
    }
    return dataclasses.replace(embedded.EMBEDDED_PRESETS[tab].settings, **fixed, **(QUICK if quick else {}))


def run_case(
    model: LatentDiffusion, guides: dict, c: Case, settings: DoodlSettings, quick: bool = False
) -> dict[str, Any]:
    """One photo through DOODL with these settings (`photo_settings`), measured."""
    preset = embedded.EMBEDDED_PRESETS[c.tab]
    loss_name = CAPABILITIES[c.tab].losses[0]
    crops = Crops(2 if quick else preset.cutouts, generator=torch.Generator().manual_seed(settings.seed))
    loss = build_loss(loss_name, guides, c.target, crops)
    init = invert_image(model, c.photo, c.prompt, settings)
    steps = list(doodl(model, c.prompt, loss, settings, init))
    result, start_image = result_of(steps), steps[0].image  # iteration 1: the photo's reconstruction
    best_image, photo_blobs = result.best.image, judge.find_blobs(c.photo)
    return {
        "tab": c.tab,
        "index": c.index,
        "fidelity": settings.fidelity,
        "photo_weight": settings.photo_weight,
        "guidance_scale": settings.guidance_scale,
        "photo_strength": settings.photo_strength,
        "iterations": settings.iterations,
        "reconstruction_unchanged": same_scene(photo_blobs, judge.find_blobs(start_image)),
        "unchanged": same_scene(photo_blobs, judge.find_blobs(best_image)),
        "beauty_photo": pixel_beauty(c.photo),
        "beauty_start": pixel_beauty(start_image),
        "beauty_best": pixel_beauty(best_image),
        "loss_start": result.losses[0],
        "loss_best": result.best.loss,
        "shade_hit": None if c.shade is None else measured_shade(best_image, "red") == c.shade,
        "shade_hit_start": None if c.shade is None else measured_shade(start_image, "red") == c.shade,
        # What the judge read, for a look at what changed: (color, shape, x, y) of each object.
        "read": {
            name: _read(image)
            for name, image in (("photo", c.photo), ("start", start_image), ("best", best_image))
        },
    }


def _read(image: Any) -> list[tuple[str, str, float, float]]:
    return [(b.color, b.shape, round(b.center[0], 1), round(b.center[1], 1)) for b in judge.find_blobs(image)]


def measure(args: argparse.Namespace) -> None:
    """Run every (photo, tab, fidelity) asked for, appending one JSON line per run to --json."""
    model = load_pipeline(embedded.SD, "cpu", torch.float32)
    names = ModelNames()
    roles = {role: locate(getattr(names, role)) for role in _ROLES}
    done = set()
    if args.json.exists():  # resume: runs already recorded are skipped
        records = [json.loads(line) for line in args.json.read_text().splitlines() if line]
        done = {(r["tab"], r["index"], *setting(r)) for r in records}
    for tab in args.tabs:
        loss_name = CAPABILITIES[tab].losses[0]
        guides = load_guides(
            [loss_name], roles, lambda kind, name: load_guide(kind, name, "cpu", torch.float32)
        )
        scenes = shapes.random_scenes(args.seed, args.n, two_object_fraction=0.5)
        cfg = embedded.EMBEDDED_PRESETS[tab].settings.guidance_scale
        cfg = cfg if args.guidance_scale is None else args.guidance_scale
        fidelities = args.fidelities or (0.0, embedded.EMBEDDED_PRESETS[tab].settings.fidelity)
        for index, scene in enumerate(scenes):
            c = case(tab, index, scene)
            for fidelity, weight, strength in itertools.product(
                fidelities, args.photo_weights, args.strengths
            ):
                settings = photo_settings(tab, fidelity, weight, cfg, strength, args.quick)
                if (tab, index, fidelity, weight, cfg, strength, settings.iterations) in done:
                    continue
                record = run_case(model, guides, c, settings, args.quick)
                print(json.dumps(record), flush=True)
                with args.json.open("a") as out:
                    out.write(json.dumps(record) + "\n")


_ROLES = ("clip", "classifier", "aesthetic_clip", "aesthetic_head")


def setting(record: dict[str, Any]) -> tuple[float, float, float, float, int]:
    """(fidelity, photo weight, CFG, strength, iterations) of a run; runs recorded before the last four
    were varied or recorded had no photo weight, the presets' CFG, the whole chain (strength 1) and the
    presets' 10 iterations of that time."""
    cfg = embedded.EMBEDDED_PRESETS[record["tab"]].settings.guidance_scale
    weight, strength = record.get("photo_weight", 0.0), record.get("photo_strength", 1.0)
    iterations = record.get("iterations", 10)
    return record["fidelity"], weight, record.get("guidance_scale", cfg), strength, iterations


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.mean(values):+.2f} ± {se:.2f}"


def summary_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """Per tab, fidelity, photo weight, CFG and strength: scenes unchanged, beauty and loss changes."""
    rows = []
    keys = sorted({(r["tab"], *setting(r)) for r in records}, key=lambda k: (TABS.index(k[0]), *k[1:]))
    for key in keys:
        runs = [r for r in records if (r["tab"], *setting(r)) == key]
        tab, fidelity, weight, cfg, strength, iterations = key
        unchanged = sum(r["unchanged"] for r in runs)
        rec = sum(r["reconstruction_unchanged"] for r in runs)
        shade = sum(bool(r["shade_hit"]) for r in runs) if tab == "vocabulary" else None
        rows.append(
            [
                tab,
                f"{fidelity:g}",
                f"{weight:g}",
                f"{cfg:g}",
                f"{strength:g}",
                iterations,
                len(runs),
                f"{unchanged}/{len(runs)} ({100 * unchanged / len(runs):.0f} %)",
                f"{rec}/{len(runs)}",
                _mean([r["beauty_best"] - r["beauty_photo"] for r in runs]),
                _mean([r["beauty_best"] - r["beauty_start"] for r in runs]),
                _mean([r["loss_best"] - r["loss_start"] for r in runs]),
                "-" if shade is None else f"{shade}/{len(runs)}",
            ]
        )
    return rows


TABS = ("text", "vocabulary", "personalization", "aesthetic")
HEADERS = (
    "tab",
    "fidelity",
    "photo weight",
    "CFG",
    "strength",
    "iterations",
    "photos",
    "scene unchanged (best image)",
    "scene unchanged (reconstruction)",
    "beauty change vs photo",
    "beauty change vs reconstruction",
    "guide loss change (best - first)",
    "vocabulary: target shade reached",
)


def report(paths: list[Path], out: Path) -> None:
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line]
    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    for k, chosen in enumerate(sorted({setting(r) for r in records})):
        runs = [r for r in records if setting(r) == chosen and r["tab"] == "aesthetic"]
        fidelity, weight, cfg, strength, iterations = chosen
        axes.scatter(
            [r["beauty_best"] - r["beauty_photo"] for r in runs],
            [r["unchanged"] + 0.03 * k for r in runs],
            label=f"fidelity {fidelity:g}, weight {weight:g}, CFG {cfg:g}, strength {strength:g}, "
            f"{iterations} iterations",
        )
    axes.set(xlabel="aesthetic tab: beauty change vs photo", ylabel="scene unchanged (0/1)")
    axes.legend()
    table = markdown_table(HEADERS, summary_rows(records))
    write_report(
        out, "photo", "Photos stay themselves: DOODL from an EDICT-inverted photo", [NOTES, table], figure
    )


NOTES = (
    "Photos: renders of `doodl.world.shapes.random_scenes(seed, n, two_object_fraction=0.5)`; every tab at "
    "its preset (`doodl.embedded.EMBEDDED_PRESETS`, the photo's settings replaced by the row's: fidelity, "
    "photo weight, CFG, and strength, the fraction of the chain the photo is inverted through and edited). "
    "Scene unchanged: the "
    "judge reads the same objects (color name, shape) from the best image as from the photo, each centre "
    f"within {POSITION_TOLERANCE:g} px, none added. Beauty: `doodl.world.evaluators.pixel_beauty` (1-10). "
    "Changes are means ± standard errors over the photos. What each tab asks: text, the photo's caption "
    "as CLIP's target; vocabulary, the photo's first object made red and another shade of red as the "
    "classifier's target; personalization, a reference of the first object in another shade; aesthetic, "
    "the aesthetic scorer."
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=6, help="photos per tab")
    p.add_argument("--seed", type=int, default=11, help="of the photos' scenes")
    p.add_argument("--tabs", nargs="+", default=list(TABS), choices=TABS)
    p.add_argument("--fidelities", nargs="+", type=float, help="default: 0 and the tab's preset")
    p.add_argument(
        "--photo-weights",
        nargs="+",
        type=float,
        default=[embedded.EMBEDDED_PRESETS["aesthetic"].settings.photo_weight],
        help="weights of the distance to the photo's reconstruction in the loss (DoodlSettings.photo_weight)",
    )
    p.add_argument("--guidance-scale", type=float, help="CFG of inversion and DOODL (default: the presets')")
    p.add_argument(
        "--strengths",
        nargs="+",
        type=float,
        default=[embedded.EMBEDDED_PRESETS["aesthetic"].settings.photo_strength],
        help="fractions of the chain a photo is inverted through (DoodlSettings.photo_strength)",
    )
    p.add_argument(
        "--json", type=Path, help="append each run's record here (default: OUT/photo-raw/runs.jsonl)"
    )
    p.add_argument("--report", nargs="+", type=Path, help="write photo.md from these JSON-lines files")
    args = p.parse_args(argv)
    out = start(args)
    args.json = args.json or out / "photo-raw" / "runs.jsonl"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.quick:  # one photo of one tab, in a fresh file, then its report
        args.n, args.tabs, args.json = 1, ["aesthetic"], out / "photo.jsonl"
        args.json.unlink(missing_ok=True)
        measure(args)
        args.report = [args.json]
    if not args.report:
        measure(args)
    report(args.report or [args.json], out)


if __name__ == "__main__":
    main()
