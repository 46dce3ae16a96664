"""Progressive feature blending (docs/method.md §4) and latent blending (§6): PFB-Diff's two mixing operations.

**Feature blending.** At each chosen U-Net block L, the target's feature map h is mixed with the source
image's feature map of the same block: ``h ← m ⊙ h + (1 − m) ⊙ h_src`` with m the edit mask resized to the
block's resolution. Doing this at every chosen level, deep to shallow, is what makes the blending
"progressive": each level starts from already-blended input. The source features come from the inversion
(recorded when the source image was inverted) so the source branch never has to run again.

**Latent blending.** In the first steps of the edit, the latent outside the mask is reset to a reference
latent of the source: ``x ← M ⊙ x + (1 − M) ⊙ z_src``. The paper's reference is the DDIM-inverted source
latent (:func:`inverted_reference`); Blended Latent Diffusion's is the clean source latent forward-noised with
fresh noise (:func:`noised_reference`), which an option lets PFB-Diff use instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.sampling import DDIMGrid, ddim_move


def blend(target: torch.Tensor, source: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ target + (1 − weight) ⊙ source``: exact copies of target where weight is 1, source where 0."""
    return weight * target + (1 - weight) * source


class FeatureBlender:
    """The ``on_block`` hook of the target branch: blends the chosen blocks with the source's features.

    ``source_features`` maps a block L to the source's output of that block for this step (one row per
    image). The target batch holds ``copies`` stacked copies of the images (unconditional and conditional
    rows for classifier-free guidance), and every copy is blended with the same source features.

    ``source_of`` says which source block feeds each blend point; it is the identity except for the
    reference middle-block quirk, where the block before the middle is mixed with the source's middle
    *output* (docs/method.md §9, quirk 1).
    """

    def __init__(self, source_features: dict[int, torch.Tensor], mask: EditMask, points, source_of=None):
        self.source_features = source_features
        self.mask = mask
        self.points = frozenset(points)
        self.source_of = source_of or {}

    def __call__(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if index not in self.points:
            return h
        source = self.source_features[self.source_of.get(index, index)]
        copies = h.shape[0] // source.shape[0]
        weight = self.mask.at(h.shape[-2:], h.dtype)
        return blend(h, source.repeat(copies, 1, 1, 1), weight.repeat(copies, 1, 1, 1))


def latent_blend_is_open(n: int, num_steps: int, s: float) -> bool:
    """The latent-blend gate of step index n: open while n / N > s (strict, docs/method.md §6)."""
    return n / num_steps > s


def blend_latents(x: torch.Tensor, source_latent: torch.Tensor, mask: EditMask) -> torch.Tensor:
    """``M ⊙ x + (1 − M) ⊙ z_src`` with the latent-resolution mask."""
    return blend(x, source_latent, mask.latent.to(x.dtype))


def inverted_reference(source_latents: list[torch.Tensor], one_level_noisier: bool = False) -> Callable:
    """The paper's latent-blend reference of step n: the inverted source latent Z[n − 1], or with the reference
    code's quirk 2 Z[n], one level noisier than the level the step lands on."""

    def at_step(n: int) -> torch.Tensor:
        return source_latents[n if one_level_noisier else max(n - 1, 0)]

    return at_step


def noised_reference(clean: torch.Tensor, grid: DDIMGrid, noise: Callable[[], torch.Tensor]) -> Callable:
    """Blended Latent Diffusion's reference of step n: ``√ᾱ z0 + √(1 − ᾱ) ε`` with ᾱ the level the step lands
    on and ε a fresh draw of ``noise()`` at every step.

    Unlike the inverted latents, these references do not carry the inversion's reconstruction error, and their
    noise is independent of the edit's own latent.
    """

    def at_step(n: int) -> torch.Tensor:
        return ddim_move(clean, noise(), grid.alpha_prev(n))

    return at_step
