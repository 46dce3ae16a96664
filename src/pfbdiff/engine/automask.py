"""Automatic edit masks from text: where do the source and target prompts disagree? (DiffEdit-style)

A diffusion model's noise prediction depends on the prompt mostly where the prompt describes the picture.
Noise the source latent z₀ to a middle level t, predict the noise once with the source prompt and once with
the target prompt; where the two predictions differ, the picture would change to follow the target. Averaged
over a few noise draws this difference is a map of the region the edit is about (Couairon et al., DiffEdit,
2022). Here:

    for d = 1 .. D:   x_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε_d          (ε_d seeded, one per draw)
                      Δ_d = | ε̂(x_t, t, c_tgt) − ε̂(x_t, t, c_src) |   averaged over latent channels
    Δ = mean_d Δ_d, smoothed with a 3×3 box
    m = clamp((Δ − q_0.01) / (q_0.99 − q_0.01), 0, 1)    (robust min-max rescale: extreme values removed)
    mask = m > threshold               (default ½)

Predictions are turned into noise estimates ε̂ with :func:`pfbdiff.engine.sampling.split_prediction`, so
v-prediction models work; the U-Net runs through the pipeline's :class:`~pfbdiff.engine.backbones.unet.FeatureUNet`
(no hooks), so its calls are counted with the edit's. Cost: 2·D U-Net rows per image (D = 4 by default).
On a rectified flow (SD3, Flux) the same map comes from the velocities: z₀ is carried to σ = level with
fresh noise and ε̂ = x + (1 − σ) v (:func:`flow_difference_map`).

The estimate is at latent resolution; :func:`upsample_mask` brings it to pixels. When the user also paints a
coarse mask, the estimate is clipped to it: the user mask is a hard outer bound.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.flow import along_path
from pfbdiff.engine.sampling import DDIMGrid, ddim_move, split_prediction
from pfbdiff.errors import PFBDiffError

#: Defaults of the estimate: noise draws, noise level (share of the training steps) and threshold.
DEFAULT_DRAWS = 4
DEFAULT_LEVEL = 0.5
DEFAULT_THRESHOLD = 0.5
DEFAULT_SEED = 0


def _checked(draws: int, level: float) -> None:
    if draws < 1:
        raise PFBDiffError(f"auto-mask needs at least one noise draw, got {draws}")
    if not 0.0 < level < 1.0:
        raise PFBDiffError(f"auto-mask noise level must be in (0, 1), got {level}")


def _averaged_difference(z0: torch.Tensor, draws: int, seed: int, noise_estimates) -> torch.Tensor:
    """Δ: the mean over ``draws`` seeded noises of |ε̂_tgt − ε̂_src| (``noise_estimates(noise)`` gives both),
    averaged over channels and smoothed with a 3×3 box."""
    generator = torch.Generator().manual_seed(int(seed))
    total = torch.zeros((z0.shape[0], 1, *z0.shape[-2:]), dtype=torch.float32, device=z0.device)
    for _ in range(draws):
        noise = torch.randn(tuple(z0.shape), generator=generator, dtype=torch.float32).to(z0.device, z0.dtype)
        eps_source, eps_target = noise_estimates(noise)
        total += (eps_target.float() - eps_source.float()).abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(total / draws, 3, stride=1, padding=1, count_include_pad=False)


@torch.no_grad()
def difference_map(unet, z0: torch.Tensor, source_embeddings: Conditioning, target_embeddings: Conditioning,
                   grid: DDIMGrid, *, draws: int = DEFAULT_DRAWS, level: float = DEFAULT_LEVEL,
                   seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The averaged prediction difference Δ (B×1×h×w, float32), before rescaling and thresholding."""
    _checked(draws, level)
    t = int(round(level * (grid.num_train_timesteps - 1)))
    alpha = grid.alpha(t)
    embeddings = Conditioning.cat([source_embeddings, target_embeddings]).to(z0.dtype)

    def noise_estimates(noise):
        both = torch.cat([ddim_move(z0, noise, alpha)] * 2)
        _, eps = split_prediction(unet(both, t, embeddings), both, alpha, grid.prediction_type)
        return eps.chunk(2)

    return _averaged_difference(z0, draws, seed, noise_estimates)


@torch.no_grad()
def flow_difference_map(velocity, z0: torch.Tensor, *, draws: int = DEFAULT_DRAWS, level: float = DEFAULT_LEVEL,
                        seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Δ on a rectified flow (SD3, Flux): z₀ carried to σ = ``level`` as ``(1 − σ) z₀ + σ ε``, and the noise each
    prompt's velocity points to, ``x + (1 − σ) v``; ``velocity(x, σ)`` runs the source rows, then the target's."""
    _checked(draws, level)

    def noise_estimates(noise):
        both = torch.cat([along_path(z0, noise, level)] * 2)
        return (both + (1 - level) * velocity(both, level)).chunk(2)

    return _averaged_difference(z0, draws, seed, noise_estimates)


def masks_from_difference(difference: torch.Tensor, sizes, threshold: float = DEFAULT_THRESHOLD) -> list[np.ndarray]:
    """Binary auto-masks from Δ, one H×W float32 array per row, at the pixel ``sizes`` (width, height)."""
    soft = rescale(difference)
    return [upsample_mask(soft[i : i + 1], size, threshold) for i, size in enumerate(sizes)]


def rescale(difference: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Δ mapped from its [``low``, ``high``] quantiles (per image) to [0, 1], clamped: a soft auto-mask.

    Subtracting the floor matters: two prompts change the noise prediction a little everywhere, and only
    the excess over that floor marks the region the edit is about.
    """
    flat = difference.flatten(1)
    bottom = torch.quantile(flat, low, dim=1).view(-1, 1, 1, 1)
    top = torch.quantile(flat, high, dim=1).view(-1, 1, 1, 1)
    return ((difference - bottom) / (top - bottom).clamp_min(1e-12)).clamp(0.0, 1.0)


def upsample_mask(soft: torch.Tensor, size: tuple[int, int], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """A latent-resolution soft mask (1×1×h×w) → binary float32 H×W at ``size`` = (width, height)."""
    if not 0.0 <= threshold < 1.0:
        raise PFBDiffError(f"auto-mask threshold must be in [0, 1), got {threshold}")
    width, height = size
    pixels = F.interpolate(soft.float().cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return (pixels[0, 0].numpy() > threshold).astype(np.float32)


def estimate_masks(unet, z0, source_embeddings, target_embeddings, grid, sizes, *, draws=DEFAULT_DRAWS,
                   level=DEFAULT_LEVEL, threshold=DEFAULT_THRESHOLD, seed=DEFAULT_SEED) -> list[np.ndarray]:
    """Binary auto-masks, one H×W float32 array per row of ``z0``, at the pixel ``sizes`` (width, height)."""
    difference = difference_map(unet, z0, source_embeddings, target_embeddings, grid, draws=draws, level=level,
                                seed=seed)
    return masks_from_difference(difference, sizes, threshold)


def clip_to_bound(estimate: np.ndarray, bound: np.ndarray | None) -> np.ndarray:
    """The estimate limited to the user's mask (element-wise minimum): nothing outside the bound is edited."""
    if bound is None:
        return estimate
    return np.minimum(estimate, np.asarray(bound, dtype=np.float32))


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two masks thresholded at ½ (1.0 when both are empty)."""
    a, b = np.asarray(first) >= 0.5, np.asarray(second) >= 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
