"""How far the coupled (EDICT) chain of a flow model lands from its plain Euler chain, by mixing weight p.

EDICT's second half-step calls the model at timestep t on a latent already moved towards t-1, and the
mixing layer pulls the pair together: the coupled sample is not exactly the model's own. p = 0.93 was tuned
for DDIM on SD 1.4; this measures what a flow wants, on the schedules of SD3, FLUX.1-dev (its shift for a
1024 px image) and FLUX.1-schnell, with two velocity fields:

- the exact velocity of a Gaussian mixture (a flow trained to perfection on data with several modes, in
  the dimension of a 1024 px latent): v(z, s) = (z - E[x0 | z]) / s, E from the mixture's posterior;
- the tiny random SD3 and FLUX transformers of `doodl.tiny` at their own 64 px.

Each row: the relative L2 distance of the coupled x_0 to the plain Euler x_0 from the same noise, and, for
the mixture, Euler's own distance to the exact flow (a 2000-step Euler chain): the coupling's deviation
means little where it is well under the discretization error every sampler makes.

    python -m benchmarks.flow_mixing [--quick]
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure

from benchmarks.common import PROMPT, markdown_table, parser, start, write_report
from doodl import LatentDiffusion, load_pipeline
from doodl.edict import NoisePredictor, ddim_denoise, edict_denoise, edict_invert
from doodl.tiny import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

MIXES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0)
STEPS = (4, 8, 28, 50)
REAL_LATENT = (1, 16, 128, 128)  # a 1024 px image: FLUX.1-dev's shift is that of 4096 tokens
MIXTURE_LATENT = (1, 16, 32, 32)  # the mixture's dimension: its field's shape does not depend on it


def mixture_velocity(shape: tuple[int, ...], components: int, spread: float, seed: int) -> NoisePredictor:
    """The exact velocity field of a rectified flow to a Gaussian mixture: equal weights, means drawn with
    std `spread` per element, each component isotropic with the rest of a unit variance per element."""
    generator = torch.Generator().manual_seed(seed)
    dim = math.prod(shape)
    means = spread * torch.randn(components, dim, generator=generator, dtype=torch.float64)
    var = 1 - spread**2  # of each component, per element

    def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
        s = t / 1000
        flat = z.reshape(-1, dim)
        # z | component k ~ N((1 - s) m_k, ((1 - s)^2 var + s^2) I): responsibilities, then E[x0 | z, k].
        total = (1 - s) ** 2 * var + s**2
        distances = torch.cdist(flat, (1 - s) * means).square()
        weights = torch.softmax(-distances / (2 * total), dim=-1)
        posterior = means + ((1 - s) * var / total) * (flat[:, None, :] - (1 - s) * means)
        x0 = (weights[..., None] * posterior).sum(1)
        return ((flat - x0) / s).reshape(z.shape)

    return velocity


def deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(
    velocity: NoisePredictor,
    model: LatentDiffusion,
    shape: tuple[int, ...],
    steps: int,
    seeds: int,
    schedule_shape: tuple[int, ...],
    exact: dict[int, torch.Tensor] | None,
) -> tuple[dict[float, float], float | None, dict[float, float]]:
    """Means over seeds of the coupled chain's deviation from Euler, by p; of Euler's from the exact flow
    (`exact`: each seed's x_0 by a 2000-step chain); the largest round-trip error, by p. The steps are
    spaced and shifted for latents of `schedule_shape`."""
    by_p = {p: [] for p in MIXES}
    trips = {p: 0.0 for p in MIXES}
    euler_error = []
    for seed in range(seeds):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            plain = model.schedule(steps, 1.0, False, schedule_shape)
            euler, _ = ddim_denoise(velocity, noise, noise, plain)
            for p in MIXES:
                schedule = model.schedule(steps, p, True, schedule_shape)
                pair = edict_denoise(velocity, noise, noise, schedule)
                by_p[p].append(deviation(pair[0], euler))
                back, _ = edict_invert(velocity, *pair, schedule)
                trips[p] = max(trips[p], float((back - noise).abs().max()))
            if exact is not None:
                if seed not in exact:
                    fine = model.schedule(2000, 1.0, False, schedule_shape)
                    exact[seed], _ = ddim_denoise(velocity, noise, noise, fine)
                euler_error.append(deviation(euler, exact[seed]))
    euler = statistics.mean(euler_error) if euler_error else None
    return {p: statistics.mean(v) for p, v in by_p.items()}, euler, trips


def tiny_models(folder: Path) -> dict[str, LatentDiffusion]:
    folders = {
        "SD3 (shift 3)": save_tiny_sd3_pipeline(folder / "sd3"),
        "FLUX.1-dev (shift for 1024 px)": save_tiny_flux_pipeline(folder / "dev"),
        "FLUX.1-schnell (no shift)": save_tiny_flux_pipeline(folder / "schnell", guidance_embeds=False),
    }
    return {name: load_pipeline(path, dtype=torch.float64) for name, path in folders.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=4, help="noises averaged per row")
    p.add_argument("--components", type=int, default=10, help="of the Gaussian mixture")
    p.add_argument("--spread", type=float, default=0.9, help="std of the mixture's means per element")
    args = p.parse_args()
    out = start(args)
    steps = (4, 8) if args.quick else STEPS
    seeds = 1 if args.quick else args.seeds
    mixture_shape = (1, 16, 8, 8) if args.quick else MIXTURE_LATENT
    rows, trip_rows, curves = [], [], {}
    with tempfile.TemporaryDirectory() as folder:
        models = tiny_models(Path(folder))
        for name, model in models.items():
            fields = {  # (velocity, latent shape, shape the steps are shifted for, exact x_0 by seed or None)
                "mixture": (
                    mixture_velocity(mixture_shape[1:], args.components, args.spread, seed=0),
                    mixture_shape,
                    REAL_LATENT,
                    {},
                ),
                "tiny transformer": (
                    model.noise_predictor(model.encode_prompt(PROMPT), 3.5),
                    model.latent_shape(),
                    model.latent_shape(),
                    None,
                ),
            }
            for field_name, (velocity, shape, schedule_shape, exact) in fields.items():
                for n in steps:
                    by_p, euler, trips = compare(velocity, model, shape, n, seeds, schedule_shape, exact)
                    best = min(by_p, key=by_p.get)
                    curves[(name, field_name, n)] = by_p
                    euler_text = "-" if euler is None else f"{euler:.4f}"
                    rows.append([name, field_name, n, *(f"{by_p[p]:.4f}" for p in MIXES), best, euler_text])
                    trip_rows.append([name, field_name, n, *(f"{trips[p]:.0e}" for p in MIXES)])
                    print(rows[-1], trip_rows[-1], flush=True)
    mixes = [f"p {p}" for p in MIXES]
    headers = ["schedule", "velocity", "steps", *mixes, "lowest at", "Euler vs exact"]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for (name, field_name, n), by_p in curves.items():
        if field_name == "mixture" and n == max(steps):
            axes.plot(MIXES, [by_p[p] for p in MIXES], marker="o", label=name)
    axes.set(xlabel="mixing weight p", ylabel="coupled vs Euler (relative L2)", yscale="log")
    axes.set_title(f"Gaussian mixture, {max(steps)} steps")
    axes.legend()
    setup = (
        f"Mixture: {args.components} components, means' spread {args.spread}, latent {list(mixture_shape)}, "
        f"steps shifted for {list(REAL_LATENT)}; "
        f"{seeds} noises a row; the coupling in float64. `python -m benchmarks.flow_mixing`."
    )
    title = "Coupled vs plain Euler on flow models, by mixing weight"
    trips = (
        "Round trip, by p: the largest |x_T - invert(denoise(x_T))| over the noises (float64). Unmixing "
        "divides by p at every step, so float64's round-off grows as p^-2n over n steps:\n\n"
        + markdown_table(["schedule", "velocity", "steps", *mixes], trip_rows)
    )
    sections = [setup, trips, "Coupled vs plain Euler, relative L2 of x_0:", markdown_table(headers, rows)]
    write_report(out, "flow_mixing", title, sections, figure)


if __name__ == "__main__":
    main()
