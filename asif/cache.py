"""The embed-once cache: every image and caption is encoded once per encoder, then read back.

A cached set is an embedding-set folder (asif.storage) under
``<cache>/embeddings/<name>/<kind>-<encoder>-<key>``, where the key is a
sha256 over everything that decides the vectors: the encoder's identity
(model, weights and their version, preprocessing), the modality, the data's
identity and item ids and, for text, the texts. A change in any of them
never serves old vectors. Shards of ``shard_rows`` rows are written
atomically as they finish, with a record in ``.progress/``, and inside a
shard every ``checkpoint_rows`` inputs are kept there too: a run that is
killed resumes from the work already done, even in its first shard. A
manifest that cannot be read (truncated, emptied) is rebuilt from the intact
shards. On a hit, a shard whose bytes no longer match its sha256 is
recomputed; shards unchanged in size and mtime since they were last hashed
are trusted (the policy in ``asif.storage``), and ``asif data verify``
hashes them all.

Also here, what the method consumes: aligned anchor embeddings
(``load_anchor_embeddings``) and evaluation embeddings with class-major
prompt embeddings (``load_eval_embeddings``).

Shapes: ``N`` anchors, ``Q`` test images, ``d1``/``d2`` image/text dims,
``C`` classes, ``T`` templates per class.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asif import storage
from asif.anchors import AnchorSet, CoupledData, load_anchor_set
from asif.config import cache_root, decode_threads, progress_bar, smoke_limit
from asif.datasets import EvalDataset, load_dataset
from asif.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from asif.errors import DataError, StorageError
from asif.images import load_many, subset_images
from asif.storage import EmbeddingSet, sha256_text

__all__ = ["cache_key", "embed_cached", "invalidate_damaged", "AnchorEmbeddings", "EvalEmbeddings",
           "load_anchor_embeddings", "load_eval_embeddings"]

CACHE_FORMAT = "asif-cache/1"


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
               "dataset": dataset, "ids": sha256_text("\n".join(ids))}
    if texts is not None:
        payload["texts"] = sha256_text(json.dumps(list(texts), ensure_ascii=False))
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _encode_images(encoder, items: Sequence, rows: Sequence[int], batch_size: int,
                   ids: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """Embed the images ``items[rows]`` -> (float32 [len(rows), dim], failed).

    An image that cannot be loaded leaves a zero row and an entry in
    ``failed``: the rows of the others stay where they are, so image i still
    pairs with caption i.
    """
    out = np.zeros((len(rows), encoder.dim), dtype=np.float32)
    failed, good, payload = [], [], []
    loaded = load_many(items, rows, ids, decode_threads())
    for k, (r, (image, error)) in enumerate(zip(rows, loaded)):
        if error is None:
            payload.append(image)
            good.append(k)
        else:
            failed.append({"row": int(r), "id": ids[r], "error": error})
    if payload:
        out[good] = _encode(encoder, payload, batch_size)
    return out, failed


def _encode(encoder, payload: list, batch_size: int) -> np.ndarray:
    vectors = np.asarray(encoder.encode(payload, batch_size=batch_size, progress=False), dtype=np.float32)
    if vectors.shape != (len(payload), encoder.dim):
        raise DataError(f"encoder {encoder.name} returned shape {vectors.shape} for {len(payload)} inputs; "
                        f"expected {(len(payload), encoder.dim)}")
    return vectors


def _record_path(folder: Path, i: int, chunk: int | None = None) -> Path:
    return folder / ".progress" / (f"{i:05d}.json" if chunk is None else f"{i:05d}.part-{chunk:05d}.json")


def _read_record(path: Path) -> dict | None:
    """A progress record or manifest, or None when it is missing or damaged (then the work is redone)."""
    try:
        record = storage.read_json(path)
    except (FileNotFoundError, StorageError):
        return None
    return record if isinstance(record, dict) else None


def _write_shard(folder: Path, i: int, block: np.ndarray, failed: list[dict]) -> dict:
    """Shard i and its progress record (written after it: a record means a complete shard)."""
    record = {"rows": len(block), "sha256": storage.atomic_save_npy(folder / storage.shard_name(i), block),
              "failed": failed}
    storage.atomic_write_json(_record_path(folder, i), record)
    for part in (folder / ".progress").glob(f"{i:05d}.part-*"):  # its checkpoints are no longer needed
        part.unlink(missing_ok=True)
    return record


def _finished_shard(folder: Path, i: int) -> dict | None:
    """The record of shard ``i`` if the shard is complete and intact, else None."""
    record = _read_record(_record_path(folder, i))
    if record is None or not storage.verify_shard(folder / storage.shard_name(i), record.get("sha256", "")):
        return None
    return record


def _checkpointed(folder: Path, i: int, c: int, start: int, n: int, compute) -> tuple[np.ndarray, list[dict]]:
    """Chunk ``c`` of shard ``i`` (``n`` payload items from ``start``): read back when a
    killed run finished it, else ``compute()``d and written, so that a run smaller
    than a shard resumes too."""
    record_path = _record_path(folder, i, c)
    vectors_path = record_path.with_suffix(".npy")
    record = _read_record(record_path)
    if record is not None and record.get("start") == start and record.get("items") == n \
            and storage.verify_shard(vectors_path, record.get("sha256", "")):
        return np.load(vectors_path), record["failed"]
    vectors, failed = compute()
    sha = storage.atomic_save_npy(vectors_path, vectors)
    storage.atomic_write_json(record_path, {"start": start, "items": n, "sha256": sha, "failed": failed})
    return vectors, failed


def _encode_shard(folder: Path, i: int, encoder, kind: str, items: Sequence, rows: range, ids: Sequence[str],
                  batch_size: int, checkpoint_rows: int, bar=None) -> tuple[np.ndarray, list[dict]]:
    """Shard ``i`` (``items[rows]``) -> (float32 [len(rows), dim], failed), in chunks of
    ``checkpoint_rows`` inputs, each kept in ``.progress/`` until the shard is written."""
    if kind == "text":
        # Captions made from labels repeat a few sentences thousands of times:
        # each distinct text is embedded once and copied to every row holding it.
        first: dict[str, int] = {}
        inverse = np.array([first.setdefault(items[r], len(first)) for r in rows], dtype=np.int64)
        payload = list(first)
    else:
        payload = list(rows)
    parts, failed = [], []
    for c, start in enumerate(range(0, len(payload), checkpoint_rows)):
        chunk = payload[start:start + checkpoint_rows]
        if kind == "text":
            def compute():
                return _encode(encoder, chunk, batch_size), []
        else:
            def compute():
                return _encode_images(encoder, items, chunk, batch_size, ids)
        if len(payload) <= checkpoint_rows:  # one chunk: the shard itself is the checkpoint
            vectors, chunk_failed = compute()
        else:
            vectors, chunk_failed = _checkpointed(folder, i, c, start, len(chunk), compute)
        parts.append(vectors)
        failed += chunk_failed
        if bar is not None and kind == "image":
            bar.update(len(chunk))
    if bar is not None and kind == "text":
        bar.update(len(rows))
    block = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return (block[inverse] if kind == "text" else block), failed


def _check_texts(items: Sequence, ids: Sequence[str], name: str) -> None:
    bad = [r for r in range(len(items)) if not isinstance(items[r], str)]
    if bad:  # str(None) would embed the word "None"
        raise DataError(f"{name}: {len(bad)} of {len(items)} texts are not strings (item {ids[bad[0]]!r} is "
                        f"{type(items[bad[0]]).__name__}); give every item a text, or leave it out")


def _set_folder(encoder, kind: str, dataset: dict, ids: Sequence[str], items: Sequence, name: str,
                root) -> tuple[Path, str]:
    """(folder, cache key) of the embedding set of these items."""
    key = cache_key(encoder, kind, dataset, ids, items if kind == "text" else None)
    leaf = f"{kind}-{storage.slug(encoder.name)}-{key[:16]}"
    return cache_root(root) / "embeddings" / storage.slug(name) / leaf, key


def _is_cached(encoder, kind: str, dataset: dict, ids: Sequence[str], items: Sequence, name: str, root) -> bool:
    """Whether a complete embedding set of these items is in the cache (its manifest has the key)."""
    folder, key = _set_folder(encoder, kind, dataset, ids, items, name, root)
    manifest = _read_record(folder / "manifest.json")
    return manifest is not None and manifest.get("cache_key") == key


def embed_cached(encoder, items: Sequence, *, kind: str, dataset: dict, ids: Sequence[str],
                 name: str = "data", root: str | os.PathLike | None = None, shard_rows: int = 4096,
                 batch_size: int = 64, progress: bool = True, verify: bool = True,
                 captions: Sequence[str] | None = None, labels: np.ndarray | None = None,
                 checkpoint_rows: int = 512, former_names: Sequence[str] = (), engine=None) -> EmbeddingSet:
    """Embed ``items`` (images: PIL/paths/bytes; text: strings) into a cached embedding set.

    Returns the set: ``array`` float32 [n, encoder.dim] (memory-mapped);
    unreadable images are zero rows listed under ``manifest["failed"]``
    (``ok`` is False there). ``verify`` checks the shards on a cache hit and
    recomputes any that no longer match. Work is kept every
    ``checkpoint_rows`` inputs, so a killed run loses at most that much.
    ``former_names``: names this set was cached under before; a complete set
    with the same key found there is moved to ``name``. ``engine``: who
    embeds the missing shards; None here, in this process, or an
    ``asif.distributed.RayEngine`` (a Ray cluster). Either way the shards are
    written here, by this process, as they finish: the same folder, byte for
    byte.
    """
    if kind not in ("image", "text"):
        raise DataError(f"kind must be 'image' or 'text', not {kind!r}")
    n = len(items)
    if len(ids) != n:
        raise DataError(f"{len(ids)} ids for {n} items; give one id per item")
    if n == 0:
        raise DataError(f"{name}: nothing to embed")
    if kind == "text":
        _check_texts(items, ids, name)
    folder, key = _set_folder(encoder, kind, dataset, ids, items, name, root)
    _adopt_former(folder, [folder.parent.parent / storage.slug(n) / folder.name for n in former_names], key)
    starts = list(range(0, n, shard_rows))
    manifest_path = folder / "manifest.json"
    # a manifest that cannot be read (truncated, emptied) is rebuilt from the shards that are intact
    manifest = _read_record(manifest_path)
    if manifest is not None and manifest.get("cache_key") == key:
        if verify:
            _repair(folder, manifest, encoder, kind, items, ids, batch_size, checkpoint_rows)
        return storage.load_embedding_set(folder)
    storage.make_folder(folder)
    records = {i: _finished_shard(folder, i) for i in range(len(starts))}
    done = sum(min(shard_rows, n - s) for i, s in enumerate(starts) if records[i])
    with progress_bar(n, f"embed {name} {kind}s ({encoder.name})", progress, initial=done) as bar:
        todo = [(i, start, min(start + shard_rows, n)) for i, start in enumerate(starts) if not records[i]]
        if engine is None:
            for i, start, stop in todo:
                block, failed = _encode_shard(folder, i, encoder, kind, items, range(start, stop), ids, batch_size,
                                              checkpoint_rows, bar)
                records[i] = _write_shard(folder, i, block, failed)
        else:
            for i, block, failed in engine.encode_shards(todo, folder=folder, encoder=encoder, kind=kind, items=items,
                                                         ids=ids, batch_size=batch_size,
                                                         checkpoint_rows=checkpoint_rows):
                records[i] = _write_shard(folder, i, block, failed)
                bar.update(len(block))
    manifest = {
        "format": storage.EMBEDDING_SET_FORMAT, "cache_format": CACHE_FORMAT, "cache_key": key, "kind": kind,
        "encoder": _encoder_identity(encoder), "dataset": dataset, "name": name,
        "count": n, "dim": int(encoder.dim), "dtype": "float32", "shard_rows": shard_rows,
        "shards": [{"file": storage.shard_name(i), "rows": records[i]["rows"], "sha256": records[i]["sha256"]}
                   for i in range(len(starts))],
        "failed": [f for i in range(len(starts)) for f in records[i]["failed"]],
        "ids_sha256": sha256_text("\n".join(ids)),
    }
    if captions is not None or kind == "text":
        storage.write_captions(folder / "captions.jsonl", captions if captions is not None else items, ids)
    if labels is not None:
        storage.atomic_save_npy(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    storage.atomic_write_json(manifest_path, manifest)  # last: a folder with a manifest is complete
    verified = storage.VerifiedShards(folder)  # every shard was hashed just now: the next hit need not
    for shard in manifest["shards"]:
        verified.record(folder / shard["file"], shard["sha256"])
    verified.save()
    return storage.load_embedding_set(folder)


def _adopt_former(folder: Path, former: Sequence[Path], key: str) -> None:
    """Move a complete set with this ``key`` from a former folder to ``folder`` (unless it exists)."""
    if folder.exists():
        return
    for old in former:
        manifest = _read_record(old / "manifest.json")
        if old != folder and manifest is not None and manifest.get("cache_key") == key:
            storage.make_folder(folder.parent)
            os.replace(old, folder)
            return


def _repair(folder: Path, manifest: dict, encoder, kind: str, items, ids, batch_size: int,
            checkpoint_rows: int) -> None:
    """Cache hit: recompute any shard whose file is missing or whose sha256 no longer matches."""
    verified = storage.VerifiedShards(folder)
    changed = False
    for i, shard in enumerate(manifest["shards"]):
        path = folder / shard["file"]
        if storage.verify_shard(path, shard["sha256"], verified):
            continue
        start = i * manifest["shard_rows"]
        rows = range(start, start + shard["rows"])
        block, failed = _encode_shard(folder, i, encoder, kind, items, rows, ids, batch_size, checkpoint_rows)
        old = [f for f in manifest["failed"] if not start <= f["row"] < start + shard["rows"]]
        manifest["failed"] = sorted(old + failed, key=lambda f: f["row"])
        shard["sha256"] = _write_shard(folder, i, block, failed)["sha256"]
        verified.record(path, shard["sha256"])
        changed = True
    if changed:
        storage.atomic_write_json(folder / "manifest.json", manifest)
    verified.save()


def invalidate_damaged(folder: Path, damaged: list[str]) -> None:
    """After ``storage.verify_folder``: remove the damaged shards of a cached set (and a
    manifest that cannot be read), so that its next use recomputes them, and only them."""
    for name in damaged:
        (folder / name).unlink(missing_ok=True)
        if name.startswith("embeddings-"):
            _record_path(folder, int(name[len("embeddings-"):-len(".npy")])).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# what the method consumes
# ---------------------------------------------------------------------------

def encoder_of(encoder, modality: str):
    """An encoder object from a name (``modality`` "image" or "text"; the packaged ones load their
    weights only when something must be embedded) or an encoder (as is)."""
    if not isinstance(encoder, str):
        return encoder
    from asif import encoders
    return (encoders.lazy_image_encoder if modality == "image" else encoders.lazy_text_encoder)(encoder)


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

    @property
    def sources(self) -> np.ndarray:
        """int [N]: the part (source) of the anchor set each row comes from."""
        return self.anchor_set.order[self.index, 0]

    @property
    def source_names(self) -> list[str]:
        return [p.name for p in self.anchor_set.parts]


def _part_embeddings(part: CoupledData, rows: np.ndarray, encoder, kind: str, root, progress, batch_size,
                     engine=None):
    """Embeddings of ``part`` rows ``rows`` (sorted unique) -> (array [len(rows), d], ok [len(rows)], failed).

    The whole part is embedded (and cached once for every use) when at
    least half of it is asked for, or read from the cache when it is there
    already; a few rows of a large part (a small ``limit``) are embedded
    alone, so that a smoke run stays cheap.
    """
    whole = 2 * len(rows) >= len(part) or _is_cached(
        encoder, kind, part.identity, part.ids, part.captions if kind == "text" else part.images, part.name, root)
    ids = part.ids if whole else [part.ids[j] for j in rows]
    identity = part.identity if whole else dict(part.identity, rows=sha256_text(",".join(map(str, rows))))
    if kind == "image":
        items = part.images if whole else subset_images(part.images, rows)
        captions = part.captions if whole else [part.captions[j] for j in rows]
    else:
        items = part.captions if whole else [part.captions[j] for j in rows]
        captions = None
    emb = embed_cached(encoder, items, kind=kind, dataset=identity, ids=ids, name=part.name, root=root,
                       progress=progress, batch_size=batch_size, captions=captions, engine=engine)
    failed = emb.manifest.get("failed", [])
    if not whole:  # the cached rows are the asked ones, in order
        return np.asarray(emb.array), emb.ok, failed
    if len(rows) == len(part):
        return np.asarray(emb.array), emb.ok, failed
    asked = set(rows.tolist())
    return np.asarray(emb.array[rows[0]:rows[-1] + 1])[rows - rows[0]], emb.ok[rows], \
        [f for f in failed if f["row"] in asked]


def load_anchor_embeddings(anchor_set: str | AnchorSet, image_encoder=DEFAULT_IMAGE_ENCODER,
                           text_encoder=DEFAULT_TEXT_ENCODER, limit: int | None = None, seed: int = 0,
                           root=None, progress: bool = True, batch_size: int = 64,
                           exclude=None, engine=None) -> AnchorEmbeddings:
    """Aligned anchor embeddings for an anchor set (name or object) and two encoders
    (names or encoder objects), embedding through the cache what is not there yet.

    ``exclude``: item keys of the test set (EvalDataset.keys); pairs holding
    those items leave the anchors before ``limit`` is applied
    (``anchor_set.removed`` counts them). ``engine``: where missing shards
    are embedded (None: here; ``asif.distributed.RayEngine``: a Ray cluster).
    Returns ``A_img`` float32 [N, d1], ``A_txt`` float32 [N, d2] in the set's
    seeded order, minus pairs whose image failed (dropped from both)."""
    if isinstance(anchor_set, str):
        anchor_set = load_anchor_set(anchor_set, limit, seed, exclude=exclude)
    else:
        anchor_set = anchor_set.without(exclude).head(smoke_limit(limit))
    image_encoder, text_encoder = encoder_of(image_encoder, "image"), encoder_of(text_encoder, "text")
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
        img, img_ok, failed = _part_embeddings(part, uniq, image_encoder, "image", root, progress, batch_size, engine)
        txt, _, _ = _part_embeddings(part, uniq, text_encoder, "text", root, progress, batch_size, engine)
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
    image_encoder, text_encoder = encoder_of(image_encoder, "image"), encoder_of(text_encoder, "text")
    split = dataset.identity.get("split")
    # Image folders used to be cached under the loader's name alone ("imagefolder-"):
    # a set found there moves to the folder's own name; the keys never changed.
    loader = dataset.identity.get("dataset", dataset.name)
    emb = embed_cached(image_encoder, dataset.images, kind="image", dataset=dataset.identity, ids=dataset.ids,
                       name=f"{dataset.name}-{split}" if split else dataset.name, root=root, progress=progress,
                       batch_size=batch_size, labels=dataset.labels, former_names=[f"{loader}-{split or ''}"])
    prompts = dataset.prompts()
    pemb = embed_cached(text_encoder, prompts, kind="text", ids=[f"prompt/{i}" for i in range(len(prompts))],
                        dataset={"prompts": loader, "classnames": dataset.classnames, "templates": dataset.templates},
                        name=f"{dataset.name}-prompts", root=root, progress=False, batch_size=batch_size,
                        former_names=[f"{loader}-prompts"])
    ok = emb.ok
    return EvalEmbeddings(np.asarray(emb.array)[ok], dataset.labels[ok], np.asarray(pemb.array),
                          dataset.classnames, dataset.templates, dataset, emb.manifest.get("failed", []))
