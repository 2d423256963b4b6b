"""Evaluation datasets, dispatched on the name: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``pets``,
``imagenet[:PATH]``, ``imagefolder:PATH``.

Each loader returns an ``EvalDataset``: images (produced lazily), int64
labels, class names in label order and ``{c}`` prompt templates, plus an
``identity`` and per-image ``ids`` that the embedding cache keys on (they
change whenever an image could). Class names and templates live in
asif/data/classnames.json and asif/data/templates.json.

Offline: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or
its public source when the package is absent and the network is there), any
local folder. Online: the torchvision datasets, downloaded once.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from asif import debian
from asif.config import DATA_DIR, cache_root, smoke_limit
from asif.debian import FASHION_MNIST_DIR
from asif.errors import DataError, MissingDataError, OfflineError
from asif.images import IMAGE_EXTENSIONS, LazyImages, load_image, subset_images
from asif.storage import atomic_write, make_folder, printable, sha256_text

__all__ = ["DATASETS", "EvalDataset", "load_dataset", "load_classnames", "load_templates", "fill_template",
           "read_idx", "seeded_subset", "file_id", "torchvision_images", "FASHION_MNIST_DIR"]


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``range(n)`` of size ``limit``, sorted; all when ``limit`` is None."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def file_id(path: Path, base: Path | None = None) -> str:
    """An id that changes when the file does: relative path, size, mtime."""
    st = path.stat()
    rel = path.relative_to(base).as_posix() if base else path.as_posix()
    return f"{printable(rel)}:{st.st_size}:{st.st_mtime_ns}"  # a name that is not UTF-8 stays valid text


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


# Words that start with a vowel letter but not a vowel sound, and the reverse.
_A_BEFORE = re.compile(r"(uni|use|usu|uti|ure|uk|eu|ewe|one|once)", re.IGNORECASE)
_AN_BEFORE = re.compile(r"(hour|honest|honou?r|heir)", re.IGNORECASE)
_ARTICLE = re.compile(r"\b([Aa]) \{c\}")


def _is_plural(name: str) -> bool:
    """"trousers", "sunglasses", "jeans" are plural; "dress", "bus", "iris" are not."""
    return re.search(r"[^siu]s$", name.split()[-1].lower()) is not None


def fill_template(template: str, classname: str) -> str:
    """``template`` with ``{c}`` replaced by ``classname``, the article before it agreeing with the name.

    "a photo of a {c}." gives "a photo of an ankle boot.", "a photo of
    trousers.", "a photo of a t-shirt."; a template without "a {c}" is
    filled as it stands.
    """
    name = classname.strip()

    def article(match: re.Match) -> str:
        if _is_plural(name):
            return name
        vowel = name[:1].lower() in "aeiou" and not _A_BEFORE.match(name)
        an = vowel or bool(_AN_BEFORE.match(name))
        a = match.group(1)
        return f"{a}n {name}" if an else f"{a} {name}"

    return _ARTICLE.sub(article, template).replace("{c}", name)


@dataclass
class EvalDataset:
    """A labelled evaluation set.

    ``images``: Sequence of length Q (PIL images or paths, produced lazily);
    ``labels``: int64 [Q]; ``classnames``: C names; ``templates``: T strings
    with ``{c}``; ``identity``: JSON-able description used in cache keys;
    ``ids``: Q strings naming each image (they change when the image does);
    ``keys``: where the set is read from a package that anchors also come
    from, the item keys of the WHOLE set (asif.debian.item_key; subsets keep
    them all), so that those items leave the anchors; else None.
    """
    name: str
    images: Sequence
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    identity: dict
    ids: list[str]
    keys: list[str] | None = None

    @property
    def majority_rate(self) -> float:
        """The share of the most frequent class: the accuracy of always guessing it."""
        return float(np.bincount(self.labels).max() / len(self.labels)) if len(self.labels) else 0.0

    def __len__(self):
        return len(self.labels)

    def prompts(self) -> list[str]:
        """The C*T prompts, class-major: the T templates of class 0, then of class 1, ...
        (``fill_template``: the article before the class name agrees with it)."""
        return [fill_template(t, c) for c in self.classnames for t in self.templates]

    def with_prompts(self, classnames: Sequence[str] | None = None,
                     templates: Sequence[str] | None = None) -> "EvalDataset":
        """The same images and labels named with other ``classnames`` (C, in label order) and/or
        ``templates`` (each with ``{c}``); None keeps the dataset's own."""
        names = list(classnames) if classnames else self.classnames
        temps = list(templates) if templates else self.templates
        if len(names) != len(self.classnames):
            raise DataError(f"{self.name}: {len(names)} class names given for {len(self.classnames)} classes "
                            f"({', '.join(self.classnames[:5])}{', ...' if len(self.classnames) > 5 else ''}, "
                            "in label order)")
        if any(not n.strip() for n in names):
            raise DataError(f"{self.name}: a class name is empty")
        if any("{c}" not in t for t in temps):
            bad = next(t for t in temps if "{c}" not in t)
            raise DataError(f"template {bad!r} has no {{c}} placeholder for the class name")
        # the keys stay: renamed prompts do not make the images leave the anchors
        return EvalDataset(self.name, self.images, self.labels, names, temps, self.identity, self.ids, self.keys)

    def subset(self, limit: int | None, seed: int = 0) -> "EvalDataset":
        """A seeded random subset of ``limit`` items (all when None), in dataset order."""
        index = seeded_subset(len(self), limit, seed)
        if len(index) == len(self):
            return self
        ident = dict(self.identity, subset={"limit": int(limit), "seed": int(seed)})
        return EvalDataset(self.name, subset_images(self.images, index), self.labels[index],
                           self.classnames, self.templates, ident, [self.ids[i] for i in index], self.keys)


# --- Fashion-MNIST -----------------------------------------------------------

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
    make_folder(folder)
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


def fashion_mnist(split: str) -> EvalDataset:
    """Fashion-MNIST, the whole split (``train``: 60k, ``test``: 10k)."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    folder = fashion_mnist_folder()
    image_file, label_file = (folder / n for n in FASHION_MNIST_FILES[split])
    pixels = read_idx(image_file)      # [n, 28, 28] uint8
    labels = read_idx(label_file).astype(np.int64)
    if len(pixels) != len(labels):
        raise DataError(f"fashion-mnist {split}: {len(pixels)} images but {len(labels)} labels")
    images = LazyImages(len(pixels), lambda i: load_image(pixels[i]))
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
    make_folder(root)
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
                           f"It needs network access once; offline, use fashion-mnist or imagefolder:PATH") from None
    labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds._labels, dtype=np.int64)
    images = torchvision_images(ds)
    return EvalDataset(name, images, labels, load_classnames(name), load_templates(name),
                       {"dataset": name, "split": split, "source": "torchvision"},
                       [f"{name}/{split}/{i}" for i in range(len(labels))])


def torchvision_images(ds) -> Sequence:
    """A torchvision dataset's images for the one decoder (``load_image``): its files
    (``_images``, e.g. Pets) or pixel arrays (``data``, CIFAR), never its own
    ``convert("RGB")``, which drops transparency onto black."""
    files, pixels = getattr(ds, "_images", None), getattr(ds, "data", None)
    if files is not None:
        return [Path(f) for f in files]
    if isinstance(pixels, np.ndarray):
        return LazyImages(len(pixels), lambda i: load_image(pixels[i]))
    return LazyImages(len(ds), lambda i: load_image(ds[i][0]))


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
    ids = [file_id(p, root) for p in paths]
    names = classnames or [printable(c).replace("_", " ") for c in classes]
    identity = {"dataset": dataset, "root_classes_sha256": sha256_text("\n".join(classes)),
                "files_sha256": sha256_text("\n".join(ids))}
    # named after the folder (progress bars, cache folders); the cache keys on ``identity``
    name = f"{dataset}-{root.resolve().name}" if dataset == "imagefolder" else dataset
    return EvalDataset(name, paths, np.asarray(labels, dtype=np.int64), names,
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


# --- the Debian packages that anchors come from too --------------------------------

def _class_folders(dataset: str) -> dict[str, str]:
    """{category folder: class name} of a package-derived test set (asif/data/classnames.json)."""
    table = _data_json("classnames.json").get(dataset)
    if not isinstance(table, dict):
        raise DataError(f"no folder -> class table for {dataset!r} in asif/data/classnames.json")
    return {k: v for k, v in table.items() if not k.startswith("_")}


def _labelled_by_folder(dataset: str, source: str, root: Path, files: list[Path], images_of,
                        split: str = "test") -> EvalDataset:
    """Files labelled by their folder's first two levels, kept where that folder is in the class table;
    ``images_of(paths)`` gives their image sequence.

    ``split="validation"`` takes the table ``{dataset}-validation`` of classnames.json instead:
    other folders of the same package, for choosing defaults without a test item; the
    templates stay the dataset's own.
    """
    if split not in ("test", "validation"):
        raise DataError(f"{dataset} has splits 'test' and 'validation', not {split!r}")
    folders = _class_folders(dataset if split == "test" else f"{dataset}-validation")
    order = sorted(folders)
    paths, labels = [], []
    for p in files:
        category = "/".join(p.relative_to(root).parent.parts[:2])
        if category in folders:
            paths.append(p)
            labels.append(order.index(category))
    ids = [file_id(p, root) for p in paths]
    identity = {"dataset": dataset, "classes": folders, "files_sha256": sha256_text("\n".join(ids))}
    if split != "test":  # the test sets' cache keys stay as they were
        identity["split"] = split
    images = images_of(paths)
    return EvalDataset(dataset, images, np.asarray(labels, dtype=np.int64), [folders[c] for c in order],
                       load_templates(dataset), identity, ids,
                       keys=[debian.item_key(source, root, p) for p in paths])


def _tuxpaint_photos(size: int = 224, split: str = "test") -> EvalDataset:
    """TuxPaint stamps, mostly photo cut-outs, labelled by category folder (classnames.json has the rule)."""
    from asif.images import render_svg
    root = debian.tuxpaint_root()
    files = [s.image for s in debian.tuxpaint_stamps(root)
             if s.text.exists() and "cartoon" not in s.image.relative_to(root).parts]
    def images_of(paths):  # PNG stamps, and a few SVG
        return LazyImages(len(paths), lambda i: render_svg(paths[i], size) if paths[i].suffix == ".svg" else paths[i])
    return _labelled_by_folder("tuxpaint-photos", "tuxpaint", root, files, images_of, split)


def _clipart_objects(size: int = 224, split: str = "test") -> EvalDataset:
    """Openclipart drawings of things, labelled by category folder: a drawing domain held out of the anchors."""
    from asif.images import RenderedSVGs
    root = debian.openclipart_root()
    return _labelled_by_folder("clipart-objects", "clipart", root, debian.clipart_files(root),
                               lambda paths: RenderedSVGs(paths, size), split)


DATASETS = ("fashion-mnist", "tuxpaint-photos", "clipart-objects", "cifar10", "cifar100", "pets", "imagenet",
            "imagefolder:PATH")


def load_dataset(name: str, split: str = "test", limit: int | None = None, seed: int = 0) -> EvalDataset:
    """An evaluation dataset by name (see ``DATASETS``).

    ``limit`` takes a seeded random subset (``ASIF_SMOKE=1`` sets a small one);
    ``split`` is ``test`` or ``train`` where the dataset has both; the package sets
    ``tuxpaint-photos`` and ``clipart-objects`` have ``test`` and ``validation`` (other
    category folders of the same package, for choosing defaults).
    """
    limit = smoke_limit(limit)
    kind, _, arg = name.partition(":")
    if kind == "fashion-mnist":
        ds = fashion_mnist(split)
    elif kind == "tuxpaint-photos":
        ds = _tuxpaint_photos(split=split)
    elif kind == "clipart-objects":
        ds = _clipart_objects(split=split)
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
