"""Cost of one DOODL iteration, as a multiple of one EDICT sample, and UNet evaluations per iteration;
and the seconds of a whole default run of each tab of the app on the embedded model.

    python -m benchmarks.cost            # tiny and embedded models, 10 / 25 / 50 steps; default runs
    python -m benchmarks.cost --quick    # seconds-long smoke run
    python -m benchmarks.cost --only-default-runs --threads 2    # what a visitor waits, on 2 idle cores

An iteration is `latent_grad`: the EDICT chain, decoding both final latents, a loss, and the gradient
w.r.t. the initial latents. A sample is the EDICT chain and one decode, without gradients. Both are
timed in the same run, interleaved, and reported as a ratio, which background load leaves meaningful.
The reversible backward pass costs one UNet re-evaluation plus one backward per half-step: about 4
samples if a backward costs two forwards (the "expected" column measures it); the target is 4.3.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import torch
from matplotlib.figure import Figure

from benchmarks.common import (
    Problem,
    interleaved_medians,
    markdown_table,
    model_folders,
    parser,
    problem,
    start,
    tiny_folder,
    write_report,
)
from doodl import MODES, edict_denoise, edict_schedule, latent_grad, one_step_guidance, optimize
from doodl.capabilities import Crops, build_weighted, load_guides
from doodl.chain import chain_of, decodes_separately, schedule_of
from doodl.edict import ddim_step
from doodl.embedded import EXAMPLES, ROOT, presets
from doodl.losses import Loss
from doodl.optimize import conditioning, final_loss, initial_latents
from doodl.pipeline import count_unet_calls, load_pipeline
from doodl.serving import ModelCache, Serving
from doodl.settings import SAMPLERS
from doodl.showcase import example_request

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
        with count_unet_calls(pb.model.denoiser) as n:
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


# --- a whole default run of each tab ----------------------------------------------------------------

DEFAULT_RUN_TARGET = 45.0  # seconds for all iterations plus the side-by-side, on 2 idle cores
DDIM_MODES = ("autograd", "checkpoint")


def tab_losses() -> dict[str, tuple[str, Callable[[torch.Generator], Loss]]]:
    """Each tab's first example in the app, the UNet's (the flow generator has no text example, and a run's
    cost does not depend on its prompt): (prompt, loss factory over a crop generator), as the app builds
    it."""
    serving, models, losses = Serving(), ModelCache("cpu", torch.float32), {}
    for tab, preset in serving.presets().items():
        asked = example_request(serving, tab, EXAMPLES.rows[tab][0], preset)
        guides = load_guides([name for name, _ in asked.terms], asked.guides, models.guide)

        def make_loss(generator: torch.Generator, asked=asked, guides=guides) -> Loss:
            crops = Crops(asked.options.cutouts, generator=generator)
            return build_weighted(asked.terms, guides, asked.target, crops)

        losses[tab] = (asked.prompt, make_loss)
    return losses


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def iteration_parts(model, prompt: str, loss: Loss, settings) -> dict[str, float]:
    """Seconds of one default iteration's parts: the chain forward, the decode of the judged latents (both
    of EDICT's pair, DDIM's one sample) with its backward, the guide on every view with its backward, and
    the backward through the chain (the settings' own: EDICT's reversible one, or DDIM's from what it
    stored)."""
    eps, schedule = conditioning(model, prompt, settings), schedule_of(settings, model)
    chain = chain_of(settings, model)
    x, y = initial_latents(model, settings)
    forward = timed(lambda: chain.denoise(eps, x, y, schedule))
    with torch.no_grad():
        x0, y0 = chain.denoise(eps, x, y, schedule)
    one = settings.first_image_only or chain.few_steps
    latents = (x0 if one else torch.cat([x0, y0])).requires_grad_(True)

    def decode() -> None:
        images = model.decode(latents)
        torch.autograd.grad(images.sum(), latents)

    pixels = model.decode(latents).detach().requires_grad_(True)
    decoding = timed(decode)
    guide = timed(lambda: torch.autograd.grad(loss(pixels), pixels))
    final = final_loss(model, loss, one, separately=decodes_separately(settings, model))
    whole = timed(lambda: latent_grad(eps, x, y, schedule, final, chain.mode, chain.step))
    return {
        "chain forward": forward,
        "decode + backward": decoding,
        "guide + backward": guide,
        "backward through the chain (UNet VJPs)": whole - forward - decoding - guide,
        "iteration": whole,
    }


def ddim_gradient_modes(model, prompt: str, loss: Loss, settings, repeats: int) -> dict[str, float]:
    """Median seconds of one iteration's gradient through a DDIM chain with its graph stored (autograd)
    and with its step inputs stored (checkpoint), interleaved so that load falls on both alike."""
    eps, schedule = conditioning(model, prompt, settings), schedule_of(settings, model)
    x, y = initial_latents(model, settings)
    final = final_loss(model, loss, True, separately=False)
    runs = {
        mode: functools.partial(latent_grad, eps, x, y, schedule, final, mode, ddim_step)
        for mode in DDIM_MODES
    }
    return interleaved_medians(runs, repeats)


def default_runs(quick: bool, overrides: dict, generator: str = "sd") -> tuple[list[str], dict[str, float]]:
    """Tables: where one default iteration's time goes, the seconds of each tab's whole default run (DOODL
    and the side-by-side one-step image), and, on a plain chain, an iteration in either gradient mode;
    `overrides` replace the presets' settings (a lever's). `generator`: the embedded UNet (sd) or flow."""
    model = load_pipeline(ROOT / generator)
    runs, parts, modes = [], [], []
    for tab, (prompt, make_loss) in tab_losses().items():
        preset = presets(ROOT / generator)[tab]
        settings = dataclasses.replace(preset.settings, **overrides)
        if quick:
            settings = dataclasses.replace(settings, steps=2, iterations=2)
        crops = torch.Generator().manual_seed(settings.seed)
        doodl_seconds = timed(functools.partial(optimize, model, prompt, make_loss(crops), settings))
        one_step = timed(
            functools.partial(
                one_step_guidance, model, prompt, make_loss(crops), preset.one_step_scale, settings
            )
        )
        total = doodl_seconds + one_step
        verdict = "PASS" if total <= DEFAULT_RUN_TARGET else "FAIL"
        runs.append(
            [
                tab,
                settings.steps,
                settings.iterations,
                settings.start_samples,
                preset.cutouts,
                f"{doodl_seconds:.1f}",
                f"{one_step:.1f}",
                f"{total:.1f}",
                verdict,
            ]
        )
        print(runs[-1], flush=True)
        seconds = iteration_parts(model, prompt, make_loss(crops), settings)
        parts.append([tab, *(f"{v:.2f}" for v in seconds.values())])
        if chain_of(settings, model).few_steps:
            medians = ddim_gradient_modes(model, prompt, make_loss(crops), settings, 1 if quick else 5)
            saved = 1 - medians["autograd"] / medians["checkpoint"]
            modes.append([tab, *(f"{medians[m]:.2f}" for m in DDIM_MODES), f"{saved:.0%}"])
    runs_table = markdown_table(
        [
            "tab",
            "steps",
            "iterations",
            "start samples",
            "crops",
            "DOODL (s)",
            "one-step side-by-side (s)",
            "total (s)",
            f"<= {DEFAULT_RUN_TARGET:g} s",
        ],
        runs,
    )
    parts_table = markdown_table(
        [
            "tab",
            "chain forward",
            "decode + backward",
            "guide + backward",
            "backward through the chain",
            "iteration (s)",
        ],
        parts,
    )
    modes_table = markdown_table(["tab", *(f"{m} (s)" for m in DDIM_MODES), "saved"], modes) if modes else ""
    return [parts_table, runs_table, modes_table], {row[0]: float(row[6]) for row in runs}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median) after a warm-up round")
    # 16: the UNet dominates the decode. At 32 its 1024-token self-attention makes a call ~20x dearer on
    # CPU, and a 50-step run takes hours.
    p.add_argument("--tiny-size", type=int, default=16, help="latent side of the tiny model")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded model")
    p.add_argument("--only-default-runs", action="store_true", help="only time each tab's default run")
    p.add_argument("--sampler", choices=SAMPLERS, help="default runs: the chain (default: the presets')")
    p.add_argument("--iterations", type=int, help="default runs: DOODL iterations (default: the presets')")
    p.add_argument("--mode", choices=MODES, help="default runs: the gradient mode (default: the presets')")
    p.add_argument(
        "--generator", choices=("sd", "flow"), default="sd", help="default runs: the embedded UNet or flow"
    )
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats, args.tiny_size, args.no_embedded = [2, 4], 1, 8, True
    out = start(args)
    if not args.only_default_runs:
        ratio_report(args, out)
    given = {"sampler": args.sampler, "iterations": args.iterations, "mode": args.mode}
    default_runs_report(args.quick, out, {k: v for k, v in given.items() if v is not None}, args.generator)


def ratio_report(args, out) -> None:
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


def default_runs_report(quick: bool, out, overrides: dict, generator: str = "sd") -> None:
    (parts_table, runs_table, modes_table), totals = default_runs(quick, overrides, generator)
    drawn = "UNet" if generator == "sd" else "flow transformer"
    notes = (
        f"A visitor's wait on the embedded {drawn}: each tab's first example at the tab's settings "
        "(`doodl.embedded.presets`): the start's samples, all DOODL iterations, and the one-step "
        "image of the side-by-side (the unguided image is DOODL's first iteration). Target: at most "
        f"{DEFAULT_RUN_TARGET:g} s on 2 idle cores (`--threads 2`). Below, one default iteration split into "
        "its parts (seconds): the UNet calls "
        "are the chain forward and the backward through it; decode and guide each include their backward."
    )
    if overrides:
        notes += f" The presets' settings replaced by {overrides}."
    figure = Figure(figsize=(5, 3))
    ax = figure.subplots()
    ax.bar(list(totals), list(totals.values()), color="tab:red")
    ax.axhline(DEFAULT_RUN_TARGET, color="grey", linestyle="--", label=f"target {DEFAULT_RUN_TARGET:g} s")
    ax.set(ylabel="seconds", title="A whole default run per tab")
    ax.legend(fontsize=7)
    modes = [
        "A DDIM chain has no exact inverse: its gradient stores either the whole graph (autograd, what "
        "`DoodlSettings` takes on small latents) or each step's input, recomputing each step's forward in "
        "the backward (checkpoint). One iteration's gradient in each, at the tab's settings, medians of "
        "interleaved rounds:",
        modes_table,
    ]
    sections = [notes, parts_table, runs_table, *(modes if modes_table else [])]
    name = "default-runs" if generator == "sd" else f"default-runs-{generator}"
    write_report(out, name, f"Seconds of a default run ({drawn})", sections, figure)


if __name__ == "__main__":
    main()
