"""Batch evidence: unguided, one-step guidance, DOODL and random search at matched compute (the methods of
`doodl.experiment`), on held-out two-object captions of the embedded world, judged by the world's rule-based
judge (which reads the scene from the pixels and knows nothing of the guide).

    python -m benchmarks.batch                   # 12 captions, 2 processes through accelerate
    python -m benchmarks.batch --n 4 --quick     # a smoke run (2 steps, 1 iteration)
    python -m benchmarks.batch --n 12 --processes 1 --iterations 30 --out benchmarks/results/batch-30

It runs `python -m doodl batch` (sharded by `accelerate launch` when --processes > 1) at the text tab's
preset, then `--summarize --score world-judge`, and writes benchmarks/results/batch.md and .png.
The captions come from their own seed, which no setting was ever tuned on. Raw results: out/batch-world.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import machine, parser, start
from doodl.embedded import ROOT as EMBEDDED_ROOT
from doodl.embedded import presets
from doodl.summary import summarize
from doodl.world import shapes

ROOT = Path(__file__).resolve().parent.parent
CAPTION_SEED = 2026  # held out: quality.py draws its tasks from other seeds


def captions(n: int, seed: int = CAPTION_SEED) -> list[str]:
    """Two-object captions, the compositional kind text models get wrong."""
    rng = np.random.default_rng(seed)
    return [shapes.caption(shapes.random_scene(rng, 2)) for _ in range(n)]


def preset(iterations: int | None = None, generator: str = "sd") -> str:
    text = presets(EMBEDDED_ROOT / generator)["text"]
    s = text.settings
    plain = "Euler" if generator == "flow" else "DDIM"  # the model's own chain
    chain = plain if s.sampler == "ddim" else "EDICT"
    return (
        f"{s.steps} {chain} steps, {iterations or s.iterations} iterations, clip {s.grad_clip:g}, "
        f"CFG {s.guidance_scale:g}, {text.cutouts} views; one-step scale {text.one_step_scale:g}"
    )


def batch_command(
    prompts: Path,
    out: Path,
    processes: int,
    quick: bool,
    iterations: int | None = None,
    generator: str = "sd",
) -> list[str]:
    run = ["-m", "doodl.batch", str(prompts), "--out", str(out), "--loss", "clip-text"]
    run += ["--model", str(EMBEDDED_ROOT / generator)]
    run += ["--steps", "2", "--iterations", "1", "--cutouts", "2"] if quick else []
    run += ["--iterations", str(iterations)] if iterations and not quick else []
    if processes == 1:
        return [sys.executable, *run]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = ["launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    return [accelerate, *launch, "--mixed_precision", "no", "--dynamo_backend", "no", *run]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=12, help="captions")
    p.add_argument("--processes", type=int, default=2, help="processes, one thread each")
    p.add_argument("--iterations", type=int, help="DOODL iterations (default: the text preset's)")
    p.add_argument("--generator", choices=("sd", "flow"), default="sd", help="the embedded UNet or flow")
    args = p.parse_args()
    results = start(args)
    flow = "" if args.generator == "sd" else f"-{args.generator}"
    world = "batch-world" + (f"-{args.iterations}" if args.iterations else "") + flow
    raw = results / "batch-raw" if args.quick else ROOT / "out" / world
    raw.mkdir(parents=True, exist_ok=True)
    prompts = raw / "prompts.txt"
    prompts.write_text("\n".join(captions(args.n)) + "\n")
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    command = batch_command(prompts, raw, args.processes, args.quick, args.iterations, args.generator)
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env=environment, cwd=ROOT)
    table, _, note = summarize(raw, ["world-judge"]).read_text().strip().partition("\n\n")
    processes = f"{args.processes} process" + ("es" if args.processes > 1 else "")
    text = "\n\n".join(
        [
            "# Batch: unguided, one-step, DOODL and random search at matched compute (embedded world"
            + (", flow generator)" if flow else ")"),
            machine() + f" {processes}, {args.threads} thread each.",
            f"`python -m benchmarks.batch --n {args.n} --processes {args.processes}"
            + (f" --generator {args.generator}" if flow else "")
            + (f" --iterations {args.iterations}" if args.iterations else "")
            + (" --quick" if args.quick else "")
            + "`: "
            f"{args.n} held-out two-object captions (seed {CAPTION_SEED}), seed 0, "
            + (
                "2 steps, 1 iteration, 2 views (smoke run). "
                if args.quick
                else f"the text tab's preset ({preset(args.iterations, args.generator)}). "
            )
            + "doodl starts from the pair's own noise (the paper's), best-of-k+doodl from the best of 4 "
            "samples (the app's); best-of-k draws as many unguided samples as doodl's UNet calls pay for and "
            "keeps the one CLIP prefers; a backward pass through a call counts as one more call. "
            "loss: the guide's (CLIP's spherical distance to the caption, on the pair's own views); "
            "world-judge: the fraction of the caption's colors, shapes and relation the pixels show, "
            "read by the world's rule-based judge (held out: it never guided anything).",
            note,
            table,
        ]
    )
    (results / f"batch{flow}.md").write_text(text + "\n")
    (results / f"batch{flow}.png").write_bytes((raw / "summary.png").read_bytes())
    print(text)


if __name__ == "__main__":
    main()
