"""Errors that reach the user as one line of text (the CLI prints ``str(err)`` and exits 2)."""

from __future__ import annotations

from pathlib import Path


class XtalsolveError(ValueError):
    """A problem with the user's input, worded for the user.

    ``source`` names the file (or argument) at fault; ``str()`` gives ``"<source>: <problem>"``.
    """

    def __init__(self, problem: str, source: str | Path | None = None):
        self.problem = problem
        self.source = None if source is None else str(source)
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")
