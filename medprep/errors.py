"""Errors that describe bad input in one line: which sample, which file, what is wrong."""

from __future__ import annotations


class InputError(Exception):
    """Bad or unusable input. ``str()`` is the one line shown to the user.

    ``sample`` and ``path`` may be filled in later by the caller that knows them
    (engines often know the file but not the sample name).
    """

    def __init__(self, cause: str, *, path: str | None = None, sample: str | None = None):
        super().__init__(cause)
        self.cause = cause
        self.path = path
        self.sample = sample

    def with_context(self, *, sample: str | None = None, path: str | None = None) -> InputError:
        self.sample = self.sample or sample
        self.path = self.path or path
        return self

    def __str__(self) -> str:
        parts = []
        if self.sample:
            parts.append(f"sample {self.sample}")
        if self.path:
            parts.append(f"file {self.path}")
        parts.append(self.cause)
        return ": ".join(parts)
