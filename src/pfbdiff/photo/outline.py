"""The kept subject's outline after a background edit: its edge pixels unmixed from the old background.

A subject meets its background in pixels that mix the two (anti-aliasing, blur, hair). The halo (``halo.py``)
finds them along the outline it snaps to: alike neither the old background nor the subject, they join the edit
last. Kept as the photo's, they would draw a thin line of the old background's colour around the subject on the
new background; generated, they take whatever the model drew right beside the subject, often a fringe of its
colour or a dark ring, and the subject seems to grow. Instead each outline pixel keeps its subject share and
swaps its old-background share for the new background:

    P = a·F + (1 − a)·B_old   →   P + α·(B_new − B_old) = a·F + (1 − a)·B_new,   α = 1 − a

with F the subject's colour (the mean of the pixel's kept 8-neighbours in the photo), B_old the old background's
(the mean of its 8-neighbours inside the edit region, in the photo), ``a`` from where P lies on the line from
B_old to F, and B_new the new background filled in from the generation more than a pixel away from the subject
(so the model's fringe right beside it is not what comes in). α, the old background's share, is the pixel's
paste-back alpha; it depends on the photo alone, so it is known before the generation.

Beyond the outline the model's echo of the subject can stay: within ``ECHO_REACH`` pixels of it, generated pixels
whose colour is found nowhere in the new background farther out (a fringe of the subject's colour, a dark ring, a
bump) take the new background from their neighbours instead, filled in ring by ring from outside
(:func:`without_echo`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.photo.colours import COLOUR_DISTANCE, unlike_all
from pfbdiff.photo.morphology import dilated

#: How far (pixels) beside the kept subject the new background is cleared of the subject's echo.
ECHO_REACH = 2


def _neighbour_mean(values: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean of ``values`` (H×W×3) over each pixel's 3×3 neighbourhood restricted to ``where``, and whether
    that neighbourhood holds any such pixel."""
    stacked = np.concatenate([values * where[..., None], where[..., None]], axis=-1).astype(np.float32)
    sums = F.avg_pool2d(F.pad(torch.from_numpy(stacked).permute(2, 0, 1)[None], (1, 1, 1, 1)), 3, 1)[0]
    sums = sums.permute(1, 2, 0).numpy()
    count = sums[..., 3]
    return sums[..., :3] / np.maximum(count, 1e-9)[..., None], count > 0


def _old_background(pixels: np.ndarray, outline: np.ndarray, edit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B_old at each pixel: the mean of its edit-side 8-neighbours in the photo, and where it has any."""
    return _neighbour_mean(pixels, edit & ~outline)


def old_background_share(source: np.ndarray, outline: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """α on each ``outline`` pixel (H×W float, 0 elsewhere): 1 − a, with P = a·F + (1 − a)·B_old projected on the
    line from B_old to F and clipped to [0, 1]. Where F and B_old are alike (within ``colours.COLOUR_DISTANCE``),
    or the pixel has no kept or no edit-side neighbour, it cannot be unmixed and stays the photo's (α = 0).
    ``edit``: the edit region (bool), the outline included."""
    outline = np.asarray(outline, bool)
    alpha = np.zeros(outline.shape, np.float32)
    if not outline.any():
        return alpha
    edit = np.asarray(edit, bool)
    pixels = np.asarray(source, np.float32)
    subject, has_subject = _neighbour_mean(pixels, ~edit & ~outline)
    old, has_old = _old_background(pixels, outline, edit)
    known = has_subject & has_old
    direction = subject - old
    length2 = (direction ** 2).sum(-1)
    share = np.clip(((pixels - old) * direction).sum(-1) / np.maximum(length2, 1e-9), 0.0, 1.0)
    usable = outline & known & (length2 > COLOUR_DISTANCE ** 2)
    alpha[usable] = 1.0 - share[usable]
    return alpha


def unmixed(pasted: np.ndarray, source: np.ndarray, new_background: np.ndarray, alpha: np.ndarray,
            outline: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """``pasted`` (uint8 H×W×3) with each outline pixel set to P + α·(B_new − B_old): the old background's share
    swapped for ``new_background``'s (H×W×3 float, the generation filled in from beside the subject)."""
    swap = np.asarray(outline, bool) & (np.asarray(alpha) > 0)
    if not swap.any():
        return pasted
    pixels = np.asarray(source, np.float32)
    old, _ = _old_background(pixels, np.asarray(outline, bool), np.asarray(edit, bool))
    values = pixels + np.asarray(alpha, np.float32)[..., None] * (np.asarray(new_background, np.float32) - old)
    out = np.array(pasted, copy=True)
    out[swap] = np.clip(np.round(values[swap]), 0, 255).astype(np.uint8)
    return out


def without_echo(pasted: np.ndarray, generated: np.ndarray, alpha: np.ndarray, outline: np.ndarray,
                 edit: np.ndarray) -> np.ndarray:
    """``pasted`` (uint8 H×W×3) with the echo of the kept subject removed: the generated pixels (``generated``, H×W×3
    float) of the ``edit`` region within :data:`ECHO_REACH` of the subject and its ``outline`` whose colour is unlike
    every colour of the generation farther out take the mean of their neighbours instead, filled in one ring at a
    time from the pixels that are not such an echo. Only pixels with alpha 1 change."""
    edit, outline = np.asarray(edit, bool), np.asarray(outline, bool)
    near, farther = beside_subject(edit, outline, ECHO_REACH)
    if not near.any() or not farther.any():
        return pasted
    values = np.asarray(generated, np.float32)
    echo = np.zeros_like(near)
    echo[near] = unlike_all(values[near], values[farther])
    if not echo.any():
        return pasted
    filled = filled_inwards(values, edit & ~outline & ~echo, echo)
    swap = echo & (np.asarray(alpha) >= 1)
    out = np.array(pasted, copy=True)
    out[swap] = np.clip(np.round(filled[swap]), 0, 255).astype(np.uint8)
    return out


def beside_subject(edit: np.ndarray, outline: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``edit`` region's pixels within ``reach`` of the kept subject and its ``outline`` (bool H×W each), and
    the new background farther out, from one pixel beyond them: where the model's echo or ghost of the subject is
    looked for, and the colours it is told from."""
    kept_side = ~edit | outline
    return dilated(kept_side, reach) & edit & ~outline, edit & ~dilated(kept_side, reach + 1)


def filled_inwards(values: np.ndarray, known: np.ndarray, todo: np.ndarray) -> np.ndarray:
    """``values`` with the ``todo`` pixels filled from ``known`` ones, a ring at a time: each takes the mean of its
    known 8-neighbours once it has any."""
    values, known = values.copy(), known.copy()
    while (todo & ~known).any():
        mean, has = _neighbour_mean(values, known)
        ring = todo & ~known & has
        if not ring.any():
            break
        values[ring] = mean[ring]
        known |= ring
    return values
