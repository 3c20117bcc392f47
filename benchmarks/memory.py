"""Peak memory of one DOODL gradient vs the number of EDICT steps, for each gradient mode.

    python -m benchmarks.memory                  # CPU: peak resident memory (Linux)
    python -m benchmarks.memory --device cuda    # GPU: torch.cuda.max_memory_allocated
    python -m benchmarks.memory --quick
    python -m benchmarks.memory --arch sd15      # real architectures, random weights: per piece (CPU)
    python -m benchmarks.memory --arch sd15 --device cuda   # seconds and memory per iteration (GPU)
    python -m benchmarks.memory --arch sdxl --sizes 512 --models /tmp/sdxl   # SDXL's pieces (CPU)
    python -m benchmarks.memory --arch sdxl --device cuda --size 1024 --modes reversible
    python -m benchmarks.memory --arch sd3-medium --sizes 256 512   # SD3.5 Medium's pieces (CPU)
    python -m benchmarks.memory --arch flux --device cuda --size 1024 --steps 28 --modes reversible
    benchmarks/gpu.sh                            # the prepared GPU run: SD 1.5, SDXL, FLUX.1 dev / schnell

The default (--arch tiny) measures a tiny SD-architecture model across steps and modes. --arch sd15 / sd21
builds random-weight models of the real architectures (and a ViT-L-14 guide) into a folder, loads them
through `load_pipeline` / `load_clip`, and measures each piece of an iteration (one UNet VJP, a decode
with its backward, the guide on 16 views with its backward) and whole reversible iterations. On a GPU it
instead times whole iterations in the three modes at 512 px, 50 steps, float16 with float64 coupling.
--arch sdxl measures SDXL base's pieces (UNet VJP, checkpointed decode, guide) and whole reversible
iterations at each --sizes, and extrapolates the whole iteration to 1024 px in float16 on a GPU.
--arch sd3-medium measures SD3.5 Medium's: one transformer call + VJP and whole reversible iterations, each
with and without the transformer's own gradient checkpointing (`DoodlSettings.denoiser_checkpointing`).

Every measurement runs in a fresh process, so no allocation of an earlier one can hide or inflate it.
"growth" is the peak during `latent_grad` minus the memory held just before it: the gradient's own
footprint. The reversible mode must stay flat: at most 5% more growth at the most steps than at the least.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from benchmarks.architectures import (
    ARCHITECTURES,
    GUIDE_ARCHITECTURE,
    SD_ARCHITECTURES,
    save_random_clip,
    save_random_sd,
)
from benchmarks.common import (
    GUIDANCE,
    PROMPT,
    device_seconds,
    markdown_table,
    parser,
    problem,
    start,
    tiny_folder,
    write_report,
)
from doodl import (
    MODES,
    DoodlSettings,
    LatentDiffusion,
    initial_latents,
    latent_grad,
    tiny,
)
from doodl.chain import LARGE_LATENT_SIDE, chain_of, checkpointing, schedule_of
from doodl.embedded import presets
from doodl.guides import Clip, load_clip
from doodl.losses import CUTOUTS, VIEWS_PER_CHUNK, clip_text_loss, symmetry_loss
from doodl.optimize import Loss, conditioning, final_loss
from doodl.pipeline import decoder_checkpointing, gradient_checkpointing, load_pipeline

FLOW_ARCHITECTURES = ("sd3-medium", "flux", "flux-schnell")
FLAT = 0.05  # the most the reversible mode's growth may rise from the fewest to the most steps
MB = 2**20
GB = 2**30
# The targets for a whole reversible iteration, float32 on the CPU (growth, GB): with a pixel loss
# at 256 px (it was 2.84), and with ViT-L-14 on 16 views at 512 px (it was about 19).
TARGET_256_PIXEL_LOSS = 1.0
TARGET_512_GUIDE = 3.5
# SDXL: a whole reversible iteration may grow at most this much more than one UNet call + VJP (issue #19).
XL_ITERATION_OVER_UNET = 0.10
DNO_SDXL_GB = 50  # Direct Noise Optimization's reported GPU memory for SDXL at 1024 px (issue #19)
# The official code on an A100 (fp16, 512 px, 50 steps), as reported by its users: for comparison only.
OFFICIAL_SECONDS, OFFICIAL_GB = 10.0, 8.3


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: resets the peak RSS that getrusage reports to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def current(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(folder: Path, mode: str, steps: int, device: str, threads: int) -> tuple[int, int]:
    """(memory just before the gradient call, peak during it), in bytes."""
    torch.set_num_threads(threads)
    pb = problem(folder, device)
    schedule = pb.model.schedule(steps, 0.93, True)
    gc.collect()
    before = current(device)
    reset_peak(device)
    latent_grad(pb.eps, *pb.latents, schedule, pb.loss, mode)
    return before, peak(device)


def in_fresh_process(*args: object, function: Callable = measure) -> object:
    """`function(*args)` (by default `measure`) in a new process, forked from a server that has imported
    the libraries only (so each measurement does not pay for importing torch again)."""
    if torch.cuda.is_available():  # a forked child cannot use CUDA once its parent has touched it
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")  # the server starts with os.environ as it is now
        context.set_forkserver_preload(["benchmarks.common"])
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


# --- real architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measurement on a real architecture: a piece of an iteration, or a whole one."""

    label: str
    piece: str  # unet-vjp, decode-pair, decode, guide, iteration, iteration-joint
    size: int  # image side, px
    steps: int = 1
    checkpoint_decoder: bool = False
    checkpoint_denoiser: bool = False  # the UNet's or transformer's own gradient checkpointing in each VJP
    views_per_chunk: int | None = VIEWS_PER_CHUNK
    guide: bool = False  # whole iterations: the ViT-L-14 text loss on 16 views instead of symmetry


def arch_cases(sizes: list[int], steps: list[int], whole_512: bool) -> list[Case]:
    """The pieces at each size with whole iterations at the smallest size for each step count right after
    them, then the guide's pieces and the 512 px iteration with the guide (the longest, last)."""
    small = min(sizes)
    checkpointed = small // 8 >= LARGE_LATENT_SIDE  # as DoodlSettings' "auto" does
    # Both latents decoded in one graph is what was replaced: measured at the smallest size only (at 512 px
    # it would add some 11 GB to the 4.5 GB of weights on a machine shared with others).
    cases = [Case("decode + backward, both latents in one graph (before)", "decode-pair", small)]
    for size in sorted(sizes):
        cases += [
            Case("one UNet call (cond+uncond) + VJP", "unet-vjp", size),
            Case("decode + backward, one latent", "decode", size),
            Case(
                "decode + backward, one latent, decoder checkpointed", "decode", size, checkpoint_decoder=True
            ),
        ]
        if size == small:
            joint = Case(
                "whole iteration, joint decode (before)", "iteration-joint", small, views_per_chunk=None
            )
            lean = "whole reversible iteration, symmetry loss"
            cases += [joint, *(Case(lean, "iteration", small, n, checkpointed) for n in steps)]
    views = f"{GUIDE_ARCHITECTURE} text loss + backward, 16 views"
    cases += [
        Case(f"{views} at once", "guide", max(sizes), views_per_chunk=None),
        Case(f"{views} in chunks of {VIEWS_PER_CHUNK}", "guide", max(sizes)),
    ]
    if whole_512:
        label = f"whole reversible iteration, {GUIDE_ARCHITECTURE} 16 views"
        cases.append(Case(label, "iteration", 512, 1, checkpoint_decoder=True, guide=True))
    return cases


def xl_cases(sizes: list[int], steps: list[int]) -> list[Case]:
    """SDXL (issue #19): at each size the UNet VJP, a whole reversible iteration at the fewest steps
    (symmetry loss, decoder checkpointed as "auto" does) and the checkpointed decode; then the guide's
    chunked views; then the iterations at more steps, the slowest cases, last (a run cut short keeps
    everything else)."""
    cases, more = [], []
    lean = "whole reversible iteration, symmetry loss"
    for size in sorted(sizes):
        checkpointed = size // 8 >= LARGE_LATENT_SIDE
        fewest, *rest = sorted(steps)
        cases += [
            Case("one UNet call (cond+uncond) + VJP", "unet-vjp", size),
            Case(lean, "iteration", size, fewest, checkpointed),
            Case(
                "decode + backward, one latent, decoder checkpointed", "decode", size, checkpoint_decoder=True
            ),
        ]
        more += [Case(lean, "iteration", size, n, checkpointed) for n in rest]
    views = f"{GUIDE_ARCHITECTURE} text loss + backward, {CUTOUTS} views in chunks of {VIEWS_PER_CHUNK}"
    return [*cases, Case(views, "guide", max(sizes)), *more]


def flow_cases(sizes: list[int], steps: list[int]) -> list[Case]:
    """A flow transformer: at each size one call + VJP and a whole reversible iteration at the fewest steps,
    each without and with the transformer's gradient checkpointing, and the checkpointed decode; then the
    iterations at more steps, the slowest, last."""
    cases, more = [], []
    call, lean = "one transformer call (cond+uncond) + VJP", "whole reversible iteration, symmetry loss"
    fewest, *rest = sorted(steps)
    for size in sorted(sizes):
        decoder = size // 8 >= LARGE_LATENT_SIDE
        for inside in (False, True):
            note = ", transformer checkpointed" if inside else ""
            cases += [
                Case(call + note, "unet-vjp", size, checkpoint_denoiser=inside),
                Case(lean + note, "iteration", size, fewest, decoder, checkpoint_denoiser=inside),
            ]
            more += [
                Case(lean + note, "iteration", size, n, decoder, checkpoint_denoiser=inside) for n in rest
            ]
        cases.append(Case("decode + backward, one latent, decoder checkpointed", "decode", size, 1, True))
    return [*cases, *more]


def arch_folders(arch: str, keep: Path | None) -> tuple[Path, Path]:
    """The random SD pipeline and guide folders, built once (or reused from `keep`)."""
    root = keep or Path(tempfile.mkdtemp(prefix=f"doodl-{arch}-"))
    if keep is None:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    sd, clip = root / arch, root / GUIDE_ARCHITECTURE
    if not (sd / "model_index.json").is_file():
        print(f"building a random {arch} pipeline in {sd}", flush=True)
        save_random_sd(sd, arch)
    if not (clip / "open_clip_config.json").is_file():
        print(f"building a random {GUIDE_ARCHITECTURE} in {clip}", flush=True)
        save_random_clip(clip)
    return sd, clip


def _grad_of(loss: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.enable_grad():
        torch.autograd.grad(loss(), inputs)


def piece(case: Case, model: LatentDiffusion, clip: Clip | None) -> Callable[[], None]:
    """The work a case measures, ready to run: everything it needs is loaded and allocated already."""
    x, y = initial_latents(model, DoodlSettings(height=case.size, width=case.size))
    x, y = x.requires_grad_(True), y.requires_grad_(True)
    eps = model.noise_predictor(model.encode_prompt(PROMPT), GUIDANCE)
    image_loss: Loss = symmetry_loss()
    if clip is not None:
        generator = torch.Generator().manual_seed(0)
        image_loss = clip_text_loss(clip, PROMPT, generator=generator, views_per_chunk=case.views_per_chunk)
    if case.piece == "unet-vjp":
        return lambda: _grad_of(lambda: eps(x, 500).square().sum(), (x,))
    if case.piece == "decode-pair":
        return lambda: _grad_of(lambda: image_loss(model.decode(torch.cat([x, y]))), (x, y))
    if case.piece == "decode":
        return lambda: _grad_of(lambda: image_loss(model.decode(x)), (x,))
    if case.piece == "guide":
        images = torch.rand(1, 3, case.size, case.size, device=model.device, requires_grad=True)
        return lambda: _grad_of(lambda: image_loss(images), (images,))
    schedule = model.schedule(case.steps, 0.93, True, x.shape)
    if case.piece == "iteration-joint":
        loss_of_final = lambda a, b: image_loss(model.decode(torch.cat([a, b])))  # noqa: E731
    else:
        loss_of_final = final_loss(model, image_loss)
    return lambda: latent_grad(eps, x.detach(), y.detach(), schedule, loss_of_final, "reversible")


def measure_case(sd: Path, clip_folder: Path, case: Case, device: str, threads: int) -> tuple[int, int]:
    """(memory just before the case's work, peak during it), in bytes; models loaded as a user would."""
    torch.set_num_threads(threads)
    model = load_pipeline(sd, device)
    uses_guide = case.piece == "guide" or case.guide
    clip = load_clip(str(clip_folder), device=device) if uses_guide else None
    run = piece(case, model, clip)
    free_text_encoders(model)
    gc.collect()
    before = current(device)
    reset_peak(device)
    with decoder_checkpointing(model.vae, case.checkpoint_decoder), denoiser_checkpointed(model, case):
        run()
    return before, peak(device)


def denoiser_checkpointed(model: LatentDiffusion, case: Case) -> AbstractContextManager[None]:
    return gradient_checkpointing(model.denoiser, True) if case.checkpoint_denoiser else nullcontext()


def free_text_encoders(model: LatentDiffusion) -> None:
    """Drop the text encoders' weights once the prompt is encoded: nothing after that calls them, and
    SDXL's two hold 3.3 GB in float32 that would otherwise sit beside the UNet (moved to the meta device);
    SD3's and FLUX's are released by the model itself."""
    model.release_text_encoders()
    if getattr(model, "xl", False):
        for encoder in (model.text_encoder, model.text_encoder_2):
            encoder.to("meta")


def arch_verdicts(cases: list[Case], growth: list[float]) -> list[str]:
    """The targets, checked on the whole iterations measured."""
    said = []
    lean = {c.steps: g for c, g in zip(cases, growth) if c.piece == "iteration" and not c.guide}
    if lean:
        worst, rise = max(lean.values()), lean[max(lean)] / lean[min(lean)] - 1
        ok = worst <= TARGET_256_PIXEL_LOSS and rise <= FLAT
        said.append(
            f"**{'PASS' if ok else 'FAIL'}**: whole reversible iteration with a pixel loss: at most "
            f"{worst:.2f} GB growth over {sorted(lean)} steps (target at 256 px: <= {TARGET_256_PIXEL_LOSS} "
            "GB), "
            f"{100 * rise:+.1f}% from the fewest to the most steps (limit +{100 * FLAT:.0f}%)."
        )
    guided = [g for c, g in zip(cases, growth) if c.guide]
    if guided:
        ok = guided[0] <= TARGET_512_GUIDE
        said.append(
            f"**{'PASS' if ok else 'FAIL'}**: whole reversible iteration at 512 px with {GUIDE_ARCHITECTURE} "
            f"on {CUTOUTS} views: {guided[0]:.2f} GB growth (target <= {TARGET_512_GUIDE} GB; "
            "about 19 GB before)."
        )
    return said


def arch_report(args: argparse.Namespace, out: Path) -> None:
    """Measure every case in a fresh process; the report is rewritten after each, so a run cut short
    still leaves the rows it measured."""
    sd, clip = arch_folders(args.arch, args.models)
    xl, flow = args.arch == "sdxl", args.arch in FLOW_ARCHITECTURES
    if xl:
        cases = xl_cases(args.sizes, args.steps)
    elif flow:
        cases = flow_cases(args.sizes, args.steps)
    else:
        cases = arch_cases(args.sizes, args.steps, not args.no_whole_512)
    rows, growth = [], []
    for case in cases:
        before, top = in_fresh_process(sd, clip, case, args.device, args.threads, function=measure_case)
        growth.append((top - before) / GB)
        rows.append([case.label, case.size, case.steps if case.piece.startswith("iteration") else "-",
                     "on" if case.checkpoint_decoder else "off", f"{before / GB:.2f}", f"{top / GB:.2f}",
                     f"{growth[-1]:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
        done = cases[: len(rows)]
        said = []
        if xl:
            said = xl_verdicts(done, growth) + [xl_extrapolation(done, growth, sd, clip)]
        elif flow:
            said = flow_verdicts(done, growth)
        sections = [arch_notes(args), *(said or arch_verdicts(done, growth)), arch_table(rows)]
        if len(rows) < len(cases):
            sections.insert(1, f"**Partial**: {len(rows)} of {len(cases)} cases measured so far.")
        title = f"Memory of a DOODL iteration, {args.arch} (RSS)"
        write_report(out, f"memory-{args.arch}", title, sections, arch_figure(args.arch, rows, growth))


def flow_verdicts(cases: list[Case], growth: list[float]) -> list[str]:
    """Without the transformer's checkpointing, issue #19's target (a whole iteration within one call + VJP
    + 10%, flat in the steps). With it, the call + VJP shrinks below the checkpointed decode, so a whole
    iteration is held to its largest piece + 10%, and what the checkpointing saves is said."""
    plain_cases = [c for c in cases if not c.checkpoint_denoiser]
    said = xl_verdicts(plain_cases, growth_of(cases, growth, False), "one transformer call + VJP")
    for size in sorted({c.size for c in cases}):
        at = {(c.piece, c.checkpoint_denoiser, c.steps): g for c, g in zip(cases, growth) if c.size == size}
        call, decode = at.get(("unet-vjp", True, 1)), at.get(("decode", False, 1))
        whole = {steps: g for (piece, inside, steps), g in at.items() if piece == "iteration" and inside}
        plain = {steps: g for (piece, inside, steps), g in at.items() if piece == "iteration" and not inside}
        if call is None or decode is None or not whole:
            continue
        largest = max(call, decode)
        worst, limit = max(whole.values()), largest * (1 + XL_ITERATION_OVER_UNET)
        ok = worst <= limit and whole[max(whole)] / whole[min(whole)] - 1 <= FLAT
        saving = f", against {max(plain.values()):.2f} GB without it" if plain else ""
        said.append(
            f"**{'PASS' if ok else 'FAIL'}** at {size} px, the transformer checkpointed: a whole reversible "
            f"iteration grows at most {worst:.2f} GB over {sorted(whole)} steps{saving}; its largest piece "
            f"is now {'the checkpointed decode' if decode >= call else 'the call + VJP'} ({largest:.2f} GB; "
            f"call + VJP {call:.2f} GB; limit +{100 * XL_ITERATION_OVER_UNET:.0f}%: {limit:.2f} GB)."
        )
    return said


def growth_of(cases: list[Case], growth: list[float], checkpointed: bool) -> list[float]:
    """The growths of the cases measured with (or without) the denoiser's gradient checkpointing."""
    return [g for c, g in zip(cases, growth) if c.checkpoint_denoiser == checkpointed]


def arch_notes(args: argparse.Namespace) -> str:
    notes = (
        f"`python -m benchmarks.memory {' '.join(sys.argv[1:])}`: {args.arch} architecture with random "
        f"weights, {GUIDE_ARCHITECTURE} guide, float32 on the CPU, peak "
        "resident memory (RSS) in GB. Each row runs in a fresh process that loads the models through "
        "`load_pipeline` / `load_clip`; before = memory held by the loaded models and inputs; growth = peak "
        "during the work - before. Whole iterations: `latent_grad` (reversible) with `final_loss` (each "
        "latent decoded, scored and back-propagated in turn), except any row marked 'before' (both latents "
        f"decoded in one graph, as DOODL did before). Guide rows: `clip_text_loss` on a {max(args.sizes)} px "
        "image."
    )
    if args.arch == "sdxl":
        notes += (
            " SDXL: the prompt is encoded, then both text encoders' weights are dropped (3.3 GB in float32: "
            "nothing calls them again), so 'before' is the UNet, the VAE, the guide where used, and the "
            "inputs. Float32, not bfloat16: this CPU (AVX2, no AVX512-BF16) runs bfloat16 matmuls and "
            "convolutions some 50x slower than float32 (0.3-0.7 vs 23-35 GFLOPS on one thread), and the "
            "float32 UNet (10.3 GB) with its activations fits in this machine's 23 GB."
        )
    if args.arch in FLOW_ARCHITECTURES:
        notes += (
            f" {args.arch}: the transformer and VAE at their real size (`benchmarks.architectures`); CLIP "
            "text towers of their real widths but one layer, and SD3 without T5 (its pipeline reads zeros of "
            "T5's 256 tokens x 4096: the transformer's work is the same); the prompt is encoded, then the "
            "text encoders are released. 'transformer checkpointed': diffusers' gradient checkpointing "
            "inside each transformer VJP (`DoodlSettings.denoiser_checkpointing`). Each verdict compares "
            "whole iterations with the call + VJP measured the same way."
        )
    return notes


def arch_table(rows: list[list[object]]) -> str:
    return markdown_table(["piece", "px", "steps", "decoder checkpointing", "before", "peak", "growth"], rows)


def arch_figure(arch: str, rows: list[list[object]], growth: list[float]) -> Figure:
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    ax.barh([f"{r[0]}, {r[1]} px" + (f", {r[2]} steps" if r[2] != "-" else "") for r in rows], growth)
    ax.set(xlabel="growth of peak RSS (GB)", title=f"Memory of DOODL's pieces, {arch}, float32 CPU")
    ax.tick_params(axis="y", labelsize=6)
    return figure


def xl_verdicts(cases: list[Case], growth: list[float], call: str = "one UNet call + VJP") -> list[str]:
    """Issue #19's target at each size: a whole reversible iteration grows at most one UNet call + VJP
    + 10%, and no more at 2 steps than at 1 (+5%). `call` names the call + VJP as the cases measured it."""
    said = []
    for size in sorted({c.size for c in cases}):
        unet = [g for c, g in zip(cases, growth) if c.size == size and c.piece == "unet-vjp"]
        whole = {c.steps: g for c, g in zip(cases, growth) if c.size == size and c.piece == "iteration"}
        if not unet or not whole:
            continue
        limit, worst = unet[0] * (1 + XL_ITERATION_OVER_UNET), max(whole.values())
        # A tiny model's growth can read 0 (or below) on the CPU: no ratio of it, and no rise from it.
        fewest, most = whole[min(whole)], whole[max(whole)]
        rise = most / fewest - 1 if fewest > 0 else (0.0 if most <= fewest else math.inf)
        over = f"{100 * (worst / unet[0] - 1):+.1f}%" if unet[0] > 0 else "no ratio: the call grew 0"
        ok = worst <= limit and rise <= FLAT
        said.append(
            f"**{'PASS' if ok else 'FAIL'}** at {size} px: a whole reversible iteration grows at most "
            f"{worst:.2f} GB over {sorted(whole)} steps, against {unet[0]:.2f} GB for {call} "
            f"(limit +{100 * XL_ITERATION_OVER_UNET:.0f}%: {limit:.2f} GB; "
            f"{over}), {100 * rise:+.1f}% from the fewest to the most steps "
            f"(limit +{100 * FLAT:.0f}%)."
        )
    return said


def xl_extrapolation(cases: list[Case], growth: list[float], sd: Path, clip: Path, side: int = 1024) -> str:
    """The whole iteration at `side` px in float16 on a GPU, from the pieces at the largest size measured.

    The pieces run one after the other, so an iteration's peak is the largest piece's times the overhead
    measured on whole iterations. UNet activations grow with the pixels (attention through SDPA keeps no
    tokens x tokens maps) and halve in float16; SDXL's VAE decodes in float32 (force_upcast), so its
    activations only grow with the pixels; the guide sees 224 px views whatever the image size.
    """
    size = max(c.size for c in cases)
    at = {c.piece: g for c, g in zip(cases, growth) if c.size == size and c.piece != "iteration"}
    whole = [g for c, g in zip(cases, growth) if c.size == size and c.piece == "iteration"]
    if "unet-vjp" not in at:
        return f"No extrapolation to {side} px yet: the UNet VJP at {size} px is not measured."
    scale = (side / size) ** 2
    pieces = {"UNet VJP": at["unet-vjp"] * scale / 2}
    if "decode" in at:
        pieces["decode (float32)"] = at["decode"] * scale
    if "guide" in at:
        pieces["guide"] = at["guide"] / 2
    largest = max(at[k] for k in ("unet-vjp", "decode") if k in at)
    overhead = max(whole) / largest if whole else 1.0
    grows = max(pieces.values()) * overhead
    # Weights as the GPU holds them: stored in float16 here; the VAE upcast to float32; the guide, stored
    # in float32, run in float16.
    weights = stored_gb(sd, ("unet", "text_encoder", "text_encoder_2")) + 2 * stored_gb(sd, ("vae",))
    weights += stored_gb(clip, (".",)) / 2
    listed = ", ".join(f"{k} {v:.2f} GB" for k, v in pieces.items())
    return (
        f"**Extrapolation to {side} px, float16, on a GPU** (not measured): the pieces at {side} px would "
        f"grow {listed} (UNet: x{scale:.0f} pixels, /2 for float16; decode: x{scale:.0f}, the VAE stays "
        f"float32; guide: /2, its views are 224 px at any image size). A whole iteration grew "
        f"{overhead:.2f}x its largest piece at {size} px{'' if whole else ' (not measured yet: 1x assumed)'}"
        f", so about {grows:.1f} GB above weights of {weights:.1f} GB (UNet and both text encoders in "
        f"float16, VAE in float32, {GUIDE_ARCHITECTURE} in float16): **about {weights + grows:.0f} GB** in "
        f"all, beside the ~{DNO_SDXL_GB} GB reported for DNO. Not counted: CUDA's context and the caching "
        "allocator's reserve (torch.cuda.max_memory_allocated leaves both out too)."
    )


def stored_gb(folder: Path, parts: tuple[str, ...]) -> float:
    """Size of the weights files under `folder`'s `parts` (GB, as stored)."""
    files = [f for part in parts for f in (folder / part).glob("*.safetensors")]
    return sum(f.stat().st_size for f in files) / GB


# --- seconds and memory of whole iterations (a GPU) ------------------------------------------------


def time_iteration(
    sd: Path,
    clip_folder: Path,
    mode: str,
    size: int,
    steps: int,
    device: str,
    dtype: torch.dtype,
    threads: int,
) -> dict[str, float | bool]:
    """Seconds of one sample and of one DOODL iteration in `mode`, and the iteration's peak memory above the
    loaded models (bytes): ViT-L-14 text loss on 16 views of each latent, float64 coupling. The model's
    preset otherwise (SD: the paper's; FLUX: its guidance and p), and its chain (EDICT; the plain chain
    below doodl.edict.FEW_STEPS steps, as for FLUX.1-schnell's 4)."""
    torch.set_num_threads(threads)
    model = load_pipeline(sd, device, dtype)
    clip = load_clip(str(clip_folder), device=device, dtype=dtype)
    preset = presets(sd)["text"].settings  # float64 coupling: the default
    settings = replace(preset, steps=steps, height=size, width=size, mode=mode)
    chain = chain_of(settings, model)
    eps = conditioning(model, PROMPT, settings)
    model.release_text_encoders()  # SD3's and FLUX's T5: nothing calls them again
    x, y = initial_latents(model, settings)
    loss = final_loss(model, clip_text_loss(clip, PROMPT, generator=torch.Generator().manual_seed(0)))
    weights = current(device)

    def sample() -> None:
        with torch.no_grad():
            model.decode(chain.denoise(eps, x, y, schedule_of(settings, model))[0])

    def iteration(schedule_steps: int) -> None:
        schedule = model.schedule(schedule_steps, settings.p, settings.leapfrog, x.shape).on(model.device)
        with checkpointing(model, settings):
            latent_grad(eps, x, y, schedule, loss, chain.mode, chain.step)

    sample()  # warm-up: kernels chosen, caches filled
    iteration(1)  # and the backward's
    result: dict[str, float | bool] = {"sample_s": device_seconds(sample, device), "weights": weights}
    gc.collect()
    reset_peak(device)
    result["before"] = current(device)
    try:
        result["iteration_s"] = device_seconds(lambda: iteration(steps), device)
    except torch.OutOfMemoryError:
        result["oom"] = True
    result["peak"] = peak(device)
    return result


def timing_rows(
    sd: Path,
    clip: Path,
    size: int,
    steps: int,
    device: str,
    dtype: torch.dtype,
    threads: int,
    modes: tuple[str, ...] = MODES,
) -> list[list[object]]:
    """One row per gradient mode, each measured in a fresh process: an out-of-memory is a result."""
    rows = []
    for mode in modes:
        r = in_fresh_process(sd, clip, mode, size, steps, device, dtype, threads, function=time_iteration)
        rows.append(timing_row(mode, r))
        print(rows[-1], flush=True)
    return rows


def timing_row(mode: str, r: dict[str, float | bool]) -> list[object]:
    """mode, sample s, iteration s, iteration / sample, growth, peak above the weights, weights."""
    growth, above = (r["peak"] - r["before"]) / GB, (r["peak"] - r["weights"]) / GB
    if r.get("oom"):
        timed = ["out of memory", "-", f"> {growth:.2f}", f"> {above:.2f}"]
    else:
        ratio = r["iteration_s"] / r["sample_s"]
        timed = [f"{r['iteration_s']:.2f}", f"{ratio:.2f}", f"{growth:.2f}", f"{above:.2f}"]
    return [mode, f"{r['sample_s']:.2f}", *timed, f"{r['weights'] / GB:.2f}"]


def timing_folders(args: argparse.Namespace) -> tuple[Path, Path, int]:
    """The pipeline and guide folders to time, and the image side (--size, else the model's own)."""
    if args.arch == "tiny":
        sd, clip, size = tiny_folder(args.tiny_size), tiny_clip_folder(), args.tiny_size * 8
    elif args.arch in TINY_BUILDERS:
        sd, clip, size = tiny_arch_folder(args.arch, args.tiny_size), tiny_clip_folder(), args.tiny_size * 8
    else:
        sd, clip = arch_folders(args.arch, args.models)
        size = 512 if args.arch in SD_ARCHITECTURES else 1024  # SD 1.5's as measured before; the others' own
    return sd, clip, args.size or size


def timing_report(args: argparse.Namespace, out: Path) -> None:
    sd, clip, size = timing_folders(args)
    dtype = torch.float32
    if args.device == "cuda":  # FLUX.1 overflows in float16: bfloat16, as its makers run it
        dtype = torch.bfloat16 if "flux" in args.arch else torch.float16
    steps = args.steps[-1]
    rows = timing_rows(sd, clip, size, steps, args.device, dtype, args.threads, tuple(args.modes))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    guide = "a tiny open_clip" if args.arch.startswith("tiny") else GUIDE_ARCHITECTURE
    upcast = " (SDXL's VAE in float32: its force_upcast)" if args.arch.endswith("sdxl") else ""
    unit = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS"
    notes = (
        f"{args.arch} architecture with random weights on {card}: {size} px, {steps} steps (EDICT's chain; "
        "the plain one below 10 steps), the "
        f"denoiser (UNet or transformer) and VAE in {str(dtype).removeprefix('torch.')}{upcast}, coupling "
        f"in float64, {guide} text loss on "
        f"{CUTOUTS} views of each latent of the pair (`final_loss`, decoder checkpointing as "
        "`DoodlSettings`' 'auto'). "
        "sample = one EDICT sample and its decode; iteration = one `latent_grad`; growth = peak "
        f"({unit}) during the iteration minus the memory held before it; above weights = that peak minus "
        "the weights; weights = memory held by the loaded models and inputs. For comparison, the official "
        f"code: about {OFFICIAL_SECONDS:.0f} s per iteration and {OFFICIAL_GB} GB on an A100 at 512 px, 50 "
        "steps, fp16 (as reported by its users)."
    )
    headers = ["mode", "sample (s)", "iteration (s)", "iteration / sample", "growth (GB)"]
    table = markdown_table([*headers, "above weights (GB)", "weights (GB)"], rows)
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    timed = [r for r in rows if r[2] != "out of memory"]
    ax.bar([r[0] for r in timed], [float(r[2]) for r in timed])
    ax.set(ylabel="seconds per iteration", title=f"DOODL iteration, {args.arch}, {size} px, {card}")
    write_report(
        out,
        f"speed-{args.arch}-{size}-{args.device}",
        f"Seconds and memory of a DOODL iteration ({card})",
        [notes, table],
        figure,
    )


# Tiny random pipelines of an architecture, for dry runs of the GPU path on the CPU.
TINY_BUILDERS = {
    "tiny-sdxl": tiny.save_tiny_sdxl_pipeline,
    "tiny-sd3": tiny.save_tiny_sd3_pipeline,
    "tiny-flux": tiny.save_tiny_flux_pipeline,
}


def tiny_arch_folder(arch: str, sample_size: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"doodl-{arch}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return TINY_BUILDERS[arch](folder, sample_size=sample_size)


def tiny_clip_folder() -> Path:
    from doodl.tiny import save_tiny_clip

    folder = Path(tempfile.mkdtemp(prefix="doodl-tinyclip-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_tiny_clip(folder)


# --- the tiny model across steps and modes ---------------------------------------------------------


def flat_verdict(growth: dict[int, float]) -> str:
    least, most = growth[min(growth)], growth[max(growth)]
    rise = most / least - 1
    verdict = "PASS" if rise <= FLAT else "FAIL"
    return (
        f"**{verdict}**: reversible growth {least:.1f} MB at {min(growth)} steps, {most:.1f} MB at "
        f"{max(growth)} steps ({100 * rise:+.1f}%, limit +{100 * FLAT:.0f}%)."
    )


def plot(growth: dict[str, dict[int, float]], unit: str) -> Figure:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    for mode, marker in zip(MODES, "os^"):
        steps = sorted(growth[mode])
        ax.plot(steps, [growth[mode][s] for s in steps], marker=marker, label=mode)
    ax.set(xlabel="EDICT steps", ylabel=f"gradient's peak growth ({unit}, MB)", title="Memory of a gradient")
    ax.set_yscale("log")
    ax.legend()
    return figure


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", help="EDICT steps (default 10 25 50; --arch: 1 2 4)")
    # 16: at 32, attention maps grow 16x and autograd at 50 steps would need several times its ~1 GB here.
    p.add_argument("--tiny-size", type=int, default=16, help="latent side of the tiny model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    p.add_argument(
        "--arch", default="tiny", choices=["tiny", *ARCHITECTURES, *TINY_BUILDERS], help="model architecture"
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", help="--arch: image sides of the pieces (default 256 512; sdxl: 512)"
    )
    p.add_argument("--size", type=int, help="timing: image side (default: the model's, 1024 for sdxl)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="timing: gradient modes")
    p.add_argument("--no-whole-512", action="store_true", help="--arch: skip the 512 px whole iteration")
    p.add_argument("--models", type=Path, help="--arch: build the random models here and reuse them")
    p.add_argument("--timing", action="store_true", help="seconds per iteration (default with --device cuda)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.tiny_size = [2, 6], 8
    timing = args.timing or (args.device == "cuda" and args.arch != "tiny") or args.arch in TINY_BUILDERS
    args.sizes = args.sizes or ([512] if args.arch == "sdxl" else [256, 512])
    args.steps = args.steps or ([50] if timing else [1, 2, 4] if args.arch != "tiny" else [10, 25, 50])
    out = start(args)
    if not args.glibc_default:
        # glibc raises its mmap threshold as large blocks are freed, after which it keeps freed tensors in
        # the heap: RSS then drifts up over the first steps whatever the live memory. A fixed threshold
        # hands freed blocks back at once, so RSS follows the tensors alive.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    if timing:
        return timing_report(args, out)
    if args.arch != "tiny":
        return arch_report(args, out)
    unit = "CUDA allocated" if args.device == "cuda" else "RSS"

    folder = tiny_folder(args.tiny_size)
    growth: dict[str, dict[int, float]] = {mode: {} for mode in MODES}
    rows = []
    for steps in args.steps:
        for mode in MODES:
            before, top = in_fresh_process(folder, mode, steps, args.device, args.threads)
            growth[mode][steps] = (top - before) / MB
            rows.append([mode, steps, f"{before / MB:.1f}", f"{top / MB:.1f}", f"{growth[mode][steps]:.1f}"])
            print(rows[-1], flush=True)

    allocator = (
        "glibc's default allocator settings."
        if args.glibc_default
        else "glibc's mmap threshold fixed at 64 KiB so that RSS follows live tensors (--glibc-default: not)."
    )
    notes = (
        f"Tiny SD-architecture model, {args.tiny_size}x{args.tiny_size} latents, {args.device}, {unit} in "
        "MB. Each row is one gradient (`latent_grad`, each latent decoded and scored for symmetry in turn) "
        "in a fresh process. before = memory held by the loaded model; peak = the most during the gradient; "
        "growth = peak - before. Autograd stores every UNet activation of every step; checkpoint stores each "
        f"step's latent pair (kilobytes); reversible stores nothing per step. {allocator}"
    )
    table = markdown_table(["mode", "steps", "before", "peak", "growth"], rows)
    sections = [notes, flat_verdict(growth["reversible"]), table]
    write_report(out, "memory", f"Memory of a DOODL gradient ({unit})", sections, plot(growth, unit))


if __name__ == "__main__":
    main()
