"""General anchors at scale from the npm package ``@iconify/json``: one named icon per distinct name.

The package (a pinned version, its npm integrity hash checked) holds about
380k SVG icons in about 240 sets, each set with its licence and author. An
icon's name is its caption ("shoe-sneaker" -> "shoe sneaker"): coupled data
written by the icons' authors, not from any test label.

Which icons become anchors is fixed here, before any evaluation, and each
rule says why:

  * no emoji set, anywhere: emoji are a held-out test domain of this project
    (the Emoji category, and any set whose prefix or name says emoji);
  * no set under a non-commercial licence (an ``NC`` licence);
  * no brand logos, programming-language or tool logos, flags or maps (the
    Logos, Programming and Flags / Maps categories, and in every other set
    the icons whose name holds ``logo``, ``brand`` or ``flag``): a logo's
    caption names a company, not what it shows;
  * style variants collapse to one name ("heart", "heart-outline",
    "heart-filled-2" are "heart"), so that ~60k distinct names remain, and
    each name keeps one icon: chosen by a hash of the name among the sets
    that have it, so styles vary across anchors but never between runs.

Icons are drawn black on white: the body is rendered with cairosvg so that
its longer side covers 3/4 of a 224 px canvas (the encoders resize to 256
and crop the centre 224, which would cut an icon drawn edge to edge).
Rendering runs in worker processes over all cores, into PNG files in the
cache, resumable; an icon cairosvg cannot draw is skipped and counted.
"""
from __future__ import annotations

import base64
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from asif.config import cache_root, progress_bar
from asif.errors import DataError, FetchError, ImageLoadError, StorageError
from asif.storage import atomic_write, atomic_write_json, read_json, slug

__all__ = ["ICONIFY_VERSION", "ICONIFY_INTEGRITY", "fetch_package", "load_index", "prerender", "icon_png",
           "canonical_name", "set_is_excluded", "family_category", "credits_markdown"]

ICONIFY_VERSION = "2.2.535"
# npm's integrity string of that version's tarball (sha512, base64): the download must match it.
ICONIFY_INTEGRITY = "sha512-nAV60ACUSHwnsb6fsp+letHlNkrwO4vzBtcC6B4EDHErQQfezk7E3nJdnwJjve6OCfMNO0uVT5Vrgna9/NCmXw=="
NPM_REGISTRY = "https://registry.npmjs.org/"
INDEX_FORMAT = "asif-iconify-index/2"   # bump when a rule below changes: the index is rebuilt

EXCLUDED_CATEGORIES = {
    "Emoji": "emoji are a held-out test domain",
    "Logos": "brand logos: the caption names a company",
    "Programming": "programming-language and tool logos",
    "Flags / Maps": "flags and map symbols",
}
# Emoji sets that are filed under no category, or under another one.
EMOJI_WORDS = ("emoji", "twemoji", "openmoji", "noto", "fxemoji")
# "wordmark": a logo drawn as lettering; "transition": an animation that morphs one icon into
# another ("circle to confirm circle transition"), so the name names two things.
EXCLUDED_NAME_TOKENS = {"logo", "logos", "brand", "brands", "flag", "flags", "social", "wordmark", "transition"}
# Sets named for logos (brand sets filed under other categories, e.g. archived ones).
LOGO_WORDS = ("brand", "logo")
# Tokens that name a style, not a thing: dropped from the end of a name.
STYLE_TOKENS = {
    "outline", "outlined", "outlines", "filled", "fill", "solid", "rounded", "round", "sharp", "line", "lines",
    "linear", "bold", "duotone", "twotone", "duo", "light", "thin", "regular", "broken", "bulk", "alt", "o",
    "mini", "micro", "small", "tiny", "big", "large", "sm", "lg", "md", "xs", "xl", "thick", "stroke", "stroked",
    "dot", "dotted", "dashed", "color", "colored", "mono", "flat", "glyph", "variant", "box", "square", "circle",
    "v1", "v2", "v3", "r", "s", "f", "l", "b",
    # variant words of single large sets: Streamline "remix", line-md's animated "loop",
    # NRK "expressive", Clarity's "badged"/"alerted" (a dot on the icon)
    "remix", "loop", "expressive", "badged", "alerted",
}
LEADING_STYLE_TOKENS = {"baseline", "outline", "outlined", "round", "rounded", "sharp", "twotone", "filled", "solid"}
CANVAS, ICON_SIZE = 224, 168


def canonical_name(name: str) -> str | None:
    """The thing an icon name names, style words and numbers stripped ("heart-outline-2" -> "heart").

    None when nothing nameable is left or the name is excluded (logos, brands, flags).
    """
    name = re.sub(r"(two|duo)[-_]tone", r"\1tone", name.lower())
    tokens = [t for t in re.split(r"[-_:.\s]+", name) if t]
    if EXCLUDED_NAME_TOKENS & set(tokens):
        return None
    # Google's sets put the style first ("twotone-title", "outline-home")
    while len(tokens) > 1 and tokens[0] in LEADING_STYLE_TOKENS:
        tokens.pop(0)
    # a style word alone is a thing ("circle", "box"): only trailing modifiers go
    while len(tokens) > 1 and (tokens[-1] in STYLE_TOKENS or re.fullmatch(r"\d+([a-z]|px|dp)?", tokens[-1])):
        tokens.pop()
    if not any(len(t) >= 2 and t.isalpha() for t in tokens):
        return None
    return " ".join(tokens)


def family_category(prefix: str, categories: dict) -> str | None:
    """The category of a set's family: that of the longest prefix ``a-b`` of ``a-b-c`` that has one
    (``devicon-original`` carries none; its family ``devicon`` is "Programming")."""
    parts = prefix.split("-")
    for n in range(len(parts) - 1, 0, -1):
        category = categories.get("-".join(parts[:n]))
        if category:
            return category
    return None


def set_is_excluded(prefix: str, info: dict, categories: dict | None = None) -> str | None:
    """Why a set is left out of the anchors, or None when it is kept.

    ``categories``: {prefix: category} of the whole package; a set without a
    category of its own is judged by its family's (``family_category``).
    """
    category = info.get("category")
    inherited = not category and categories is not None and family_category(prefix, categories)
    if inherited:
        category = inherited
    if category in EXCLUDED_CATEGORIES:
        why = EXCLUDED_CATEGORIES[category]
        return f"{why} (the category of its family)" if inherited else why
    words = f"{prefix} {info.get('name', '')}".lower()
    if any(w in words for w in EMOJI_WORDS):
        return "an emoji set: emoji are a held-out test domain"
    if any(w in words for w in LOGO_WORDS):
        return "a set of brand logos"
    spdx = (info.get("license") or {}).get("spdx") or ""
    if "NC" in spdx.split("-"):
        return f"non-commercial licence ({spdx})"
    if not spdx:
        return "no licence stated"
    return None


# ---------------------------------------------------------------------------
# the package: checked download, then a compact index of the kept icons
# ---------------------------------------------------------------------------

def _folder(root=None) -> Path:
    return cache_root(root) / "sources" / f"iconify-{ICONIFY_VERSION}"


def _integrity_ok(data: bytes, integrity: str) -> bool:
    algo, _, want = integrity.partition("-")
    return base64.b64encode(hashlib.new(algo, data).digest()).decode() == want


def fetch_package(root=None, registry: str | None = None, timeout: float = 120) -> Path:
    """The pinned ``@iconify/json`` tarball in the cache, downloaded from the npm registry if absent.

    The bytes must match the pinned npm integrity hash; anything else (a web
    page, a truncated or altered file) is refused and not kept.
    """
    target = _folder(root) / f"iconify-json-{ICONIFY_VERSION}.tgz"
    if target.exists() and _integrity_ok(target.read_bytes(), ICONIFY_INTEGRITY):
        return target
    registry = (registry or os.environ.get("ASIF_NPM_REGISTRY") or NPM_REGISTRY).rstrip("/") + "/"
    url = f"{registry}@iconify/json/-/json-{ICONIFY_VERSION}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        raise FetchError("not_found" if e.code == 404 else "http",
                         f"iconify: {url} answered HTTP {e.code}; check the registry (ASIF_NPM_REGISTRY)") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError("network", f"iconify: cannot reach the npm registry at {url} ({e}); the iconify anchors "
                                    "need it once (then they are cached), or use anchors from Debian packages "
                                    "(clipart, tuxpaint)") from None
    if data[:2] != b"\x1f\x8b":
        raise FetchError("html" if b"<html" in data[:512].lower() else "archive",
                         f"iconify: {url} did not send a gzip tarball ({len(data)} bytes); not used")
    if not _integrity_ok(data, ICONIFY_INTEGRITY):
        raise FetchError("checksum", f"iconify: {url} ({len(data)} bytes) does not match the pinned integrity "
                                     f"{ICONIFY_INTEGRITY[:20]}...; the file is truncated or altered and was not kept")
    atomic_write(target, lambda f: f.write(data))
    return target


def _read_sets(tgz: Path):
    """Yield (prefix, info, icon set JSON) for every icon set of the tarball (info: name, licence, category)."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                if member.name.startswith("package/json/") and member.name.endswith(".json"):
                    data = json.load(tar.extractfile(member))
                    yield data.get("prefix") or Path(member.name).stem, data.get("info", {}), data
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as e:
        raise DataError(f"{tgz}: not a readable @iconify/json tarball ({type(e).__name__}: {e}); delete it and "
                        "fetch again") from None


def build_index(tgz: Path) -> dict:
    """One record per distinct name: {name, prefix, icon, body, width, height, left, top}, plus the sets."""
    candidates: dict[str, list] = {}
    sets, skipped, categories, undecided = {}, {}, {}, []

    def keep(prefix, info, data):
        sets[prefix] = {"name": info.get("name", prefix), "license": info.get("license", {}),
                        "author": info.get("author", {}), "icons": 0}
        default_w, default_h = data.get("width", 16), data.get("height", 16)
        for icon, spec in sorted(data.get("icons", {}).items()):
            name = canonical_name(icon)
            if name is None or spec.get("hidden"):
                continue
            candidates.setdefault(name, []).append(
                (prefix, icon, spec.get("body", ""), spec.get("width", default_w), spec.get("height", default_h),
                 spec.get("left", 0), spec.get("top", 0)))

    for prefix, info, data in _read_sets(tgz):
        categories[prefix] = info.get("category")
        why = set_is_excluded(prefix, info)
        if why:
            skipped[prefix] = why
        elif info.get("category"):
            keep(prefix, info, data)
        else:  # judged by its family's category once every set's is known
            undecided.append((prefix, info, data))
    for prefix, info, data in undecided:
        why = set_is_excluded(prefix, info, categories)
        if why:
            skipped[prefix] = why
        else:
            keep(prefix, info, data)
    records = []
    for name in sorted(candidates):
        options = sorted(candidates[name])
        pick = options[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(options)]
        prefix, icon, body, w, h, left, top = pick
        sets[prefix]["icons"] += 1
        records.append({"name": name, "prefix": prefix, "icon": icon, "body": body, "width": w, "height": h,
                        "left": left, "top": top})
    return {"format": INDEX_FORMAT, "version": ICONIFY_VERSION, "integrity": ICONIFY_INTEGRITY,
            "sets": {k: v for k, v in sets.items() if v["icons"]}, "excluded_sets": skipped, "icons": records}


def load_index(root=None, progress: bool = True) -> dict:
    """The index of kept icons, built once from the package (downloaded if needed) and cached."""
    path = _folder(root) / "index.json.gz"
    if path.exists():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError):
            index = None  # a damaged index (truncated, emptied) is built again below, never read forever
        if isinstance(index, dict) and index.get("format") == INDEX_FORMAT:
            return index
    if progress:
        print(f"iconify {ICONIFY_VERSION}: indexing the icon sets (once) ...", flush=True)
    index = build_index(fetch_package(root))
    payload = gzip.compress(json.dumps(index, ensure_ascii=False).encode("utf-8"), 6)
    atomic_write(path, lambda f: f.write(payload))
    return index


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------

def _svg(record: dict) -> str:
    w, h, left, top = record["width"], record["height"], record["left"], record["top"]
    # monochrome sets draw in currentColor: black on the white canvas
    body = record["body"].replace("currentColor", "#000")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {w} {h}" width="{w}" height="{h}">{body}</svg>')


def render_icon(record: dict) -> bytes:
    """PNG bytes of an icon: black on white, its longer side ICON_SIZE px, centred on a CANVAS px square."""
    import cairosvg
    from PIL import Image
    if not record.get("body", "").strip():
        raise ImageLoadError(f"{record['prefix']}:{record['icon']}", "empty SVG body")
    try:
        wide = record["width"] >= record["height"]
        png = cairosvg.svg2png(bytestring=_svg(record).encode("utf-8"),
                               **({"output_width": ICON_SIZE} if wide else {"output_height": ICON_SIZE}))
        icon = Image.open(io.BytesIO(png))
        icon.load()
    except Exception as e:  # cairosvg raises many types on SVG it cannot draw
        raise ImageLoadError(f"{record['prefix']}:{record['icon']}", f"SVG cannot be rendered ({type(e).__name__}: {e})") from None
    canvas = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    icon = icon.convert("RGBA")
    canvas.paste(icon, ((CANVAS - icon.width) // 2, (CANVAS - icon.height) // 2), icon)
    out = io.BytesIO()
    canvas.save(out, "PNG", optimize=False)
    return out.getvalue()


def _png_path(folder: Path, record: dict) -> Path:
    return folder / "png" / slug(record["prefix"]) / f"{slug(record['icon'])}.png"


def icon_png(record: dict, root=None) -> bytes:
    """The icon's PNG: from the render cache when there, else rendered now (and kept)."""
    path = _png_path(_folder(root), record)
    if path.exists():
        return path.read_bytes()
    png = render_icon(record)
    atomic_write(path, lambda f: f.write(png))
    return png


def _render_chunk(args) -> tuple[int, list[str]]:
    records, folder = args
    failed = []
    for r in records:
        path = _png_path(Path(folder), r)
        if path.exists():
            continue
        try:
            png = render_icon(r)
        except ImageLoadError as e:
            failed.append(str(e))
            continue
        atomic_write(path, lambda f, png=png: f.write(png))
    return len(records), failed


def prerender(index: dict, root=None, workers: int | None = None, progress: bool = True) -> dict:
    """Render every icon of the index into the cache, in worker processes; resumable.

    Returns {"rendered": n, "failed": [reasons]}; the failures are also kept
    in ``render-failures.json`` beside the PNGs.
    """
    folder = _folder(root)
    todo = [r for r in index["icons"] if not _png_path(folder, r).exists()]
    failed = []
    if todo:
        chunks = [(todo[i:i + 200], str(folder)) for i in range(0, len(todo), 200)]
        workers = workers or os.cpu_count() or 1
        with progress_bar(len(todo), "render icons", progress) as bar, \
                concurrent.futures.ProcessPoolExecutor(workers) as pool:
            for n, bad in pool.map(_render_chunk, chunks):
                failed += bad
                bar.update(n)
        atomic_write_json(folder / "render-failures.json", failed)
    elif (folder / "render-failures.json").exists():
        try:
            failed = read_json(folder / "render-failures.json")
        except StorageError:  # a damaged record of failures: every icon has its PNG, so none failed
            failed = []
    return {"rendered": len(index["icons"]) - len(failed), "failed": failed}


def credits_markdown(index: dict) -> str:
    """A Markdown table of the icon sets used as anchors: set, icons, author, licence (as the licences ask)."""
    lines = [f"Anchors from `@iconify/json` {index['version']}: {len(index['icons'])} icons from "
             f"{len(index['sets'])} sets, each under its own licence.", "",
             "| set | icons | author | licence |", "|---|---:|---|---|"]
    for prefix, s in sorted(index["sets"].items()):
        author = s["author"].get("name", "?")
        if s["author"].get("url"):
            author = f"[{author}]({s['author']['url']})"
        lic = s["license"].get("spdx") or s["license"].get("title", "?")
        if s["license"].get("url"):
            lic = f"[{lic}]({s['license']['url']})"
        lines.append(f"| {s['name']} (`{prefix}`) | {s['icons']} | {author} | {lic} |")
    return "\n".join(lines) + "\n"
