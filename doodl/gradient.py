"""The gradient of a loss on the final image with respect to the initial EDICT latents.

Three ways to get the same number:

- `reversible`: keep only (x_0, y_0). Walking back, each half-step `out = a * base + b * eps(other)`
  is undone with ONE evaluation of eps with autograd on: its value rebuilds `base` from `out`, and its
  vector-Jacobian product carries the gradient to `other`. Memory is that of one UNet call, whatever
  the number of steps; cost is about one extra forward and one backward per half-step.
- `checkpoint`: store each step's input pair, recompute each step with autograd in the backward.
- `autograd`: plain backpropagation through the whole chain; memory grows with the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from doodl.edict import EdictSchedule, Pair, edict_denoise, edict_step, unmix
from doodl.pipeline import NoisePredictor

MODES = ("reversible", "checkpoint", "autograd")

# loss_of_final(x_0, y_0) -> scalar. Usually: decode both latents and apply a guidance loss.
FinalLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
) -> LatentGrad:
    """Sample (x_0, y_0) from (x_T, y_T), evaluate the loss and return its gradient w.r.t. (x_T, y_T)."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "autograd":
        return _autograd_grad(eps, x, y, schedule, loss_of_final)

    inputs = []  # checkpoint mode only: the input pair of every step
    with torch.no_grad():
        for i in range(len(schedule)):
            if mode == "checkpoint":
                inputs.append((x, y))
            x, y = edict_step(eps, x, y, schedule, i)
    final = (x, y)
    loss, (gx, gy) = _loss_and_grad(loss_of_final, x, y)

    for i in reversed(range(len(schedule))):
        if mode == "checkpoint":
            x, y = inputs.pop()
            gx, gy = _step_vjp(eps, x, y, gx, gy, schedule, i)
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
    p, t, a, b = s.p, s.timesteps[i], s.a[i], s.b[i]
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
    eps: NoisePredictor, latents: torch.Tensor, t: int, cotangent: torch.Tensor
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
) -> Pair:
    with torch.enable_grad():
        x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        out = edict_step(eps, x, y, s, i)
        return torch.autograd.grad(out, (x, y), (gx, gy))


def _loss_and_grad(loss_of_final: FinalLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Pair]:
    with torch.enable_grad():
        x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        loss = loss_of_final(x, y)
        grad = torch.autograd.grad(loss, (x, y), allow_unused=True)
    return float(loss.detach()), tuple(torch.zeros_like(v) if g is None else g for v, g in zip((x, y), grad))


def _autograd_grad(
    eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule, loss_of_final: FinalLoss
) -> LatentGrad:
    with torch.enable_grad():
        x_T, y_T = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        x, y = edict_denoise(eps, x_T, y_T, s)
        loss = loss_of_final(x, y)
        grad = torch.autograd.grad(loss, (x_T, y_T))
    return LatentGrad(loss=float(loss.detach()), final=(x.detach(), y.detach()), grad=grad)
