"""Where the app's method fails on the vocabulary tab, and whose failure it is: for each of the quality
benchmark's prompts its evaluator marks wrong, the guide's own loss on DOODL's final image and the colors
and shades read from the pixels of the unguided and DOODL images. Nothing is run: it reads the saved
outcomes and images of `python -m benchmarks.quality` (results/quality-raw/).

    python -m benchmarks.vocabulary_failures     # writes results/vocabulary_failures.md

A failure at a high loss is the optimizer's: DOODL did not get there. At a low loss the shade classifier
reads its target where the evaluator reads something else, and either may be wrong: the classifier fooled
(before it had a "not red" class it named a shade of red for an object of any color), or the evaluator
misreading the pixels (a red object merged with a halo of another color, or a dark ground taken for the
object); the saved images tell which.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from benchmarks.common import EMBEDDED, RESULTS, markdown_table, parser, start, write_report
from benchmarks.evaluators import nearest_shade, segments
from benchmarks.quality import CAPABILITIES, STARTED, RawStore, load_guides

LOW_LOSS = 0.1  # cross-entropy: the classifier gives the target class more than 90 %


def read(path: Path) -> str:
    """The colors and shade indices of the image's blobs, largest first, as the evaluator reads them."""
    if not path.is_file():
        return "-"
    pixels, masks = segments(Image.open(path))
    return (
        ", ".join(f"{color} {shade}" for color, shade in (nearest_shade(pixels, m) for m in masks)) or "none"
    )


def failures(raw: Path, n: int) -> list[list[str]]:
    """A row per prompt of the first n where the app's method scored 0."""
    index = [c.name for c in CAPABILITIES].index("vocabulary")
    saved = json.loads((raw / "vocabulary.json").read_text())
    prompts = saved["prompts"]
    # The tasks are drawn again as the run drew them, from the seed it was made with.
    guides, rng = load_guides(EMBEDDED, "cpu"), np.random.default_rng(saved["key"]["seed"] + index)
    store = RawStore(raw / "vocabulary.json", {}, prompts)
    rows = []
    for i, outcomes in enumerate(prompts[:n]):
        task = CAPABILITIES[index].make_task(guides, rng)  # drawn in order: prompt i's is the i-th
        ours = outcomes.get(STARTED)
        if ours is None or ours["score"] > 0:
            continue
        low = ours["loss"] < LOW_LOSS
        whose = "guide and evaluator disagree" if low else "optimizer (target not reached)"
        seen = [read(store.image_path(i, m)) for m in ("unguided", STARTED)]
        rows.append([str(i), task.prompt, task.target, f"{ours['loss']:.3f}", *seen, whose])
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--raw", type=Path, default=RESULTS / "quality-raw", help="the quality benchmark's saved runs"
    )
    p.add_argument("--n", type=int, default=30, help="prompts")
    args = p.parse_args()
    if args.quick:
        args.n = 5
    out = start(args)
    rows = failures(args.raw, args.n)
    disagree = sum(row[-1].startswith("guide") for row in rows)
    notes = (
        f"The app's method ({STARTED}) on the first {args.n} vocabulary prompts of the quality benchmark: "
        f"{len(rows)} failures by the evaluator (the shade measured from the pixels), {disagree} of them at "
        f"a guide loss below {LOW_LOSS:g}. Read: each blob's color and shade index (0-3: for red, maroon, "
        "crimson, scarlet, rose), largest first."
    )
    headers = ["prompt", "caption", "target", "guide loss", "unguided reads", "DOODL reads", "whose failure"]
    figure = Figure(figsize=(4, 2.5))
    ax = figure.subplots()
    ax.bar(["disagree", "optimizer"], [disagree, len(rows) - disagree], color=["tab:orange", "tab:blue"])
    ax.set(ylabel="failures", title="Vocabulary: whose failure")
    write_report(
        out,
        "vocabulary_failures",
        "Vocabulary: where the app's method fails",
        [notes, markdown_table(headers, rows)],
        figure,
    )


if __name__ == "__main__":
    main()
