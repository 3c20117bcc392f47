"""How one DOODL iteration moves the noise: a step rule turns the gradient into a step, a small perturbation
is added, and a regularizer keeps the noise a likely draw of N(0, I) (paper, Sec. 4; ReNO, Eyring et al.
2024, Sec. 4). Pure tensor functions and one small stateful `Update`; the loop that calls it is
`doodl.optimize`."""

from __future__ import annotations

import math

import torch

from doodl.edict import Pair
from doodl.settings import DoodlSettings


def norm_penalty(z: torch.Tensor) -> torch.Tensor:
    """Minus the log-density of `z`'s norm r under N(0, I) in d dimensions (a chi distribution), up to a
    constant: r^2 / 2 - (d - 1) log r, lowest at r = sqrt(d - 1). ReNO's regularizer."""
    r = z.double().norm()
    return r.square() / 2 - (z.numel() - 1) * r.log()


def norm_penalty_grad(z: torch.Tensor) -> torch.Tensor:
    """The gradient of `norm_penalty` at `z`: z (1 - (d - 1) / r^2), a pull back to the likely norm."""
    return z * (1 - (z.numel() - 1) / z.double().square().sum()).to(z.dtype)


def _radial_bands(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Each frequency of a (height, width) FFT's index into rings of unit width around the zero frequency."""
    fy = torch.fft.fftfreq(height, device=device) * height
    fx = torch.fft.fftfreq(width, device=device) * width
    return torch.sqrt(fy[:, None].square() + fx[None, :].square()).round().long()


def whiten(z: torch.Tensor) -> torch.Tensor:
    """`z` (..., H, W) with each channel's spectrum made that of white noise's expectation: the zero
    frequency removed (mean 0) and every ring of frequencies rescaled to one mean power, the one that gives
    variance 1. Phases are kept, so the image of the noise moves as little as the statistics allow; applied
    twice, it changes nothing more. White noise itself barely moves (its rings' powers are near equal)."""
    height, width = z.shape[-2:]
    spectrum = torch.fft.fft2(z.double(), norm="ortho")
    bands = _radial_bands(height, width, z.device).flatten()
    power = spectrum.abs().square().flatten(-2)
    count = torch.bincount(bands).double()
    ring_power = torch.zeros(*power.shape[:-1], len(count), dtype=power.dtype, device=z.device)
    ring_power = ring_power.index_add(-1, bands, power) / count
    # With orthonormal FFTs, the mean square of a channel is its spectrum's power summed over H x W.
    target = height * width / (height * width - 1)
    scale = torch.sqrt(target / ring_power.clamp_min(1e-30)).gather(-1, bands.expand_as(power))
    scale[..., 0] = 0.0  # the zero frequency: the channel's mean
    white = torch.fft.ifft2(spectrum * scale.unflatten(-1, (height, width)), norm="ortho").real
    return white.to(z.dtype)


def channel_statistics(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of each channel of `z` (B, C, H, W), over its pixels."""
    flat = z.double().flatten(-2)
    return flat.mean(-1), flat.var(-1, unbiased=False)


def ring_powers(z: torch.Tensor) -> torch.Tensor:
    """The mean power of each ring of `z`'s orthonormal spectrum per channel (zero frequency first): all
    near 1 but the first for white noise of variance 1."""
    height, width = z.shape[-2:]
    bands = _radial_bands(height, width, z.device).flatten()
    power = torch.fft.fft2(z.double(), norm="ortho").abs().square().flatten(-2)
    sums = torch.zeros(*power.shape[:-1], int(bands.max()) + 1, dtype=power.dtype, device=z.device)
    return sums.index_add(-1, bands, power) / torch.bincount(bands).double()


class Update:
    """The optimizer's state across iterations: turns (latents, gradient) into the next latents.

    Step rules (`DoodlSettings.step_rule`), each feeding its optimizer about `grad_clip` per element at most
    (with momentum 0.9, SGD's and Nesterov's steps grow to ten times that on a steady gradient; Adam's stay
    about grad_clip, so Adam wants a larger clip: benchmarks/results/optimizers-pilot):
    - sgd: the paper's: learning_rate x gradient, clipped element-wise to grad_clip, with momentum;
    - nesterov: ReNO's: learning_rate x gradient with its norm clipped to grad_clip x sqrt(elements) (the
      norm of a step whose every element sits at the clip), Nesterov momentum;
    - adam: Adam with step size grad_clip and first-moment decay `momentum` (the rate does not matter: Adam
      divides the scale out).
    Regularizers (`DoodlSettings.regularizer`), from noise: renormalize (each latent keeps its start's norm,
    the paper's), norm (ReNO's `norm_penalty`, weighted by `regularizer_weight`, added to the gradient),
    white (`whiten` after every step), none. A photo's latents are its inversion, not white noise: from a
    photo every rule renormalizes, and the trust region (`DoodlSettings.fidelity`) bounds them.
    """

    def __init__(self, start: Pair, settings: DoodlSettings, from_photo: bool = False) -> None:
        self.settings = settings
        self.regularizer = "renormalize" if from_photo else settings.regularizer
        self.norms = tuple(z.norm() for z in start)
        self.generator = torch.Generator().manual_seed(settings.seed + 1)  # the perturbations'
        self.latents = [z.detach().clone().requires_grad_() for z in start]
        s = settings
        if s.step_rule == "adam":
            self.optimizer = torch.optim.Adam(self.latents, lr=s.grad_clip, betas=(s.momentum, 0.999))
        else:
            nesterov = s.step_rule == "nesterov"
            self.optimizer = torch.optim.SGD(self.latents, lr=1.0, momentum=s.momentum, nesterov=nesterov)

    def __call__(self, latents: Pair, grad: Pair) -> Pair:
        """The latents after one step down `grad` (d loss / d latents) from `latents`."""
        s = self.settings
        # Tied, both latents take the same step: a pair that starts equal (from noise) stays equal, as the
        # paper's averaging keeps it; a photo's inversion (x_T != y_T) keeps the difference EDICT needs.
        if s.tied:
            grad = ((grad[0] + grad[1]) / 2,) * 2
        if s.normalized:  # the step no longer depends on the loss's scale (DoodlSettings.normalized)
            grad = tuple(g * (s.grad_clip / g.square().mean().sqrt().clamp_min(1e-30)) for g in grad)
        with torch.no_grad():
            for param, z, g in zip(self.latents, latents, grad):
                param.copy_(z)
                param.grad = self._direction(z, g)
            self.optimizer.step()
            noise = torch.randn(latents[0].shape, generator=self.generator, dtype=torch.float64)
            new = [param.detach() + s.perturbation * noise.to(param) for param in self.latents]
            new = [self._regularized(z, norm) for z, norm in zip(new, self.norms)]
        return new[0], new[1]

    def _direction(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What the step rule's optimizer is given as the gradient."""
        s = self.settings
        if self.regularizer == "norm":
            grad = grad + s.regularizer_weight * norm_penalty_grad(z)
        if s.step_rule == "sgd":
            return (s.learning_rate * grad).clamp(-s.grad_clip, s.grad_clip)
        if s.step_rule == "nesterov":
            grad = s.learning_rate * grad
            most = s.grad_clip * math.sqrt(grad.numel())
            return grad * (most / grad.norm()).clamp(max=1.0)
        return grad

    def _regularized(self, z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        if self.regularizer == "renormalize":
            return z * norm / z.norm()
        if self.regularizer == "white":
            return whiten(z)
        return z
