"""Assertions shared by the tests."""

import pytest
from PIL import Image

from pfbdiff.errors import PFBDiffError


def assert_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    """The error is a PFBDiffError whose one-line message contains every fragment."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, PFBDiffError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(image.getpixel((x, y)))
