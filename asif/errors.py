"""The errors ASIF raises on bad input: each message names what was wrong and what to do.

They all derive from ``ASIFInputError`` (a ``ValueError``), so a caller that
wants one line instead of a traceback catches that one class; the command
line turns it into exit status 2.
"""
from __future__ import annotations


class ASIFInputError(ValueError):
    """Bad input: the message names the argument, what is wrong and the fix."""


class DataError(ASIFInputError):
    """A dataset, anchor set, cache or download problem; the message says the fix."""


class MissingDataError(DataError):
    """Data that is neither installed nor downloadable here."""


class OfflineError(DataError):
    """Data that must be downloaded, on a machine without network."""


class ImageLoadError(DataError):
    """An image that cannot be decoded; ``path`` names it (or says it came as bytes)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot read image {self.path}: {reason}")


class FetchError(DataError):
    """A registry download that failed. ``kind`` is one of: ``html`` (a web page
    came instead of the file: Drive quota or permission), ``not_found`` (404),
    ``http`` (another HTTP status), ``network``, ``truncated``, ``checksum``,
    ``no_space``, ``archive`` (not a valid archive)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
