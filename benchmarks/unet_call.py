"""What one UNet call of a DOODL chain costs, and whether that cost is arithmetic or fixed cost: the same
call with 1, 2, 4 and 8 latents.

    python -m benchmarks.unet_call --threads 2              # the embedded UNet, eager and compiled
    python -m benchmarks.unet_call --threads 2 --no-compile # eager only (compiling takes minutes on a CPU)
    python -m benchmarks.unet_call --quick                  # seconds-long smoke run on a tiny model

A call here is `LatentDiffusion.noise_predictor`'s own, as DOODL makes it: one batched UNet evaluation of the
unconditional and conditional halves (2 latents) at one timestep, with the prompt's context. Timed: the
forward without gradients (the chain forward makes one per half-step) and the forward with the
vector-Jacobian product to the latents (the reversible backward makes one per half-step; the weights are
frozen, so no weight gradients). FLOPs are torch's own count (`torch.utils.flop_counter`). From them, the
UNet seconds of a default iteration (`doodl.embedded.EMBEDDED_PRESETS`: a DDIM chain whose graph is stored,
one forward with its VJP a step; EDICT's reversible pass would make 2 forwards a step, then 2 with their
VJPs), which is what an iteration of 1.2 s must fit in beside decoding and the guide.

Compiled: `torch.compile` of the UNet, timesteps passed as tensors (a Python int would be a new graph at
every step); the first forward's and VJP's seconds are the compile, paid once per process unless
inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, by default under the temp folder) holds the graphs. For
the cold figure a first visit pays:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.unet_call --threads 2
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    PROMPT,
    embedded_folder,
    markdown_table,
    parser,
    start,
    tiny_folder,
    write_report,
)
from doodl.chain import plain_chain
from doodl.embedded import EMBEDDED_PRESETS
from doodl.pipeline import LatentDiffusion, NoisePredictor, load_pipeline

ITERATION_TARGET = 1.2  # seconds per default iteration on 2 cores (issue: 30 iterations in today's ~35 s)
PRESET = EMBEDDED_PRESETS["text"].settings  # every tab's steps and CFG are the same
BATCHES = (1, 2, 4, 8)  # latents per call, for the fixed-cost table


def noise_predictor(folder: Path) -> tuple[LatentDiffusion, NoisePredictor, torch.Tensor]:
    """The model, DOODL's guided noise predictor of a prompt at the presets' CFG, and latents for it."""
    model = load_pipeline(folder, "cpu", torch.float32)
    eps = model.noise_predictor(model.encode_prompt(PROMPT), PRESET.guidance_scale)
    generator = torch.Generator().manual_seed(0)
    return model, eps, torch.randn(model.latent_shape(), generator=generator, dtype=PRESET.precision)


def forward(eps: NoisePredictor, latents: torch.Tensor, t: torch.Tensor) -> None:
    with torch.no_grad():
        eps(latents, t)


def forward_vjp(eps: NoisePredictor, latents: torch.Tensor, t: torch.Tensor) -> None:
    x = latents.clone().requires_grad_(True)
    out = eps(x, t)
    torch.autograd.grad(out, x, torch.ones_like(out))


def milliseconds(run, eps: NoisePredictor, latents: torch.Tensor, calls: int) -> float:
    """Mean ms of a call over `calls` timesteps across the schedule, after two warm-up calls."""
    for t in (999, 500):
        run(eps, latents, torch.tensor(t))
    begin = time.perf_counter()
    for k in range(calls):
        run(eps, latents, torch.tensor(980 - k * (960 // max(calls - 1, 1))))
    return 1000 * (time.perf_counter() - begin) / calls


def flops(eps: NoisePredictor, latents: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        forward(eps, latents, torch.tensor(500))
    return counter.get_total_flops()


def measure(
    model: LatentDiffusion, eps: NoisePredictor, latents, calls: int, compiled: bool
) -> dict[str, float]:
    """ms of a forward and of a forward with its VJP; compiled, `model`'s UNet is compiled in place first."""
    compile_s = 0.0
    if compiled:
        model.unet.compile(dynamic=False)
        begin = time.perf_counter()
        forward(eps, latents, torch.tensor(1))
        forward_vjp(eps, latents, torch.tensor(1))
        compile_s = time.perf_counter() - begin
    fwd = milliseconds(forward, eps, latents, calls)
    vjp = milliseconds(forward_vjp, eps, latents, calls)
    return {"forward": fwd, "forward+VJP": vjp, "compile": compile_s}


def batch_scaling(eps: NoisePredictor, latents: torch.Tensor, calls: int) -> list[list[str]]:
    """Rows of ms per forward with 1 to 8 latents in one call: a call whose time hardly grows with its
    latents is mostly fixed cost (kernel launches and set-up on tiny tensors), not arithmetic."""
    rows, one = [], None
    for n in BATCHES:
        ms = milliseconds(forward, eps, latents.repeat(n, 1, 1, 1), calls)
        one = one or ms
        rows.append([str(n), f"{ms:.1f}", f"{ms / one:.2f}", f"{ms / n:.1f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--calls", type=int, default=40, help="timed calls per measurement")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    args = p.parse_args()
    folder = embedded_folder()
    name = "embedded (8x8 latents)"
    if args.quick or folder is None:
        folder, name, args.calls, args.no_compile = tiny_folder(8), "tiny 8x8 latents", 3, True
    out = start(args)
    model, eps, latents = noise_predictor(folder)
    gflop = flops(eps, latents) / 1e9
    scaling_rows = batch_scaling(eps, latents, args.calls)  # eager: before the UNet may be compiled in place
    steps, ddim = PRESET.steps, plain_chain(PRESET)
    # DDIM (the presets' chain, its graph stored on these latents): a step is one forward with its VJP.
    # EDICT's reversible pass: two forwards a step, then two again with their VJPs.
    forwards, vjps = (0, steps) if ddim else (2 * steps, 2 * steps)
    rows, results = [], {}
    for compiled in (False,) if args.no_compile else (False, True):
        label = "compiled" if compiled else "eager"
        ms = results[label] = measure(model, eps, latents, args.calls, compiled)
        unet_s = (forwards * ms["forward"] + vjps * ms["forward+VJP"]) / 1000
        rows.append(
            [
                name,
                label,
                f"{gflop:.3f}",
                f"{ms['forward']:.1f}",
                f"{ms['forward+VJP']:.1f}",
                f"{gflop / ms['forward'] * 1000:.1f}",
                f"{unet_s:.2f}",
                f"{ms['compile']:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    notes = (
        f"One call: latents {tuple(latents.shape[1:])}, cond and uncond in one batch, CFG "
        f"{PRESET.guidance_scale:g}; ms are means "
        f"over {args.calls} timesteps. UNet s per iteration = "
        + (f"{steps} x (forward with VJP)" if ddim else f"{2 * steps} x (forward + forward with VJP)")
        + f", the UNet work of one iteration at the presets' {steps} {'DDIM' if ddim else 'EDICT'} steps; "
        f"an iteration of "
        f"{ITERATION_TARGET} s also holds decoding and the guide. Inductor's cache: "
        f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'the default one (maybe warm)')}."
    )
    headers = [
        "model",
        "UNet",
        "GFLOP per call",
        "forward (ms)",
        "forward + VJP (ms)",
        "forward GFLOP/s",
        "UNet s per iteration",
        "compile (s)",
    ]
    table = markdown_table(headers, rows)
    scaling = (
        "Fixed cost or arithmetic: the eager forward with several latents in one call (each latent is a "
        "cond and an uncond row). Were a call arithmetic, its time would grow in proportion.\n\n"
        + markdown_table(
            ["latents per call", "forward (ms)", "x one latent's", "ms per latent"],
            scaling_rows,
        )
    )
    write_report(out, "unet_call", "What a UNet call costs", [notes, table, scaling], plot(results))


def plot(results: dict[str, dict[str, float]]) -> Figure:
    figure = Figure(figsize=(5, 3))
    ax = figure.subplots()
    labels = list(results)
    for offset, part in ((-0.2, "forward"), (0.2, "forward+VJP")):
        ax.bar([k + offset for k in range(len(labels))], [results[k][part] for k in labels], 0.4, label=part)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms per call")
    ax.legend()
    return figure


if __name__ == "__main__":
    main()
