"""ASIF: coupled data turns unimodal models to multimodal without training.

Norelli et al., NeurIPS 2023 (arXiv 2210.01738). This module is the method and
nothing else: numpy and torch only, no encoders, no datasets. It follows the
order of the design's "The method, exactly":

  0. device, dtype and block size
  1. validation and L2 normalisation of anchors and queries
  2. relative representations: similarity to the anchors streamed in blocks,
     exact running top-k (``non_zeros``), negatives counted as 0, raised to
     the ``exponent``, L2-normalised
  3. image-text similarity and zero-shot classification
  4. the accuracy-vs-anchors sweep (paper Fig. 5) in one pass over the anchors
  5. retrieval with recall@k
  6. explanations: the anchors that make a score
  7. the model: anchors that can be added and removed, saved and loaded

Shapes in docstrings: ``Q`` queries, ``N`` anchors, ``d`` embedding dim,
``k`` non_zeros, ``C`` classes, ``T`` templates per class, ``P = C*T`` prompts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "ASIFInputError", "pick_device", "resolve_dtype", "choose_block_size",
    "check_embeddings", "check_anchors", "normalize",
    "TopK", "RelativeRepresentation", "top_k_similarities", "sharpen",
    "relative_representation", "similarity", "class_scores", "classify",
    "classification_metrics", "sweep", "zero_shot_result", "retrieval_metrics", "explain", "ASIF",
    "sha256_file", "atomic_write", "atomic_save_npy", "atomic_write_json", "ShardedArray",
    "save_embedding_set", "load_embedding_set", "synthetic_coupled_data",
]


class ASIFInputError(ValueError):
    """Bad input: the message names the argument, what is wrong and the fix."""


# ---------------------------------------------------------------------------
# Storage: the design's folder format (manifest.json + .npy shards), atomic.
# Everything else in this project that writes embeddings uses these helpers.
# ---------------------------------------------------------------------------

EMBEDDING_SET_FORMAT = "asif-embeddings/1"
ANCHOR_SET_FORMAT = "asif-anchors/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (files may be larger than RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    # A temporary file in the same folder, fsynced, then renamed over the
    # target: a reader (or an interrupted job) sees the old file or the new
    # one, never half of one.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file that then replaces ``path``."""
    _atomic_write(Path(path), write)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` as .npy atomically; return its sha256."""
    _atomic_write(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
    return sha256_file(path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


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
    """An embedding set folder loaded: ``array`` [count, dim] (memory-mapped) and its manifest."""
    folder: Path
    array: np.ndarray | ShardedArray
    manifest: dict

    @property
    def captions(self) -> list[str] | None:
        path = self.folder / "captions.jsonl"
        if not path.exists():
            return None
        with open(path) as f:
            return [json.loads(line)["caption"] for line in f if line.strip()]

    @property
    def labels(self) -> np.ndarray | None:
        path = self.folder / "labels.npy"
        return np.load(path) if path.exists() else None


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
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        name = f"embeddings-{i:05d}.npy"
        block = np.asarray(array[start:start + shard_rows])
        shards.append({"file": name, "rows": int(len(block)), "sha256": atomic_save_npy(folder / name, block)})
    if captions is not None:
        text = "".join(json.dumps({"caption": c}, ensure_ascii=False) + "\n" for c in captions).encode()
        _atomic_write(folder / "captions.jsonl", lambda f: f.write(text))
    if labels is not None:
        atomic_save_npy(folder / "labels.npy", np.asarray(labels))
    manifest = {
        "format": EMBEDDING_SET_FORMAT,
        **(meta or {}),
        "count": int(n),
        "dim": int(dim),
        "dtype": str(np.dtype(array.dtype)),
        "shards": shards,
    }
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
    manifest = json.loads(path.read_text())
    arrays = []
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.exists():
            raise ASIFInputError(f"{folder}: shard {shard['file']} is missing; rebuild the embedding set")
        if verify and sha256_file(file) != shard["sha256"]:
            raise ASIFInputError(f"{folder}: shard {shard['file']} does not match its sha256; it is corrupt, rebuild it")
        arrays.append(np.load(file, mmap_mode="r"))
    array = arrays[0] if len(arrays) == 1 else ShardedArray(arrays)
    if array.shape != (manifest["count"], manifest["dim"]):
        raise ASIFInputError(f"{folder}: shards hold {array.shape}, manifest says {(manifest['count'], manifest['dim'])}; rebuild it")
    return EmbeddingSet(folder, array, manifest)


# ---------------------------------------------------------------------------
# 0. Device, dtype and block size
# ---------------------------------------------------------------------------

def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ASIFInputError(f"device={device!r}: CUDA is not available on this machine; use device='cpu' or 'auto'")
    return dev


_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32, "float": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Compute dtype of the similarity products.

    Default: float16 on CUDA (the products are the whole cost and half
    precision doubles their speed there), float32 on the CPU, where half
    precision matrix products are slow. float64 is allowed for reference runs.
    """
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ASIFInputError(f"dtype={dtype!r} is unknown; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype in (torch.float16, torch.bfloat16) and device.type != "cuda":
        raise ASIFInputError(f"dtype={dtype} is for CUDA; on the CPU use float32 (the default)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ASIFInputError(f"dtype={dtype} is not a floating dtype ASIF computes in; use float32 or, on CUDA, float16/bfloat16")
    return dtype


DEFAULT_RAM_BUDGET = 512 * 2**20  # bytes for one block's temporaries on the CPU


def choose_block_size(n_query_rows: int, dim: int, device: torch.device, dtype: torch.dtype,
                      memory_budget: int | None = None, max_block: int = 32768) -> int:
    """Anchors per block so that one block's temporaries fit the memory budget.

    Per anchor row a block holds the anchor itself (``dim`` values, plus a
    float32 staging copy when read from a float16 memmap) and one similarity
    per query row. The budget is half the free CUDA memory on a GPU, else
    ``memory_budget`` bytes (default 512 MiB). Above ~32k rows a larger block
    buys no speed on a CPU, only memory; on a GPU a block is also held in
    host memory on its way there, so it stays within 512 MiB of host RAM.
    """
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = free // 2
        else:
            memory_budget = DEFAULT_RAM_BUDGET
    if device.type == "cuda":
        # Each block also passes through host memory on its way to the GPU (2 bytes a value
        # from a float16 memmap, 4 from float32): keep that within the CPU's RAM budget too,
        # or a 1M-anchor block would stage gigabytes on a host smaller than its GPU.
        max_block = max(1, min(1 << 20, DEFAULT_RAM_BUDGET // (4 * dim)))
    item = torch.finfo(dtype).bits // 8
    per_row = item * (n_query_rows + dim) + 4 * dim + 1  # +1: the candidate mask
    return int(max(1, min(max_block, memory_budget // per_row)))


# ---------------------------------------------------------------------------
# 1. Validation and normalisation
# ---------------------------------------------------------------------------

def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_embeddings(x, name: str, dim: int | None = None, full_scan: bool = True) -> None:
    """Raise ASIFInputError unless ``x`` is [rows, dim], non-empty, finite, no all-zero row.

    ``full_scan=False`` checks only the shape; the values of a large memmap
    are then checked block by block while they are streamed.
    """
    shape = _shape(x)
    if len(shape) != 2:
        raise ASIFInputError(f"{name}: expected a 2-D array [rows, dim], got shape {shape}; "
                             f"stack the embeddings into one matrix (a single vector needs x[None, :])")
    if shape[0] == 0 or shape[1] == 0:
        raise ASIFInputError(f"{name}: empty array of shape {shape}; give at least one row")
    if dim is not None and shape[1] != dim:
        raise ASIFInputError(f"{name}: has dim {shape[1]} but {dim} was expected; "
                             f"queries must come from the same encoder as the anchors of that modality")
    if full_scan:
        _check_values(x if torch.is_tensor(x) else np.asarray(x), name, 0)


def _check_values(block, name: str, offset: int) -> None:
    if torch.is_tensor(block):
        block = block.detach().cpu().numpy()
    block = np.asarray(block)
    if not np.issubdtype(block.dtype, np.floating):
        raise ASIFInputError(f"{name}: dtype {block.dtype} is not floating point; pass float embeddings")
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0]) + offset
        raise ASIFInputError(f"{name}: row {row} holds NaN or inf; re-encode that item or drop it")
    zero = ~block.any(axis=1)
    if zero.any():
        row = int(np.flatnonzero(zero)[0]) + offset
        raise ASIFInputError(f"{name}: row {row} is all zeros and has no direction; drop it (a failed encoding?)")


def check_anchors(anchor_images, anchor_texts, full_scan: bool = True) -> None:
    """Anchors are coupled: row i of both modalities comes from the same image-caption pair."""
    check_embeddings(anchor_images, "anchor_images", full_scan=full_scan)
    check_embeddings(anchor_texts, "anchor_texts", full_scan=full_scan)
    ni, nt = _shape(anchor_images)[0], _shape(anchor_texts)[0]
    if ni != nt:
        raise ASIFInputError(f"anchor_images has {ni} rows but anchor_texts has {nt}; anchors are coupled pairs, "
                             f"row i of both must come from the same image-caption pair")


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero. ``x: [rows, dim]``."""
    norm = torch.linalg.vector_norm(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1, keepdim=True)
    return x / norm.clamp_min(eps).to(x.dtype)


def _is_in_memory(x) -> bool:
    return torch.is_tensor(x) or (isinstance(x, np.ndarray) and not isinstance(x, np.memmap))


# ---------------------------------------------------------------------------
# 2. Relative representations
# ---------------------------------------------------------------------------

@dataclass
class TopK:
    """The exact top-k cosine similarities of each query to the anchors.

    values: [Q, k'] similarity (negatives counted as 0), float32
    indices: [Q, k'] int64 anchor index
    n_anchors: N, the number of anchors searched; k' = min(k, N).
    Ties are broken towards the lower anchor index, so a prefix of the
    anchors always gives the same answer as if only that prefix existed.
    """
    values: torch.Tensor
    indices: torch.Tensor
    n_anchors: int


@dataclass
class RelativeRepresentation:
    """Sparse relative representations r(x) over N anchors.

    indices: [Q, k'] int64; values: [Q, k'] float32, each row of unit L2 norm
    (or all zero when no anchor has a positive similarity).
    """
    indices: torch.Tensor
    values: torch.Tensor
    n_anchors: int

    @property
    def n_queries(self) -> int:
        return int(self.indices.shape[0])

    def to_dense(self) -> torch.Tensor:
        """[Q, N] dense float32."""
        out = torch.zeros(self.n_queries, self.n_anchors, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)


class _RunningTopK:
    """Top-k of one query matrix over anchors that arrive in blocks, in order.

    The cost that matters is the matrix product; selection must stay small
    beside it. Once k anchors are held, only block entries above a row's
    k-th value can enter (a later anchor that ties loses to the earlier
    one), and after a few blocks those are a handful per row. They are
    collected block after block against that threshold (it only rises, so a
    stale one lets through more, never too few) and merged into the top-k
    when they add up to about k per row, or when an exact state is needed.
    """

    def __init__(self, queries: torch.Tensor, k: int):
        self.queries = queries            # [Q, d] normalised, compute dtype
        self.k = k
        self.values = queries.new_zeros((queries.shape[0], 0))
        self.indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
        self.threshold = None             # [Q, 1] k-th value at the last merge
        self.pending = []                 # [(rows, slots, anchor indices, values)] above threshold
        self.n_pending = 0
        self.row_fill = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        self._buffer = None
        self.seen = 0

    def update(self, block: torch.Tensor) -> None:
        """block: [b, d] normalised anchors that follow the ones seen so far."""
        q, b = self.queries.shape[0], block.shape[0]
        if self._buffer is None or self._buffer.numel() < q * b:
            self._buffer = self.queries.new_empty(q * b)
        # The product goes into one reused buffer: a fresh multi-100 MB tensor
        # per block costs its page faults again every time (~10% of the product).
        sims = torch.mm(self.queries, block.T, out=self._buffer[:q * b].view(q, b))  # [Q, b], the expensive step
        offset = self.seen
        self.seen += b
        if self.values.shape[1] < self.k:
            # Still filling: every anchor is a candidate (negatives count as 0).
            sims.clamp_(min=0)
            cand_v = torch.cat([self.values, sims], dim=1)
            cand_i = torch.cat([self.indices, torch.arange(offset, offset + b, device=sims.device).expand(sims.shape[0], b)], dim=1)
            self._select(cand_v, cand_i)
            return
        mask = sims > self.threshold
        if sims.device.type == "cpu":
            # numpy finds the few set entries of a large mask several times faster than torch
            flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
        else:
            flat = mask.view(-1).nonzero().squeeze(1)
        if flat.numel():
            rows = flat // b  # row-major: grouped by row, anchor order kept within a row
            counts = torch.bincount(rows, minlength=sims.shape[0])
            # each entry's slot in its row's padded candidate list, after the pending ones
            slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
            slot += self.row_fill[rows]
            self.row_fill += counts
            self.pending.append((rows, slot, flat % b + offset, sims.view(-1)[flat]))
            self.n_pending += flat.numel()
            if self.n_pending > self.k * sims.shape[0]:
                self.merge()

    def merge(self) -> None:
        """Fold the pending candidates into the top-k; the state is then exact."""
        if not self.pending:
            return
        rows, slot, idx, vals = (torch.cat(x) for x in zip(*self.pending))
        width = int(self.row_fill.max())
        self.pending, self.n_pending = [], 0
        self.row_fill.zero_()
        q = self.values.shape[0]
        # Padding -1 is below every real (clamped) value: never selected.
        pad_v = self.values.new_full((q, width), -1.0)
        pad_i = torch.zeros((q, width), dtype=torch.long, device=rows.device)
        pad_v[rows, slot] = vals
        pad_i[rows, slot] = idx
        self._select(torch.cat([self.values, pad_v], dim=1), torch.cat([self.indices, pad_i], dim=1))

    def _select(self, cand_v: torch.Tensor, cand_i: torch.Tensor) -> None:
        """Keep the k best of the candidates, ties to the lower anchor index."""
        k = min(self.k, cand_v.shape[1])
        if k == cand_v.shape[1]:
            self.values, self.indices = cand_v, cand_i
        else:
            v, pos = torch.topk(cand_v, k, dim=1, sorted=False)
            idx = cand_i.gather(1, pos)
            # torch.topk breaks ties arbitrarily. A row is wrong only if a
            # candidate equal to its k-th value was left out, i.e. if more
            # than k candidates reach that value; redo those rows with a
            # stable sort on (-value, index). Zero values are interchangeable
            # (they add nothing to r), so ties at 0 need no repair.
            kth = v.min(dim=1, keepdim=True).values
            if cand_v.device.type == "cpu":
                reach = torch.from_numpy(np.count_nonzero((cand_v >= kth).numpy(), axis=1))
            else:
                reach = (cand_v >= kth).sum(dim=1)
            bad = ((reach > k) & (kth.squeeze(1) > 0)).nonzero().squeeze(1)
            if bad.numel():
                bv, bi = cand_v[bad], cand_i[bad]
                order = torch.argsort(bi, dim=1, stable=True)
                bv, bi = bv.gather(1, order), bi.gather(1, order)
                order = torch.argsort(-bv, dim=1, stable=True)[:, :k]
                v[bad], idx[bad] = bv.gather(1, order), bi.gather(1, order)
            self.values, self.indices = v, idx
        if self.values.shape[1] == self.k:
            self.threshold = self.values.min(dim=1, keepdim=True).values

    def snapshot(self) -> TopK:
        self.merge()
        v = self.values if self.values.dtype == torch.float64 else self.values.float()
        return TopK(v.clone(), self.indices.clone(), self.seen)


def _anchor_blocks(anchors, bounds: Sequence[int], block_size: int, device: torch.device,
                   dtype: torch.dtype, name: str, first_block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (end, normalised block [b, d]) over anchors[0:bounds[-1]].

    Blocks never straddle a bound, so a running state is exact at each one.
    Values are checked block by block: a memmap larger than RAM is read
    once, never whole.
    """
    start = 0
    for stop in bounds:
        while start < stop:
            # Blocks grow from first_block to block_size, each at most as large
            # as what came before it: a young threshold lets many entries
            # through, so the block it filters is kept small.
            size = block_size if not first_block else min(block_size, max(first_block, start))
            end = min(stop, start + size)
            yield end, _normalized_block(anchors[start:end], device, dtype, name, start)
            start = end


def _normalized_block(raw, device: torch.device, dtype: torch.dtype, name: str, offset: int) -> torch.Tensor:
    """Rows (a block of anchors, or the queries) as a normalised tensor; the row norms double as the check.

    A NaN/inf row has a non-finite norm and an all-zero row a zero norm, so
    one pass finds both without a separate scan of the (maybe huge) anchors.
    """
    t = torch.from_numpy(np.array(raw, copy=not (isinstance(raw, np.ndarray) and raw.flags.writeable
                                                   and raw.flags.c_contiguous))) if not torch.is_tensor(raw) else raw
    if not t.is_floating_point():
        raise ASIFInputError(f"{name}: dtype {t.dtype} is not floating point; pass float embeddings")
    # moved as stored (half the bytes from a float16 memmap), converted where it is computed on
    t = t.to(device=device).to(torch.float64 if dtype == torch.float64 else torch.float32)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        _check_values(raw, name, offset)  # names the row and the fault
        raise ASIFInputError(f"{name}: a row near {offset} has values too large to normalise; rescale the embeddings")
    return (t / norms).to(dtype)


def _validate_sizes(n_anchors: int, sizes: Iterable[int] | None) -> list[int]:
    if sizes is None:
        return [n_anchors]
    sizes = sorted({int(n) for n in sizes})
    if not sizes:
        raise ASIFInputError("n_anchors: empty list; give at least one anchor count")
    if sizes[0] < 1 or sizes[-1] > n_anchors:
        raise ASIFInputError(f"n_anchors: counts must lie in 1..{n_anchors} (the anchors available), got {sizes}")
    return sizes


def _check_k(non_zeros) -> int:
    if isinstance(non_zeros, bool) or not isinstance(non_zeros, (int, np.integer)) or non_zeros < 1:
        raise ASIFInputError(f"non_zeros={non_zeros!r}: must be a positive integer (the paper uses 800)")
    return int(non_zeros)


def _check_exponent(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not math.isfinite(p) or p <= 0:
        raise ASIFInputError(f"exponent={p!r}: must be a positive number (the paper uses 8)")
    return float(p)


def top_k_similarities(queries, anchors, non_zeros: int = 800, *, n_anchors: Sequence[int] | None = None,
                       block_size: int | None = None, device="auto", dtype=None,
                       memory_budget: int | None = None, progress: bool = False) -> list[TopK]:
    """Exact top-``non_zeros`` similarities of each query to the anchors, streamed.

    queries: [Q, d]; anchors: [N, d] (array, tensor, memmap or ShardedArray).
    n_anchors: anchor counts to snapshot at (default [N]); one TopK per count,
    each exactly as if only the first n anchors existed, all in one pass.
    """
    k = _check_k(non_zeros)
    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    check_embeddings(anchors, "anchors", full_scan=False)
    check_embeddings(queries, "queries", dim=_shape(anchors)[1], full_scan=False)  # values: when normalised
    sizes = _validate_sizes(_shape(anchors)[0], n_anchors)
    return _stream([(anchors, "anchors", _normalized_block(queries, dev, dt, "queries", 0))], k, sizes, block_size, dev, dt,
                   memory_budget, progress)[0]


def _stream(jobs, k, sizes, block_size, dev, dt, memory_budget, progress):
    """One pass over coupled anchor arrays, a running top-k per job.

    jobs: [(anchors [N, d_j], name, queries [Q_j, d_j] normalised)], all
    anchors with the same N (row i of each is the same pair). Returns
    [[TopK per size] per job].
    """
    rows = sum(q.shape[0] for _, _, q in jobs)
    dim = sum(_shape(a)[1] for a, _, _ in jobs)
    bs = block_size or choose_block_size(rows, dim, dev, dt, memory_budget)
    runners = [_RunningTopK(q, k) for _, _, q in jobs]
    # The first block is scanned whole (nothing to compare with yet), so keep
    # it small; later blocks only pass on entries above the running k-th value.
    first = block_size or min(bs, max(4 * k, 4096))
    streams = [_anchor_blocks(a, sizes, bs, dev, dt, name, first) for a, name, _ in jobs]
    out = [[] for _ in runners]
    bar = _progress(sizes[-1], progress, "anchors")
    pending = list(sizes)
    for blocks in zip(*streams):
        for r, (end, block) in zip(runners, blocks):
            r.update(block)
        end = blocks[0][0]
        bar.update(blocks[0][1].shape[0])
        if end == pending[0]:
            for r, o in zip(runners, out):
                o.append(r.snapshot())
            pending.pop(0)
    bar.close()
    return out


def _progress(total, enabled, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit="anchor", unit_scale=True, leave=False)


def sharpen(top: TopK, exponent: float = 8.0) -> RelativeRepresentation:
    """Raise the kept similarities to ``exponent`` and L2-normalise: r(x)."""
    p = _check_exponent(exponent)
    v = top.values.double() if top.values.dtype == torch.float64 else top.values.float()
    v = v.clamp_min(0).pow(p)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    return RelativeRepresentation(top.indices, v, top.n_anchors)


def relative_representation(queries, anchors, non_zeros: int = 800, exponent: float = 8.0, *,
                            block_size: int | None = None, device="auto", dtype=None,
                            memory_budget: int | None = None, progress: bool = False) -> RelativeRepresentation:
    """r(x) for each query: sparse, ``non_zeros`` entries, sharpened by ``exponent``, unit norm.

    queries: [Q, d]; anchors: [N, d] of the same modality and encoder.
    Returns indices and values of shape [Q, min(non_zeros, N)].
    """
    top, = top_k_similarities(queries, anchors, non_zeros, block_size=block_size, device=device,
                              dtype=dtype, memory_budget=memory_budget, progress=progress)
    return sharpen(top, exponent)


# ---------------------------------------------------------------------------
# 3. Image-text similarity and zero-shot classification
# ---------------------------------------------------------------------------

# A sparse accumulation costs about this many dense (BLAS) multiply-adds on
# the CPU; used to choose between the two ways of computing <r(x), r(t)>.
SPARSE_OP_COST = 25.0
# A sparse product also costs about this many sparse ops per output entry.
SPARSE_FLOOR = 1.0
# Writing one entry of a dense copy (zero fill + scatter), in sparse-op units.
DENSIFY_COST = 0.1
# Splitting the entries into a dense and a sparse part, per entry of either side.
SPLIT_COST = 10.0
_SCORING_WAY = None  # tests force "dense", "sparse" or "mixed" to check that all agree
_DENSE_ROWS = None   # tests force the row chunking that a GPU uses when memory is short
_SPARSE_BACKEND = None  # tests force "scipy" to check it against the numba kernel
_SPARSE_TILES = None  # tests force small output tiles so that several tiles meet in the kernel
SPARSE_MAX_POINTERS = 1 << 25  # per side of the sparse kernel, int64 each


@dataclass
class _Entries:
    """A sparse [n_rows, N] matrix as coordinate lists without duplicates: rows, cols, vals [nnz].

    rows ascend. ``rep`` is the [n_rows, k] top-k form when the entries came
    from one: a dense copy is then a single scatter.
    """
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple
    rep: RelativeRepresentation | None = None


def _entries(rep: RelativeRepresentation) -> _Entries:
    """The entries of r (top-k indices are distinct, so no summing is needed).

    Entries whose value is 0 (clamped negatives, underflowed powers) are
    kept: they add nothing, and dropping them would cost a masked copy of
    every array, more than they cost in either product.
    """
    q, k = rep.indices.shape
    rows = torch.arange(q, device=rep.indices.device).repeat_interleave(k)
    return _Entries(rows, rep.indices.reshape(-1), rep.values.reshape(-1), (q, rep.n_anchors), rep)


_KERNELS = None  # the compiled sparse product; False when numba is not installed


def _sparse_kernels():
    """numba kernels for dense out[Qa, Qb] = A @ B^T, or False without numba.

    ``bucket`` counting-sorts each side's entries by (tile of rows, anchor);
    ``product`` then walks the anchors once per pair of tiles and adds each
    shared anchor's outer product into that pair's block of the output, the
    blocks in parallel. A block stays in cache while it is written, and the
    entries are read in order: no random access to a large array, no
    symbolic pass and no sparse result (most of scipy's cost when the output
    is dense). Compiled at first use and cached on disk.
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            import numba
        except ImportError:
            _KERNELS = False
            return _KERNELS
        globals()["prange"] = numba.prange  # resolved as a global when the kernel compiles
        _KERNELS = (numba.njit(parallel=True, cache=True, nogil=True)(_bucket_by_tile),
                    numba.njit(parallel=True, cache=True, nogil=True)(_tiled_product))
    return _KERNELS


def _bucket_by_tile(rows, cols, vals, n, tile, starts, ptr, out_rows, out_vals):  # pragma: no cover (compiled)
    # Counting sort by (row // tile, anchor), rows kept as offsets within their tile. Rows
    # ascend, so tile t owns entries starts[t]:starts[t+1] and buckets t*n:(t+1)*n: tiles in parallel.
    n_tiles = starts.shape[0] - 1
    for t in prange(n_tiles):
        for e in range(starts[t], starts[t + 1]):
            ptr[t * n + cols[e] + 1] += 1
    for i in range(1, ptr.shape[0]):
        ptr[i] += ptr[i - 1]
    for t in prange(n_tiles):
        fill = ptr[t * n:(t + 1) * n].copy()
        for e in range(starts[t], starts[t + 1]):
            j = cols[e]
            f = fill[j]
            out_rows[f] = rows[e] - t * tile
            out_vals[f] = vals[e]
            fill[j] = f + 1


prange = range  # numba.prange once numba is imported; plain range would run serially


def _tiled_product(a_ptr, a_rows, a_vals, b_ptr, b_rows, b_vals, n, tile_a, tile_b, out):  # pragma: no cover
    n_tb = (out.shape[1] + tile_b - 1) // tile_b
    for pair in prange(((out.shape[0] + tile_a - 1) // tile_a) * n_tb):
        ta = pair // n_tb
        tb = pair - ta * n_tb
        pa, pb, r0, c0 = ta * n, tb * n, ta * tile_a, tb * tile_b
        for j in range(n):
            sa, ea = a_ptr[pa + j], a_ptr[pa + j + 1]
            if sa == ea:
                continue
            sb, eb = b_ptr[pb + j], b_ptr[pb + j + 1]
            x = sa
            while x + 3 < ea:  # four rows per pass: each b entry is loaded once for all four
                r, v, r2, v2 = r0 + a_rows[x], a_vals[x], r0 + a_rows[x + 1], a_vals[x + 1]
                r3, v3, r4, v4 = r0 + a_rows[x + 2], a_vals[x + 2], r0 + a_rows[x + 3], a_vals[x + 3]
                for y in range(sb, eb):
                    c, w = c0 + b_rows[y], b_vals[y]
                    out[r, c] += v * w
                    out[r2, c] += v2 * w
                    out[r3, c] += v3 * w
                    out[r4, c] += v4 * w
                x += 4
            while x + 1 < ea:
                r, v, r2, v2 = r0 + a_rows[x], a_vals[x], r0 + a_rows[x + 1], a_vals[x + 1]
                for y in range(sb, eb):
                    c, w = c0 + b_rows[y], b_vals[y]
                    out[r, c] += v * w
                    out[r2, c] += v2 * w
                x += 2
            if x < ea:
                r, v = r0 + a_rows[x], a_vals[x]
                for y in range(sb, eb):
                    out[r, c0 + b_rows[y]] += v * b_vals[y]


def _sparse_tiles(a: _Entries, b: _Entries) -> tuple[int, int]:
    """Output tile (rows, cols) for the numba product.

    Many updates per output entry (few anchors): small tiles that stay in
    the core's cache. Few (many anchors): large tiles, since the kernel
    walks all N anchors once per pair of tiles.
    """
    if _SPARSE_TILES:
        return _SPARSE_TILES
    (qa, n), qb = a.shape, b.shape[0]
    per_entry = len(a.vals) * len(b.vals) / max(1, n * qa * qb)  # updates per output entry, anchors alike
    ta, tb = (256, 512) if per_entry > 30 else (512, 1024)
    # Each side's pointers take n_tiles * N entries: within SPARSE_MAX_POINTERS (256 MiB) however
    # many queries and anchors (50k images against 1.6M anchors would otherwise need 1.2 GB).
    max_tiles = max(1, SPARSE_MAX_POINTERS // max(n, 1))
    ta, tb = max(ta, -(-qa // max_tiles)), max(tb, -(-qb // max_tiles))
    return min(ta, max(qa, 1)), min(tb, max(qb, 1))


def _bucket(kernel, m: _Entries, tile: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m's entries sorted by (tile of rows, anchor): pointers [n_tiles * N + 1], tile-local rows, values."""
    n, rows = m.shape[1], m.rows.numpy()
    n_tiles = -(-m.shape[0] // tile)
    starts = np.searchsorted(rows, np.arange(n_tiles + 1) * tile)  # rows ascend
    ptr = np.zeros(n_tiles * n + 1, dtype=np.int64)
    out_rows, out_vals = np.empty(len(rows), dtype=np.int32), np.empty(len(rows), dtype=dtype)
    kernel(rows, m.cols.numpy(), m.vals.numpy().astype(dtype, copy=False), n, tile, starts, ptr, out_rows, out_vals)
    return ptr, out_rows, out_vals


def _sparse_product(a: _Entries, b: _Entries) -> np.ndarray:
    """Dense [Qa, Qb] = a @ b.T on the CPU: the numba kernels, else scipy."""
    kernels = _sparse_kernels() if _SPARSE_BACKEND != "scipy" else False
    if not kernels:
        return (_csr(a) @ _csr(b).T).toarray()
    bucket, product = kernels
    (qa, n), qb = a.shape, b.shape[0]
    dtype = np.result_type(a.vals.numpy().dtype, b.vals.numpy().dtype)
    ta, tb = _sparse_tiles(a, b)
    out = np.zeros((qa, qb), dtype=dtype)
    if qa and qb and n:
        product(*_bucket(bucket, a, ta, dtype), *_bucket(bucket, b, tb, dtype), n, ta, tb, out)
    return out


def _csr(m: _Entries):
    """scipy CSR of entries whose rows are in ascending order (as _entries and coalesce give them).

    Built from the row pointers directly: no sorting, no duplicate pass.
    """
    import scipy.sparse as sp
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(m.rows.numpy(), minlength=m.shape[0]), out=indptr[1:])
    return sp.csr_matrix((m.vals.numpy(), m.cols.numpy(), indptr), shape=m.shape)


def _sparse_similarity(a: _Entries, b: _Entries, memory_budget: int | None = None) -> torch.Tensor:
    """Dense [Qa, Qb] = a @ b.T for sparse a [Qa, N], b [Qb, N].

    sum_j a[:, j] b[:, j]^T splits over anchors j, and each anchor's term is
    computed the cheaper of two exact ways: anchors in many top-k lists on
    both sides (hubs; all of them when there are few anchors) as one dense
    BLAS product over those columns, the rest as a sparse-sparse product.
    """
    (qa, n), qb = a.shape, b.shape[0]
    dev = a.vals.device
    out_dtype = torch.promote_types(a.vals.dtype, b.vals.dtype)
    budget = memory_budget or (DEFAULT_RAM_BUDGET * 2)  # bytes for the dense copies
    ca = torch.bincount(a.cols, minlength=n)
    cb = torch.bincount(b.cols, minlength=n)
    shared = (ca > 0) & (cb > 0)
    if dev.type == "cuda":
        hub = shared  # a GPU does dense products so fast that all anchors go there
    else:
        # Costs in sparse-op units: a sparse product pays per multiply-add and a
        # floor per output entry (accumulators, the dense copy); a dense one
        # pays Qa*Qb per anchor column at BLAS speed. Take the cheapest of all
        # dense, all sparse, and hubs dense + the rest sparse.
        ops = ca.double() * cb.double()
        per_column = qa * qb / SPARSE_OP_COST + (qa + qb) * DENSIFY_COST  # product + the dense copies
        hub = ops > per_column
        floor = SPARSE_FLOOR * qa * qb
        dense_cost = per_column * float(shared.sum())
        sparse_cost = float(ops.sum()) + floor
        mixed_cost = (per_column * float(hub.sum()) + float(ops[~hub].sum()) + floor
                      + SPLIT_COST * (len(a.vals) + len(b.vals)))
        costs = {"dense": dense_cost, "sparse": sparse_cost, "mixed": mixed_cost}
        way = _SCORING_WAY or min(costs, key=costs.get)
        if way == "sparse":
            return torch.from_numpy(_sparse_product(a, b)).to(out_dtype)
        if way == "dense":
            hub = shared
        if int(hub.sum()) * (qa + qb) * 4 > budget:  # keep the dense part within memory
            order = torch.argsort(ca * cb, descending=True)[: budget // (4 * (qa + qb))]
            hub = torch.zeros(n, dtype=torch.bool, device=dev)
            hub[order] = True
            hub &= shared
    out = torch.zeros(qa, qb, dtype=out_dtype, device=dev)
    u = int(hub.sum())
    if u:
        # Hub columns renumbered 0..u-1; every other anchor goes to a spare
        # column u that the product leaves out, so no entry needs masking.
        # When (nearly) every anchor is a hub, the columns stay as they are
        # and a top-k form is densified with one scatter.
        whole = u == n or (u * 5 >= n * 4 and n * (qa + qb) * 4 <= budget)
        if not whole:
            col = torch.full((n,), u, dtype=torch.long, device=dev)
            col[hub] = torch.arange(u, device=dev)

        def densify(m: _Entries, lo: int = 0, hi: int | None = None) -> torch.Tensor:
            """Rows lo..hi of m as a dense [hi - lo, u] matrix over the hub columns (all N when whole)."""
            hi = m.shape[0] if hi is None else hi
            if whole and m.rep is not None:
                r = m.rep
                return torch.zeros(hi - lo, n, dtype=r.values.dtype, device=dev).scatter_(
                    1, r.indices[lo:hi], r.values[lo:hi])
            s, e = (int(i) for i in torch.searchsorted(m.rows, torch.tensor([lo, hi], device=dev)))  # rows ascend
            width = n if whole else u + 1
            d = torch.zeros(hi - lo, width, dtype=m.vals.dtype, device=dev)
            d.view(-1)[(m.rows[s:e] - lo) * width + (m.cols[s:e] if whole else col[m.cols[s:e]])] = m.vals[s:e]
            return d if whole else d[:, :u]

        tb = densify(b).T
        # On a GPU the union of used anchors can be large: image rows go in
        # chunks that fit half the free memory beside the text side.
        rows = _DENSE_ROWS or qa
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            rows = max(1, min(qa, (free // 2) // (4 * (tb.shape[0] + 1)) - qb))
        for lo in range(0, qa, rows):
            hi = min(qa, lo + rows)
            torch.addmm(out[lo:hi], densify(a, lo, hi), tb, out=out[lo:hi])  # no [rows, Qb] temporary
        if whole:
            return out  # every anchor went into the dense product
    rest = ~hub[b.cols] & (ca[b.cols] > 0)  # empty on CUDA, where every shared anchor is a hub
    if bool(rest.any()):
        # the numba kernel (or scipy) is several times faster than torch's sparse product on the CPU
        sb = _Entries(b.rows[rest], b.cols[rest], b.vals[rest], b.shape)
        out += torch.from_numpy(_sparse_product(a, sb)).to(out_dtype)
    return out


def similarity(image_rep: RelativeRepresentation, text_rep: RelativeRepresentation) -> torch.Tensor:
    """ASIF image-text similarity <r(x), r(t)>: [Q_img, Q_txt], values in [0, 1]."""
    if image_rep.n_anchors != text_rep.n_anchors:
        raise ASIFInputError(f"representations over {image_rep.n_anchors} and {text_rep.n_anchors} anchors; "
                             f"both sides must use the same anchor set")
    return _sparse_similarity(_entries(image_rep), _entries(text_rep))


def _check_classes(n_prompts: int, n_classes) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ASIFInputError(f"n_classes={n_classes!r}: must be a positive integer; an empty class list cannot be classified")
    if n_prompts % n_classes:
        raise ASIFInputError(f"{n_prompts} prompts do not split into {n_classes} classes; prompts are class-major, "
                             f"T templates per class, so their count must be n_classes * T")
    return int(n_prompts // n_classes)


def _class_means(text_rep: RelativeRepresentation, n_classes: int) -> _Entries:
    """Prompt ensemble: per class the mean of its templates' r(t), re-normalised. Sparse [C, N]."""
    t = _check_classes(text_rep.n_queries, n_classes)
    e = _entries(text_rep)
    # prompts are class-major: prompt row r belongs to class r // t
    m = torch.sparse_coo_tensor(torch.stack([e.rows // t, e.cols]), e.vals / t, (n_classes, text_rep.n_anchors),
                                check_invariants=False).coalesce()  # sums the templates' shared anchors
    rows, cols = m.indices()
    norms = torch.zeros(n_classes, dtype=m.dtype, device=m.device).index_add_(0, rows, m.values() ** 2).sqrt()
    return _Entries(rows, cols, m.values() / norms.clamp_min(1e-30)[rows], (n_classes, text_rep.n_anchors))


REDUCES = ("max", "mean")


def class_scores(image_rep: RelativeRepresentation, prompt_rep: RelativeRepresentation, n_classes: int,
                 reduce: str = "max") -> torch.Tensor:
    """Zero-shot class scores [Q, C].

    prompt_rep holds C*T prompts, class-major (the T templates of a class
    contiguous). reduce="max": a class scores its best template, as the
    paper's code does. reduce="mean": the prompt ensemble CLIP users know,
    the score against the normalised mean of the class's template r(t).
    """
    if reduce not in REDUCES:
        raise ASIFInputError(f"reduce={reduce!r}: use 'max' (the paper's) or 'mean' (prompt ensemble)")
    t = _check_classes(prompt_rep.n_queries, n_classes)
    if image_rep.n_anchors != prompt_rep.n_anchors:
        raise ASIFInputError("images and prompts were represented over different anchor sets")
    a = _entries(image_rep)
    if reduce == "mean":
        return _sparse_similarity(a, _class_means(prompt_rep, n_classes))
    s = _sparse_similarity(a, _entries(prompt_rep))
    return s.view(s.shape[0], n_classes, t).amax(dim=2)


def _check_labels(labels, n_queries: int, n_classes: int) -> torch.Tensor:
    y = torch.as_tensor(np.array(labels))
    if y.ndim != 1 or y.shape[0] != n_queries:
        raise ASIFInputError(f"labels: expected shape [{n_queries}] (one class index per image), got {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise ASIFInputError("labels: must be integer class indices")
        y = y.long()
    y = y.long()
    if n_queries and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ASIFInputError(f"labels: values must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    return y


def classification_metrics(scores, labels) -> dict:
    """clip_benchmark's zero-shot metrics from scores [Q, C] and labels [Q].

    acc5 uses min(5, C) guesses; mean_per_class_recall averages top-1 recall
    over the classes present in ``labels``.
    """
    s = torch.as_tensor(scores)
    y = _check_labels(labels, s.shape[0], s.shape[1]).to(s.device)
    top = s.topk(min(5, s.shape[1]), dim=1).indices
    hit1 = top[:, 0] == y
    hit5 = (top == y[:, None]).any(dim=1)
    n_per_class = torch.bincount(y, minlength=s.shape[1])
    present = n_per_class > 0
    recalls = torch.bincount(y, weights=hit1.double(), minlength=s.shape[1])[present] / n_per_class[present]
    return {"acc1": float(hit1.double().mean()), "acc5": float(hit5.double().mean()),
            "mean_per_class_recall": float(recalls.mean())}


def classify(anchor_images, anchor_texts, images, prompts, n_classes: int, *, non_zeros: int = 800,
             exponent: float = 8.0, reduce: str = "max", **stream) -> torch.Tensor:
    """Zero-shot class scores [Q, C] of images [Q, d1] against C*T prompts [P, d2]."""
    rows = sweep(anchor_images, anchor_texts, images, None, prompts, n_classes, non_zeros=non_zeros,
                 exponents=[exponent], reduce=reduce, return_scores=True, **stream)
    return rows[0]["scores"]


# ---------------------------------------------------------------------------
# 4. Accuracy against the number of anchors (paper Fig. 5), one pass
# ---------------------------------------------------------------------------

def sweep(anchor_images, anchor_texts, images, labels, prompts, n_classes: int, *,
          n_anchors: Sequence[int] | None = None, exponents: Sequence[float] = (8.0,), non_zeros: int = 800,
          reduce: str = "max", block_size: int | None = None, device="auto", dtype=None,
          memory_budget: int | None = None, progress: bool = False, return_scores: bool = False) -> list[dict]:
    """Zero-shot accuracy for every (anchor count, exponent), in one pass over the anchors.

    anchor_images [N, d1], anchor_texts [N, d2] coupled; images [Q, d1];
    labels [Q] (or None with return_scores); prompts [C*T, d2] class-major.
    Each count n is evaluated exactly as if only the first n anchors
    existed: the running top-k is snapshotted when the stream reaches n.
    Returns one dict per (n, p): n_anchors, exponent, non_zeros, acc1, acc5,
    mean_per_class_recall (and scores [Q, C] with return_scores).
    """
    k = _check_k(non_zeros)
    ps = [_check_exponent(p) for p in exponents]
    if not ps:
        raise ASIFInputError("exponents: empty list; give at least one (the paper uses 8)")
    if reduce not in REDUCES:
        raise ASIFInputError(f"reduce={reduce!r}: use 'max' (the paper's) or 'mean' (prompt ensemble)")
    check_anchors(anchor_images, anchor_texts, full_scan=False)
    # values are checked (NaN, zero rows) in the same pass that normalises them
    check_embeddings(images, "images", dim=_shape(anchor_images)[1], full_scan=False)
    check_embeddings(prompts, "prompts", dim=_shape(anchor_texts)[1], full_scan=False)
    _check_classes(_shape(prompts)[0], n_classes)
    if labels is not None:
        _check_labels(labels, _shape(images)[0], n_classes)
    elif not return_scores:
        raise ASIFInputError("labels: required to compute accuracy (or pass return_scores=True)")
    sizes = _validate_sizes(_shape(anchor_images)[0], n_anchors)
    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    jobs = [(anchor_images, "anchor_images", _normalized_block(images, dev, dt, "images", 0)),
            (anchor_texts, "anchor_texts", _normalized_block(prompts, dev, dt, "prompts", 0))]
    img_tops, txt_tops = _stream(jobs, k, sizes, block_size, dev, dt, memory_budget, progress)
    rows = []
    for n, ti, tt in zip(sizes, img_tops, txt_tops):
        for p in ps:
            scores = class_scores(sharpen(ti, p), sharpen(tt, p), n_classes, reduce)
            row = {"n_anchors": n, "exponent": p, "non_zeros": k, "reduce": reduce}
            if labels is not None:
                row.update(classification_metrics(scores.cpu(), labels))
            if return_scores:
                row["scores"] = scores.cpu()
            rows.append(row)
    return rows


def zero_shot_result(rows: Sequence[dict], *, dataset: str, model: str, params: dict | None = None,
                     wall_time: float | None = None) -> dict:
    """The sweep's rows as clip_benchmark-style JSON.

    ``metrics`` holds the last row (the most anchors, the last exponent);
    ``results`` one entry per (anchor count, exponent); plus the parameters,
    library versions and wall time.
    """
    import platform
    keys = ("acc1", "acc5", "mean_per_class_recall")
    out = {
        "dataset": dataset, "model": model, "task": "zeroshot_classification",
        "metrics": {k: rows[-1][k] for k in keys},
        "results": [{"n_anchors": r["n_anchors"], "exponent": r["exponent"], "non_zeros": r["non_zeros"],
                     "reduce": r["reduce"], "metrics": {k: r[k] for k in keys}} for r in rows],
        "params": dict(params or {}),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
    }
    if wall_time is not None:
        out["wall_time_s"] = round(float(wall_time), 3)
    return out


# ---------------------------------------------------------------------------
# 5. Retrieval
# ---------------------------------------------------------------------------

def retrieval_metrics(sim, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from sim [n_images, n_texts] and text_to_image [n_texts].

    Named as clip_benchmark does: image_retrieval_recall@k is text -> image
    (is the caption's image among the k best images), text_retrieval_recall@k
    is image -> text (is any of the image's captions among the k best texts).
    """
    s = torch.as_tensor(sim).double()
    if s.ndim != 2:
        raise ASIFInputError(f"sim: expected [n_images, n_texts], got shape {tuple(s.shape)}")
    owner = torch.as_tensor(np.asarray(text_to_image)).long()
    n_img, n_txt = s.shape
    if owner.shape != (n_txt,):
        raise ASIFInputError(f"text_to_image: expected shape [{n_txt}] (the image index of each text), got {tuple(owner.shape)}")
    if n_txt and (int(owner.min()) < 0 or int(owner.max()) >= n_img):
        raise ASIFInputError(f"text_to_image: values must lie in 0..{n_img - 1}")
    out = {}
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[owner, torch.arange(n_txt)] = True
    for k in ks:
        if k < 1:
            raise ASIFInputError(f"ks: recall@{k} is undefined; use k >= 1")
        top_img = s.T.topk(min(k, n_img), dim=1).indices             # [n_txt, k]
        out[f"image_retrieval_recall@{k}"] = float((top_img == owner[:, None]).any(1).double().mean())
        top_txt = s.topk(min(k, n_txt), dim=1).indices                # [n_img, k]
        has_text = positive.any(1)
        hit = positive.gather(1, top_txt).any(1)
        out[f"text_retrieval_recall@{k}"] = float(hit[has_text].double().mean())
    return out


# ---------------------------------------------------------------------------
# 6. Explanations
# ---------------------------------------------------------------------------

def explain(image_rep: RelativeRepresentation, text_rep: RelativeRepresentation, top: int = 10,
            image_row: int = 0, text_row: int = 0) -> list[dict]:
    """The anchors that make sim(x, t) = sum_j r(x)_j r(t)_j, largest product first.

    Returns up to ``top`` dicts: anchor (index), product r(x)_j r(t)_j,
    share (product / sim(x, t)). The shares of all contributing anchors sum to 1.
    """
    if top < 1:
        raise ASIFInputError(f"top={top}: ask for at least one anchor")
    xi, xv = image_rep.indices[image_row], image_rep.values[image_row]
    ti, tv = text_rep.indices[text_row], text_rep.values[text_row]
    weight = dict(zip(ti.tolist(), tv.tolist()))
    products = [(j, v * weight[j]) for j, v in zip(xi.tolist(), xv.tolist()) if j in weight and v * weight[j] > 0]
    total = sum(p for _, p in products)
    products.sort(key=lambda jp: (-jp[1], jp[0]))
    return [{"anchor": j, "product": p, "share": p / total} for j, p in products[:top]]


# ---------------------------------------------------------------------------
# 7. The model: anchors, updates, save and load
# ---------------------------------------------------------------------------

class ASIF:
    """An image-text model made of coupled anchors; nothing is trained.

    anchor_images [N, d1] and anchor_texts [N, d2] (arrays or memmaps), row i
    of both from the same image-caption pair. Updating the model means
    adding or removing pairs: only new anchors need encoding.
    """

    def __init__(self, anchor_images, anchor_texts, non_zeros: int = 800, exponent: float = 8.0, *,
                 captions: Sequence[str] | None = None, device="auto", dtype=None,
                 block_size: int | None = None, memory_budget: int | None = None, meta: dict | None = None):
        check_anchors(anchor_images, anchor_texts, full_scan=_is_in_memory(anchor_images))
        self.anchor_images, self.anchor_texts = anchor_images, anchor_texts
        self.non_zeros, self.exponent = _check_k(non_zeros), _check_exponent(exponent)
        if captions is not None and len(captions) != _shape(anchor_images)[0]:
            raise ASIFInputError(f"captions: {len(captions)} for {_shape(anchor_images)[0]} anchors; give one per pair")
        self.captions = list(captions) if captions is not None else None
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.block_size, self.memory_budget = block_size, memory_budget
        self.meta = dict(meta or {})

    @property
    def n_anchors(self) -> int:
        return int(_shape(self.anchor_images)[0])

    def _represent(self, x, anchors, name):
        check_embeddings(x, name, dim=_shape(anchors)[1], full_scan=False)
        top, = _stream([(anchors, name, _normalized_block(x, self.device, self.dtype, name, 0))], self.non_zeros,
                       [self.n_anchors], self.block_size, self.device, self.dtype, self.memory_budget, False)[0]
        return sharpen(top, self.exponent)

    def image_representation(self, images) -> RelativeRepresentation:
        """r(x) for images [Q, d1]."""
        return self._represent(images, self.anchor_images, "images")

    def text_representation(self, texts) -> RelativeRepresentation:
        """r(t) for texts [Q, d2]."""
        return self._represent(texts, self.anchor_texts, "texts")

    def similarity(self, images, texts) -> np.ndarray:
        """[Q_img, Q_txt] ASIF similarity of image embeddings and text embeddings."""
        return similarity(self.image_representation(images), self.text_representation(texts)).cpu().numpy()

    def classify(self, images, prompts, n_classes: int, reduce: str = "max") -> np.ndarray:
        """Class scores [Q, C] for images [Q, d1] and class-major prompts [C*T, d2]."""
        return class_scores(self.image_representation(images), self.text_representation(prompts),
                            n_classes, reduce).cpu().numpy()

    def explain(self, image, text, top: int = 10) -> list[dict]:
        """Anchors behind sim(image, text) for one image [d1] and one text [d2] embedding.

        Each dict: anchor, product, share, and caption when the model has captions.
        """
        rx = self.image_representation(np.atleast_2d(np.asarray(image)))
        rt = self.text_representation(np.atleast_2d(np.asarray(text)))
        out = explain(rx, rt, top)
        if self.captions is not None:
            for row in out:
                row["caption"] = self.captions[row["anchor"]]
        return out

    def add_anchors(self, anchor_images, anchor_texts, captions: Sequence[str] | None = None) -> "ASIF":
        """Append coupled pairs; the existing anchors are kept as they are."""
        check_anchors(anchor_images, anchor_texts)
        check_embeddings(anchor_images, "anchor_images", dim=_shape(self.anchor_images)[1], full_scan=False)
        check_embeddings(anchor_texts, "anchor_texts", dim=_shape(self.anchor_texts)[1], full_scan=False)
        if (captions is None) != (self.captions is None):
            raise ASIFInputError("captions: give captions for the new pairs exactly when the model has captions")
        if captions is not None and len(captions) != _shape(anchor_images)[0]:
            raise ASIFInputError("captions: give one caption per new pair")
        self.anchor_images = np.concatenate([np.asarray(self.anchor_images), np.asarray(anchor_images, dtype=np.asarray(self.anchor_images[:1]).dtype)])
        self.anchor_texts = np.concatenate([np.asarray(self.anchor_texts), np.asarray(anchor_texts, dtype=np.asarray(self.anchor_texts[:1]).dtype)])
        if captions is not None:
            self.captions.extend(captions)
        return self

    def remove_anchors(self, indices: Sequence[int]) -> "ASIF":
        """Drop the pairs at ``indices``; the order of the rest is kept."""
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= self.n_anchors):
            raise ASIFInputError(f"remove_anchors: indices must lie in 0..{self.n_anchors - 1}")
        if idx.size >= self.n_anchors:
            raise ASIFInputError("remove_anchors: this would remove every anchor; keep at least one pair")
        keep = np.ones(self.n_anchors, dtype=bool)
        keep[idx] = False
        self.anchor_images = np.asarray(self.anchor_images)[keep]
        self.anchor_texts = np.asarray(self.anchor_texts)[keep]
        if self.captions is not None:
            self.captions = [c for c, kept in zip(self.captions, keep) if kept]
        return self

    def save(self, folder: str | os.PathLike) -> None:
        """Write the anchor set as folder/{image,text}/ embedding sets plus manifest.json.

        Built in a temporary folder beside the target and swapped in whole, so
        an interrupted save leaves the old anchor set intact.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            save_embedding_set(tmp / "image", self.anchor_images, self.meta.get("image", {}))
            save_embedding_set(tmp / "text", self.anchor_texts, self.meta.get("text", {}), captions=self.captions)
            atomic_write_json(tmp / "manifest.json", {
                "format": ANCHOR_SET_FORMAT, "count": self.n_anchors,
                "non_zeros": self.non_zeros, "exponent": self.exponent,
                **{k: v for k, v in self.meta.items() if k not in ("image", "text")}})
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                import shutil
                shutil.rmtree(old)
        except BaseException:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = False, **kwargs) -> "ASIF":
        """Open an anchor set saved by ``save``; anchors stay memory-mapped."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            raise ASIFInputError(f"{folder}: no manifest.json; not an anchor set folder (write one with ASIF.save)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != ANCHOR_SET_FORMAT:
            raise ASIFInputError(f"{folder}: format {manifest.get('format')!r} is not {ANCHOR_SET_FORMAT!r}")
        img, txt = load_embedding_set(folder / "image", verify), load_embedding_set(folder / "text", verify)
        params = {"non_zeros": manifest["non_zeros"], "exponent": manifest["exponent"], **kwargs}
        meta = {k: v for k, v in manifest.items() if k not in ("format", "count", "non_zeros", "exponent")}
        meta["image"] = {k: v for k, v in img.manifest.items() if k not in ("format", "count", "dim", "dtype", "shards")}
        meta["text"] = {k: v for k, v in txt.manifest.items() if k not in ("format", "count", "dim", "dtype", "shards")}
        return cls(img.array, txt.array, captions=txt.captions, meta=meta, **params)


# ---------------------------------------------------------------------------
# Synthetic coupled data (tests, benchmarks, the small-machine demo)
# ---------------------------------------------------------------------------

def synthetic_coupled_data(n_anchors: int = 4096, n_classes: int = 10, n_templates: int = 3, n_images: int = 500,
                           image_dim: int = 64, text_dim: int = 32, latent_dim: int = 16, noise: float = 0.5,
                           seed: int = 0, dtype=np.float32) -> dict:
    """Two unrelated 'encoders' of one latent world, so that ASIF has something to find.

    A latent vector z is seen by the image encoder as tanh(z W1) + noise and
    by the text encoder as tanh(z W2) + noise, with W1, W2 random; anchors
    are (image, caption) views of the same z. Classes are latent cluster
    centres; prompts are noisy text views of them. Returns normalised
    anchor_images [N, image_dim], anchor_texts [N, text_dim], images [Q, image_dim],
    labels [Q], prompts [C*T, text_dim] (class-major).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((latent_dim, image_dim)) / math.sqrt(latent_dim)
    w2 = rng.standard_normal((latent_dim, text_dim)) / math.sqrt(latent_dim)
    centres = rng.standard_normal((n_classes, latent_dim)) * 1.5

    def views(z, w):
        x = np.tanh(z @ w) + noise * rng.standard_normal((len(z), w.shape[1])) / math.sqrt(w.shape[1]) * 3
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

    za = centres[rng.integers(0, n_classes, n_anchors)] + rng.standard_normal((n_anchors, latent_dim))
    labels = rng.integers(0, n_classes, n_images)
    zq = centres[labels] + rng.standard_normal((n_images, latent_dim))
    zp = np.repeat(centres, n_templates, axis=0) + 0.3 * rng.standard_normal((n_classes * n_templates, latent_dim))
    return {"anchor_images": views(za, w1), "anchor_texts": views(za, w2), "images": views(zq, w1),
            "labels": labels.astype(np.int64), "prompts": views(zp, w2), "n_classes": n_classes}
