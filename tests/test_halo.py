"""A coarse mask around a subject: the old background between them joins a background edit, and stays the photo's own
in an attribute edit (the inner halo)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pfbdiff.bench.cases import make_cases, render_case
from pfbdiff.io import tensors
from pfbdiff.photo.compositing import PasteBack, composite
from pfbdiff.photo.halo import absorb_halo, inner_halo, snap_to_subject
from pfbdiff.photo.regions import CropBox
from pfbdiff.shapes.binary_masks import dilate, erode


def _two_tone(pattern: str) -> np.ndarray:
    """A 24×32 background: plain, or horizontal stripes two rows high of two very different colours."""
    image = np.zeros((24, 32, 3), np.uint8)
    image[...] = (230, 200, 40)
    if pattern == "striped":
        image[(np.arange(24) // 2) % 2 == 1] = (40, 60, 200)
    return image


@pytest.mark.parametrize("pattern", ["plain", "striped"])
def test_halo_grows_along_the_masked_surface_at_most_reach_pixels(pattern):
    image = _two_tone(pattern)
    mask = np.zeros((24, 32), np.float32)
    mask[:, :10] = 1.0
    grown = absorb_halo(mask, image, reach=3)
    expected = np.zeros_like(mask)
    expected[:, :13] = 1.0
    assert np.array_equal(grown, expected)


def test_halo_stops_at_the_subject_outline():
    case = next(c for c in make_cases("background", 6) if len(c.source.objects) == 2)
    images = render_case(case, 64)
    objects = images.labels > 0
    halo = ~images.mask & ~objects
    assert halo.sum() > 100  # the coarse mask leaves a real band of old background
    grown = absorb_halo(images.mask.astype(np.float32), images.source, reach=8) > 0.5
    assert not grown[erode(objects, 1)].any()  # only the objects' anti-aliased outline may join
    assert grown[halo].mean() > 0.8  # the rest: a corridor longer than the reach, at the image border
    assert (grown >= images.mask).all()


def test_halo_does_not_creep_through_a_soft_edge_into_a_subject_of_a_near_colour():
    """An orange disc on yellow (76 levels apart) with a blurred rim: each step of the ramp is under the colour
    distance, so growing from neighbour to neighbour alone would repaint the disc; the halo only takes pixels
    alike the old background it continues."""
    yellow, orange = np.array([240, 220, 40.0]), np.array([245, 147, 30.0])
    yy, xx = np.mgrid[0:40, 0:40]
    cover = np.clip((10.0 - np.hypot(yy - 20, xx - 20)) / 4 + 0.5, 0, 1)  # a 4 px ramp from yellow to orange
    image = np.round(cover[..., None] * orange + (1 - cover[..., None]) * yellow).astype(np.uint8)
    assert np.linalg.norm(np.diff(image.astype(float), axis=1), axis=-1).max() < 30  # every step is small
    mask = (np.hypot(yy - 20, xx - 20) > 15).astype(np.float32)  # a coarse mask: 5 px of yellow left
    grown = absorb_halo(mask, image, reach=8) > 0.5
    assert not grown[cover > 0.5].any()  # the disc's own half of the ramp is kept
    assert grown[cover == 0].all()  # the old yellow band joins


def test_halo_follows_a_strip_between_the_subject_and_the_photo_edge_however_long():
    """A keep-box drawn around a subject near the bottom edge is cut by it: the strip of old background under the
    subject runs farther from the mask than the reach, but it is narrow, so it joins all the same."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[...] = (230, 200, 40)
    subject = np.zeros((48, 64), bool)
    subject[24:42, 20:45] = True  # 6 px above the bottom edge
    image[subject] = (200, 30, 30)
    mask = np.ones((48, 64), np.float32)
    mask[20:, 16:49] = 0.0  # the kept box: 4 px around the subject, down to the edge
    grown = absorb_halo(mask, image, reach=8) > 0.5
    assert np.array_equal(grown, ~subject)
    inside_the_photo = absorb_halo(mask, image, reach=8, photo_edges=(False, False, False, False)) > 0.5
    assert (~inside_the_photo[42:, 24:41]).all()  # a crop's side is no edge: the strip is left as it was


def test_halo_keeps_soft_mask_values_and_does_nothing_at_reach_zero():
    image = _two_tone("plain")
    mask = np.zeros((24, 32), np.float32)
    mask[:, :10] = 0.6
    assert np.array_equal(absorb_halo(mask, image, reach=0), mask)
    grown = absorb_halo(mask, image, reach=2)
    assert np.array_equal(grown[:, :10], mask[:, :10]) and (grown[:, 10:12] == 1.0).all() and (grown[:, 12:] == 0).all()


def test_background_preset_regenerates_the_halo_and_pastes_the_subject_back_exactly(tiny_pipe):
    case = next(c for c in make_cases("background", 6) if len(c.source.objects) == 2)
    images = render_case(case, 64)
    objects = images.labels > 0
    halo = ~images.mask & ~objects
    inversion = tiny_pipe.invert(Image.fromarray(images.source), case.source_caption, 4)
    result = {}
    for reach in (0, 8):
        out = tiny_pipe.edit(inversion, images.mask.astype(np.float32), case.target_caption, preset="background",
                             halo=reach, guidance_scale=1.0)
        result[reach] = (np.asarray(out.images[0]), np.asarray(out.masks[0]) / 255.0)
    for picture, alpha in result.values():
        assert np.array_equal(picture[objects & (alpha == 0)], images.source[objects & (alpha == 0)])
    assert (result[0][1][halo] == 0).all()  # without the halo the band is outside the mask: kept as it was
    assert np.array_equal(result[0][0][halo], images.source[halo])
    assert result[8][1][halo].mean() > 0.8 and not result[8][1][erode(objects, 1)].any()
    assert np.abs(result[8][0][halo].astype(int) - images.source[halo]).mean() > 10


def test_a_background_snapped_to_the_subject_is_not_colour_matched_to_it(shapes_pipe):
    """With the halo the ring around the mask is the kept subject, which the new background does not continue (the
    model's ghost of the subject beside it would read as a colour shift): the new background keeps the generation's
    own colours unless a colour match is asked for."""
    case = make_cases("background", 6)[5]  # the model draws a ghost of a subject beside it
    images = render_case(case, 64)
    inversion = shapes_pipe.invert(Image.fromarray(images.source), case.source_caption)
    largest_change = {}
    for colour_match in (None, "local"):
        out = shapes_pipe.edit(inversion, images.mask.astype(np.float32), case.target_caption, preset="background",
                               colour_match=colour_match)
        decoded = np.asarray(tensors.tensor_to_pil(shapes_pipe.decode_latents(out.latents))[0])
        away = erode(np.asarray(out.masks[0]) == 255, 4)  # the new background, away from the subject's echo
        largest_change[colour_match] = np.abs(np.asarray(out.images[0])[away].astype(int) - decoded[away]).max()
    assert largest_change[None] == 0
    assert largest_change["local"] > 10


def _subject_on_blue(mixed_share: float):
    """A red 10×10 square on blue, its right edge a column of pixels ``mixed_share`` red, and a background mask
    snapped to it (the halo's outline: that column)."""
    image = np.zeros((24, 32, 3), np.uint8)
    image[...] = (30, 40, 200)
    image[7:17, 8:18] = (210, 30, 30)
    image[7:17, 18] = np.round(mixed_share * np.array([210, 30, 30]) + (1 - mixed_share) * np.array([30, 40, 200]))
    mask = np.ones((24, 32), np.float32)
    mask[5:19, 6:21] = 0.0  # a coarse keep-box 2 px around the subject
    return image, mask


def test_the_halo_names_the_subjects_outline_the_pixels_that_mix_it_with_the_old_background():
    image, mask = _subject_on_blue(0.6)
    snapped, outline = snap_to_subject(mask, image, reach=8)
    assert np.array_equal(snapped, absorb_halo(mask, image, reach=8))
    expected = np.zeros((24, 32), bool)
    expected[7:17, 18] = True
    assert np.array_equal(outline, expected)
    assert (snapped[outline] == 1.0).all()  # the outline is part of the edit region the user sees


def test_the_outline_keeps_the_subjects_share_and_takes_the_new_background_in_place_of_the_old():
    """P = a·F + (1 − a)·B_old becomes a·F + (1 − a)·B_new, with B_new taken from beyond the fringe the model drew
    right beside the subject; the subject's own pixels stay the photo's, bit for bit."""
    image, mask = _subject_on_blue(0.6)
    snapped, outline = snap_to_subject(mask, image, reach=8)
    box = CropBox.full((32, 24))
    generated = np.zeros_like(image)
    generated[...] = (40, 180, 60)  # the new background, green
    generated[7:17, 18:20] = (210, 30, 30)  # the model's fringe of the subject's colour, on the outline and beside it
    settings = PasteBack(colour_match="none")
    alpha = settings.alpha(snapped, box, image, outline=outline)
    np.testing.assert_allclose(alpha[outline], 0.4, atol=0.01)  # the old background's share
    out = composite(image, generated, box, snapped, alpha, "none", outline_box=outline)[0]
    expected = 0.6 * np.array([210, 30, 30]) + 0.4 * np.array([40, 180, 60])
    assert np.abs(out[outline].astype(float) - expected).max() <= 2
    kept = snapped <= 0.5
    assert np.array_equal(out[kept], image[kept])
    far = np.zeros((24, 32), bool)
    far[:, 25:] = True
    assert np.array_equal(out[far], generated[far])


def test_an_outline_with_no_new_background_away_from_the_subject_takes_the_generation_beside_it():
    """Two kept subjects with one column of old background between them: the new background there is all there is."""
    red, blue, mixed = np.array([210, 30, 30]), np.array([30, 40, 200]), np.array([138, 34, 98])  # mixed: 0.6 red
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, :18], image[:, 18], image[:, 19], image[:, 20:] = red, mixed, blue, (230, 200, 40)
    mask = np.zeros((24, 32), np.float32)
    mask[:, 19] = 1.0
    snapped, outline = snap_to_subject(mask, image, reach=1)
    assert outline[:, 18].all() and outline.sum() == 24
    generated = np.full_like(image, (40, 180, 60))
    box = CropBox.full((32, 24))
    alpha = PasteBack(colour_match="none").alpha(snapped, box, image, outline=outline)
    out = composite(image, generated, box, snapped, alpha, "none", outline_box=outline)[0]
    assert np.abs(out[outline].astype(float) - (0.6 * red + 0.4 * np.array([40, 180, 60]))).max() <= 2
    assert np.array_equal(out[snapped <= 0.5], image[snapped <= 0.5])


def test_the_models_echo_beside_the_subject_gives_way_to_the_new_background_around_it():
    """A dark ring one pixel around the kept subject, and a bump of its colour two pixels out: both are colours the
    new background (green and yellow stripes) has nowhere farther out, so they take their neighbours' stripes; the
    subject's own pixels stay the photo's, and everything more than ``ECHO_REACH`` pixels off it stays generated."""
    from pfbdiff.photo.morphology import dilated
    from pfbdiff.photo.outline import ECHO_REACH

    image, mask = _subject_on_blue(0.6)
    snapped, outline = snap_to_subject(mask, image, reach=8)
    kept = snapped <= 0.5
    generated = np.zeros_like(image)
    generated[0::2] = (40, 180, 60)
    generated[1::2] = (230, 200, 40)  # the new background: horizontal stripes
    ring = dilated(kept | outline, 1) & ~kept & ~outline
    generated[ring] = (20, 20, 20)  # the model's dark ring ...
    generated[11:13, 20] = (210, 30, 30)  # ... and a bump of the subject's red beside it
    box = CropBox.full((32, 24))
    alpha = PasteBack(colour_match="none").alpha(snapped, box, image, outline=outline)
    out = composite(image, generated, box, snapped, alpha, "none", outline_box=outline)[0]
    near = dilated(kept | outline, ECHO_REACH) & ~kept & ~outline
    green, yellow = np.array([40, 180, 60], float), np.array([230, 200, 40], float)
    pixels = out[near].astype(float)
    share = np.clip((pixels - green) @ (yellow - green) / ((yellow - green) ** 2).sum(), 0, 1)
    off_stripes = np.linalg.norm(pixels - (green + share[:, None] * (yellow - green)), axis=-1)
    assert off_stripes.max() <= 2  # every pixel beside the subject is a stripe's colour or a mix of the two
    assert np.array_equal(out[kept], image[kept])
    assert np.array_equal(out[~dilated(kept | outline, ECHO_REACH)], generated[~dilated(kept | outline, ECHO_REACH)])
    plain = np.full_like(image, (40, 180, 60))  # a new background that runs right up to the subject: nothing to clear
    untouched = composite(image, plain, box, snapped, alpha, "none", outline_box=outline)[0]
    assert np.array_equal(untouched[~kept & ~outline], plain[~kept & ~outline])


# -------------------------------------------------------------------------------------------------- the inner halo


def _attribute_case(mask_kind: str):
    """An attribute case at 64 px whose mask is a box (``"box"``) or the object dilated (``"dilated"``), away from
    the photo's edge."""
    for case in make_cases("attribute", 24):
        images = render_case(case, 64)
        if case.mask_kind == mask_kind and not (images.mask[[0, -1]].any() or images.mask[:, [0, -1]].any()):
            return case, images
    raise AssertionError(f"no {mask_kind} case away from the edge")


@pytest.mark.parametrize("mask_kind", ["box", "dilated"])
def test_the_inner_halo_is_the_old_background_between_the_mask_and_the_subject(mask_kind):
    _, images = _attribute_case(mask_kind)
    subject = images.labels > 0
    background_in_mask = images.mask & ~dilate(subject, 1)  # the subject's anti-aliased outline is left aside
    assert background_in_mask.sum() > 20
    halo = inner_halo(images.mask.astype(np.float32), images.source, reach=8)
    assert halo[background_in_mask].all()
    assert not halo[subject].any()  # nor its outline: those pixels change with the subject
    assert not halo[~images.mask].any()


def test_the_inner_halo_reaches_at_most_reach_pixels_in_from_the_mask_edge():
    image = _two_tone("plain")
    image[9:15, 12:20] = (200, 30, 30)  # a red subject in a wide mask
    mask = np.zeros((24, 32), np.float32)
    mask[2:22, 4:28] = 1.0
    halo = inner_halo(mask, image, reach=3)
    ring = (mask > 0.5) & ~erode(mask > 0.5, 3)
    assert halo[ring].all() and not halo[~ring].any()


@pytest.mark.parametrize("pattern", ["plain", "striped"])
def test_a_mask_that_holds_no_subject_has_no_inner_halo(pattern):
    """A patch of one surface (to recolour, say): nothing in it is unlike the photo around it, so nothing is
    taken from its edge."""
    mask = np.zeros((24, 32), np.float32)
    mask[4:20, 6:26] = 1.0
    assert not inner_halo(mask, _two_tone(pattern), reach=8).any()


def test_attribute_preset_pastes_back_the_old_background_inside_the_mask_exactly(tiny_pipe):
    """The inner halo leaves the paste-back's edit region: those pixels are the photo's own, bit for bit, and the
    output's edit region says so; the method itself still edits under the user's whole mask."""
    case, images = _attribute_case("box")
    subject = images.labels > 0
    halo = inner_halo(images.mask.astype(np.float32), images.source, reach=8)
    inversion = tiny_pipe.invert(Image.fromarray(images.source), case.source_caption, 4, strength=0.8)
    result = {}
    for share in (0.0, 0.25):
        out = tiny_pipe.edit(inversion, images.mask.astype(np.float32), case.target_caption, preset="attribute",
                             inner_halo=share, guidance_scale=1.0)
        result[share] = (np.asarray(out.images[0]), np.asarray(out.masks[0]), out.latents)
    picture, region, latents = result[0.25]
    assert np.array_equal(picture[halo], images.source[halo]) and (region[halo] == 0).all()
    assert (region[erode(subject, 1)] == 255).all()
    assert np.array_equal(picture[~images.mask], images.source[~images.mask])
    assert torch.equal(latents, result[0.0][2])  # only the paste-back differs
    assert np.abs(result[0.0][0][halo].astype(int) - images.source[halo]).max() > 0


def test_an_inner_halo_outside_zero_to_one_is_refused_by_name():
    from pfbdiff import get_preset
    from pfbdiff.errors import PFBDiffError

    with pytest.raises(PFBDiffError, match="inner_halo"):
        get_preset("attribute", inner_halo=1.5)
