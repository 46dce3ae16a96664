"""Naming ShapesWorld colours in pixels, for the oracles (:mod:`pfbdiff.shapes.oracles`).

Colours are compared in CIELAB (D65), a perceptual space, so that "nearest palette colour" means what a viewer
would say. :func:`name_colour` names one colour; :func:`reference_votes` matches every pixel to the nearest
palette colour *or darker shade* (what stripes and checks are drawn with), and :func:`vote_background` turns
those votes into the background colour. Colours farther than :data:`COLOUR_CUTOFF_DE` from every reference
get no name.
"""

from __future__ import annotations

import numpy as np

from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes.world import COLOURS, PALETTE, SHADES

# Max CIELAB distance for a pixel or object to be given a palette name; the closest two palette colours are
# about 41 dE apart, so this only rejects colours that are near nothing.
COLOUR_CUTOFF_DE = 35.0


def as_rgb_float(image) -> np.ndarray:
    """H x W x 3 float array in 0-255 from a uint8 / float (0-1 or 0-255) array or a PIL image."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise PFBDiffError(f"expected an H x W x 3 RGB image, got an array of shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    array = array.astype(np.float64)
    return array * 255.0 if array.max(initial=0.0) <= 1.0 else array


# sRGB decoding (the costly power law) is tabulated once and interpolated: far below colour-naming accuracy.
_SRGB_GRID = np.linspace(0.0, 255.0, 1021)
_SRGB_LINEAR = np.where(_SRGB_GRID <= 0.04045 * 255, _SRGB_GRID / 255 / 12.92,
                        ((_SRGB_GRID / 255 + 0.055) / 1.055) ** 2.4)
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, any leading shape) to CIELAB (D65)."""
    linear = np.interp(np.asarray(rgb, np.float64), _SRGB_GRID, _SRGB_LINEAR)
    xyz = linear @ (_RGB_TO_XYZ.T / _D65_WHITE)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# Reference colours for background voting: every palette colour and its shade. Index i < len(COLOURS) is
# colour i; index len(COLOURS) + i is the shade of colour i.
_REFERENCE_RGB = np.array([PALETTE[c] for c in COLOURS] + [SHADES[c] for c in COLOURS], np.float64)
_REFERENCE_LAB = rgb_to_lab(_REFERENCE_RGB)
_PALETTE_LAB = _REFERENCE_LAB[:len(COLOURS)]


def _nearest(lab: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to the nearest reference colour for each Lab row."""
    squared = (lab * lab).sum(axis=1)[:, None] - 2 * lab @ references.T + (references * references).sum(axis=1)
    index = squared.argmin(axis=1)
    return index, np.sqrt(np.maximum(squared[np.arange(len(lab)), index], 0.0))


def name_colour(rgb) -> str | None:
    """Nearest palette colour name for one RGB colour, or ``None`` when nothing is within the cut-off."""
    index, distance = _nearest(rgb_to_lab(np.asarray(rgb, np.float64).reshape(1, 3)), _PALETTE_LAB)
    return COLOURS[index[0]] if distance[0] <= COLOUR_CUTOFF_DE else None


def reference_votes(pixels_rgb: np.ndarray) -> np.ndarray:
    """Nearest reference per pixel, -1 beyond the cut-off: ``i`` is colour ``COLOURS[i]``, ``len(COLOURS) + i``
    is that colour's shade.
    """
    index, distance = _nearest(rgb_to_lab(pixels_rgb), _REFERENCE_LAB)
    return np.where(distance <= COLOUR_CUTOFF_DE, index, -1)


def vote_background(votes: np.ndarray, min_share: float) -> str | None:
    """Most voted base colour (shades count for their colour) if it holds ``min_share`` of all pixels."""
    if votes.size == 0:
        return None
    base = votes[votes >= 0] % len(COLOURS)
    counts = np.bincount(base, minlength=len(COLOURS))
    best = int(counts.argmax())
    return COLOURS[best] if counts[best] >= min_share * votes.size and counts[best] > 0 else None
