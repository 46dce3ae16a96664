"""Reading, validating and converting the images and masks that PFB-Diff works on.

Everything that crosses the boundary between the user's files and the diffusion model goes through here:

* :func:`load_image` turns a path, PIL image, numpy array or torch tensor into an upright 8-bit RGB
  PIL image, and :func:`load_mask` turns the same kinds of input into a soft float mask
  (1 = edit, 0 = keep) of the image's size.
* :func:`fit_to_multiple`, :func:`image_to_tensor`, :func:`mask_to_tensor`, :func:`tensor_to_pil`,
  :func:`restore_size` and :func:`convert_output` move between those and the model's tensors without
  ever squashing the picture to a square.

Writing results (PNG with the edit's settings) lives in :mod:`pfbdiff.outputs`.

Conventions chosen here (and relied on by the rest of pfbdiff):

* Transparency in a *photo* is flattened onto white, the usual background of cut-out images.
* 16-bit data (PIL modes ``I;16*`` and ``I``, ``uint16`` arrays) spans 0-65535 and is scaled, not clipped,
  to 8 bits. PIL mode ``F`` is taken as 0-1 when no value exceeds 1, else as 0-255.
* Float numpy arrays must lie in [0, 1]. Float torch tensors are taken as [0, 1], unless they hold clearly
  negative values, in which case they are taken as [-1, 1] (the diffusers convention).
* Every user mistake raises :class:`~pfbdiff.errors.PFBDiffError` with a one-line message.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pfbdiff.errors import PFBDiffError

#: Largest image (width × height) that :func:`load_image` / :func:`load_mask` will decode from a file.
#: It guards against "decompression bombs" (tiny files that expand to gigabytes). ``None`` disables it.
MAX_PIXELS: int | None = 100_000_000

#: Background that transparent parts of a photo are flattened onto.
ALPHA_BACKGROUND = (255, 255, 255)

#: Output types understood by :func:`convert_output` (the same names diffusers uses).
OUTPUT_TYPES = ("pil", "np", "pt")

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Size = tuple[int, int]

# Rec. 601 luma weights: the ones PIL uses for "RGB" -> "L", so masks agree with what editors show.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Float inputs a hair outside their range (rounding noise) are clipped instead of rejected.
_RANGE_TOLERANCE = 1e-3
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes with an alpha band (a lower-case "a" means premultiplied alpha). Not `"A" in mode`: that matches "LAB".
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, name: str = "image") -> Image.Image:
    """Load ``source`` as an upright 8-bit RGB PIL image.

    ``source`` may be a path, a PIL image (any mode), a numpy array (H×W, H×W×1/2/3/4 of uint8, uint16,
    bool or float in [0, 1]) or a torch tensor (H×W, C×H×W or 1×C×H×W; float in [0, 1] or [-1, 1], or
    uint8). Files get their EXIF orientation applied; transparency is flattened onto white. ``name`` is
    used in error messages ("image", "mask", ...).
    """
    loaded = _load_pil_or_array(source, name, signed_tensors=True)
    if isinstance(loaded, Image.Image):
        return pil_to_rgb(loaded, name)
    return _array_to_rgb(loaded)


def load_mask(source: ImageSource, size: Size | None = None, *, name: str = "mask") -> np.ndarray:
    """Load ``source`` as a float32 H×W mask in [0, 1]: white (1) = edit, black (0) = keep.

    Accepts the same kinds of input as :func:`load_image`. Grey levels are kept (the mask stays soft).
    Colour masks use their luminance. A mask with transparency whose colour is the same everywhere (strokes
    painted on a transparent layer) uses its alpha channel; other transparent masks use luminance × alpha,
    so transparent means keep. If ``size`` = (width, height) is given and differs, the mask is resized to it
    with a :class:`UserWarning` naming both sizes.
    """
    loaded = _load_pil_or_array(source, name, signed_tensors=False)
    channels = _pil_to_float_array(loaded, name) if isinstance(loaded, Image.Image) else loaded
    mask = _channels_to_mask(channels)
    if size is not None:
        mask = _match_mask_size(mask, _check_size(size, "size"), name)
    return mask


def _load_pil_or_array(source: Any, name: str, *, signed_tensors: bool) -> Image.Image | np.ndarray:
    """Dispatch on the kind of ``source``: a PIL image, or a float32 H×W×C array in [0, 1] (C in 1-4)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_image_file(Path(source).expanduser(), name)
    if isinstance(source, Image.Image):
        _check_not_empty(source.size, name)
        _check_in_memory_size(source.size, name)
        # A PIL image straight from Image.open is still sideways; exif_transpose is a no-op for upright ones.
        return ImageOps.exif_transpose(source)
    if isinstance(source, (torch.Tensor, np.ndarray)) and source.ndim >= 2:
        # Before any conversion: a float copy of a huge array is what would exhaust memory.
        rows, cols = _array_height_width(source)
        _check_in_memory_size((cols, rows), name)
    if isinstance(source, torch.Tensor):
        return _tensor_to_float_array(source, name, signed=signed_tensors)
    if isinstance(source, np.ndarray):
        return _numpy_to_float_array(source, name)
    raise PFBDiffError(
        f"cannot use a {type(source).__name__} as the {name}; pass a file path, PIL image, numpy array or torch tensor"
    )


def _open_image_file(path: Path, name: str) -> Image.Image:
    """Open, fully decode and EXIF-rotate the image file at ``path``, turning every failure into a user error."""
    check_readable_file(path, name)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is replaced by the MAX_PIXELS check below, which names the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_not_too_large(image.size, path, name)
                image.load()
                upright = ImageOps.exif_transpose(image)
    except PFBDiffError:
        raise
    except Image.DecompressionBombError as error:
        raise PFBDiffError(_pillow_bomb_message(error, path, name)) from None
    except UnidentifiedImageError:
        raise PFBDiffError(
            f"cannot read {path} as an image (unknown or damaged format); is it a PNG/JPEG/WebP?"
        ) from None
    except PermissionError:
        raise PFBDiffError(f"cannot open {name} file {path}: permission denied; check the file's permissions") from None
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = one_line(str(error)) or type(error).__name__
        raise PFBDiffError(f"cannot read {path} as an image ({reason}); is it a PNG/JPEG/WebP?") from None
    _check_not_empty(upright.size, name, path)
    return upright


def check_readable_file(path: Path, name: str) -> None:
    """Reject paths that cannot possibly be an image file, with a message for each reason."""
    if not path.exists():
        raise PFBDiffError(f"{name} file not found: {path}")
    if path.is_dir():
        raise PFBDiffError(f"{name} path is a directory, not a file: {path}; pass the {name} file itself")
    if path.stat().st_size == 0:
        raise PFBDiffError(f"{name} file {path} is empty (0 bytes); re-export or re-download it")


def _check_not_too_large(size: Size, path: Path, name: str) -> None:
    width, height = size
    if MAX_PIXELS is not None and width * height > MAX_PIXELS:
        raise PFBDiffError(
            f"{name} {path} is {width}×{height} ({width * height / 1e6:.1f} megapixels), too large "
            f"(limit {MAX_PIXELS / 1e6:g} megapixels); downscale it first or raise pfbdiff.images.MAX_PIXELS"
        )


def _array_height_width(array) -> tuple[int, int]:
    """(rows, columns) of an H×W, H×W×C, C×H×W or 1×C×H×W array or tensor (channels first only for torch)."""
    shape = tuple(array.shape)
    if isinstance(array, torch.Tensor) and len(shape) >= 3:
        return shape[-2], shape[-1]
    return shape[0], shape[1]


def _check_in_memory_size(size: Size, name: str) -> None:
    width, height = size
    if MAX_PIXELS is not None and width * height > MAX_PIXELS:
        raise PFBDiffError(
            f"the {name} is {width}×{height} ({width * height / 1e6:.1f} megapixels), too large "
            f"(limit {MAX_PIXELS / 1e6:g} megapixels); downscale it first or raise pfbdiff.images.MAX_PIXELS"
        )


def _pillow_bomb_message(error: Exception, path: Path, name: str) -> str:
    """Pillow refused before we saw the size; recover the pixel count from its message if it gave one."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    amount = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
    return f"{name} {path} has {amount}, too large to decode safely (decompression-bomb guard); downscale it first"


def _check_not_empty(size: Size, name: str, path: Path | None = None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        where = f" {path}" if path is not None else ""
        raise PFBDiffError(f"{name}{where} has a zero dimension ({width}×{height}); use a non-empty image")


def one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------
# PIL <-> arrays
# --------------------------------------------------------------------------------------------------------


def pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling high bit depths and flattening alpha onto white."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _array_to_rgb(_pil_to_float_array(image, name))
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


def _pil_to_float_array(image: Image.Image, name: str) -> np.ndarray:
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


def _as_channels(values: np.ndarray) -> np.ndarray:
    """Give a 2-D array a trailing channel axis so every array here is H×W×C."""
    values = values.astype(np.float32, copy=False)
    return values[..., None] if values.ndim == 2 else values


def _array_to_rgb(channels: np.ndarray) -> Image.Image:
    """Float H×W×C in [0, 1] -> 8-bit RGB PIL image, alpha flattened onto white."""
    colour, alpha = _split_alpha(channels)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha is not None:
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32) / 255.0
        colour = colour * alpha[..., None] + background * (1.0 - alpha[..., None])
    return Image.fromarray(_float_to_uint8(colour))


def _split_alpha(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if channels.shape[-1] in (2, 4):
        return channels[..., :-1], channels[..., -1]
    return channels, None


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _numpy_to_float_array(array: np.ndarray, name: str) -> np.ndarray:
    """Validate a numpy image (H×W or H×W×C) and scale it to float32 H×W×C in [0, 1]."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise PFBDiffError(
            f"unsupported {name} array shape {tuple(array.shape)}; use H×W, H×W×3 (RGB) or H×W×4 (RGBA)"
        )
    _check_not_empty((array.shape[1], array.shape[0]), name)
    return _as_channels(_scale_to_unit(array, name, signed=False))


def _tensor_to_float_array(tensor: torch.Tensor, name: str, *, signed: bool) -> np.ndarray:
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
    _check_not_empty((tensor.shape[1], tensor.shape[0]), name)
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


# --------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------


def _channels_to_mask(channels: np.ndarray) -> np.ndarray:
    """Collapse H×W×C to a single H×W edit mask (rules in :func:`load_mask`)."""
    colour, alpha = _split_alpha(channels)
    brightness = colour[..., 0] if colour.shape[-1] == 1 else colour @ _LUMA_WEIGHTS
    if alpha is None or _is_constant(alpha):
        return np.ascontiguousarray(brightness, dtype=np.float32)
    if _is_constant(colour):
        return np.ascontiguousarray(alpha, dtype=np.float32)
    return np.ascontiguousarray(brightness * alpha, dtype=np.float32)


def _is_constant(values: np.ndarray) -> bool:
    """True when every pixel has (nearly) the same value, per channel; tolerance is one 8-bit step."""
    flat = values.reshape(-1, values.shape[-1]) if values.ndim == 3 else values.reshape(-1, 1)
    return bool((np.ptp(flat, axis=0) <= 1.0 / 255.0).all())


def _match_mask_size(mask: np.ndarray, size: Size, name: str) -> np.ndarray:
    """Resize ``mask`` to ``size`` (W, H) if needed, warning because a mismatch often means the wrong file."""
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size == size:
        return mask
    mask_aspect, image_aspect = mask_size[0] / mask_size[1], size[0] / size[1]
    if abs(mask_aspect / image_aspect - 1.0) > 0.01:
        # Stretching would move the edit region: a mask of another shape almost always belongs to another image.
        raise PFBDiffError(
            f"{name} is {_format_size(mask_size)} but the image is {_format_size(size)}: their aspect ratios differ "
            f"({mask_aspect:.3f} vs {image_aspect:.3f}); give a {name} made for this image"
        )
    message = f"{name} is {_format_size(mask_size)} but the image is {_format_size(size)}; resized the {name} to match"
    warnings.warn(message, UserWarning, stacklevel=3)
    return _resize_float(mask, size)


def _resize_float(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float mask with Lanczos in full float precision; clip the filter's overshoot back to [0, 1]."""
    resized = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def mask_coverage(mask: np.ndarray | torch.Tensor) -> float:
    """Fraction (0-1) of pixels that will be edited, i.e. whose mask value is at least 0.5."""
    values = _mask_values(mask)
    return float((values >= 0.5).mean()) if values.size else 0.0


def describe_empty_or_full(mask: np.ndarray | torch.Tensor) -> str | None:
    """A sentence for a mask that selects nothing or everything (at the 0.5 threshold), else ``None``."""
    coverage = mask_coverage(mask)
    if coverage == 0.0:
        return "the mask is all black: nothing to edit; paint the region to change in white"
    if coverage == 1.0:
        return "the mask is all white: the whole image is regenerated; paint the region to keep in black"
    return None


def _mask_values(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().float().cpu().numpy()
    return np.asarray(mask, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------
# Model-size preparation
# --------------------------------------------------------------------------------------------------------


def fit_to_multiple(size: Size, multiple: int = 8) -> Size:
    """Round (width, height) each to the nearest multiple of ``multiple`` (at least one multiple).

    The VAE needs sides divisible by 8. Rounding each side separately moves it by at most ``multiple / 2``
    pixels, so the aspect ratio barely changes; the picture is never padded or squashed to a square.
    """
    width, height = _check_size(size, "size")
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
        rgb = rgb.resize(_check_size(size, "size"), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_tensor(mask: np.ndarray, size: Size | None = None) -> torch.Tensor:
    """H×W float mask -> float32 tensor 1×1×H×W in [0, 1], resized (Lanczos, clipped) to ``size`` (W, H)."""
    values = np.clip(_mask_values(mask), 0.0, 1.0)
    if values.ndim != 2:
        raise PFBDiffError(f"mask must be a 2-D H×W array, got shape {tuple(values.shape)}; load it with load_mask")
    if size is not None and (values.shape[1], values.shape[0]) != tuple(size):
        values = _resize_float(values, _check_size(size, "size"))
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
    size = _check_size(size, "size")
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


def _check_size(size: Any, what: str) -> Size:
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise PFBDiffError(f"{what} must be (width, height), got {size!r}") from None
    if width <= 0 or height <= 0:
        raise PFBDiffError(f"{what} must be positive (width, height), got {width}×{height}")
    return width, height


def _format_size(size: Size) -> str:
    return f"{size[0]}×{size[1]}"
