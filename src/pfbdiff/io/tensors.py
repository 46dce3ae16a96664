"""Moving between the user's images and masks and the diffusion model's tensors, at model size and back.

* :func:`fit_to_multiple` / :func:`round_to_multiple` pick the model size: sides divisible by 8 (the VAE's
  downsampling), as close as possible to the user's, never padded or squashed to a square.
* :func:`image_to_tensor` and :func:`mask_to_tensor` resize a loaded image or mask to that size and make the
  model's tensors of it.
* :func:`tensor_to_pil`, :func:`restore_size` and :func:`convert_output` turn the model's [-1, 1] images back
  into what the user asked for.

Loading and validating the user's files lives in :mod:`pfbdiff.io.images`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pfbdiff.errors import PFBDiffError
from pfbdiff.io.images import Size, check_size, mask_values, resize_float_mask
from pfbdiff.io.pixel_formats import pil_to_rgb

#: Output types understood by :func:`convert_output` (the same names diffusers uses).
OUTPUT_TYPES = ("pil", "np", "pt")


def fit_to_multiple(size: Size, multiple: int = 8) -> Size:
    """Round (width, height) each to the nearest multiple of ``multiple`` (at least one multiple).

    The VAE needs sides divisible by 8. Rounding each side separately moves it by at most ``multiple / 2``
    pixels, so the aspect ratio barely changes; the picture is never padded or squashed to a square.
    """
    width, height = check_size(size, "size")
    if not isinstance(multiple, int) or multiple <= 0:
        raise PFBDiffError(f"multiple must be a positive integer, got {multiple!r}")
    return round_to_multiple(width, multiple), round_to_multiple(height, multiple)


def round_to_multiple(length: float, multiple: int) -> int:
    """``length`` rounded half-up to a multiple of ``multiple``, at least one multiple.

    Half-up because Python's ``round()`` rounds halves to even: 12 / 8 would go up to 16 but 20 / 8 down to 16.
    """
    return max(multiple, int(math.floor(length / multiple + 0.5)) * multiple)


def image_to_tensor(image: Image.Image, size: Size | None = None) -> torch.Tensor:
    """PIL image -> float32 tensor 1×3×H×W in [-1, 1], resized with Lanczos to ``size`` (W, H) if it differs."""
    rgb = image if image.mode == "RGB" else pil_to_rgb(image, "image")
    if size is not None and rgb.size != tuple(size):
        rgb = rgb.resize(check_size(size, "size"), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_tensor(mask: np.ndarray, size: Size | None = None) -> torch.Tensor:
    """H×W float mask -> float32 tensor 1×1×H×W in [0, 1], resized (Lanczos, clipped) to ``size`` (W, H)."""
    values = np.clip(mask_values(mask), 0.0, 1.0)
    if values.ndim != 2:
        raise PFBDiffError(f"mask must be a 2-D H×W array, got shape {tuple(values.shape)}; load it with load_mask")
    if size is not None and (values.shape[1], values.shape[0]) != tuple(size):
        values = resize_float_mask(values, check_size(size, "size"))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """B×3×H×W (or 3×H×W) tensor in [-1, 1] -> list of 8-bit RGB PIL images (values clamped, rounded)."""
    return [Image.fromarray(pixels) for pixels in _to_uint8_batch(images)]


def _to_uint8_batch(images: torch.Tensor) -> np.ndarray:
    unit = _to_unit_batch(images)
    return (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_unit_batch(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model output -> float32 B×3×H×W in [0, 1] on the CPU."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise PFBDiffError(f"expected images shaped B×3×H×W, got {tuple(images.shape)}")
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def restore_size(image: Image.Image, size: Size) -> Image.Image:
    """Resize ``image`` back to the original (width, height) with Lanczos; a no-op when it already matches."""
    size = check_size(size, "size")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def convert_output(images: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray | torch.Tensor:
    """Convert B×3×H×W model images in [-1, 1] like diffusers does.

    ``"pil"``: list of RGB PIL images; ``"np"``: float32 array B×H×W×3 in [0, 1];
    ``"pt"``: float32 tensor B×3×H×W in [0, 1].
    """
    if output_type not in OUTPUT_TYPES:
        raise PFBDiffError(f"unknown output_type {output_type!r}; use one of {', '.join(map(repr, OUTPUT_TYPES))}")
    if output_type == "pil":
        return tensor_to_pil(images)
    unit = _to_unit_batch(images)
    return unit.permute(0, 2, 3, 1).numpy() if output_type == "np" else unit


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images → a B×3×H×W float tensor in [-1, 1]."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


def to_grey(mask: np.ndarray) -> Image.Image:
    """A float mask in [0, 1] as an 8-bit greyscale image."""
    return Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8), mode="L")
