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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes.world import COLOURS, PALETTE, SHADES

# --- Tunable thresholds (RGB units are 0-255; dE is CIELAB distance) ---------------------------------------

# Max CIELAB distance for a pixel or object to be given a palette name; the closest two palette colours are
# about 41 dE apart, so this only rejects colours that are near nothing.
COLOUR_CUTOFF_DE = 35.0
# A pixel is foreground when it is this far (RGB) from the background colour-to-shade segment. Noise of
# sigma 8 exceeds it in ~1e-4 of pixels (then dropped as specks); every object colour is >= 62 away.
FOREGROUND_DISTANCE = 32.0
# Components smaller than this fraction of the image are noise, not objects (the smallest object is ~2.4 %).
MIN_OBJECT_FRACTION = 0.005
# Below this IoU with every ideal shape, a blob is not called a circle, square or triangle.
MIN_SHAPE_FIT = 0.7
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


# --- Colour helpers ----------------------------------------------------------------------------------------


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


def _reference_votes(pixels_rgb: np.ndarray) -> np.ndarray:
    """Reference index per pixel (colour or shade), -1 beyond the cut-off."""
    index, distance = _nearest(rgb_to_lab(pixels_rgb), _REFERENCE_LAB)
    return np.where(distance <= COLOUR_CUTOFF_DE, index, -1)


def _vote_background(votes: np.ndarray, min_share: float) -> str | None:
    """Most voted base colour (shades count for their colour) if it holds ``min_share`` of all pixels."""
    if votes.size == 0:
        return None
    base = votes[votes >= 0] % len(COLOURS)
    counts = np.bincount(base, minlength=len(COLOURS))
    best = int(counts.argmax())
    return COLOURS[best] if counts[best] >= min_share * votes.size and counts[best] > 0 else None


# --- Background model --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _BackgroundModel:
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
    colour = _vote_background(votes, min_share=0.0)
    if colour is None:  # unrecognisable image: treat its median colour as a plain background
        median = np.median(pixels, axis=0)
        return _BackgroundModel(None, median, median)
    return _model_for_colour(pixels, votes, colour)


# --- Binary morphology and connected components (numpy only) ----------------------------------------------


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


# --- Objects -----------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


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
        x0, y0, x1, y1 = _bbox(labels == k)
        window = (slice(max(y0 - 1, 0), min(y1 + 1, height)), slice(max(x0 - 1, 0), min(x1 + 1, width)))
        crop = labels[window]
        others = np.isin(crop, [j for j in kept if j != k])
        crop_mask, colour = _describe_component(rgb[window], crop == k, others, model)
        if not crop_mask.any():
            continue
        mask = np.zeros(labels.shape, bool)
        mask[window] = crop_mask
        shape, fit = classify_shape(crop_mask)
        found.append(DetectedObject(colour=colour, shape=shape, mask=mask, bbox=_bbox(mask),
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
    votes = _reference_votes(rgb.reshape(-1, 3)).reshape(rgb.shape[:2])
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
    colour = _vote_background(background_votes, min_share=0.0)
    if colour is not None and colour != model.colour:
        model = _model_for_colour(pixels, background_votes, colour)
    return SceneAnalysis(colour, _classify_pattern(rgb, background, model), objects)


def find_objects(image) -> list[DetectedObject]:
    """Objects in an image, in raster order of their top-left-most pixel."""
    rgb = as_rgb_float(image)
    pixels = rgb.reshape(-1, 3)
    return _find_objects(rgb, _background_model(pixels, _reference_votes(pixels)))


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
    votes = _reference_votes(pixels)
    colour = _vote_background(votes, min_share=REGION_MIN_SHARE)
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


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


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
