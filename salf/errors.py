"""One exception type for every mistake a user can fix.

The CLI prints a ``SalfError`` as one message (problem, then fix) and exits non-zero, without a
traceback unless ``--debug`` is given. Anything else is a bug in salf and keeps its traceback.
"""

from __future__ import annotations


class SalfError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
