"""Peak memory of one DOODL gradient vs the number of EDICT steps, for each gradient mode.

    python -m benchmarks.memory                  # CPU: peak resident memory (Linux)
    python -m benchmarks.memory --device cuda    # GPU: torch.cuda.max_memory_allocated
    python -m benchmarks.memory --quick

Every measurement runs in a fresh process, so no allocation of an earlier one can hide or inflate it.
"growth" is the peak during `latent_grad` minus the memory held just before it: the gradient's own
footprint. The reversible mode must stay flat: at most 5% more growth at the most steps than at the least.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from matplotlib.figure import Figure

from benchmarks.common import markdown_table, parser, problem, start, tiny_folder, write_report
from doodl import MODES, edict_schedule, latent_grad

FLAT = 0.05  # the most the reversible mode's growth may rise from the fewest to the most steps
MB = 2**20


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
    schedule = edict_schedule(pb.model.scheduler, steps)
    gc.collect()
    before = current(device)
    reset_peak(device)
    latent_grad(pb.eps, *pb.latents, schedule, pb.loss, mode)
    return before, peak(device)


def in_fresh_process(*args: object) -> tuple[int, int]:
    """`measure(*args)` in a new process, forked from a server that has imported the libraries only
    (so each measurement does not pay for importing torch again)."""
    context = multiprocessing.get_context("forkserver")  # the server starts with os.environ as it is now
    context.set_forkserver_preload(["benchmarks.common"])
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure, *args).result()


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
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    # 16: at 32, attention maps grow 16x and autograd at 50 steps would need several times its ~1 GB here.
    p.add_argument("--tiny-size", type=int, default=16, help="latent side of the tiny model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = p.parse_args()
    if args.quick:
        args.steps, args.tiny_size = [2, 6], 8
    out = start(args)
    if not args.glibc_default:
        # glibc raises its mmap threshold as large blocks are freed, after which it keeps freed tensors in
        # the heap: RSS then drifts up over the first steps whatever the live memory. A fixed threshold
        # hands freed blocks back at once, so RSS follows the tensors alive.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
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
        "MB. Each row is one gradient (`latent_grad`, decode of both latents, symmetry loss) in a fresh "
        "process. before = memory held by the loaded model; peak = the most during the gradient; growth = "
        "peak - before. Autograd stores every UNet activation of every step; checkpoint stores each step's "
        f"latent pair (kilobytes); reversible stores nothing per step. {allocator}"
    )
    table = markdown_table(["mode", "steps", "before", "peak", "growth"], rows)
    sections = [notes, flat_verdict(growth["reversible"]), table]
    write_report(out, "memory", f"Memory of a DOODL gradient ({unit})", sections, plot(growth, unit))


if __name__ == "__main__":
    main()
