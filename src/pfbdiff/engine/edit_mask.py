"""The edit mask at every resolution the method needs it (docs/method.md §7).

PFB-Diff uses one user mask (1 = regenerate from the target prompt, 0 = keep the source) at three places:
the latent blend (latent resolution), the feature blend (each blend point's resolution) and the attention
mask (each masked cross-attention's resolution, thresholded). :class:`EditMask` holds the mask at latent
resolution and derives the others, caching them per size.

Two resize modes:

* ``"area"`` (default): area averaging. Values stay in [0, 1], a soft (grey) mask stays soft, and a mask
  region keeps its area at every level.
* ``"bicubic"`` (reference): bicubic, ``align_corners=False``, no antialiasing, no clamping, as the official
  code does. Values overshoot to about [-0.2, 1.2] at region edges, and thin parts can vanish when
  downsampling. Exact 0 and 1 stay exact in constant regions.

The latent mask itself is either the area-resized user mask (``"soft"``) or, in reference mode
(``"binary"``), a Lanczos resize thresholded at 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pfbdiff.engine.presets import RESIZE_MODES


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a B×1×H×W mask to ``size`` = (H, W) with the given mode (see module docstring)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mode == "area":
        return F.adaptive_avg_pool2d(mask, size) if _shrinks(mask, size) else F.interpolate(mask, size, mode="bilinear")
    return F.interpolate(mask, size, mode="bicubic", align_corners=False)


def _shrinks(mask, size) -> bool:
    return mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]


def latent_mask_from_pixels(pixel_mask: torch.Tensor, latent_size: tuple[int, int], mode: str) -> torch.Tensor:
    """The mask at latent resolution: area-averaged (``soft``) or Lanczos + threshold 0.5 (``binary``)."""
    if mode == "soft":
        return resize_mask(pixel_mask, latent_size, "area").clamp(0, 1)
    rows = []
    for single in pixel_mask[:, 0].float().cpu().numpy():
        image = Image.fromarray(single.astype(np.float32), mode="F")
        resized = np.asarray(image.resize(latent_size[::-1], Image.LANCZOS))
        rows.append(torch.from_numpy((resized > 0.5).astype(np.float32)))
    return torch.stack(rows)[:, None].to(pixel_mask.device, pixel_mask.dtype)


class EditMask:
    """One mask per image at latent resolution, with cached resized and thresholded versions.

    Two optional cores, each the mask less a band along its edge, act once the layout is settled: ``core``
    (``word_inset``, docs/method.md §5), where the words confined to this region act, and ``latent_core``
    (``latent_inset``, §6), what the latent blend regenerates. Feature blending always uses the mask itself."""

    def __init__(self, latent: torch.Tensor, resize_mode: str = "area", core: "EditMask | None" = None,
                 latent_core: "EditMask | None" = None):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"mask resize mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.latent = latent  # B×1×h×w
        self.resize_mode = resize_mode
        self.core = core
        self.latent_core = latent_core
        self._soft: dict[tuple, torch.Tensor] = {}
        self._binary: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_pixels(cls, pixel_mask, latent_size, latent_mode="soft", resize_mode="area") -> "EditMask":
        return cls(latent_mask_from_pixels(pixel_mask, latent_size, latent_mode), resize_mode)

    def at(self, size, dtype=None) -> torch.Tensor:
        """The blend weight m at feature resolution ``size`` (B×1×H×W), in the configured resize mode."""
        key = (tuple(size), dtype)
        if key not in self._soft:
            resized = resize_mask(self.latent.float(), tuple(size), self.resize_mode)
            self._soft[key] = resized.to(dtype or self.latent.dtype)
        return self._soft[key]

    def binary_at(self, size) -> torch.Tensor:
        """The thresholded mask (> 0.5) at ``size``, used where a yes/no decision is needed (attention)."""
        return self.covering(size, 0.5)

    def covering(self, size, share: float) -> torch.Tensor:
        """The cells at ``size`` that the mask covers by more than ``share`` (bool B×1×H×W)."""
        key = (tuple(size), float(share))
        if key not in self._binary:
            self._binary[key] = self.at(size, torch.float32) > share
        return self._binary[key]

    def union(self, other: "EditMask") -> "EditMask":
        """Both regions; a core is kept where both masks have one (the union of the cores)."""
        def cores(name):
            mine, theirs = getattr(self, name), getattr(other, name)
            return None if mine is None or theirs is None else mine.union(theirs)

        return EditMask(torch.maximum(self.latent, other.latent), self.resize_mode, cores("core"), cores("latent_core"))

    def repeated(self, repeats: int) -> "EditMask":
        """Each image's mask ``repeats`` times, for several edits of one image."""
        if repeats == 1:
            return self
        def core(mask):
            return None if mask is None else mask.repeated(repeats)

        return EditMask(self.latent.repeat_interleave(repeats, 0), self.resize_mode, core(self.core), core(self.latent_core))

    def latent_blended(self, settled: bool) -> "EditMask":
        """The region the latent blend regenerates: once the layout is ``settled``, the latent core if there is one."""
        return self.latent_core if settled and self.latent_core is not None else self

    def complement(self) -> "EditMask":
        return EditMask(1 - self.latent, self.resize_mode)
