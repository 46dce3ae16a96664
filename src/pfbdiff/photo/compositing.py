"""Putting the edit back into the photo: grown mask, feathered alpha, colour match, pixel-exact paste-back.

PFB-Diff regenerates the whole latent and decodes it, so even where the mask keeps the source, the output is a
VAE reconstruction: slightly blurred, slightly shifted in colour, and (after many steps) drifting. Users
expect the opposite: pixels outside the mask are *their* pixels, bit for bit (common complaints about diffusion
editors: "unmasked pixels change", "colour shift", "seams at the mask border"). The final image is a composite

    out = α ⊙ G + (1 − α) ⊙ S

of the generated image G and the source S, with an alpha α built from the user's (soft) mask M:

1. **grow** (:func:`grow_mask`): dilate (+) or erode (−) M by a square window, at the input's resolution.
2. **feather** (:func:`feather_alpha`): soften the edge over a band of ``feather`` pixels (default: 8 % of
   the square root of the mask's area, 2 to 48 px, below half the mask's thickness). The band lies *inside* the grown mask by default: α falls
   from M to 0 at the mask's edge, so nothing outside the mask changes and the generation fades into the
   photo. ``"center"`` (a plain blur, A1111's "mask blur") and ``"outside"`` (α = M on the mask, the band
   beyond its edge) are there for comparison; the seam study (``bench/seams.py``) found "inside" lowest on
   both seam measures (and "outside" worst on the ring just outside the mask, where it lets the decoder's
   error through). A soft (grey) mask is its own feather: the automatic width is 0 for it. The band is not
   feathered where the photo shows a colour found nowhere around the mask (:func:`without_old_content`): there it
   shows the old object, which blended back would leave a faint outline of itself along a tight mask's edge.
3. **colour match** (``colour_match.py``): in the band just outside the mask G should equal S; the
   difference S − G measured there (mostly the VAE's colour shift) is spread smoothly over the region by
   normalised convolution and added to G, so the generated region meets its surroundings at the source's
   brightness and colour. It is measured only where one surface runs across the mask's edge
   (:func:`continuing_surface`); around a kept subject the difference is new content, not a shift.
4. **new content** (``new_content.py``, the preset's ``outgrow``): where the generation shows what the photo around
   the mask does not, the band is not feathered, and a new object drawn past the mask's edge is followed there
   instead of cut; the alpha used is returned with the image, since it depends on the generation.
5. **paste-back** (:func:`paste_back`): pixels with α = 0 are copied from the source unchanged (exact
   equality, not "nearly"), pixels with α = 1 are the (colour-matched) generation, the band in between is
   alpha-blended and rounded.
6. **the kept subject's outline** (``outline.py``): where a halo snapped the mask to a subject, the outline pixels
   that mix the subject and the old background keep the subject's share and take the new background's in place
   of the old one's (their alpha is the old background's share), and the model's echo of the subject beside it
   (a fringe, a dark ring, a bump) gives way to the new background around it; so does its ghost, a larger copy of
   the subject drawn around it (``ghost.py``), filled with the new background's own pattern.

How much each step lowers the seam is measured with ShapesBench's seam metric
(:func:`pfbdiff.bench.metrics.seam_score`) by ``python -m pfbdiff.bench.seams``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.errors import PFBDiffError
from pfbdiff.photo.colour_match import COLOUR_MATCH_MODES, filled, match_colours
from pfbdiff.photo.colours import unlike_all
from pfbdiff.photo.ghost import without_ghost
from pfbdiff.photo.morphology import grow_mask, share_of_size, support_window
from pfbdiff.photo.new_content import followed
from pfbdiff.photo.outline import old_background_share, unmixed, without_echo
from pfbdiff.photo.regions import CropBox

#: Where the feather band lies relative to the (grown) mask edge; the default was chosen by the seam study.
FEATHER_PLACEMENTS = ("outside", "center", "inside")
DEFAULT_PLACEMENT = "inside"
#: Automatic feather width: this share of the square root of the mask's area, within the bounds below.
FEATHER_SHARE = 0.08
FEATHER_MIN, FEATHER_MAX = 2, 48
#: Width (px) of the Gaussian that fills in the new background behind the kept subject's outline (``outline.py``).
OUTLINE_FILL_SIGMA = 2.0


# ------------------------------------------------------------------------------------------ mask operations


def _as_batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]


def _box_blur(part: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable box blur of radius r; exact zeros stay exact beyond the reach.

    Edges are padded by repetition: inside a mask window that is zero anyway (the window reaches past the
    mask), and at the image border it keeps a mask that touches the border from fading out there.
    """
    size = 2 * radius + 1
    horizontal = torch.full((1, 1, 1, size), 1.0 / size)
    vertical = torch.full((1, 1, size, 1), 1.0 / size)
    part = F.conv2d(F.pad(part, (radius, radius, 0, 0), mode="replicate"), horizontal)
    return F.conv2d(F.pad(part, (0, 0, radius, radius), mode="replicate"), vertical)


def _smooth(mask: np.ndarray, radius: int) -> np.ndarray:
    """Box blurs of radii ⌈r/2⌉ and ⌊r/2⌋ (a ramp of reach exactly r), exactly 0 beyond the reach."""
    window = support_window(mask, radius)
    if window is None:
        return np.zeros_like(mask)
    part = _as_batch(mask[window.slices])
    for blur_radius in (int(math.ceil(radius / 2)), radius // 2):
        if blur_radius > 0:
            part = _box_blur(part, blur_radius)
    part = part[0, 0].numpy()
    out = np.zeros_like(mask)
    out[window.slices] = part
    return out


def _inside_ramp(mask: np.ndarray, feather: int) -> np.ndarray:
    """α = smoothstep(r), r = the mean of the mask eroded by 0, 1, …, f pixels, capped by the mask: a smooth
    ramp from 0 at the edge to the mask value f + 1 pixels inside it (for a hard mask r = min(d, f + 1) / (f + 1),
    d the chessboard distance to the outside; the smoothstep 3r² − 2r³ removes the kinks at both ends).

    α ≤ the mask everywhere, so nothing outside it changes, and a mask thinner than the band still keeps its
    middle (it is not erased, as an erode-then-blur band would be). The image border does not count as edge.
    """
    window = support_window(mask, 1)
    if window is None:
        return np.zeros_like(mask)
    current = _as_batch(mask[window.slices])
    total = current.clone()
    for step in range(feather):
        eroded = -F.max_pool2d(-current, 3, stride=1, padding=1)
        if torch.equal(eroded, current):  # erosion has settled: the remaining steps all add the same map
            total += current * (feather - step)
            break
        current = eroded
        total += current
    ramp = (total / (feather + 1))[0, 0].numpy()
    out = np.zeros_like(mask)
    out[window.slices] = np.minimum(ramp * ramp * (3.0 - 2.0 * ramp), mask[window.slices])  # smoothstep
    return out


def auto_feather(mask: np.ndarray) -> int:
    """Feather width for ``mask``: 0 for a soft mask (it carries its own ramp), else ≈ 8 % of √area.

    The width stays below half the mask's thickness (area / edge length ≈ half the width of a stripe), so
    an inside band cannot erase a thin mask.
    """
    mask = np.asarray(mask, dtype=np.float32)
    active = mask > 0
    if not active.any():
        return 0
    fractional = ((mask > 0.02) & (mask < 0.98)).sum()
    if fractional > 0.25 * active.sum():
        return 0
    hard = (mask >= 0.5).astype(np.float32)
    area = float(hard.sum())
    edge = float((hard - grow_mask(hard, -1)).sum())
    thickness_cap = int(math.ceil(area / edge)) - 1 if edge > 0 else FEATHER_MAX
    width = min(FEATHER_MAX, max(FEATHER_MIN, round(FEATHER_SHARE * math.sqrt(area))))
    return int(max(0, min(width, thickness_cap)))


def feather_reach(feather: int, placement: str = DEFAULT_PLACEMENT) -> int:
    """How far outside the grown mask the alpha can be non-zero."""
    check_placement(placement)
    if feather <= 0 or placement == "inside":
        return 0
    return 2 * feather if placement == "outside" else feather


def check_placement(placement: str) -> None:
    if placement not in FEATHER_PLACEMENTS:
        raise PFBDiffError(f"feather placement must be one of {', '.join(FEATHER_PLACEMENTS)}, got {placement!r}")


def feather_alpha(mask: np.ndarray, feather: int, placement: str = DEFAULT_PLACEMENT) -> np.ndarray:
    """The paste-back alpha of an (already grown) H×W mask, feathered over ``feather`` pixels.

    ``"inside"``: a ramp over the outer ``feather`` pixels of the mask (:func:`_inside_ramp`), so α ≤ the mask
    and nothing outside it changes; ``"outside"``: dilate by ``feather`` then smooth, so α ≥ the mask
    everywhere and the band lies beyond its edge; ``"center"``: smooth only (α = ½ on a hard edge). ``feather = 0`` returns the mask itself: a soft mask is used as its own alpha.
    """
    check_placement(placement)
    mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    if feather < 0:
        raise PFBDiffError(f"feather must be 0 or more pixels, got {feather}")
    if feather == 0:
        return mask.copy()
    if placement == "outside":
        alpha = _smooth(grow_mask(mask, feather), feather)
        alpha = np.maximum(alpha, mask)
    elif placement == "inside":
        alpha = _inside_ramp(mask, feather)
    else:
        alpha = _smooth(mask, feather)
    alpha[alpha > 1.0 - 1e-6] = 1.0
    alpha[alpha < 1e-7] = 0.0
    return np.clip(alpha, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ colour match


def reference_ring(mask: np.ndarray, alpha: np.ndarray, width: int) -> np.ndarray:
    """Pixels where the generation should reproduce the source: outside the mask, within ``width`` of it."""
    outside = np.asarray(mask) <= 0.0
    near = grow_mask((np.asarray(mask) > 0).astype(np.float32), max(width, 1)) > 0
    return outside & (near | (np.asarray(alpha) > 0))


def continuing_surface(ring: np.ndarray, mask: np.ndarray, source: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``ring`` whose colour in ``source`` is also found in the band ``width`` pixels wide just inside
    the mask (:func:`~pfbdiff.photo.colours.unlike_all`): where one surface runs on across the mask's edge, so that
    generation and source should agree there and their difference is the VAE's shift. Where it does not, as
    around the kept subject of a background edit (the ring is the subject, the band the old background), the
    difference is new content, and matching it would tint the whole new region towards the subject."""
    mask = np.asarray(mask)
    inner = (mask > 0) & (grow_mask((mask <= 0).astype(np.float32), width) > 0)
    if not ring.any() or not inner.any():
        return ring
    pixels = np.asarray(source, np.float32)
    continuing = np.zeros_like(ring)
    continuing[ring] = ~unlike_all(pixels[ring], pixels[inner])
    return continuing


# ------------------------------------------------------------------------------------------ paste-back


def paste_back(source: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``α ⊙ G + (1 − α) ⊙ S`` as uint8; every pixel with α = 0 is the source's byte for byte."""
    source = np.asarray(source)
    if source.dtype != np.uint8:
        raise PFBDiffError("paste_back needs the source as uint8 H×W×3")
    weight = np.asarray(alpha, dtype=np.float32)[..., None]
    blended = weight * np.asarray(generated, dtype=np.float32) + (1.0 - weight) * source.astype(np.float32)
    blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return np.where(weight > 0, blended, source)


def composite(source: np.ndarray, generated_box: np.ndarray, box: CropBox, mask_box: np.ndarray | None,
              alpha_box: np.ndarray | None, colour_match: str = "local", ring_width: int = 4,
              outline_box: np.ndarray | None = None, outgrowth: int | None = None,
              bound_box: np.ndarray | None = None, ghost_reach: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Stitch a generated crop (box-sized, uint8) back into the full ``source`` (H×W×3 uint8); returns the image and
    the alpha it was put back with (box-sized; None with paste-back off).

    With ``alpha_box`` = None the crop replaces the box as it is (paste-back off). Otherwise the crop is
    colour-matched on the ring outside ``mask_box`` and alpha-blended; outside the box the source is kept. With
    ``outgrowth`` (a reach in pixels, ``new_content.py``) the alpha follows new content across the mask's edge, never
    past the user's ``bound_box`` when given. On the kept subject's ``outline_box`` pixels (a halo's, ``outline.py``)
    the old background's share is swapped for the new background, taken from the generation more than a pixel off
    the subject, and the model's echo right beside the subject gives way to the new background around it, and with
    ``ghost_reach`` (a share of the box's side, ``ghost.py``) so does its ghost.
    """
    out = np.array(source, dtype=np.uint8, copy=True)
    rows, cols = box.slices
    if alpha_box is None:
        out[rows, cols] = generated_box
        return out, None
    original = out[rows, cols]
    matched = generated_box.astype(np.float32)
    ring = reference_ring(mask_box, alpha_box, ring_width) if mask_box is not None else None
    if colour_match != "none" and mask_box is not None:
        matched = match_colours(matched, original, continuing_surface(ring, mask_box, original, ring_width),
                                colour_match)
    if outgrowth is not None and mask_box is not None:
        alpha_box = followed(alpha_box, mask_box, matched, original, ring, outgrowth)
        alpha_box = alpha_box if bound_box is None else np.minimum(alpha_box, bound_box)
    pasted = paste_back(original, matched, alpha_box)
    if outline_box is not None and outline_box.any() and mask_box is not None:
        edit = np.asarray(mask_box) > 0.5
        away = (alpha_box >= 1) & ~(grow_mask((~edit | outline_box).astype(np.float32), 1) > 0)
        # an edit region no more than a pixel wide has no new background away from the subject: take its own
        new_background = filled(matched, away, OUTLINE_FILL_SIGMA) if away.any() else matched
        pasted = unmixed(pasted, original, new_background, alpha_box, outline_box, edit)
        pasted = without_echo(pasted, matched, alpha_box, outline_box, edit)
        if ghost_reach > 0:
            pasted = without_ghost(pasted, alpha_box, outline_box, edit, ghost_reach)
    out[rows, cols] = pasted
    return out, alpha_box


@dataclass(frozen=True)
class PasteBack:
    """How an edit is put back into its input: the ``paste_back``, ``feather``, ``feather_placement`` and
    ``colour_match`` arguments of ``PFBDiffPipeline.edit`` and the preset's ``outgrow`` and ``ghost_reach``, checked
    when made."""

    enabled: bool = True
    feather: int | None = None  # None: from the mask (``auto_feather``)
    placement: str = DEFAULT_PLACEMENT
    colour_match: str = "local"
    outgrow: float = 0.0  # follow new content this share of the mask's size past its edge (``new_content.py``)
    ghost_reach: float = 0.0  # clear the kept subject's ghost this share of the box's side from it (``ghost.py``)

    def __post_init__(self):
        check_placement(self.placement)
        if self.feather is not None and self.feather < 0:
            raise PFBDiffError(f"feather must be 0 or more pixels, got {self.feather}")
        if self.colour_match not in COLOUR_MATCH_MODES:
            raise PFBDiffError(f"colour_match must be one of {', '.join(COLOUR_MATCH_MODES)}, got {self.colour_match!r}")

    @property
    def ring_width(self) -> int:
        """Width of the band outside the mask where the colours are matched."""
        return max(4, self.feather or 4)

    def alphas(self, masks, box: CropBox, sources: list) -> list[np.ndarray] | None:
        """The alpha of each image of a :class:`~pfbdiff.photo.mask_set.MaskSet` (``sources``: the photos, one per
        image); ``None`` with paste-back off."""
        if not self.enabled:
            return None
        bounds = masks.bound or [None] * len(masks.full)
        outlines = masks.outlines or [None] * len(masks.full)
        return [self.alpha(m, box, source, bound, outline)
                for m, source, bound, outline in zip(masks.full, sources, bounds, outlines)]

    def alpha(self, full_mask: np.ndarray, box: CropBox, source, bound: np.ndarray | None = None,
              outline: np.ndarray | None = None) -> np.ndarray:
        """The alpha inside the box: the feathered (grown) mask, limited by the user's ``bound`` if any, not
        feathered where ``source`` shows old content (:func:`without_old_content`), and on a halo's ``outline`` the
        old background's share of each pixel (``outline.old_background_share``)."""
        rows, cols = box.slices
        width = auto_feather(full_mask) if self.feather is None else int(self.feather)
        mask = full_mask[rows, cols]
        pixels = np.asarray(source)[rows, cols]
        alpha = without_old_content(feather_alpha(mask, width, self.placement), mask, pixels, self.ring_width)
        if outline is not None and outline[rows, cols].any():
            on_outline = outline[rows, cols]
            alpha = np.where(on_outline, old_background_share(pixels, on_outline, mask > 0.5), alpha)
        return alpha if bound is None else np.minimum(alpha, bound[rows, cols])


def without_old_content(alpha: np.ndarray, mask: np.ndarray, source: np.ndarray, ring_width: int) -> np.ndarray:
    """The alpha raised to the mask on the feather band's pixels whose colour is found nowhere around the mask,
    such as the old object's where it reaches into the band.

    The feather band hides the VAE's small shifts where the source in it shows the surroundings. Blended back where
    it shows something else, the source would leave a faint outline of the old object along a tight mask's edge.
    "Around" is the ring ``ring_width`` pixels wide outside the mask; a colour within ``colours.COLOUR_DISTANCE`` of one
    of its colours (:func:`~pfbdiff.photo.colours.unlike_all`) is the surroundings'. Outside the mask nothing changes:
    the alpha only rises up to the mask.
    """
    alpha = np.asarray(alpha, np.float32)
    mask = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    band = alpha < mask
    ring = reference_ring(mask, alpha, ring_width)
    if not band.any() or not ring.any():
        return alpha
    pixels = np.asarray(source, np.float32)
    old = np.zeros_like(band)
    old[band] = unlike_all(pixels[band], pixels[ring])
    return np.where(old, mask, alpha)


def put_back(generated: list, sources: list, box: CropBox, full_masks: list, alphas: list | None,
             settings: PasteBack, outlines: list | None = None, bounds: list | None = None) -> tuple[list, list | None]:
    """Each generated image (model size, PIL) scaled back to ``box`` and stitched into its source photo; returns the
    images and the alphas (box-sized) they were put back with, which follow new content past the mask's edge when
    ``settings.outgrow`` is set (``new_content.py``), never past the user's ``bounds``.

    With paste-back off (``alphas`` None) the box is replaced as generated; a generation of the whole image with
    paste-back off, or with no source photo, is returned as it is.
    """
    from PIL import Image

    from pfbdiff.io.tensors import restore_size

    out, used = [], None if alphas is None else list(alphas)
    for i, image in enumerate(generated):
        image = restore_size(image, box.size)
        if not sources or (alphas is None and box.covers(sources[i].size)):
            out.append(image)
            continue
        mask = full_masks[i][box.slices]
        reach = share_of_size(mask, settings.outgrow) if settings.outgrow > 0 else None
        pasted, alpha = composite(
            np.asarray(sources[i]), np.asarray(image), box, mask, alphas[i] if alphas is not None else None,
            settings.colour_match, ring_width=settings.ring_width, outline_box=outlines[i][box.slices] if outlines else None,
            outgrowth=reach, bound_box=bounds[i][box.slices] if bounds else None, ghost_reach=settings.ghost_reach)
        out.append(Image.fromarray(pasted))
        if used is not None:
            used[i] = alpha
    return out, used
