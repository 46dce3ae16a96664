"""The kept subject's ghost after a background edit: a larger copy of it beside it gives way to the new background.

A model draws the caption's objects at the sizes it learned. In a background edit the subject is kept (its words,
features and latent held to it: docs/method.md §5), and the paste-back puts its exact pixels back, but the model
still often draws it larger, or again right beside it. Around the pasted subject that copy stays as a ghost, merged
with it to the eye: on ShapesBench most of the background edits that still failed (README). The outline rules
(``outline.py``) clear the first pixels beside the subject; this one clears the whole copy.

Ghost pixels (:func:`ghost_of`) are generated pixels of the edit region alike some colour of the kept subject
(within :data:`GHOST_COLOUR_DISTANCE`) and unlike every colour of the new background farther out, joined to the
subject through such pixels, at most the preset's ``ghost_reach`` (a share of the box's shorter side) away from it;
the copy's soft rim, :data:`GHOST_RIM` of that side, goes with them. They are filled with the new background's own pattern
(:func:`pattern_fill`): each takes the pixel at the offset at which the new background around them best repeats
itself, so stripes and checks run on through the hole instead of a blur; what no offset reaches is filled from its
neighbours ring by ring.
"""

from __future__ import annotations

import numpy as np

from pfbdiff.photo.colours import unlike_all
from pfbdiff.photo.morphology import dilated, grown_along, shifted, support_window
from pfbdiff.photo.outline import beside_subject, filled_inwards

#: A ghost pixel is within this RGB distance of some colour of the kept subject: the model's copy is drawn in the
#: subject's colour, but softer (a blurred copy mixes with the new background more than an outline pixel does).
GHOST_COLOUR_DISTANCE = 45.0
#: The ghost's soft rim taken with it, as a share of the box's shorter side (3 px at a 64-px model size).
GHOST_RIM = 0.05


def without_ghost(pasted: np.ndarray, alpha: np.ndarray, outline: np.ndarray, edit: np.ndarray,
                  reach: float) -> np.ndarray:
    """``pasted`` (uint8 H×W×3, the edit put back) with the kept subject's ghost, up to ``reach`` of the box's
    shorter side from it (the preset's ``ghost_reach``), filled with the new background's pattern. ``edit``: the
    edit region (bool), ``outline`` the subject's outline in it; only pixels with ``alpha`` 1 change."""
    side = min(pasted.shape[:2])
    pixels = max(2, round(reach * side))  # the ghost's reach, and the farthest offset the pattern fill looks at
    ghost = ghost_of(pasted, alpha, outline, edit, pixels)
    if ghost is None:
        return pasted
    generated = (np.asarray(alpha) >= 1) & np.asarray(edit, bool) & ~np.asarray(outline, bool)
    hole = dilated(ghost, max(1, round(GHOST_RIM * side))) & generated
    values = pattern_fill(pasted.astype(np.float32), generated & ~hole, hole, max_shift=pixels)
    out = np.array(pasted, copy=True)
    out[hole] = np.clip(np.round(values[hole]), 0, 255).astype(np.uint8)
    return out


def ghost_of(pasted: np.ndarray, alpha: np.ndarray, outline: np.ndarray, edit: np.ndarray,
             reach: int) -> np.ndarray | None:
    """The ghost's pixels (bool H×W; None when there are none): generated pixels within ``reach`` of the kept
    subject, joined to it through each other, alike its colours and unlike the new background farther out."""
    edit, outline = np.asarray(edit, bool), np.asarray(outline, bool)
    generated = np.asarray(alpha) >= 1
    near, farther = (region & generated for region in beside_subject(edit, outline, reach))
    subject = ~edit & ~outline
    if not near.any() or not farther.any() or not subject.any():
        return None
    values = np.asarray(pasted, np.float32)
    candidate = np.zeros_like(near)
    candidate[near] = (~unlike_all(values[near], values[subject], GHOST_COLOUR_DISTANCE)
                       & unlike_all(values[near], values[farther]))
    ghost = grown_along(~edit | outline, None, limit=reach, within=candidate) & candidate
    return ghost if ghost.any() else None


def pattern_fill(values: np.ndarray, known: np.ndarray, hole: np.ndarray, max_shift: int) -> np.ndarray:
    """``values`` (H×W×3 float) with the ``hole`` pixels copied from the ``known`` ones at the offset at which the
    known pixels around the hole best repeat themselves (:func:`best_offset`), stepping along it both ways as often
    as it takes; the rest filled from neighbours ring by ring (``outline.filled_inwards``)."""
    values, known = values.copy(), np.asarray(known, bool).copy()
    hole = np.asarray(hole, bool)
    offset = best_offset(values, known, hole, max_shift)
    if offset is not None:
        height, width = hole.shape
        for k in range(1, max(height, width)):
            todo = hole & ~known
            if not todo.any() or abs(k * offset[0]) >= height or abs(k * offset[1]) >= width:
                break
            for dy, dx in ((k * offset[0], k * offset[1]), (-k * offset[0], -k * offset[1])):
                source_known, source_values = shifted(known, dy, dx, False), shifted(values, dy, dx, 0.0)
                take = hole & ~known & source_known
                values[take] = source_values[take]
                known |= take
    return filled_inwards(values, known, hole & ~known)


def best_offset(values: np.ndarray, known: np.ndarray, hole: np.ndarray, max_shift: int) -> tuple[int, int] | None:
    """The offset (dy, dx), 2 ≤ max(|dy|, |dx|) ≤ ``max_shift``, with the least mean squared difference between the
    known pixels within 2 × ``max_shift`` of the hole and the known pixels that far from them, over offsets where
    at least half of them have such a partner; None when none has. Shorter offsets than 2 px only find the
    image's smoothness, not its pattern. All offsets at once, as correlations by FFT."""
    window = support_window(hole, 3 * max_shift)
    if window is None:
        return None
    region = known[window.slices] & dilated(hole, 2 * max_shift)[window.slices]
    if not region.any():
        return None
    pixels = values[window.slices] * region[..., None]
    squares = (pixels ** 2).sum(-1)
    weight = region.astype(np.float64)
    count = _correlation(weight, weight, max_shift)
    error = (_correlation(squares, weight, max_shift) + _correlation(weight, squares, max_shift)
             - 2 * sum(_correlation(pixels[..., c], pixels[..., c], max_shift) for c in range(3)))
    shifts = np.arange(-max_shift, max_shift + 1)
    far_enough = np.maximum(np.abs(shifts)[:, None], np.abs(shifts)[None, :]) >= 2
    usable = far_enough & (count >= 0.5 * weight.sum())
    if not usable.any():
        return None
    mean_error = np.where(usable, error / np.maximum(count, 1e-9), np.inf)
    dy, dx = np.unravel_index(np.argmin(mean_error), mean_error.shape)
    return int(shifts[dy]), int(shifts[dx])


def _correlation(a: np.ndarray, b: np.ndarray, max_shift: int) -> np.ndarray:
    """``c[dy, dx] = Σ_p a(p)·b(p + d)`` for |dy|, |dx| ≤ ``max_shift`` (indices shifted by ``max_shift``), with
    nothing beyond the arrays' edges."""
    height, width = a.shape
    shape = (height + max_shift, width + max_shift)
    full = np.fft.irfft2(np.conj(np.fft.rfft2(a, shape)) * np.fft.rfft2(b, shape), shape)
    rows = np.arange(-max_shift, max_shift + 1) % shape[0]
    cols = np.arange(-max_shift, max_shift + 1) % shape[1]
    return full[np.ix_(rows, cols)]
