"""The registry of precomputed embeddings: a checked download (``fetch``) and ``publish``.

asif/data/registry.json (or ``$ASIF_REGISTRY``) maps a name to an archive
of embedding-set folders: its sha256, size, what encoders made it, and where
it can be downloaded (a URL or a Google Drive id, fetched with gdown). A
download resumes a partial file, is used only when its sha256 matches, and
every failure (a Drive quota page served instead of the file, 404, network,
truncation, checksum, full disk, a bad archive) raises ``FetchError`` with a
``kind`` and a message that says what happened and what to do.
"""
from __future__ import annotations

import errno
import lzma
import os
import shutil
import tarfile
import time
import zlib
from pathlib import Path

from asif import storage
from asif.config import DATA_DIR, cache_root
from asif.errors import DataError, FetchError
from asif.storage import atomic_write, atomic_write_json, load_embedding_set, read_json, sha256_file

__all__ = ["REGISTRY_FORMAT", "load_registry", "fetch", "forget", "publish"]

REGISTRY_FORMAT = "asif-registry/1"


def _registry_path(registry) -> Path:
    return Path(registry or os.environ.get("ASIF_REGISTRY") or DATA_DIR / "registry.json")


def load_registry(registry: str | os.PathLike | None = None) -> dict:
    """{name: entry} of data/registry.json (or ``registry`` / ``$ASIF_REGISTRY``)."""
    path = _registry_path(registry)
    if not path.exists():
        return {}
    data = read_json(path, f"registry {path}")
    if not isinstance(data, dict) or not isinstance(data.get("embeddings", {}), dict):
        raise DataError(f"registry {path}: not a registry (no \"embeddings\" object); restore it or point "
                        "ASIF_REGISTRY elsewhere")
    return dict(data.get("embeddings", {}))


def _download(source: dict, output: Path, progress: bool, timeout: float) -> None:
    """Download ``source`` ({"url"} or {"gdrive_id"}) to ``output`` with gdown,
    resuming a partial file that an earlier attempt left beside it."""
    import gdown
    kwargs = dict(output=str(output), quiet=not progress, resume=True)
    if "gdrive_id" in source:
        kwargs["id"] = source["gdrive_id"]
    else:
        kwargs.update(url=source["url"], use_cookies=False)
    try:
        gdown.download(timeout=timeout, **kwargs)
    except TypeError:  # older gdown without timeout
        gdown.download(**kwargs)


def _download_resuming(source: dict, incoming: Path, progress: bool, timeout: float) -> None:
    """``_download``, resuming a partial file; when the server ignores byte ranges the
    partial file is useless (it would stay and fail every later fetch): start from zero."""
    try:
        _download(source, incoming, progress, timeout)
    except Exception as e:
        if "did not honor the requested byte range" not in str(e):
            raise
        for part in incoming.parent.glob(incoming.name + "*.part"):
            part.unlink()
        _download(source, incoming, progress, timeout)


def _describe(source: dict) -> str:
    return f"Google Drive file {source['gdrive_id']}" if "gdrive_id" in source else source.get("url", "?")


def _move_aside(path: Path, why: str) -> Path:
    """Keep a bad download for inspection, under a name that is never used as the archive."""
    bad = path.parent / "rejected" / f"{path.name}.{why}.{time.strftime('%Y%m%d-%H%M%S')}"
    storage.make_folder(bad.parent)
    os.replace(path, bad)
    return bad


def _check_space(folder: Path, needed: int, name: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FetchError("no_space", f"fetch {name}: needs {needed / 1e6:.1f} MB (archive + unpacked) in {folder}, "
                                     f"only {free / 1e6:.1f} MB free. Free some space or set ASIF_CACHE to a larger disk")


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1024).lstrip().lower()
    return head.startswith(b"<!doctype html") or head.startswith(b"<html") or b"<html" in head[:512]


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack into a temporary folder, refusing links and paths outside it, then rename into place."""
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    storage.make_folder(tmp)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar.getmembers():
                target = (tmp / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not str(target).startswith(str(tmp.resolve())):
                    raise FetchError("archive", f"{archive}: member {m.name!r} is a link or leaves the folder; refused")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if not any(tmp.rglob("manifest.json")):
            raise FetchError("archive", f"{archive}: a tar archive without any embedding set (no manifest.json); "
                                        "the registry entry points at the wrong file")
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, tarfile.TarError) and e.errno is not None:
            raise  # a fault of the disk, not of the archive (handled by the caller)
        raise FetchError("archive", f"{archive}: its sha256 matches the registry but it is not a valid tar archive "
                                    f"({' '.join(str(e).split()) or type(e).__name__}); the registry entry is wrong, "
                                    "tell its publisher") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def fetch(name: str, registry: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
          progress: bool = True, timeout: float = 60) -> Path:
    """Download the precomputed embeddings ``name`` of the registry into the cache,
    check them and unpack them; return the folder (``<cache>/precomputed/<name>``).

    A partial download is resumed; the archive is used only if its sha256
    matches the registry. Each failure raises ``FetchError`` with a ``kind``
    and a message that says what happened and what to do.
    """
    entries = load_registry(registry)
    if name not in entries:
        raise DataError(f"no precomputed embeddings named {name!r} in {_registry_path(registry)}; "
                        f"known: {', '.join(sorted(entries)) or 'none'}")
    entry = entries[name]
    source, expected, size = entry.get("source") or {}, entry["sha256"], int(entry["size"])
    if not ("url" in source or "gdrive_id" in source):
        raise DataError(f"registry entry {name!r} has no source (url or gdrive_id); upload the archive and add it")
    base = cache_root(root)
    dest = base / "precomputed" / storage.slug(name)
    marker = dest / _MARKER
    if _fetched_sha(marker) == expected:
        return dest
    downloads = base / "downloads"
    storage.make_folder(downloads)
    archive = downloads / f"{storage.slug(name)}.tar"
    if not (archive.exists() and sha256_file(archive) == expected):
        _fetch_archive(name, source, expected, size, archive, progress, timeout)
    try:
        _safe_extract(archive, dest)
        atomic_write_json(marker, {"name": name, "sha256": expected, "source": source})
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError("no_space", f"fetch {name}: disk full while unpacking into {dest}. "
                                         "Free some space or set ASIF_CACHE to a larger disk")
        raise
    return dest


_MARKER = ".fetched.json"  # written after a checked unpack: its sha256 says which archive the folder holds


def _fetched_sha(marker: Path) -> str | None:
    try:
        data = read_json(marker)
    except (FileNotFoundError, DataError):  # no marker, or a damaged one: unpack again
        return None
    return data.get("sha256") if isinstance(data, dict) else None


def forget(folder: str | os.PathLike) -> None:
    """Make the next ``fetch`` of the precomputed set in ``folder`` unpack it again from its
    (sha256-checked) archive, or download it again (after ``asif data verify`` found damage)."""
    (Path(folder) / _MARKER).unlink(missing_ok=True)


def _fetch_archive(name, source, expected, size, archive: Path, progress, timeout) -> None:
    """Download into ``archive`` + ``.incoming``, check it, and rename it to ``archive``."""
    import requests
    incoming = archive.with_name(archive.name + ".incoming")
    partial = sum(p.stat().st_size for p in archive.parent.glob(incoming.name + "*.part"))
    _check_space(archive.parent, 2 * size - partial, name)  # archive + unpacked copy
    where = _describe(source)
    try:
        _download_resuming(source, incoming, progress, timeout)
    except requests.HTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 404:
            raise FetchError("not_found", f"fetch {name}: {where} answered 404 Not Found: the file was moved or "
                                          "deleted, or the registry entry is wrong")
        raise FetchError("http", f"fetch {name}: {where} answered HTTP {status}; try again later")
    except (requests.ConnectionError, requests.Timeout) as e:
        parts = list(archive.parent.glob(incoming.name + "*.part"))
        if parts and parts[0].stat().st_size:
            raise FetchError("truncated", f"fetch {name}: the transfer from {where} broke off after "
                                          f"{parts[0].stat().st_size} of {size} bytes; the partial file is kept "
                                          "and the next fetch resumes it")
        raise FetchError("network", f"fetch {name}: cannot reach {where} ({type(e).__name__}); check the network")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError("no_space", f"fetch {name}: disk full while downloading into {archive.parent}; "
                                         "free some space (the partial file is kept) or set ASIF_CACHE elsewhere")
        raise
    except Exception as e:  # gdown's own errors: Drive refused to give the file, or the body ended early
        text = str(e)
        if type(e).__name__ == "FileURLRetrievalError":
            raise FetchError("html", f"fetch {name}: Google Drive sent a web page instead of {where}: too many "
                                     "downloads today (quota) or the file is not shared as 'anyone with the link'. "
                                     f"Try later, or download it in a browser to {incoming}. gdown said: {text[:300]}")
        if "incomplete" in text.lower() or type(e).__name__ == "ChunkedEncodingError":
            raise FetchError("truncated", f"fetch {name}: the transfer from {where} ended early; the partial file "
                                          "is kept and the next fetch resumes it")
        raise
    got = incoming.stat().st_size
    if _looks_like_html(incoming):
        bad = _move_aside(incoming, "html")
        raise FetchError("html", f"fetch {name}: {where} sent an HTML page, not the archive (Drive quota exceeded, "
                                 f"permission, or a login page); moved it to {bad}. Try later or check the sharing")
    if got < size:
        bad = _move_aside(incoming, "truncated")
        raise FetchError("truncated", f"fetch {name}: got {got} of {size} bytes from {where}; moved the "
                                      f"incomplete file to {bad}. Fetch again")
    actual = sha256_file(incoming)
    if actual != expected:
        bad = _move_aside(incoming, "sha256-mismatch")
        raise FetchError("checksum", f"fetch {name}: sha256 {actual} does not match the registry's {expected}; "
                                     f"the file was moved aside to {bad} and is not used. The upload or the "
                                     "registry entry is wrong; tell its publisher")
    os.replace(incoming, archive)


def _deterministic_tar(folder: Path, out: Path) -> None:
    """A tar of ``folder``'s contents with fixed order, times and owners, so the same set gives the same sha256."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
        return ti

    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".progress" not in p.parts)

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in files:
                tar.add(p, arcname=p.relative_to(folder).as_posix(), filter=clean, recursive=False)
    atomic_write(out, write)


def publish(folder: str | os.PathLike, name: str | None = None, url: str | None = None,
            gdrive_id: str | None = None, registry: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None) -> dict:
    """Pack an embedding set folder (or a folder of several) as ``<out>/<name>.tar``
    and write its registry entry (sha256, size, encoders, count, dims).

    Upload the archive, then give its ``url`` or Drive ``gdrive_id`` (now or by
    editing the entry); others then ``fetch(name)`` it. Returns the entry."""
    folder = Path(folder)
    sets = sorted({p.parent for p in folder.rglob("manifest.json")})
    if not sets:
        raise DataError(f"publish: {folder} holds no embedding set (no manifest.json); make one first")
    described = {}
    for s in sets:
        es = load_embedding_set(s, verify=True)  # never publish a corrupt set
        m = es.manifest
        described[s.relative_to(folder).as_posix() or "."] = {
            "encoder": m.get("encoder"), "kind": m.get("kind"), "count": int(m["count"]), "dim": int(m["dim"]),
            "dtype": m.get("dtype"), "failed": len(m.get("failed", []))}
    name = name or storage.slug(folder.resolve().name)
    archive = Path(out or cache_root() / "published") / f"{storage.slug(name)}.tar"
    _deterministic_tar(folder, archive)
    encoders = []
    for d in described.values():
        ident = d["encoder"]
        label = ident.get("encoder", ident.get("name")) if isinstance(ident, dict) else ident
        if label not in encoders:
            encoders.append(label)
    source = {"url": url} if url else {"gdrive_id": gdrive_id} if gdrive_id else None
    entry = {"source": source, "file": archive.name, "sha256": sha256_file(archive),
             "size": archive.stat().st_size, "encoders": encoders,
             "count": {k: d["count"] for k, d in described.items()},
             "dims": {k: d["dim"] for k, d in described.items()}, "sets": described}
    path = _registry_path(registry)
    data = read_json(path, f"registry {path}") if path.exists() else {"format": REGISTRY_FORMAT, "embeddings": {}}
    data.setdefault("embeddings", {})[name] = entry
    atomic_write_json(path, data)
    return dict(entry, archive=str(archive), registry=str(path))
