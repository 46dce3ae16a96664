"""Rectified flow: the step grid and the ODE solvers that invert and sample a flow-matching model (Flux, SD3), the
counterpart of DDIM for those families (docs/method.md §13).

A flow-matching model predicts a velocity ``v(x, σ) ≈ ε − x₀`` along the straight path ``x_σ = (1 − σ) x₀ + σ ε``,
σ from 0 (the image) to 1 (noise). Inverting a photo integrates ``dx/dσ = v`` from 0 to 1, sampling from 1 to 0,
and the same solvers do both: short pure functions of a ``velocity(x, sigma)`` callable, as k-diffusion's
samplers are. Each takes one step from ``sigma_from`` to ``sigma_to`` and hands a ``carry`` to the next step:

* :func:`euler` — first order, one velocity per step (what KV-Edit and Stable Flow invert with);
* :func:`midpoint` — second order, two velocities per step;
* :func:`fireflow` — second order at about Euler's cost: the half step reuses the previous step's midpoint
  velocity (FireFlow, Deng et al. 2025), so a run of N steps makes N + 1 velocity evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pfbdiff.errors import PFBDiffError

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class FlowGrid:
    """The noise levels of an N-step run: ``sigmas[k]`` is where the k-th latent Z[k] lives, from σ₀ = 0 (the
    clean latent) up to σ_N = 1 (pure noise), as the model's scheduler places them."""

    sigmas: tuple[float, ...]
    num_train_timesteps: int = 1000

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, sigma: float) -> float:
        """The timestep the model is told for ``sigma`` (σ × the training timesteps, as diffusers' schedulers)."""
        return sigma * self.num_train_timesteps

    @classmethod
    def from_scheduler_config(cls, config, num_steps: int, image_seq_len: int | None = None) -> FlowGrid:
        """The grid of a ``FlowMatchEulerDiscreteScheduler`` config, as diffusers' pipeline of the family places
        it: SD3's static ``shift``, or Flux's σ = 1 … 1/N with its resolution-dependent shift (from
        ``image_seq_len`` latent tokens)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if num_steps < 1:
            raise PFBDiffError.about("num_inference_steps", f"must be at least 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
        if scheduler.config.use_dynamic_shifting:  # Flux's pipeline: σ = 1 … 1/N, shifted by μ
            if image_seq_len is None:
                raise PFBDiffError("this model shifts its noise levels by image size: give image_seq_len")
            c = scheduler.config  # μ: a log-shift growing linearly with the number of latent tokens
            mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
        else:  # SD3's pipeline: the scheduler's own N levels between its trained extremes, statically shifted
            scheduler.set_timesteps(num_steps)
        descending = [float(s) for s in scheduler.sigmas]  # σ_N = 1 … σ_1, then the terminal 0
        return cls(tuple(reversed(descending)), int(scheduler.config.num_train_timesteps))


def along_path(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The point at σ on the straight path from ``clean`` to ``noise``: ``(1 − σ) x₀ + σ ε``."""
    return (1 - sigma) * clean + sigma * noise


def split_velocity(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a velocity points between: ``x₀ = x − σ v``, ``ε = x + (1 − σ) v``."""
    return x - sigma * velocity, x + (1 - sigma) * velocity


def euler(velocity: Velocity, x, sigma_from: float, sigma_to: float, carry=None):
    """One Euler step: ``x + h v(x, σ)``."""
    return x + (sigma_to - sigma_from) * velocity(x, sigma_from), None


def midpoint(velocity: Velocity, x, sigma_from: float, sigma_to: float, carry=None):
    """One explicit midpoint step: the velocity half-way, at a point reached by an Euler half step."""
    h = sigma_to - sigma_from
    halfway = x + h / 2 * velocity(x, sigma_from)
    return x + h * velocity(halfway, sigma_from + h / 2), None


def fireflow(velocity: Velocity, x, sigma_from: float, sigma_to: float, carry=None):
    """One FireFlow step: a midpoint step whose half step takes the previous step's midpoint velocity
    (``carry``) instead of a fresh one; the first step, with no ``carry``, evaluates it."""
    h = sigma_to - sigma_from
    slope = velocity(x, sigma_from) if carry is None else carry
    at_midpoint = velocity(x + h / 2 * slope, sigma_from + h / 2)
    return x + h * at_midpoint, at_midpoint


SOLVERS = {"euler": euler, "midpoint": midpoint, "fireflow": fireflow}


def solver_step(name: str):
    """The step function of the solver called ``name``."""
    if name not in SOLVERS:
        raise PFBDiffError.about("solver", f"must be one of {', '.join(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def integrate(velocity: Velocity, x: torch.Tensor, sigmas, solver: str = "fireflow") -> list[torch.Tensor]:
    """The states at every σ of ``sigmas`` (ascending: inversion; descending: sampling), starting from ``x`` at
    ``sigmas[0]``, one ``solver`` step between neighbours."""
    step, states, carry = solver_step(solver), [x], None
    for sigma_from, sigma_to in zip(sigmas[:-1], sigmas[1:]):
        x, carry = step(velocity, x, sigma_from, sigma_to, carry)
        states.append(x)
    return states
