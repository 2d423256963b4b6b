"""Data for ASIF: evaluation datasets, coupled anchor sets, embedding caches and
the registry of precomputed embeddings.

Sections, in the order a run needs them:

  1. paths, errors, the smoke switch (``ASIF_SMOKE=1`` takes small subsets)
  2. images: loading, SVG rendering on white, lazy sequences
  3. evaluation datasets by name (``fashion-mnist``, ``cifar10``, ``cifar100``,
     ``pets``, ``imagenet``, ``imagefolder:PATH``): images, labels, class
     names, ``{c}`` templates
  4. coupled anchor sets by name (``clipart``, ``tuxpaint``,
     ``fashion-mnist-train``, ``captions:FILE``, ``webdataset:PATTERN``),
     combinable with ``+``, each in a fixed seeded order
  5. the embedding cache: sharded, atomic, resumable, keyed on encoder and data
  6. what the method consumes: aligned anchor embeddings, evaluation
     embeddings with class-major prompt embeddings
  7. the registry of precomputed embeddings: ``fetch`` (checked download) and
     ``publish``
  8. ``build_default``: the embedded default, end to end

Shapes in docstrings: ``N`` anchors, ``Q`` queries, ``d1``/``d2`` image/text
embedding dims, ``C`` classes, ``T`` templates per class.
"""
from __future__ import annotations

import concurrent.futures
import csv
import errno
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from asif_encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from asif_core import (ASIFInputError, atomic_write, atomic_save_npy, atomic_write_json,
                       load_embedding_set, sha256_file)

__all__ = [
    "DataError", "MissingDataError", "OfflineError", "FetchError",
    "cache_root", "smoke_limit", "load_image", "render_svg", "LazyImages",
    "EvalDataset", "load_dataset", "DATASETS", "load_classnames", "load_templates", "read_idx",
    "AnchorSet", "load_anchor_set", "ANCHOR_SETS",
    "CachedEmbeddings", "embed_cached", "cache_key",
    "AnchorEmbeddings", "EvalEmbeddings", "load_anchor_embeddings", "load_eval_embeddings",
    "load_registry", "fetch", "publish", "build_default",
]

PROJECT_ROOT = Path(__file__).resolve().parent
DATA_DIR = PROJECT_ROOT / "data"

# ---------------------------------------------------------------------------
# 1. paths, errors, smoke switch
# ---------------------------------------------------------------------------


class DataError(ASIFInputError):
    """A dataset, anchor set, cache or download problem; the message says the fix."""


class MissingDataError(DataError):
    """Data that is neither installed nor downloadable here."""


class OfflineError(DataError):
    """Data that must be downloaded, on a machine without network."""


class FetchError(DataError):
    """A registry download that failed. ``kind`` is one of: ``html`` (a web page
    came instead of the file: Drive quota or permission), ``not_found`` (404),
    ``http`` (another HTTP status), ``network``, ``truncated``, ``checksum``,
    ``no_space``, ``archive`` (not a valid archive)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``root``, else ``$ASIF_CACHE``, else ``cache/`` at the project root (git-ignored)."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("ASIF_CACHE") or PROJECT_ROOT / "cache")


SMOKE_SIZE = 200


def smoke_limit(limit: int | None) -> int | None:
    """``limit`` unless it is None and ``ASIF_SMOKE`` is set (CI runs notebooks
    on small subsets), then ``SMOKE_SIZE``."""
    if limit is None and is_smoke():
        return SMOKE_SIZE
    return limit


def is_smoke() -> bool:
    """True when ASIF_SMOKE asks for the small CI run."""
    return os.environ.get("ASIF_SMOKE", "").strip().lower() in ("1", "true", "yes", "on")


def _seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``range(n)`` of size ``limit``, sorted; all when ``limit`` is None."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_id(path: Path, base: Path | None = None) -> str:
    """An id that changes when the file does: relative path, size, mtime."""
    st = path.stat()
    rel = path.relative_to(base).as_posix() if base else path.as_posix()
    return f"{rel}:{st.st_size}:{st.st_mtime_ns}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


# ---------------------------------------------------------------------------
# 2. images
# ---------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _on_white(image):
    """RGB PIL image; transparency composited on white (clip-art and stamps
    are drawn on transparent canvases; dropping alpha would make them black)."""
    from PIL import Image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image(item):
    """A PIL image, a path, or raw bytes -> RGB PIL image (transparency on white).

    Decodes fully (as the encoders' ``open_image`` does, EXIF orientation
    applied) but composites transparency on white where ``open_image`` would
    drop the alpha channel. Raises ``DataError`` for a missing or corrupt file.
    """
    from PIL import Image
    if isinstance(item, (bytes, bytearray)):
        item = io.BytesIO(item)
    if isinstance(item, Image.Image):
        return _on_white(item)
    try:
        from PIL import ImageOps
        with Image.open(item) as im:
            im.load()  # decode fully now: a truncated file fails here, not inside a batch
            return _on_white(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise DataError(f"image {item} does not exist")
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"image {item} cannot be read ({type(e).__name__}: {e}); it is corrupt or not an image")


def render_svg(path: str | os.PathLike, size: int = 224):
    """Render an SVG file to an RGB PIL image on white, longer side ``size`` px.

    Raises ``DataError`` if cairosvg cannot render it (some clip-art uses SVG
    features cairosvg lacks); callers record such files and skip them.
    """
    try:
        import cairosvg
    except ImportError:
        raise MissingDataError("rendering SVG needs cairosvg: pip install cairosvg")
    from PIL import Image
    try:
        png = cairosvg.svg2png(url=str(path), output_width=size)
        image = Image.open(io.BytesIO(png))
        image.load()
        if image.height > image.width:  # tall drawing: render again so the height is `size`
            png = cairosvg.svg2png(url=str(path), output_height=size)
            image = Image.open(io.BytesIO(png))
            image.load()
    except Exception as e:
        raise DataError(f"SVG {path} cannot be rendered ({type(e).__name__}: {e})")
    return _on_white(image)


class LazyImages(Sequence):
    """A sequence of ``n`` images produced on access by ``get(i)`` (PIL or a path),
    so that a 70k-image dataset costs nothing until it is embedded."""

    def __init__(self, n: int, get: Callable[[int], object]):
        self._n, self._get = int(n), get

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)


def _subset_images(images: Sequence, index: np.ndarray) -> LazyImages:
    return LazyImages(len(index), lambda i: images[int(index[i])])


# ---------------------------------------------------------------------------
# 3. evaluation datasets
# ---------------------------------------------------------------------------


def _data_json(name: str) -> dict:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def load_classnames(dataset: str) -> list[str]:
    """Class names of ``dataset`` (data/classnames.json), in label order."""
    names = _data_json("classnames.json")
    if dataset not in names:
        raise DataError(f"no class names for {dataset!r} in data/classnames.json (known: {sorted(k for k in names if not k.startswith('_'))})")
    return list(names[dataset])


def load_templates(dataset: str) -> list[str]:
    """Prompt templates of ``dataset`` (data/templates.json), each with a ``{c}`` placeholder."""
    templates = _data_json("templates.json")
    if dataset not in templates:
        raise DataError(f"no templates for {dataset!r} in data/templates.json (known: {sorted(k for k in templates if not k.startswith('_'))})")
    return list(templates[dataset])


@dataclass
class EvalDataset:
    """A labelled evaluation set.

    ``images``: Sequence of length Q (PIL images or paths, produced lazily);
    ``labels``: int64 [Q]; ``classnames``: C names; ``templates``: T strings
    with ``{c}``; ``identity``: JSON-able description used in cache keys;
    ``ids``: Q strings naming each image (they change when the image does).
    """
    name: str
    images: Sequence
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    identity: dict
    ids: list[str]

    def __len__(self):
        return len(self.labels)

    def prompts(self) -> list[str]:
        """The C*T prompts, class-major: the T templates of class 0, then of class 1, ..."""
        return [t.replace("{c}", c) for c in self.classnames for t in self.templates]

    def subset(self, limit: int | None, seed: int = 0) -> "EvalDataset":
        """A seeded random subset of ``limit`` items (all when None), in dataset order."""
        index = _seeded_subset(len(self), limit, seed)
        if len(index) == len(self):
            return self
        ident = dict(self.identity, subset={"limit": int(limit), "seed": int(seed)})
        return EvalDataset(self.name, _subset_images(self.images, index), self.labels[index],
                           self.classnames, self.templates, ident, [self.ids[i] for i in index])


# --- Fashion-MNIST -----------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# sha256 of the *decompressed* IDX files: Debian recompresses the archives, so
# the .gz bytes differ between sources while the data must not.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode an IDX file (plain or .gz) into a uint8 array, e.g. [n, 28, 28] images or [n] labels."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX type {data[2]:#x} is not unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape} but holds {body.size} bytes; the file is truncated")
    return body.reshape(shape)


def _fashion_mnist_download(folder: Path, files: Iterable[str], base_url: str) -> None:
    """Fetch the IDX archives from the public source into ``folder``, checking their content sha256."""
    import urllib.error
    import urllib.request
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        target = folder / name
        if target.exists():
            continue
        try:
            with urllib.request.urlopen(base_url + name, timeout=30) as r:
                payload = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise OfflineError(
                f"fashion-mnist: the Debian package is not installed and the public source {base_url} "
                f"cannot be reached ({e}). Install it: apt-get install dataset-fashion-mnist")
        try:
            content = gzip.decompress(payload)
        except OSError:
            raise DataError(f"fashion-mnist: {base_url + name} did not return a gzip file")
        if hashlib.sha256(content).hexdigest() != FASHION_MNIST_SHA256[name]:
            raise DataError(f"fashion-mnist: {base_url + name} has unexpected content (sha256 mismatch); not used")
        atomic_write(target, lambda f: f.write(payload))


def fashion_mnist_folder(download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST IDX archives: the Debian package's,
    else the cache (downloaded from the public source if allowed)."""
    needed = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    folder = Path(os.environ.get("ASIF_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    if all((folder / n).exists() for n in needed):
        return folder
    cached = cache_root() / "datasets" / "fashion-mnist"
    if all((cached / n).exists() for n in needed):
        return cached
    if not download:
        raise MissingDataError("fashion-mnist is not installed. Install it: apt-get install dataset-fashion-mnist")
    _fashion_mnist_download(cached, needed, os.environ.get("ASIF_FASHION_MNIST_URL") or FASHION_MNIST_URL)
    return cached


def _fashion_mnist(split: str) -> EvalDataset:
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    folder = fashion_mnist_folder()
    image_file, label_file = (folder / n for n in FASHION_MNIST_FILES[split])
    pixels = read_idx(image_file)      # [n, 28, 28] uint8
    labels = read_idx(label_file).astype(np.int64)
    if len(pixels) != len(labels):
        raise DataError(f"fashion-mnist {split}: {len(pixels)} images but {len(labels)} labels")
    from PIL import Image
    images = LazyImages(len(pixels), lambda i: Image.fromarray(pixels[i], mode="L").convert("RGB"))
    identity = {"dataset": "fashion-mnist", "split": split,
                "content_sha256": [FASHION_MNIST_SHA256[n] for n in FASHION_MNIST_FILES[split]]}
    return EvalDataset("fashion-mnist", images, labels, load_classnames("fashion-mnist"),
                       load_templates("fashion-mnist"), identity,
                       [f"fashion-mnist/{split}/{i}" for i in range(len(labels))])


# --- torchvision datasets (online) -------------------------------------------

def _torchvision(name: str, split: str) -> EvalDataset:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise MissingDataError(f"{name} needs torchvision: pip install torchvision")
    root = cache_root() / "datasets" / "torchvision"
    root.mkdir(parents=True, exist_ok=True)
    train = split == "train"
    try:
        if name == "cifar10":
            ds = tvd.CIFAR10(str(root), train=train, download=True)
        elif name == "cifar100":
            ds = tvd.CIFAR100(str(root), train=train, download=True)
        else:
            ds = tvd.OxfordIIITPet(str(root), split="trainval" if train else "test", download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on bad archives
        raise OfflineError(f"{name} is downloaded by torchvision into {root} and the download failed ({e}). "
                           f"It needs network access once; offline, use fashion-mnist or imagefolder:PATH")
    labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds._labels, dtype=np.int64)
    images = LazyImages(len(ds), lambda i: ds[i][0])
    return EvalDataset(name, images, labels, load_classnames(name), load_templates(name),
                       {"dataset": name, "split": split, "source": "torchvision"},
                       [f"{name}/{split}/{i}" for i in range(len(labels))])


# --- folders -------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _imagefolder(path: str, dataset: str = "imagefolder", classnames: list[str] | None = None,
                 templates: list[str] | None = None) -> EvalDataset:
    """One subfolder per class (sorted names are the labels), images anywhere below it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{dataset}: {root} is not a folder; give a folder with one subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{dataset}: {root} has no class subfolders")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = _image_files(root / cls)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{dataset}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    ids = [_file_id(p, root) for p in paths]
    names = classnames or [c.replace("_", " ") for c in classes]
    identity = {"dataset": dataset, "root_classes_sha256": _sha256_text("\n".join(classes)),
                "files_sha256": _sha256_text("\n".join(ids))}
    return EvalDataset(dataset, paths, np.asarray(labels, dtype=np.int64), names,
                       templates or load_templates("imagefolder"), identity, ids)


def _imagenet_classnames(wnids: list[str], root: Path) -> list[str]:
    """Readable ImageNet class names for the wnid folders: a LOC_synset_mapping.txt
    beside the folder if present, else torchvision's weight metadata (index order
    = sorted wnids, the standard convention)."""
    for mapping in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if mapping.exists():
            table = dict(line.strip().split(" ", 1) for line in mapping.read_text().splitlines() if line.strip())
            return [table.get(w, w).split(",")[0].strip() for w in wnids]
    if len(wnids) == 1000:
        try:
            from torchvision.models import ResNet50_Weights
            return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        except ImportError:
            pass
    return wnids


def _imagenet(path: str | None) -> EvalDataset:
    root = Path(path or os.environ.get("ASIF_IMAGENET") or "")
    if not path and not os.environ.get("ASIF_IMAGENET"):
        raise MissingDataError("imagenet is read from a local validation folder (one wnid subfolder per class): "
                               "use imagenet:PATH or set ASIF_IMAGENET=PATH")
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return _imagefolder(str(root), "imagenet", _imagenet_classnames(wnids, root), load_templates("imagenet"))


DATASETS = ("fashion-mnist", "cifar10", "cifar100", "pets", "imagenet", "imagefolder:PATH")


def load_dataset(name: str, split: str = "test", limit: int | None = None, seed: int = 0) -> EvalDataset:
    """An evaluation dataset by name (see ``DATASETS``).

    ``limit`` takes a seeded random subset (``ASIF_SMOKE=1`` sets a small one);
    ``split`` is ``test`` or ``train`` where the dataset has both.
    """
    limit = smoke_limit(limit)
    kind, _, arg = name.partition(":")
    if kind == "fashion-mnist":
        ds = _fashion_mnist(split)
    elif kind in ("cifar10", "cifar100", "pets"):
        ds = _torchvision(kind, split)
    elif kind == "imagenet":
        ds = _imagenet(arg or None)
    elif kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder needs a path: imagefolder:PATH")
        ds = _imagefolder(arg)
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return ds.subset(limit, seed)


# ---------------------------------------------------------------------------
# 4. coupled anchor sets
# ---------------------------------------------------------------------------


@dataclass
class CoupledData:
    """One source of (image, caption) pairs in a stable listing order.

    ``images``: Sequence of N (PIL, path, or raises when unreadable);
    ``captions``: N strings; ``ids``: N strings that change when an item does;
    ``identity``: JSON-able, part of cache keys; ``translations``: per item
    {language: caption} where the source has them; ``skipped``: items left out
    while listing, with the reason.
    """
    name: str
    images: Sequence
    captions: list[str]
    ids: list[str]
    identity: dict
    translations: list[dict] | None = None
    skipped: list[dict] = field(default_factory=list)

    def __len__(self):
        return len(self.captions)


class AnchorSet:
    """Coupled (image, caption) pairs in a fixed seeded order: the anchors.

    Built from one or more ``CoupledData`` parts (``clipart+tuxpaint``); the
    order is a seeded permutation of all their items, so "the first n anchors"
    of the paper's Fig. 5 is a random sample of every part. ``order``: int64
    [N, 2] rows of (part, item within part).
    """

    def __init__(self, name: str, parts: list[CoupledData], order: np.ndarray):
        self.name, self.parts, self.order = name, parts, np.asarray(order, dtype=np.int64).reshape(-1, 2)

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
        return AnchorSet(f"{self.name}[:{n}]", self.parts, self.order[:n])

    @property
    def skipped(self) -> list[dict]:
        return [s for part in self.parts for s in part.skipped]


# --- clip-art (openclipart-svg) ------------------------------------------------

OPENCLIPART_DIR = Path("/usr/share/openclipart/svg")
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
    root = Path(root or os.environ.get("ASIF_OPENCLIPART_DIR") or OPENCLIPART_DIR)
    if not root.is_dir():
        raise MissingDataError(f"clipart needs the Debian package openclipart-svg ({root} is missing). "
                               "Install it: apt-get install openclipart-svg")
    # The package links many drawings into several category folders: keep each real file once.
    files = sorted(p for p in root.rglob("*.svg") if not p.is_symlink() and p.is_file())
    captions, skipped = [], []
    keep = []
    for p in files:
        try:
            captions.append(svg_caption(p))
            keep.append(p)
        except OSError as e:
            skipped.append({"id": p.relative_to(root).as_posix(), "reason": f"unreadable: {e}"})
    ids = [_file_id(p, root) for p in keep]
    images = LazyImages(len(keep), lambda i: render_svg(keep[i], size))
    identity = {"anchors": "clipart", "render": {"size": size, "background": "white", "renderer": "cairosvg"},
                "files_sha256": _sha256_text("\n".join(ids))}
    return CoupledData("clipart", images, captions, ids, identity, skipped=skipped)


# --- TuxPaint stamps -------------------------------------------------------------

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")


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
    root = Path(root or os.environ.get("ASIF_TUXPAINT_DIR") or TUXPAINT_DIR)
    if not root.is_dir():
        raise MissingDataError(f"tuxpaint needs the Debian package tuxpaint-stamps-default ({root} is missing). "
                               "Install it: apt-get install tuxpaint-stamps-default")
    images, captions, ids, translations, skipped = [], [], [], [], []
    stems = sorted({p.with_suffix("") for p in root.rglob("*") if p.suffix in (".png", ".svg")})
    for stem in stems:
        png, svg, txt = stem.with_suffix(".png"), stem.with_suffix(".svg"), stem.with_suffix(".txt")
        image = png if png.exists() else svg  # a PNG beside an SVG is the same stamp; PNG needs no rendering
        rel = image.relative_to(root).as_posix()
        if not txt.exists():  # mirrored variants and a few others have no description
            skipped.append({"id": rel, "reason": "no .txt description"})
            continue
        english, others = read_tuxpaint_text(txt)
        if not english:
            skipped.append({"id": rel, "reason": "empty description"})
            continue
        images.append(image)
        captions.append(english)
        translations.append(others)
        ids.append(_file_id(image, root) + "|" + _file_id(txt, root))
    lazy = LazyImages(len(images), lambda i: render_svg(images[i], size) if images[i].suffix == ".svg" else images[i])
    identity = {"anchors": "tuxpaint", "render": {"size": size, "background": "white"},
                "files_sha256": _sha256_text("\n".join(ids))}
    return CoupledData("tuxpaint", lazy, captions, ids, identity, translations, skipped)


# --- Fashion-MNIST training split (in-domain) ------------------------------------

# How each class reads in a sentence; captions are written from the label only,
# so these anchors are in-domain coupled data, unlike the paper's web captions.
_FASHION_PHRASES = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal",
                    "a shirt", "a sneaker", "a bag", "an ankle boot"]
_FASHION_CAPTIONS = ["{x}.", "a photo of {x}.", "a black and white picture of {x}.",
                     "{x} on a plain background.", "a small grayscale image of {x}, an item of fashion."]


def _fashion_mnist_train(seed: int = 0) -> CoupledData:
    ds = _fashion_mnist("train")
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


def _pick(row: dict, keys: Sequence[str], what: str, source: str) -> str:
    lowered = {k.lower().strip(): v for k, v in row.items() if k}
    for k in keys:
        if k in lowered:
            return lowered[k]
    raise DataError(f"{source}: no {what} column; name it one of {', '.join(keys)} (found {', '.join(row)})")


def _captions_file(path: str) -> CoupledData:
    """CSV (with a header) or JSONL of image path + caption; relative paths are from the file's folder."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"captions:{path}: file not found")
    if file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"captions:{path}: line {n} is not JSON ({e})")
    else:
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"captions:{path}: no rows")
    paths, captions = [], []
    for row in rows:
        image = Path(_pick(row, _IMAGE_KEYS, "image path", f"captions:{path}")).expanduser()
        paths.append(image if image.is_absolute() else file.parent / image)
        captions.append(str(_pick(row, _CAPTION_KEYS, "caption", f"captions:{path}")).strip())
    # A missing image stays in the list: the cache records it as failed and drops the pair.
    ids = [(_file_id(p) if p.exists() else f"{p.as_posix()}:missing") for p in paths]
    identity = {"anchors": "captions", "file": file.name, "file_sha256": sha256_file(file),
                "files_sha256": _sha256_text("\n".join(ids))}
    return CoupledData(f"captions:{file.name}", paths, captions, ids, identity)


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


def _webdataset(pattern: str) -> CoupledData:
    """Tar shards of ``KEY.jpg|png|webp`` + ``KEY.txt`` (as img2dataset writes them).
    The tars are indexed once; images are read lazily by offset."""
    shards = [Path(p) for p in _expand_braces(os.path.expanduser(pattern))]
    missing = [str(p) for p in shards if not p.exists()]
    if not shards or missing:
        raise DataError(f"webdataset:{pattern}: no such shard(s) {missing[:3] or pattern}")
    refs, captions, ids, skipped = [], [], [], []
    for shard in shards:
        with tarfile.open(shard, "r:") as tar:  # uncompressed tar: members can be read by offset
            groups: dict[str, dict] = {}
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.rpartition(".")
                    groups.setdefault(key, {})[ext.lower()] = m
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                if img is None or "txt" not in g:
                    skipped.append({"id": f"{shard.name}/{key}", "reason": "needs an image and a .txt"})
                    continue
                text = tar.extractfile(g["txt"]).read().decode("utf-8", errors="replace").strip()
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


ANCHOR_SETS = ("clipart", "tuxpaint", "fashion-mnist-train", "captions:FILE", "webdataset:PATTERN")


def _anchor_part(name: str) -> CoupledData:
    kind, _, arg = name.partition(":")
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


def load_anchor_set(name: str, limit: int | None = None, seed: int = 0) -> AnchorSet:
    """Coupled anchors by name; ``a+b`` combines sets. The order is a seeded
    permutation of all pairs (same seed, same order, on any machine);
    ``limit`` keeps the first ``limit`` of that order (``ASIF_SMOKE=1``: a few hundred)."""
    limit = smoke_limit(limit)
    parts = [_anchor_part(n.strip()) for n in name.split("+") if n.strip()]
    if not parts:
        raise DataError("empty anchor set name")
    pairs = np.concatenate([np.stack([np.full(len(p), i), np.arange(len(p))], 1) for i, p in enumerate(parts)])
    if len(pairs) == 0:
        raise DataError(f"anchor set {name!r} has no pairs")
    order = pairs[np.random.default_rng(seed).permutation(len(pairs))]
    return AnchorSet(name, parts, order).head(limit)


# ---------------------------------------------------------------------------
# 5. the embedding cache
# ---------------------------------------------------------------------------

CACHE_FORMAT = "asif-cache/1"


@dataclass
class CachedEmbeddings:
    """An embedding-set folder in the cache: ``array`` [n, dim] (memory-mapped;
    rows listed in ``failed`` are zeros), ``failed``: [{"row", "id", "error"}]."""
    folder: Path
    array: object
    manifest: dict

    @property
    def failed_rows(self) -> np.ndarray:
        return np.asarray(sorted(f["row"] for f in self.manifest.get("failed", [])), dtype=np.int64)

    @property
    def ok(self) -> np.ndarray:
        """bool [n]: rows that hold a real embedding."""
        mask = np.ones(self.manifest["count"], dtype=bool)
        mask[self.failed_rows] = False
        return mask


def _encoder_identity(encoder) -> dict:
    ident = getattr(encoder, "identity", None)
    if not isinstance(ident, dict):
        raise DataError(f"encoder {getattr(encoder, 'name', encoder)!r} has no .identity dict "
                        "(encoder, weights version, preprocessing); the cache cannot key on it")
    return ident


def cache_key(encoder, kind: str, dataset: dict, ids: Sequence[str], texts: Sequence[str] | None = None) -> str:
    """sha256 over everything that decides the vectors: the encoder's identity
    (model, weights, preprocessing), the modality, the dataset identity, the
    item ids in order and, for text, the texts themselves."""
    payload = {"format": CACHE_FORMAT, "kind": kind, "encoder": _encoder_identity(encoder),
               "dataset": dataset, "ids": _sha256_text("\n".join(ids))}
    if texts is not None:
        payload["texts"] = _sha256_text(json.dumps(list(texts), ensure_ascii=False))
    return _sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _encode_rows(encoder, kind: str, items: Sequence, rows: range, batch_size: int,
                 ids: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """Embed ``items[rows]`` -> (float32 [len(rows), dim], failed). An image that
    cannot be loaded leaves a zero row and an entry in ``failed``: the rows of
    the others stay where they are, so image i still pairs with caption i."""
    out = np.zeros((len(rows), encoder.dim), dtype=np.float32)
    failed, good, payload, inverse = [], [], [], None
    if kind == "text":
        # Captions made from labels repeat a few sentences thousands of times:
        # each distinct text is embedded once and copied to every row holding it.
        first: dict[str, int] = {}
        inverse = np.array([first.setdefault(str(items[r]), len(first)) for r in rows], dtype=np.int64)
        good, payload = list(range(len(rows))), list(first)
    else:
        def attempt(r):
            try:
                return load_image(items[r]), None
            except Exception as e:  # any decoder/renderer error: record it, never die on one image
                return None, f"{type(e).__name__}: {e}"
        # Decoding and SVG rendering release the GIL for most of their time:
        # a few threads keep them from serialising in front of the encoder.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            for k, (r, (image, error)) in enumerate(zip(rows, pool.map(attempt, rows))):
                if error is None:
                    payload.append(image)
                    good.append(k)
                else:
                    failed.append({"row": int(r), "id": ids[r], "error": error})
    if payload:
        vectors = np.asarray(encoder.encode(payload, batch_size=batch_size, progress=False), dtype=np.float32)
        if vectors.shape != (len(payload), encoder.dim):
            raise DataError(f"encoder {encoder.name} returned shape {vectors.shape} for {len(payload)} inputs; "
                            f"expected {(len(payload), encoder.dim)}")
        out[good] = vectors if inverse is None else vectors[inverse]
    return out, failed


def _shard_name(i: int) -> str:
    return f"embeddings-{i:05d}.npy"  # the core's naming, so load_embedding_set reads the folder


def _shard_done(folder: Path, i: int) -> dict | None:
    """The record of shard ``i`` if it is complete and intact, else None."""
    record = folder / ".progress" / f"{i:05d}.json"
    shard = folder / _shard_name(i)
    if not (record.exists() and shard.exists()):
        return None
    info = json.loads(record.read_text())
    return info if sha256_file(shard) == info["sha256"] else None


def embed_cached(encoder, items: Sequence, *, kind: str, dataset: dict, ids: Sequence[str],
                 name: str = "data", root: str | os.PathLike | None = None, shard_rows: int = 4096,
                 batch_size: int = 64, progress: bool = True, verify: bool = True,
                 captions: Sequence[str] | None = None, labels: np.ndarray | None = None) -> CachedEmbeddings:
    """Embed ``items`` (images: PIL/paths/bytes; text: strings) into a cached embedding set.

    The folder ``<cache>/embeddings/<name>/<kind>-<encoder>-<key>`` is keyed by
    ``cache_key`` (encoder identity + data), so a change in either never
    serves old vectors. Shards of ``shard_rows`` rows are written atomically
    as they finish: a run that is killed resumes from the finished ones. On a
    cache hit every shard is checked against its sha256 (``verify``) and a
    shard that no longer matches is recomputed. Returns the set, with rows
    [n, encoder.dim] float32; unreadable images are zero rows listed under
    ``manifest["failed"]``.
    """
    if kind not in ("image", "text"):
        raise DataError(f"kind must be 'image' or 'text', not {kind!r}")
    n = len(items)
    if len(ids) != n:
        raise DataError(f"{len(ids)} ids for {n} items; give one id per item")
    if n == 0:
        raise DataError(f"{name}: nothing to embed")
    key = cache_key(encoder, kind, dataset, ids, items if kind == "text" else None)
    folder = cache_root(root) / "embeddings" / _slug(name) / f"{kind}-{_slug(encoder.name)}-{key[:16]}"
    shards = list(range(0, n, shard_rows))
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("cache_key") == key:
            return _check_and_repair(folder, manifest, encoder, kind, items, ids, batch_size, verify)
    folder.mkdir(parents=True, exist_ok=True)
    records = {i: _shard_done(folder, i) for i in range(len(shards))}
    done_rows = sum(min(shard_rows, n - s) for i, s in enumerate(shards) if records[i])
    bar = _progress(n, done_rows, f"{kind} {name} {encoder.name}", progress)
    try:
        for i, start in enumerate(shards):
            if records[i]:
                continue
            rows = range(start, min(start + shard_rows, n))
            block, failed = _encode_rows(encoder, kind, items, rows, batch_size, ids)
            records[i] = {"rows": len(rows), "sha256": atomic_save_npy(folder / _shard_name(i), block),
                          "failed": failed}
            atomic_write_json(folder / ".progress" / f"{i:05d}.json", records[i])
            bar.update(len(rows))
    finally:
        bar.close()
    manifest = {
        "format": "asif-embeddings/1", "cache_format": CACHE_FORMAT, "cache_key": key, "kind": kind,
        "encoder": _encoder_identity(encoder), "dataset": dataset, "name": name,
        "count": n, "dim": int(encoder.dim), "dtype": "float32", "shard_rows": shard_rows,
        "shards": [{"file": _shard_name(i), "rows": records[i]["rows"], "sha256": records[i]["sha256"]}
                   for i in range(len(shards))],
        "failed": [f for i in range(len(shards)) for f in records[i]["failed"]],
        "ids_sha256": _sha256_text("\n".join(ids)),
    }
    if captions is not None or kind == "text":
        text = "".join(json.dumps({"id": i, "caption": str(c)}, ensure_ascii=False) + "\n"
                       for i, c in zip(ids, captions if captions is not None else items))
        atomic_write(folder / "captions.jsonl", lambda f: f.write(text.encode("utf-8")))
    if labels is not None:
        atomic_save_npy(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    atomic_write_json(manifest_path, manifest)  # last: a folder with a manifest is complete
    return _open(folder)


def _check_and_repair(folder, manifest, encoder, kind, items, ids, batch_size, verify) -> CachedEmbeddings:
    """Cache hit: recompute any shard whose file is missing or whose sha256 no longer matches."""
    if not verify:
        return _open(folder)
    shard_rows, changed = manifest["shard_rows"], False
    # Hashing every shard on every hit costs ~1 s per 300 MB. A shard whose
    # size and modification time are those it had when last verified is not
    # hashed again; any write to it changes its mtime and brings the hash back.
    stamps_path = folder / ".progress" / "verified.json"
    stamps = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
    fresh = dict(stamps)

    def stamp(path, sha):
        st = path.stat()
        fresh[path.name] = [st.st_size, st.st_mtime_ns, sha]

    for i, shard in enumerate(manifest["shards"]):
        path = folder / shard["file"]
        if path.exists():
            st = path.stat()
            if stamps.get(shard["file"]) == [st.st_size, st.st_mtime_ns, shard["sha256"]]:
                continue
            if sha256_file(path) == shard["sha256"]:
                stamp(path, shard["sha256"])
                continue
        start = i * shard_rows
        block, _ = _encode_rows(encoder, kind, items, range(start, start + shard["rows"]), batch_size, ids)
        shard["sha256"] = atomic_save_npy(path, block)
        stamp(path, shard["sha256"])
        atomic_write_json(folder / ".progress" / f"{i:05d}.json",
                          {"rows": shard["rows"], "sha256": shard["sha256"],
                           "failed": [f for f in manifest["failed"] if start <= f["row"] < start + shard["rows"]]})
        changed = True
    if changed:
        atomic_write_json(folder / "manifest.json", manifest)
    if fresh != stamps:
        atomic_write_json(stamps_path, fresh)
    return _open(folder)


def _open(folder: Path) -> CachedEmbeddings:
    es = load_embedding_set(folder)
    return CachedEmbeddings(folder, es.array, es.manifest)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="item", disable=not enabled, leave=False)


# ---------------------------------------------------------------------------
# 6. what the method consumes
# ---------------------------------------------------------------------------


def _image_encoder(encoder):
    if isinstance(encoder, str):
        from asif_encoders import load_image_encoder
        return load_image_encoder(encoder)
    return encoder


def _text_encoder(encoder):
    if isinstance(encoder, str):
        from asif_encoders import load_text_encoder
        return load_text_encoder(encoder)
    return encoder


@dataclass
class AnchorEmbeddings:
    """Aligned anchors: row i of ``A_img`` [N, d1] and ``A_txt`` [N, d2] is one pair.

    Pairs whose image could not be read are dropped from both (``dropped``);
    ``index`` [N] maps each row back to its position in ``anchor_set``, so
    ``thumbnail(i)`` shows the image of row i.
    """
    A_img: np.ndarray
    A_txt: np.ndarray
    captions: list[str]
    ids: list[str]
    index: np.ndarray
    anchor_set: AnchorSet
    dropped: list[dict]

    def __len__(self):
        return len(self.captions)

    def thumbnail(self, i: int, size: int = 96):
        """Image of anchor row ``i`` as a small RGB PIL image."""
        return self.anchor_set.thumbnail(int(self.index[i]), size)


def _part_embeddings(part: CoupledData, rows: np.ndarray, encoder, kind: str, root, progress, batch_size):
    """Embeddings of ``part`` rows ``rows`` (sorted unique) -> (array [len(rows), d], ok [len(rows)] bool).

    Embeds the whole part when all of it is asked for; for a prefix of a
    larger order only the needed rows, so a small ``limit`` stays cheap."""
    subset = len(rows) < len(part)
    ids = [part.ids[j] for j in rows] if subset else part.ids
    identity = dict(part.identity, rows=_sha256_text(",".join(map(str, rows)))) if subset else part.identity
    if kind == "image":
        items = _subset_images(part.images, rows) if subset else part.images
        captions = [part.captions[j] for j in rows] if subset else part.captions
    else:
        items = [part.captions[j] for j in rows] if subset else part.captions
        captions = None
    emb = embed_cached(encoder, items, kind=kind, dataset=identity, ids=ids, name=part.name, root=root,
                       progress=progress, batch_size=batch_size, captions=captions)
    # not a subset means rows == arange(len(part)): the cached rows are already in order
    return np.asarray(emb.array), emb.ok, emb.manifest.get("failed", [])


def load_anchor_embeddings(anchor_set: str | AnchorSet, image_encoder=DEFAULT_IMAGE_ENCODER,
                           text_encoder=DEFAULT_TEXT_ENCODER, limit: int | None = None, seed: int = 0,
                           root=None, progress: bool = True, batch_size: int = 64) -> AnchorEmbeddings:
    """Aligned anchor embeddings for an anchor set (name or object) and two encoders
    (names or encoder objects), embedding through the cache what is not there yet.

    Returns ``A_img`` float32 [N, d1], ``A_txt`` float32 [N, d2] in the set's
    seeded order, minus pairs whose image failed (dropped from both)."""
    if isinstance(anchor_set, str):
        anchor_set = load_anchor_set(anchor_set, limit, seed)
    else:
        anchor_set = anchor_set.head(smoke_limit(limit))
    image_encoder, text_encoder = _image_encoder(image_encoder), _text_encoder(text_encoder)
    A_img = np.zeros((len(anchor_set), image_encoder.dim), dtype=np.float32)
    A_txt = np.zeros((len(anchor_set), text_encoder.dim), dtype=np.float32)
    ok = np.zeros(len(anchor_set), dtype=bool)
    dropped = []
    for p, part in enumerate(anchor_set.parts):
        where = np.flatnonzero(anchor_set.order[:, 0] == p)
        if len(where) == 0:
            continue
        rows = anchor_set.order[where, 1]
        uniq, inverse = np.unique(rows, return_inverse=True)
        img, img_ok, failed = _part_embeddings(part, uniq, image_encoder, "image", root, progress, batch_size)
        txt, _, _ = _part_embeddings(part, uniq, text_encoder, "text", root, progress, batch_size)
        A_img[where], A_txt[where], ok[where] = img[inverse], txt[inverse], img_ok[inverse]
        dropped += failed
    keep = np.flatnonzero(ok)
    if len(keep) < len(ok):  # pairs whose image failed leave both sides (copied only then)
        A_img, A_txt = A_img[keep], A_txt[keep]
    captions, ids = anchor_set.captions, anchor_set.ids
    return AnchorEmbeddings(A_img, A_txt, [captions[i] for i in keep], [ids[i] for i in keep],
                            keep, anchor_set, dropped)


@dataclass
class EvalEmbeddings:
    """A dataset ready for zero-shot evaluation.

    ``images`` float32 [Q, d1]; ``labels`` int64 [Q]; ``prompts`` float32
    [C*T, d2] class-major (the T templates of class c are rows c*T..c*T+T-1);
    ``dropped``: images that could not be read (left out of images and labels).
    """
    images: np.ndarray
    labels: np.ndarray
    prompts: np.ndarray
    classnames: list[str]
    templates: list[str]
    dataset: EvalDataset
    dropped: list[dict]


def load_eval_embeddings(dataset: str | EvalDataset, image_encoder=DEFAULT_IMAGE_ENCODER,
                         text_encoder=DEFAULT_TEXT_ENCODER, split: str = "test", limit: int | None = None,
                         seed: int = 0, root=None, progress: bool = True, batch_size: int = 64) -> EvalEmbeddings:
    """Image embeddings, labels and class-major prompt embeddings of an evaluation dataset."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, split, limit, seed)
    image_encoder, text_encoder = _image_encoder(image_encoder), _text_encoder(text_encoder)
    emb = embed_cached(image_encoder, dataset.images, kind="image", dataset=dataset.identity, ids=dataset.ids,
                       name=f"{dataset.name}-{dataset.identity.get('split', '')}", root=root, progress=progress,
                       batch_size=batch_size, labels=dataset.labels)
    prompts = dataset.prompts()
    pemb = embed_cached(text_encoder, prompts, kind="text", ids=[f"prompt/{i}" for i in range(len(prompts))],
                        dataset={"prompts": dataset.name, "classnames": dataset.classnames,
                                 "templates": dataset.templates},
                        name=f"{dataset.name}-prompts", root=root, progress=False, batch_size=batch_size)
    ok = emb.ok
    return EvalEmbeddings(np.asarray(emb.array)[ok], dataset.labels[ok], np.asarray(pemb.array),
                          dataset.classnames, dataset.templates, dataset, emb.manifest.get("failed", []))


# ---------------------------------------------------------------------------
# 7. registry of precomputed embeddings
# ---------------------------------------------------------------------------

REGISTRY_FORMAT = "asif-registry/1"


def _registry_path(registry) -> Path:
    return Path(registry or os.environ.get("ASIF_REGISTRY") or DATA_DIR / "registry.json")


def load_registry(registry: str | os.PathLike | None = None) -> dict:
    """{name: entry} of data/registry.json (or ``registry`` / ``$ASIF_REGISTRY``)."""
    path = _registry_path(registry)
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()).get("embeddings", {}))


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


def _describe(source: dict) -> str:
    return f"Google Drive file {source['gdrive_id']}" if "gdrive_id" in source else source.get("url", "?")


def _move_aside(path: Path, why: str) -> Path:
    """Keep a bad download for inspection, under a name that is never used as the archive."""
    bad = path.parent / "rejected" / f"{path.name}.{why}.{time.strftime('%Y%m%d-%H%M%S')}"
    bad.parent.mkdir(parents=True, exist_ok=True)
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
    tmp.mkdir(parents=True)
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
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError("archive", f"{archive}: not a valid tar archive ({e})")
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
    dest = base / "precomputed" / _slug(name)
    marker = dest / ".fetched.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256") == expected:
        return dest
    downloads = base / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / f"{_slug(name)}.tar"
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


def _fetch_archive(name, source, expected, size, archive: Path, progress, timeout) -> None:
    """Download into ``archive`` + ``.incoming``, check it, and rename it to ``archive``."""
    import requests
    incoming = archive.with_name(archive.name + ".incoming")
    partial = sum(p.stat().st_size for p in archive.parent.glob(incoming.name + "*.part"))
    _check_space(archive.parent, 2 * size - partial, name)  # archive + unpacked copy
    where = _describe(source)
    try:
        _download(source, incoming, progress, timeout)
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
    name = name or _slug(folder.resolve().name)
    archive = Path(out or cache_root() / "published") / f"{_slug(name)}.tar"
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
    data = json.loads(path.read_text()) if path.exists() else {"format": REGISTRY_FORMAT, "embeddings": {}}
    data.setdefault("embeddings", {})[name] = entry
    atomic_write_json(path, data)
    return dict(entry, archive=str(archive), registry=str(path))


# ---------------------------------------------------------------------------
# 8. the embedded default
# ---------------------------------------------------------------------------


def build_default(progress: bool = True, limit: int | None = None, root=None,
                  image_encoder=DEFAULT_IMAGE_ENCODER, text_encoder=DEFAULT_TEXT_ENCODER) -> dict:
    """Embed the offline default through the cache: Fashion-MNIST train and test
    (images + prompts), clip-art and TuxPaint anchors (images + captions).
    Already cached parts cost a checksum pass. Returns {what: (rows, seconds)}."""
    image_encoder, text_encoder = _image_encoder(image_encoder), _text_encoder(text_encoder)
    report = {}
    for split in ("train", "test"):
        t = time.time()
        e = load_eval_embeddings("fashion-mnist", image_encoder, text_encoder, split=split, limit=limit,
                                 root=root, progress=progress)
        report[f"fashion-mnist-{split}"] = (len(e.labels), round(time.time() - t, 1))
    t = time.time()
    a = load_anchor_embeddings("fashion-mnist-train", image_encoder, text_encoder, limit=limit, root=root,
                               progress=progress)
    report["fashion-mnist-train captions"] = (len(a), round(time.time() - t, 1))
    for name in ("clipart", "tuxpaint"):
        t = time.time()
        a = load_anchor_embeddings(name, image_encoder, text_encoder, limit=limit, root=root, progress=progress)
        report[name] = (len(a), round(time.time() - t, 1))
    return report
