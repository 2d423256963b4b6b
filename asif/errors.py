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


class StorageError(DataError):
    """A file or folder that cannot be written (disk full, read-only, no permission, a
    file or folder in the way) or a stored file that cannot be read; the message names it."""


class ImageLoadError(DataError):
    """An image that cannot be decoded; ``path`` names it (or says it came as bytes)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class BadImagesError(DataError):
    """Several images that cannot be decoded, all named in one message; ``failed`` lists
    ``(index, label, reason)`` of each."""

    def __init__(self, failed: list, total: int, hint: str = ""):
        self.failed = list(failed)
        shown = "; ".join(f"{label} ({reason})" for _, label, reason in self.failed[:20])
        more = f"; and {len(self.failed) - 20} more" if len(self.failed) > 20 else ""
        super().__init__(f"{len(self.failed)} of {total} images cannot be read: {shown}{more}"
                         + (f". {hint}" if hint else ""))


class FetchError(DataError):
    """A registry download that failed. ``kind`` is one of: ``html`` (a web page
    came instead of the file: Drive quota or permission), ``not_found`` (404),
    ``http`` (another HTTP status), ``network``, ``truncated``, ``checksum``,
    ``no_space``, ``archive`` (not a valid archive)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
