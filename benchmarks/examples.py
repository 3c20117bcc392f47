"""Which examples show DOODL? Candidate examples of each tab, run exactly as the app runs an example (the
host's embedded models at the tab's preset, `doodl.showcase.run`), judged from the pixels by the same
rule-based evaluators as the quality benchmark. A candidate *shows DOODL* when the evaluator says the
unguided image fails and DOODL's succeeds; each generator's examples in the app (`doodl.embedded.examples`)
are chosen among those, and `tests/test_examples.py` checks every shipped example's stored run against the
same verdict.

    python -m benchmarks.examples                                   # every tab, then the report
    python -m benchmarks.examples --tabs text --shard 0/2 --raw /tmp/text-0.jsonl   # one process of two
    python -m benchmarks.examples --report /tmp/*.jsonl             # writes results/examples.md
    python -m benchmarks.examples --quick
    python -m benchmarks.examples --generator flow                  # the flow transformer's own

Candidates, from a seeded generator (the world's own scenes, `doodl.world.shapes`):
- text: two-object captions (colors, shapes and a relation to get right);
- vocabulary: "a red <shape>" and a shade of red no caption names, the classifier's target;
- personalization: "a <shape>" and three renders of one object (its color the identity), alone in scenes;
- aesthetic: one-object captions, and photos of one-object scenes to start from (EDICT inversion).

Success, from the pixels: text, every color, shape and the relation right (`doodl.world.judge`);
vocabulary, the red object's shade is the target; personalization, the main object has the references'
color and shape; aesthetic, the beauty rule read from the pixels rises by at least AESTHETIC_GAIN over the
unguided image, DOODL's image still shows the prompt (the judge), and from a photo the scene stays the
photo's (`doodl.world.evaluators.same_scene`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from benchmarks.common import RESULTS, ROOT, markdown_table, parser, start, write_report
from benchmarks.quality import reference_renders
from doodl.embedded import Preset
from doodl.serving import EMBEDDED, ModelCache, Serving
from doodl.showcase import example_request, final, run
from doodl.world import beauty, shapes
from doodl.world.evaluators import AESTHETIC_GAIN, EXAMPLE_METHODS, verdict

CANDIDATES = {"text": 48, "vocabulary": 16, "personalization": 36, "aesthetic": 16}
PHOTO_BEAUTY_BELOW = 7.0  # the aesthetic candidates' photos: room for the +1 a success needs
IMAGES = RESULTS / "examples-images"  # the candidates' references and photos


# --- candidates -----------------------------------------------------------------------------------


def save(image: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def candidates(tab: str, n: int, seed: int, images: Path) -> list[list[Any]]:
    """n candidate rows of `tab`, in `doodl.embedded.Examples`' format (the seed last); their images saved
    in `images`."""
    rng = np.random.default_rng([seed, list(CANDIDATES).index(tab)])
    seeds = np.random.default_rng([seed, list(CANDIDATES).index(tab), 1]).integers(10_000, size=n)
    rows: list[list[Any]] = []
    for i in range(n):
        if tab == "text":
            rows.append([shapes.caption(shapes.random_scene(rng, 2))])
        elif tab == "vocabulary":
            rows.append([f"a red {rng.choice(shapes.SHAPES)}", str(rng.choice(shapes.SHADE_NAMES["red"]))])
        elif tab == "personalization":
            entity = shapes.random_scene(rng, 1).objects[0]
            paths = [
                save(image, images / f"personalization-{i}-{k}.png")
                for k, image in enumerate(reference_renders(rng, entity))
            ]
            rows.append([f"a {entity.shape}", paths])
        elif i % 2 == 0:
            rows.append([shapes.caption(shapes.random_scene(rng, 1)), None])
        else:  # every other candidate starts from a photo, one the beauty rule leaves room to improve
            scene = shapes.random_scene(rng, 1)
            while beauty.beauty(scene) >= PHOTO_BEAUTY_BELOW:
                scene = shapes.random_scene(rng, 1)
            path = save(shapes.to_pil(shapes.render(scene)), images / f"aesthetic-{i}.png")
            rows.append([shapes.caption(scene), path])
    return [[*row, int(s)] for row, s in zip(rows, seeds, strict=True)]


# --- running and reporting ------------------------------------------------------------------------

QUICK = {"steps": 4, "iterations": 2}


def scan(args: argparse.Namespace, raw: Path) -> None:
    """Run this shard's candidates of every tab asked for; one JSON line per candidate in `raw`."""
    serving, models = generator_serving(args.generator), ModelCache("cpu", torch.float32)
    done = {(r["tab"], r["index"]): r["row"] for r in load(raw)}
    part, parts = (int(v) for v in args.shard.split("/"))
    for tab in args.tabs:
        preset = serving.presets()[tab]
        if args.quick:
            preset = Preset(dataclasses.replace(preset.settings, **QUICK), 2, preset.one_step_scale)
        n = 1 if args.quick else args.candidates or CANDIDATES[tab]
        for index, row in enumerate(candidates(tab, n, args.seed, args.images)):
            if index % parts != part or done.get((tab, index)) == portable(row):
                continue
            shown = final(run(example_request(serving, tab, row, preset), models))
            record = {"tab": tab, "index": index, "row": portable(row), **verdict(tab, row, shown.gallery)}
            print(json.dumps(record), flush=True)
            with raw.open("a") as out:
                out.write(json.dumps(record) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, their image paths relative to the repository."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [{**r, "row": portable(r["row"])} for r in records]


def portable(value: Any) -> Any:
    """A row with each image path inside the repository made relative to it."""
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return Path(value).relative_to(ROOT).as_posix()
    return value


def names_only(value: Any) -> Any:
    """A row with each image path reduced to its file name: the shipped copies keep the candidates' names."""
    if isinstance(value, list):
        return [names_only(v) for v in value]
    return Path(value).name if isinstance(value, str) and value.endswith(".png") else value


def generator_serving(generator: str) -> Serving:
    """The app's local serving with an embedded generator (sd, flow) as its own."""
    return Serving().with_generator(f"{EMBEDDED}/{generator}")


def shipped(tab: str, row: list[Any], generator: str) -> bool:
    """Whether a candidate is one of the generator's examples in the app."""
    return names_only(row) in [names_only(r) for r in generator_serving(generator).examples().rows[tab]]


def shown_row(tab: str, row: list[Any]) -> str:
    """A candidate as a short line: the prompt, its target and its seed."""
    prompt = row[0]
    if tab == "vocabulary":
        prompt = f"{row[0]} → {row[1]}"
    if tab == "personalization":
        prompt = f"{row[0]} + {len(row[1])} references ({Path(row[1][0]).stem[:-2]})"
    if tab == "aesthetic" and row[1]:
        prompt = f"{row[0]}, from photo {Path(row[1]).name}"
    return f"{prompt}, seed {row[-1]}"


def table(tab: str, records: list[dict[str, Any]], generator: str) -> str:
    digits = "{:.1f}" if tab == "aesthetic" else "{:.2f}"
    rows = [
        [
            r["index"],
            shown_row(tab, r["row"]),
            *(digits.format(r["scores"][m]) for m in EXAMPLE_METHODS),
            "**yes**" if r["shows_doodl"] else "no",
            "shipped" if shipped(tab, r["row"], generator) else "",
            f"{r['read']['unguided']} → {r['read']['DOODL']}",
        ]
        for r in sorted(records, key=lambda r: r["index"])
    ]
    headers = ["#", "candidate", *EXAMPLE_METHODS, "shows DOODL", "app", "the judge reads: unguided → DOODL"]
    return markdown_table(headers, rows)


def plot(by_tab: dict[str, list[dict[str, Any]]], drawn_by: str) -> Figure:
    figure = Figure(figsize=(6, 3))
    ax = figure.subplots()
    tabs = list(by_tab)
    shown = [sum(r["shows_doodl"] for r in by_tab[t]) for t in tabs]
    ax.bar(tabs, [len(by_tab[t]) for t in tabs], color="lightgrey", label="candidates")
    ax.bar(tabs, shown, color="C0", label="show DOODL (unguided fails, DOODL succeeds)")
    ax.set(ylabel="examples", title=f"Candidate examples at each tab's preset, {drawn_by}")
    ax.legend(fontsize=7)
    return figure


def report(paths: list[Path], out: Path, command: str, generator: str) -> None:
    # A candidate run again (its generator changed) counts by its last record.
    records = list({(r["tab"], r["index"]): r for path in paths for r in load(path)}.values())
    by_tab = {
        t: [r for r in records if r["tab"] == t] for t in CANDIDATES if any(r["tab"] == t for r in records)
    }
    drawn_by = generator_serving(generator).examples().drawn_by
    sections = [
        f"`{command}`. Each candidate run as the app runs an example: {drawn_by} and the embedded guides at "
        "the tab's preset (`doodl.embedded.presets`) and the candidate's seed, the side by side of "
        "unguided / one-step / DOODL (its lowest-loss iteration). Scores: text and personalization, the "
        "judge's fraction right; vocabulary, 1 if the red object's shade is the target; aesthetic, the "
        "beauty rule (1-10) read from the pixels. *Shows DOODL*: unguided fails and DOODL succeeds "
        f"(aesthetic: +{AESTHETIC_GAIN:g} beauty, the prompt still shown, a photo's scene kept). *app*: one "
        "of the app's examples.",
    ]
    for tab, rows in by_tab.items():
        count = sum(r["shows_doodl"] for r in rows)
        sections.append(
            f"## {tab}: {count} of {len(rows)} candidates show DOODL\n\n{table(tab, rows, generator)}"
        )
        print(f"{tab}: {count} of {len(rows)} show DOODL")
    name = "examples" if generator == "sd" else f"examples-{generator}"
    write_report(out, name, f"Examples chosen by evidence: {drawn_by}", sections, plot(by_tab, drawn_by))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--tabs", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--candidates", type=int, help="candidates per tab (default: CANDIDATES)")
    p.add_argument("--seed", type=int, default=0, help="the candidates' generator")
    p.add_argument("--shard", default="0/1", help="K/N: run candidates K, K+N, K+2N, ... (one process of N)")
    p.add_argument("--raw", type=Path, help="JSON lines of the candidates' verdicts (resumed if present)")
    p.add_argument("--images", type=Path, default=IMAGES, help="where the candidates' images are saved")
    p.add_argument("--report", type=Path, nargs="+", help="only write the report from these JSON lines")
    p.add_argument(
        "--generator", choices=("sd", "flow"), default="sd", help="the embedded UNet (sd) or flow transformer"
    )
    args = p.parse_args(argv)
    out = start(args)
    if args.quick:
        args.images = out / "examples-images"
    command = "python -m benchmarks.examples" + (
        "" if args.generator == "sd" else f" --generator {args.generator}"
    )
    if args.report:
        report(args.report, out, f"{command} --report " + " ".join(map(str, args.report)), args.generator)
        return
    raw = args.raw or out / (
        "examples-raw.jsonl" if args.generator == "sd" else f"examples-{args.generator}-raw.jsonl"
    )
    scan(args, raw)
    report([raw], out, command + (" --quick" if args.quick else ""), args.generator)


if __name__ == "__main__":
    main()
