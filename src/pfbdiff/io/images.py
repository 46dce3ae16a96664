"""Reading and validating the images and masks that the user hands to PFB-Diff.

* :func:`load_image` turns a path, PIL image, numpy array or torch tensor into an upright 8-bit RGB
  PIL image, and :func:`load_mask` turns the same kinds of input into a soft float mask
  (1 = edit, 0 = keep) of the image's size.
* Files are checked before and while they are decoded (missing, empty, a folder, not an image, too many
  pixels for :data:`MAX_PIXELS`), and every user mistake raises :class:`~pfbdiff.errors.PFBDiffError` with a
  one-line message that names the input and the fix.
* :func:`mask_coverage` and :func:`mask_extent` say how much of a mask will be edited.

How each pixel format (PIL modes, bit depths, dtypes, alpha) is read lives in :mod:`pfbdiff.io.pixel_formats`;
moving between loaded images and the model's tensors in :mod:`pfbdiff.io.tensors`; writing results (PNG with
the edit's settings) in :mod:`pfbdiff.io.outputs`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pfbdiff.errors import PFBDiffError
from pfbdiff.io.pixel_formats import (
    channels_to_rgb,
    check_not_empty,
    is_tensor,
    numpy_to_channels,
    pil_to_channels,
    pil_to_rgb,
    split_alpha,
    tensor_to_channels,
)

if TYPE_CHECKING:
    import torch

#: Largest image (width × height) that :func:`load_image` / :func:`load_mask` will decode from a file.
#: It guards against "decompression bombs" (tiny files that expand to gigabytes). ``None`` disables it.
MAX_PIXELS: int | None = 100_000_000

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]
Size = tuple[int, int]

# Rec. 601 luma weights: the ones PIL uses for "RGB" -> "L", so masks agree with what editors show.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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
    return channels_to_rgb(loaded)


def load_mask(source: ImageSource, size: Size | None = None, *, name: str = "mask") -> np.ndarray:
    """Load ``source`` as a float32 H×W mask in [0, 1]: white (1) = edit, black (0) = keep.

    Accepts the same kinds of input as :func:`load_image`. Grey levels are kept (the mask stays soft).
    Colour masks use their luminance. A mask with transparency whose colour is the same everywhere (strokes
    painted on a transparent layer) uses its alpha channel; other transparent masks use luminance × alpha,
    so transparent means keep. If ``size`` = (width, height) is given and differs, the mask is resized to it
    with a :class:`UserWarning` naming both sizes.
    """
    loaded = _load_pil_or_array(source, name, signed_tensors=False)
    channels = pil_to_channels(loaded, name) if isinstance(loaded, Image.Image) else loaded
    mask = _channels_to_mask(channels)
    if size is not None:
        mask = _match_mask_size(mask, check_size(size, "size"), name)
    return mask


def _load_pil_or_array(source: Any, name: str, *, signed_tensors: bool) -> Image.Image | np.ndarray:
    """Dispatch on the kind of ``source``: a PIL image, or a float32 H×W×C array in [0, 1] (C in 1-4)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_image_file(Path(source).expanduser(), name)
    if isinstance(source, Image.Image):
        check_not_empty(source.size, name)
        _check_in_memory_size(source.size, name)
        # A PIL image straight from Image.open is still sideways; exif_transpose is a no-op for upright ones.
        return ImageOps.exif_transpose(source)
    if (is_tensor(source) or isinstance(source, np.ndarray)) and source.ndim >= 2:
        # Before any conversion: a float copy of a huge array is what would exhaust memory.
        rows, cols = _array_height_width(source)
        _check_in_memory_size((cols, rows), name)
    if is_tensor(source):
        return tensor_to_channels(source, name, signed=signed_tensors)
    if isinstance(source, np.ndarray):
        return numpy_to_channels(source, name)
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
    check_not_empty(upright.size, name, path)
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
            f"(limit {MAX_PIXELS / 1e6:g} megapixels); downscale it first or raise pfbdiff.io.images.MAX_PIXELS"
        )


def _array_height_width(array) -> tuple[int, int]:
    """(rows, columns) of an H×W, H×W×C, C×H×W or 1×C×H×W array or tensor (channels first only for torch)."""
    shape = tuple(array.shape)
    if is_tensor(array) and len(shape) >= 3:
        return shape[-2], shape[-1]
    return shape[0], shape[1]


def _check_in_memory_size(size: Size, name: str) -> None:
    width, height = size
    if MAX_PIXELS is not None and width * height > MAX_PIXELS:
        raise PFBDiffError(
            f"the {name} is {width}×{height} ({width * height / 1e6:.1f} megapixels), too large "
            f"(limit {MAX_PIXELS / 1e6:g} megapixels); downscale it first or raise pfbdiff.io.images.MAX_PIXELS"
        )


def _pillow_bomb_message(error: Exception, path: Path, name: str) -> str:
    """Pillow refused before we saw the size; recover the pixel count from its message if it gave one."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    amount = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
    return f"{name} {path} has {amount}, too large to decode safely (decompression-bomb guard); downscale it first"


def one_line(text: str) -> str:
    """``text`` on one line: every run of whitespace, newlines included, becomes one space."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------


def _channels_to_mask(channels: np.ndarray) -> np.ndarray:
    """Collapse H×W×C to a single H×W edit mask (rules in :func:`load_mask`)."""
    colour, alpha = split_alpha(channels)
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
    return resize_float_mask(mask, size)


def resize_float_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float mask with Lanczos in full float precision; clip the filter's overshoot back to [0, 1]."""
    resized = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def mask_coverage(mask: np.ndarray | torch.Tensor) -> float:
    """Fraction (0-1) of pixels that will be edited, i.e. whose mask value is at least 0.5."""
    values = mask_values(mask)
    return float((values >= 0.5).mean()) if values.size else 0.0


def mask_extent(mask: np.ndarray | torch.Tensor) -> str:
    """How much of the image a mask selects at the 0.5 threshold: ``"empty"``, ``"full"`` or ``"partial"``."""
    coverage = mask_coverage(mask)
    if coverage == 0.0:
        return "empty"
    return "full" if coverage == 1.0 else "partial"


def mask_values(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """A mask given as an array or a tensor (any dtype, any device) as a float32 numpy array."""
    if is_tensor(mask):
        return mask.detach().float().cpu().numpy()
    return np.asarray(mask, dtype=np.float32)


def check_size(size: Any, what: str) -> Size:
    """``size`` as a (width, height) pair of positive ints; ``what`` names it in the error message."""
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise PFBDiffError(f"{what} must be (width, height), got {size!r}") from None
    if width <= 0 or height <= 0:
        raise PFBDiffError(f"{what} must be positive (width, height), got {width}×{height}")
    return width, height


def _format_size(size: Size) -> str:
    return f"{size[0]}×{size[1]}"
