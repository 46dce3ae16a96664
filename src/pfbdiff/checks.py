"""The rules for the numbers a user gives, one each, in one place.

Every face (command-line options, manifest lines, ``--from-json`` records, the web page's fields) and the Python
API check a number with the same rule, so the same mistake gets the same message everywhere. A rule raises
:meth:`PFBDiffError.about <pfbdiff.errors.PFBDiffError.about>` with the parameter's name (a ``ValueError``),
which each face writes its own way (``--steps``, ``"steps"``, “Steps”). This module imports nothing heavy, so
the command line checks a request before it imports torch.
"""

from __future__ import annotations

import math

from pfbdiff.errors import PFBDiffError

#: Seeds are 64-bit (``torch.Generator.manual_seed``).
MAX_SEED = 2**64 - 1


def integer(name: str, value) -> int:
    """A whole number (``3`` or ``3.0``; not ``True``, ``2.5``, ``"3"``, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise PFBDiffError.about(name, f"must be an integer, got {value!r}")
    return int(value)


def integer_in(name: str, value, low: int, high: int | None, wording: str) -> int:
    """A whole number in [low, high] (no upper bound with ``high=None``); ``wording`` says the range."""
    value = integer(name, value)
    if value < low or (high is not None and value > high):
        raise PFBDiffError.about(name, f"must be {wording}, got {value}")
    return value


def finite_number(name: str, value) -> float:
    """A real number that is neither NaN nor infinite (guidance 1e999 is infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PFBDiffError.about(name, f"must be a finite number, got {value!r}")
    return float(value)


def steps(name: str, value, trained: int | None = None) -> int:
    """A number of sampling steps: at least 1, and at most the ``trained`` steps of the model's scheduler when
    known (a DDIM grid cannot be finer than the schedule it is taken from)."""
    value = integer_in(name, value, 1, None, "at least 1")
    if trained is not None and value > trained:
        raise PFBDiffError.about(name, f"must be at most {trained}, the number of steps the model was trained with, "
                                       f"got {value}")
    return value


def seed(name: str, value) -> int:
    return integer_in(name, value, 0, MAX_SEED, "between 0 and 2**64 - 1")


def pixels(name: str, value) -> int:
    return integer_in(name, value, 0, None, "0 or more pixels")


def unit_threshold(name: str, value) -> float:
    """A threshold in [0, 1)."""
    value = finite_number(name, value)
    if not 0.0 <= value < 1.0:
        raise PFBDiffError.about(name, f"must be in [0, 1), got {value}")
    return value


def within_photo(image_size: tuple[int, int], **distances) -> None:
    """Pixel distances (``grow=``, ``halo=``, ``feather=``, ``crop_padding=``; ``None`` = automatic) no longer than
    the photo's longer side: a longer one reaches nothing more, it only costs time."""
    side = max(image_size)
    for name, value in distances.items():
        if value is not None and abs(value) > side:
            raise PFBDiffError.about(name, f"must be at most {side} pixels (the photo's longer side), got {value}")
