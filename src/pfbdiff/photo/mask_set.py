"""Every mask of one edit, from what the user gave to what the method uses.

The paper edits "under a mask": the same region decides where latents and feature maps are blended and where
the confined words may be attended to. Here the user's mask (or one mask per word for multi-object edits, or
a DiffEdit-style estimate from the two prompts, ``automask.py``) is grown by ``grow`` pixels, snapped to the
subject's outline when ``halo`` is set (``halo.py``; with ``inner_halo`` the paste-back's masks leave out the old
background inside the mask around the subject), checked against
the part of the image that was inverted, and turned into

* full-size masks, one per input image, for the paste-back (``compositing.py``), and
* :class:`~pfbdiff.engine.edit_mask.EditMask` s at latent size for latent blending, feature blending and attention
  masking (``engine/edit_mask.py`` resizes them to every feature level).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pfbdiff.engine import automask
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.errors import PFBDiffError
from pfbdiff.io import tensors
from pfbdiff.photo import compositing, regions
from pfbdiff.photo.halo import inner_halo, snap_to_subject
from pfbdiff.photo.morphology import mask_core, share_of_size


@dataclass
class MaskSet:
    """The masks of one edit: latent-size (for the method) and full-size (for the paste-back), one per image."""

    edit: EditMask
    words: dict  # word -> EditMask of a multi-object edit
    full: list  # the paste-back's masks, input size, one per image: the grown edit masks (less an inner halo)
    bound: list | None  # the user's masks when an auto-mask is clipped to them
    auto: list | None  # the estimated masks (auto_mask=True)
    outlines: list | None = None  # with a halo: the kept subject's outline pixels in each full mask (``halo.py``)

    def kept_apart(self, config) -> EditMask | None:
        """The region the edit region's attention may not read under ``config.kept_apart`` (docs/method.md §5):
        everything outside the edit mask; ``None`` when the setting is off."""
        return self.edit.complement() if config.kept_apart else None

    def repeated(self, repeats: int) -> "MaskSet":
        """The masks of ``repeats`` edits of each image, in the order of ``repeat_interleave``."""
        def rows(items):
            return None if items is None else [m for m in items for _ in range(repeats)]

        return MaskSet(self.edit.repeated(repeats), {w: m.repeated(repeats) for w, m in self.words.items()},
                       rows(self.full), rows(self.bound), rows(self.auto), rows(self.outlines))


def crop_plan(size, masks: list | None, *, grow: int, feather: int | None, placement: str, crop, padding,
              native: int, multiple: int, min_side: int) -> regions.RegionPlan:
    """The box of the photo to invert and the size the model sees it at (``regions.plan_region``): around the
    union of ``masks`` (loaded H×W arrays, or None for "anywhere") grown by ``grow`` px and widened by the
    feather band."""
    support, margin = None, 0
    if masks:
        union = np.maximum.reduce([compositing.grow_mask(m, grow) for m in masks])
        support = regions.support_box(union)
        width = compositing.auto_feather(union) if feather is None else int(feather)
        margin = compositing.feather_reach(width, placement)
    return regions.plan_region(size, support, margin=margin, crop=crop, padding=padding, native=native,
                               multiple=multiple, min_side=min_side)


def inverted_box(inversion) -> regions.CropBox:
    """The part of the input that was inverted (the whole image unless it was cropped around the mask)."""
    return inversion.crop_box or regions.CropBox.full(inversion.original_sizes[0])


#: ``estimate(box)``: DiffEdit-style masks of the inverted box, one H×W array per image (``automask.py``).
Estimator = Callable[[regions.CropBox], list]


def build(inversion, user, per_word, config, latent_size, *, device, dtype, estimate: Estimator | None = None) -> MaskSet:
    """All masks of an edit from the loaded user masks (``user``: one H×W array per image, or None;
    ``per_word``: word -> arrays) and, with ``estimate``, an estimated mask (auto-mask)."""
    size = inversion.original_sizes[0]
    box = inverted_box(inversion)
    union_of_words = user is None and bool(per_word) and estimate is None
    if user is None and per_word:
        user = [np.maximum.reduce([masks[i] for masks in per_word.values()]) for i in range(inversion.batch_size)]
    if user is None and estimate is None:
        raise PFBDiffError("no mask given; pass mask_image (white = region to edit) or word_masks")
    word_full = {word: [compositing.grow_mask(m, config.grow) for m in masks] for word, masks in per_word.items()}
    def to_latent(masks):
        return latent_mask(masks, box, inversion, config, latent_size, device, dtype)

    def words_region(masks):  # the region, with its cores for the settled layout (``word_inset``, ``latent_inset``)
        region = to_latent(masks)
        if config.word_inset > 0:
            region.core = to_latent([mask_core(m, config.word_inset) for m in masks])
        if config.latent_inset > 0:
            region.latent_core = to_latent([mask_core(m, config.latent_inset) for m in masks])
        return region

    word_regions = {word: words_region(masks) for word, masks in word_full.items()}
    estimated = None
    if estimate is not None:
        estimated = [on_canvas(m, box, size) for m in estimate(box)]
        estimated = [compositing.grow_mask(m, config.grow) for m in estimated]
        if user is not None:  # the user's mask is a hard outer bound
            estimated = [automask.clip_to_bound(m, bound) for m, bound in zip(estimated, user)]
        full, bound = estimated, user
    else:
        full, bound = [compositing.grow_mask(m, config.grow) for m in user], None
    outlines = None
    if config.halo and inversion.source_images:
        full, outlines = map(list, zip(*[_halo_in_box(box, m, image, config.halo)
                                          for m, image in zip(full, inversion.source_images)]))
    _check_inside_box(box, size, full + [m for masks in word_full.values() for m in masks])
    if union_of_words:
        regions_list = list(word_regions.values())
        mask = regions_list[0]
        for other in regions_list[1:]:
            mask = mask.union(other)
    else:
        mask = words_region(full)
    if float(mask.latent.max()) <= 0.0 or not any(float(m.max()) > 0.0 for m in full):
        if estimate is not None:
            raise PFBDiffError("the auto-mask found nothing to edit" + (" inside your mask" if user else "")
                               + "; lower auto_mask_threshold (--auto-mask-threshold) or paint a mask")
        raise PFBDiffError("the mask is all black, so there is nothing to edit; paint the region to change in white")
    if float((mask.latent > 0.5).float().mean()) == 1.0:
        warnings.warn("the mask is all white: the whole image is regenerated from the prompt (nothing is kept)")
    if config.inner_halo and inversion.source_images:  # the paste-back's masks only: the method's are made above
        full = [_without_inner_halo(box, m, image, config.inner_halo) for m, image in zip(full, inversion.source_images)]
    return MaskSet(mask, word_regions, full, bound, estimated, outlines)


def latent_mask(full_masks, box, inversion, config, latent_size, device, dtype) -> EditMask:
    """Full-size masks → the crop box → model size → an :class:`EditMask` at latent size, in the model's dtype."""
    model_size = tuple(inversion.image.shape[-2:])[::-1]
    rows, cols = box.slices
    pixels = torch.cat([tensors.mask_to_tensor(m[rows, cols], model_size) for m in full_masks])
    return EditMask.from_pixels(pixels.to(device, dtype), latent_size, config.latent_mask, config.mask_resize)


def _halo_in_box(box, mask: np.ndarray, image, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` snapped to the subject (``halo.py``) inside the inverted ``box``, where a halo can be edited, and
    the subject's outline in it (full size)."""
    rows, cols = box.slices
    out = np.array(mask, dtype=np.float32, copy=True)
    outline = np.zeros(out.shape, bool)
    out[rows, cols], outline[rows, cols] = snap_to_subject(out[rows, cols], np.asarray(image.convert("RGB"))[rows, cols],
                                                           reach, photo_edges=_photo_edges(box, out.shape))
    return out, outline


def _without_inner_halo(box, mask: np.ndarray, image, share: float) -> np.ndarray:
    """``mask`` less the old background inside it around the subject (``halo.inner_halo``), reaching ``share`` of
    the mask's size in from its edge, within the inverted ``box``."""
    rows, cols = box.slices
    halo = inner_halo(mask[rows, cols], np.asarray(image.convert("RGB"))[rows, cols], share_of_size(mask, share),
                      photo_edges=_photo_edges(box, mask.shape))
    out = np.array(mask, dtype=np.float32, copy=True)
    out[rows, cols][halo] = 0.0
    return out


def _photo_edges(box, shape) -> tuple[bool, bool, bool, bool]:
    """Which of the inverted ``box``'s top, bottom, left and right sides are the photo's edges (``shape``: H, W)."""
    height, width = shape
    return box.top == 0, box.bottom == height, box.left == 0, box.right == width


def _check_inside_box(box, size, masks) -> None:
    if box.covers(size):
        return
    rows, cols = box.slices
    for m in masks:
        if float(m.sum()) > float(m[rows, cols].sum()):
            raise PFBDiffError(
                f"the mask reaches outside the part of the image that was inverted (box {box.as_list()}); "
                "invert with this mask (invert(image, mask_image=mask)) or with crop=False"
            )


def on_canvas(part: np.ndarray, box: regions.CropBox, size) -> np.ndarray:
    """``part`` (a mask of the box) placed on an all-zero mask of the whole image, ``size`` = (width, height)."""
    canvas = np.zeros((size[1], size[0]), np.float32)
    canvas[box.slices] = part
    return canvas
