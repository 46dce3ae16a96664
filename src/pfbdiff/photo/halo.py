"""Snapping a coarse background mask to the subject: the halo of old background joins the edit.

To replace a background, users paint the region around a subject roughly, or paint the subject generously and
invert it. Either way a band of the *old* background is left between the mask and the subject's outline. Kept
as it is, that band becomes a halo around the subject on the new background, and the colour match and the
paste-back both hold it in place. PFB-Diff itself cannot help: whatever lies outside the mask is the source's.

:func:`absorb_halo` moves the mask's edge onto the outline: starting from the mask, it repeatedly adds the
kept pixels next to it whose colour continues the masked side (RGB distance to some 8-neighbour already in
the mask at most ``HALO_COLOUR_DISTANCE``), for at most ``reach`` pixels. The subject, whose colours differ
from the background around it, stops the growth; patterns grow along their own colours, since a pixel only
has to match one neighbour. Last, the edge pixels that mix the two sides (anti-aliasing, blur), alike neither
to the masked side nor to any kept neighbour, join too. The ``background`` preset turns it on (``EditConfig.halo``); the paste-back then
uses a hard edge there, because the new edge is a real one (a feather band would blend the old background
back in).
"""

from __future__ import annotations

import numpy as np

# RGB distance (0-255 levels) within which a kept pixel continues the masked surface. Neighbouring pixels of
# one surface differ by noise and shading (under ~20 in photos and in ShapesWorld's anti-aliasing); a subject's
# edge against its background differs by far more.
HALO_COLOUR_DISTANCE = 30.0

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(values: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``values`` moved so that ``out[y, x] = values[y + dy, x + dx]``, ``fill`` beyond the border."""
    out = np.full_like(values, fill)
    h, w = values.shape[:2]
    out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = values[max(dy, 0):h + min(dy, 0),
                                                                         max(dx, 0):w + min(dx, 0)]
    return out


def absorb_halo(mask: np.ndarray, image: np.ndarray, reach: int,
                distance: float = HALO_COLOUR_DISTANCE) -> np.ndarray:
    """``mask`` (H×W in [0, 1]) grown into the pixels of ``image`` (H×W×3) that continue the masked side's
    colours, at most ``reach`` pixels (8-connected steps) beyond it, plus the mixed edge pixels met there.
    The mask's own values are kept; added pixels are 1."""
    mask = np.asarray(mask, dtype=np.float32)
    if reach <= 0:
        return mask
    pixels = np.asarray(image, dtype=np.float32)
    inside = mask > 0.5
    steps = {offset: np.linalg.norm(pixels - _shifted(pixels, *offset, 0.0), axis=-1) <= distance
             for offset in _NEIGHBOURS}
    grown = inside.copy()
    for _ in range(reach):
        added = _neighbours_in(grown, steps) & ~grown
        if not added.any():
            break
        grown |= added
    # An anti-aliased or blurred edge pixel mixes the two sides; left out, it would stay as a thin outline of the
    # old background. Such pixels run side by side along the edge, so each is compared with the kept pixels
    # behind it only, and joins when it is like none of them.
    edge = ~grown & _neighbours_in(grown, None)
    grown |= edge & ~_neighbours_in(~grown & ~edge, steps)
    return np.maximum(mask, grown.astype(np.float32) * ~inside)


def _neighbours_in(region: np.ndarray, similar: dict | None) -> np.ndarray:
    """Pixels with an 8-neighbour in ``region`` (whose colour is alike, per ``similar``, when it is given)."""
    found = np.zeros_like(region)
    for offset in _NEIGHBOURS:
        near = _shifted(region, *offset, False)
        found |= near if similar is None else near & similar[offset]
    return found
