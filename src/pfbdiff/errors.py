"""User-facing errors.

A :class:`PFBDiffError` is a mistake in what the user asked for (a missing file, a word that is not in the
prompt, a strength out of range). Its message is one line that names the problem and the fix; the CLI prints
it without a traceback and exits with code 2. Anything else that escapes is a bug in pfbdiff.

An error about one parameter (:meth:`PFBDiffError.about`) knows which: the library names it as the Python
parameter (``steps must be at least 1``), and each front end renders that name its own way (``--steps`` on
the command line, ``"steps"`` in a manifest line) with :meth:`PFBDiffError.naming`.
"""

from __future__ import annotations

import re
from collections.abc import Callable


class PFBDiffError(ValueError):
    """A user error with a one-line message that says what is wrong and how to fix it."""

    def __init__(self, message: str, *, parameter: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.parameter = parameter
        self.detail = detail

    @classmethod
    def about(cls, parameter: str, detail: str) -> "PFBDiffError":
        """An error about one parameter: ``"{parameter} {detail}"``, e.g. ``about("steps", "must be at least 1")``."""
        return cls(f"{parameter} {detail}", parameter=parameter, detail=detail)

    def naming(self, name: Callable[[str], str]) -> str:
        """The message with the parameter written as ``name(parameter)`` (a flag, a JSON key, a field label)."""
        if self.parameter is None or self.detail is None:
            return str(self)
        return f"{name(self.parameter)} {self.detail}"


class EmptyMaskError(PFBDiffError):
    """The mask selects nothing (all black), so there is nothing to edit."""


def gist(error: BaseException, limit: int = 160) -> str:
    """The first sentence of a library's error, short enough to quote inside a one-line message."""
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."
