"""Measure the embedded generator with the rule-based judge.

    python -m doodl.world.evaluate                       # 100 one-object + 100 two-object captions
    python -m doodl.world.evaluate --n 20 --save out/eval.png
    python -m doodl.world.evaluate --model assets/embedded/flow --chain plain --steps 20 --guidance 4

Plain sampling (the pipeline's own: DDIM for the UNet, 50 steps, classifier-free guidance), fresh captions
from a seed the training data never used, and the judge's verdict per attribute. `--chain plain` or
`--chain coupled` samples as DOODL does (`doodl.optimize.sample`: the model's plain chain, or EDICT's coupled
one at the model's mixing weight), for any generator `doodl.load_pipeline` loads, the flow one included.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from doodl.world import judge, shapes

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "embedded" / "sd"


@dataclass
class EvalSettings:
    model: str = str(DEFAULT_MODEL)
    n: int = 100  # captions per kind (one object, two objects)
    seed: int = 1234  # training used seed 0: these captions and noises are fresh
    steps: int = 50
    guidance: float = 7.5
    batch: int = 25  # captions per pipeline call; timing is measured separately at batch 1
    threads: int = 2
    save: str = ""  # optional path of a grid of the first samples
    references: bool = False  # only print the judge's shape references measured on VAE reconstructions
    chain: str = "pipeline"  # the diffusers pipeline's own sampler, or DOODL's "plain" or "coupled" chain


def load_pipeline(path: str):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        path,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def doodl_samples(model, captions: list[str], seeds: list[int], s: EvalSettings) -> np.ndarray:
    """uint8 samples as DOODL's iteration 0 draws them, from the noise of each seed."""
    from doodl.optimize import DoodlSettings, sample
    from doodl.pipeline import published_settings

    mixing = {key: value for key, value in published_settings(s.model).items() if key == "p"}
    base = DoodlSettings(
        steps=s.steps, guidance_scale=s.guidance, sampler="ddim" if s.chain == "plain" else "edict", **mixing
    )
    return np.stack(
        [
            np.asarray(sample(model, text, dataclasses.replace(base, seed=seed)))
            for text, seed in zip(captions, seeds)
        ]
    )


def generate(pipeline, captions: list[str], seeds: list[int], s: EvalSettings) -> np.ndarray:
    """uint8 N x H x W x 3 samples, one fixed noise seed per caption."""
    if s.chain != "pipeline":
        return doodl_samples(pipeline, captions, seeds, s)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        images = pipeline(
            captions,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            generator=generators,
            output_type="np",
        ).images
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def seconds_per_sample(pipeline, s: EvalSettings, repeats: int = 3) -> float:
    generate(pipeline, ["a red circle"], [0], s)  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        generate(pipeline, ["a red circle"], [i], s)
    return (time.perf_counter() - start) / repeats


def evaluate_kind(
    pipeline, n_objects: int, s: EvalSettings
) -> tuple[list[str], np.ndarray, list[judge.Verdict]]:
    rng = np.random.default_rng(s.seed + n_objects)
    captions = [shapes.caption(shapes.random_scene(rng, n_objects)) for _ in range(s.n)]
    seeds = [s.seed * 1000 + 100 * n_objects + i for i in range(s.n)]
    images = np.concatenate(
        [
            generate(pipeline, captions[i : i + s.batch], seeds[i : i + s.batch], s)
            for i in range(0, s.n, s.batch)
        ]
    )
    return captions, images, [judge.judge(image, text) for image, text in zip(images, captions, strict=True)]


def percent(flags: list[bool]) -> str:
    return f"{100 * np.mean(flags):5.1f}%"


def save_grid(images: np.ndarray, captions: list[str], path: str, columns: int = 10) -> None:
    columns = min(columns, len(images))
    rows = len(images) // columns
    grid = images[: rows * columns].reshape(rows, columns, *images.shape[1:]).swapaxes(1, 2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.reshape(rows * images.shape[1], columns * images.shape[2], 3)).save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(captions[: rows * columns]) + "\n")


def reconstructions(vae, images: np.ndarray) -> np.ndarray:
    """uint8 images passed through the VAE: what a generator that drew the scene perfectly would show."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def shape_references(pipeline, count: int = 400, seed: int = 321) -> dict[tuple[str, int], np.ndarray]:
    """Mean shape features per (shape, objects in scene) on VAE reconstructions of renders: how the
    judge's reference points for generated images were measured."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(rng, 1 + i % 2) for i in range(count)]
    images = reconstructions(pipeline.vae, shapes.render_dataset(scenes))
    features: dict[tuple[str, int], list] = {}
    for scene, image in zip(scenes, images, strict=True):
        blobs = judge.find_blobs(image)
        for obj in scene.objects:
            same = [b for b in blobs if b.color == obj.color]
            if same:
                features.setdefault((obj.shape, len(scene.objects)), []).append(same[0].features)
    return {key: np.mean(value, 0) for key, value in sorted(features.items())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in vars(EvalSettings()).items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=type(default), default=default)
    s = EvalSettings(**vars(parser.parse_args()))
    torch.set_num_threads(s.threads)
    if s.chain not in ("pipeline", "plain", "coupled"):
        raise SystemExit(f"--chain {s.chain!r}: pipeline, plain or coupled")
    if s.chain == "pipeline":
        pipeline = load_pipeline(s.model)
    else:
        from doodl.pipeline import load_pipeline as load_generator

        pipeline = load_generator(s.model, "cpu")
    if s.references:
        for key, value in shape_references(pipeline).items():
            print(key, np.round(value, 3))
        return
    timing = seconds_per_sample(pipeline, s)
    captions1, images1, verdicts1 = evaluate_kind(pipeline, 1, s)
    captions2, images2, verdicts2 = evaluate_kind(pipeline, 2, s)
    chain = {"pipeline": "the pipeline's", "plain": "DOODL's plain", "coupled": "DOODL's coupled"}[s.chain]
    print(f"model {s.model}, {s.steps} steps of {chain} chain, guidance {s.guidance}, seed {s.seed}")
    print(
        f"one object  ({s.n}): color {percent([v.color_ok for v in verdicts1])}  "
        f"shape {percent([v.shape_ok for v in verdicts1])}  both {percent([v.ok for v in verdicts1])}"
    )
    print(
        f"two objects ({s.n}): both colors {percent([v.color_ok for v in verdicts2])}  "
        f"both shapes {percent([v.shape_ok for v in verdicts2])}  "
        f"relation {percent([bool(v.relation_ok) for v in verdicts2])}  "
        f"all {percent([v.ok for v in verdicts2])}"
    )
    print(f"seconds per 50-step sample (batch 1, cond + uncond): {timing * 50 / s.steps:.2f}")
    if s.save:
        save_grid(np.concatenate([images1[:20], images2[:20]]), captions1[:20] + captions2[:20], s.save)


if __name__ == "__main__":
    main()
