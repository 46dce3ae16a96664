"""ShapesWorld: a tiny procedural world of coloured shapes on patterned backgrounds.

Every image in this world is a *scene*: a background (one colour, drawn plain, striped or checkered) with one
or two solid objects on it (a circle, square or triangle in one colour). A scene is plain data (:class:`Scene`),
so it can be sampled at random (:func:`sample_scene`), built by hand (:func:`make_scene`), rendered to pixels
with exact ground-truth masks (:func:`render`) and described by a caption from a fixed grammar
(:func:`caption`)::

    a red circle on a striped blue background
    a red circle and a green square on a plain yellow background

The world serves two purposes: training data for a small text-to-image diffusion model, and a benchmark for
image-editing methods whose results are scored by the exact oracles in :mod:`pfbdiff.shapes.oracles`.
To test compositional generalisation, a few colour/shape and colour/pattern combinations are *held out*
(:data:`HELD_OUT_OBJECTS`, :data:`HELD_OUT_BACKGROUNDS`): the ``"train"`` split never produces them.

Geometry is resolution independent: object centres and sizes are fractions of the image side, so one scene
renders at any size. Rendering is 4x supersampled (anti-aliased edges); the ground-truth masks are the pixels
at least half covered by an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pfbdiff.errors import PFBDiffError

# --- Vocabulary of the world -------------------------------------------------------------------------------

# Saturated colours chosen to be far apart in CIELAB (the closest pair, blue/purple, is about 41 dE apart), so
# that a generated image with mild colour drift still maps to the intended name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (30, 90, 230),
    "purple": (160, 40, 180),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PATTERNS: tuple[str, ...] = ("plain", "striped", "checkered")

# Stripes and checks alternate the background colour with a darker shade of it. Half brightness keeps the
# shade clearly "the same colour" yet far (>= 60 RGB units) from every other palette colour.
SHADE_FACTOR = 0.5
SHADES: dict[str, tuple[int, int, int]] = {
    name: tuple(int(round(c * SHADE_FACTOR)) for c in rgb) for name, rgb in PALETTE.items()
}

# Width of one stripe / one checker cell, as a fraction of the image side (8 px at 64x64).
PATTERN_CELL = 1 / 8

# Combinations that never occur in the training split (compositional generalisation test set).
HELD_OUT_OBJECTS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("orange", "square"),
    ("purple", "circle"),
)
HELD_OUT_BACKGROUNDS: tuple[tuple[str, str], ...] = (
    ("blue", "checkered"),
    ("orange", "striped"),
)

SPLITS: tuple[str, ...] = ("train", "any", "heldout")

# Object geometry, as fractions of the image side (14-28 px, 4 px gap, 1 px margin at 64x64).
MIN_OBJECT_SIZE = 14 / 64
MAX_OBJECT_SIZE = 28 / 64
OBJECT_GAP = 4 / 64
IMAGE_MARGIN = 1 / 64
MAX_OBJECTS = 2

_CAPTION_WORDS = ("a", "an", "and", "on", "background")
VOCABULARY: list[str] = sorted(set(_CAPTION_WORDS) | set(COLOURS) | set(SHAPES) | set(PATTERNS))

SUPERSAMPLING = 4


# --- Scene data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One solid object. ``cx``, ``cy`` (centre) and ``size`` (side of its square bounding box) are fractions
    of the image side; ``cy`` grows downwards, like image rows."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in image-side fractions."""
        return _box(self.cx, self.cy, self.size)


@dataclass(frozen=True)
class Scene:
    """A background (colour and pattern) with one or two non-overlapping objects, listed in caption order.

    (Sampled scenes always have objects; a hand-made scene may have none, e.g. as an edit's reference.)"""

    background: str
    pattern: str
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not results
class RenderResult:
    """Pixels of a rendered scene plus exact ground truth.

    ``image`` is H x W x 3 uint8; ``object_masks[i]`` is the H x W bool mask of object ``i`` (pixels at least
    half covered); ``labels`` is H x W int with 0 for background and ``i + 1`` for object ``i``.
    """

    image: np.ndarray
    object_masks: list[np.ndarray]
    labels: np.ndarray


# --- Validation --------------------------------------------------------------------------------------------


def _check_choice(kind: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise PFBDiffError(f"unknown {kind} {value!r}; use one of {', '.join(options)}")


def _boxes_apart(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """True when two boxes are separated by at least ``gap`` along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _inside_image(box: tuple[float, ...]) -> bool:
    eps = 1e-9
    return box[0] >= IMAGE_MARGIN - eps and box[1] >= IMAGE_MARGIN - eps and \
        box[2] <= 1 - IMAGE_MARGIN + eps and box[3] <= 1 - IMAGE_MARGIN + eps


def validate_scene(scene: Scene) -> None:
    """Raise :class:`PFBDiffError` unless the scene obeys the world's rules (names, count, colours, layout)."""
    _check_choice("colour", scene.background, COLOURS)
    _check_choice("pattern", scene.pattern, PATTERNS)
    # Zero objects is allowed (a reference image for "remove the object" edits) but has no caption.
    if len(scene.objects) > MAX_OBJECTS:
        raise PFBDiffError(f"a scene has at most {MAX_OBJECTS} objects, got {len(scene.objects)}")
    for obj in scene.objects:
        _check_choice("colour", obj.colour, COLOURS)
        _check_choice("shape", obj.shape, SHAPES)
        if obj.colour == scene.background:
            raise PFBDiffError(f"a {obj.colour} object would be invisible on a {scene.background} background")
        if obj.size <= 0 or not _inside_image(obj.box):
            raise PFBDiffError(f"{object_phrase(obj)} at ({obj.cx:.3f}, {obj.cy:.3f}) with size {obj.size:.3f} "
                               f"is not fully inside the image (margin {IMAGE_MARGIN:.3f})")
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1:]:
            if not _boxes_apart(a.box, b.box, OBJECT_GAP):
                raise PFBDiffError(f"{object_phrase(a)} and {object_phrase(b)} overlap or are closer than "
                                   f"{OBJECT_GAP:.3f} of the image side")


# --- Held-out combinations ---------------------------------------------------------------------------------


def is_held_out_object(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT_OBJECTS


def is_held_out_background(colour: str, pattern: str) -> bool:
    return (colour, pattern) in HELD_OUT_BACKGROUNDS


def uses_held_out(scene: Scene) -> bool:
    """True when the scene contains any held-out object or background combination."""
    return is_held_out_background(scene.background, scene.pattern) or any(
        is_held_out_object(o.colour, o.shape) for o in scene.objects)


# --- Building and sampling scenes --------------------------------------------------------------------------


def make_scene(background: tuple[str, str],
               objects: Sequence[tuple[str, str, float, float, float]]) -> Scene:
    """Build a scene by hand: ``background=(colour, pattern)``, ``objects=[(colour, shape, cx, cy, size), ...]``
    with geometry in image-side fractions. Raises :class:`PFBDiffError` if the scene breaks the world's rules
    (held-out combinations are allowed here: a hand-made scene is for evaluation)."""
    colour, pattern = background
    scene = Scene(colour, pattern, tuple(ShapeObject(c, s, float(x), float(y), float(z))
                                         for c, s, x, y, z in objects))
    validate_scene(scene)
    return scene


def _choose(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sample_background(rng: np.random.Generator, split: str, colour: str | None,
                       pattern: str | None) -> tuple[str, str]:
    options = [(c, p) for c in COLOURS for p in PATTERNS
               if (colour is None or c == colour) and (pattern is None or p == pattern)
               and not (split == "train" and is_held_out_background(c, p))]
    if not options:
        raise PFBDiffError(f"background ({colour}, {pattern}) is held out of the train split; "
                           "use split='any' to sample it")
    return _choose(rng, options)


def _sample_kind(rng: np.random.Generator, split: str, background: str, colour: str | None,
                 shape: str | None) -> tuple[str, str]:
    """Pick an object's (colour, shape) given optional forced values, the background and the split."""
    options = [(c, s) for c in COLOURS for s in SHAPES
               if c != background and (colour is None or c == colour) and (shape is None or s == shape)
               and not (split == "train" and is_held_out_object(c, s))]
    if not options:
        raise PFBDiffError(f"no object ({colour}, {shape}) is possible on a {background} background in the "
                           f"{split!r} split (object colour must differ from the background; held-out "
                           "combinations need split='any')")
    return _choose(rng, options)


def _box(cx: float, cy: float, size: float) -> tuple[float, float, float, float]:
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def _sample_layout(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """Random non-overlapping (cx, cy, size) triples, fully inside the image, separated by OBJECT_GAP."""
    for _attempt in range(1000):
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            size = float(rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE))
            low, high = IMAGE_MARGIN + size / 2, 1 - IMAGE_MARGIN - size / 2
            for _try in range(50):
                cx, cy = (float(v) for v in rng.uniform(low, high, size=2))
                if all(_boxes_apart(_box(cx, cy, size), _box(*p), OBJECT_GAP) for p in placed):
                    placed.append((cx, cy, size))
                    break
            else:
                break  # this object found no room: start the layout again
        if len(placed) == count:
            return placed
    raise RuntimeError("could not place objects; the size limits leave no room")  # unreachable in practice


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, *, split: str = "train",
                 background: str | None = None, pattern: str | None = None,
                 objects: Sequence[tuple[str | None, str | None]] | None = None) -> Scene:
    """Sample a random scene.

    ``split``: ``"train"`` never produces a held-out combination; ``"any"`` may; ``"heldout"`` always contains
    at least one. Any attribute may be forced: ``background`` (colour), ``pattern``, and ``objects`` as a list
    of ``(colour, shape)`` pairs where ``None`` means random (its length sets the object count). Positions and
    sizes are always random. Forcing something the split forbids raises :class:`PFBDiffError`.
    """
    _check_choice("split", split, SPLITS)
    if background is not None:
        _check_choice("colour", background, COLOURS)
    if pattern is not None:
        _check_choice("pattern", pattern, PATTERNS)
    if objects is not None:
        if n_objects is not None and n_objects != len(objects):
            raise PFBDiffError(f"n_objects={n_objects} disagrees with {len(objects)} forced objects")
        n_objects = len(objects)
        for colour, shape in objects:
            if colour is not None:
                _check_choice("colour", colour, COLOURS)
            if shape is not None:
                _check_choice("shape", shape, SHAPES)
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise PFBDiffError(f"n_objects must be 1 to {MAX_OBJECTS}, got {n_objects}")

    if split == "heldout":
        # Rejection from the unrestricted split; about one scene in three qualifies.
        for _ in range(2000):
            scene = sample_scene(rng, n_objects, split="any", background=background, pattern=pattern,
                                 objects=objects)
            if uses_held_out(scene):
                return scene
        raise PFBDiffError("the forced attributes leave no room for a held-out combination")

    count = n_objects if n_objects is not None else int(rng.integers(1, MAX_OBJECTS + 1))
    specs = list(objects) if objects is not None else [(None, None)] * count
    bg_colour, bg_pattern = _sample_background(rng, split, background, pattern)
    kinds = [_sample_kind(rng, split, bg_colour, c, s) for c, s in specs]
    layout = _sample_layout(rng, count)
    return Scene(bg_colour, bg_pattern,
                 tuple(ShapeObject(c, s, *geom) for (c, s), geom in zip(kinds, layout)))


# --- Rendering ---------------------------------------------------------------------------------------------


def _pixel_centres(n: int) -> np.ndarray:
    """Centres of ``n`` equal cells covering [0, 1]."""
    return (np.arange(n) + 0.5) / n


def _background_shade_mask(pattern: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Where the darker shade goes (True) for a pattern, sampled on the grid ``xs`` x ``ys``."""
    col = np.floor(xs / PATTERN_CELL).astype(int)[None, :]
    row = np.floor(ys / PATTERN_CELL).astype(int)[:, None]
    if pattern == "plain":
        return np.zeros((len(ys), len(xs)), bool)
    if pattern == "striped":  # horizontal bands
        return np.broadcast_to(row % 2 == 1, (len(ys), len(xs)))
    return (row + col) % 2 == 1  # checkered


def shape_mask(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the object's ideal shape sampled at grid points ``xs`` x ``ys`` (image-side fractions).

    Circle: disc of diameter ``size``. Square: axis-aligned. Triangle: apex up, base and height ``size``.
    """
    dx = xs[None, :] - obj.cx
    dy = ys[:, None] - obj.cy
    half = obj.size / 2
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    depth = dy + half  # distance below the apex
    return (depth >= 0) & (depth <= obj.size) & (np.abs(dx) <= depth / 2)


def _downsample(values: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor`` x ``factor`` blocks of the two leading axes."""
    h, w = values.shape[0] // factor, values.shape[1] // factor
    return values.reshape(h, factor, w, factor, *values.shape[2:]).mean(axis=(1, 3))


def _fine_window(obj: ShapeObject, size: int) -> tuple[int, int, int, int]:
    """Pixel window (x0, y0, x1, y1) around an object, in output pixels, so only that part is supersampled."""
    x0, y0, x1, y1 = obj.box
    clip = lambda v: min(max(v, 0), size)  # noqa: E731
    return (clip(int(np.floor(x0 * size)) - 1), clip(int(np.floor(y0 * size)) - 1),
            clip(int(np.ceil(x1 * size)) + 1), clip(int(np.ceil(y1 * size)) + 1))


def render(scene: Scene, size: int = 64) -> RenderResult:
    """Draw a scene as a ``size`` x ``size`` RGB image with anti-aliased edges and exact object masks."""
    validate_scene(scene)
    fine = size * SUPERSAMPLING
    centres = _pixel_centres(fine)
    base = np.array(PALETTE[scene.background], np.float32)
    shade = np.array(SHADES[scene.background], np.float32)
    fine_shade = _background_shade_mask(scene.pattern, centres, centres)
    shade_cover = _downsample(fine_shade.astype(np.float32), SUPERSAMPLING)
    image = base + shade_cover[..., None] * (shade - base)
    masks: list[np.ndarray] = []
    labels = np.zeros((size, size), np.int32)
    for index, obj in enumerate(scene.objects):
        # Supersample only the object's window (whole output pixels, so block averaging stays aligned).
        x0, y0, x1, y1 = _fine_window(obj, size)
        fine_rows = slice(y0 * SUPERSAMPLING, y1 * SUPERSAMPLING)
        fine_cols = slice(x0 * SUPERSAMPLING, x1 * SUPERSAMPLING)
        fine_mask = shape_mask(obj, centres[fine_cols], centres[fine_rows])
        window = np.where(fine_shade[fine_rows, fine_cols, None], shade, base)
        window[fine_mask] = PALETTE[obj.colour]
        image[y0:y1, x0:x1] = _downsample(window, SUPERSAMPLING)
        # Objects never overlap (validated gap), so coverage >= 1/2 gives disjoint hard masks.
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = _downsample(fine_mask.astype(np.float32), SUPERSAMPLING) >= 0.5
        masks.append(mask)
        labels[mask] = index + 1
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return RenderResult(image=image, object_masks=masks, labels=labels)


# --- Captions ----------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ShapeObject | tuple[str, str]) -> str:
    """``"a red circle"`` / ``"an orange square"`` for an object (or a ``(colour, shape)`` pair)."""
    colour, shape = (obj.colour, obj.shape) if isinstance(obj, ShapeObject) else obj
    return f"{_article(colour)} {colour} {shape}"


def background_phrase(colour: str, pattern: str) -> str:
    """``"a striped blue background"``; the pattern is always named, ``"plain"`` included."""
    return f"{_article(pattern)} {pattern} {colour} background"


def caption(scene: Scene) -> str:
    """``"a red circle and a green square on a plain yellow background"`` (objects in scene order)."""
    if not scene.objects:
        raise PFBDiffError("a scene without objects has no caption in the ShapesWorld grammar")
    objects = " and ".join(object_phrase(o) for o in scene.objects)
    return f"{objects} on {background_phrase(scene.background, scene.pattern)}"


def parse_caption(text: str) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """Invert :func:`caption`: ``([(colour, shape), ...], (background colour, pattern))``.

    The grammar: ``OBJECT [and OBJECT] on ARTICLE PATTERN COLOUR background`` with ``OBJECT = ARTICLE COLOUR
    SHAPE``; ``ARTICLE`` is "an" before a vowel ("an orange square"), else "a".

    Raises :class:`PFBDiffError` when the text does not follow the grammar.
    """
    def fail(why: str) -> PFBDiffError:
        return PFBDiffError(f"caption {text!r} does not follow the ShapesWorld grammar: {why}")

    words = text.split()
    if len(words) < 8 or words[-5:-4] != ["on"]:
        raise fail("expected '<objects> on a <pattern> <colour> background'")
    article, pattern, colour, last = words[-4:]
    if pattern not in PATTERNS or article != _article(pattern) or colour not in PALETTE or last != "background":
        raise fail("bad background phrase")
    object_words = words[:-5]
    if len(object_words) not in (3, 7):
        raise fail(f"expected 1 or {MAX_OBJECTS} objects")
    objects = []
    for start in range(0, len(object_words), 4):
        a, c, s = object_words[start:start + 3]
        if c not in PALETTE or s not in SHAPES or a != _article(c):
            raise fail(f"bad object phrase {' '.join(object_words[start:start + 3])!r}")
        if start + 3 < len(object_words) and object_words[start + 3] != "and":
            raise fail("objects must be joined by 'and'")
        objects.append((c, s))
    return objects, (colour, pattern)
