"""New content is not cut: the paste-back's edit region follows what the model drew across the mask's edge.

The model does not draw exactly inside a coarse mask: a new object often reaches a few pixels past its edge. The
feathered alpha (``compositing.py``) faded such an object's rim into the photo and the mask's edge cut it off, so
it came out blurred at the edge and flattened where it crossed. On ShapesBench's tuning cases that was the largest
cause of failed multi-object edits: right before the paste-back, wrong after it (README, ShapesBench).

Here *new content* is a generated pixel whose colour is unlike the photo's pixel there and unlike every colour of
the photo around the mask (the reference ring; the shared colour distance, :func:`~pfbdiff.photo.colours.unlike_all`),
so the VAE's small shifts and a surface that runs on across the edge are not new content. It is taken whole:

* in the feather band its alpha is the mask's, not the fade's, where it is alike the new object's own colours (the
  new content inside the mask past the band: a stray colour the decoder drew by the edge is not followed);
* where it crosses the mask's edge the edit region follows it, one 8-neighbour at a time, at most ``reach`` pixels
  beyond the mask (a share of the mask's size, ``EditConfig.outgrow``: :func:`~pfbdiff.photo.morphology.share_of_size`).

The pixels it adds become part of the edit region the user sees (the output's ``masks``); every pixel outside that
region is still the photo's own, bit for bit. It needs the generation, so it is the one part of the paste-back's
alpha decided after the edit, not before.
"""

from __future__ import annotations

import numpy as np

from pfbdiff.photo.colours import COLOUR_DISTANCE, unlike_all
from pfbdiff.photo.morphology import grow_mask, grown_along


def new_content(generated: np.ndarray, source: np.ndarray, ring: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Of the pixels ``where`` (bool H×W), those whose generated colour is farther than ``colours.COLOUR_DISTANCE`` from
    the source's pixel there and from every colour of the source on ``ring`` (``generated``, ``source``: H×W×3)."""
    generated, source = np.asarray(generated, np.float32), np.asarray(source, np.float32)
    found = where & (np.linalg.norm(generated - source, axis=-1) > COLOUR_DISTANCE)
    found[found] = unlike_all(generated[found], source[ring])
    return found


def followed(alpha: np.ndarray, mask: np.ndarray, generated: np.ndarray, source: np.ndarray, ring: np.ndarray,
             reach: int) -> np.ndarray:
    """``alpha`` (H×W, in the mask's box) raised where ``generated`` shows new content alike the new object's (the
    new content inside the mask, past the feather band): to the mask's value in the band, and to 1 where it crosses
    the mask's edge (where the mask falls to 0), followed at most ``reach`` pixels. A soft mask stays its own alpha
    wherever it is above 0."""
    alpha, mask = np.asarray(alpha, np.float32), np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    inside = mask > 0
    band = alpha < mask
    beyond = (grow_mask(inside.astype(np.float32), reach) > 0) & ~inside  # within ``reach`` 8-connected steps
    if not band.any() and not beyond.any():
        return alpha
    found = new_content(generated, source, ring, inside | beyond)
    own, new = found & inside & ~band, found & (band | beyond)
    if not own.any():  # nothing new drawn inside the mask: nothing of it to follow
        return alpha
    pixels = np.asarray(generated, np.float32)
    new[new] = ~unlike_all(pixels[new], pixels[own])  # a stray colour the decoder drew by the edge is not the object
    outgrown = grown_along(inside, None, limit=reach, within=new & beyond) & ~inside
    out = np.where(band & new, mask, alpha)
    out[outgrown] = 1.0
    return out
