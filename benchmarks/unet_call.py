"""What one UNet call of a DOODL chain costs, and whether that cost is arithmetic or overhead.

    python -m benchmarks.unet_call --threads 2              # the embedded UNet, eager and compiled
    python -m benchmarks.unet_call --threads 2 --no-compile # eager only (compiling takes minutes on a CPU)
    python -m benchmarks.unet_call --quick                  # seconds-long smoke run on a tiny model

A call here is what `LatentDiffusion.noise_predictor` makes: one batched UNet evaluation of the
unconditional and conditional halves (2 latents) at one timestep, with the prompt's context. Timed: the
forward without gradients (the chain forward makes one per half-step) and the forward with the
vector-Jacobian product to the latents (the reversible backward makes one per half-step; the weights are
frozen, so no weight gradients). FLOPs are torch's own count (`torch.utils.flop_counter`). From them, the
UNet seconds of a default iteration (`doodl.embedded.EMBEDDED_PRESETS`: 2 calls per step forward, 2 with
their VJP backward), which is what an iteration of 1.2 s must fit in beside decoding and the guide.

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
from doodl.embedded import EMBEDDED_PRESETS
from doodl.pipeline import ONEDNN_MIN_LATENT_SIDE, guidance_halves, load_pipeline, onednn

ITERATION_TARGET = 1.2  # seconds per default iteration on 2 cores (issue: 30 iterations in today's ~35 s)


def call_inputs(folder: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model's UNet, a guided call's latents (2, C, h, w) and its context, as DOODL batches them."""
    model = load_pipeline(folder, "cpu", torch.float32)
    halves = guidance_halves(model.encode_prompt(PROMPT), 4.0)
    context = torch.cat([half.hidden for half in halves])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((len(halves), *model.latent_shape()[1:]), generator=generator)
    return model.unet, latents, context


def forward(unet, latents, context, t: torch.Tensor) -> None:
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=context)


def forward_vjp(unet, latents, context, t: torch.Tensor) -> None:
    x = latents.clone().requires_grad_(True)
    out = unet(x, t, encoder_hidden_states=context).sample
    torch.autograd.grad(out, x, torch.ones_like(out))


def milliseconds(run, unet, latents, context, calls: int) -> float:
    """Mean ms of a call over `calls` timesteps across the schedule, after two warm-up calls."""
    for t in (999, 500):
        run(unet, latents, context, torch.tensor(t))
    begin = time.perf_counter()
    for k in range(calls):
        run(unet, latents, context, torch.tensor(980 - k * (960 // max(calls - 1, 1))))
    return 1000 * (time.perf_counter() - begin) / calls


def flops(unet, latents, context) -> float:
    with FlopCounterMode(display=False) as counter:
        forward(unet, latents, context, torch.tensor(500))
    return counter.get_total_flops()


def measure(unet, latents, context, calls: int, compiled: bool) -> dict[str, float]:
    compile_s = 0.0
    if compiled:
        unet = torch.compile(unet, dynamic=False)
        begin = time.perf_counter()
        forward(unet, latents, context, torch.tensor(1))
        forward_vjp(unet, latents, context, torch.tensor(1))
        compile_s = time.perf_counter() - begin
    small = max(latents.shape[-2:]) <= ONEDNN_MIN_LATENT_SIDE
    with onednn(not small):  # as `noise_predictor` runs it
        fwd = milliseconds(forward, unet, latents, context, calls)
        vjp = milliseconds(forward_vjp, unet, latents, context, calls)
    return {"forward": fwd, "forward+VJP": vjp, "compile": compile_s}


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
    unet, latents, context = call_inputs(folder)
    gflop = flops(unet, latents, context) / 1e9
    steps = EMBEDDED_PRESETS["text"].settings.steps
    rows, results = [], {}
    for compiled in (False,) if args.no_compile else (False, True):
        label = "compiled" if compiled else "eager"
        ms = results[label] = measure(unet, latents, context, args.calls, compiled)
        unet_s = 2 * steps * (ms["forward"] + ms["forward+VJP"]) / 1000
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
        f"One call: 2 latents {tuple(latents.shape[1:])}, context {tuple(context.shape[1:])}; ms are means "
        f"over {args.calls} timesteps. UNet s per iteration = {2 * steps} x (forward + forward with VJP), "
        f"the UNet work of one reversible iteration at the presets' {steps} steps; an iteration of "
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
    write_report(out, "unet_call", "What a UNet call costs", [notes, table], plot(results))


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
