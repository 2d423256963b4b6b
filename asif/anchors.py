"""Coupled anchor sources: (image, caption) pairs, dispatched on the name.

  clipart               Openclipart drawings (Debian ``openclipart-svg``), captioned from their
                        Dublin Core title, description and keywords
  tuxpaint              TuxPaint stamps (Debian ``tuxpaint-stamps-default``), one-sentence captions
                        in many languages
  fashion-mnist-train   the Fashion-MNIST training images captioned from their labels (in-domain)
  captions:FILE         a CSV (with a header) or JSONL of image path + caption
  webdataset:PATTERN    tar shards of KEY.jpg|png|webp + KEY.txt, ``{00000..00009}`` ranges

Names combine with ``+``; an ``AnchorSet`` is all their pairs in one seeded
order, so "the first n anchors" of the paper's Fig. 5 is a random sample of
every part. Each source keeps ids that change when an item does (the cache
keys on them) and lists what it skipped while listing, with the reason.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from asif import debian
from asif.config import smoke_limit
from asif.datasets import fashion_mnist, file_id
from asif.errors import DataError
from asif.images import LazyImages, RenderedSVGs, load_image, render_svg
from asif.storage import printable, read_text, sha256_file, sha256_text

__all__ = ["ANCHOR_SETS", "CoupledData", "AnchorSet", "load_anchor_set", "svg_caption", "read_tuxpaint_text"]


@dataclass
class CoupledData:
    """One source of (image, caption) pairs in a stable listing order.

    ``images``: Sequence of N (PIL, path, or raises when unreadable);
    ``captions``: N strings; ``ids``: N strings that change when an item does;
    ``identity``: JSON-able, part of cache keys; ``translations``: per item
    {language: caption} where the source has them; ``skipped``: items left out
    while listing, with the reason; ``keys``: N item keys shared with test
    sets read from the same package (asif.debian.item_key), None where no
    test set can come from this source; ``one_per_caption``: keep one pair per
    distinct caption (``AnchorSet.one_per_caption``), for sources whose
    captions are not written per item (Openclipart's theme titles, TuxPaint's
    variants of one stamp), never for captions written from labels.
    """
    name: str
    images: Sequence
    captions: list[str]
    ids: list[str]
    identity: dict
    translations: list[dict] | None = None
    skipped: list[dict] = field(default_factory=list)
    keys: list[str] | None = None
    one_per_caption: bool = False

    def __len__(self):
        return len(self.captions)


class AnchorSet:
    """Coupled (image, caption) pairs in a fixed seeded order: the anchors.

    Built from one or more ``CoupledData`` parts (``clipart+tuxpaint``); the
    order is a seeded permutation of all their items, so "the first n anchors"
    of the paper's Fig. 5 is a random sample of every part. ``order``: int64
    [N, 2] rows of (part, item within part).
    """

    def __init__(self, name: str, parts: list[CoupledData], order: np.ndarray, removed: int = 0,
                 repeated: int = 0):
        self.name, self.parts, self.order = name, parts, np.asarray(order, dtype=np.int64).reshape(-1, 2)
        self.removed = removed    # pairs left out because a test set holds the same items
        self.repeated = repeated  # pairs left out because an earlier pair of their source has their caption

    def __len__(self):
        return len(self.order)

    @property
    def captions(self) -> list[str]:
        """N captions in anchor order."""
        return [self.parts[p].captions[j] for p, j in self.order]

    @property
    def ids(self) -> list[str]:
        return [self.parts[p].ids[j] for p, j in self.order]

    @property
    def images(self) -> LazyImages:
        """N images in anchor order, loaded on access."""
        return LazyImages(len(self), lambda i: self.image(i))

    def image(self, i: int):
        """Anchor ``i`` as an RGB PIL image (raises ``DataError`` if unreadable)."""
        p, j = self.order[i]
        return load_image(self.parts[p].images[j])

    def thumbnail(self, i: int, size: int = 96):
        """Anchor ``i`` as a small RGB PIL image, for explanation galleries."""
        im = self.image(i).copy()
        im.thumbnail((size, size))
        return im

    def translations(self, i: int) -> dict:
        """{language: caption} of anchor ``i`` where its source has them (TuxPaint), else {}."""
        p, j = self.order[i]
        t = self.parts[p].translations
        return dict(t[j]) if t else {}

    def head(self, n: int | None) -> "AnchorSet":
        """The first ``n`` anchors of the order (all when None)."""
        if n is None or n >= len(self):
            return self
        return AnchorSet(f"{self.name}[:{n}]", self.parts, self.order[:n], self.removed, self.repeated)

    def without(self, keys) -> "AnchorSet":
        """The anchors minus every pair whose item is in ``keys`` (the item keys of a test set read
        from the same package); the order of the rest is kept, ``removed`` counts what left."""
        keys = set(keys or ())
        if not keys:
            return self
        drop = np.array([self.parts[p].keys is not None and self.parts[p].keys[j] in keys for p, j in self.order],
                        dtype=bool)
        return AnchorSet(self.name, self.parts, self.order[~drop], self.removed + int(drop.sum()), self.repeated)

    def one_per_caption(self) -> "AnchorSet":
        """Within each source that asks for it (``CoupledData.one_per_caption``), one pair per
        distinct caption: the first in the source's own order among the pairs held; the anchor
        order of the rest is kept, ``repeated`` counts what left.

        Pairs that share a caption share one text embedding, so they enter every text top-k
        together, and the caption tells none of their images apart (1,375 Openclipart stars
        read "gramastar. stars, shapes, magick, geometry.").
        """
        if not any(part.one_per_caption for part in self.parts):
            return self
        first = {}
        for p, j in sorted(map(tuple, self.order.tolist())):
            first.setdefault((p, self.parts[p].captions[j]), j)
        keep = np.array([not self.parts[p].one_per_caption or first[(p, self.parts[p].captions[j])] == j
                         for p, j in self.order], dtype=bool)
        return AnchorSet(self.name, self.parts, self.order[keep], self.removed, self.repeated + int((~keep).sum()))

    @property
    def skipped(self) -> list[dict]:
        return [s for part in self.parts for s in part.skipped]


# --- clip-art (openclipart-svg) ------------------------------------------------

_DC = {name: re.compile(rf"<dc:{name}[^>]*>(.*?)</dc:{name}>", re.S) for name in ("title", "description", "subject")}
_LI = re.compile(r"<rdf:li[^>]*>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")
_BOILERPLATE = re.compile(r"^part of the .*collection|collection by ", re.I)


def _clean(text: str) -> str:
    import html
    return re.sub(r"\s+", " ", html.unescape(_TAG.sub(" ", text))).strip()


def svg_caption(path: str | os.PathLike) -> str:
    """Caption of an Open Clip Art SVG from its Dublin Core metadata:
    "title. description. keywords" (parts that are empty or repeat the title
    are dropped); the file name when there is no metadata."""
    with open(path, "rb") as f:
        head = f.read(256 * 1024).decode("utf-8", errors="replace")
    work = head.split("<cc:Agent", 1)[0]  # creator/publisher agents also carry dc:title
    title = _clean(m.group(1)) if (m := _DC["title"].search(work)) else ""
    desc = _clean(m.group(1)) if (m := _DC["description"].search(work)) else ""
    subject = _DC["subject"].search(head)
    keywords = []
    for k in (_LI.findall(subject.group(1)) if subject else []):
        k = _clean(k)
        if k and k.lower() != title.lower() and k.lower() not in (x.lower() for x in keywords):
            keywords.append(k)
    if not title or _BOILERPLATE.search(title):  # e.g. 885 icons titled "Part of the Flat Icon Collection (date)"
        title = re.sub(r"[_-]+", " ", Path(path).stem).strip()
    parts = [title]
    if desc and desc.lower() != title.lower():
        parts.append(desc)
    if keywords:
        parts.append(", ".join(keywords))
    return ". ".join(p.rstrip(".") for p in parts) + "."


def _clipart(root: Path | None = None, size: int = 224) -> CoupledData:
    root = debian.openclipart_root(root)
    captions, skipped, keep = [], [], []
    for p in debian.clipart_files(root):
        try:
            captions.append(svg_caption(p))
            keep.append(p)
        except OSError as e:
            skipped.append({"id": p.relative_to(root).as_posix(), "reason": f"unreadable: {e}"})
    ids = [file_id(p, root) for p in keep]
    images = RenderedSVGs(keep, size)
    identity = {"anchors": "clipart", "render": {"size": size, "background": "white", "renderer": "cairosvg"},
                "files_sha256": sha256_text("\n".join(ids))}
    return CoupledData("clipart", images, captions, ids, identity, skipped=skipped,
                       keys=[debian.item_key("clipart", root, p) for p in keep], one_per_caption=True)


# --- TuxPaint stamps -------------------------------------------------------------



def read_tuxpaint_text(path: str | os.PathLike) -> tuple[str, dict]:
    """A TuxPaint stamp description: (English caption = first line, {language: caption})."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    english = lines[0].strip() if lines else ""
    others = {}
    for line in lines[1:]:
        key, sep, text = line.partition("=")
        if sep and key.strip():
            others[key.strip().removesuffix(".utf8")] = text.strip()
    return english, others


def _tuxpaint(root: Path | None = None, size: int = 224) -> CoupledData:
    root = debian.tuxpaint_root(root)
    images, captions, ids, translations, skipped = [], [], [], [], []
    for stamp in debian.tuxpaint_stamps(root):
        rel = stamp.image.relative_to(root).as_posix()
        if not stamp.text.exists():  # mirrored variants and a few others have no description
            skipped.append({"id": rel, "reason": "no .txt description"})
            continue
        english, others = read_tuxpaint_text(stamp.text)
        if not english:
            skipped.append({"id": rel, "reason": "empty description"})
            continue
        images.append(stamp.image)
        captions.append(english)
        translations.append(others)
        ids.append(file_id(stamp.image, root) + "|" + file_id(stamp.text, root))
    lazy = LazyImages(len(images), lambda i: render_svg(images[i], size) if images[i].suffix == ".svg" else images[i])
    identity = {"anchors": "tuxpaint", "render": {"size": size, "background": "white"},
                "files_sha256": sha256_text("\n".join(ids))}
    return CoupledData("tuxpaint", lazy, captions, ids, identity, translations, skipped,
                       keys=[debian.item_key("tuxpaint", root, p) for p in images], one_per_caption=True)


# --- icons (npm @iconify/json) -----------------------------------------------------

def _iconify(root=None) -> CoupledData:
    """~52k distinct named icons; see asif.iconify for which ones and why."""
    from asif import iconify
    index = iconify.load_index(root)
    records = index["icons"]
    images = LazyImages(len(records), lambda i: iconify.icon_png(records[i], root))  # PNG bytes, rendered once
    ids = [f"{r['prefix']}:{r['icon']}" for r in records]
    identity = {"anchors": "iconify", "package": f"@iconify/json@{index['version']}", "integrity": index["integrity"],
                "index_format": index["format"],
                "render": {"canvas": iconify.CANVAS, "icon": iconify.ICON_SIZE, "colour": "black on white",
                           "renderer": "cairosvg"},
                # each anchor's set (its id's prefix), with the set's licence and author
                "sets": {k: {"licence": v["license"].get("spdx"), "author": v["author"].get("name"),
                             "icons": v["icons"]} for k, v in sorted(index["sets"].items())}}
    return CoupledData("iconify", images, [r["name"] for r in records], ids, identity, keys=None)


# --- Fashion-MNIST training split (in-domain) ------------------------------------

# How each class reads in a sentence; captions are written from the label only,
# so these anchors are in-domain coupled data, unlike the paper's web captions.
_FASHION_PHRASES = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal",
                    "a shirt", "a sneaker", "a bag", "an ankle boot"]
_FASHION_CAPTIONS = ["{x}.", "a photo of {x}.", "a black and white picture of {x}.",
                     "{x} on a plain background.", "a small grayscale image of {x}, an item of fashion."]


def _fashion_mnist_train(seed: int = 0) -> CoupledData:
    ds = fashion_mnist("train")
    rng = np.random.default_rng(seed)
    forms = rng.integers(len(_FASHION_CAPTIONS), size=len(ds))
    captions = [_FASHION_CAPTIONS[f].replace("{x}", _FASHION_PHRASES[y]) for f, y in zip(forms, ds.labels)]
    captions = [c[0].upper() + c[1:] for c in captions]
    # The image side is the evaluation train split itself: same name, identity and
    # ids, so its 60k image embeddings are cached once for both uses (the text
    # side's cache key includes the caption texts).
    return CoupledData("fashion-mnist-train", ds.images, captions, ds.ids, ds.identity)


# --- user data: captions files and webdataset shards -------------------------------

_IMAGE_KEYS = ("image", "image_path", "path", "file", "filepath", "filename", "img")
_CAPTION_KEYS = ("caption", "text", "title", "txt")


_MISSING = object()


def _pick(row: dict, keys: Sequence[str]):
    """The value of the first of ``keys`` (any case) in ``row``, or ``_MISSING``."""
    lowered = {k.lower().strip(): v for k, v in row.items() if isinstance(k, str)}
    return next((lowered[k] for k in keys if k in lowered), _MISSING)


def _as_text(value) -> tuple[str | None, str]:
    """(text, "") for a usable caption or image path, else (None, why not)."""
    if value is _MISSING or value is None:
        return None, "missing (null)"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"a JSON {type(value).__name__}, not text"
    text = str(value).strip()
    return (text, "") if text else (None, "empty")


def _caption_rows(file: Path, source: str) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV with a header or of a JSONL file (UTF-8, a BOM allowed)."""
    text = read_text(file, source)
    rows = []
    if file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: line {n} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{source}: line {n} is a JSON {type(row).__name__}, not an object; write one "
                                '{"image": PATH, "caption": TEXT} per line')
            rows.append((n, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{source}: line {reader.line_num} is not valid CSV ({e})") from None
    return rows


def _captions_file(path: str) -> CoupledData:
    """CSV (with a header) or JSONL of image path + caption; relative paths are from the file's folder.

    A row without an image path or a caption (missing, null, empty) is
    skipped and listed with the reason; a file where no row has one of
    them is an error that names the columns it understands.
    """
    file, source = Path(path).expanduser(), f"captions:{path}"
    if not file.exists():
        raise DataError(f"{source}: file not found")
    if file.is_dir():
        raise DataError(f"{source}: is a directory; give a CSV or JSONL file of image path + caption")
    rows = _caption_rows(file, source)
    if not rows:
        raise DataError(f"{source}: no rows")
    for keys, what in ((_IMAGE_KEYS, "image path"), (_CAPTION_KEYS, "caption")):
        if all(_pick(row, keys) is _MISSING for _, row in rows):
            found = sorted({k for _, row in rows for k in row if isinstance(k, str)})
            raise DataError(f"{source}: no {what} column; name it one of {', '.join(keys)} "
                            f"(found {', '.join(found) or 'none'})")
    paths, captions, skipped = [], [], []
    for n, row in rows:
        image, why_image = _as_text(_pick(row, _IMAGE_KEYS))
        caption, why_caption = _as_text(_pick(row, _CAPTION_KEYS))
        if image is None or caption is None:
            reason = f"image path {why_image}" if image is None else f"caption {why_caption}"
            skipped.append({"id": f"{file.name}:{n}", "reason": reason})
            continue
        image_path = Path(image).expanduser()
        paths.append(image_path if image_path.is_absolute() else file.parent / image_path)
        captions.append(caption)
    if not paths:
        raise DataError(f"{source}: none of its {len(rows)} rows has both an image path and a caption "
                        f"(line {skipped[0]['id'].rsplit(':', 1)[1]}: {skipped[0]['reason']})")
    # A missing image stays in the list: the cache records it as failed and drops the pair.
    ids = [(file_id(p) if p.exists() else f"{printable(p.as_posix())}:missing") for p in paths]
    identity = {"anchors": "captions", "file": file.name, "file_sha256": sha256_file(file),
                "files_sha256": sha256_text("\n".join(ids))}
    return CoupledData(f"captions:{file.name}", paths, captions, ids, identity, skipped=skipped)


def _expand_braces(pattern: str) -> list[str]:
    """img2dataset-style shard patterns: ``{00000..00009}`` ranges and ``{a,b}`` lists, then globs."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = ([str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
               if r else body.split(","))
    out = []
    for o in options:
        out += _expand_braces(pattern[:m.start()] + o + pattern[m.end():])
    return out


def _shard_pairs(shard: Path, pattern: str, skipped: list[dict]):
    """Yield (key, image member, caption) of one tar shard; pairs without an
    image, a text or a usable caption go to ``skipped``. A shard that is not a tar or is
    truncated raises ``DataError`` naming it."""
    where = f"webdataset:{pattern}: shard {printable(shard)}"
    if not shard.is_file():
        raise DataError(f"{where} is not a file")
    try:
        size = shard.stat().st_size
        with tarfile.open(shard, "r:") as tar:  # uncompressed tar: members can be read by offset
            members = tar.getmembers()
            groups: dict[str, dict] = {}
            for m in members:
                if m.offset_data + m.size > size:
                    raise DataError(f"{where} is truncated ({m.name} ends at byte {m.offset_data + m.size}, "
                                    f"the file has {size}); download it again")
                if m.isfile():
                    key, _, ext = m.name.rpartition(".")
                    groups.setdefault(key, {})[ext.lower()] = m
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                if img is None or "txt" not in g:
                    skipped.append({"id": f"{shard.name}/{key}", "reason": "needs an image and a .txt"})
                    continue
                try:
                    text = tar.extractfile(g["txt"]).read().decode("utf-8-sig").strip()
                except UnicodeDecodeError:
                    skipped.append({"id": f"{shard.name}/{key}", "reason": "caption is not UTF-8 text"})
                    continue
                if not text:
                    skipped.append({"id": f"{shard.name}/{key}", "reason": "caption empty"})
                    continue
                yield key, img, text
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{where} is not a readable uncompressed tar ({e or type(e).__name__}); webdataset "
                        "shards are plain .tar files (gunzip a .tar.gz first), download it again if it is cut off") \
            from None


def _webdataset(pattern: str) -> CoupledData:
    """Tar shards of ``KEY.jpg|png|webp`` + ``KEY.txt`` (as img2dataset writes them).
    The tars are indexed once; images are read lazily by offset."""
    shards = [Path(p) for p in _expand_braces(os.path.expanduser(pattern))]
    missing = [str(p) for p in shards if not p.exists()]
    if not shards or missing:
        raise DataError(f"webdataset:{pattern}: no such shard(s) {missing[:3] or pattern}")
    refs, captions, ids, skipped = [], [], [], []
    for shard in shards:
        for key, img, text in _shard_pairs(shard, pattern, skipped):
            refs.append((shard, img.offset_data, img.size))
            captions.append(text)
            ids.append(f"{shard.name}/{key}:{img.size}:{hashlib.sha256(text.encode()).hexdigest()[:16]}")

    def read(i):
        shard, offset, size = refs[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    identity = {"anchors": "webdataset", "shards": [p.name for p in shards],
                "shards_sha256": [sha256_file(p) for p in shards]}
    return CoupledData(f"webdataset:{pattern}", LazyImages(len(refs), read), captions, ids, identity, skipped=skipped)


ANCHOR_SETS = ("iconify", "clipart", "tuxpaint", "fashion-mnist-train", "captions:FILE", "webdataset:PATTERN")


def _anchor_part(name: str) -> CoupledData:
    kind, _, arg = name.partition(":")
    if kind == "iconify":
        return _iconify()
    if kind == "clipart":
        return _clipart(arg or None)
    if kind == "tuxpaint":
        return _tuxpaint(arg or None)
    if kind == "fashion-mnist-train":
        return _fashion_mnist_train()
    if kind == "captions" and arg:
        return _captions_file(arg)
    if kind == "webdataset" and arg:
        return _webdataset(arg)
    raise DataError(f"unknown anchor set {name!r}; known: {', '.join(ANCHOR_SETS)}, combined with '+'")


def load_anchor_set(name: str, limit: int | None = None, seed: int = 0, exclude=None,
                    one_per_caption: bool = True) -> AnchorSet:
    """Coupled anchors by name; ``a+b`` combines sets.

    The order is a seeded permutation of all pairs (same seed, same order,
    on any machine). ``exclude``: item keys of a test set; those pairs leave
    first (``removed`` counts them), then the repeated captions of the
    sources that keep one pair per caption (``repeated`` counts them;
    docs/default_anchors.md, fourth round; ``one_per_caption=False`` keeps
    them). ``limit`` then keeps the first ``limit`` of the order
    (``ASIF_SMOKE=1``: a few hundred)."""
    limit = smoke_limit(limit)
    parts = [_anchor_part(n.strip()) for n in name.split("+") if n.strip()]
    if not parts:
        raise DataError("empty anchor set name")
    pairs = np.concatenate([np.stack([np.full(len(p), i), np.arange(len(p))], 1) for i, p in enumerate(parts)])
    if len(pairs) == 0:
        raise DataError(f"anchor set {name!r} has no pairs")
    order = pairs[np.random.default_rng(seed).permutation(len(pairs))]
    # the test set's items leave first, so a caption keeps a pair wherever one outside it has it
    anchors = AnchorSet(name, parts, order).without(exclude)
    if one_per_caption:
        anchors = anchors.one_per_caption()
    if len(anchors) == 0:
        raise DataError(f"anchor set {name!r}: every pair is also in the test set; choose other anchors")
    return anchors.head(limit)
