"""New content is not cut (photo/new_content.py): the paste-back takes a new object whole, in the feather band and
past the mask's edge up to the reach, and nothing else outside the mask changes."""

import numpy as np
import pytest

from pfbdiff.photo import compositing
from pfbdiff.photo.morphology import share_of_size
from pfbdiff.photo.new_content import followed, new_content
from pfbdiff.photo.regions import CropBox

RED = (210.0, 30.0, 40.0)


def _scene(seed=0):
    """A striped photo, a box mask, and a generation that is the photo a little off (the VAE's shift and noise)
    with a red disc drawn in the mask whose right side reaches 6 px past the mask's edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    source = np.where(((yy // 4) % 2 == 0)[..., None], (60.0, 120.0, 200.0), (30.0, 60.0, 110.0))
    source = np.clip(source + rng.normal(0, 3, source.shape), 0, 255)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:44] = 1.0
    generated = np.clip(source + 6.0 + rng.normal(0, 3, source.shape), 0, 255)
    disc = (yy - 32) ** 2 + (xx - 36) ** 2 <= 14**2  # x reaches 50: 6 px past the mask's right edge (x = 43)
    generated[disc] = RED
    return source.astype(np.uint8), generated.astype(np.uint8), mask, disc


def _ring(mask, alpha):
    return compositing.reference_ring(mask, alpha, 4)


def test_a_new_object_crossing_the_mask_edge_is_followed_up_to_the_reach_and_not_faded():
    source, generated, mask, disc = _scene()
    alpha = compositing.feather_alpha(mask, 4)
    out = followed(alpha, mask, generated, source, _ring(mask, alpha), reach=3)
    past_edge = np.zeros_like(disc)
    past_edge[:, 44:47] = True  # 1..3 px beyond the mask's right edge
    assert np.array_equal(out[~(mask > 0)] > 0, (disc & past_edge)[~(mask > 0)])  # that and nothing else outside
    assert (out[disc & past_edge] == 1.0).all()
    band = (alpha > 0) & (alpha < 1)
    assert (out[band & disc] == 1.0).all()  # the disc's rim in the band is not faded into the photo
    assert np.array_equal(out[band & ~disc], alpha[band & ~disc])  # the surroundings there still are


def test_the_vae_shift_and_a_surface_running_on_across_the_edge_are_not_new_content():
    source, generated, mask, disc = _scene()
    alpha = compositing.feather_alpha(mask, 4)
    shifted = np.roll(source, 2, axis=0)  # the stripes drawn 2 px off: unlike the photo's pixel, like its ring
    where = ~(mask > 0) | ((alpha > 0) & (alpha < 1))
    assert not new_content(generated, source, _ring(mask, alpha), where & ~disc).any()
    assert not new_content(shifted, source, _ring(mask, alpha), where).any()
    plain = source.copy()
    plain[disc] = generated[disc]  # only the disc is new; without a reach, only its rim in the band changes
    out = followed(alpha, mask, plain, source, _ring(mask, alpha), reach=0)
    assert np.array_equal(out[~disc], alpha[~disc]) and (out[disc & (mask > 0)] == 1.0).all()


def test_the_reach_is_a_share_of_the_mask_size():
    mask = np.zeros((100, 100), np.float32)
    mask[10:50, 10:50] = 1.0  # 40 px square
    assert share_of_size(mask, 0.25) == 10 and share_of_size(mask, 0.0) == 0
    assert share_of_size(mask * 0.4, 0.25) == 0  # a soft mask below one half has no size to outgrow


@pytest.mark.parametrize("reach", [None, 0, 3])
def test_the_composite_reports_the_alpha_it_used_and_keeps_every_other_pixel(reach):
    source, generated, mask, disc = _scene(1)
    alpha = compositing.feather_alpha(mask, 4)
    box = CropBox.full((64, 64))
    image, used = compositing.composite(source, generated, box, mask, alpha, "local", outgrowth=reach)
    assert np.array_equal(image[used == 0], source[used == 0])  # the photo's own bytes wherever the alpha is 0
    assert np.array_equal(used > 0, (alpha > 0) | (disc & (used > 0)))  # only the new disc joined
    assert (used[disc & ~(mask > 0)] > 0).any() == bool(reach)
    if reach is None:
        assert np.array_equal(used, alpha)
    bound = mask.copy()  # the user's mask as a hard bound: nothing past it, whatever the reach
    _, clipped = compositing.composite(source, generated, box, mask, alpha, "local", outgrowth=3, bound_box=bound)
    assert not (clipped[bound == 0] > 0).any()


def test_a_soft_mask_stays_its_own_alpha_and_only_new_content_past_its_support_joins():
    source, generated, _, disc = _scene(2)
    soft = np.zeros((64, 64), np.float32)
    soft[16:48, 16:44] = np.linspace(0.9, 0.3, 28, dtype=np.float32)  # fading towards the disc's side
    out = followed(soft, soft, generated, source, _ring(soft, soft), reach=3)
    assert np.array_equal(out[soft > 0], soft[soft > 0])
    assert (out[disc & (soft == 0)] > 0).any() and not (out[~disc & (soft == 0)] > 0).any()


def test_a_stray_colour_by_the_edge_unlike_the_new_object_is_not_followed():
    """A speck the decoder drew across the mask's left edge, in a colour the new object inside the mask does not
    have, stays faded in the band and cut at the edge; the object's own rim across the right edge is followed."""
    source, generated, mask, disc = _scene(3)
    speck = np.zeros_like(disc)
    speck[30:33, 13:19] = True  # 3 px either side of the left edge (x = 16)
    generated[speck] = (40, 230, 60)
    alpha = compositing.feather_alpha(mask, 4)
    out = followed(alpha, mask, generated, source, _ring(mask, alpha), reach=3)
    assert np.array_equal(out[speck], alpha[speck]) and (out[disc & ~(mask > 0)] > 0).any()
