"""Why a ShapesBench edit failed (pfbdiff.bench.diagnosis): pictures made to fail in one known way are given that
cause, and a right answer none."""

import dataclasses

import pytest

from pfbdiff.bench.cases import make_case, render_case
from pfbdiff.bench.diagnosis import failure_cause
from pfbdiff.bench.metrics import edit_success
from pfbdiff.shapes.oracles import analyse
from pfbdiff.shapes.world import Scene, render


def _cause(images, picture, raw=None):
    analysis = analyse(picture)
    checks = edit_success(images, picture, analysis)
    checks["success_raw"] = checks["success"] if raw is None else edit_success(images, raw)["success"]
    return failure_cause(images, analysis, checks)


def _case(task, want):
    """The first case of ``task`` for which ``want(case)`` holds."""
    return next(c for c in (make_case(task, i) for i in range(300)) if want(c))


def test_the_right_answer_has_no_cause_and_the_untouched_photo_a_telling_one():
    for task in ("object", "multi-object", "background"):
        images = render_case(make_case(task, 0), 64)
        assert _cause(images, images.ideal) is None
    multi = render_case(make_case("multi-object", 0), 64)
    assert _cause(multi, multi.source) in ("missing", "wrong colour", "wrong shape")
    background = render_case(make_case("background", 0), 64)
    assert _cause(background, background.source) == "old background left"


def test_two_new_objects_drawn_in_each_others_masks_are_swapped():
    case = _case("multi-object", lambda c: c.mask_kind == "box" and len({(o.colour, o.shape) for o in c.target.objects}) == 2)
    images = render_case(case, 64)
    a, b = (case.target.objects[i] for i in case.edited)
    swapped = dataclasses.replace(case.target, objects=tuple(
        dataclasses.replace(o, colour=other.colour, shape=other.shape)
        for o, other in ((case.target.objects[i], b if i == case.edited[0] else a) for i in range(2))))
    assert _cause(images, render(swapped, 64).image) == "swapped"


def test_a_new_object_with_the_wrong_colour_or_shape_is_named_so():
    case = _case("object", lambda c: len(c.target.objects) == 1)
    images = render_case(case, 64)
    new = case.target.objects[case.edited[0]]
    colour = next(c for c in ("red", "blue", "green", "yellow") if c not in (new.colour, case.target.background))
    shape = next(s for s in ("circle", "square", "triangle") if s != new.shape)
    for change, cause in (({"colour": colour}, "wrong colour"), ({"shape": shape}, "wrong shape")):
        scene = dataclasses.replace(case.target, objects=(dataclasses.replace(new, **change),))
        assert _cause(images, render(scene, 64).image) == cause


def test_a_result_that_only_the_paste_back_spoiled_is_cut_by_it():
    images = render_case(make_case("object", 0), 64)
    assert _cause(images, images.source, raw=images.ideal) == "cut by the paste-back"


def test_an_enlarged_kept_object_on_the_new_background_is_named():
    def central(c):
        o = c.source.objects[0]
        return len(c.source.objects) == 1 and o.size < 0.3 and 0.3 < o.cx < 0.7 and 0.3 < o.cy < 0.7

    case = _case("background", central)
    images = render_case(case, 64)
    obj = case.target.objects[0]
    bigger = dataclasses.replace(case.target, objects=(dataclasses.replace(obj, size=obj.size * 1.5),))
    assert _cause(images, render(bigger, 64).image) == "kept object enlarged"
    recoloured = Scene(case.target.background, case.target.pattern, ())
    assert _cause(images, render(recoloured, 64).image) == "kept object changed"


@pytest.mark.parametrize("change, cause", [("background", "wrong background colour"), ("pattern", "wrong pattern")])
def test_a_new_background_of_the_wrong_colour_or_pattern_is_named(change, cause):
    case = _case("background", lambda c: True)
    images = render_case(case, 64)
    target = case.target
    if change == "background":
        value = next(c for c in ("red", "blue", "green", "yellow", "purple", "orange")
                     if c not in (target.background, case.source.background) and all(o.colour != c for o in target.objects))
    else:
        value = next(p for p in ("plain", "striped", "checkered") if p != target.pattern)
    assert _cause(images, render(dataclasses.replace(target, **{change: value}), 64).image) == cause


def test_the_report_counts_causes_only_for_methods_whose_results_were_diagnosed():
    """A record joined from runs made before the diagnosis existed must not show those methods as never failing."""
    from pfbdiff.bench.report import failure_section, finalise

    def case(index, results):
        return {"task": "background", "results": results,
                "text_to_image": {"target": True, "full": True, "unet_calls": 1, "seconds": 0.1}}

    diagnosed = {"success": False, "failure": "kept object enlarged"}
    right = {"success": True, "failure": None}
    old = {"success": False}  # recorded before causes were
    result = finalise({"config": {"tasks": ["background"], "methods": ["pfb", "perfect", "old"]},
                       "cases": [case(0, {"pfb": diagnosed, "perfect": right, "old": old}),
                                 case(1, {"pfb": right, "perfect": right, "old": old})]}, 1.0)
    assert result["summary"]["background"]["failures"] == {"pfb": {"kept object enlarged": 1}, "perfect": {}}
    table = "\n".join(failure_section(result, ["background"]))
    assert "| pfb | 1 |" in table and "| perfect | 0 |" in table and "| old |" not in table
