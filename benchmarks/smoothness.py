"""Why a DOODL loss curve falls or zig-zags: how noisy the guide's loss is across views, and how far a step
along the gradient keeps lowering it.

    python -m benchmarks.smoothness                               # shipped guides, personalization, 3 prompts
    python -m benchmarks.smoothness --assets OTHER --capability text --n 5
    python -m benchmarks.smoothness --quick

Per prompt, from the unguided initial latents at the capability's settings: the spread (standard deviation)
of the loss over 4 draws of the random views, at the same latents; then the loss after one sign step of
size alpha along the gradient (each latent element moved by alpha, the latent renormalized, as DOODL does),
with the views fixed. DOODL's step is clip-sized at first and grows to ten times the clip under momentum 0.9:
where the loss stops falling along the gradient, steps that large overshoot; where the views' spread is as
large as one step's gain, the curve zig-zags whatever the step.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from benchmarks.common import EMBEDDED, markdown_table, parser, start, write_report
from benchmarks.quality import CAPABILITIES, load_guides
from doodl import edict_denoise, initial_latents, latent_grad, load_pipeline
from doodl.chain import schedule_of
from doodl.embedded import EMBEDDED_PRESETS
from doodl.optimize import conditioning

ALPHAS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)
VIEW_DRAWS = 4


def probe(model, task, settings) -> tuple[float, list[float]]:
    """(spread of the loss over view draws, the loss after a sign step of each size in ALPHAS)."""
    eps, schedule = conditioning(model, task.prompt, settings), schedule_of(settings, model)
    x, _ = initial_latents(model, settings)

    def loss(x0: torch.Tensor, y0: torch.Tensor, views: int = 0) -> torch.Tensor:
        torch.manual_seed(views)  # the views' draws: the same seed, the same views
        return task.loss(model.decode(torch.cat([x0, y0])))

    def loss_at(z: torch.Tensor, views: int) -> float:
        with torch.no_grad():
            return float(loss(*edict_denoise(eps, z, z.clone(), schedule), views))

    grad = sum(latent_grad(eps, x, x.clone(), schedule, loss).grad) / 2
    spread = statistics.stdev(loss_at(x, views) for views in range(1, VIEW_DRAWS + 1))
    steps = [x - alpha * grad.sign() for alpha in ALPHAS]
    return spread, [loss_at(z * x.norm() / z.norm(), 0) for z in steps]


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--assets", type=Path, default=EMBEDDED, help="folder of sd/, clip/, classifier/, aesthetic/"
    )
    p.add_argument("--capability", default="personalization", choices=[c.name for c in CAPABILITIES])
    p.add_argument("--n", type=int, default=3, help="prompts")
    p.add_argument("--seed", type=int, default=99)
    args = p.parse_args()
    capability = next(c for c in CAPABILITIES if c.name == args.capability)
    settings = EMBEDDED_PRESETS[capability.name].settings
    if args.quick:
        args.n, settings = 1, settings.__class__(**{**settings.__dict__, "steps": 3})
    out = start(args)
    model = load_pipeline(args.assets / "sd")
    guides = load_guides(args.assets, "cpu")
    rng = np.random.default_rng(args.seed)
    rows, curves = [], []
    for i in range(args.n):
        task = capability.make_task(guides, rng)
        s = settings.__class__(**{**settings.__dict__, "seed": 300 + i})
        spread, along = probe(model, task, s)
        curves.append(along)
        rows.append([task.prompt, f"{spread:.4f}", *(f"{v:.4f}" for v in along)])
        print(rows[-1], flush=True)
    figure = Figure(figsize=(5, 3))
    ax = figure.subplots()
    for curve in curves:
        ax.plot(range(len(ALPHAS)), curve, marker="o")
    ax.set_xticks(range(len(ALPHAS)), [f"{a:g}" for a in ALPHAS])
    ax.set(xlabel="sign step per latent element", ylabel="guidance loss", title=capability.name)
    notes = (
        f"{capability.name} on the models in `{args.assets.name}/`, at the app's settings "
        f"({s.steps} steps, CFG {s.guidance_scale:g}), {args.n} prompts. Spread: standard deviation of "
        f"the loss over {VIEW_DRAWS} draws of the views at the initial latents. Then the loss after one "
        "sign step of each size along the gradient, same views."
    )
    headers = ["prompt", "spread over views", *(f"step {a:g}" for a in ALPHAS)]
    name = "smoothness" + ("" if capability.name == "personalization" else f"-{capability.name}")
    name += "" if args.assets == EMBEDDED else f"-{args.assets.name}"
    write_report(out, name, "Smoothness of the guidance loss", [notes, markdown_table(headers, rows)], figure)


if __name__ == "__main__":
    main()
