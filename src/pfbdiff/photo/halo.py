"""Snapping a coarse background mask to the subject: the halo of old background joins the edit.

To replace a background, users paint the region around a subject roughly, or paint the subject generously and
invert it. Either way a band of the *old* background is left between the mask and the subject's outline. Kept
as it is, that band becomes a halo around the subject on the new background, and the colour match and the
paste-back both hold it in place. PFB-Diff itself cannot help: whatever lies outside the mask is the source's.

:func:`absorb_halo` moves the mask's edge onto the outline: starting from the mask, it repeatedly adds the
kept pixels next to it whose colour continues the masked side (RGB distance to some 8-neighbour already in
the mask at most ``COLOUR_DISTANCE``), for at most ``reach`` pixels. The subject, whose colours differ
from the background around it, stops the growth; patterns grow along their own colours, since a pixel only
has to match one neighbour. Along the photo's edge, a strip between the subject and the edge at most ``reach``
wide joins however long it is: a box drawn around a subject near the edge is cut there. Last, the edge pixels
that mix the two sides (anti-aliasing, blur), alike neither to the masked side nor to any kept neighbour, join
too: they are the subject's *outline* (:func:`snap_to_subject`), where the paste-back swaps the old background's
share of each pixel for the new background's (``outline.py``). The ``background`` preset turns it on
(``EditConfig.halo``); the paste-back uses a hard edge there, because the new edge is a real one (a feather band
would blend the old background back in).

An attribute edit (a new colour for the subject) has the same band on the other side of the mask's edge: the old
background between the mask and the subject, which the edit should leave alone. :func:`inner_halo` finds it by
snapping the kept side to the subject, and the ``attribute`` preset leaves it out of the paste-back's edit region
(``EditConfig.inner_halo``): the photo keeps it bit for bit, and the new colour keeps the subject's outline.
"""

from __future__ import annotations

import numpy as np

from pfbdiff.photo.colours import COLOUR_DISTANCE, unlike_all
from pfbdiff.photo.morphology import NEIGHBOURS, dilated, grown_along, neighbours_in, shifted

#: A mask holds a subject when at least this share of its pixels is unlike every colour of the photo in the ring
#: ``SUBJECT_RING`` pixels wide around it (:func:`inner_halo`): a few odd pixels are noise, not a subject.
#: ``SUBJECT_SAMPLE`` masked pixels at most, evenly spaced, are looked at.
MIN_SUBJECT_SHARE, SUBJECT_RING, SUBJECT_SAMPLE = 0.05, 3, 16384


def absorb_halo(mask: np.ndarray, image: np.ndarray, reach: int, distance: float = COLOUR_DISTANCE,
                photo_edges: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
    """``mask`` (H×W in [0, 1]) grown into the pixels of ``image`` (H×W×3) that continue the masked side's
    colours, at most ``reach`` pixels (8-connected steps) beyond it, and along a strip by the photo's edge
    (:func:`_strips_by_the_edge`; ``photo_edges``: which of the top, bottom, left and right sides of ``image`` are
    the photo's), plus the mixed edge pixels met there. The mask's own values are kept; added pixels are 1."""
    return snap_to_subject(mask, image, reach, distance, photo_edges)[0]


def snap_to_subject(mask: np.ndarray, image: np.ndarray, reach: int, distance: float = COLOUR_DISTANCE,
                    photo_edges: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> tuple[np.ndarray, np.ndarray]:
    """The mask :func:`absorb_halo` makes, and the subject's outline in it (bool H×W): the pixels that mix the
    subject and the old background, joined last."""
    mask = np.asarray(mask, dtype=np.float32)
    if reach <= 0:
        return mask, np.zeros(mask.shape, bool)
    pixels = np.asarray(image, dtype=np.float32)
    inside = mask > 0.5
    steps = {offset: np.linalg.norm(pixels - shifted(pixels, *offset, 0.0), axis=-1) <= distance
             for offset in NEIGHBOURS}
    grown = grown_along(inside, steps, limit=reach, within=_continuing(pixels, inside, reach, distance))
    grown = _strips_by_the_edge(grown, pixels, steps, reach, distance, photo_edges)
    # An anti-aliased or blurred edge pixel mixes the two sides; left out, it would stay as a thin outline of the
    # old background. Such pixels run side by side along the edge, so each is compared with the kept pixels
    # behind it only, and joins when it is like none of them.
    edge = ~grown & neighbours_in(grown, None)
    outline = edge & ~neighbours_in(~grown & ~edge, steps)
    grown |= outline
    return np.maximum(mask, grown.astype(np.float32) * ~inside), outline


def inner_halo(mask: np.ndarray, image: np.ndarray, reach: int, distance: float = COLOUR_DISTANCE,
               photo_edges: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
    """The old background inside ``mask`` around the subject it holds (bool H×W): the masked pixels whose colour
    continues the photo around the mask, at most ``reach`` pixels in from its edge. It is the halo of
    :func:`snap_to_subject` seen from the other side (the kept pixels snapped to the subject), less the subject's
    outline, whose pixels mix the subject with that background and so change with the subject.

    A mask that holds no subject (fewer than ``MIN_SUBJECT_SHARE`` of its pixels unlike every colour just around
    it: a patch of one surface) has no inner halo, so a plain region is not eaten from its edge."""
    inside = np.asarray(mask, dtype=np.float32) > 0.5
    if reach <= 0 or not inside.any() or inside.all():
        return np.zeros(inside.shape, bool)
    pixels = np.asarray(image, dtype=np.float32)
    around = dilated(inside, SUBJECT_RING) & ~inside
    masked = pixels[inside]
    sample = masked[:: max(1, len(masked) // SUBJECT_SAMPLE)]  # a share is all that is asked: an even sample will do
    if unlike_all(sample, pixels[around], distance).mean() < MIN_SUBJECT_SHARE:
        return np.zeros(inside.shape, bool)
    kept, outline = snap_to_subject((~inside).astype(np.float32), pixels, reach, distance, photo_edges)
    return (kept > 0.5) & inside & ~outline


def _continuing(pixels: np.ndarray, inside: np.ndarray, reach: int, distance: float) -> np.ndarray:
    """The kept pixels within ``reach`` of the mask whose colour is alike some colour of the masked side near its
    edge. Growing from neighbour to neighbour alone would creep through a soft edge into a subject of a near colour
    (an orange circle on yellow: each step of the anti-aliased ramp is small), and repaint the subject itself."""
    near = dilated(inside, reach) & ~inside
    band = inside & dilated(~inside, 2 * reach)
    alike = np.zeros_like(near)
    alike[near] = ~unlike_all(pixels[near], pixels[band], distance)
    return alike


def _strips_by_the_edge(grown: np.ndarray, pixels: np.ndarray, steps: dict, reach: int, distance: float,
                        photo_edges) -> np.ndarray:
    """``grown`` extended along the strips of old background at most ``reach`` pixels wide between the subject and
    the photo's edge, however long, where they continue from ``grown``.

    A user's box around a subject near the photo's edge is cut by that edge, and the strip between the subject and
    the edge can run farther from the mask than ``reach``; left out, it would stay as a sliver of the old background.
    A strip pixel continues the masked colours, and its distances to the subject (a pixel unlike every masked
    colour) and to the edge add up to at most ``reach``; kept background that merely touches the edge, with no
    subject beside it, is not a strip.
    """
    height, width = grown.shape
    rows, cols = np.mgrid[0:height, 0:width]
    to_edge = np.full((height, width), np.iinfo(np.int32).max, np.int64)
    for is_edge, offset in zip(photo_edges, (rows, height - 1 - rows, cols, width - 1 - cols)):
        if is_edge:
            to_edge = np.minimum(to_edge, offset)
    near_edge = ~grown & (to_edge < reach)
    if not near_edge.any():
        return grown
    zone = dilated(near_edge, reach)
    looked_at = ~grown & zone
    subject = np.zeros_like(grown)
    subject[looked_at] = unlike_all(pixels[looked_at], pixels[grown & zone], distance)
    strip, around = np.zeros_like(grown), subject
    for step in range(1, reach + 1):
        around = dilated(around, 1)
        strip |= around & (to_edge <= reach - step)
    strip &= near_edge & ~subject
    if not strip.any():
        return grown
    ys, xs = np.nonzero(dilated(strip, 1))
    window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    out = grown.copy()  # the strip is thin: grown in its own window, each pass adds its next pixels until it is crossed
    out[window] = grown_along(grown[window], {offset: alike[window] for offset, alike in steps.items()},
                               within=strip[window])
    return out
