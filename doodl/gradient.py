"""The gradient of a loss on the final image with respect to the initial EDICT latents.

Three ways to get the same number:

- `reversible`: keep only (x_0, y_0). Walking back, each half-step `out = a * base + b * eps(other)`
  is undone with ONE evaluation of eps with autograd on: its value rebuilds `base` from `out`, and its
  vector-Jacobian product carries the gradient to `other`. Memory is that of one UNet call, whatever
  the number of steps; cost is about one extra forward and one backward per half-step.
- `checkpoint`: store each step's input pair, recompute each step with autograd in the backward.
- `autograd`: plain backpropagation through the whole chain; memory grows with the steps.

The loss on the final pair is differentiated first, on its own, in all three modes; a `PerLatentLoss`
is differentiated one latent at a time, so that decoding and scoring never hold both latents' graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from doodl.edict import EdictSchedule, NoisePredictor, Pair, Timestep, edict_step, unmix

MODES = ("reversible", "checkpoint", "autograd")

# loss_of_final(x_0, y_0) -> scalar. Usually: decode both latents and apply a guidance loss.
FinalLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# step(eps, x, y, schedule, i) -> the pair after step i: `edict_step`, or `ddim_step` for few-step chains.
ChainStep = Callable[[NoisePredictor, torch.Tensor, torch.Tensor, EdictSchedule, int], Pair]

# Weights of (x_0, y_0) in a PerLatentLoss: the mean of the pair, as a joint loss on both latents gives;
# or x_0 alone, as the official code's `optimize_first_edict_image_only`.
BOTH_LATENTS = (0.5, 0.5)
FIRST_LATENT_ONLY = (1.0, 0.0)


@dataclass(frozen=True)
class PerLatentLoss:
    """The final loss `weights[0] * loss(x_0) + weights[1] * loss(y_0)`, judged one latent at a time.

    `latent_grad` differentiates it latent by latent, x_0 first, and frees each graph before building the
    next: at 512 px, decoding a latent and back-propagating through the VAE takes more memory than a UNet
    VJP, and doing both latents in one graph doubles that. A latent of weight 0 is never decoded.
    """

    loss: Callable[[torch.Tensor], torch.Tensor]  # one latent (1, C, h, w) -> scalar
    weights: tuple[float, float] = BOTH_LATENTS

    def __call__(self, x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """The same value in one graph (for finite differences, or any caller without `latent_grad`)."""
        return sum(w * self.loss(z) for z, w in zip((x0, y0), self.weights) if w != 0)


@dataclass(frozen=True)
class LatentGrad:
    loss: float
    final: Pair  # (x_0, y_0), detached
    grad: Pair  # d loss / d (x_T, y_T)


def latent_grad(
    eps: NoisePredictor,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: EdictSchedule,
    loss_of_final: FinalLoss,
    mode: str = "reversible",
    step: ChainStep = edict_step,
) -> LatentGrad:
    """Sample (x_0, y_0) from (x_T, y_T), evaluate the loss and return its gradient w.r.t. (x_T, y_T).

    `step` is the chain's step: EDICT's, or plain DDIM's (`doodl.edict.ddim_step`, for few-step chains),
    which has no exact inverse and so no reversible gradient."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "reversible" and step is not edict_step:
        raise ValueError("the reversible gradient needs the EDICT chain: use the checkpoint or autograd mode")
    if mode == "autograd":
        return _autograd_grad(eps, x, y, schedule, loss_of_final, step)

    inputs = []  # checkpoint mode only: the input pair of every step
    with torch.no_grad():
        for i in range(len(schedule)):
            if mode == "checkpoint":
                inputs.append((x, y))
            x, y = step(eps, x, y, schedule, i)
    final = (x, y)
    loss, (gx, gy) = _loss_and_grad(loss_of_final, x, y)

    for i in reversed(range(len(schedule))):
        if mode == "checkpoint":
            x, y = inputs.pop()
            gx, gy = _step_vjp(eps, x, y, gx, gy, schedule, i, step)
        else:
            x, y, gx, gy = reversible_unstep(eps, x, y, gx, gy, schedule, i)
    return LatentGrad(loss=loss, final=final, grad=(gx, gy))


def reversible_unstep(
    eps: NoisePredictor,
    x: torch.Tensor,
    y: torch.Tensor,
    gx: torch.Tensor,
    gy: torch.Tensor,
    s: EdictSchedule,
    i: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From step i's outputs and their gradients, rebuild its inputs and their gradients."""
    p, t, a, b = s.p, s.timestep(i), s.a[i], s.b[i]
    # Mixing is linear: x' = p x + (1 - p) y, then y' = p y + (1 - p) x'.
    x, y = unmix(x, y, p)
    gx = gx + (1 - p) * gy
    gx, gy = p * gx, p * gy + (1 - p) * gx

    first, second = (y, x) if s.swapped(i) else (x, y)
    g_first, g_second = (gy, gx) if s.swapped(i) else (gx, gy)
    # second_out = a * second_in + b * eps(first_out)
    e, vjp = _eps_and_vjp(eps, first, t, b * g_second)
    second, g_second, g_first = (second - b * e) / a, a * g_second, g_first + vjp
    # first_out = a * first_in + b * eps(second_in)
    e, vjp = _eps_and_vjp(eps, second, t, b * g_first)
    first, g_first, g_second = (first - b * e) / a, a * g_first, g_second + vjp

    if s.swapped(i):
        return second, first, g_second, g_first
    return first, second, g_first, g_second


def _eps_and_vjp(
    eps: NoisePredictor, latents: torch.Tensor, t: Timestep, cotangent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps(latents, t) and the product of its Jacobian's transpose with `cotangent`, from one call."""
    with torch.enable_grad():
        latents = latents.detach().requires_grad_(True)
        e = eps(latents, t)
        (vjp,) = torch.autograd.grad(e, latents, cotangent)
    return e.detach(), vjp


def _step_vjp(
    eps: NoisePredictor,
    x: torch.Tensor,
    y: torch.Tensor,
    gx: torch.Tensor,
    gy: torch.Tensor,
    s: EdictSchedule,
    i: int,
    step: ChainStep = edict_step,
) -> Pair:
    with torch.enable_grad():
        x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        out = step(eps, x, y, s, i)
        return _zeros_if_unused(torch.autograd.grad(out, (x, y), (gx, gy), allow_unused=True), (x, y))


def _zeros_if_unused(grads: tuple[torch.Tensor | None, ...], inputs: Pair) -> Pair:
    # A DDIM step reads x only: y_T gets no gradient, which autograd reports as None.
    return tuple(torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs))


def _loss_and_grad(loss_of_final: FinalLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Pair]:
    if isinstance(loss_of_final, PerLatentLoss):
        return _per_latent_loss_and_grad(loss_of_final, x, y)
    with torch.enable_grad():
        x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        loss = loss_of_final(x, y)
        grad = torch.autograd.grad(loss, (x, y), allow_unused=True)
    return float(loss.detach()), tuple(torch.zeros_like(v) if g is None else g for v, g in zip((x, y), grad))


def _per_latent_loss_and_grad(f: PerLatentLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Pair]:
    """Value and gradient of a PerLatentLoss, each latent's graph built, used and freed in turn."""
    total, grads = 0.0, []
    for latent, weight in zip((x, y), f.weights):
        if weight == 0:
            grads.append(torch.zeros_like(latent))
            continue
        with torch.enable_grad():
            latent = latent.detach().requires_grad_(True)
            loss = weight * f.loss(latent)
            (grad,) = torch.autograd.grad(loss, latent, allow_unused=True)
        total += float(loss.detach())
        grads.append(torch.zeros_like(latent) if grad is None else grad)
    return total, (grads[0], grads[1])


def _autograd_grad(
    eps: NoisePredictor,
    x: torch.Tensor,
    y: torch.Tensor,
    s: EdictSchedule,
    loss_of_final: FinalLoss,
    step: ChainStep = edict_step,
) -> LatentGrad:
    with torch.enable_grad():
        x_T, y_T = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        x, y = x_T, y_T
        for i in range(len(s)):
            x, y = step(eps, x, y, s, i)
        # The final loss is differentiated as the other modes do it (so a PerLatentLoss stays lean and
        # all modes share its arithmetic), then its gradient is carried back through the stored chain.
        loss, grad_final = _loss_and_grad(loss_of_final, x, y)
        grad = _zeros_if_unused(
            torch.autograd.grad((x, y), (x_T, y_T), grad_final, allow_unused=True), (x_T, y_T)
        )
    return LatentGrad(loss=loss, final=(x.detach(), y.detach()), grad=grad)
