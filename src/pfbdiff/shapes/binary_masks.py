"""Geometry of bool masks, numpy only: morphology, connected components, overlap and shape fitting.

The ShapesWorld oracles (:mod:`pfbdiff.shapes.oracles`) use these to cut the foreground into objects
(:func:`label_components`), refine and compare their masks (:func:`dilate`, :func:`erode`, :func:`iou`) and
name their shapes (:func:`classify_shape`: circle, square or triangle); ShapesBench uses them to build and
score edit masks.
"""

from __future__ import annotations

import numpy as np

# Below this IoU with every ideal shape, a blob is not called a circle, square or triangle.
MIN_SHAPE_FIT = 0.7


# --- Morphology and connected components -------------------------------------------------------------------


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Grow a mask by ``radius`` pixels (square neighbourhood; done as a row pass then a column pass)."""
    out = mask.copy()
    for _ in range(radius):
        rows = out.copy()
        rows[1:] |= out[:-1]
        rows[:-1] |= out[1:]
        out = rows.copy()
        out[:, 1:] |= rows[:, :-1]
        out[:, :-1] |= rows[:, 1:]
    return out


def erode(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Shrink a mask by ``radius`` pixels (square neighbourhood)."""
    return ~dilate(~mask, radius)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: (labels with 0 = off and 1..n in raster order of first pixel, n).

    Each pixel repeatedly takes the smallest pixel index among itself and its neighbours, with pointer
    jumping (a label is the index of a pixel whose own label is smaller or equal) so that labels travel far
    in few iterations.
    """
    h, w = mask.shape
    sentinel = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    on = np.flatnonzero(mask)
    while True:
        spread = labels.copy()
        np.minimum(spread[1:], labels[:-1], out=spread[1:])
        np.minimum(spread[:-1], labels[1:], out=spread[:-1])
        np.minimum(spread[:, 1:], labels[:, :-1], out=spread[:, 1:])
        np.minimum(spread[:, :-1], labels[:, 1:], out=spread[:, :-1])
        spread[~mask] = sentinel
        flat = spread.reshape(-1)
        for _ in range(4):
            flat[on] = flat[flat[on]]
        if np.array_equal(spread, labels):
            break
        labels = spread
    roots, dense = np.unique(labels[mask], return_inverse=True)
    out = np.zeros((h, w), np.int32)
    out[mask] = dense.reshape(-1) + 1
    return out, len(roots)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a non-empty mask's pixels, end-exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# --- Shapes ------------------------------------------------------------------------------------------------


def _ideal_shapes(height: int, width: int) -> dict[str, list[np.ndarray]]:
    """Ideal masks filling a height x width box, sampled at pixel centres; triangles in both orientations."""
    u = ((np.arange(width) + 0.5) / width)[None, :]
    v = ((np.arange(height) + 0.5) / height)[:, None]
    return {
        "circle": [(u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25],
        "square": [np.ones((height, width), bool)],
        "triangle": [np.abs(u - 0.5) <= v / 2, np.abs(u - 0.5) <= (1 - v) / 2],
    }


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Best-fitting shape of a bool mask and its IoU with the ideal shape in the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None, 0.0
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    best, best_fit = None, 0.0
    for name, templates in _ideal_shapes(*crop.shape).items():
        for template in templates:
            fit = iou(crop, template)
            if fit > best_fit:
                best, best_fit = name, fit
    return (best if best_fit >= MIN_SHAPE_FIT else None), best_fit
