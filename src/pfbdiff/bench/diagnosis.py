"""Why a ShapesBench edit failed: one cause per failed case, read from the same oracle analysis as its success.

The success checks (:func:`~.metrics.edit_success`) say *that* an edit failed; the cause says what a user would
see. Causes are tried in the order below and the first that applies is the case's:

* ``cut by the paste-back``: the output before the paste-back succeeds, after it not (a new object outgrew the
  mask and lost its outside part);
* object edits, for each new object: ``swapped`` (it is drawn inside another new object's mask, not its own),
  ``outgrew its mask`` (the right object touches its mask but has most of its pixels outside), ``wrong shape``
  / ``wrong colour`` (an object in its mask has the right colour / shape only), ``missing`` (none of these);
  then ``old object left``, ``kept object changed``, ``background changed``;
* background edits: ``kept object enlarged`` (the kept object found with its colour and shape but grown past
  its outline), ``kept object changed`` (recoloured, reshaped or gone), ``old background left`` (the masked
  region still reads as the old colour), ``wrong background colour`` / ``wrong pattern``.
"""

from __future__ import annotations

import numpy as np

from pfbdiff.shapes.binary_masks import iou

#: Causes in the order they are tried, per kind of task (the report lists them in this order).
OBJECT_CAUSES = ("cut by the paste-back", "swapped", "outgrew its mask", "wrong shape", "wrong colour", "missing",
                 "old object left", "kept object changed", "background changed")
BACKGROUND_CAUSES = ("cut by the paste-back", "kept object enlarged", "kept object changed", "old background left",
                     "wrong background colour", "wrong pattern")
ENLARGED = 1.25  # a kept object whose area grew by more than this factor has been enlarged


def causes_of(task: str) -> tuple[str, ...]:
    return BACKGROUND_CAUSES if task == "background" else OBJECT_CAUSES


def failure_cause(images, analysis, checks: dict) -> str | None:
    """The cause of a failed edit (``None`` for a success). ``analysis`` is the oracle reading of the output and
    ``checks`` its :func:`~.metrics.edit_success` result with ``success_raw``."""
    if checks["success"]:
        return None
    if checks.get("success_raw"):
        return "cut by the paste-back"
    if images.case.task == "background":
        return _background_cause(images, analysis, checks)
    return _object_cause(images, analysis, checks)


def _inside(obj, region: np.ndarray) -> bool:
    return (obj.mask & region).sum() > 0.5 * obj.area


def _object_cause(images, analysis, checks: dict) -> str:
    case, found = images.case, analysis.objects
    if not checks["target_present"]:
        for n, (i, region) in enumerate(zip(case.edited, images.regions)):
            want = case.target.objects[i]
            right = [o for o in found if (o.colour, o.shape) == (want.colour, want.shape)]
            if any(_inside(o, region) for o in right):
                continue
            others = [r for m, r in enumerate(images.regions) if m != n]
            if any(_inside(o, r) for o in right for r in others):
                return "swapped"
            if any((o.mask & region).any() for o in right):
                return "outgrew its mask"
            in_region = [o for o in found if _inside(o, region)]
            if any(o.colour == want.colour for o in in_region):
                return "wrong shape"
            if any(o.shape == want.shape for o in in_region):
                return "wrong colour"
            return "missing"
    if not checks["old_gone"]:
        return "old object left"
    if not checks["others_kept"]:
        return "kept object changed"
    return "background changed"


def _background_cause(images, analysis, checks: dict) -> str:
    case = images.case
    if not checks["others_kept"]:
        for i, obj in enumerate(case.source.objects):
            source_mask = images.labels == i + 1
            same = [o for o in analysis.objects if (o.colour, o.shape) == (obj.colour, obj.shape)]
            if any(o.area > ENLARGED * source_mask.sum() and iou(o.mask, source_mask) < 0.8 and (o.mask & source_mask).any()
                   for o in same):
                return "kept object enlarged"
        return "kept object changed"
    if not checks["old_gone"]:
        return "old background left"
    if analysis.background != case.target.background:
        return "wrong background colour"
    return "wrong pattern"
