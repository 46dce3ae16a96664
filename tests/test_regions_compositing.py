"""Crop boxes and model sizes (regions.py), feathered alpha and colour match (compositing.py), auto-mask maths."""

import numpy as np
import pytest
import torch

from pfbdiff.engine import automask
from pfbdiff.errors import PFBDiffError
from pfbdiff.photo import colour_match, compositing, morphology, regions
from pfbdiff.photo.regions import CropBox, plan_region

NATIVE = 512


def _mask(size, box):
    width, height = size
    mask = np.zeros((height, width), np.float32)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 1
    return mask


def _plan(size, box, **kwargs):
    support = regions.support_box(_mask(size, box))
    return plan_region(size, support, native=NATIVE, min_side=64, **kwargs)


def _check_native(plan):
    width, height = plan.model_size
    assert width % 8 == 0 and height % 8 == 0
    assert abs(width * height / NATIVE**2 - 1) < 0.1


def test_small_mask_in_a_large_photo_is_cropped_to_native_size():
    plan = _plan((4000, 3000), (1000, 1000, 1100, 1060))
    assert plan.cropped
    box = plan.box
    assert box.left <= 1000 and box.top <= 1000 and box.right >= 1100 and box.bottom >= 1060
    assert box.width < 400 and box.height < 400  # a crop, not the photo
    _check_native(plan)
    assert abs(plan.model_size[0] / plan.model_size[1] - box.width / box.height) < 0.1  # aspect kept


@pytest.mark.parametrize("mask_box", [(3990, 2990, 4000, 3000), (0, 0, 15, 12), (3980, 0, 4000, 3000), (0, 1500, 4000, 1520)])
def test_masks_at_edges_corners_and_across_the_image(mask_box):
    plan = _plan((4000, 3000), mask_box)
    box = plan.box
    assert 0 <= box.left < box.right <= 4000 and 0 <= box.top < box.bottom <= 3000
    left, top, right, bottom = mask_box
    assert box.left <= left and box.top <= top and box.right >= right and box.bottom >= bottom
    assert max(box.width, box.height) <= regions.MAX_ASPECT * min(box.width, box.height) + 1
    _check_native(plan)


def test_a_mask_covering_most_of_the_photo_edits_the_whole_photo_scaled_down():
    plan = _plan((4000, 3000), (100, 100, 3900, 2900))
    assert plan.box == CropBox.full((4000, 3000))
    _check_native(plan)


def test_padding_feather_margin_and_explicit_padding():
    small = _plan((4000, 3000), (2000, 1500, 2040, 1540), padding=0)
    assert small.box == CropBox(2000, 1500, 2040, 1540)
    margin = _plan((4000, 3000), (2000, 1500, 2040, 1540), padding=10, margin=5)
    assert margin.box == CropBox(1985, 1485, 2055, 1555)
    auto = _plan((4000, 3000), (2000, 1500, 2040, 1540))
    assert auto.box.width == 40 + 2 * regions.MIN_PADDING
    with pytest.raises(PFBDiffError, match="padding"):
        _plan((4000, 3000), (0, 0, 10, 10), padding=-1)


def test_auto_crop_only_for_images_larger_than_native_and_whole_edit_size_limit():
    assert not _plan((512, 512), (0, 0, 10, 10)).cropped
    assert _plan((513, 512), (0, 0, 10, 10)).cropped
    assert _plan((300, 200), (0, 0, 10, 10), crop=True).cropped
    whole = _plan((133, 75), (0, 0, 10, 10))
    assert whole.box == CropBox.full((133, 75)) and whole.model_size == (136, 72)
    with pytest.raises(PFBDiffError, match="too large to edit whole"):
        _plan((4000, 3000), (0, 0, 10, 10), crop=False)
    with pytest.raises(PFBDiffError, match="crop must be"):
        _plan((100, 100), (0, 0, 10, 10), crop="yes")


def test_tiny_images_are_raised_to_the_minimum_model_side():
    assert regions.whole_size((1, 1), 8, 64) == (64, 64)
    assert regions.whole_size((20, 10), 8, 64) == (128, 64)


# ------------------------------------------------------------------------------------------ alpha


def test_grow_and_shrink_keep_soft_values_and_ignore_the_image_border():
    mask = _mask((20, 20), (5, 5, 10, 10)) * 0.6
    grown = compositing.grow_mask(mask, 2)
    assert grown[3:12, 3:12].min() == pytest.approx(0.6) and grown.sum() == pytest.approx(0.6 * 81)
    assert compositing.grow_mask(mask, -2).sum() == pytest.approx(0.6)
    full = np.ones((10, 10), np.float32)
    assert compositing.grow_mask(full, -3).min() == 1.0


@pytest.mark.parametrize("radius", [1, 3, 7, 30])
def test_grow_and_shrink_take_the_extreme_of_the_square_window_whatever_its_width(radius):
    """The square window's maximum / minimum, positions past the border ignored, checked pixel by pixel; a window
    wider than the mask (30) is as exact as a narrow one."""
    rng = np.random.default_rng(radius)
    mask = (rng.random((37, 45)) * (rng.random((37, 45)) > 0.6)).astype(np.float32)
    for sign, extreme in ((1, np.max), (-1, np.min)):
        got = compositing.grow_mask(mask, sign * radius)
        for y, x in zip(rng.integers(0, 37, 60), rng.integers(0, 45, 60)):
            window = mask[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1]
            assert got[y, x] == extreme(window)


def test_growing_from_neighbour_to_neighbour_k_times_is_the_square_window_and_stops_where_colours_differ():
    """The pixel rules' growth (``grown_along``) with every step allowed reaches what the square window of radius k
    does; a step the colours forbid is never taken, so a wall stops it, and ``within`` bounds where it may go."""
    rng = np.random.default_rng(5)
    region = rng.random((30, 40)) > 0.97
    for k in (1, 2, 5):
        np.testing.assert_array_equal(morphology.grown_along(region, None, limit=k), morphology.dilated(region, k))
    seed = np.zeros((20, 20), bool)
    seed[10, 2] = True
    wall = np.zeros((20, 20), bool)
    wall[:, 8] = True  # column 8 is another colour: no step leads into it
    steps = {offset: ~wall for offset in morphology.NEIGHBOURS}
    grown = morphology.grown_along(seed, steps)
    assert grown[:, :8].all() and not grown[:, 8:].any()
    within = np.zeros((20, 20), bool)
    within[8:13, :] = True
    left_of_wall = np.arange(20) < 8
    np.testing.assert_array_equal(morphology.grown_along(seed, steps, within=within), within & left_of_wall)


def test_a_masks_core_is_the_mask_less_an_edge_band_a_share_of_its_size_wide_and_a_thin_mask_keeps_itself():
    mask = _mask((64, 64), (12, 12, 52, 52))  # 40 px: a share of 0.1 is a band 4 px wide
    np.testing.assert_array_equal(morphology.mask_core(mask, 0.1), _mask((64, 64), (16, 16, 48, 48)))
    np.testing.assert_array_equal(morphology.mask_core(mask, 0.0), mask)
    line = _mask((64, 64), (4, 30, 60, 32))  # 2 px thick: any band would leave nothing
    np.testing.assert_array_equal(morphology.mask_core(line, 0.1), line)


@pytest.mark.parametrize("placement", compositing.FEATHER_PLACEMENTS)
def test_feathered_alpha_is_exactly_zero_beyond_its_reach(placement):
    mask = _mask((80, 60), (20, 15, 50, 40))
    alpha = compositing.feather_alpha(mask, 5, placement)
    reach = compositing.feather_reach(5, placement)
    outside = compositing.grow_mask(mask, reach) == 0
    assert (alpha[outside] == 0).all() and 0 <= alpha.min() and alpha.max() == 1.0
    fractional = (alpha > 0) & (alpha < 1)
    assert fractional.any()
    if placement == "inside":
        assert (alpha <= mask).all()
    if placement == "outside":
        assert (alpha >= mask).all()


def test_soft_masks_are_their_own_alpha_and_thin_masks_are_not_erased():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))
    assert compositing.auto_feather(ramp) == 0
    assert np.array_equal(compositing.feather_alpha(ramp, 0), ramp)
    line = _mask((100, 100), (0, 48, 100, 52))
    width = compositing.auto_feather(line)
    assert compositing.feather_alpha(line, width).max() == 1.0
    square = _mask((1000, 1000), (100, 100, 900, 900))
    assert compositing.auto_feather(square) == 48  # 8 % of 800 px, capped


def test_the_feather_band_does_not_blend_the_old_object_back():
    """A tight mask whose edge the old object touches: where the band shows the object, the alpha is the mask's
    (no faint outline of it in the result); where it shows the textured surroundings, the feather stays."""
    rng = np.random.default_rng(2)
    source = np.clip(rng.normal((90.0, 140.0, 60.0), 8.0, (64, 64, 3)), 0, 255)  # grass-like texture
    source[20:40, 22:42] = (200.0, 40.0, 40.0)  # the old object ...
    mask = _mask((64, 64), (20, 18, 44, 44))  # ... its left and top edges on the mask's edge
    feathered = compositing.feather_alpha(mask, 4)
    alpha = compositing.without_old_content(feathered, mask, source, ring_width=4)
    band = (feathered > 0) & (feathered < 1)
    on_object = band & (source[..., 1] < 80)
    assert on_object.any() and (band & ~on_object).any()
    assert (alpha[on_object] == 1.0).all()
    assert np.array_equal(alpha[~on_object], feathered[~on_object])  # surroundings feathered, outside exactly 0
    plain = np.clip(rng.normal(128.0, 20.0, (64, 64, 3)), 0, 255)  # noise alone is the surroundings' too
    assert np.array_equal(compositing.without_old_content(feathered, mask, plain, ring_width=4), feathered)


def test_colours_are_matched_only_where_one_surface_runs_across_the_mask_edge():
    """Object edit: the background runs across the edge, and the VAE's shift measured there is removed. Background
    edit: outside the mask is the kept subject, inside the old background; the subject's rim says nothing about the
    new background's colour, which is pasted back as generated."""
    source = np.full((64, 64, 3), (230.0, 200.0, 40.0), np.float32)
    source[24:40, 24:40] = (200.0, 30.0, 30.0)  # the subject
    object_mask = _mask((64, 64), (20, 20, 44, 44))
    ring = compositing.reference_ring(object_mask, object_mask, 4)
    assert np.array_equal(compositing.continuing_surface(ring, object_mask, source, 4), ring)

    background_mask = np.ones((64, 64), np.float32)
    background_mask[24:40, 24:40] = 0.0  # snapped to the subject's outline
    generated = np.full((64, 64, 3), (40.0, 80.0, 220.0), np.float32)
    generated[24:40, 24:40] = source[24:40, 24:40] + (-8.0, 20.0, 25.0)  # the subject, redrawn a little off
    ring = compositing.reference_ring(background_mask, background_mask, 4)
    assert not compositing.continuing_surface(ring, background_mask, source, 4).any()
    box = CropBox(0, 0, 64, 64)
    out, _ = compositing.composite(source.astype(np.uint8), generated.astype(np.uint8), box, background_mask,
                                   background_mask, "local")
    assert np.array_equal(out[background_mask > 0], generated.astype(np.uint8)[background_mask > 0])
    assert np.array_equal(out[background_mask == 0], source.astype(np.uint8)[background_mask == 0])


def test_paste_back_is_exact_where_alpha_is_zero_and_blends_elsewhere():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (30, 40, 3)).astype(np.float32)
    alpha = np.zeros((30, 40), np.float32)
    alpha[10:20, 10:30] = 0.25
    out = compositing.paste_back(source, generated, alpha)
    assert np.array_equal(out[alpha == 0], source[alpha == 0])
    expected = np.round(0.25 * generated + 0.75 * source).astype(np.uint8)
    assert np.array_equal(out[alpha > 0], expected[alpha > 0])


@pytest.mark.parametrize("mode", ["mean", "local"])
def test_colour_match_removes_a_colour_shift_measured_around_the_mask(mode):
    rng = np.random.default_rng(1)
    source = rng.integers(60, 200, (64, 64, 3)).astype(np.float32)
    mask = _mask((64, 64), (16, 16, 48, 48))
    generated = source + np.array([20.0, -10.0, 5.0])
    generated[16:48, 16:48] = 128  # new content inside
    ring = compositing.reference_ring(mask, mask, 4)
    matched = colour_match.match_colours(generated, source, ring, mode)
    assert np.abs(matched - source)[ring].mean() < 0.5 < np.abs(generated - source)[ring].mean()
    assert np.allclose(matched[30, 30], 128 + np.array([-20.0, 10.0, -5.0]), atol=0.5)
    assert np.array_equal(colour_match.match_colours(generated, source, ring, "none"), generated)


@pytest.mark.parametrize("mode", ["mean", "local"])
def test_colour_match_ignores_ring_pixels_the_edit_changed(mode):
    """A background replacement changes the ring around the kept object: that is content, not a colour shift."""
    source = np.full((64, 64, 3), (230.0, 200.0, 40.0), np.float32)  # old yellow background ...
    source[24:40, 24:40] = (200.0, 30.0, 30.0)  # ... around a red object
    mask = 1 - _mask((64, 64), (16, 16, 48, 48))  # a coarse box around the object is kept
    generated = np.full((64, 64, 3), (40.0, 80.0, 220.0), np.float32)  # new blue background, halo included
    generated[24:40, 24:40] = source[24:40, 24:40] + 6.0  # the object, decoded 6 levels too bright
    ring = compositing.reference_ring(mask, mask, 4)
    assert colour_match.match_colours(generated, source, ring, mode)[0, 0] == pytest.approx((40.0, 80.0, 220.0))
    generated[16:24, 16:48] = source[16:24, 16:48] + 6.0  # part of the halo reproduced, with the shift
    assert colour_match.match_colours(generated, source, ring, mode)[0, 0] == pytest.approx((34.0, 74.0, 214.0), abs=0.01)


# ------------------------------------------------------------------------------------------ auto-mask maths


def test_auto_mask_rescale_threshold_clip_and_iou():
    difference = torch.zeros(1, 1, 8, 8)
    difference[..., 2:6, 2:6] = 4.0
    soft = automask.rescale(difference)
    assert soft.max() == 1.0 and soft.min() == 0.0
    binary = automask.upsample_mask(soft, (32, 32))
    assert set(np.unique(binary)) == {0.0, 1.0} and binary[16, 16] == 1 and binary[0, 0] == 0
    bound = _mask((32, 32), (0, 0, 16, 32))
    clipped = automask.clip_to_bound(binary, bound)
    assert (clipped[bound == 0] == 0).all() and (clipped <= binary).all()
    assert automask.iou(binary, binary) == 1.0 and automask.iou(binary, 1 - binary) == 0.0
    with pytest.raises(PFBDiffError, match="threshold"):
        automask.upsample_mask(soft, (8, 8), threshold=1.0)


def test_a_feather_wider_than_the_mask_ramp_needs_is_exact_and_quick():
    """Once erosion has emptied the mask, every further ramp step adds the same map: adding them at once is exact."""
    import torch.nn.functional as F

    mask = np.zeros((24, 32), np.float32)
    mask[6:18, 8:22] = 1.0
    feather = 300
    current = torch.from_numpy(mask)[None, None]
    total = current.clone()
    for _ in range(feather):
        current = -F.max_pool2d(-current, 3, stride=1, padding=1)
        total += current
    ramp = (total / (feather + 1))[0, 0].numpy()
    expected = np.minimum(ramp * ramp * (3.0 - 2.0 * ramp), mask)
    np.testing.assert_array_equal(compositing.feather_alpha(mask, feather, "inside"), expected)
