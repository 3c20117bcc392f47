"""The summary of a batch run (`python -m doodl batch --summarize DIR`): per method, the guide's loss, any
other scorers, their paired differences from unguided with standard errors, seconds and UNet calls, as
DIR/summary.md, DIR/summary.png and DIR/summary.json.

A second, held-out scorer (another CLIP, or the embedded world's judge) tells whether a method improved the
image or only fooled its own guide.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image

from doodl.capabilities import GUIDE_KINDS, Crops, Target, build_loss, load_guide, loss_kind
from doodl.experiment import BASELINE, METHODS, OutcomeStore, mean_se, paired
from doodl.pipeline import to_tensor

Scorer = Callable[[dict[str, Any], Image.Image], float]


def world_judge(record: dict[str, Any], image: Image.Image) -> float:
    """The embedded world's rule-based judge: the fraction of the caption's colors, shapes and relation
    that the pixels show."""
    from doodl.world import judge

    return judge.fraction_right(judge.judge(image, record["target"]["text"] or record["prompt"]))


def loss_scorer(spec: str, device: str) -> Scorer:
    """'LOSS=MODEL': the loss of the table with MODEL as its guide, judged on the record's own views."""
    name, _, model = spec.partition("=")
    kind = loss_kind(name)
    if len(kind.guides) != 1 or not model.strip():
        raise ValueError(
            f"--score {spec!r}: give a loss of one guide and its model, e.g. clip-text=ViT-B-32 openai"
        )
    role = kind.guides[0]
    guides = {role: load_guide(GUIDE_KINDS[role], model, device)}

    def score(record: dict[str, Any], image: Image.Image) -> float:
        wanted = record["target"]
        references = tuple(Image.open(path).convert("RGB") for path in wanted["references"])
        target = Target(wanted["text"], references, wanted["target_class"], wanted["score"])
        crops = Crops(record["cutouts"], generator=torch.Generator().manual_seed(record["seed"]))
        with torch.no_grad():
            return float(build_loss(name, guides, target, crops)(to_tensor(image, image.size)))

    return score


def scorers(specs: Sequence[str], device: str) -> dict[str, tuple[Scorer, bool]]:
    """name -> (scorer, whether higher is better)."""
    return {
        spec: (world_judge, True) if spec == "world-judge" else (loss_scorer(spec, device), False)
        for spec in specs
    }


def by_method(records: list[dict[str, Any]]) -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
    table: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for record in records:
        table.setdefault(record["method"], {})[(record["index"], record["seed"])] = record
    return table


def paired_values(
    table: dict[str, dict[tuple[int, int], dict]], method: str, value: Callable[[dict], float], base: str
) -> tuple[float, float, int] | None:
    """Mean, SE and n of value(method) - value(base) over the pairs both have."""
    if base not in table or method == base:
        return None
    shared = sorted(set(table[method]) & set(table[base]))
    if not shared:
        return None
    difference = paired([value(table[method][k]) for k in shared], [value(table[base][k]) for k in shared])
    return difference.mean, difference.se, difference.n


def statistics_of(records: list[dict[str, Any]], score_names: Sequence[str], base: str = BASELINE) -> dict:
    """Per method: n, the guide's loss and each score (mean, SE), their paired differences from `base`,
    and mean seconds and UNet calls."""
    table, methods = by_method(records), {}
    for method, results in sorted(table.items(), key=lambda item: METHODS.index(item[0])):
        values = list(results.values())
        entry: dict[str, Any] = {
            "n": len(values),
            "seconds": statistics.fmean(r["seconds"] for r in values),
            "unet_calls": statistics.fmean(r["unet_calls"] for r in values),
        }
        for name in ("loss", *score_names):

            def value(record: dict, name: str = name) -> float:
                return record["loss"] if name == "loss" else record["scores"][name]

            entry[name] = mean_se([value(r) for r in values])
            entry[f"{name} vs {base}"] = paired_values(table, method, value, base)
        methods[method] = entry
    return methods


def markdown(stats: dict, names: dict[str, bool], base: str = BASELINE) -> str:
    def cell(pair: Sequence[float] | None) -> str:
        return (
            "–"
            if pair is None
            else f"{pair[0]:+.4f} ± {pair[1]:.4f}"
            if len(pair) == 3
            else f"{pair[0]:.4f} ± {pair[1]:.4f}"
        )

    columns = ["loss", *names]
    direction = {
        "loss": "lower is better",
        **{n: "higher is better" if up else "lower is better" for n, up in names.items()},
    }
    header = ["method", "n"]
    for name in columns:
        header += [f"{name} ({direction[name]})", f"{name}: paired vs {base}"]
    header += ["seconds", "UNet calls"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in stats.items():
        cells = [method, str(entry["n"])]
        for name in columns:
            cells += [cell(entry[name]), cell(entry[f"{name} vs {base}"])]
        cells += [f"{entry['seconds']:.1f}", f"{entry['unet_calls']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    note = "Mean ± standard error; paired: the difference from unguided on the same (prompt, seed) pairs."
    return "\n".join(rows) + "\n\n" + note + "\n"


def plot(stats: dict, names: Sequence[str]) -> Figure:
    columns = ["loss", *names]
    figure = Figure(figsize=(4 * len(columns), 3.2))
    for ax, name in zip(figure.subplots(1, len(columns), squeeze=False)[0], columns):
        methods = list(stats)
        means = [stats[m][name][0] for m in methods]
        errors = [stats[m][name][1] for m in methods]
        ax.bar(methods, means, yerr=errors, color=[f"C{i}" for i in range(len(methods))], capsize=4)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    figure.tight_layout()
    return figure


def summarize(out: Path, score_specs: Sequence[str] = (), device: str = "cpu") -> Path:
    """Score every image with each extra scorer, then write summary.md, summary.png and summary.json."""
    records = OutcomeStore(out).all_records()
    if not records:
        raise ValueError(f"{out} holds no batch results")
    chosen = scorers(score_specs, device)
    for record in records:
        image = Image.open(record["image"]).convert("RGB")
        record["scores"] = {name: scorer(record, image) for name, (scorer, _) in chosen.items()}
    stats = statistics_of(records, list(chosen))
    names = {name: up for name, (_, up) in chosen.items()}
    (out / "summary.md").write_text(markdown(stats, names))
    (out / "summary.json").write_text(json.dumps({"methods": stats, "higher_is_better": names}, indent=1))
    plot(stats, list(chosen)).savefig(out / "summary.png", dpi=120)
    return out / "summary.md"
