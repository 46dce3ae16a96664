"""Real photos through the pipeline: crop-to-mask, pixel-exact paste-back, soft masks, auto-masks, bad inputs.

Everything runs on the tiny model (native size 128², so a 1000×750 photo is a "large" one).
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pfbdiff import PFBDiffError
from pfbdiff.engine import blending
from pfbdiff.engine.automask import iou
from pfbdiff.models.catalog import BUNDLED_SHAPES_MODEL
from pfbdiff.photo import compositing


def _seed():
    """One seed for edits that are compared: object edits draw the noise they start from in the mask."""
    return torch.Generator().manual_seed(0)


def _big_photo(width=1000, height=750, seed=3):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _box(size, box):
    mask = np.zeros((size[1], size[0]), np.float32)
    mask[box[1]:box[3], box[0]:box[2]] = 1
    return mask


def _unchanged_outside(result, source, alpha):
    result, alpha = np.asarray(result), np.asarray(alpha)
    keep = alpha == 0
    return keep.any() and np.array_equal(result[keep], np.asarray(source)[keep])


# ------------------------------------------------------------------------------------------ 1. crop-to-mask


@pytest.mark.parametrize("mask_box", [(400, 300, 460, 350), (960, 0, 1000, 40), (0, 700, 1000, 750)])
def test_large_photo_edits_a_native_size_crop_and_stitches_it_back_exactly(tiny_pipe, mask_box):
    photo = _big_photo()
    mask = _box((1000, 750), mask_box)
    calls = tiny_pipe.unet_calls
    out = tiny_pipe(photo, mask, "a dog", "a cat", num_inference_steps=2)
    latent_h, latent_w = out.latents.shape[-2:]
    assert abs(latent_h * latent_w * 64 / 128**2 - 1) < 0.15  # about the model's native pixel count
    assert tiny_pipe.unet_calls - calls == 2 + 2  # the same passes as a 128² edit: K inversion + K edit
    image = out.images[0]
    assert image.size == (1000, 750)
    left, top, right, bottom = out.crop_box
    assert left <= mask_box[0] and top <= mask_box[1] and right >= mask_box[2] and bottom >= mask_box[3]
    assert _unchanged_outside(image, photo, out.masks[0])
    result = np.asarray(image)
    assert np.array_equal(result[:, :left], photo[:, :left]) and np.array_equal(result[bottom:], photo[bottom:])
    assert not np.array_equal(result[mask > 0], photo[mask > 0])


def test_photo_smaller_than_native_is_not_cropped_unless_asked(tiny_pipe, photo, box_mask):
    whole = tiny_pipe(photo, box_mask, "a dog", num_inference_steps=2)
    assert whole.crop_box == [0, 0, 128, 96] and tuple(whole.latents.shape[-2:]) == (12, 16)
    mask = _box((128, 96), (56, 40, 72, 56))
    cropped = tiny_pipe(photo, mask, "a dog", num_inference_steps=2, crop=True, crop_padding=8)
    assert cropped.crop_box == [48, 32, 80, 64] and cropped.images[0].size == (128, 96)
    assert _unchanged_outside(cropped.images[0], photo, cropped.masks[0])


def test_inversion_crop_is_reused_and_a_mask_outside_it_is_refused(tiny_pipe):
    photo = _big_photo(400, 300)
    mask = _box((400, 300), (100, 100, 140, 130))
    inv = tiny_pipe.invert(photo, "a cat", 2, mask_image=mask)
    assert inv.crop_box.width < 400
    out = tiny_pipe.edit(inv, mask, "a dog")
    assert _unchanged_outside(out.images[0], photo, out.masks[0])
    with pytest.raises(PFBDiffError, match="outside the part of the image that was inverted"):
        tiny_pipe.edit(inv, _box((400, 300), (300, 200, 380, 280)), "a dog")


def test_latent_output_does_not_depend_on_paste_back_or_feather(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    runs = [tiny_pipe.edit(inv, box_mask, "a dog", output_type="latent", generator=_seed(), **kw).images
            for kw in ({}, {"paste_back": False}, {"feather": 9, "colour_match": "none"})]
    assert all(torch.equal(runs[0], other) for other in runs[1:])


# ------------------------------------------------------------------------------------------ 2. paste-back


def test_paste_back_is_bit_exact_outside_and_alpha_blended_in_the_band(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    raw = tiny_pipe.edit(inv, box_mask, "a dog", paste_back=False, generator=_seed())
    assert raw.masks is None and not np.array_equal(np.asarray(raw.images[0]), photo)  # the VAE changes every pixel
    out = tiny_pipe.edit(inv, box_mask, "a dog", feather=4, colour_match="none", outgrow=0, generator=_seed())
    alpha = compositing.feather_alpha(box_mask, 4)
    assert np.array_equal(np.asarray(out.masks[0]), np.round(alpha * 255).astype(np.uint8))
    assert ((alpha > 0) & (alpha < 1)).any()
    expected = compositing.paste_back(photo, np.asarray(raw.images[0]), alpha)
    assert np.array_equal(np.asarray(out.images[0]), expected)
    assert np.array_equal(np.asarray(out.images[0])[alpha == 0], photo[alpha == 0])


def test_default_paste_back_with_colour_match_keeps_every_pixel_with_alpha_zero(tiny_pipe, photo, box_mask):
    out = tiny_pipe(photo, box_mask, "a dog", num_inference_steps=2, output_type="np", generator=_seed())
    alpha = np.asarray(tiny_pipe(photo, box_mask, "a dog", num_inference_steps=2, generator=_seed()).masks[0])
    assert np.array_equal(np.round(out.images[0] * 255).astype(np.uint8)[alpha == 0], photo[alpha == 0])


# ------------------------------------------------------------------------------------------ 4. soft masks


def test_soft_mask_is_honoured_in_feature_and_latent_blending_and_thresholded_for_attention(tiny_pipe, photo, monkeypatch):
    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (96, 1))
    weights = []
    original = blending.blend

    def spy(target, source, weight):
        weights.append(weight.detach().float().clone())
        return original(target, source, weight)

    monkeypatch.setattr(blending, "blend", spy)
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    tiny_pipe.edit(inv, ramp, "a dog", latent_blend=-1.0, output_type="latent")
    feature = [w for w in weights if w.shape[-2:] != inv.latents[0].shape[-2:]]
    latent = [w for w in weights if w.shape[-2:] == inv.latents[0].shape[-2:]]
    for group in (feature, latent):
        values = torch.cat([w.flatten() for w in group])
        assert group and ((values > 0.1) & (values < 0.9)).float().mean() > 0.5  # fractional, not thresholded
    mask = tiny_pipe.prepare_masks(inv, ramp).edit
    binary = mask.binary_at((6, 8))
    assert binary.dtype == torch.bool and binary.any() and not binary.all()  # attention: a yes/no decision


def test_soft_mask_is_the_paste_back_alpha(tiny_pipe, photo):
    soft = np.zeros((96, 128), np.float32)
    soft[20:76, 30:100] = np.linspace(0.2, 0.8, 70, dtype=np.float32)
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    raw = np.asarray(tiny_pipe.edit(inv, soft, "a dog", paste_back=False, generator=_seed()).images[0])
    out = tiny_pipe.edit(inv, soft, "a dog", colour_match="none", outgrow=0, generator=_seed())
    assert np.array_equal(np.asarray(out.images[0]), compositing.paste_back(photo, raw, soft))


def test_grow_and_feather_are_separate(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    grown = np.asarray(tiny_pipe.edit(inv, box_mask, "a dog", grow=5, feather=0, outgrow=0).masks[0]) / 255
    assert np.array_equal(grown, compositing.grow_mask(box_mask, 5))
    feathered = np.asarray(tiny_pipe.edit(inv, box_mask, "a dog", grow=0, feather=6, outgrow=0).masks[0]) / 255
    assert (feathered[box_mask == 0] == 0).all() and ((feathered > 0) & (feathered < 1)).any()


# ------------------------------------------------------------------------------------------ 5. auto-mask


def test_auto_mask_is_clipped_exactly_to_the_user_mask(tiny_pipe, photo, box_mask):
    out = tiny_pipe(photo, box_mask, "a dog", "a cat", num_inference_steps=2, auto_mask=True,
                    auto_mask_threshold=0.2)
    estimate = np.asarray(out.auto_masks[0])
    assert estimate.shape == (96, 128) and estimate.max() == 255
    assert (estimate[box_mask == 0] == 0).all()
    assert np.array_equal(np.asarray(out.images[0])[box_mask == 0], photo[box_mask == 0])
    assert (np.asarray(out.masks[0])[box_mask == 0] == 0).all()


def test_auto_mask_without_a_user_mask_and_reproducibly(tiny_pipe, photo):
    def run():
        return tiny_pipe(photo, None, "a dog", "a cat", num_inference_steps=2, auto_mask=True, generator=_seed())

    first, again = run(), run()
    assert np.array_equal(np.asarray(first.auto_masks[0]), np.asarray(again.auto_masks[0]))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    estimate = np.asarray(first.auto_masks[0]) > 0
    assert 0 < estimate.mean() < 1
    assert _unchanged_outside(first.images[0], photo, first.masks[0])


def test_auto_mask_finding_nothing_is_a_clear_error(tiny_pipe, photo):
    corner = _box((128, 96), (0, 0, 2, 2))
    with pytest.raises(PFBDiffError, match="auto-mask found nothing"):
        tiny_pipe(photo, corner, "a dog", "a cat", num_inference_steps=1, auto_mask=True, auto_mask_threshold=0.99)


# ------------------------------------------------------------------------------------------ bad inputs


def test_all_white_mask_with_paste_back_regenerates_everything(tiny_pipe, photo):
    with pytest.warns(UserWarning, match="all white"):
        out = tiny_pipe(photo, np.ones((96, 128), np.float32), "a dog", num_inference_steps=2)
    assert np.asarray(out.masks[0]).min() == 255 and out.images[0].size == (128, 96)


def test_mask_larger_than_the_image_is_resized_with_a_warning(tiny_pipe, photo):
    big_mask = _box((256, 192), (64, 48, 192, 144))
    with pytest.warns(UserWarning, match="resized the mask"):
        out = tiny_pipe(photo, big_mask, "a dog", num_inference_steps=1)
    assert out.images[0].size == (128, 96)


def test_one_pixel_image(tiny_pipe):
    out = tiny_pipe(np.full((1, 1, 3), 90, np.uint8), np.ones((1, 1), np.float32), "a dog", num_inference_steps=1)
    assert out.images[0].size == (1, 1)


def test_huge_images_are_refused_before_any_memory_is_used(tiny_pipe):
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))  # 1.2 GB if it were real
    with pytest.raises(PFBDiffError, match="too large"):
        tiny_pipe(huge, None, "a dog", num_inference_steps=1)
    with pytest.raises(PFBDiffError, match="too large to edit whole"):
        tiny_pipe(_big_photo(), _box((1000, 750), (0, 0, 10, 10)), "a dog", num_inference_steps=1, crop=False)


def test_mask_given_only_as_alpha_channel(tiny_pipe, photo, box_mask):
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[..., 3] = (box_mask * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tiny_pipe(photo, Image.fromarray(rgba, "RGBA"), "a dog", num_inference_steps=1)
    alpha = np.asarray(out.masks[0])
    assert alpha[48, 64] == 255 and alpha[0, 0] == 0 and _unchanged_outside(out.images[0], photo, alpha)


# ------------------------------------------------------------------------------------------ shapes model

def test_auto_mask_covers_the_edited_object_on_the_shapes_model():
    from pfbdiff import PFBDiffPipeline
    from pfbdiff.bench.cases import make_cases, render_case
    from pfbdiff.shapes.world import caption

    pipe = PFBDiffPipeline.from_pretrained(BUNDLED_SHAPES_MODEL, device="cpu", torch_dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    scores = []
    for case in make_cases("attribute", 4):  # recolour one object: the region to change is that object
        images = render_case(case, 64)
        out = pipe(images.source, None, caption(case.target), caption(case.source), num_inference_steps=10,
                   auto_mask=True, guidance_scale=4.0, output_type="latent")
        scores.append(iou(np.asarray(out.auto_masks[0]) / 255, images.object_masks[case.edited[0]]))
    print(f"auto-mask IoU with the edited object: {np.mean(scores):.3f} ({[round(s, 3) for s in scores]})")
    assert np.mean(scores) > 0.3
