"""Where an edit happens: the crop box around the mask and the size the model sees it at.

PFB-Diff (like every Stable-Diffusion editor) is trained at one pixel count, its *native size* N² (512² for
SD 1.x, 768² for SD 2.x-v, 64² for the bundled shapes model; read from the model as
``unet.config.sample_size × vae_scale_factor``). A 4000×3000 photo run whole costs ~46× a native edit and
runs out of memory on most GPUs, and a small object in it is a few latent cells wide. The remedy users rely on
(A1111 "only masked", ComfyUI Crop&Stitch) is *crop-to-mask*:

1. take the bounding box of everything the edit may touch (the grown mask plus the feather band);
2. pad it with context on every side (``padding`` pixels; default a quarter of the box's longer side, at
   least :data:`MIN_PADDING`), so the model sees what surrounds the region;
3. keep the box inside the image: a box that would cross an edge is shifted back in, and cut only when it
   is larger than the image; a very elongated box is widened towards :data:`MAX_ASPECT`;
4. scale the crop so it holds about N² pixels, aspect kept, sides multiples of the VAE factor;
5. edit it, scale the result back to the box and stitch it into the untouched original
   (:mod:`pfbdiff.photo.compositing`).

So the cost of an edit depends on the native size, not on the photo's size. The crop engages by itself
(``crop="auto"``) only for images with more than N² pixels; smaller images are edited whole at their own
size (sides rounded to multiples of 8), unless ``crop=True`` asks for it.

Two guards keep every input within what the model can run: a side never drops below :func:`min_model_side`
(the U-Net must be able to halve the latent at each level; a 1×1 image is edited at that size and scaled
back), and a whole-image edit above :data:`MAX_UNCROPPED_FACTOR` × N² pixels is refused with a message that
points at the crop instead of exhausting memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pfbdiff.errors import PFBDiffError
from pfbdiff.io.tensors import round_to_multiple

#: Smallest context padding (pixels of the input image) of an automatic crop.
MIN_PADDING = 32
#: Share of the mask box's longer side used as context padding by default.
PADDING_SHARE = 0.25
#: A crop box more elongated than this is widened (within the image) before it is scaled.
MAX_ASPECT = 4.0
#: A whole-image (uncropped) edit may have at most this many times the model's native pixel count.
MAX_UNCROPPED_FACTOR = 4.0
#: Accepted values of ``crop``.
CROP_MODES = ("auto", True, False)


@dataclass(frozen=True)
class CropBox:
    """A box in input-image pixels: columns ``left``..``right`` − 1, rows ``top``..``bottom`` − 1."""

    left: int
    top: int
    right: int
    bottom: int

    @classmethod
    def full(cls, size: tuple[int, int]) -> "CropBox":
        """The box covering a whole image of ``size`` = (width, height)."""
        return cls(0, 0, int(size[0]), int(size[1]))

    @classmethod
    def from_list(cls, values) -> "CropBox":
        left, top, right, bottom = (int(v) for v in values)
        return cls(left, top, right, bottom)

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) for indexing an H×W(×C) array."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def as_list(self) -> list[int]:
        return [self.left, self.top, self.right, self.bottom]

    def covers(self, size: tuple[int, int]) -> bool:
        """Whether this box is the whole of an image of ``size``."""
        return self == CropBox.full(size)


@dataclass(frozen=True)
class RegionPlan:
    """The outcome of planning: which box of the input is edited, at which model size, and whether cropped."""

    box: CropBox
    model_size: tuple[int, int]  # (width, height), multiples of the VAE factor
    cropped: bool


def native_side(unet, vae_scale_factor: int) -> int:
    """The model's native image side N = ``unet.config.sample_size × vae_scale_factor`` (512 for SD 1.x)."""
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    return int(sample) * int(vae_scale_factor)


def size_multiple(unet, vae_scale_factor: int) -> int:
    """What model sides are multiples of: the VAE factor, and for a U-Net with SDXL's added conditioning (pooled
    vector and size ids) SDXL's aspect buckets, 1/16 of its native side (64 px at 1024²), which it was trained on."""
    if unet.config.get("addition_embed_type") == "text_time":
        return max(int(vae_scale_factor), native_side(unet, vae_scale_factor) // 16)
    return int(vae_scale_factor)


def min_model_side(num_levels: int, vae_scale_factor: int) -> int:
    """Smallest model-size side: a latent side of 2^(levels − 1), so every U-Net level has at least one cell."""
    return (2 ** max(num_levels - 1, 0)) * int(vae_scale_factor)


def support_box(mask: np.ndarray, threshold: float = 0.0) -> CropBox | None:
    """The tightest box around ``mask > threshold`` (H×W), or ``None`` when nothing exceeds it."""
    active = np.asarray(mask) > threshold
    rows, cols = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
    if rows.size == 0:
        return None
    return CropBox(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def default_padding(box: CropBox) -> int:
    """Context padding used when none is given: a quarter of the box's longer side, at least 32 pixels."""
    return max(MIN_PADDING, int(round(PADDING_SHARE * max(box.width, box.height))))


def _span(start: int, end: int, length: int) -> tuple[int, int]:
    """Shift [start, end) into [0, length) keeping its width; cut it only when it is wider than ``length``."""
    width = min(end - start, length)
    start = min(max(start, 0), length - width)
    return start, start + width


def padded_box(box: CropBox, image_size: tuple[int, int], padding: int, max_aspect: float = MAX_ASPECT) -> CropBox:
    """``box`` grown by ``padding`` on every side, widened towards ``max_aspect``, kept inside the image."""
    width, height = image_size
    left, top, right, bottom = box.left - padding, box.top - padding, box.right + padding, box.bottom + padding
    box_w, box_h = right - left, bottom - top
    if box_w > max_aspect * box_h:  # too flat: add rows around the centre
        extra = int(math.ceil(box_w / max_aspect)) - box_h
        top, bottom = top - extra // 2, bottom + extra - extra // 2
    elif box_h > max_aspect * box_w:  # too tall: add columns
        extra = int(math.ceil(box_h / max_aspect)) - box_w
        left, right = left - extra // 2, right + extra - extra // 2
    left, right = _span(left, right, width)
    top, bottom = _span(top, bottom, height)
    return CropBox(left, top, right, bottom)


def _round_side(length: float, multiple: int, minimum: int) -> int:
    return max(minimum, round_to_multiple(length, multiple))


def scaled_size(size: tuple[int, int], target_pixels: int, multiple: int = 8, min_side: int = 8) -> tuple[int, int]:
    """(width, height) scaled to about ``target_pixels`` pixels, aspect kept, sides multiples of ``multiple``."""
    width, height = size
    scale = math.sqrt(target_pixels / float(width * height))
    return _round_side(width * scale, multiple, min_side), _round_side(height * scale, multiple, min_side)


def whole_size(size: tuple[int, int], multiple: int = 8, min_side: int = 8) -> tuple[int, int]:
    """Model size of an uncropped image: each side rounded to a multiple, short side raised to ``min_side``.

    Raising the short side scales both sides alike, so the aspect ratio is kept.
    """
    width, height = size
    short = min(width, height)
    scale = max(1.0, min_side / short)
    return _round_side(width * scale, multiple, min_side), _round_side(height * scale, multiple, min_side)


def wants_crop(crop, image_size: tuple[int, int], native: int) -> bool:
    """Resolve ``crop``: ``"auto"`` crops only images with more pixels than the native N²."""
    if crop not in CROP_MODES:
        raise PFBDiffError(f"crop must be 'auto', True or False, got {crop!r}")
    if crop == "auto":
        return image_size[0] * image_size[1] > native * native
    return bool(crop)


def plan_region(
    image_size: tuple[int, int],
    support: CropBox | None,
    *,
    margin: int = 0,
    crop="auto",
    padding: int | None = None,
    native: int,
    multiple: int = 8,
    min_side: int = 8,
) -> RegionPlan:
    """Choose the edited box and its model size.

    ``support`` is the box of the (grown) mask, or ``None`` for "anywhere"; ``margin`` how far beyond it the
    edit may still change pixels (the feather band). Without a crop the box is the whole image at (nearly) its
    own size; with one it is the support box widened by ``margin``, padded, and scaled to about ``native``²
    pixels.
    """
    if padding is not None and padding < 0:
        raise PFBDiffError(f"crop padding must be 0 or more pixels, got {padding}")
    native_pixels = native * native
    if not wants_crop(crop, image_size, native):
        model_size = whole_size(image_size, multiple, min_side)
        if model_size[0] * model_size[1] > MAX_UNCROPPED_FACTOR * native_pixels:
            raise PFBDiffError(
                f"the image is {image_size[0]}×{image_size[1]}, {model_size[0] * model_size[1] / native_pixels:.1f}× "
                f"the model's native {native}×{native} pixels: too large to edit whole (it would run out of memory); "
                "use crop='auto' / --crop (edits a native-size crop around the mask) or downscale the image"
            )
        return RegionPlan(CropBox.full(image_size), model_size, cropped=False)
    if support is None:
        box = CropBox.full(image_size)
    else:
        context = default_padding(support) if padding is None else int(padding)
        box = padded_box(support, image_size, context + max(int(margin), 0))
    return RegionPlan(box, scaled_size(box.size, native_pixels, multiple, min_side), cropped=True)
