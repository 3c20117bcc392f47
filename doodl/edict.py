"""EDICT: exactly invertible sampling with two coupled latents (Wallace et al., CVPR 2023).

Each step is two additive coupling half-steps and a mixing layer (Eq. 5); `edict_unstep` is its exact
mirror (Eq. 6). Every function here is a pure function of a predictor `eps(latents, t)`, so the same code
samples, inverts real images and rebuilds inputs during the reversible backward pass.

A half-step is affine in the latent it updates, `x' = a x + b f(y, t)`, and the coupling needs nothing
else: DDIM's coefficients on a noise prediction (`edict_schedule`) and a flow's Euler step on a velocity,
a = 1 and b = sigma_next - sigma (`flow_schedule`), run through the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

# A model's timestep: an integer of a DDIM schedule, or a flow's noise level times its training timesteps;
# handed to a predictor as a 0-dim tensor on the model's device once the schedule is `on` it.
Timestep = int | float | torch.Tensor
# eps(latents, t) -> the model's prediction (noise, or a flow's velocity), in the latents' dtype. The
# sampler is written against this callable alone, so that it never depends on how a model is loaded
# (doodl.pipeline and doodl.flow build one).
NoisePredictor = Callable[[torch.Tensor, Timestep], torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EdictSchedule:
    """Timesteps and the coefficients a_t, b_t of every step's half-steps `a x + b f(y, t)`, computed once."""

    timesteps: tuple[int | float, ...]  # descending: the order of denoising
    a: tuple[float, ...]  # DDIM: sqrt(abar_prev / abar_t); flow: 1
    b: tuple[float, ...]  # DDIM: sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t); flow: ds
    p: float  # mixing weight
    leapfrog: bool  # alternate which latent of the pair is updated first
    # The timesteps as 0-dim tensors on the model's device (`on`), what the predictor is handed; empty:
    # the numbers themselves.
    tensors: tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, i: int) -> Timestep:
        """What the predictor is handed at step i: the device tensor of `on`, else the number."""
        return self.tensors[i] if self.tensors else self.timesteps[i]

    def on(self, device: str | torch.device) -> EdictSchedule:
        """This schedule with its timesteps also as tensors on `device`, made in one copy. A denoiser handed
        a Python number makes a device tensor of it at every call: a synchronous host-to-device copy, and,
        compiled, a graph per timestep."""
        return replace(self, tensors=torch.tensor(self.timesteps).to(device).unbind())

    def swapped(self, i: int) -> bool:
        """Whether step i updates y before x (the official EDICT code alternates on odd steps)."""
        return self.leapfrog and i % 2 == 1

    def last(self, n: int) -> EdictSchedule:
        """The schedule of the last `n` steps alone: the chain from timestep `timesteps[-n]` to x_0, which
        inverts an image only part of the way to noise (img2img's strength)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"a schedule of {len(self)} steps has no last {n} steps")
        k = len(self) - n
        return EdictSchedule(
            self.timesteps[k:], self.a[k:], self.b[k:], self.p, self.leapfrog, self.tensors[k:]
        )


def edict_schedule(
    scheduler: DDIMScheduler, steps: int = 50, p: float = 0.93, leapfrog: bool = True
) -> EdictSchedule:
    """The EDICT schedule for `steps` denoising steps of a DDIM noise schedule."""
    check_steps(steps, p)
    if steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be at most {scheduler.config.num_train_timesteps}, got {steps}")
    timesteps = sampling_timesteps(scheduler, steps)
    ddim = DDIMScheduler.from_config(scheduler.config)  # the DDIM noise schedule, whatever the scheduler
    abar = ddim.alphas_cumprod.double()
    final = torch.as_tensor(ddim.final_alpha_cumprod).double()  # after the last step: set_alpha_to_one
    # Each step lands on the next timestep of the list, so that unevenly spaced schedules ("trailing" 3
    # steps: 999, 666, 332; "linspace") visit exactly the timesteps they list. For "leading" spacing the
    # list is evenly spaced and this is diffusers' `t - num_train_timesteps // steps`.
    abar_prevs = [abar[t] for t in timesteps[1:]] + [final]
    a, b = [], []
    for t, abar_prev in zip(timesteps, abar_prevs, strict=True):
        abar_t = abar[t]
        a.append(float((abar_prev / abar_t).sqrt()))
        b.append(float((1 - abar_prev).sqrt() - (abar_prev * (1 - abar_t) / abar_t).sqrt()))
    return EdictSchedule(timesteps=timesteps, a=tuple(a), b=tuple(b), p=p, leapfrog=leapfrog)


def flow_schedule(
    scheduler: FlowMatchEulerDiscreteScheduler,
    steps: int,
    p: float = 0.93,
    leapfrog: bool = True,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> EdictSchedule:
    """The coupled schedule of `steps` Euler steps of a flow-matching scheduler: x' = x + (s' - s) v(x, t).

    The noise levels are the scheduler's own for the arguments its pipeline passes: `sigmas` before the
    shift (FLUX: evenly spaced from 1 to 1/steps; SD3: the scheduler's default), `mu` the resolution-
    dependent shift of a scheduler that asks for one (`use_dynamic_shifting`, FLUX.1-dev).
    """
    check_steps(steps, p)
    flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # set_timesteps mutates it
    flow.set_timesteps(steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
    levels = flow.sigmas.tolist()  # steps + 1 noise levels, the last 0
    return EdictSchedule(
        timesteps=tuple(flow.timesteps.tolist()),
        a=(1.0,) * steps,
        b=tuple(after - before for before, after in zip(levels, levels[1:])),
        p=p,
        leapfrog=leapfrog,
    )


def check_steps(steps: int, p: float) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < p <= 1:
        raise ValueError(f"the mixing weight p must be in (0, 1], got {p}")


def sampling_timesteps(scheduler: DDIMScheduler, steps: int) -> tuple[int, ...]:
    """The descending timesteps of `steps` DDIM steps, spaced as the scheduler's config says.

    `timestep_spacing` is "leading" (SD 1.x / 2.x: 981, 961, ..., 1 at 50 steps), "trailing" (few-step
    models such as SD-Turbo: one step starts from 999) or "linspace", exactly as diffusers spaces them.
    """
    # A private copy: set_timesteps mutates the scheduler, which the caller may share.
    ddim = DDIMScheduler.from_config(scheduler.config)
    try:
        ddim.set_timesteps(steps)
    except ValueError as error:
        raise ValueError(
            f"cannot space {steps} steps with timestep_spacing={ddim.config.timestep_spacing!r} from the "
            f"model's scheduler config: use 'leading', 'trailing' or 'linspace' ({error})"
        ) from error
    timesteps = tuple(int(t) for t in ddim.timesteps)
    if timesteps[0] >= ddim.config.num_train_timesteps or timesteps[-1] < 0:
        raise ValueError(
            f"{steps} steps with steps_offset={ddim.config.steps_offset} reach timestep {timesteps[0]}, "
            f"beyond the model's {ddim.config.num_train_timesteps} training timesteps: use fewer steps"
        )
    return timesteps


def mix(x: torch.Tensor, y: torch.Tensor, p: float) -> Pair:
    """The mixing layer that keeps the two latents close."""
    x = p * x + (1 - p) * y
    return x, p * y + (1 - p) * x


def unmix(x: torch.Tensor, y: torch.Tensor, p: float) -> Pair:
    y = (y - (1 - p) * x) / p
    return (x - (1 - p) * y) / p, y


def edict_step(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule, i: int) -> Pair:
    """Denoise step i of the schedule (Eq. 5): two coupling half-steps, then mixing."""
    t, a, b = s.timestep(i), s.a[i], s.b[i]
    first, second = (y, x) if s.swapped(i) else (x, y)
    first = a * first + b * eps(second, t)
    second = a * second + b * eps(first, t)
    x, y = (second, first) if s.swapped(i) else (first, second)
    return mix(x, y, s.p)


def edict_unstep(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule, i: int) -> Pair:
    """The exact inverse of `edict_step` (Eq. 6): unmix, then undo the half-steps in reverse order."""
    t, a, b = s.timestep(i), s.a[i], s.b[i]
    x, y = unmix(x, y, s.p)
    first, second = (y, x) if s.swapped(i) else (x, y)
    second = (second - b * eps(first, t)) / a
    first = (first - b * eps(second, t)) / a
    return (second, first) if s.swapped(i) else (first, second)


def edict_denoise(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule) -> Pair:
    """Run the whole chain from (x_T, y_T) to (x_0, y_0)."""
    for i in range(len(s)):
        x, y = edict_step(eps, x, y, s, i)
    return x, y


def edict_invert(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule) -> Pair:
    """Run the chain backwards from (x_0, y_0) to the (x_T, y_T) that regenerates them."""
    for i in reversed(range(len(s))):
        x, y = edict_unstep(eps, x, y, s, i)
    return x, y


# --- few-step chains ------------------------------------------------------------------------------

# Below this many steps EDICT's coupled chain is no longer the model's own sample: its second half-step
# calls the UNet at timestep t on a latent already moved far towards t-1, which a small step forgives and a
# large one does not (tests/test_few_step.py: at 1, 2 and 4 steps EDICT's x_0 is more than 10 % away from
# the DDIM sample of the same noise). Few-step models (SD-Turbo: 1-4 steps) are sampled by plain DDIM
# instead, whose few step inputs are cheap to store for the gradient.
FEW_STEPS = 10


def ddim_step(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule, i: int) -> Pair:
    """Step i of the model's plain chain on x, with EDICT's coefficients: x' = a x + b eps(x), DDIM (eta 0)
    on a noise predictor, Euler on a flow's velocity. The pair's second latent is x' too, so that a chain
    of pairs carries one sample."""
    x = s.a[i] * x + s.b[i] * eps(x, s.timestep(i))
    return x, x


def ddim_denoise(eps: NoisePredictor, x: torch.Tensor, y: torch.Tensor, s: EdictSchedule) -> Pair:
    """The whole plain chain (DDIM, or a flow's Euler) from x_T (y_T is not used): (x_0, x_0)."""
    for i in range(len(s)):
        x, y = ddim_step(eps, x, y, s, i)
    return x, x
