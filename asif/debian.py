"""The Debian data packages: where their files lie, how they are listed, and how an item is named.

Anchor sources (asif.anchors) and test sets (asif.datasets) read the same
packages. An item has one key, ``"<source>:<path inside the package>"``, in
both, so that a test set and an anchor set from the same source can never
share an item unnoticed: the shared keys leave the anchors.

Each folder can be moved with an environment variable (``ASIF_OPENCLIPART_DIR``,
``ASIF_TUXPAINT_DIR``, ``ASIF_FASHION_MNIST_DIR``), e.g. for a copy of the data
on a machine without Debian.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from asif.errors import MissingDataError

__all__ = ["FASHION_MNIST_DIR", "OPENCLIPART_DIR", "TUXPAINT_DIR", "openclipart_root", "tuxpaint_root",
           "clipart_files", "Stamp", "tuxpaint_stamps", "item_key"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")   # dataset-fashion-mnist
OPENCLIPART_DIR = Path("/usr/share/openclipart/svg")             # openclipart-svg
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")                # tuxpaint-stamps-default


def _root(env: str, default: Path, what: str, package: str, root=None) -> Path:
    path = Path(root or os.environ.get(env) or default)
    if not path.is_dir():
        raise MissingDataError(f"{what} needs the Debian package {package} ({path} is missing). "
                               f"Install it: apt-get install {package}")
    return path


def openclipart_root(root=None) -> Path:
    return _root("ASIF_OPENCLIPART_DIR", OPENCLIPART_DIR, "clipart", "openclipart-svg", root)


def tuxpaint_root(root=None) -> Path:
    return _root("ASIF_TUXPAINT_DIR", TUXPAINT_DIR, "tuxpaint", "tuxpaint-stamps-default", root)


def clipart_files(root: Path) -> list[Path]:
    """Every drawing once: the package links many drawings into several category folders."""
    return sorted(p for p in root.rglob("*.svg") if not p.is_symlink() and p.is_file())


@dataclass
class Stamp:
    """A TuxPaint stamp: its image (a PNG, or the SVG when there is no PNG) and its description file."""
    image: Path
    text: Path


def tuxpaint_stamps(root: Path) -> list[Stamp]:
    """All stamps, sorted; a PNG beside an SVG is the same stamp and needs no rendering."""
    stems = sorted({p.with_suffix("") for p in root.rglob("*") if p.suffix in (".png", ".svg")})
    out = []
    for stem in stems:
        png = stem.with_suffix(".png")
        out.append(Stamp(png if png.exists() else stem.with_suffix(".svg"), stem.with_suffix(".txt")))
    return out


def item_key(source: str, root: Path, path: Path) -> str:
    """The name of a package item shared by anchors and test sets: ``source:relative/path``."""
    return f"{source}:{path.relative_to(root).as_posix()}"
