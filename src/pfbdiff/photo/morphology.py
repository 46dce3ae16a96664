"""Morphology on masks: square windows, and growth from neighbour to neighbour.

The paste-back grows the user's mask (``grow``), takes rings around it (colour match, feather band) and reaches
past it; all use :func:`grow_mask` (soft values kept) or, on yes/no regions, :func:`dilated`. The confined words act
on the mask's core (:func:`mask_core`). The pixel rules that follow a surface (the halo, new content, the ghost)
grow a region one 8-neighbour at a time where the colours say so (:func:`grown_along`).
"""

from __future__ import annotations

import math

import numpy as np

from pfbdiff.photo.regions import CropBox, support_box


def support_window(mask: np.ndarray, radius: int) -> CropBox | None:
    """The support box of ``mask`` widened by ``radius`` on each side (clipped to the array)."""
    box = support_box(mask)
    if box is None:
        return None
    height, width = mask.shape
    return CropBox(max(box.left - radius, 0), max(box.top - radius, 0),
                   min(box.right + radius, width), min(box.bottom + radius, height))


def grow_mask(mask: np.ndarray, pixels: float) -> np.ndarray:
    """Dilate (``pixels`` > 0) or erode (< 0) an H×W mask with a (2r+1)² square window, r = round(|pixels|).

    Soft values are kept: dilation takes the window maximum, erosion the minimum. The image border does not
    erode (pixels beyond it are ignored, not counted as black). Work is confined to the mask's neighbourhood,
    so a small mask in a large photo is cheap, and a wide window costs about log r passes, not r².
    """
    radius = int(round(abs(pixels)))
    mask = np.asarray(mask, dtype=np.float32)
    window = support_window(mask, radius)
    if radius == 0 or window is None:
        return mask.copy()
    extreme = np.maximum if pixels > 0 else np.minimum
    part = _window_extreme(_window_extreme(mask[window.slices], radius, 0, extreme), radius, 1, extreme)
    out = np.zeros_like(mask) if pixels > 0 else mask.copy()
    out[window.slices] = part
    return out


def _window_extreme(values: np.ndarray, radius: int, axis: int, extreme) -> np.ndarray:
    """The maximum or minimum (``extreme``) of ``values`` over the 2r + 1 positions around each one along ``axis``,
    positions past the ends ignored. Windows of doubling length (a sparse table) cover any length with two of them."""
    identity = -np.inf if extreme is np.maximum else np.inf
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    table = np.pad(values, pad, constant_values=identity)
    length, span = 2 * radius + 1, 1
    while 2 * span <= length:
        table = extreme(np.take(table, range(0, table.shape[axis] - span), axis),
                        np.take(table, range(span, table.shape[axis]), axis))
        span *= 2
    size = values.shape[axis]
    return extreme(np.take(table, range(0, size), axis), np.take(table, range(length - span, length - span + size), axis))


def share_of_size(mask: np.ndarray, share: float) -> int:
    """``share`` of ``mask``'s size in pixels: of the square root of its area where it is above one half, rounded."""
    return int(round(share * math.sqrt(float((np.asarray(mask) > 0.5).sum())))) if share > 0 else 0


def mask_core(mask: np.ndarray, share: float) -> np.ndarray:
    """``mask`` less a band along its edge ``share`` of its size wide (:func:`share_of_size`); the mask itself where
    that would leave nothing, so a thin mask keeps its words."""
    core = grow_mask(mask, -share_of_size(mask, share))
    return core if (core > 0.5).any() else np.asarray(mask, dtype=np.float32).copy()


#: The eight neighbours of a pixel, as (dy, dx) offsets.
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def dilated(region: np.ndarray, steps: int) -> np.ndarray:
    """``region`` (bool) grown by ``steps`` 8-connected pixels: the square window of :func:`grow_mask`."""
    return grow_mask(np.asarray(region, np.float32), steps) > 0


def shifted(values: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``values`` moved so that ``out[y, x] = values[y + dy, x + dx]``, ``fill`` beyond the border."""
    out = np.full_like(values, fill)
    h, w = values.shape[:2]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = values[max(dy, 0):h + min(dy, 0),
                                                                         max(dx, 0):w + min(dx, 0)]
    return out


def neighbours_in(region: np.ndarray, similar: dict | None) -> np.ndarray:
    """Pixels with an 8-neighbour in ``region`` (whose colour is alike, per ``similar``: offset → bool H×W, when it
    is given)."""
    found = np.zeros_like(region)
    for offset in NEIGHBOURS:
        near = shifted(region, *offset, False)
        found |= near if similar is None else near & similar[offset]
    return found


def grown_along(region: np.ndarray, steps: dict | None, limit: int | None = None,
                within: np.ndarray | None = None) -> np.ndarray:
    """``region`` grown one 8-neighbour at a time where ``steps`` says the colours are alike (:func:`neighbours_in`;
    ``None``: everywhere), only into ``within`` when given, at most ``limit`` times (``None``: until nothing more
    joins)."""
    grown = region.copy()
    passes = 0
    while limit is None or passes < limit:
        added = neighbours_in(grown, steps) & ~grown
        if within is not None:
            added &= within
        if not added.any():
            break
        grown |= added
        passes += 1
    return grown
