"""DDIM inversion of the source image (docs/method.md §2), recording the source features the edit will blend in.

The source trajectory is not made by adding fresh noise: the clean latent Z[0] is walked *up* the DDIM grid
with the source prompt, conditional only (no classifier-free guidance)::

    for k = 0 .. K-1:   t = τ[k],  t' = next grid point (clamped to the last training step)
        ε, x̂0 = U-Net(Z[k], t, c_src)
        Z[k+1] = √ᾱ_t' · x̂0 + √(1 − ᾱ_t') · ε

All K + 1 latents are kept. The edit's source branch at step n would run the U-Net on exactly
(Z[n], τ[n], c_src), the input of inversion step n, so the source features it needs are recorded here once
(docs/method.md §2) and an :class:`Inversion` can serve any number of edits of the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pfbdiff.engine.backbones.unet import FeatureUNet
from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.sampling import DDIMGrid, ddim_step


class FeatureRecorder:
    """``on_block`` hook that keeps the outputs of the chosen blocks and changes nothing."""

    def __init__(self, blocks):
        self.blocks = frozenset(blocks)
        self.features: dict[int, torch.Tensor] = {}

    def __call__(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if index in self.blocks:
            self.features[index] = h
        return h


@dataclass
class Inversion:
    """A source image inverted once, reusable for many edits.

    ``latents[k]`` is Z[k] (Z[0] the clean latent) and ``features[n]`` the source's outputs of the recorded
    blocks at step n. ``image`` is the prepared source image in [-1, 1] at model size: the part of the input
    inside ``crop_box`` (the whole input when not cropped). ``source_images`` are the inputs as given (RGB,
    full size), kept for the pixel-exact paste-back.
    """

    latents: list[torch.Tensor]
    features: list[dict[int, torch.Tensor]]
    recorded_blocks: frozenset[int]
    grid: DDIMGrid
    source_embeddings: Conditioning  # the source prompts, as encoded for the inversion
    source_prompt: list[str]
    image: torch.Tensor
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crop_box: object = None  # photo.regions.CropBox of the inverted part, None = the whole image
    source_images: list = field(default_factory=list)
    size_ids: str = "model"  # SDXL's size-id policy the source was encoded with (EditConfig.size_ids)

    @property
    def inverted_steps(self) -> int:
        """K: how many steps were inverted (the grid has N)."""
        return len(self.latents) - 1

    @property
    def batch_size(self) -> int:
        return self.latents[0].shape[0]


@torch.no_grad()
def ddim_invert(unet: FeatureUNet, z0, source_embeddings, grid: DDIMGrid, inverted_steps: int, record_blocks=(),
                callback=None):
    """Invert ``z0`` for K = ``inverted_steps`` steps; returns (latents Z[0..K], recorded features per step)."""
    latents, features = [z0], []
    for k in range(inverted_steps):
        t = grid.timesteps[k]
        recorder = FeatureRecorder(record_blocks)
        output = unet(latents[k], t, source_embeddings, on_block=recorder)
        latents.append(ddim_step(output, latents[k], grid.alpha(t), grid.alpha(grid.inversion_target(k)), grid.prediction_type))
        features.append(recorder.features)
        if callback is not None:
            callback(k)
    return latents, features
