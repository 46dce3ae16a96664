"""DDIM sampling maths: the timestep grid and the deterministic (eta = 0) update, as short pure functions.

PFB-Diff samples with DDIM (docs/method.md §2): ``N`` uniformly spaced timesteps, eta = 0, classifier-free guidance.
The grid is read from the model's own scheduler config through diffusers' ``DDIMScheduler`` so it matches
what the model was trained and released with (``steps_offset``, ``timestep_spacing``, ``set_alpha_to_one``,
zero-terminal-SNR rescaling). Everything else here is a pure function of tensors, so the inversion, the edit
loop and the baselines all share one definition of "one DDIM step".

Model outputs are turned into a pair (predicted clean latent, predicted noise) for every prediction type, so
v-prediction models (SD 2.x, the bundled shapes model) work, and a zero terminal SNR (alpha_bar = 0 at the
last timestep) never divides by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from pfbdiff import checks
from pfbdiff.errors import PFBDiffError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def edit_steps(num_inference_steps: int, strength: float) -> int:
    """K, the steps an edit inverts and regenerates: the last ``strength`` share of the N-step grid, at least one."""
    return max(1, int(num_inference_steps * strength))


@dataclass(frozen=True)
class DDIMGrid:
    """The N-step DDIM timestep grid of a model.

    ``timesteps[n]`` is τ[n] in ascending order (τ[0] is the least noisy step), so step index ``n`` means
    the same thing in the inversion, the edit loop and the gates, exactly as in docs/method.md §2.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor  # ᾱ for every training timestep, float64 on the CPU
    final_alpha_cumprod: float  # ᾱ used after the last step (ᾱ[0] or 1, from the scheduler config)
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_scheduler_config(cls, config, num_inference_steps: int) -> "DDIMGrid":
        named = config.get("_class_name") or ""
        if "FlowMatch" in named or "use_dynamic_shifting" in config or "shift_terminal" in config:
            raise PFBDiffError(
                f"the model's scheduler{f' ({named})' if named else ''} is a flow-matching one (SD3, Flux), which "
                "a DDIM grid cannot be read from; pfbdiff edits diffusion models (Stable Diffusion 1.x and 2.x) so far"
            )
        scheduler = DDIMScheduler.from_config(config)
        checks.steps("num_inference_steps", num_inference_steps, scheduler.config.num_train_timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise PFBDiffError(f"unsupported prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")
        scheduler.set_timesteps(num_inference_steps)
        timesteps = tuple(int(t) for t in reversed(scheduler.timesteps.tolist()))
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        if prediction_type == "epsilon" and float(alphas[max(timesteps)]) == 0.0:
            raise PFBDiffError(
                "this model's schedule has zero terminal SNR but predicts noise (epsilon), which cannot recover "
                "the image at the last step; use a v-prediction model or a schedule without zero terminal SNR"
            )
        return cls(
            timesteps=timesteps,
            alphas_cumprod=alphas,
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            prediction_type=prediction_type,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep])

    def alpha_prev(self, n: int) -> float:
        """ᾱ of the level a denoising step at index n lands on (ᾱ[τ[n-1]], or the final ᾱ for n = 0)."""
        return self.alpha(self.timesteps[n - 1]) if n > 0 else self.final_alpha_cumprod

    def inversion_target(self, k: int) -> int:
        """The timestep inversion step k moves to: the next grid point, clamped to the last training step."""
        if k + 1 < self.num_steps:
            return self.timesteps[k + 1]
        stride = self.num_train_timesteps // self.num_steps
        return min(self.timesteps[k] + stride, self.num_train_timesteps - 1)


def split_prediction(model_output, sample, alpha: float, prediction_type: str):
    """Turn a U-Net output at level ᾱ into (predicted clean latent x̂0, predicted noise ε)."""
    a, b = alpha**0.5, (1.0 - alpha) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        return (sample - b * eps) / a, eps
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    x0 = model_output
    return x0, (sample - a * x0) / b


def ddim_move(x0, eps, alpha_to: float):
    """Place a (x̂0, ε) pair at noise level ᾱ_to: the deterministic DDIM re-noising used in both directions."""
    return alpha_to**0.5 * x0 + (1.0 - alpha_to) ** 0.5 * eps


def ddim_step(model_output, sample, alpha: float, alpha_to: float, prediction_type: str):
    """One DDIM (eta = 0) step from level ᾱ to level ᾱ_to; denoising when ᾱ_to > ᾱ, inverting when smaller."""
    x0, eps = split_prediction(model_output, sample, alpha, prediction_type)
    return ddim_move(x0, eps, alpha_to)


def classifier_free_guidance(uncond, cond, guidance_scale: float):
    """ε = ε_u + w (ε_c − ε_u)."""
    return uncond + guidance_scale * (cond - uncond)
