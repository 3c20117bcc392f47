"""What keeps an iteration's memory at one UNet VJP: one latent at a time, views in chunks, a checkpointed
decoder. Each must give the same loss and gradient as the plain computation it replaces."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from doodl import DoodlSettings, edict_denoise, edict_schedule, initial_latents, latent_grad, losses, optimize
from doodl.chain import checkpoints_decoder, schedule_of
from doodl.gradient import FIRST_LATENT_ONLY, PerLatentLoss
from doodl.guides import load_classifier, load_clip
from doodl.losses import aesthetic_loss, classifier_loss, clip_text_loss, score_views, symmetry_loss
from doodl.optimize import final_loss
from doodl.pipeline import decoder_checkpointing
from doodl.tiny import save_tiny_classifier, save_tiny_clip, save_tiny_pipeline, seeded_torch

PROMPT = "a red circle above a blue square"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))))


def chain(model, steps=6, seed=1):
    eps = model.noise_predictor(model.encode_prompt(PROMPT), 7.5)
    x, y = initial_latents(model, DoodlSettings(seed=seed))
    return eps, x + 0.01 * torch.randn_like(x), y, edict_schedule(model.scheduler, steps)  # an untied pair


def relative_error(a, b):
    a, b = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    assert b.norm() > 0
    return ((a - b).norm() / b.norm()).item()


# --- one latent at a time ---------------------------------------------------------------------------


def test_per_latent_loss_equals_the_joint_one_without_randomness(tiny):
    eps, x, y, schedule = chain(tiny)
    symmetry = symmetry_loss()
    joint = latent_grad(eps, x, y, schedule, lambda a, b: symmetry(tiny.decode(torch.cat([a, b]))))
    lean = latent_grad(eps, x, y, schedule, final_loss(tiny, symmetry))
    # Decoded in batches of one instead of two: equal up to float32 rounding of the decoder.
    assert lean.loss == pytest.approx(joint.loss, rel=1e-5)
    assert relative_error(lean.grad, joint.grad) <= 1e-4


@pytest.mark.parametrize("mode", ["checkpoint", "autograd"])
def test_per_latent_loss_gives_the_same_gradient_in_every_mode(tiny, mode):
    eps, x, y, schedule = chain(tiny)
    lean = final_loss(tiny, symmetry_loss())
    reference = latent_grad(eps, x, y, schedule, lean, "reversible")
    result = latent_grad(eps, x, y, schedule, lean, mode)
    assert result.loss == pytest.approx(reference.loss, rel=1e-9)
    assert relative_error(result.grad, reference.grad) <= 1e-4


def test_first_image_only_is_the_gradient_of_x0s_loss_alone(tiny):
    eps, x, y, schedule = chain(tiny)
    symmetry = symmetry_loss()
    decoded = []
    lean = latent_grad(eps, x, y, schedule, final_loss(tiny, symmetry, first_image_only=True, images=decoded))
    alone = latent_grad(eps, x, y, schedule, lambda a, b: symmetry(tiny.decode(a)))
    assert len(decoded) == 1  # y_0 was never decoded
    assert lean.loss == pytest.approx(alone.loss, rel=1e-9)
    assert relative_error(lean.grad, alone.grad) <= 1e-6
    # And it is not the pair's gradient: y_0's term matters.
    both = latent_grad(eps, x, y, schedule, final_loss(tiny, symmetry))
    assert relative_error(lean.grad, both.grad) > 1e-3


def test_per_latent_loss_called_jointly_is_the_weighted_sum():
    loss = PerLatentLoss(lambda z: z.square().sum(), FIRST_LATENT_ONLY)
    assert loss(torch.ones(1, 4), torch.full((1, 4), 5.0)).item() == 4.0
    both = PerLatentLoss(lambda z: z.square().sum())
    assert both(torch.ones(1, 4), torch.full((1, 4), 5.0)).item() == pytest.approx((4 + 100) / 2)


def test_optimizer_reports_the_mean_of_both_latents_or_x0s_loss(tiny):
    settings = DoodlSettings(
        steps=12, iterations=1
    )  # enough steps for the EDICT chain (few-step models: DDIM)
    symmetry = symmetry_loss()
    both = optimize(tiny, PROMPT, symmetry, settings).losses[0]
    first = optimize(tiny, PROMPT, symmetry, replace(settings, first_image_only=True))
    eps = tiny.noise_predictor(tiny.encode_prompt(PROMPT), settings.guidance_scale)
    x, y = initial_latents(tiny, settings)
    with torch.no_grad():
        x0, y0 = edict_denoise(eps, x, y, schedule_of(settings, tiny))
        expected = [symmetry(tiny.decode(z)).item() for z in (x0, y0)]
    assert both == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert first.losses[0] == pytest.approx(expected[0], rel=1e-6)


# --- views in chunks --------------------------------------------------------------------------------


@pytest.fixture
def chunk_small_views(monkeypatch):
    """Chunk views of any size, so that tiny guides exercise the path large ones take."""
    monkeypatch.setattr(losses, "CHUNK_MIN_VIEW_SIDE", 1)


def test_score_views_in_chunks_recomputes_each_chunk_once_in_the_backward(chunk_small_views):
    weight = torch.randn(12, 5, dtype=torch.float64)
    calls = []

    def score(views):
        calls.append(len(views))
        return torch.tanh(views.flatten(1) @ weight)

    views = torch.randn(10, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    whole = score_views(score, views, None)  # all at once
    (g_whole,) = torch.autograd.grad(whole.square().sum(), views)
    calls.clear()
    chunked = score_views(score, views, 4)
    assert calls == [4, 4, 2]  # forward: nothing of a chunk is kept ...
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), views)
    assert sorted(calls[3:]) == [2, 4, 4]  # ... each is rebuilt once for its backward
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-14)
    assert torch.allclose(g_chunked, g_whole, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="at least 1"):
        score_views(score, views, 0)


def test_small_views_are_scored_at_once():
    calls = []

    def score(views):
        calls.append(len(views))
        return views.flatten(1).sum(1)

    views = torch.rand(16, 3, 64, 64, requires_grad=True)  # the embedded guides' size
    torch.autograd.grad(score_views(score, views, 4).sum(), views)
    assert calls == [16]


def loss_and_grad(loss, images):
    images = images.clone().requires_grad_(True)
    value = loss(images)
    (grad,) = torch.autograd.grad(value, images)
    return value.item(), grad


@pytest.mark.parametrize("kind", ["clip-text", "classifier", "aesthetic"])
def test_chunked_losses_equal_unchunked_ones(clip, tmp_path, kind, chunk_small_views):
    def make(per_chunk):
        generator = torch.Generator().manual_seed(3)  # the same views for both
        if kind == "clip-text":
            return clip_text_loss(clip, PROMPT, generator=generator, views_per_chunk=per_chunk)
        if kind == "classifier":
            return classifier_loss(classifier, 1, generator=generator, views_per_chunk=per_chunk)
        return aesthetic_loss(clip, head, generator=generator, views_per_chunk=per_chunk)

    if kind == "classifier":
        classifier = load_classifier(save_tiny_classifier(tmp_path / "c", ["a", "b", "c"]))
    with seeded_torch(0):  # the head's weights, drawn without touching the process's generator
        head = torch.nn.Linear(32, 1)
    torch.nn.init.constant_(head.bias, 5.0)  # scores inside the 1-10 range the loss clamps to
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    value, grad = loss_and_grad(make(None), images)
    value_chunked, grad_chunked = loss_and_grad(make(3), images)  # 16 views: chunks of 3, 3, ..., 1
    assert value_chunked == pytest.approx(value, rel=1e-5)
    assert grad.norm() > 0
    assert ((grad_chunked - grad).norm() / grad.norm()).item() <= 1e-4


# --- a checkpointed decoder -------------------------------------------------------------------------


def test_checkpointed_decoder_gives_the_same_gradient_and_is_put_back(tiny):
    latents = torch.randn(1, 4, 8, 8)
    calls = []
    # Pre-hooks: a checkpoint's recomputation stops as soon as it has rebuilt what the backward needs.
    watched = {
        "mid block": tiny.vae.decoder.mid_block,
        "last resnet": tiny.vae.decoder.up_blocks[-1].resnets[-1],
    }
    handles = [m.register_forward_pre_hook(lambda *_, n=name: calls.append(n)) for name, m in watched.items()]

    def grad(checkpointed):
        calls.clear()
        z = latents.clone().requires_grad_(True)
        with decoder_checkpointing(tiny.vae, checkpointed):
            (g,) = torch.autograd.grad(symmetry_loss()(tiny.decode(z)), z)
        return g, {name: calls.count(name) for name in watched}

    try:
        plain, plain_calls = grad(False)
        checkpointed, checkpointed_calls = grad(True)
    finally:
        for handle in handles:
            handle.remove()
    assert plain_calls == {"mid block": 1, "last resnet": 1}
    assert checkpointed_calls == {"mid block": 2, "last resnet": 2}  # each rebuilt for the backward
    assert torch.allclose(checkpointed, plain, rtol=1e-5, atol=1e-9)
    assert not tiny.vae.decoder.gradient_checkpointing


def test_decoder_checkpointing_setting():
    class Model:  # what checkpoints_decoder reads of a model
        def latent_shape(self, height, width):
            return (1, 4, (height or 512) // 8, (width or 512) // 8)

    assert checkpoints_decoder(DoodlSettings(), Model())  # 64x64 latents
    assert not checkpoints_decoder(DoodlSettings(height=128, width=512), Model())  # 16 on one side
    assert checkpoints_decoder(DoodlSettings(decoder_checkpointing="on", height=64), Model())
    assert not checkpoints_decoder(DoodlSettings(decoder_checkpointing="off"), Model())
    with pytest.raises(ValueError, match="decoder_checkpointing"):
        DoodlSettings(decoder_checkpointing="yes")


# --- memory -----------------------------------------------------------------------------------------

GROWTH_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, re, sys, torch
    from pathlib import Path
    from doodl import load_pipeline
    from doodl.losses import symmetry_loss
    from doodl.gradient import PerLatentLoss, _loss_and_grad
    from doodl.pipeline import decoder_checkpointing
    torch.set_num_threads(1)
    model = load_pipeline(sys.argv[1])
    x, y = torch.randn(2, 1, 4, 48, 48, dtype=torch.float64)
    symmetry = symmetry_loss()
    joint = lambda a, b: symmetry(model.decode(torch.cat([a, b])))
    lean = PerLatentLoss(lambda z: symmetry(model.decode(z)))
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # The kernel's high-water mark of this process's RSS, which clear_refs resets. (getrusage's ru_maxrss
    # also keeps the mark of any thread that exited, and so can carry an earlier peak into a later one.)
    hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    growth = {}
    for how, loss in (("joint", joint), ("per-latent", lean), ("checkpointed", lean)):
        gc.collect()
        before = rss()
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current one
        with decoder_checkpointing(model.vae, how == "checkpointed"):
            _loss_and_grad(loss, x, y)
        growth[how] = (hwm() - before) / 2**20
    print(json.dumps(growth))
    """
)


def test_one_latent_at_a_time_and_a_checkpointed_decoder_lower_the_peak(tmp_path):
    # 48x48 latents: the tiny VAE's activations at 384 px (about 100-250 MB) stand well above RSS noise.
    folder = save_tiny_pipeline(tmp_path / "sd", sample_size=48)
    out = subprocess.run(
        [sys.executable, "-c", GROWTH_SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        # glibc then hands freed blocks back at once, so RSS follows the live tensors (benchmarks/memory.py).
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)},
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["per-latent"] <= 0.65 * growth["joint"], growth  # measured: 0.49
    assert growth["checkpointed"] <= 0.65 * growth["per-latent"], growth  # measured: 0.48
