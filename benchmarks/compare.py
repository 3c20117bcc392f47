"""A lever's effect, paired prompt by prompt: one method's evaluator scores in two quality-raw folders.

    python -m benchmarks.compare benchmarks/results/quality-raw \
        benchmarks/results/quality-normalized/quality-raw

`benchmarks.quality` seeds its prompts and latents by index, so prompt i of a run with a lever (`--clip`,
`--guidance-scale`, `--normalized`, ... with its own `--out`) is prompt i of the presets' run: the
difference on the prompts both hold is paired. Prints, per capability, both means and the paired difference
(mean ± standard error, prompts better and worse).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table


def scores(folder: Path, capability: str, method: str) -> list[float]:
    path = folder / f"{capability}.json"
    if not path.is_file():
        return []
    prompts = json.loads(path.read_text())["prompts"]
    return [p[method]["score"] for p in prompts if method in p]


def row(capability: str, base: list[float], lever: list[float]) -> list[object]:
    n = min(len(base), len(lever))
    a, b = np.array(base[:n]), np.array(lever[:n])
    d = b - a
    se = d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return [
        capability,
        n,
        f"{a.mean():.3f}",
        f"{b.mean():.3f}",
        f"{d.mean():+.3f} ± {se:.3f}",
        (d > 0).sum(),
        (d < 0).sum(),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="quality-raw folder of the reference run (the presets')")
    p.add_argument("lever", type=Path, help="quality-raw folder of the run with the lever")
    p.add_argument("--method", default="DOODL")
    args = p.parse_args()
    rows = []
    for capability in ("text", "vocabulary", "personalization", "aesthetic"):
        base, lever = scores(args.base, capability, args.method), scores(args.lever, capability, args.method)
        if base and lever:
            rows.append(row(capability, base, lever))
    headers = ["capability", "prompts", "reference", "lever", "lever - reference (paired)", "better", "worse"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
