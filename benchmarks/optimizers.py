"""DOODL's step rules and regularizers against random search at matched UNet passes, on held-out prompts.

    python -m benchmarks.optimizers [--n 8] [--configs sgd/renormalize nesterov/renormalize adam/white ...]

Prompts are drawn as the quality benchmark draws them (its tasks, evaluators and presets), from another seed
(--seed, default 7031; the quality benchmark's prompts come from 2024 + k, its pilots' from 2124 + k), so no
setting was chosen on them. For each tab and prompt: the unguided sample, best-of-k with as many UNet passes
as DOODL's (the chain is the same for every configuration, so are the passes), and DOODL from the prompt's
own noise with each configuration `RULE/REGULARIZER[@CLIP]` (CLIP: the gradient clip, or xK: K times the
tab's preset clip; default the preset's). Every image is judged by the quality benchmark's evaluator of its
tab (higher is better); paired differences at 2 standard errors. `--seed 2124` draws the quality benchmark's
pilot prompts, where a configuration may be chosen. Outcomes are kept under OUT/optimizers-raw/ (a stopped
run resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import EMBEDDED, markdown_table, parser, start, write_report
from benchmarks.quality import (
    CAPABILITIES,
    OVERRIDES,
    Capability,
    capability_models_digest,
    load_guides,
    measured_preset,
    preset_of,
    settings_for,
)
from doodl.experiment import Contest, OutcomeStore, Trial, mean_se, paired, run_trial
from doodl.pipeline import load_pipeline
from doodl.settings import REGULARIZERS, STEP_RULES, DoodlSettings

SEED = 7031
TODAY = "sgd/renormalize"  # the paper's rule and regularizer, the presets'


def parse_config(text: str) -> tuple[dict, int]:
    """(settings it changes, samples DOODL starts from the best of) of 'RULE/REGULARIZER[@CLIP][,start=K]
    [,iterations=N]': 'adam/white@0.03' -> ({'step_rule': 'adam', 'regularizer': 'white', 'grad_clip': 0.03},
    1); '@x10' scales each tab's preset clip by 10 ({'clip_scale': 10.0}); ',start=20,iterations=10'
    searches 20 samples (400 UNet passes at 20 steps) before 10 iterations."""
    head, *options = text.split(",")
    rule_and_regularizer, _, clip = head.partition("@")
    rule, _, regularizer = rule_and_regularizer.partition("/")
    given = dict(option.partition("=")[::2] for option in options)
    scaled = clip.startswith("x")
    if (
        rule not in STEP_RULES
        or (regularizer or "renormalize") not in REGULARIZERS
        or not set(given) <= {"start", "iterations"}
        or not all(value.isdigit() and int(value) >= 1 for value in given.values())
        or (clip and not _positive_number(clip.removeprefix("x")))
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected RULE/REGULARIZER[@CLIP or @xSCALE][,start=K][,iterations=N], RULE one of "
            f"{', '.join(STEP_RULES)}, REGULARIZER one of {', '.join(REGULARIZERS)}"
        )
    config = {"step_rule": rule, "regularizer": regularizer or "renormalize"}
    if clip:
        config |= {"clip_scale" if scaled else "grad_clip": float(clip.removeprefix("x"))}
    config |= {"iterations": int(given["iterations"])} if "iterations" in given else {}
    return config, int(given.get("start", 1))


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def configured(settings: DoodlSettings, config: str) -> tuple[DoodlSettings, int]:
    """The settings a configuration runs with, and the samples its start is the best of."""
    changes, start = parse_config(config)
    if "clip_scale" in changes:
        changes["grad_clip"] = settings.grad_clip * changes.pop("clip_scale")
    return dataclasses.replace(settings, **changes), start


def store(
    out: Path, capability: Capability, args, name: str, settings: DoodlSettings, start: int = 1
) -> OutcomeStore:
    key = {
        "seed": args.seed,
        "settings": dataclasses.replace(settings, seed=0).changed(from_noise=True),  # every prompt's seed
        "start": start,
        "models": capability_models_digest(args.assets, args.generator, capability.name),
    }
    folder = name.replace("/", "-").replace("@", "-at-").replace(",", "-").replace("=", "")
    return OutcomeStore.open(out / "optimizers-raw" / capability.name / folder, key, replace_other=True)


def run_capability(model, guides, capability: Capability, index: int, args, out: Path) -> dict[str, list]:
    """{method or configuration: [its record per prompt]}, each record with its evaluator's score."""
    rng = np.random.default_rng(args.seed + index)
    preset = measured_preset(args, capability)
    kept: dict[str, list] = {name: [] for name in ("unguided", "best-of-k", *args.configs)}

    for i in range(args.n):
        task = capability.make_task(guides, rng, preset_of(args, capability).cutouts)
        settings = settings_for(args, capability, index, i)
        trial = Trial(i, task.prompt, settings.seed)
        scored = partial(lambda made, task: {"score": task.score(made.image)}, task=task)
        # The reference methods once, with the presets' DOODL, whose passes size best-of-k.
        contest = Contest(model, task.loss_of, settings, preset.one_step_scale)
        reference = store(out, capability, args, "reference", settings)
        records = dict(run_trial(contest, trial, ("unguided", "doodl", "best-of-k"), reference, scored))
        kept["unguided"].append(records["unguided"])
        kept["best-of-k"].append(records["best-of-k"])
        for config in args.configs:
            tried, start = configured(settings, config)
            if tried == settings and start == 1:  # the presets' own: the reference's DOODL
                kept[config].append(records["doodl"])
                continue
            # A search first: DOODL from the best of `start` samples, their passes counted.
            method = "doodl" if start == 1 else "best-of-k+doodl"
            contest = Contest(model, task.loss_of, tried, preset.one_step_scale, start_k=start)
            held = store(out, capability, args, config, tried, start)
            kept[config].append(dict(run_trial(contest, trial, (method,), held, scored))[method])
        print(capability.name, i, task.prompt, {name: r[-1]["score"] for name, r in kept.items()}, flush=True)
    return kept


def scores_of(records: dict[str, list]) -> dict[str, list]:
    """{method: [evaluator's score per prompt]} of `run_capability`'s records."""
    return {name: [record["score"] for record in kept] for name, kept in records.items()}


def rows(capability: str, records: dict[str, list], configs: list[str]) -> list[list[str]]:
    scores = scores_of(records)

    def mean(values: list) -> str:
        m, se = mean_se(values)
        return f"{m:.2f} ± {se:.2f}"

    def against(config: str, other: str) -> str:
        p = paired(scores[config], scores[other])
        return f"{p.mean:+.2f} ± {p.se:.2f} ({p.word}; {p.higher} up, {p.lower} down)"

    def row(name: str, *comparisons: str) -> list[str]:
        passes = statistics.fmean(r["unet_calls"] for r in records[name])
        loss = statistics.fmean(r["loss"] for r in records[name])
        return [capability, name, mean(scores[name]), f"{loss:.3f}", f"{passes:.0f}", *comparisons]

    def lower_loss(name: str) -> str:
        """On how many prompts the method's image has a lower guide's loss than random search's."""
        pairs = zip(records[name], records["best-of-k"])
        return f"{sum(mine['loss'] < theirs['loss'] for mine, theirs in pairs)} of {len(records[name])}"

    out = [row("unguided", "", "", "", ""), row("best-of-k", "", "", "", "")]
    for config in configs:
        today = against(config, TODAY) if TODAY in scores and config != TODAY else ""
        comparisons = lower_loss(config), against(config, "best-of-k"), against(config, "unguided"), today
        out.append(row(config, *comparisons))
    return out


def arguments() -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=8, help="held-out prompts per tab")
    p.add_argument(
        "--configs",
        nargs="+",
        default=[TODAY, "nesterov/renormalize", "adam/renormalize", "sgd/white", "sgd/norm"],
        help="RULE/REGULARIZER[@CLIP][,start=K][,iterations=N] of DOODL to compare",
    )
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--only", nargs="+", choices=[c.name for c in CAPABILITIES], help="tabs to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--assets", type=Path, default=EMBEDDED)
    p.add_argument("--generator", choices=("sd", "flow"), default="sd")
    args = p.parse_args()
    for config in args.configs:
        parse_config(config)
    # What the quality benchmark's settings read: the presets, unchanged.
    for name in ("steps", "iterations", *OVERRIDES):
        setattr(args, name, None)
    if args.quick:
        args.n, args.steps, args.iterations = 1, 3, 2
    return args


def plot(all_scores: dict[str, dict[str, list]]) -> Figure:
    """Each tab's mean score per method, with its standard error."""
    figure = Figure(figsize=(4 * len(all_scores), 3.2))
    for axes, (tab, scores) in zip(figure.subplots(1, len(all_scores), squeeze=False)[0], all_scores.items()):
        means = [mean_se(values) for values in scores.values()]
        axes.bar(range(len(means)), [m for m, _ in means], yerr=[se for _, se in means], color="tab:blue")
        axes.set_xticks(range(len(means)), list(scores), rotation=60, ha="right", fontsize=7)
        axes.set_title(tab)
    figure.tight_layout()
    return figure


def main() -> None:
    args = arguments()
    out = start(args)
    model = load_pipeline(args.assets / args.generator, args.device)
    guides = load_guides(args.assets, args.device)
    table, all_scores = [], {}
    for index, capability in enumerate(CAPABILITIES):  # the index seeds prompts, whatever --only says
        if args.only is None or capability.name in args.only:
            records = run_capability(model, guides, capability, index, args, out)
            all_scores[capability.name] = scores_of(records)
            table += rows(capability.name, records, args.configs)
    headers = ["tab", "method", "evaluator's score", "guide's loss", "UNet passes", "loss below best-of-k's"]
    headers += ["vs best-of-k", "vs unguided", f"vs {TODAY}"]
    notes = (
        f"Embedded {args.generator} generator, each tab's preset (doodl/embedded.py) but for the step rule "
        f"and regularizer; {args.n} held-out prompts per tab drawn from seed {args.seed}; DOODL from the "
        "prompt's own noise, or with start=K from the best of K samples by the guide; best-of-k at the "
        "UNet passes of the preset's DOODL. The guide's loss: of the final image, mean over prompts (what "
        "the optimizer lowers). Paired differences of the evaluator's score, mean ± standard error, a tie "
        "within 2 SE."
    )
    name = "optimizers" + ("" if args.generator == "sd" else f"-{args.generator}")
    write_report(
        out,
        name,
        "Step rules and regularizers vs random search",
        [notes, markdown_table(headers, table)],
        plot(all_scores),
    )


if __name__ == "__main__":
    main()
