"""ShapesBench metrics: oracle edit success, masked PSNR / SSIM, in-mask coherence, seam score, and 95 % CIs.

All image metrics take H×W×3 uint8 (or 0–255 float) arrays and H×W bool masks (True = the edited region).

* :func:`edit_success` — read the edited image with the ShapesWorld oracles (one :func:`analyse` pass):
  ``target_present`` (each new object, colour and shape, has more than half of its pixels in its own mask
  region; background edits: the background reads as the new colour and pattern), ``old_gone`` (no object
  with the old colour and shape more than half inside the region; background edits: the masked region no
  longer reads as the old colour), ``others_kept`` (every object that was not edited is found with the same
  colour and shape and a mask IoU ≥ 0.8 with its source mask), ``background_ok`` (object edits: the
  background colour and pattern are unchanged), ``count_ok`` (as many objects as the target scene has;
  reported, not part of success). ``success`` = target_present ∧ old_gone ∧ others_kept ∧ background_ok.
* :func:`psnr` / :func:`ssim` — over the kept pixels (outside the mask and unchanged by the ideal edit),
  against the source, on the output before any paste-back (PSNR capped at
  :data:`PSNR_CAP` dB for identical pixels); SSIM with an 11×11 Gaussian window (σ = 1.5), K1 = 0.01,
  K2 = 0.03, L = 255, per channel on reflect-padded images, the SSIM map averaged over the region.
* :func:`coherence` — in-mask pixels that are not on an object found inside the mask (object masks grown
  by 1 px) are compared with the true background (the target scene rendered without objects): the share
  within RGB distance :data:`COHERENCE_TOLERANCE` (``coherence``) and their mean absolute error
  (``coherence_mae``, 0–255).
* :func:`seam_score` — ``seam_ring``: mean absolute error (0–255, averaged over channels) against the
  reference in the ring of pixels 1..3 px outside the mask edge, where the kept region meets the edit;
  ``seam_grad``: mean |g(output) − g(reference)| over the band from 1 px outside to 2 px inside the mask
  edge, where g is the gradient magnitude (forward differences, RMS over channels), so an edge the right
  answer does not have counts as a seam. The reference is the source by default; the bench passes the ideal
  edit, which equals the source outside the mask for object edits (for background edits it also has the
  ring of old background around each object replaced, see :class:`~.cases.CaseImages`). Both are 0 for an
  output equal to the reference.
* :func:`wilson_interval` for proportions and :func:`mean_interval` (Student t) for means.
"""

from __future__ import annotations

import math

import numpy as np

from pfbdiff.shapes.binary_masks import dilate, erode, iou
from pfbdiff.shapes.oracles import FOREGROUND_DISTANCE, analyse, background_of

PSNR_CAP = 100.0  # dB reported for identical pixels
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2, DATA_RANGE = 1.5, 5, 0.01, 0.03, 255.0
COHERENCE_TOLERANCE = FOREGROUND_DISTANCE  # RGB distance: the oracles' own "still background" threshold
SEAM_RING, SEAM_BAND = 3, 2
KEEP_IOU = 0.8
PROPORTIONS = ("success", "success_raw", "target_present", "old_gone", "others_kept", "background_ok", "count_ok")


# --------------------------------------------------------------------------------------------- oracle


def edit_success(images, output, analysis=None) -> dict[str, bool]:
    """Oracle reading of an edited image against its case (``images``: a :class:`~.cases.CaseImages`);
    pass ``analysis`` (an :func:`analyse` result of ``output``) to skip reading the image again."""
    case = images.case
    analysis = analyse(output) if analysis is None else analysis
    found = analysis.objects

    def inside(colour, shape, region) -> bool:
        return any(o.colour == colour and o.shape == shape and (o.mask & region).sum() > 0.5 * o.area for o in found)

    def kept(i) -> bool:
        obj = case.source.objects[i]
        return any(o.colour == obj.colour and o.shape == obj.shape and iou(o.mask, images.labels == i + 1) >= KEEP_IOU
                   for o in found)

    others_kept = all(kept(i) for i in range(len(case.source.objects)) if i not in case.edited)
    if case.task == "background":
        target = (analysis.background, analysis.pattern) == (case.target.background, case.target.pattern)
        old_gone = background_of(output, images.mask)[0] != case.source.background
        background_ok = target
    else:
        target = all(inside(case.target.objects[i].colour, case.target.objects[i].shape, region)
                     for i, region in zip(case.edited, images.regions))
        old_gone = not any(inside(case.source.objects[i].colour, case.source.objects[i].shape, region)
                           for i, region in zip(case.edited, images.regions))
        background_ok = (analysis.background, analysis.pattern) == (case.source.background, case.source.pattern)
    result = {
        "target_present": bool(target), "old_gone": bool(old_gone), "others_kept": bool(others_kept),
        "background_ok": bool(background_ok), "count_ok": len(found) == len(case.target.objects),
    }
    result["success"] = result["target_present"] and result["old_gone"] and result["others_kept"] and result["background_ok"]
    return result


def text_to_image_success(case, image) -> dict[str, bool]:
    """Does a text-to-image sample of the target caption show what the edit should produce?

    ``target``: object tasks, every new (colour, shape) is found somewhere; background tasks, the background
    reads as the new colour and pattern. ``full``: the whole caption is right: background colour and pattern,
    and exactly the named objects (as :func:`pfbdiff.shapes.evaluate.score_image` counts "full").
    """
    analysis = analyse(image)
    background = (analysis.background, analysis.pattern) == (case.target.background, case.target.pattern)
    seen = [(o.colour or "?", o.shape or "?") for o in analysis.objects]
    if case.task == "background":
        target = background
    else:
        target = all((case.target.objects[i].colour, case.target.objects[i].shape) in seen for i in case.edited)
    full = background and sorted(seen) == sorted((o.colour, o.shape) for o in case.target.objects)
    return {"target": bool(target), "full": bool(full)}


# --------------------------------------------------------------------------------------------- fidelity


def _as_float(image) -> np.ndarray:
    return np.asarray(image, np.float64)


def psnr(a, b, region=None, cap: float | None = PSNR_CAP) -> float:
    """PSNR (dB, 8-bit range) of ``a`` vs ``b`` over ``region`` (all pixels if None); ``cap`` (or inf if None)
    for identical pixels, NaN for an empty region."""
    a, b = _as_float(a), _as_float(b)
    diff = (a - b) if region is None else (a - b)[np.asarray(region, bool)]
    if diff.size == 0:
        return float("nan")
    mse = float(np.mean(diff**2))
    if mse == 0.0:
        return float("inf") if cap is None else float(cap)
    value = 10.0 * math.log10(DATA_RANGE**2 / mse)
    return value if cap is None else min(value, cap)


def _gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(values: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable filter over the two leading axes with reflect padding (output has the input's shape)."""
    r = len(window) // 2
    pad = [(r, r), (r, r)] + [(0, 0)] * (values.ndim - 2)
    padded = np.pad(values, pad, mode="reflect")
    h, w = values.shape[:2]
    rows = sum(wk * padded[k:k + h] for k, wk in enumerate(window))
    return sum(wk * rows[:, k:k + w] for k, wk in enumerate(window))


def ssim_map(a, b) -> np.ndarray:
    """Per-pixel SSIM (H×W), averaged over channels."""
    a, b = _as_float(a), _as_float(b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    window = _gaussian_window()
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_a, mu_b = _filter(a, window), _filter(b, window)
    var_a = _filter(a * a, window) - mu_a**2
    var_b = _filter(b * b, window) - mu_b**2
    cov = _filter(a * b, window) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean(axis=-1)


def ssim(a, b, region=None) -> float:
    """Mean SSIM over ``region`` (all pixels if None); NaN for an empty region."""
    values = ssim_map(a, b)
    values = values if region is None else values[np.asarray(region, bool)]
    return float(values.mean()) if values.size else float("nan")


def coherence(output, truth_background, mask, objects=()) -> dict[str, float]:
    """Share of in-mask, off-object pixels matching the true background, and their mean absolute error."""
    region = np.asarray(mask, bool).copy()
    for obj in objects:
        region &= ~dilate(obj, 1)
    if not region.any():
        return {"coherence": float("nan"), "coherence_mae": float("nan")}
    diff = _as_float(output)[region] - _as_float(truth_background)[region]
    distance = np.linalg.norm(diff, axis=-1)
    return {"coherence": float(np.mean(distance <= COHERENCE_TOLERANCE)), "coherence_mae": float(np.abs(diff).mean())}


def objects_in_mask(output, mask, analysis=None) -> list[np.ndarray]:
    """Masks of the objects the oracle finds more than half inside ``mask`` (the new objects of an edit)."""
    mask = np.asarray(mask, bool)
    analysis = analyse(output) if analysis is None else analysis
    return [o.mask for o in analysis.objects if (o.mask & mask).sum() > 0.5 * o.area]


def gradient_magnitude(image) -> np.ndarray:
    """RMS over channels of the forward-difference gradient (0 in the last row / column), H×W."""
    x = _as_float(image)
    if x.ndim == 2:
        x = x[..., None]
    dx, dy = np.zeros_like(x), np.zeros_like(x)
    dx[:, :-1] = x[:, 1:] - x[:, :-1]
    dy[:-1] = x[1:] - x[:-1]
    return np.sqrt(((dx**2 + dy**2)).mean(axis=-1))


def seam_score(output, source, mask, reference=None, ring: int = SEAM_RING, band: int = SEAM_BAND) -> dict[str, float]:
    """``seam_ring`` and ``seam_grad`` (module docstring); NaN where a ring is empty."""
    mask = np.asarray(mask, bool)
    out = _as_float(output)
    ref = _as_float(source if reference is None else reference)
    outside_ring = dilate(mask, ring) & ~mask
    edge_band = dilate(mask, 1) & ~erode(mask, band)
    ring_value = float(np.abs(out - ref)[outside_ring].mean()) if outside_ring.any() else float("nan")
    jump = np.abs(gradient_magnitude(out) - gradient_magnitude(ref))
    grad_value = float(jump[edge_band].mean()) if edge_band.any() else float("nan")
    return {"seam_ring": ring_value, "seam_grad": grad_value}


# --------------------------------------------------------------------------------------------- intervals

_Z95 = 1.959963984540054
# Student t 0.975 quantiles for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t (table up to 30 df, Cornish–Fisher expansion above)."""
    if df < 1:
        return float("inf")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = _Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values) -> tuple[float, float, float, int]:
    """(mean, low, high, n) with a 95 % Student-t interval, NaNs dropped; the interval is the mean for n = 1."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(x.mean())
    if n == 1:
        return mean, mean, mean, 1
    half = t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def summarise(values, proportion: bool) -> dict:
    """``{"mean", "lo", "hi", "n"}`` of per-case values (Wilson for proportions, Student t for means)."""
    if proportion:
        flags = [bool(v) for v in values if v is not None]
        n, k = len(flags), sum(flags)
        lo, hi = wilson_interval(k, n)
        return {"mean": k / n if n else float("nan"), "lo": lo, "hi": hi, "n": n}
    mean, lo, hi, n = mean_interval(values)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}
