"""User-facing errors.

A :class:`PFBDiffError` is a mistake in what the user asked for (a missing file, a word that is not in the
prompt, a strength out of range). Its message is one line that names the problem and the fix; the CLI prints
it without a traceback and exits with code 2. Anything else that escapes is a bug in pfbdiff.
"""


class PFBDiffError(ValueError):
    """A user error with a one-line message that says what is wrong and how to fix it."""
