"""The paste-back's colour match (``compositing.py``, step 3): the generation shifted towards the photo's colours.

A VAE shifts colours by a few levels. Where the generation should reproduce the photo (the ring just outside the
mask), their difference S − G is that shift; spread smoothly over the region by normalised convolution and added
to G, it lets the generated region meet its surroundings at the photo's brightness and colour.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.errors import PFBDiffError
from pfbdiff.photo.regions import support_box

#: Colour-match modes: a smooth local offset field, one offset per channel, or none.
COLOUR_MATCH_MODES = ("local", "mean", "none")
# A VAE shifts colours by a few levels (under 25 of 255 on the bundled model and SD); a ring pixel whose
# generation differs from the source by more (RGB distance) shows content the edit changed, such as a new
# background meeting the kept object, not a shift to correct, and is left out of the colour match.
COLOUR_SHIFT_LIMIT = 40.0


def _gaussian_blur(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a B×C×H×W tensor with reflect-free zero padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = values.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    values = F.conv2d(F.pad(values, (radius, radius, 0, 0)), horizontal, groups=channels)
    return F.conv2d(F.pad(values, (0, 0, radius, radius)), vertical, groups=channels)


def match_colours(generated: np.ndarray, source: np.ndarray, ring: np.ndarray, mode: str = "local",
                  sigma: float | None = None) -> np.ndarray:
    """Shift ``generated`` (H×W×3 float, 0-255) towards ``source`` by their difference measured on ``ring``.

    ``"mean"``: one offset per channel, the mean of S − G over the ring. ``"local"``: the offset field
    D = S − G known on the ring is spread by normalised convolution (Gaussian of width ``sigma``, default a
    quarter of the ring's extent) and added to G: near each part of the edge, the correction is what that
    part of the edge needs. ``"none"``: unchanged. Ring pixels farther than ``COLOUR_SHIFT_LIMIT`` from the
    source are not measured; with none left, G is returned unchanged. Returns float H×W×3.
    """
    if mode not in COLOUR_MATCH_MODES:
        raise PFBDiffError(f"colour match must be one of {', '.join(COLOUR_MATCH_MODES)}, got {mode!r}")
    generated = np.asarray(generated, dtype=np.float32)
    if mode == "none" or not ring.any():
        return generated
    difference = np.asarray(source, dtype=np.float32) - generated
    ring = ring & (np.linalg.norm(difference, axis=-1) <= COLOUR_SHIFT_LIMIT)
    if not ring.any():
        return generated
    if mode == "mean":
        return generated + difference[ring].mean(axis=0)
    if sigma is None:
        box = support_box(ring)
        sigma = max(2.0, 0.25 * max(box.width, box.height))
    # The field is smooth at the scale of sigma: compute it on a grid about sigma / 4 coarser, then upsample.
    return generated + filled(difference, ring, sigma, coarser=max(1, int(sigma // 4)))


def filled(values: np.ndarray, known: np.ndarray, sigma: float, coarser: int = 1) -> np.ndarray:
    """``values`` (H×W×C) known on the bool ``known`` pixels spread over the image by normalised convolution (a
    Gaussian of width ``sigma``, on a grid ``coarser`` times coarser, then upsampled); where no known pixel is
    near, their mean."""
    weight = torch.from_numpy(known.astype(np.float32))[None, None]
    spread = torch.from_numpy(np.ascontiguousarray(values * known[..., None], np.float32)).permute(2, 0, 1)[None]
    if coarser > 1:
        weight, spread = F.avg_pool2d(weight, coarser, ceil_mode=True), F.avg_pool2d(spread, coarser, ceil_mode=True)
    density = _gaussian_blur(weight, sigma / coarser)
    spread = _gaussian_blur(spread, sigma / coarser) / density.clamp_min(1e-6)
    fallback = torch.from_numpy(np.asarray(values, np.float32)[known].mean(axis=0)).view(1, -1, 1, 1)
    field = torch.where(density > 1e-4, spread, fallback)
    if coarser > 1:
        field = F.interpolate(field, size=known.shape, mode="bilinear", align_corners=False)
    return field[0].permute(1, 2, 0).numpy()
