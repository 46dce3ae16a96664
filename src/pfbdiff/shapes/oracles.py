"""Oracles for ShapesWorld: read a scene back out of pixels, deterministically, with no learned model.

Given an RGB image (rendered, or generated / edited by a model), these functions answer the questions a
benchmark asks: what is the background (colour and pattern), which objects are there (colour, shape, mask),
does a region contain a given object, was an object kept in place. They are built to tolerate mild noise,
slight blur and the colour drift typical of generative models.

How it works, in short:

1. **Background colour.** Every pixel is matched to the nearest palette colour *or darker shade* in CIELAB
   (a perceptual space), ignoring pixels farther than a cut-off; shades vote for their base colour; the
   most voted colour wins. The background covers most of every scene, so it wins the vote.
2. **Foreground.** The background is modelled as the RGB line segment from its colour to its shade (stripe
   and check edges, blurred or anti-aliased, are mixtures that lie on that segment). Pixels far from the
   segment are foreground.
3. **Objects.** Foreground pixels are split into 4-connected components (own numpy implementation); tiny
   specks are dropped. Each component's colour is the median colour of its interior, named by the nearest
   palette colour (or ``None`` beyond a cut-off). Its mask is refined by unmixing each edge pixel into
   "object colour + background" and keeping pixels at least half object, which reproduces the ">= 50 %
   coverage" ground-truth masks of anti-aliased renders, also after blur.
4. **Shape.** The mask is compared (IoU) with an ideal ellipse, rectangle and triangle drawn in its bounding
   box; the best fit names the shape, or ``None`` when nothing fits well.
5. **Pattern.** Background pixels are placed along the colour-to-shade segment and split in two clusters.
   One cluster only: plain. Otherwise the image rows (or columns) are uniform for stripes and mixed for checks.

Naming colours in CIELAB (steps 1 and 3) lives in :mod:`pfbdiff.shapes.colours`; the mask geometry (connected
components, morphology, IoU and the shape fit of step 4) in :mod:`pfbdiff.shapes.binary_masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes.binary_masks import (
    bounding_box,
    classify_shape,
    dilate,
    erode,
    iou,
    label_components,
)
from pfbdiff.shapes.colours import (
    as_rgb_float,
    name_colour,
    reference_votes,
    vote_background,
)
from pfbdiff.shapes.world import COLOURS, PALETTE, SHADES

# --- Tunable thresholds (RGB units are 0-255) -------------------------------------------------------------

# A pixel is foreground when it is this far (RGB) from the background colour-to-shade segment. Noise of
# sigma 8 exceeds it in ~1e-4 of pixels (then dropped as specks); every object colour is >= 62 away.
FOREGROUND_DISTANCE = 32.0
# Components smaller than this fraction of the image are noise, not objects (the smallest object is ~2.4 %).
MIN_OBJECT_FRACTION = 0.005
# Pattern detection: the two clusters of background pixels along the colour-to-shade axis must be this far
# apart in RGB (a colour and its shade are >= 92 apart; noise of sigma 8 splits into clusters ~13 apart) and
# the smaller cluster must hold this share of pixels.
PATTERN_MIN_CONTRAST = 35.0
PATTERN_MIN_MINORITY = 0.04
# Stripes: rows (or columns) are far less mixed than the other axis; checks mix both about equally.
STRIPE_MIXING_RATIO = 0.4
# The observed background colour (or shade) replaces the palette value when this share of pixels votes for
# it; below that, the few voters may be blended object edges rather than background.
ADAPT_MIN_SHARE = 0.1
# A region's background colour must hold this share of the region's pixels.
REGION_MIN_SHARE = 0.5
# Pixels this close (Chebyshev px) to an object are left out of whole-image background analysis (blended edge).
OBJECT_EDGE_MARGIN = 2


@dataclass(frozen=True, eq=False)  # holds an array: compare fields, not objects
class DetectedObject:
    """An object found in an image. ``colour``/``shape`` are ``None`` when not recognisable.

    ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, end-exclusive; ``shape_fit`` is the IoU of the mask with the
    best ideal shape.
    """

    colour: str | None
    shape: str | None
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    shape_fit: float


@dataclass(frozen=True, eq=False)
class SceneAnalysis:
    """Everything the oracles read from one image in a single pass."""

    background: str | None
    pattern: str | None
    objects: list[DetectedObject]


# --- Background model --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _BackgroundModel:
    """The background as the RGB segment from its colour to its shade, both as observed in the image."""

    colour: str | None
    base: np.ndarray  # RGB actually observed for the background colour
    shade: np.ndarray  # RGB actually observed for its darker shade

    def distance(self, rgb: np.ndarray) -> np.ndarray:
        """RGB distance of each pixel to the colour-to-shade segment (all stripe/check mixtures lie on it)."""
        return np.linalg.norm(rgb - self._closest_point(rgb), axis=-1)

    def position(self, rgb: np.ndarray) -> np.ndarray:
        """Where each pixel projects on the segment: 0 = colour, 1 = shade (unclipped)."""
        axis = self.shade - self.base
        return (rgb - self.base) @ axis / max(float(axis @ axis), 1e-9)

    def _closest_point(self, rgb: np.ndarray) -> np.ndarray:
        t = np.clip(self.position(rgb), 0.0, 1.0)
        return self.base + t[..., None] * (self.shade - self.base)


def _observed_or_default(pixels: np.ndarray, chosen: np.ndarray, default, min_count: int) -> np.ndarray:
    """Median of the chosen pixels (adapts to colour drift), or the palette value when too few."""
    return np.median(pixels[chosen], axis=0) if chosen.sum() >= min_count else np.array(default, np.float64)


def _model_for_colour(pixels: np.ndarray, votes: np.ndarray, colour: str) -> _BackgroundModel:
    """Background model of a known colour, adapted to the observed pixels (N x 3) and their votes."""
    index = COLOURS.index(colour)
    min_count = max(4, int(ADAPT_MIN_SHARE * len(pixels)))
    base = _observed_or_default(pixels, votes == index, PALETTE[colour], min_count)
    shade = _observed_or_default(pixels, votes == index + len(COLOURS), SHADES[colour], min_count)
    return _BackgroundModel(colour, base, shade)


def _background_model(pixels: np.ndarray, votes: np.ndarray) -> _BackgroundModel:
    """Background model from pixels (N x 3, with their votes) dominated by background: the most voted colour."""
    colour = vote_background(votes, min_share=0.0)
    if colour is None:  # unrecognisable image: treat its median colour as a plain background
        median = np.median(pixels, axis=0)
        return _BackgroundModel(None, median, median)
    return _model_for_colour(pixels, votes, colour)


# --- Objects -----------------------------------------------------------------------------------------------


def _coverage(rgb: np.ndarray, colour_rgb: np.ndarray, model: _BackgroundModel) -> np.ndarray:
    """Estimated fraction of each pixel covered by an object of colour ``colour_rgb``.

    A pixel is modelled as a mix ``a * object + (1 - a) * b`` with ``b`` somewhere on the background segment
    (an object edge may lie on a stripe, on its shade or on a blurred stripe border). For a few candidate
    ``b`` we solve for ``a`` by projection and keep the candidate that explains the pixel best.
    """
    best_coverage = np.zeros(rgb.shape[:-1])
    best_residual = np.full(rgb.shape[:-1], np.inf)
    for t in np.linspace(0.0, 1.0, 5):
        behind = model.base + t * (model.shade - model.base)
        direction = colour_rgb - behind
        norm2 = max(float(direction @ direction), 1e-9)
        coverage = np.clip((rgb - behind) @ direction / norm2, 0.0, 1.0)
        residual = np.linalg.norm(rgb - behind - coverage[..., None] * direction, axis=-1)
        better = residual < best_residual
        best_coverage = np.where(better, coverage, best_coverage)
        best_residual = np.minimum(residual, best_residual)
    return best_coverage


def _describe_component(rgb: np.ndarray, component: np.ndarray, others: np.ndarray,
                        model: _BackgroundModel) -> tuple[np.ndarray, str | None]:
    """Refined mask and colour name of one foreground component (arrays cropped around it)."""
    core = erode(component)
    if core.sum() < 4:  # too thin to have an interior; use every pixel
        core = component
    colour_rgb = np.median(rgb[core], axis=0)
    # Ground truth counts a pixel as object when at least half covered; estimate coverage near the component.
    candidates = dilate(component) & ~others
    mask = np.zeros(component.shape, bool)
    mask[candidates] = _coverage(rgb[candidates], colour_rgb, model) >= 0.5
    return mask, name_colour(colour_rgb)


def _find_objects(rgb: np.ndarray, model: _BackgroundModel) -> list[DetectedObject]:
    labels, count = label_components(model.distance(rgb) > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)
    min_area = max(4, int(round(MIN_OBJECT_FRACTION * labels.size)))
    kept = [k for k in range(1, count + 1) if areas[k] >= min_area]
    height, width = labels.shape
    found = []
    for k in kept:
        # Work in a window one pixel larger than the component (the refined mask may grow by one pixel).
        x0, y0, x1, y1 = bounding_box(labels == k)
        window = (slice(max(y0 - 1, 0), min(y1 + 1, height)), slice(max(x0 - 1, 0), min(x1 + 1, width)))
        crop = labels[window]
        others = np.isin(crop, [j for j in kept if j != k])
        crop_mask, colour = _describe_component(rgb[window], crop == k, others, model)
        if not crop_mask.any():
            continue
        mask = np.zeros(labels.shape, bool)
        mask[window] = crop_mask
        shape, fit = classify_shape(crop_mask)
        found.append(DetectedObject(colour=colour, shape=shape, mask=mask, bbox=bounding_box(mask),
                                    area=int(crop_mask.sum()), shape_fit=fit))
    return found


# --- Pattern -----------------------------------------------------------------------------------------------


def _two_means(values: np.ndarray) -> tuple[float, np.ndarray]:
    """1-D two-cluster split: (distance between cluster means, bool membership of the upper cluster)."""
    threshold = float(values.mean())
    for _ in range(20):
        upper = values > threshold
        if upper.all() or not upper.any():
            return 0.0, upper
        low, high = float(values[~upper].mean()), float(values[upper].mean())
        new_threshold = (low + high) / 2
        if new_threshold == threshold:
            break
        threshold = new_threshold
    return high - low, values > threshold


def _axis_mixing(shaded: np.ndarray, region: np.ndarray, axis: int) -> float:
    """Pixel-weighted mean, over lines along ``axis`` (1 = rows), of the minority share within each line."""
    counts = region.sum(axis=axis).astype(np.float64)
    shaded_counts = (shaded & region).sum(axis=axis)
    used = counts > 0
    share = shaded_counts[used] / counts[used]
    return float((np.minimum(share, 1 - share) * counts[used]).sum() / counts[used].sum())


def _classify_pattern(rgb: np.ndarray, region: np.ndarray, model: _BackgroundModel) -> str | None:
    """plain / striped / checkered from the background pixels in ``region`` (None if too few)."""
    usable = region & (model.distance(rgb) <= FOREGROUND_DISTANCE)
    if usable.sum() < 16:
        return None
    axis_length = float(np.linalg.norm(model.shade - model.base))
    contrast, upper = _two_means(model.position(rgb[usable]) * axis_length)
    minority = min(upper.mean(), 1 - upper.mean())
    if contrast < PATTERN_MIN_CONTRAST or minority < PATTERN_MIN_MINORITY:
        return "plain"
    shaded = np.zeros(region.shape, bool)
    shaded[usable] = upper
    row_mixing = _axis_mixing(shaded, usable, axis=1)
    column_mixing = _axis_mixing(shaded, usable, axis=0)
    if min(row_mixing, column_mixing) < STRIPE_MIXING_RATIO * max(row_mixing, column_mixing):
        return "striped"
    return "checkered"


# --- Public oracles ----------------------------------------------------------------------------------------


def analyse(image) -> SceneAnalysis:
    """Background colour, pattern and objects of an image in one pass."""
    rgb = as_rgb_float(image)
    votes = reference_votes(rgb.reshape(-1, 3)).reshape(rgb.shape[:2])
    model = _background_model(rgb.reshape(-1, 3), votes.reshape(-1))
    objects = _find_objects(rgb, model)
    occupied = np.zeros(rgb.shape[:2], bool)
    for obj in objects:
        occupied |= obj.mask
    # Re-read the background away from objects and their blended edges: a cleaner vote than the first pass.
    background = ~dilate(occupied, OBJECT_EDGE_MARGIN)
    if background.sum() < 16:  # objects everywhere: fall back to the whole image
        background = np.ones_like(background)
    pixels, background_votes = rgb[background], votes[background]
    colour = vote_background(background_votes, min_share=0.0)
    if colour is not None and colour != model.colour:
        model = _model_for_colour(pixels, background_votes, colour)
    return SceneAnalysis(colour, _classify_pattern(rgb, background, model), objects)


def find_objects(image) -> list[DetectedObject]:
    """Objects in an image, in raster order of their top-left-most pixel."""
    rgb = as_rgb_float(image)
    pixels = rgb.reshape(-1, 3)
    return _find_objects(rgb, _background_model(pixels, reference_votes(pixels)))


def background_of(image, region: np.ndarray | None = None) -> tuple[str | None, str | None]:
    """(colour, pattern) of the background; either is ``None`` when not recognisable.

    Without ``region``: from the pixels away from every detected object. With a bool ``region``: from all the
    pixels in it (an object left inside the region counts against it, so a failed object removal reads as
    "not background"); the colour is ``None`` unless one colour holds half of the region. Small regions can
    hide a pattern (a region inside one stripe looks plain).
    """
    if region is None:
        analysis = analyse(image)
        return analysis.background, analysis.pattern
    rgb = as_rgb_float(image)
    region = _check_region(region, rgb)
    pixels = rgb[region]
    votes = reference_votes(pixels)
    colour = vote_background(votes, min_share=REGION_MIN_SHARE)
    if colour is None:
        return None, None
    return colour, _classify_pattern(rgb, region, _model_for_colour(pixels, votes, colour))


def _check_region(region: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    region = np.asarray(region, bool)
    if region.shape != rgb.shape[:2]:
        raise PFBDiffError(f"region of shape {region.shape} does not match the image {rgb.shape[:2]}")
    return region


def background_is(image, colour: str, pattern: str | None = None, region: np.ndarray | None = None) -> bool:
    """True when the background (in ``region``, if given) has this colour and, unless None, this pattern."""
    found_colour, found_pattern = background_of(image, region)
    return found_colour == colour and (pattern is None or found_pattern == pattern)


def contains(image, colour: str, shape: str | None, region: np.ndarray, min_inside: float = 0.5) -> bool:
    """True when an object of this colour and shape (any shape if None) has more than ``min_inside`` of its
    pixels inside the bool ``region``."""
    rgb = as_rgb_float(image)
    region = _check_region(region, rgb)
    return any(obj.colour == colour and (shape is None or obj.shape == shape)
               and (obj.mask & region).sum() > min_inside * obj.area
               for obj in find_objects(rgb))


def object_kept(source: np.ndarray, source_obj, image, *, object_index: int | None = None,
                min_iou: float = 0.8) -> bool:
    """True when ``image`` still has the source object: same colour and shape, mask IoU >= ``min_iou``.

    ``source`` is the object's bool mask in the source image, or the source's int label map (0 background,
    ``i + 1`` object ``i``) with ``object_index`` = ``i`` (optional when the map holds a single object).
    ``source_obj`` is anything with ``colour`` and ``shape`` (a :class:`ShapeObject`, a
    :class:`DetectedObject`) or a ``(colour, shape)`` pair.
    """
    source_mask = _source_mask(np.asarray(source), object_index)
    colour, shape = (source_obj.colour, source_obj.shape) if hasattr(source_obj, "colour") else source_obj
    rgb = as_rgb_float(image)
    if source_mask.shape != rgb.shape[:2]:
        raise PFBDiffError(f"source mask of shape {source_mask.shape} does not match the image {rgb.shape[:2]}")
    return any(obj.colour == colour and obj.shape == shape and iou(obj.mask, source_mask) >= min_iou
               for obj in find_objects(rgb))


def _source_mask(source: np.ndarray, object_index: int | None) -> np.ndarray:
    if source.dtype == bool:
        return source
    present = [int(v) for v in np.unique(source) if v > 0]
    if object_index is None:
        if len(present) != 1:
            raise PFBDiffError(f"the label map holds {len(present)} objects; pass object_index")
        return source == present[0]
    return source == object_index + 1
