"""Turning every pixel format a user may hand over into one: float32 H×W×C in [0, 1], and into 8-bit RGB.

:mod:`pfbdiff.io.images` decides *what* to load (files, PIL images, arrays, tensors) and what an image or a mask
is; this module only knows pixel formats: PIL modes, bit depths, numpy / torch dtypes and layouts, alpha.
Every array it returns is H×W×C with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA).

Conventions chosen here (and relied on by the rest of pfbdiff):

* Transparency in a *photo* is flattened onto white, the usual background of cut-out images.
* 16-bit data (PIL modes ``I;16*`` and ``I``, ``uint16`` arrays) spans 0-65535 and is scaled, not clipped,
  to 8 bits. PIL mode ``F`` is taken as 0-1 when no value exceeds 1, else as 0-255.
* Float numpy arrays must lie in [0, 1]. Float torch tensors are taken as [0, 1], unless they hold clearly
  negative values, in which case they are taken as [-1, 1] (the diffusers convention).
* Every unusable input raises :class:`~pfbdiff.errors.PFBDiffError` with a one-line message; ``name``
  ("image", "mask", ...) says in it which input was wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pfbdiff.errors import PFBDiffError

if TYPE_CHECKING:
    import torch

#: Background that transparent parts of a photo are flattened onto.
ALPHA_BACKGROUND = (255, 255, 255)

# Float inputs a hair outside their range (rounding noise) are clipped instead of rejected.
_RANGE_TOLERANCE = 1e-3
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes with an alpha band (a lower-case "a" means premultiplied alpha). Not `"A" in mode`: that matches "LAB".
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# --------------------------------------------------------------------------------------------------------
# PIL images
# --------------------------------------------------------------------------------------------------------


def pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling high bit depths and flattening alpha onto white."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return channels_to_rgb(pil_to_channels(image, name))
    if image.mode == "RGB":
        return image.copy()
    if _has_alpha(image):
        rgba = _convert_mode(image, "RGBA", name)
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return _convert_mode(image, "RGB", name)


def _convert_mode(image: Image.Image, mode: str, name: str) -> Image.Image:
    try:
        return image.convert(mode)
    except (ValueError, OSError):
        raise PFBDiffError(f"unsupported {name} colour mode {image.mode}; save it as an RGB PNG or JPEG") from None


def pil_to_channels(image: Image.Image, name: str) -> np.ndarray:
    """Return float32 H×W×C in [0, 1]: C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit PNG/TIFF data: divide, so 65535 -> 1.0 (converting to "L" in PIL would clip at 255).
        values = np.asarray(image).astype(np.float32)
        return _as_channels(np.clip(values, 0, 65535) / 65535.0)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
        return _as_channels(np.clip(values / scale, 0.0, 1.0))
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        grey = image.mode in ("1", "La") or (image.mode == "P" and _palette_is_grey(image))
        target = ("LA" if _has_alpha(image) else "L") if grey else ("RGBA" if _has_alpha(image) else "RGB")
        image = _convert_mode(image, target, name)
    return _as_channels(np.asarray(image).astype(np.float32) / 255.0)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or image.has_transparency_data


def _palette_is_grey(image: Image.Image) -> bool:
    palette = np.asarray(image.convert("RGB"))
    return bool((palette == palette[..., :1]).all())


# --------------------------------------------------------------------------------------------------------
# Channel arrays
# --------------------------------------------------------------------------------------------------------


def _as_channels(values: np.ndarray) -> np.ndarray:
    """Give a 2-D array a trailing channel axis so every array here is H×W×C."""
    values = values.astype(np.float32, copy=False)
    return values[..., None] if values.ndim == 2 else values


def channels_to_rgb(channels: np.ndarray) -> Image.Image:
    """Float H×W×C in [0, 1] -> 8-bit RGB PIL image, alpha flattened onto white."""
    colour, alpha = split_alpha(channels)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha is not None:
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32) / 255.0
        colour = colour * alpha[..., None] + background * (1.0 - alpha[..., None])
    return Image.fromarray(_float_to_uint8(colour))


def split_alpha(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour channels, alpha channel or ``None``) of an H×W×C array."""
    if channels.shape[-1] in (2, 4):
        return channels[..., :-1], channels[..., -1]
    return channels, None


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def check_not_empty(size: tuple[int, int], name: str, path: Path | None = None) -> None:
    """Reject a (width, height) with a zero side; ``path`` names the file it came from, if any."""
    width, height = size
    if width <= 0 or height <= 0:
        where = f" {path}" if path is not None else ""
        raise PFBDiffError(f"{name}{where} has a zero dimension ({width}×{height}); use a non-empty image")


# --------------------------------------------------------------------------------------------------------
# numpy arrays and torch tensors
# --------------------------------------------------------------------------------------------------------


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch: a program that has not imported torch
    cannot hold one, so reading, checking and saving images stays fast for the command line."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def numpy_to_channels(array: np.ndarray, name: str) -> np.ndarray:
    """Validate a numpy image (H×W or H×W×C) and scale it to float32 H×W×C in [0, 1]."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise PFBDiffError(
            f"unsupported {name} array shape {tuple(array.shape)}; use H×W, H×W×3 (RGB) or H×W×4 (RGBA)"
        )
    check_not_empty((array.shape[1], array.shape[0]), name)
    return _as_channels(_scale_to_unit(array, name, signed=False))


def tensor_to_channels(tensor: torch.Tensor, name: str, *, signed: bool) -> np.ndarray:
    """Validate a torch image (H×W, C×H×W, 1×C×H×W) and return float32 H×W×C in [0, 1]."""
    shape = tuple(tensor.shape)
    if tensor.ndim == 4:
        if shape[0] != 1:
            raise PFBDiffError(f"the {name} tensor holds a batch of {shape[0]} images; pass one image (1×C×H×W)")
        tensor = tensor[0]
    if tensor.ndim == 3:
        if tensor.shape[0] not in (1, 2, 3, 4):
            raise PFBDiffError(
                f"unsupported {name} tensor shape {shape}; use channels first: C×H×W or 1×C×H×W with C = 1, 3 or 4"
            )
        tensor = tensor.permute(1, 2, 0)
    elif tensor.ndim != 2:
        raise PFBDiffError(f"unsupported {name} tensor shape {shape}; use H×W, C×H×W or 1×C×H×W")
    check_not_empty((tensor.shape[1], tensor.shape[0]), name)
    values = tensor.detach().cpu()
    if values.is_floating_point():
        values = values.float()  # numpy has no bfloat16
    return _as_channels(_scale_to_unit(values.numpy(), name, signed=signed))


def _scale_to_unit(values: np.ndarray, name: str, *, signed: bool) -> np.ndarray:
    """Map an array of any supported dtype to float32 in [0, 1] (see the module docstring for the rules)."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    if values.dtype == np.uint16:
        return values.astype(np.float32) / 65535.0
    if np.issubdtype(values.dtype, np.integer):
        return _scale_other_integers(values, name)
    if np.issubdtype(values.dtype, np.floating):
        return _scale_floats(values.astype(np.float32), name, signed=signed)
    raise PFBDiffError(f"unsupported {name} data type {values.dtype}; use uint8, uint16, bool or float")


def _scale_other_integers(values: np.ndarray, name: str) -> np.ndarray:
    # np.array([[0, 255]]) is int64; accept such arrays when they clearly hold 8-bit values.
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 255:
        raise PFBDiffError(
            f"{name} array of type {values.dtype} has values {low}..{high}, outside 0..255; "
            "convert it to uint8 (0-255), uint16 (0-65535) or float (0-1)"
        )
    return values.astype(np.float32) / 255.0


def _scale_floats(values: np.ndarray, name: str, *, signed: bool) -> np.ndarray:
    if not np.isfinite(values).all():
        raise PFBDiffError(f"{name} array contains NaN or infinite values; fix the data before editing")
    low, high = float(values.min()), float(values.max())
    if signed and low < -_RANGE_TOLERANCE:
        values, low, high = (values + 1.0) / 2.0, (low + 1.0) / 2.0, (high + 1.0) / 2.0
        expected = "[-1, 1]"
    else:
        expected = "[0, 1]"
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise PFBDiffError(
            f"float {name} values must be in {expected}, got {float(values.min()):.3g}..{float(values.max()):.3g} "
            "after scaling; divide 0-255 data by 255 or pass uint8"
        )
    return np.clip(values, 0.0, 1.0)
