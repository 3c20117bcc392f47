"""Train the embedded models of the shapes world on CPU.

    python -m doodl.world.train                      # every stage, in order, in one process
    # or, on two cores, two chains side by side (about 70 minutes of wall time):
    python -m doodl.world.train --stage data
    python -m doodl.world.train --stage vae latents decoder unet &
    python -m doodl.world.train --stage clip classifier robust_classifier robust_clip aesthetic

Stages: data (render the cached training set), vae, latents (encode the set once, fix the scaling
factor), decoder (tune the decoder alone on those fixed latents), unet (UNet and text encoder together,
then save the Stable Diffusion folder), flow (SD3's transformer by rectified flow on the shipped VAE's
latents, saved as an SD3 folder in flow/; needs data and the shipped sd/), clip, classifier,
robust_classifier and robust_clip (adversarial fine-tuning of the saved guides, `doodl.world.robust`),
aesthetic (fitted on the CLIP as saved). The unet stage saves whatever decoder is in the cache when it
ends, so decoder and unet may also run side by side. Each stage stops at a wall-clock cap as well as a step
count; its learning-rate schedule follows whichever runs out first, so
a capped run still ends on a decayed learning rate.

The shipped generator continued the one trained from scratch on the same latents with a quarter of its
captions missing some object's color (`--unet-init`, `--color-dropout 0.25`), so that shape-only prompts
draw every color: benchmarks/results/candidate-color-dropout/ holds the command and what it changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from doodl.tiny import sd_scheduler, seeded_torch
from doodl.world import beauty, models, robust, shapes


@dataclass
class TrainSettings:
    seed: int = 0
    out: str = "assets/embedded"
    cache: str = "out/world"  # rendered images, latents and the intermediate VAE (not shipped)
    threads: int = 1  # one per process: two cores shared with other work, and spin-waiting threads thrash
    n_images: int = 50_000
    two_object_fraction: float = 0.5
    # VAE: plain reconstruction with a whisper of KL, as in SD; the latents are rescaled afterwards anyway.
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_minutes: float = 14.0
    # Decoder fine-tuning on the fixed latents.
    decoder_steps: int = 3000
    decoder_batch: int = 32
    decoder_lr: float = 1e-3
    decoder_noise: float = 0.1  # in units of the latents' std
    decoder_minutes: float = 16.0
    # UNet + text encoder, trained together from scratch.
    unet_steps: int = 5000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    cfg_dropout: float = 0.1  # share of empty captions: the unconditional branch of classifier-free guidance
    # Share of captions with the color of some of their objects left out ("a star", "a star above a blue
    # square"): personalization's prompts name the shape and leave the color to the reference, and a generator
    # that never saw such a caption draws them in two or three colors only (benchmarks/results/prior.md).
    color_dropout: float = 0.0
    ema_decay: float = 0.998
    unet_minutes: float = 35.0
    unet_init: str = ""  # a saved Stable Diffusion folder to continue training from
    # Flow generator (SD3's transformer), rectified flow on the shipped VAE's latents; its text tower starts
    # from the shipped UNet's.
    flow_steps: int = 6000
    flow_batch: int = 64
    flow_lr: float = 5e-4
    flow_minutes: float = 50.0
    flow_init: str = ""  # a saved flow folder to continue training from
    # CLIP, contrastive on (image, caption or partial caption).
    clip_steps: int = 4000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_minutes: float = 36.0
    clip_compositions: int = 32  # freely composed scenes per batch, captioned with where and how big
    clip_probe_weight: float = 0.5
    clip_init: str = ""  # a saved CLIP folder to continue training from
    # Shade classifier on single objects: the shades of red, and "not red".
    classifier_steps: int = 600
    classifier_batch: int = 64
    classifier_lr: float = 2e-3
    classifier_images: int = 12_000
    classifier_minutes: float = 8.0
    # Adversarial fine-tuning of the two guides (doodl/world/robust.py): PGD inside an L-inf ball of 8/255.
    robust_clip_steps: int = 3000
    robust_clip_batch: int = 48
    robust_clip_lr: float = 3e-4
    robust_clip_minutes: float = 20.0
    robust_classifier_steps: int = 800
    robust_classifier_lr: float = 1e-3
    robust_classifier_minutes: float = 6.0
    # Aesthetic head: ridge regression of the beauty score on CLIP image embeddings.
    aesthetic_images: int = 12_000
    aesthetic_ridge: float = 1e-3
    warmup_steps: int = 100


class Log:
    """Appends to the shipped training log and echoes to stdout."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


class Progress:
    """Fraction of a stage done, by steps or by wall time, whichever is further along."""

    def __init__(self, steps: int, minutes: float):
        self.steps, self.seconds, self.start = steps, minutes * 60, time.time()

    def __call__(self, step: int) -> float:
        return max(step / self.steps, self.elapsed() / self.seconds)

    def elapsed(self) -> float:
        return time.time() - self.start


def learning_rate(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero over the stage's progress."""
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class StepLoss(NamedTuple):
    """One training step's losses: what the optimizer minimises, and what the progress lines average."""

    objective: torch.Tensor
    # One loss, or several for a line that reports several (in the order of `StepLog.losses`).
    logged: torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class StepLog:
    """The progress lines of a training loop: "<name> step <n> <losses> (<elapsed>s)" every `every` steps,
    with the losses averaged since the previous line."""

    log: Callable[[str], None]
    name: str
    losses: str = "loss {:.5f}"  # a format of the logged losses, in order
    every: int = 100


def fit(
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[], StepLoss],
    progress: Progress,
    *,
    lr: float,
    warmup: int,
    logging: StepLog,
    max_grad_norm: float | None = None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Take optimizer steps on the losses `step_loss` draws, one batch each, until `progress` runs out, on
    `learning_rate`'s warmup-cosine schedule from `lr`; returns the number of steps taken.

    `max_grad_norm` clips the norm of the gradient of all the optimizer's parameters; `after_step(step)` runs
    after each update, for what must follow it (a moving average, a clamp)."""
    running: list = []
    step = 0
    while progress(step) < 1:
        objective, logged = step_loss()
        set_lr(optimizer, learning_rate(lr, step, progress(step), warmup))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if max_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        # A single loss is kept as a float, not a 1-tuple: numpy averages the two shapes in different orders.
        running.append(logged.item() if isinstance(logged, torch.Tensor) else tuple(x.item() for x in logged))
        step += 1
        if step % logging.every == 0:
            losses = logging.losses.format(*np.atleast_1d(np.mean(running, 0)))
            logging.log(f"{logging.name} step {step} {losses} ({progress.elapsed():.0f}s)")
            running = []
    return step


Stage = Callable[[TrainSettings, Callable[[str], None]], None]


def seeded_stage(stage: Stage) -> Stage:
    """Run the stage with torch's global generator seeded by the settings' seed, which the models' initial
    weights are drawn from, and give the caller its own generator state back afterwards."""

    @functools.wraps(stage)
    def run(s: TrainSettings, log: Callable[[str], None]) -> None:
        with seeded_torch(s.seed):
            stage(s, log)

    return run


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.2) -> torch.Tensor:
    """Blur the batch by a random amount (often none): generated images are softer than renders."""
    sigma = float(torch.rand((), generator=generator)) * max_sigma
    if sigma < 0.2:
        return images
    radius = 2
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    images = F.pad(images, (radius,) * 4, mode="replicate")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(images, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# --- data ------------------------------------------------------------------------------------------


def stage_data(s: TrainSettings, log: Log) -> None:
    start = time.time()
    scenes = shapes.random_scenes(s.seed, s.n_images, s.two_object_fraction)
    images = shapes.render_dataset(scenes)
    cache = Path(s.cache)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cache / "images.npy", images)
    (cache / "captions.json").write_text(json.dumps([shapes.caption(sc) for sc in scenes]))
    log(f"data: {len(scenes)} images rendered in {time.time() - start:.0f}s")


def load_data(s: TrainSettings) -> tuple[np.ndarray, list[str]]:
    cache = Path(s.cache)
    return np.load(cache / "images.npy", mmap_mode="r"), json.loads((cache / "captions.json").read_text())


# --- VAE -------------------------------------------------------------------------------------------


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE (colors) + L1 (crisp edges), weighted towards saturated pixels: the objects are a small part of
    each image and the grey background would otherwise dominate, so the objects' colors come last."""
    saturation = target.amax(1, keepdim=True) - target.amin(1, keepdim=True)  # 0 on grey, up to 2
    weight = 1 + 4 * saturation
    error = (recon - target) ** 2 + 0.5 * (recon - target).abs()
    return (weight * error).mean() / weight.mean()


@seeded_stage
def stage_vae(s: TrainSettings, log: Log) -> None:
    images, _ = load_data(s)
    vae = models.tiny_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(s.seed + 1)

    def step_loss() -> StepLoss:
        batch = to_tensor(images[np.sort(rng.choice(len(images), s.vae_batch, replace=False))])
        posterior = vae.encode(batch).latent_dist
        # Decode the posterior mean: a short run learns faster without sampling noise, the KL term still
        # keeps the means bounded, and the decoder stage adds latent noise for robustness later.
        recon = vae.decode(posterior.mode()).sample
        loss = reconstruction_loss(recon, batch) + s.vae_kl_weight * posterior.kl().mean()
        return StepLoss(loss, loss)

    progress = Progress(s.vae_steps, s.vae_minutes)
    step = fit(
        optimizer, step_loss, progress, lr=s.vae_lr, warmup=s.warmup_steps, logging=StepLog(log, "vae")
    )
    vae.save_pretrained(Path(s.cache) / "vae")
    log(f"vae: {step} steps in {progress.elapsed() / 60:.1f} min")


@torch.no_grad()
def stage_latents(s: TrainSettings, log: Log) -> None:
    """Encode the whole set once (posterior means), and fix the scaling factor to give unit std."""
    from diffusers import AutoencoderKL

    start = time.time()
    images, _ = load_data(s)
    vae = AutoencoderKL.from_pretrained(Path(s.cache) / "vae").eval()
    latents = torch.cat(
        [vae.encode(to_tensor(images[i : i + 500])).latent_dist.mean for i in range(0, len(images), 500)]
    )
    scaling = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(Path(s.cache) / "vae")
    torch.save(latents, Path(s.cache) / "latents.pt")
    recon = vae.decode(latents[:256]).sample
    error = F.mse_loss(recon, to_tensor(images[:256])).item()
    log(
        f"latents: {tuple(latents.shape)}, std {latents.std():.3f} -> scaling_factor {scaling:.5f}, "
        f"reconstruction mse {error:.5f}, {time.time() - start:.0f}s"
    )


@seeded_stage
def stage_decoder(s: TrainSettings, log: Log) -> None:
    """Keep training the decoder alone on the cached latents. The encoder is frozen, so the latents the
    UNet learns from do not move and this stage may run beside the UNet's. Noise on the latents teaches
    the decoder to forgive the UNet's small errors."""
    from diffusers import AutoencoderKL

    images, _ = load_data(s)
    vae = AutoencoderKL.from_pretrained(Path(s.cache) / "vae")
    latents = torch.load(Path(s.cache) / "latents.pt")
    decoder = [vae.post_quant_conv, vae.decoder]
    params = [p for module in decoder for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.decoder_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(s.seed + 6)
    noise_scale = s.decoder_noise * latents.std()

    def step_loss() -> StepLoss:
        idx = torch.randint(len(latents), (s.decoder_batch,), generator=generator).sort().values
        z = latents[idx] + noise_scale * torch.randn(latents[idx].shape, generator=generator)
        loss = reconstruction_loss(vae.decode(z).sample, to_tensor(images[idx.numpy()]))
        return StepLoss(loss, loss)

    progress = Progress(s.decoder_steps, s.decoder_minutes)
    step = fit(
        optimizer,
        step_loss,
        progress,
        lr=s.decoder_lr,
        warmup=s.warmup_steps,
        logging=StepLog(log, "decoder"),
    )
    vae.save_pretrained(Path(s.cache) / "vae")
    log(f"decoder: {step} steps in {progress.elapsed() / 60:.1f} min")


# --- UNet + text encoder -----------------------------------------------------------------------------


def caption_variants(caption: str) -> list[str]:
    """The caption, then every variant of it with the colors of some of its objects left out."""
    description = shapes.parse_caption(caption)
    variants = []
    for keep in itertools.product((True, False), repeat=len(description.objects)):
        objects = zip(description.objects, keep, strict=True)
        phrases = [shapes.object_phrase(obj, with_color) for obj, with_color in objects]
        variants.append(shapes.join_phrases(phrases, description.relation))
    return variants


class CaptionTokens(NamedTuple):
    tokens: torch.Tensor  # (distinct texts, 77) token ids
    full: torch.Tensor  # (images,) index of each image's caption
    partial: list[list[int]]  # per image, the indices of its variants that leave some color out
    empty: torch.Tensor  # (77,) the empty prompt's ids


def caption_tokens(captions: list[str]) -> CaptionTokens:
    """Token ids of every distinct caption and caption variant, and each image's indices into them."""
    from doodl.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    variants = {c: caption_variants(c) for c in set(captions)}
    distinct = sorted({v for vs in variants.values() for v in vs})
    index = {c: i for i, c in enumerate(distinct)}

    def encode(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    partial = {c: [index[v] for v in vs[1:]] for c, vs in variants.items()}
    return CaptionTokens(
        encode(distinct),
        torch.tensor([index[c] for c in captions]),
        [partial[c] for c in captions],
        encode([""])[0],
    )


def training_captions(
    captions: CaptionTokens, idx: torch.Tensor, s: TrainSettings, generator: torch.Generator
) -> torch.Tensor:
    """The token ids of a batch: each image's caption, a variant without some color (`color_dropout`),
    or the empty prompt (`cfg_dropout`)."""
    choice = captions.full[idx].clone()
    if s.color_dropout > 0:  # no draw otherwise: without it a run draws what it drew before
        colorless = torch.rand(len(idx), generator=generator) < s.color_dropout
        for row in colorless.nonzero().flatten().tolist():
            variants = captions.partial[idx[row]]
            choice[row] = variants[int(torch.randint(len(variants), (), generator=generator))]
    ids = captions.tokens[choice]
    dropped = torch.rand(len(idx), generator=generator) < s.cfg_dropout
    return torch.where(dropped[:, None], captions.empty[None], ids)


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        a.lerp_(p, 1 - decay)


def fit_averaged(
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[], StepLoss],
    progress: Progress,
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]],
    s: TrainSettings,
    *,
    lr: float,
    logging: StepLog,
) -> int:
    """`fit` a generator (gradients clipped to norm 1) with a moving average of each (average, model) pair
    after every step, warmed up quickly so that a short run's early steps do not dominate it."""

    def update_averages(step: int) -> None:
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        for average, model in pairs:
            ema_update(average, model, decay)

    return fit(
        optimizer,
        step_loss,
        progress,
        lr=lr,
        warmup=s.warmup_steps,
        logging=logging,
        max_grad_norm=1.0,
        after_step=update_averages,
    )


def save_generator(folder: Path, vae, text_encoder, unet) -> None:
    """Save a full Stable Diffusion folder. The UNet is stored in fp16 to fit the size budget: diffusers
    loads it back as float32 by default, and the text encoder stays float32 because transformers would not."""
    from diffusers import StableDiffusionPipeline

    from doodl.tokenizer import clip_tokenizer

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet.half(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    unet.float()


@seeded_stage
def stage_unet(s: TrainSettings, log: Log) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, captions = load_data(s)
    vae = AutoencoderKL.from_pretrained(Path(s.cache) / "vae")
    latents = torch.load(Path(s.cache) / "latents.pt") * vae.config.scaling_factor
    tokens = caption_tokens(captions)
    unet, text_encoder, scheduler = models.tiny_unet(), models.tiny_text_encoder(), sd_scheduler()
    if s.unet_init:  # continue from a saved generator (same architecture)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(s.unet_init) / "unet").state_dict())
        text_encoder.load_state_dict(
            CLIPTextModel.from_pretrained(Path(s.unet_init) / "text_encoder").state_dict()
        )
    ema_unet, ema_text = models.tiny_unet(), models.tiny_text_encoder()
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(s.seed + 2)

    def step_loss() -> StepLoss:
        idx = torch.randint(len(latents), (s.unet_batch,), generator=generator)
        x0 = latents[idx]
        ids = training_captions(tokens, idx, s, generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (s.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        return StepLoss(loss, loss)

    progress = Progress(s.unet_steps, s.unet_minutes)
    pairs = [(ema_unet, unet), (ema_text, text_encoder)]
    step = fit_averaged(optimizer, step_loss, progress, pairs, s, lr=s.unet_lr, logging=StepLog(log, "unet"))
    vae = AutoencoderKL.from_pretrained(Path(s.cache) / "vae")  # the decoder may have been tuned meanwhile
    save_generator(Path(s.out) / "sd", vae, ema_text, ema_unet)
    log(f"unet: {step} steps in {progress.elapsed() / 60:.1f} min; saved {Path(s.out) / 'sd'}")


# --- flow generator ----------------------------------------------------------------------------------


def flow_prompt_embeds(text_encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, pooled) of token ids as `StableDiffusion3Pipeline.encode_prompt` makes them when both CLIP
    towers are this one and T5 is absent: the penultimate layer's states side by side, then as many zero
    tokens (T5's place), and the projected pooled outputs side by side."""
    out = text_encoder(ids, output_hidden_states=True)
    clip = torch.cat([out.hidden_states[-2]] * 2, dim=-1)
    return torch.cat([clip, torch.zeros_like(clip)], dim=1), torch.cat([out.text_embeds] * 2, dim=-1)


def flow_latents(s: TrainSettings, vae) -> torch.Tensor:
    """The training set encoded once by the shipped VAE (posterior means, scaled), cached with the images."""
    path = Path(s.cache) / "flow-latents.pt"
    if not path.is_file():
        images, _ = load_data(s)
        with torch.no_grad():
            means = [
                vae.encode(to_tensor(images[i : i + 500])).latent_dist.mean
                for i in range(0, len(images), 500)
            ]
        torch.save(torch.cat(means), path)
    return torch.load(path) * vae.config.scaling_factor


def save_flow_generator(folder: Path, vae, text_encoder, transformer) -> None:
    """An ordinary SD3 pipeline folder without T5; both CLIP towers are the one trained. T5's tokenizer stays:
    its length is that of the zeros the pipeline reads in T5's place, as in training. Weights in float16 to
    fit the size budget (`doodl.load_pipeline` loads them in the dtype it is asked for)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from doodl.tokenizer import clip_tokenizer, t5_tokenizer

    vae.register_to_config(shift_factor=0.0)  # SD3's decode reads it; this VAE's latents are centred
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer.half(),
        vae=vae,
        text_encoder=text_encoder.half(),
        tokenizer=clip_tokenizer(models.FLOW_TEXT_TOKENS),
        text_encoder_2=text_encoder,
        tokenizer_2=clip_tokenizer(models.FLOW_TEXT_TOKENS),
        text_encoder_3=None,
        tokenizer_3=t5_tokenizer(max_length=models.FLOW_TEXT_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),  # 64 latent pixels: no shift towards noise
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    transformer.float()
    text_encoder.float()


@seeded_stage
def stage_flow(s: TrainSettings, log: Log) -> None:
    """Rectified flow (x_s = (1 - s) x0 + s noise, the transformer predicts noise - x0 at timestep 1000 s, s
    drawn logit-normal as SD3 draws it), the text tower trained with it from the shipped UNet's."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shipped = Path(s.out) / "sd"
    vae = AutoencoderKL.from_pretrained(shipped / "vae").eval()
    latents = flow_latents(s, vae)
    _, captions = load_data(s)
    tokens = caption_tokens(captions)
    tokens = tokens._replace(
        tokens=tokens.tokens[:, : models.FLOW_TEXT_TOKENS], empty=tokens.empty[: models.FLOW_TEXT_TOKENS]
    )
    transformer, text_encoder = models.flow_transformer(), models.flow_text_encoder()
    if s.flow_init:  # continue from a saved flow generator (same architecture)
        saved = Path(s.flow_init)
        transformer.load_state_dict(
            SD3Transformer2DModel.from_pretrained(saved / "transformer", dtype=torch.float32).state_dict()
        )
        text_encoder.load_state_dict(
            CLIPTextModelWithProjection.from_pretrained(
                saved / "text_encoder", dtype=torch.float32
            ).state_dict()
        )
    else:
        unet_text = CLIPTextModel.from_pretrained(shipped / "text_encoder", dtype=torch.float32).state_dict()
        text_encoder.load_state_dict(unet_text, strict=False)  # all but the projection, which starts random
    ema_transformer, ema_text = models.flow_transformer(), models.flow_text_encoder()
    ema_transformer.load_state_dict(transformer.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.flow_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 7)

    def step_loss() -> StepLoss:
        idx = torch.randint(len(latents), (s.flow_batch,), generator=generator)
        x0 = latents[idx]
        hidden, pooled = flow_prompt_embeds(text_encoder, training_captions(tokens, idx, s, generator))
        sigma = torch.sigmoid(torch.randn(s.flow_batch, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
        loss = F.mse_loss(velocity, noise - x0)
        return StepLoss(loss, loss)

    progress = Progress(s.flow_steps, s.flow_minutes)
    pairs = [(ema_transformer, transformer), (ema_text, text_encoder)]
    step = fit_averaged(optimizer, step_loss, progress, pairs, s, lr=s.flow_lr, logging=StepLog(log, "flow"))
    save_flow_generator(Path(s.out) / "flow", vae, ema_text, ema_transformer)
    log(f"flow: {step} steps in {progress.elapsed() / 60:.1f} min; saved {Path(s.out) / 'flow'}")


# --- CLIP ------------------------------------------------------------------------------------------


def clip_text(caption: str, rng: np.random.Generator) -> str:
    """The caption, or a partial paraphrase of it, so that CLIP also grounds single words."""
    description = shapes.parse_caption(caption)
    if len(description.objects) == 1:
        (obj,) = description.objects
        return str(rng.choice([caption, caption, caption, f"a {obj.color} shape", f"a {obj.shape}"]))
    first, second = description.objects
    return (
        caption if rng.random() < 0.7 else f"{shapes.object_phrase(first)} and {shapes.object_phrase(second)}"
    )


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, texts: list[str]
) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with the same text counts as a match (the world repeats itself)."""
    logits = scale * image_features @ text_features.T
    ids = {t: i for i, t in enumerate(texts)}
    same = torch.tensor([ids[t] for t in texts])
    targets = (same[:, None] == same[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def clip_dir(s: TrainSettings) -> Path:
    return Path(s.out) / "clip"


def composition_caption(scene: shapes.Scene) -> str:
    """A caption that also says where, how big and whether cut off: what the aesthetic head needs to see."""
    text = shapes.caption(scene)
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        size = "small " if obj.size < 11 else "big " if obj.size > 18 else ""
        third = scene.size / 3
        row = ("top", "middle", "bottom")[int(np.clip(obj.center[1] // third, 0, 2))]
        column = ("left", "center", "right")[int(np.clip(obj.center[0] // third, 0, 2))]
        where = "in the center" if (row, column) == ("middle", "center") else f"at the {row} {column}"
        text = f"a {size}{obj.color} {obj.shape} {where}"
    if beauty.visibility(scene) < 0.9:
        text += ", cut off by the edge"
    return text


@seeded_stage
def stage_clip(s: TrainSettings, log: Log) -> None:
    """Contrastive training on world images, plus freely composed ones with composition captions. A linear
    probe of the beauty score rides along so that the embedding keeps composition, not only content."""
    import open_clip

    images, captions = load_data(s)
    config = models.clip_config()
    model = open_clip.CLIP(**config["model_cfg"])
    if s.clip_init:  # continue from a saved model (same architecture)
        model.load_state_dict(load_file(Path(s.clip_init) / "open_clip_model.safetensors"))
    probe = torch.nn.Linear(models.CLIP_EMBED_DIM, 1)
    params = list(model.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.clip_lr, weight_decay=0.1)
    rng = np.random.default_rng(s.seed + 3)
    generator = torch.Generator().manual_seed(s.seed + 3)

    def step_loss() -> StepLoss:
        idx = np.sort(rng.choice(len(images), s.clip_batch, replace=False))
        composed = [beauty.random_composition(rng) for _ in range(s.clip_compositions)]
        pixels = np.concatenate([images[idx], shapes.render_dataset(composed)])
        batch = random_blur(to_tensor(pixels), generator)  # mean = std = 0.5: [-1, 1] is the input
        texts = [clip_text(captions[i], rng) for i in idx] + [composition_caption(sc) for sc in composed]
        image_features, text_features, scale = model(batch, open_clip.tokenize(texts))
        target = (torch.tensor([beauty.beauty(sc) for sc in composed]) - 5.5) / 2.5
        probe_loss = F.mse_loss(probe(image_features[len(idx) :]).squeeze(1), target)
        loss = (
            contrastive_loss(image_features, text_features, scale, texts) + s.clip_probe_weight * probe_loss
        )
        return StepLoss(loss, (loss, probe_loss))

    @torch.no_grad()
    def clamp_logit_scale(step: int) -> None:
        model.logit_scale.clamp_(0, math.log(100))

    progress = Progress(s.clip_steps, s.clip_minutes)
    step = fit(
        optimizer,
        step_loss,
        progress,
        lr=s.clip_lr,
        warmup=s.warmup_steps,
        logging=StepLog(log, "clip", losses="loss {:.4f} probe mse {:.4f}"),
        after_step=clamp_logit_scale,
    )
    save_clip(model, config, clip_dir(s))
    log(f"clip: {step} steps in {progress.elapsed() / 60:.1f} min; saved {clip_dir(s)}")


def save_clip(model: torch.nn.Module, config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}  # fp16 on disk
    save_file(state, folder / "open_clip_model.safetensors")


def load_saved_clip(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The CLIP of a folder written by `save_clip`, in float32, for further training."""
    import open_clip

    config = json.loads((folder / "open_clip_config.json").read_text())
    model = open_clip.CLIP(**config["model_cfg"])
    state = load_file(folder / "open_clip_model.safetensors")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model, config


def world_batch(rng: np.random.Generator, n: int, compositions: int) -> tuple[list[shapes.Scene], list[str]]:
    """World scenes with (partial) captions, then freely composed ones with composition captions."""
    scenes = [shapes.random_scene(rng, 2 if rng.random() < 0.5 else 1) for _ in range(n)]
    texts = [clip_text(shapes.caption(scene), rng) for scene in scenes]
    composed = [beauty.random_composition(rng) for _ in range(compositions)]
    return scenes + composed, texts + [composition_caption(scene) for scene in composed]


def clip_zero_shot(model: torch.nn.Module, s: TrainSettings, n: int = 200) -> str:
    """Clean and robust zero-shot accuracy of the color and the shape of held-out single objects."""
    import open_clip

    rng = np.random.default_rng(s.seed + 99)
    scenes = [shapes.random_scene(rng, 1) for _ in range(n)]
    images = torch.from_numpy(shapes.render_dataset(scenes)).permute(0, 3, 1, 2).float() / 255
    generator = torch.Generator().manual_seed(s.seed + 99)
    found = []
    for attribute, names in (("color", shapes.COLORS), ("shape", shapes.SHAPES)):
        phrases = [f"a {name} shape" if attribute == "color" else f"a {name}" for name in names]
        with torch.no_grad():
            texts = model.encode_text(open_clip.tokenize(phrases), normalize=True)
        labels = torch.tensor([names.index(getattr(sc.objects[0], attribute)) for sc in scenes])

        def logits_of(x: torch.Tensor, texts: torch.Tensor = texts) -> torch.Tensor:
            return 100 * model.encode_image(robust.as_model_input(x), normalize=True) @ texts.T

        clean, attacked = robust.accuracy(logits_of, images, labels, generator)
        found.append(f"{attribute} {clean:.3f} clean / {attacked:.3f} robust")
    return ", ".join(found)


@seeded_stage
def stage_robust_clip(s: TrainSettings, log: Log) -> None:
    """Adversarial fine-tuning of the CLIP's image tower against its frozen text tower: the text embeddings
    the losses target stay where they are, and the image tower learns to map attacked images next to them.
    The beauty probe rides along as in `stage_clip`, so that the embedding keeps composition."""
    import open_clip

    model, config = load_saved_clip(clip_dir(s))
    log(f"robust clip: before, zero-shot {clip_zero_shot(model, s)}")
    model.requires_grad_(False).visual.requires_grad_(True)
    probe = torch.nn.Linear(models.CLIP_EMBED_DIM, 1)
    params = list(model.visual.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.robust_clip_lr, weight_decay=0.05)
    rng = np.random.default_rng(s.seed + 6)
    generator = torch.Generator().manual_seed(s.seed + 6)
    scale = model.logit_scale.exp().detach()

    def step_loss() -> StepLoss:
        scenes, texts = world_batch(rng, s.robust_clip_batch, s.clip_compositions)
        pixels = torch.from_numpy(shapes.render_dataset(scenes)).permute(0, 3, 1, 2).float() / 255
        clean = robust.augment(random_blur(pixels, generator), generator)
        with torch.no_grad():
            text_features = model.encode_text(open_clip.tokenize(texts), normalize=True)

        def contrastive(x: torch.Tensor, text_features=text_features, texts=texts) -> torch.Tensor:
            features = model.encode_image(robust.as_model_input(x), normalize=True)
            return contrastive_loss(features, text_features, scale, texts)

        attacked = robust.pgd(contrastive, clean, robust.TRAIN_PGD_STEPS, generator=generator)
        features = model.encode_image(robust.as_model_input(torch.cat([clean, attacked])), normalize=True)
        n = len(texts)
        loss = sum(contrastive_loss(f, text_features, scale, texts) for f in features.split(n)) / 2
        composed = [sc for sc in scenes[s.robust_clip_batch :]]
        target = (torch.tensor([beauty.beauty(sc) for sc in composed]) - 5.5) / 2.5
        probe_loss = F.mse_loss(probe(features[s.robust_clip_batch : n]).squeeze(1), target)
        return StepLoss(loss + s.clip_probe_weight * probe_loss, (loss, probe_loss))

    progress = Progress(s.robust_clip_steps, s.robust_clip_minutes)
    step = fit(
        optimizer,
        step_loss,
        progress,
        lr=s.robust_clip_lr,
        warmup=s.warmup_steps,
        logging=StepLog(log, "robust clip", losses="loss {:.4f} probe {:.4f}", every=50),
    )
    model.eval()
    save_clip(model, config, clip_dir(s))
    log(
        f"robust clip: {step} steps in {progress.elapsed() / 60:.1f} min, "
        f"eps {robust.EPSILON * 255:.0f}/255, PGD-{robust.TRAIN_PGD_STEPS}; held-out zero-shot "
        f"{clip_zero_shot(model, s)} (robust: PGD-{robust.EVAL_PGD_STEPS}); saved {clip_dir(s)}"
    )


# --- shade classifier ------------------------------------------------------------------------------


def classifier_data(s: TrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """Single objects on the world's backgrounds, as many of each class: the classifier's color in each of
    its shades, and any other color in any shade (the last class)."""
    rng = np.random.default_rng(s.seed + 4)
    others = [c for c in shapes.COLORS if c != models.CLASSIFIER_COLOR]
    scenes, labels = [], []
    while len(scenes) < s.classifier_images:
        scene = shapes.random_scene(rng, 1)
        label = int(rng.integers(len(models.CLASSIFIER_LABELS)))
        if label < len(models.CLASSIFIER_LABELS) - 1:
            color, shade = models.CLASSIFIER_COLOR, label
        else:
            color, shade = str(rng.choice(others)), int(rng.integers(4))
        obj = dataclasses.replace(scene.objects[0], color=color, shade=shade)
        if shapes.contrast(shapes.PALETTE[color][shade], scene.background) >= shapes.MIN_CONTRAST:
            scenes.append(dataclasses.replace(scene, objects=(obj,)))
            labels.append(label)
    return shapes.render_dataset(scenes), np.array(labels)


@seeded_stage
def stage_classifier(s: TrainSettings, log: Log) -> None:
    images, labels = classifier_data(s)
    n_val = 1000
    model = models.shade_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.classifier_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 4)
    rng = np.random.default_rng(s.seed + 4)

    def step_loss() -> StepLoss:
        idx = rng.choice(len(images) - n_val, s.classifier_batch, replace=False) + n_val
        batch = random_blur(to_tensor(images[idx]), generator)
        loss = F.cross_entropy(model(batch).logits, torch.from_numpy(labels[idx]))
        return StepLoss(loss, loss)

    progress = Progress(s.classifier_steps, s.classifier_minutes)
    logging = StepLog(log, "classifier", losses="loss {:.4f}")
    step = fit(optimizer, step_loss, progress, lr=s.classifier_lr, warmup=s.warmup_steps, logging=logging)
    model.eval()
    with torch.no_grad():
        predicted = model(to_tensor(images[:n_val])).logits.argmax(1).numpy()
    accuracy = float((predicted == labels[:n_val]).mean())
    save_classifier(model, Path(s.out) / "classifier")
    log(f"classifier: {step} steps in {progress.elapsed() / 60:.1f} min; held-out accuracy {accuracy:.3f}")


def save_classifier(model: torch.nn.Module, folder: Path) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(folder, safe_serialization=True)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(folder)


@seeded_stage
def stage_robust_classifier(s: TrainSettings, log: Log) -> None:
    """Adversarial fine-tuning of the shade classifier on augmented views, as DOODL's loss shows them."""
    from transformers import ResNetForImageClassification

    images, labels = classifier_data(s)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(labels)
    n_val = 1000
    folder = Path(s.out) / "classifier"
    model = ResNetForImageClassification.from_pretrained(folder)
    generator = torch.Generator().manual_seed(s.seed + 7)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return model(robust.as_model_input(x)).logits

    def held_out() -> str:
        model.eval()
        clean, attacked = robust.accuracy(logits_of, pixels[:n_val], targets[:n_val], generator)
        model.train()
        return f"{clean:.3f} clean / {attacked:.3f} robust"

    log(f"robust classifier: before, held-out accuracy {held_out()}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.robust_classifier_lr, weight_decay=0.01)
    rng = np.random.default_rng(s.seed + 7)

    def step_loss() -> StepLoss:
        idx = torch.from_numpy(rng.choice(len(images) - n_val, s.classifier_batch, replace=False) + n_val)
        clean = robust.augment(random_blur(pixels[idx], generator), generator)
        batch_targets = targets[idx]
        model.eval()  # attack the model as it is, without moving batch-norm statistics
        attacked = robust.pgd(
            lambda x, t=batch_targets: F.cross_entropy(logits_of(x), t),
            clean,
            robust.TRAIN_PGD_STEPS,
            generator=generator,
        )
        model.train()
        loss = F.cross_entropy(logits_of(torch.cat([clean, attacked])), batch_targets.repeat(2))
        return StepLoss(loss, loss)

    progress = Progress(s.robust_classifier_steps, s.robust_classifier_minutes)
    step = fit(
        optimizer,
        step_loss,
        progress,
        lr=s.robust_classifier_lr,
        warmup=s.warmup_steps,
        logging=StepLog(log, "robust classifier", losses="loss {:.4f}"),
    )
    accuracy = held_out()
    model.eval()
    save_classifier(model, folder)
    log(
        f"robust classifier: {step} steps in {progress.elapsed() / 60:.1f} min, eps "
        f"{robust.EPSILON * 255:.0f}/255, PGD-{robust.TRAIN_PGD_STEPS}; held-out accuracy {accuracy} "
        f"(robust: PGD-{robust.EVAL_PGD_STEPS})"
    )


# --- aesthetic head --------------------------------------------------------------------------------


def stage_aesthetic(s: TrainSettings, log: Log) -> None:
    """Least squares (ridge) of the beauty score on L2-normalised CLIP image embeddings."""
    import open_clip

    start = time.time()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir(s)}")
    model.eval()
    rng = np.random.default_rng(s.seed + 5)
    scenes = [beauty.random_composition(rng) for _ in range(s.aesthetic_images)]
    scores = torch.tensor([beauty.beauty(sc) for sc in scenes], dtype=torch.float64)
    images = shapes.render_dataset(scenes)
    with torch.no_grad():
        features = torch.cat(
            [
                model.encode_image(to_tensor(images[i : i + 500]), normalize=True)
                for i in range(0, len(images), 500)
            ]
        ).double()
    n_val = 1000
    x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    train_x, train_y = x[n_val:], scores[n_val:]
    gram = train_x.T @ train_x + s.aesthetic_ridge * len(train_x) * torch.eye(x.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, train_x.T @ train_y)
    predicted = x[:n_val] @ solution
    correlation = float(np.corrcoef(predicted.numpy(), scores[:n_val].numpy())[0, 1])
    folder = Path(s.out) / "aesthetic"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": solution[None, :-1].float().contiguous(), "bias": solution[-1:].float().contiguous()},
        folder / "aesthetic_head.safetensors",
    )
    head = torch.nn.Linear(models.CLIP_EMBED_DIM, 1)
    head.load_state_dict(load_file(folder / "aesthetic_head.safetensors"))
    inflation = score_inflation(model, head, images[:500], s.seed)
    log(
        f"aesthetic: {s.aesthetic_images} images, held-out correlation {correlation:.3f}, "
        f"score range {scores.min():.2f}..{scores.max():.2f}; PGD-{robust.EVAL_PGD_STEPS} within "
        f"{robust.EPSILON * 255:.0f}/255 raises the predicted score by {inflation:.2f} on average, "
        f"{time.time() - start:.0f}s"
    )


def score_inflation(model: torch.nn.Module, head: torch.nn.Linear, images: np.ndarray, seed: int) -> float:
    """How far an invisible change (PGD inside the L-inf ball) raises the head's score: a robust scorer
    can only be pleased by changing what the image shows."""
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255

    def score(x: torch.Tensor) -> torch.Tensor:
        return head(model.encode_image(robust.as_model_input(x), normalize=True)).squeeze(1)

    generator = torch.Generator().manual_seed(seed)
    attacked = robust.pgd(lambda x: score(x).sum(), pixels, robust.EVAL_PGD_STEPS, generator=generator)
    with torch.no_grad():
        return float((score(attacked) - score(pixels)).mean())


# Every stage, in the order a full run takes them.
STAGES: dict[str, Stage] = {
    "data": stage_data,
    "vae": stage_vae,
    "latents": stage_latents,
    "decoder": stage_decoder,
    "unet": stage_unet,
    "flow": stage_flow,
    "clip": stage_clip,
    "classifier": stage_classifier,
    "robust_clip": stage_robust_clip,
    "robust_classifier": stage_robust_classifier,
    "aesthetic": stage_aesthetic,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", nargs="+", choices=list(STAGES), default=list(STAGES))
    for f in dataclasses.fields(TrainSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    torch.set_num_threads(settings.threads)
    log = Log(Path(settings.out) / "training_log.txt")
    log(f"stages {args.stage} with {settings}")
    for name in args.stage:
        start = time.time()
        STAGES[name](settings, log)
        log(f"stage {name} done: {(time.time() - start) / 60:.1f} min wall")


if __name__ == "__main__":
    main()
