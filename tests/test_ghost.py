"""Background edits: the kept subject's ghost (a larger copy the model draws around it) gives way to the new
background, filled with the background's own pattern."""

import numpy as np
import pytest
from PIL import Image

from pfbdiff import get_preset
from pfbdiff.bench.cases import make_cases, render_case
from pfbdiff.errors import PFBDiffError
from pfbdiff.photo.compositing import composite
from pfbdiff.photo.ghost import pattern_fill, without_ghost
from pfbdiff.photo.regions import CropBox
from pfbdiff.shapes.oracles import object_kept

ORANGE, YELLOW = np.array([245, 147, 30]), np.array([240, 220, 40])
BLUE, NAVY = np.array([30, 90, 230]), np.array([20, 30, 90])


def _pattern(kind: str, size: int = 64) -> np.ndarray:
    """A two-colour new background: vertical stripes 4 px wide, or checks of 6 px cells."""
    yy, xx = np.mgrid[0:size, 0:size]
    second = (xx // 4) % 2 == 1 if kind == "stripes" else ((yy // 6) + (xx // 6)) % 2 == 1
    return np.where(second[..., None], NAVY, BLUE).astype(np.float32)


def _disc(radius: float, centre=(32, 32), size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(yy - centre[0], xx - centre[1]) <= radius


@pytest.mark.parametrize("kind", ["stripes", "checks"])
def test_the_pattern_fill_runs_a_repeating_background_on_through_a_hole_exactly(kind):
    background = _pattern(kind)
    hole = _disc(9)
    smeared = background.copy()
    smeared[hole] = 128.0
    assert np.array_equal(pattern_fill(smeared, ~hole, hole, max_shift=16), background)


def _background_edit(ghost_colour=None, radius: float = 12, centre=(30, 36)):
    """An orange disc kept on a new striped background, with the model's ghost around it (a copy of ``radius`` in
    ``ghost_colour`` with a soft rim, none without a colour): the pasted image, its alpha and edit region, and the
    image without the ghost."""
    subject = _disc(6)
    clean = _pattern("stripes")
    clean[subject] = ORANGE
    drawn = clean.copy()
    if ghost_colour is not None:
        ghost, rim = _disc(radius, centre), _disc(radius + 1.5, centre) & ~_disc(radius, centre)
        drawn[ghost & ~subject] = ghost_colour
        drawn[rim & ~subject] = 0.5 * (drawn[rim & ~subject] + ghost_colour)  # the copy's soft edge
    edit = ~subject
    return drawn.astype(np.uint8), edit.astype(np.float32), edit, clean.astype(np.uint8)


def test_a_larger_copy_of_the_subject_around_it_gives_way_to_the_new_backgrounds_pattern():
    # off-centre: a copy drawn larger and beside the subject, in a softer shade of its colour
    pasted, alpha, edit, clean = _background_edit(ORANGE + (10, 30, 5))
    out = without_ghost(pasted, alpha, np.zeros_like(edit), edit, 0.25)
    assert np.array_equal(out, clean)


def test_what_the_new_background_has_elsewhere_and_what_does_not_touch_the_subject_is_no_ghost():
    pasted, alpha, edit, _ = _background_edit()
    apart = _disc(4, centre=(10, 52))  # the subject's colour, but not joined to it: an object of the new background
    pasted[apart] = ORANGE
    assert np.array_equal(without_ghost(pasted, alpha, np.zeros_like(edit), edit, 0.25), pasted)
    orange_stripes = pasted.copy()
    orange_stripes[(np.all(pasted == NAVY, -1))] = ORANGE  # the subject's colour is one of the new stripes'
    assert np.array_equal(without_ghost(orange_stripes, alpha, np.zeros_like(edit), edit, 0.25), orange_stripes)


def test_only_generated_pixels_change_and_the_subject_stays_exact():
    pasted, alpha, edit, _ = _background_edit(ORANGE + (10, 30, 5))
    alpha[_disc(10, centre=(30, 36)) & edit] = 0.5  # say part of the copy was blended with the photo
    out = without_ghost(pasted, alpha, np.zeros_like(edit), edit, 0.25)
    changed = np.any(out != pasted, -1)
    assert changed.any() and not changed[alpha < 1].any()
    assert np.array_equal(out[~edit], pasted[~edit])


def test_the_ghost_reach_is_a_share_of_the_box_and_zero_turns_the_rule_off():
    with pytest.raises(PFBDiffError, match="ghost_reach"):
        get_preset("background", ghost_reach=1.5)
    pasted, alpha, edit, _ = _background_edit(ORANGE + (10, 30, 5))
    assert np.array_equal(composite(pasted, pasted, CropBox(0, 0, 64, 64), edit.astype(np.float32), alpha,
                                    "none", outline_box=np.zeros_like(edit), ghost_reach=0.0)[0], pasted)


def test_a_background_edit_keeps_the_subject_whole_where_the_model_drew_it_again_around_itself(shapes_pipe):
    """A blue circle on yellow stripes: the model draws a larger blue disc around it, which reads as the circle
    enlarged; cleared, the circle is found as it was."""
    case = make_cases("background", 1, 434)[0]
    images = render_case(case, 64)
    inversion = shapes_pipe.invert(Image.fromarray(images.source), case.source_caption)
    edits = {reach: np.asarray(shapes_pipe.edit(inversion, images.mask.astype(np.float32), case.target_caption,
                                                preset="background", ghost_reach=reach).images[0])
             for reach in (0.0, 0.25)}
    changed = np.any(edits[0.25] != edits[0.0], -1)
    assert changed.sum() > 50 and not changed[images.labels > 0].any()
    kept = [object_kept(images.labels, obj, edits[0.25], object_index=i) for i, obj in enumerate(case.source.objects)]
    assert all(kept)
    assert not all(object_kept(images.labels, obj, edits[0.0], object_index=i)
                   for i, obj in enumerate(case.source.objects))
