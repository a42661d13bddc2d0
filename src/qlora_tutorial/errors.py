"""The errors a learner's own input can cause, kept apart from the library's failures.

A ``UserInputError`` says what is wrong with a setting, a folder or a data file
and what to do about it; ``python -m qlora_tutorial`` prints it as one
``error: ...`` line with no traceback. Any other exception is a bug (ours or a
library's) and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A setting, folder or file the user gave is unusable; the message says what to change."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A folder or file the user named does not exist (also a ``FileNotFoundError``)."""
