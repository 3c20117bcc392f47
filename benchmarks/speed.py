"""What a denoiser call costs DOODL against what it costs diffusers' own pipeline, eager and compiled, in one
process on one device, and a profile of one EDICT step (its top ops and host synchronisations).

    python -m benchmarks.speed --arch sd15 --device cuda --models /tmp/doodl-gpu-models   # benchmarks/gpu.sh
    python -m benchmarks.speed --quick     # a tiny model on the CPU, compiled by aot_eager, in seconds

Timed at the same latent shape and dtype, the UNet's attention SDPA (diffusers' default processor):
- diffusers: the UNet called alone with the inputs its pipeline passes it (a device timestep, conditioning
  prepared once: the least a call can cost), and its whole pipeline (`output_type="latent"`, DDIM) per
  step; compiled as diffusers' documentation does it (weights channels_last, then `torch.compile` with
  `fullgraph=True`, on CUDA `mode="reduce-overhead"`: CUDA graphs);
- DOODL: a sample (the EDICT chain forward, two calls a step) per call, and a reversible iteration
  (`latent_grad` with a pixel loss, so that the UNet dominates) per UNet pass (a forward, or a backward
  through one); compiled by `DoodlSettings.compile` (`doodl.pipeline.compiled_denoiser`).
Everything eager first, then compiled (compiling moves the UNet's weights to channels_last in place). A
compiled run's first calls are its compile, reported apart; then each figure is the median of --repeats
rounds after two warm-up rounds (CUDA graphs record on the second call).
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from matplotlib.figure import Figure
from torch.profiler import ProfilerActivity, profile

from benchmarks.architectures import SD_ARCHITECTURES, save_random_sd
from benchmarks.common import (
    GUIDANCE,
    PROMPT,
    device_seconds,
    markdown_table,
    parser,
    start,
    tiny_folder,
    write_report,
)
from benchmarks.memory import tiny_arch_folder
from doodl import DoodlSettings, LatentDiffusion, initial_latents, latent_grad, load_pipeline
from doodl.chain import schedule_of
from doodl.edict import edict_denoise, edict_step
from doodl.optimize import conditioning, final_loss
from doodl.pipeline import NoisePredictor, StableDiffusion, compiled_denoiser, count_unet_calls

ARCHS = ("tiny", "tiny-sdxl", *SD_ARCHITECTURES, "sdxl")
# Profiler events that block the host until the device catches up (aten::_local_scalar_dense is what
# .item(), float(t) and bool(t) run).
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def model_folder(arch: str, models: Path | None, tiny_size: int) -> Path:
    """The pipeline to time: a tiny random one, or a real architecture's random weights built once into
    `models` (where benchmarks.memory builds them too)."""
    if arch == "tiny":
        return tiny_folder(tiny_size)
    if arch == "tiny-sdxl":
        return tiny_arch_folder(arch, tiny_size)
    root = models or Path(tempfile.mkdtemp(prefix=f"doodl-{arch}-"))
    if models is None:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = root / arch
    if not (folder / "model_index.json").is_file():
        print(f"building a random {arch} pipeline in {folder}", flush=True)
        save_random_sd(folder, arch)
    return folder


def median_seconds(work: Callable[[], object], device: str, repeats: int) -> float:
    for _ in range(2):
        work()
    return statistics.median(device_seconds(work, device) for _ in range(repeats))


def recorded_call(model: LatentDiffusion, eps: NoisePredictor, latents: torch.Tensor, t: torch.Tensor):
    """(args, kwargs) DOODL's predictor hands the denoiser at a latent: the same inputs, as diffusers'
    pipeline passes them (`return_dict=False`)."""
    seen = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["call"] = (args, {**kwargs, "return_dict": False})

    handle = model.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            eps(latents, t)
    finally:
        handle.remove()
    return seen["call"]


def diffusers_pipeline(model: StableDiffusion) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """diffusers' own pipeline over the model's parts (a DDIM scheduler of its own)."""
    parts = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "tokenizer": model.tokenizer,
        "unet": model.unet,
        "scheduler": DDIMScheduler.from_config(model.scheduler.config),
    }
    if model.xl:
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_run(pipe, model: StableDiffusion, latents: torch.Tensor, steps: int) -> Callable[[], object]:
    """diffusers' pipeline from the same prompt embeddings and noise, `steps` steps, no decode."""
    embeds = model.encode_prompt(PROMPT)
    given = {"prompt_embeds": embeds.hidden[1:], "negative_prompt_embeds": embeds.hidden[:1]}
    if model.xl:
        given |= {
            "pooled_prompt_embeds": embeds.pooled[1:],
            "negative_pooled_prompt_embeds": embeds.pooled[:1],
        }
    noise = latents.to(model.dtype)
    _, _, height, width = latents.shape

    def run() -> object:
        with torch.no_grad():
            return pipe(
                **given,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                latents=noise,
                output_type="latent",
                height=height * model.vae_scale,
                width=width * model.vae_scale,
            )

    return run


def doodl_runs(
    model: LatentDiffusion, settings: DoodlSettings, device: str
) -> dict[str, tuple[Callable[[], object], int, float]]:
    """DOODL's sample and iteration as (work, UNet passes, seconds of the first run: a compiled one's
    compile), the denoiser compiled if the settings say."""
    eps = conditioning(model, PROMPT, settings)
    schedule = schedule_of(settings, model)
    x, y = initial_latents(model, settings)
    loss = final_loss(model, lambda images: images.mean())

    def sample() -> object:
        with torch.no_grad():
            return edict_denoise(eps, x, y, schedule)

    def iteration() -> object:
        return latent_grad(eps, x, y, schedule, loss)

    runs = {}
    for name, work in (("sample", sample), ("iteration", iteration)):
        with count_unet_calls(model.denoiser) as calls:
            first = device_seconds(work, device)
        runs[name] = (work, calls.passes, first)
    return runs


def step_profile(
    eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, schedule, device: str
) -> tuple[str, str]:
    """The profiler's tables of one EDICT step (its top ops), and its host synchronisations: the profiler's
    sync events, and on CUDA the warnings of torch's sync debug mode (one sync may be in both)."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        edict_step(eps, x, y, schedule, 0)  # warm
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                edict_step(eps, x, y, schedule, 0)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
    events = sum(event.name in SYNC_EVENTS for event in prof.events())
    syncs = f"{events} sync events"
    if cuda:
        syncs += f", {sum('synchroniz' in str(w.message) for w in warned)} sync debug warnings"
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=12)]
    if cuda:
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=12))
    return "\n".join(tables), syncs


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="sd15", choices=ARCHS, help="model architecture (random weights)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--models", type=Path, help="build the random models here and reuse them")
    p.add_argument("--steps", type=int, default=10, help="EDICT steps of a sample and an iteration")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median) after two warm-up rounds")
    p.add_argument("--size", type=int, help="image side (default: the model's own)")
    p.add_argument("--tiny-size", type=int, default=16, help="latent side of the tiny models")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend (--quick: aot_eager)")
    args = p.parse_args()
    if args.quick:
        args.device, args.steps, args.repeats, args.tiny_size, args.backend = "cpu", 2, 1, 8, "aot_eager"
        args.arch = args.arch if args.arch.startswith("tiny") else "tiny"
    out = start(args)
    folder = model_folder(args.arch, args.models, args.tiny_size)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = load_pipeline(folder, args.device, dtype)
    settings = DoodlSettings(steps=args.steps, height=args.size, width=args.size)
    sections, ms = measure(model, settings, args)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    title = f"A denoiser call, DOODL's against diffusers', {args.arch} ({card})"
    write_report(out, f"speed-{args.arch}-{args.device}", title, sections, figure(ms, f"{args.arch}, {card}"))


def measure(
    model: LatentDiffusion, settings: DoodlSettings, args
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The report's sections (notes, profiles of one step, the table) and ms per call of each run, eager
    and compiled."""
    device, repeats, steps = args.device, args.repeats, args.steps
    eps = conditioning(model, PROMPT, settings)
    schedule = schedule_of(settings, model)
    x, y = initial_latents(model, settings)
    call_args, call_kwargs = recorded_call(model, eps, x, schedule.timestep(0))
    pipe = diffusers_pipeline(model)
    pipeline = pipeline_run(pipe, model, x, steps)

    def unet_call(unet: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return unet(*call_args, **call_kwargs)

        return call

    seconds_of: dict[str, dict[str, float]] = {}
    per = {"diffusers: UNet call": 1, "diffusers: pipeline, per step": steps}
    # Eager, all of it: compiling moves the weights to channels_last.
    seconds_of["diffusers: UNet call"] = {"eager": median_seconds(unet_call(model.unet), device, repeats)}
    seconds_of["diffusers: pipeline, per step"] = {"eager": median_seconds(pipeline, device, repeats)}
    for name, (work, passes, _) in doodl_runs(model, settings, device).items():
        per[f"DOODL: {name}, per UNet pass"] = passes
        seconds_of[f"DOODL: {name}, per UNet pass"] = {"eager": median_seconds(work, device, repeats)}
    eager_profile, eager_syncs = step_profile(eps, x, y, schedule, device)
    print("eager, ms per call:", {k: round(1000 * v["eager"] / per[k], 2) for k, v in seconds_of.items()})
    print(f"eager step, host synchronisations: {eager_syncs}", flush=True)

    # diffusers compiled as its documentation does it.
    mode = "reduce-overhead" if device == "cuda" and args.backend == "inductor" else None
    model.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(model.unet, fullgraph=True, backend=args.backend, mode=mode)
    for label, work in (
        ("diffusers: UNet call", unet_call(pipe.unet)),
        ("diffusers: pipeline, per step", pipeline),
    ):
        seconds_of[label] |= {
            "compile": device_seconds(work, device),
            "compiled": median_seconds(work, device, repeats),
        }
    # DOODL's, by its setting (another backend than inductor: the same function, told the backend).
    if args.backend == "inductor":
        compiled, compiled_settings = model, replace(settings, compile=True)
    else:
        compiled = model.with_denoiser(compiled_denoiser(model.denoiser, args.backend))
        compiled_settings = settings
    for name, (work, _, first) in doodl_runs(compiled, compiled_settings, device).items():
        seconds_of[f"DOODL: {name}, per UNet pass"] |= {
            "compile": first,
            "compiled": median_seconds(work, device, repeats),
        }
    compiled_eps = conditioning(compiled, PROMPT, compiled_settings)
    compiled_profile, compiled_syncs = step_profile(compiled_eps, x, y, schedule, device)

    ms = {
        label: {kind: 1000 * values[kind] / per[label] for kind in ("eager", "compiled")}
        for label, values in seconds_of.items()
    }
    anchor = ms["diffusers: UNet call"]
    rows = []
    for label, values in ms.items():
        eager, fast = values["eager"], values["compiled"]
        rows.append([label, per[label], f"{eager:.2f}", f"{eager / anchor['eager']:.2f}", f"{fast:.2f}",
                     f"{fast / anchor['compiled']:.2f}", f"{seconds_of[label]['compile']:.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
    sample = call_args[0] if call_args else call_kwargs["sample"]
    attention = ", ".join(sorted({type(p).__name__ for p in model.unet.attn_processors.values()}))
    notes = (
        f"`python -m benchmarks.speed {' '.join(sys.argv[1:])}`: {args.arch}, random weights, UNet in "
        f"{str(model.dtype).removeprefix('torch.')}, coupling in float64; one call: UNet input "
        f"{tuple(sample.shape)} (uncond and cond rows), CFG {GUIDANCE:g}, attention {attention}; {steps} "
        "steps; torch.compile "
        f"backend {args.backend}{', CUDA graphs' if mode else ''}. calls timed: UNet calls (or passes) in "
        "one timed run; ms are per call. x diffusers: over diffusers' UNet call, eager over eager and "
        "compiled over compiled. A DOODL iteration's passes: each forward, and each backward through one (a "
        "backward costs about two forwards, so a pass is dearer than a call). compile: seconds of the first "
        "run, "
        "its compile included."
    )
    profiles = (
        f"One EDICT step (two UNet calls), host synchronisations: eager {eager_syncs}; compiled "
        f"{compiled_syncs} (sync events: {', '.join(SYNC_EVENTS)}).\n\nEager:\n\n```\n{eager_profile}"
        f"\n```\n\nCompiled:\n\n```\n{compiled_profile}\n```"
    )
    headers = [
        "run",
        "calls timed",
        "eager (ms)",
        "x diffusers",
        "compiled (ms)",
        "x diffusers",
        "compile (s)",
    ]
    return [notes, profiles, markdown_table(headers, rows)], ms


def figure(ms: dict[str, dict[str, float]], title: str) -> Figure:
    figure = Figure(figsize=(7, 3))
    ax = figure.subplots()
    labels = list(ms)
    for offset, kind in ((-0.2, "eager"), (0.2, "compiled")):
        ax.barh(
            [k + offset for k in range(len(labels))], [ms[label][kind] for label in labels], 0.4, label=kind
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="ms per UNet call (or pass)", title=title)
    ax.legend()
    return figure


if __name__ == "__main__":
    main()
