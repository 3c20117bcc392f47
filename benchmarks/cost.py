"""Cost of one DOODL iteration, as a multiple of one EDICT sample, and UNet evaluations per iteration.

    python -m benchmarks.cost            # tiny and embedded models, 10 / 25 / 50 steps
    python -m benchmarks.cost --quick    # seconds-long smoke run

An iteration is `latent_grad`: the EDICT chain, decoding both final latents, a loss, and the gradient
w.r.t. the initial latents. A sample is the EDICT chain and one decode, without gradients. Both are
timed in the same run, interleaved, and reported as a ratio, which background load leaves meaningful.
The reversible backward pass costs one UNet re-evaluation plus one backward per half-step: about 4
samples if a backward costs two forwards (the "expected" column measures it); the target is 4.3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from matplotlib.figure import Figure

from benchmarks.common import (
    Problem,
    count_unet_calls,
    interleaved_medians,
    markdown_table,
    model_folders,
    parser,
    problem,
    start,
    tiny_folder,
    write_report,
)
from doodl import MODES, edict_denoise, edict_schedule, latent_grad

TARGET = 4.3  # iteration / sample for the reversible mode
COUNT_SIZE = 8  # UNet calls do not depend on the model: count them on the smallest one


def sample(pb: Problem, steps: int) -> None:
    schedule = edict_schedule(pb.model.scheduler, steps)
    with torch.no_grad():
        x, _ = edict_denoise(pb.eps, *pb.latents, schedule)
        pb.model.decode(x)


def iteration(pb: Problem, steps: int, mode: str) -> None:
    latent_grad(pb.eps, *pb.latents, edict_schedule(pb.model.scheduler, steps), pb.loss, mode)


def runs(pb: Problem, steps: int) -> dict[str, Callable[[], None]]:
    """A sample and an iteration of each gradient mode, as zero-argument tasks."""
    tasks = {"sample": functools.partial(sample, pb, steps)}
    return tasks | {mode: functools.partial(iteration, pb, steps, mode) for mode in MODES}


def ratios(pb: Problem, steps: int, repeats: int) -> tuple[float, dict[str, float]]:
    """Median seconds of a sample, and of an iteration of each mode divided by it."""
    seconds = interleaved_medians(runs(pb, steps), repeats)
    return seconds["sample"], {mode: seconds[mode] / seconds["sample"] for mode in MODES}


def vjp_over_forward(pb: Problem, repeats: int) -> float:
    """Time of a UNet evaluation with its vector-Jacobian product over one without gradients.

    The reversible backward makes one such evaluation per half-step where the sample makes one plain
    call, so an iteration should cost about 1 + this ratio samples (~4 if a backward costs two forwards).
    """
    x, t = pb.latents[0], pb.model.scheduler.config.num_train_timesteps // 2

    def forward() -> None:
        with torch.no_grad():
            pb.eps(x, t)

    def vjp() -> None:
        z = x.detach().requires_grad_(True)
        torch.autograd.grad(pb.eps(z, t), z, torch.ones_like(z))

    seconds = interleaved_medians({"forward": forward, "vjp": vjp}, 5 * repeats)
    return seconds["vjp"] / seconds["forward"]


def unet_calls(pb: Problem, steps: int) -> list[list[object]]:
    """Rows: UNet calls (all, with autograd on, latents evaluated) of a sample and of each mode."""
    rows = []
    for name, run in runs(pb, steps).items():
        with count_unet_calls(pb.model.unet) as n:
            run()
        rows.append([steps, name, n.calls, n.grad_calls, n.latents, official_calls(name, steps)])
    return rows


def official_calls(name: str, steps: int) -> str:
    """UNet calls of the official implementation: cond and uncond apart, two half-steps, so 4 per step
    forward; its reversible wrapper keeps inputs and recomputes each step with autograd: 4 more per step."""
    forward = 4 * steps
    return {"sample": f"{forward} (0 grad)", "reversible": f"{2 * forward} ({forward} grad)"}.get(name, "-")


def plot(results: dict[str, dict[int, dict[str, float]]]) -> Figure:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    for (model, by_steps), style in zip(results.items(), ("-", "--", ":")):
        steps = sorted(by_steps)
        for i, (mode, marker) in enumerate(zip(MODES, "os^")):
            values = [by_steps[s][mode] for s in steps]
            ax.plot(steps, values, style, color=f"C{i}", marker=marker, label=f"{mode}, {model}")
    ax.axhline(TARGET, color="grey", linestyle="--", label=f"target {TARGET}")
    ax.set(xlabel="EDICT steps", ylabel="iteration time / sample time", title="Cost of a DOODL iteration")
    ax.legend(fontsize=7)
    return figure


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median) after a warm-up round")
    # 16: the UNet dominates the decode. At 32 its 1024-token self-attention makes a call ~20x dearer on
    # CPU, and a 50-step run takes hours.
    p.add_argument("--tiny-size", type=int, default=16, help="latent side of the tiny model")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded model")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats, args.tiny_size, args.no_embedded = [2, 4], 1, 8, True
    out = start(args)

    results: dict[str, dict[int, dict[str, float]]] = {}
    rows = []
    for name, folder in model_folders(args.tiny_size, not args.no_embedded).items():
        pb = problem(folder)
        expected = 1 + vjp_over_forward(pb, args.repeats)
        results[name] = {}
        for steps in args.steps:
            seconds, ratio = ratios(pb, steps, args.repeats)
            results[name][steps] = ratio
            verdict = "PASS" if ratio["reversible"] <= TARGET else "FAIL"
            cells = [f"{seconds:.2f}", *(f"{ratio[m]:.2f}" for m in MODES), f"{expected:.2f}", verdict]
            rows.append([name, steps, *cells])
            print(rows[-1], flush=True)

    counting = problem(tiny_folder(COUNT_SIZE))
    calls = [row for steps in args.steps for row in unet_calls(counting, steps)]
    calls_table = markdown_table(
        ["steps", "run", "UNet calls", "with grad", "latents evaluated", "official: calls (grad)"], calls
    )
    cost_table = markdown_table(
        ["model", "steps", "sample (s)", *(f"{m} / sample" for m in MODES), "expected", f"<= {TARGET}"], rows
    )
    notes = (
        f"Iteration = `latent_grad` (chain, decode of both latents, loss, gradient); sample = EDICT chain "
        f"+ one decode, no gradient. Medians of {args.repeats} interleaved rounds after a warm-up; ratios "
        "from one run, as the machine is shared. expected = 1 + (UNet call with its VJP) / (plain UNet "
        "call), timed on the same model: the reversible ratio if the UNet were the only cost. UNet calls "
        "are counted with a forward hook: ours evaluate cond and uncond in one batched call (2 latents). "
        "The official code makes 4 calls per step (cond, uncond, two half-steps) and, with "
        "keep_input=True, stores each step's input pair and recomputes the step with autograd in the "
        "backward: 8 calls per step per iteration, half with autograd -- the same UNet work as our "
        "checkpoint and reversible modes, in twice as many calls."
    )
    write_report(out, "cost", "Cost of a DOODL iteration", [notes, calls_table, cost_table], plot(results))


if __name__ == "__main__":
    main()
