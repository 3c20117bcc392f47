"""How good the embedded model's unguided samples are, by chain and number of steps: EDICT against DDIM.

    python -m benchmarks.samplers                 # 30 prompts per capability, EDICT and DDIM at 10-50 steps
    python -m benchmarks.samplers --quick

EDICT couples two latents and calls the UNet at timestep t on a latent already moved towards t-1; it
samples what DDIM samples only when its steps are small. Where it needs more steps than DDIM to match the
model's own samples, every image DOODL starts from is worse than the model can make, and a DOODL iteration
costs more UNet calls (EDICT's step makes two, DDIM's one). The prompts and noise are the quality
benchmark's (`benchmarks.quality`, same seeds), the images scored by its evaluators, never by a guide.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import EMBEDDED, markdown_table, parser, start, write_report
from benchmarks.quality import CAPABILITIES, SEED, load_guides, mean_and_error, measured_preset
from doodl import load_pipeline, sample

CHAINS = (
    ("edict", 15),
    ("edict", 20),
    ("edict", 30),
    ("edict", 50),
    ("ddim", 10),
    ("ddim", 20),
    ("ddim", 50),
)


def scores(model, guides, index: int, chains, n: int, seed: int) -> dict[tuple[str, int], list[float]]:
    """{(sampler, steps): the evaluator's score of the unguided image of each of the first n prompts}."""
    capability = CAPABILITIES[index]
    rng = np.random.default_rng(seed + index)  # the quality benchmark's prompts, in its order
    tasks = [capability.make_task(guides, rng) for _ in range(n)]
    found = {}
    for sampler, steps in chains:
        found[sampler, steps] = []
        for i, task in enumerate(tasks):
            settings = dataclasses.replace(
                measured_preset(capability).settings, seed=1000 * index + i, sampler=sampler, steps=steps
            )
            found[sampler, steps].append(task.score(sample(model, task.prompt, settings)))
        print(capability.name, sampler, steps, statistics.mean(found[sampler, steps]), flush=True)
    return found


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=30, help="prompts per capability")
    p.add_argument("--seed", type=int, default=SEED, help="the quality benchmark's")
    args = p.parse_args()
    chains = CHAINS if not args.quick else (("edict", 3), ("ddim", 3))
    if args.quick:
        args.n = 2
    out = start(args)
    model = load_pipeline(EMBEDDED / "sd", "cpu")
    guides = load_guides(EMBEDDED, "cpu")
    names = [c.name for c in CAPABILITIES]
    found = {
        name: scores(model, guides, index, chains, args.n, args.seed) for index, name in enumerate(names)
    }
    rows = []
    for sampler, steps in chains:
        calls = steps * (2 if sampler == "edict" else 1)  # EDICT's step makes two calls, DDIM's one
        cells = []
        for name in names:
            mean, error = mean_and_error(found[name][sampler, steps])
            cells.append(f"{mean:.3g} ± {error:.2g}")
        rows.append([sampler, steps, calls, *cells])
    notes = (
        f"The unguided image of each of the quality benchmark's first {args.n} prompts per capability (its "
        "seeds, the presets' CFG), scored by its evaluators (mean ± standard error): judge fractions and "
        "success rates 0-1, beauty 1-10. UNet calls: of one sample (cond and uncond in one call)."
    )
    headers = [
        "chain",
        "steps",
        "UNet calls",
        *(f"{name}: {c.evaluator}" for name, c in zip(names, CAPABILITIES)),
    ]
    write_report(
        out,
        "samplers",
        "Unguided samples by chain and steps",
        [notes, markdown_table(headers, rows)],
        plot(found, chains),
    )


def plot(found: dict, chains) -> Figure:
    figure = Figure(figsize=(9, 2.6))
    axes = figure.subplots(1, len(found))
    for ax, (name, by_chain) in zip(axes, found.items()):
        for sampler in dict(chains):
            steps = [s for c, s in chains if c == sampler]
            ax.plot(steps, [statistics.mean(by_chain[sampler, s]) for s in steps], "o-", label=sampler)
        ax.set(title=name, xlabel="steps")
    axes[0].legend()
    return figure


if __name__ == "__main__":
    main()
