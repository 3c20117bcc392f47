"""How large DOODL's steps are at each capability's preset: the gradient's elements against the clip.

    python -m benchmarks.steps                   # 3 prompts per capability, the quality benchmark's first
    python -m benchmarks.steps --quick           # 1 prompt, a few steps

DOODL's step is clamp(-rate x gradient, +-clip) per latent element (`doodl.optimize.DoodlSettings`): where
nearly every element exceeds the clip, the step is a sign step of the clip's size, whatever the loss's
scale; where they sit below it, the rate and the loss's scale set the step, and the clip does nothing. This
measures which holds for each guide: the gradient of the preset's loss w.r.t. the initial latents (the
tied pair's mean, as the optimizer steps it) at the quality benchmark's first prompts and seeds.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from benchmarks.common import EMBEDDED, markdown_table, parser, start, write_report
from benchmarks.quality import CAPABILITIES, OVERRIDES, SEED, load_guides, settings_for
from doodl import latent_grad, load_pipeline
from doodl.chain import chain_of, decodes_separately, schedule_of
from doodl.optimize import conditioning, final_loss, initial_latents

QUANTILES = (0.5, 0.9, 0.99)


def gradient(model, task, settings) -> torch.Tensor:
    """The mean over the pair of d loss / d (x_T, y_T) at the initial latents: the tied optimizer's."""
    eps = conditioning(model, task.prompt, settings)
    loss = final_loss(
        model, task.loss, settings.first_image_only, separately=decodes_separately(settings, model)
    )
    chain = chain_of(settings, model)
    x, y = initial_latents(model, settings)
    result = latent_grad(eps, x, y, schedule_of(settings, model), loss, chain.mode, chain.step)
    return ((result.grad[0] + result.grad[1]) / 2).flatten().abs().double()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=3, help="prompts per capability")
    args = p.parse_args()
    # What quality.settings_for reads: the presets' own settings.
    for name in ("steps", "iterations", *OVERRIDES):
        setattr(args, name, None)
    args.seed = SEED
    if args.quick:
        args.n, args.steps = 1, 3
    out = start(args)
    model = load_pipeline(EMBEDDED / "sd", "cpu")
    guides = load_guides(EMBEDDED, "cpu")
    rows, fractions = [], {}
    for index, capability in enumerate(CAPABILITIES):
        rng = np.random.default_rng(args.seed + index)  # the quality benchmark's prompts, in its order
        grads, clip = [], None
        for i in range(args.n):
            settings = settings_for(args, capability, index, i)
            torch.manual_seed(settings.seed)
            grads.append(gradient(model, capability.make_task(guides, rng), settings))
            clip = settings.grad_clip
        g = torch.cat(grads)
        fractions[capability.name] = float((g > clip).double().mean())
        each = [float((one > clip).double().mean()) for one in grads]
        quantiles = torch.quantile(g.float(), torch.tensor(QUANTILES)).tolist()
        rows.append(
            [
                capability.name,
                f"{clip:g}",
                *(f"{q:.1e}" for q in quantiles),
                f"{g.square().mean().sqrt():.1e}",
                f"{fractions[capability.name]:.0%}",
                f"{min(each):.0%} to {max(each):.0%}",
            ]
        )
        print(rows[-1], flush=True)
    notes = (
        f"Embedded model, each capability's preset (`doodl.embedded.EMBEDDED_PRESETS`), the gradient at the "
        f"initial latents of the quality benchmark's first {args.n} prompts per capability, all elements "
        "pooled. Above the clip, an element's step is the clip; below, it is rate x gradient (rate 1)."
    )
    headers = [
        "capability",
        "clip",
        *(f"abs(g) q{round(q * 100)}" for q in QUANTILES),
        "RMS",
        "elements > clip",
        "per prompt",
    ]
    write_report(
        out, "steps", "How large DOODL's steps are", [notes, markdown_table(headers, rows)], plot(fractions)
    )


def plot(fractions: dict[str, float]) -> Figure:
    figure = Figure(figsize=(5, 3))
    ax = figure.subplots()
    ax.bar(list(fractions), [100 * f for f in fractions.values()])
    ax.set_ylabel("gradient elements above the clip (%)")
    return figure


if __name__ == "__main__":
    main()
