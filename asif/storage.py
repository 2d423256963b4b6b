"""Files: atomic writes, embedding-set folders, and the one shard verification.

An *embedding set* is a folder (the design's format):

  manifest.json          format, count, dim, dtype, per-shard file/rows/sha256, plus what
                         produced the vectors (encoder identity, source dataset ...)
  embeddings-00000.npy   [rows, dim] shards, memory-mapped on load
  captions.jsonl         one {"caption": ...} (and "id" where known) per row, where it applies
  labels.npy             [count] int64, where it applies

Every write goes to a temporary file in the same folder that is renamed over
the target, so a reader, or a job that is killed, sees the old file or the
new one and never half of one. The manifest is written last: a folder with
a manifest is complete. Files get the permissions the user's umask gives.
A write that fails (disk full, read-only, no permission, a file in the way)
raises ``StorageError`` naming the file and the folder; ``check_writable``
finds the same faults before any work is done.

Shard verification policy: a shard is checked against the sha256 in its
manifest. Hashing costs about a second per 300 MB, so on a cache hit a shard
whose size and modification time are those it had when last hashed is
trusted without hashing (``VerifiedShards``); any write changes the mtime and
brings the hash back. What that cannot see is bytes changed in place with
size and mtime kept (bit rot, a restored backup with old times): ``asif data
verify`` (``verify_folder``) hashes every shard under a folder, whatever the
stamps say, and removes the damaged ones so that the next run recomputes
them, and only them.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from asif.errors import ASIFInputError, StorageError

__all__ = [
    "EMBEDDING_SET_FORMAT", "sha256_file", "sha256_text", "printable", "read_text", "read_json", "make_folder",
    "check_writable", "atomic_write", "atomic_save_npy",
    "atomic_write_json", "atomic_folder", "slug", "write_captions", "shard_name", "verify_shard", "VerifiedShards",
    "ShardedArray", "EmbeddingSet", "save_embedding_set", "load_embedding_set", "verify_folder",
]

EMBEDDING_SET_FORMAT = "asif-embeddings/1"


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread writes.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
_FILE_MODE, _DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (files may be larger than RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (a file name that is not UTF-8 hashes as its raw bytes)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def printable(name: str | os.PathLike) -> str:
    """A file name as valid text: bytes that are not UTF-8 are shown as ``\\xNN`` (same name, same text)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def read_text(path: str | os.PathLike, what: str | None = None) -> str:
    """A UTF-8 text file (a byte-order mark is dropped) as a string.

    Raises ``StorageError`` naming the file, the line and the fix when it is
    not UTF-8, and ``FileNotFoundError`` when it is missing.
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise StorageError(f"{what or printable(path)}: not UTF-8 text (byte {raw[e.start]:#04x} on line {line}); "
                           "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_json(path: str | os.PathLike, what: str | None = None):
    """The JSON value in ``path``; ``StorageError`` naming the file when it is empty, truncated or not JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        why = "empty" if not text.strip() else f"not valid JSON, truncated? ({e})"
        raise StorageError(f"{what or printable(path)}: {why}") from None


# Faults of the place written to, as opposed to faults of what is being written.
_PLACE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                 errno.EFBIG: "the file is too large for the file system", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EISDIR: "it is a directory", errno.ENOTDIR: "a parent of it is a file, not a folder",
                 errno.EEXIST: "a parent of it is a file, not a folder", errno.ENAMETOOLONG: "the name is too long"}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _nearest_folder(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_error(e: OSError, path: Path) -> StorageError:
    where = _nearest_folder(path.parent)
    reason = _PLACE_ERRNOS.get(e.errno, e.strerror or str(e))
    if e.errno in _FULL:
        with contextlib.suppress(OSError):
            reason += f" ({shutil.disk_usage(where).free / 1e6:.1f} MB free on the disk holding {where})"
        fix = "free some space or write elsewhere (the cache: set ASIF_CACHE to a larger disk)"
    else:
        fix = "write somewhere else"
    return StorageError(f"cannot write {printable(path)}: {reason}; {fix}")


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p``, raising ``StorageError`` (naming the folder and why) instead of an OSError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in _PLACE_ERRNOS:
            raise
        raise _write_error(e, folder) from None
    return folder


def check_writable(path: str | os.PathLike, what: str, size: int = 0) -> Path:
    """Raise ``StorageError`` unless a file of ``size`` bytes can be written at ``path``.

    Run it before the work that produces the file, so a folder in the way, a
    parent that is a file, a read-only or full disk is found in a second, not
    after minutes of computing. It creates nothing (a probe file is removed).
    """
    path = Path(path)
    label = f"{what} {printable(path)}"
    if path.is_dir():
        raise StorageError(f"{label}: is a directory; give a file name (e.g. {printable(path / 'out')})")
    folder = _nearest_folder(path.parent)
    if not folder.is_dir():
        raise StorageError(f"{label}: {printable(folder)} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".asif-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(f"{label}: cannot write in {printable(folder)}: "
                           f"{_PLACE_ERRNOS.get(e.errno, e.strerror)}; write somewhere else") from None
    free = shutil.disk_usage(folder).free
    if free < size + (1 << 16):
        raise StorageError(f"{label}: the disk is full: needs {size / 1e6:.1f} MB, {free / 1e6:.1f} MB free on the "
                           f"disk holding {printable(folder)}; free some space or write elsewhere")
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file that then replaces ``path``.

    A fault of the destination (disk full, read-only, a folder in the way)
    raises ``StorageError`` naming the file; the old file, if any, is kept.
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; outputs follow the umask like any other
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # a full disk shows up inside write(f) too; other OSErrors there may concern what is read
        if isinstance(e, OSError) and (e.errno in _FULL or (e.errno in _PLACE_ERRNOS and e.filename in (tmp, None))):
            raise _write_error(e, path) from None
        raise


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` as .npy atomically; return its sha256."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
    return sha256_file(path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in whole when the block succeeds.

    An interrupted build leaves the old folder (if any) as it was.
    """
    folder = Path(folder)
    make_folder(folder.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise _write_error(e, folder) from None
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)  # mkdtemp makes 0700 folders
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def slug(text: str) -> str:
    """``text`` as a safe file or folder name (at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def write_captions(path: str | os.PathLike, captions: Sequence[str], ids: Sequence[str] | None = None) -> None:
    """captions.jsonl: one ``{"id", "caption"}`` (or ``{"caption"}`` without ids) per row, atomically."""
    if ids is not None and len(ids) != len(captions):
        raise ASIFInputError(f"write_captions: {len(ids)} ids for {len(captions)} captions")
    bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
    if bad is not None:  # str(None) would store the caption "None"
        raise ASIFInputError(f"write_captions: caption {bad} is {type(captions[bad]).__name__}, not text; "
                             "give every pair a caption (or leave the pair out)")
    rows = ({"caption": c} if ids is None else {"id": i, "caption": c}
            for i, c in zip(ids if ids is not None else captions, captions))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------

def shard_name(i: int) -> str:
    """File name of shard ``i`` of an embedding set."""
    return f"embeddings-{i:05d}.npy"


def verify_shard(path: Path, sha256: str, verified: "VerifiedShards | None" = None) -> bool:
    """True when the shard at ``path`` exists and its bytes hash to ``sha256``.

    With ``verified``, a shard whose size and modification time are those it
    had when last hashed is trusted without hashing it again (see
    ``VerifiedShards``); every other shard is hashed.
    """
    path = Path(path)
    if not path.is_file():
        return False
    if verified is not None and verified.unchanged(path, sha256):
        return True
    ok = sha256_file(path) == sha256
    if ok and verified is not None:
        verified.record(path, sha256)
    return ok


class VerifiedShards:
    """The (size, mtime, sha256) of each shard of a folder when its hash was last checked.

    Hashing every shard of a large cache on every use costs about a second
    per 300 MB; a write to a shard changes its mtime, which brings the hash
    back. Kept in ``<folder>/.progress/verified.json``.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".progress" / "verified.json"
        try:
            self.stamps = read_json(self.path) if self.path.exists() else {}
        except StorageError:  # damaged stamps only cost hashing again
            self.stamps = {}
        self.stamps = self.stamps if isinstance(self.stamps, dict) else {}
        self._saved = dict(self.stamps)

    def forget(self, name: str) -> None:
        self.stamps.pop(name, None)

    def unchanged(self, path: Path, sha256: str) -> bool:
        st = path.stat()
        return self.stamps.get(path.name) == [st.st_size, st.st_mtime_ns, sha256]

    def record(self, path: Path, sha256: str) -> None:
        st = path.stat()
        self.stamps[path.name] = [st.st_size, st.st_mtime_ns, sha256]

    def save(self) -> None:
        if self.stamps != self._saved:
            atomic_write_json(self.path, self.stamps)
            self._saved = dict(self.stamps)


class ShardedArray:
    """Read-only row-concatenation of 2-D arrays (memory-mapped .npy shards).

    Supports ``len``, ``shape``, ``dtype``, row slicing ``a[i:j]`` (which
    copies only the rows asked for) and ``np.asarray``. The core streams it in
    blocks, so an anchor set larger than RAM never has to be loaded whole.
    """

    def __init__(self, shards: Sequence[np.ndarray]):
        if not shards:
            raise ASIFInputError("ShardedArray: no shards given")
        dims = {s.shape[1:] for s in shards}
        if len(dims) != 1:
            raise ASIFInputError(f"ShardedArray: shards disagree in shape {sorted(dims)}")
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = np.result_type(*[s.dtype for s in shards])

    @property
    def shape(self):
        return (int(self.offsets[-1]),) + self.shards[0].shape[1:]

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            parts = []
            for s, lo, hi in zip(self.shards, self.offsets[:-1], self.offsets[1:]):
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    parts.append(np.asarray(s[a - lo:b - lo], dtype=self.dtype))
            if not parts:
                return np.empty((0,) + self.shape[1:], dtype=self.dtype)
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            j = int(np.searchsorted(self.offsets, i, side="right") - 1)
            return self.shards[j][i - self.offsets[j]]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class EmbeddingSet:
    """An embedding set folder, opened: ``array`` [count, dim] (memory-mapped) and its manifest.

    ``manifest["failed"]`` (written by the cache) lists rows whose input could
    not be read: they hold zeros, and ``ok`` is False there.
    """
    folder: Path
    array: np.ndarray | ShardedArray
    manifest: dict

    @property
    def captions(self) -> list[str] | None:
        path = self.folder / "captions.jsonl"
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["caption"] for line in f if line.strip()]

    @property
    def labels(self) -> np.ndarray | None:
        path = self.folder / "labels.npy"
        return np.load(path) if path.exists() else None

    @property
    def failed_rows(self) -> np.ndarray:
        """int64 [n_failed]: rows whose input could not be read (zeros in ``array``)."""
        return np.asarray(sorted(f["row"] for f in self.manifest.get("failed", [])), dtype=np.int64)

    @property
    def ok(self) -> np.ndarray:
        """bool [count]: rows that hold a real embedding."""
        mask = np.ones(self.manifest["count"], dtype=bool)
        mask[self.failed_rows] = False
        return mask


def save_embedding_set(folder: str | os.PathLike, array, meta: dict | None = None,
                       shard_rows: int = 65536, captions: Sequence[str] | None = None,
                       labels: np.ndarray | None = None) -> dict:
    """Write ``array`` [count, dim] as an embedding set folder; return the manifest.

    ``meta`` goes into the manifest (encoder id and version, preprocessing,
    source dataset ...). Shards are written atomically one by one and the
    manifest last, so a folder with a manifest is always complete.
    """
    folder = Path(folder)
    if getattr(array, "ndim", None) != 2:
        raise ASIFInputError(f"save_embedding_set: array must be 2-D [count, dim], got shape {getattr(array, 'shape', None)}")
    n, dim = array.shape
    if captions is not None and len(captions) != n:
        raise ASIFInputError(f"save_embedding_set: {len(captions)} captions for {n} embeddings; give one caption per row")
    if labels is not None and len(labels) != n:
        raise ASIFInputError(f"save_embedding_set: {len(labels)} labels for {n} embeddings; give one label per row")
    make_folder(folder)
    shards = []
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        block = np.asarray(array[start:start + shard_rows])
        shards.append({"file": shard_name(i), "rows": int(len(block)),
                       "sha256": atomic_save_npy(folder / shard_name(i), block)})
    if captions is not None:
        write_captions(folder / "captions.jsonl", captions)
    if labels is not None:
        atomic_save_npy(folder / "labels.npy", np.asarray(labels))
    manifest = {"format": EMBEDDING_SET_FORMAT, **(meta or {}), "count": int(n), "dim": int(dim),
                "dtype": str(np.dtype(array.dtype)), "shards": shards}
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest


def load_embedding_set(folder: str | os.PathLike, verify: bool = False) -> EmbeddingSet:
    """Open an embedding set folder; shards are memory-mapped, not read.

    ``verify=True`` checks every shard's sha256 against the manifest.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        raise ASIFInputError(f"{folder}: no manifest.json; this is not an embedding set folder (write one with save_embedding_set)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise StorageError(f"{printable(path)}: not an embedding-set manifest (no list of shards); rebuild the set")
    arrays = []
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.exists():
            raise ASIFInputError(f"{folder}: shard {shard['file']} is missing; rebuild the embedding set")
        if verify and not verify_shard(file, shard["sha256"]):
            raise ASIFInputError(f"{folder}: shard {shard['file']} does not match its sha256; it is corrupt, rebuild it")
        arrays.append(np.load(file, mmap_mode="r"))
    array = arrays[0] if len(arrays) == 1 else ShardedArray(arrays)
    if array.shape != (manifest["count"], manifest["dim"]):
        raise ASIFInputError(f"{folder}: shards hold {array.shape}, manifest says {(manifest['count'], manifest['dim'])}; rebuild it")
    return EmbeddingSet(folder, array, manifest)


def verify_folder(folder: str | os.PathLike) -> list[str]:
    """Hash every shard of the embedding set in ``folder`` against its manifest, whatever
    ``VerifiedShards`` says; return the names of what is damaged (shards that are
    missing or differ, or ``manifest.json`` itself when it cannot be read), [] when
    all is well. Intact shards are recorded as verified, so the next use trusts them.
    """
    folder = Path(folder)
    try:
        manifest = read_json(folder / "manifest.json")
        shards = [(s["file"], s["sha256"]) for s in manifest["shards"]]
    except (StorageError, FileNotFoundError, KeyError, TypeError):
        return ["manifest.json"]
    verified = VerifiedShards(folder)
    damaged = []
    for name, sha in shards:
        path = folder / name
        if path.is_file() and sha256_file(path) == sha:
            verified.record(path, sha)
        else:
            verified.forget(name)
            damaged.append(name)
    with contextlib.suppress(StorageError):  # a read-only copy can still be verified
        verified.save()
    return damaged
