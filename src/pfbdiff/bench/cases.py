"""ShapesBench cases: rendered source images, coarse user masks and target prompts with exact ground truth.

A case is plain data (:class:`Case`): a source :class:`~pfbdiff.shapes.world.Scene`, the *target* scene (the
ideal result: the same scene with the edit applied in place, same geometry), which objects are edited, and
the kind of user mask. :func:`render_case` turns it into pixels at any size (:class:`CaseImages`): source,
ideal result, masks, and the true background. Four tasks:

* ``object``: replace one object by another colour *and* shape (box mask: a new shape must fit);
* ``attribute``: recolour one object, shape kept (mask alternates between the object mask dilated by 3 px
  and its box, measured at 64 px);
* ``background``: new background colour (and a pattern), objects kept (mask = everything but the objects
  dilated by 3 px);
* ``multi-object``: replace both objects of a two-object scene in one pass (one box mask per object).

Seeds are disjoint from training by construction: training draws scenes from ``default_rng([seed, stage,
step])`` (three entropy words, which numpy pads with a zero word) and the model evaluation from
``default_rng([777001, i])``; every bench case comes from ``default_rng([BENCH_TAG, task, index, 1])``, whose
last word is never 0. Source scenes come from the ``"any"`` split and every third case forces a held-out
target combination (object colour/shape or background colour/pattern) when the scene allows one.
Every case is checked when made: the oracles must read the source objects back, the ideal result must pass
the edit-success oracle and the unedited source must fail it; a case that does not is redrawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes.binary_masks import dilate
from pfbdiff.shapes.world import (
    COLOURS,
    HELD_OUT_BACKGROUNDS,
    HELD_OUT_OBJECTS,
    PATTERNS,
    SHAPES,
    Scene,
    caption,
    is_held_out_background,
    is_held_out_object,
    render,
    sample_scene,
)

TASKS: tuple[str, ...] = ("object", "attribute", "background", "multi-object")
TASK_CODES = {"object": 1, "attribute": 2, "background": 3, "multi-object": 4}
BENCH_TAG = 20_230_629  # first entropy word of every bench case
NOISE_SEED_OFFSET = 70_000_000  # noise seeds: offset + 100_000 * task code + index
HELD_OUT_EVERY = 3  # every third case forces a held-out target combination
MASK_DILATION = 3  # px at 64 px: "object mask dilated"
BOX_MARGIN = 2  # px at 64 px around an object's pixel bounding box
VALIDATION_SIZE = 64
MAX_DRAWS = 200


@dataclass(frozen=True)
class Case:
    """One benchmark case (plain data; render it with :func:`render_case`)."""

    task: str
    index: int
    seed: int  # noise seed shared by every method on this case
    source: Scene
    target: Scene  # the ideal edit: same geometry, edited objects / background changed
    edited: tuple[int, ...]  # indices of the edited objects (empty for background edits)
    mask_kind: str  # "box", "dilated" or "background"
    held_out: bool  # the target uses a held-out combination
    draws: int = 1  # rng draws until a valid case (diagnostics)

    @property
    def id(self) -> str:
        return f"{self.task}-{self.index:04d}"

    @property
    def source_caption(self) -> str:
        return caption(self.source)

    @property
    def target_caption(self) -> str:
        return caption(self.target)

    @property
    def new_phrases(self) -> tuple[str, ...]:
        """``"yellow triangle"`` per edited object (no article): the words confined to that object's mask."""
        return tuple(_phrase(self.target.objects[i]) for i in self.edited)

    @property
    def kept_phrases(self) -> tuple[str, ...]:
        """Phrases of the objects left untouched (no article)."""
        return tuple(dict.fromkeys(_phrase(o) for i, o in enumerate(self.target.objects) if i not in self.edited))

    def to_json(self) -> dict:
        return {
            "id": self.id, "task": self.task, "index": self.index, "seed": self.seed,
            "source_caption": self.source_caption, "target_caption": self.target_caption,
            "edited": list(self.edited), "mask_kind": self.mask_kind, "held_out": self.held_out,
            "new_phrases": list(self.new_phrases), "kept_phrases": list(self.kept_phrases),
            "objects": [[o.colour, o.shape, round(o.cx, 4), round(o.cy, 4), round(o.size, 4)]
                        for o in self.source.objects],
        }


def _phrase(obj) -> str:
    return f"{obj.colour} {obj.shape}"


@dataclass(frozen=True, eq=False)
class CaseImages:
    """A case rendered at one size. Images are H×W×3 uint8, masks H×W bool.

    ``mask``: the user mask (True = regenerate). ``regions``: one mask per edited object (their union is
    ``mask``); for background edits a single region equal to ``mask``. ``ideal``: the target scene rendered,
    i.e. the right answer. For object edits it equals the source outside the mask; for background edits it
    also changes the thin ring of old background that the coarse mask leaves around each object (the oracles
    read an object with a ring of another colour as a different blob, so the ring must be regenerated).
    ``kept``: the pixels outside the mask that the ideal edit leaves unchanged (where fidelity to the source
    is measured). ``background``: the target scene's background with no objects (the truth for in-mask
    pixels that are not on an object). ``labels``: the source label map.
    """

    case: Case
    source: np.ndarray
    ideal: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    regions: tuple[np.ndarray, ...]
    kept: np.ndarray
    labels: np.ndarray
    object_masks: tuple[np.ndarray, ...] = field(default=())

    @cached_property
    def size(self) -> int:
        return self.source.shape[0]


def entropy(task: str, index: int) -> list[int]:
    """The rng entropy of case ``index`` of ``task`` (see the module docstring for why it is disjoint)."""
    return [BENCH_TAG, TASK_CODES[task], index, 1]


def noise_seed(task: str, index: int) -> int:
    return NOISE_SEED_OFFSET + 100_000 * TASK_CODES[task] + index


def make_cases(task: str, count: int, start: int = 0) -> list[Case]:
    """Cases ``start .. start + count - 1`` of ``task``; deterministic, independent of ``count``."""
    if task not in TASKS:
        raise PFBDiffError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return [make_case(task, index) for index in range(start, start + count)]


def make_case(task: str, index: int) -> Case:
    rng = np.random.default_rng(entropy(task, index))
    want_held_out = index % HELD_OUT_EVERY == 0
    for draw in range(1, MAX_DRAWS + 1):
        case = _draw(task, index, rng, want_held_out)
        if case is not None and _valid(case):
            return replace(case, draws=draw)
    raise PFBDiffError(f"could not draw a valid {task} case {index}")  # never seen in practice


# --------------------------------------------------------------------------------------------- drawing


def _draw(task: str, index: int, rng: np.random.Generator, want_held_out: bool) -> Case | None:
    seed = noise_seed(task, index)
    if task == "background":
        source = sample_scene(rng, split="any")
        options = [(c, p) for c in COLOURS for p in PATTERNS
                   if c != source.background and all(o.colour != c for o in source.objects)]
        held = [o for o in options if is_held_out_background(*o)]
        colour, pattern = _pick(rng, held if want_held_out and held else options)
        target = Scene(colour, pattern, source.objects)
        return Case(task, index, seed, source, target, (), "background", is_held_out_background(colour, pattern))

    n_objects = 2 if task == "multi-object" else None
    source = sample_scene(rng, n_objects, split="any")
    count = len(source.objects)
    edited = tuple(range(count)) if task == "multi-object" else (int(rng.integers(count)),)
    objects = list(source.objects)
    held_out = False
    for position, i in enumerate(edited):
        old = source.objects[i]
        taken = {_phrase(o) for j, o in enumerate(objects) if j != i}
        if task == "attribute":
            options = [(c, old.shape) for c in COLOURS if c not in (old.colour, source.background)]
        else:
            options = [(c, s) for c in COLOURS for s in SHAPES
                       if c not in (old.colour, source.background) and s != old.shape]
        options = [o for o in options if f"{o[0]} {o[1]}" not in taken]
        if not options:
            return None
        held = [o for o in options if is_held_out_object(*o)]
        colour, shape = _pick(rng, held if want_held_out and position == 0 and held else options)
        held_out |= is_held_out_object(colour, shape)
        objects[i] = replace(old, colour=colour, shape=shape)
    if task == "attribute":
        kind = "dilated" if index % 2 == 0 else "box"
    else:
        kind = "box"
    target = Scene(source.background, source.pattern, tuple(objects))
    return Case(task, index, seed, source, target, edited, kind, held_out)


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _valid(case: Case) -> bool:
    from pfbdiff.bench.metrics import edit_success

    images = render_case(case, VALIDATION_SIZE)
    if not all(r.any() for r in images.regions) or not images.mask.any() or images.mask.all():
        return False
    source_read = edit_success(images, images.source)
    ideal_read = edit_success(images, images.ideal)
    # The source objects are read back (the untouched ones are "kept" in the source itself) and the
    # background is read right; the ideal edit passes every check; the source does not pass as an edit.
    return source_read["others_kept"] and source_read["count_ok"] and ideal_read["success"] \
        and ideal_read["count_ok"] and not source_read["success"]


# --------------------------------------------------------------------------------------------- rendering


def _scaled(pixels: int, size: int) -> int:
    return max(1, int(round(pixels * size / 64)))


def _box_mask(object_mask: np.ndarray, margin: int) -> np.ndarray:
    ys, xs = np.nonzero(object_mask)
    h, w = object_mask.shape
    out = np.zeros_like(object_mask)
    out[max(ys.min() - margin, 0):min(ys.max() + 1 + margin, h), max(xs.min() - margin, 0):min(xs.max() + 1 + margin, w)] = True
    return out


def render_case(case: Case, size: int, box_margin: int = BOX_MARGIN) -> CaseImages:
    """Pixels, masks and ground truth of ``case`` at ``size`` × ``size``; a box mask reaches ``box_margin`` pixels
    (at 64 px) past the object's bounding box (0: a tight box)."""
    source = render(case.source, size)
    target = render(case.target, size)
    background = render(Scene(case.target.background, case.target.pattern, ()), size).image
    if case.mask_kind == "background":
        occupied = np.zeros((size, size), bool)
        for m in source.object_masks:
            occupied |= m
        mask = ~dilate(occupied, _scaled(MASK_DILATION, size))
        regions = (mask,)
    else:
        regions = []
        for i in case.edited:
            obj_mask = source.object_masks[i] | target.object_masks[i]
            if case.mask_kind == "dilated":
                region = dilate(obj_mask, _scaled(MASK_DILATION, size))
            else:
                region = _box_mask(obj_mask, _scaled(box_margin, size) if box_margin > 0 else 0)
            # A user mask never covers an object that is to be kept, nor another edited object's region.
            for j, other in enumerate(source.object_masks):
                if j != i:
                    region &= ~dilate(other, 1)
            for earlier in regions:
                region &= ~earlier
            regions.append(region)
        regions = tuple(regions)
        mask = np.zeros((size, size), bool)
        for region in regions:
            mask |= region
    kept = ~mask & (target.image == source.image).all(axis=-1)
    return CaseImages(case, source.image, target.image, background, mask, regions, kept, source.labels,
                      tuple(source.object_masks))


def held_out_targets(cases: list[Case]) -> set:
    """Held-out combinations used by the targets of ``cases`` (objects and backgrounds)."""
    found = set()
    for case in cases:
        if case.task == "background":
            combo = (case.target.background, case.target.pattern)
            if combo in HELD_OUT_BACKGROUNDS:
                found.add(combo)
        else:
            found.update((o.colour, o.shape) for o in (case.target.objects[i] for i in case.edited)
                         if (o.colour, o.shape) in HELD_OUT_OBJECTS)
    return found
