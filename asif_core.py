"""ASIF: coupled data turns unimodal models to multimodal without training.

Norelli et al., NeurIPS 2023 (arXiv 2210.01738). This file is the method and
nothing else, in the order of the paper (and of the design's "The method,
exactly"); numpy and torch, plus the package's scoring engine (asif.scoring)
and storage (asif.storage):

  0. device, dtype and block size
  1. inputs checked and L2-normalised (optionally centred on the anchors' mean)
  2. the similarities to the anchors, streamed in blocks, exact running top-k
     (``non_zeros``); negatives count as 0
  3. sharpen (``exponent``) and L2-normalise: the relative representation r(x)
  4. image-text similarity <r(x), r(t)> and zero-shot class scores
  5. the accuracy-vs-anchors sweep (paper Fig. 5) in one pass over the anchors
  6. retrieval
  7. explanations: the anchors that make a score
  8. the model: anchors that can be added and removed, saved and loaded

Shapes in docstrings: ``Q`` queries, ``N`` anchors, ``d`` embedding dim,
``k`` non_zeros, ``C`` classes, ``T`` templates per class, ``P = C*T`` prompts.
Public functions take numpy arrays, torch tensors or memmaps and return numpy;
the representation objects (TopK, RelativeRepresentation) hold torch tensors
on the compute device.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from asif import precision, scoring, selection, storage
from asif.config import progress_bar
from asif.errors import ASIFInputError
from asif.metrics import check_labels, classification_metrics

__all__ = [
    "ASIF", "ASIFInputError", "pick_device", "parse_dtype", "resolve_dtype", "choose_block_size",
    "check_embeddings", "check_anchors", "TopK", "RelativeRepresentation", "top_k_similarities",
    "sharpen", "relative_representation", "similarity", "class_scores", "classify", "sweep", "Retrieval",
    "retrieve", "explain", "REDUCES", "anchor_centre",
]

REDUCES = ("max", "mean")
ANCHOR_SET_FORMAT = "asif-anchors/1"


# ---------------------------------------------------------------------------
# 0. Device, dtype and block size
# ---------------------------------------------------------------------------

def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ASIFInputError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ASIFInputError(f"device={device!r}: CUDA is not available on this machine; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ASIFInputError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ASIFInputError(f"device={device!r}: MPS is not available on this machine; use device='cpu' or 'auto'")
    return dev


DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a name (``float32``, ``fp16``, ``bf16`` ...) or a dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ASIFInputError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Compute dtype of the similarity products.

    Default: float16 on CUDA (the products are the whole cost and half
    precision doubles their speed there), float32 on the CPU, where half
    precision matrix products are slow. float64 is allowed for reference runs.
    """
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(dtype)
    if dtype in (torch.float16, torch.bfloat16) and device.type != "cuda":
        raise ASIFInputError(f"dtype={dtype} is for CUDA; on the CPU use float32 (the default)")
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
        # 2 bytes a value from a float16 memmap, 4 from float32: keep the staged
        # block within the CPU's RAM budget, or a 1M-anchor block would stage
        # gigabytes on a host smaller than its GPU.
        max_block = max(1, min(1 << 20, DEFAULT_RAM_BUDGET // (4 * dim)))
    item = torch.finfo(dtype).bits // 8
    per_row = item * (n_query_rows + dim) + 4 * dim + 1  # +1: the candidate mask
    return int(max(1, min(max_block, memory_budget // per_row)))


@dataclass
class Compute:
    """Where and how the products run: device, dtype, anchors per block, memory, progress bar."""
    device: torch.device
    dtype: torch.dtype
    block_size: int | None = None
    memory_budget: int | None = None
    progress: bool = False
    first_pass: str = "auto"   # "bf16": candidates from a bfloat16 product, then exact (asif.precision)

    @classmethod
    def of(cls, device="auto", dtype=None, block_size: int | None = None, memory_budget: int | None = None,
           progress: bool = False, first_pass: str = "auto") -> "Compute":
        dev = pick_device(device)
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                       or block_size < 1):
            raise ASIFInputError(f"block_size={block_size!r}: must be a positive integer (or None: from memory)")
        dt = resolve_dtype(dtype, dev)
        return cls(dev, dt, block_size, memory_budget, progress, precision.resolve_first_pass(first_pass, dev, dt))

    def pass_for(self, similarities: int, n_counts: int = 1) -> str:
        """The first pass a stream of ``similarities`` (query rows x anchors) snapshotting at
        ``n_counts`` anchor counts runs: "fp32" or "bf16" ("auto" settled by
        asif.precision.choose_first_pass)."""
        compiled = self.device.type == "cpu" and COMPILED_SELECTION and selection.available()
        return precision.choose_first_pass(self.first_pass, self.device, similarities, compiled, n_counts)


# ---------------------------------------------------------------------------
# 1. Inputs checked and normalised
# ---------------------------------------------------------------------------

def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_embeddings(x, name: str, dim: int | None = None, full_scan: bool = True, against: str = "") -> None:
    """Raise ASIFInputError unless ``x`` is [rows, dim], non-empty, finite, no all-zero row.

    ``full_scan=False`` checks only the shape; the values of a large memmap
    are then checked block by block while they are streamed. ``against``
    names the array that ``dim`` comes from (either may be the wrong one).
    """
    shape = _shape(x)
    if len(shape) != 2:
        raise ASIFInputError(f"{name}: expected a 2-D array [rows, dim], got shape {shape}; "
                             f"stack the embeddings into one matrix (a single vector needs x[None, :])")
    if shape[0] == 0 or shape[1] == 0:
        raise ASIFInputError(f"{name}: empty array of shape {shape}; give at least one row")
    if dim is not None and shape[1] != dim:
        raise ASIFInputError(f"{name}: has dim {shape[1]} but {against or 'the anchors'} has dim {dim}; "
                             f"queries must come from the same encoder as the anchors of that modality")
    dtype = getattr(x, "dtype", None)  # checked here, before any block is read or converted
    if dtype is not None and not (dtype.is_floating_point if isinstance(dtype, torch.dtype)
                                  else np.issubdtype(np.dtype(dtype), np.floating)):
        raise ASIFInputError(f"{name}: dtype {dtype} is not floating point; pass float embeddings")
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


def _normalized_block(raw, compute: Compute, name: str, offset: int, out: torch.Tensor | None = None,
                      centre: np.ndarray | None = None) -> torch.Tensor:
    """Rows (a block of anchors, or the queries) as a normalised tensor; the row norms double as the check.

    A NaN/inf row has a non-finite norm and an all-zero row a zero norm, so
    one pass finds both without a separate scan of the (maybe huge) anchors.
    ``out``: a flat CPU buffer of the compute dtype to write the rows into
    (the stream reuses one: a fresh block-sized tensor costs its page faults
    every block, ~20% of the stream on the CPU). ``centre`` [d]: subtracted
    from the unit rows, which are then normalised again (see ``anchor_centre``).
    """
    if isinstance(raw, np.ndarray) and not raw.dtype.isnative:  # a .npy saved big-endian: torch reads native only
        raw = raw.astype(raw.dtype.newbyteorder("="))
    if torch.is_tensor(raw):
        t = raw
    elif isinstance(raw, np.ndarray) and raw.flags.c_contiguous and (raw.flags.writeable or out is not None):
        # A read-only memmap block is read in place: its rows are only read, the
        # normalised ones go to ``out`` (a copy of every block costs ~10% of a stream).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only arrays
            t = torch.from_numpy(raw)
    else:
        t = torch.from_numpy(np.array(raw))
    if not t.is_floating_point():
        raise ASIFInputError(f"{name}: dtype {t.dtype} is not floating point; pass float embeddings")
    # moved as stored (half the bytes from a float16 memmap), converted where it is computed on
    t = t.to(device=compute.device).to(torch.float64 if compute.dtype == torch.float64 else torch.float32)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        _check_values(raw, name, offset)  # names the row and the fault
        raise ASIFInputError(f"{name}: a row near {offset} has values too large to normalise; rescale the embeddings")
    if out is not None and t.dtype == compute.dtype and t.device.type == "cpu" and out.numel() >= t.numel():
        return _centred(torch.div(t, norms, out=out[:t.numel()].view(t.shape)), centre)
    # a new tensor: the rows read in place stay untouched; centred before any cast to half precision
    return _centred(t / norms, centre).to(compute.dtype)


def _centred(unit: torch.Tensor, centre: np.ndarray | None) -> torch.Tensor:
    """Unit rows [b, d] minus ``centre`` [d], normalised again, in place; a row equal to the centre becomes 0."""
    if centre is None:
        return unit
    unit.sub_(torch.as_tensor(centre, dtype=unit.dtype, device=unit.device))
    return unit.div_(torch.linalg.vector_norm(unit, dim=1, keepdim=True).clamp_min(1e-30))


def anchor_centre(anchors, count: int | None = None, name: str = "anchors", block: int = 16384,
                  dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The mean of the unit anchor rows anchors[:count]: float64 [d].

    Centring removes the direction every embedding of an encoder shares
    (pooled CNN features are all non-negative, sentence embeddings are
    anisotropic): without it every cosine is high and a few "hub" anchors
    fill almost every query's top-k. Queries and anchors are centred on the
    same vector, which comes from the anchors only; queries from a domain far
    from the anchors' mean can get new hubs (docs/default_anchors.md). Read
    block by block, so a memmap larger than memory is fine; values are
    checked as they are read. The rows are normalised in ``dtype`` (that of
    the products: float32, or float64 for a float64 computation); float32
    rows are summed 1,024 at a time and those sums added in float64 (within
    ~1e-9 of a float64 mean, ~5x faster than converting every row).
    """
    n = _shape(anchors)[0] if count is None else int(count)
    if n < 2:
        raise ASIFInputError(f"{name}: centring needs at least 2 anchors, got {n}; use centre=False")
    cpu = Compute(torch.device("cpu"), torch.float64 if dtype == torch.float64 else torch.float32)
    buf = torch.empty(min(block, n) * _shape(anchors)[1], dtype=cpu.dtype)  # one buffer: no page faults per block
    total = torch.zeros(_shape(anchors)[1], dtype=torch.float64)
    for start in range(0, n, block):
        rows = _normalized_block(anchors[start:min(n, start + block)], cpu, name, start, out=buf)
        for j in range(0, rows.shape[0], 1024):
            total += rows[j:j + 1024].sum(0).double()
    return (total / n).numpy()


def _centre_vector(c, dim: int, name: str) -> np.ndarray:
    try:
        v = np.asarray(c, dtype=np.float64)
    except (TypeError, ValueError):
        v = np.zeros(0)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise ASIFInputError(f"centre of {name}: expected False, True or a finite vector of shape ({dim},), "
                             f"got {type(c).__name__} of shape {getattr(v, 'shape', '?')}")
    return v


def _one_centre(centre, anchors, n: int, name: str = "anchors", dtype=torch.float32) -> np.ndarray | None:
    """``centre`` of one modality -> [d] or None: False/None (the paper's method, no centring),
    True (the mean of the first ``n`` unit anchors, normalised in ``dtype``) or a vector, used as given."""
    if centre is None or isinstance(centre, (bool, np.bool_)):
        return anchor_centre(anchors, n, name, dtype=dtype) if centre else None
    return _centre_vector(centre, _shape(anchors)[1], name)


def _centres(centre, anchor_images, anchor_texts, n: int, dtype=torch.float32) -> tuple:
    """``centre`` of sweep/classify/ASIF -> (image centre, text centre), each [d] or None:
    False, True, or a pair (image, text) of which each is a vector, True or False/None."""
    if centre is None or isinstance(centre, (bool, np.bool_)):
        centre = (centre, centre)
    if not isinstance(centre, (tuple, list)) or len(centre) != 2:
        raise ASIFInputError(f"centre: use False, True or a pair (image centre [d1], text centre [d2]), "
                             f"got {type(centre).__name__}")
    return (_one_centre(centre[0], anchor_images, n, "anchor_images", dtype),
            _one_centre(centre[1], anchor_texts, n, "anchor_texts", dtype))


def _is_in_memory(x) -> bool:
    return torch.is_tensor(x) or (isinstance(x, np.ndarray) and not isinstance(x, np.memmap))


def _check_k(non_zeros) -> int:
    if isinstance(non_zeros, bool) or not isinstance(non_zeros, (int, np.integer)) or non_zeros < 1:
        raise ASIFInputError(f"non_zeros={non_zeros!r}: must be a positive integer (the paper uses 800)")
    return int(non_zeros)


def _check_exponent(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not math.isfinite(p) or p <= 0:
        raise ASIFInputError(f"exponent={p!r}: must be a positive number (the paper uses 8)")
    return float(p)


def _check_counts(n_anchors: int, anchor_counts: Sequence[int] | None) -> list[int]:
    """Sorted distinct anchor counts in 1..N (default: [N])."""
    if anchor_counts is None:
        return [n_anchors]
    counts = sorted({int(n) for n in anchor_counts})
    if not counts:
        raise ASIFInputError("anchor_counts: empty list; give at least one anchor count")
    if counts[0] < 1 or counts[-1] > n_anchors:
        raise ASIFInputError(f"anchor_counts: counts must lie in 1..{n_anchors} (the anchors available), got {counts}")
    return counts


def _check_reduce(reduce: str) -> str:
    if reduce not in REDUCES:
        raise ASIFInputError(f"reduce={reduce!r}: use 'max' (the paper's) or 'mean' (prompt ensemble)")
    return reduce


def _check_classes(n_prompts: int, n_classes) -> int:
    """Templates per class, T = P / C."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ASIFInputError(f"n_classes={n_classes!r}: must be a positive integer; an empty class list cannot be classified")
    if n_prompts % n_classes:
        raise ASIFInputError(f"prompts: {n_prompts} rows do not split into n_classes={n_classes} classes; prompts are "
                             f"class-major, T templates per class, so their count must be C * T")
    return int(n_prompts // n_classes)


# ---------------------------------------------------------------------------
# 2. Similarities to the anchors, streamed: the exact running top-k
# ---------------------------------------------------------------------------

@dataclass
class TopK:
    """The exact top-k cosine similarities of each query to the anchors.

    values: [Q, k'] similarity (negatives counted as 0), float32 (float64 in reference runs)
    indices: [Q, k'] int64 anchor index
    n_anchors: N, the number of anchors searched; k' = min(k, N).
    Ties are broken towards the lower anchor index, so a prefix of the
    anchors always gives the same answer as if only that prefix existed.
    """
    values: torch.Tensor
    indices: torch.Tensor
    n_anchors: int


COMPILED_SELECTION = True  # False: the torch selection of the GPU, also on the CPU (tests)


class _RunningTopK:
    """Top-k of one query matrix over anchors that arrive in blocks, in order.

    The cost that matters is the matrix product; selection must stay small
    beside it. Once k anchors are held, only block entries above a row's
    k-th value can enter (a later anchor that ties loses to the earlier
    one), and after a few blocks those are a handful per row.

    On the CPU a compiled kernel (asif.selection) reads each block of
    similarities once, rows in parallel, keeping per row a buffer in anchor
    order that it compacts to the k best when full. With the bfloat16 first
    pass the block is a bfloat16 product; entries are kept with their error
    bounds and those still in play are recomputed exactly at each snapshot,
    from the blocks ``replay`` gives again (asif.precision). On a GPU,
    entries above the threshold are collected block after block (it only
    rises, so a stale one lets through more, never too few) and merged into
    the top-k when they add up to about
    k per row, or when an exact state is needed.
    """

    def __init__(self, queries: torch.Tensor, k: int, first_pass: str = "fp32", replay=None):
        self.queries = queries            # [Q, d] normalised, compute dtype
        self.k = k
        self.first_pass = first_pass
        self.replay = replay              # bf16: (start, end) -> the normalised block the stream gave
        self.unresolved = []              # bf16: the (start, end) of blocks absorbed since the last snapshot
        self.seen = 0
        self._buffer = None
        self.compiled = queries.device.type == "cpu" and COMPILED_SELECTION and selection.available()
        if first_pass == "bf16" and not self.compiled:
            raise ASIFInputError("first_pass='bf16' needs the compiled selection on the CPU (numba); use 'fp32'")
        if self.compiled:
            if first_pass == "bf16":
                if replay is None:
                    raise ValueError("first_pass='bf16' needs a replay of the anchor blocks")
                self.queries_low = queries.bfloat16()
                error = precision.error_bound(queries, self.queries_low).view(-1).double().numpy()
                self.rows = selection.BoundedRowBuffers(queries.numpy(), error, k)
            else:
                self.rows = selection.RowBuffers(queries.shape[0], k, queries.numpy().dtype)
            return
        self.values = queries.new_zeros((queries.shape[0], 0))
        self.indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
        self.threshold = None             # [Q, 1] k-th value at the last merge
        self.pending = []                 # [(rows, slots, anchor indices, values)] above threshold
        self.n_pending = 0
        self.row_fill = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)

    def _product(self, queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """queries @ block.T [Q, b] into one reused buffer: a fresh multi-100 MB tensor
        per block costs its page faults again every time (~10% of the product)."""
        q, b = queries.shape[0], block.shape[0]
        if self._buffer is None or self._buffer.numel() < q * b:  # one runner, one dtype
            self._buffer = queries.new_empty(q * b)
        return torch.mm(queries, block.T, out=self._buffer[:q * b].view(q, b))  # the expensive step

    def update(self, block: torch.Tensor) -> None:
        """block: [b, d] normalised anchors that follow the ones seen so far."""
        offset = self.seen
        self.seen += block.shape[0]
        if self.compiled:
            if self.first_pass == "bf16":
                approx = self._product(self.queries_low, block.bfloat16())
                self.rows.absorb(approx.view(torch.int16).numpy(), offset)
                self.unresolved.append((offset, self.seen))
            else:
                self.rows.absorb(self._product(self.queries, block).numpy(), offset)
            return
        sims = self._product(self.queries, block)
        b = block.shape[0]
        if self.values.shape[1] < self.k:
            # Still filling: every anchor is a candidate (negatives count as 0).
            sims.clamp_(min=0)
            cand_v = torch.cat([self.values, sims], dim=1)
            cand_i = torch.cat([self.indices, torch.arange(offset, offset + b, device=sims.device).expand(sims.shape[0], b)], dim=1)
            self._select(cand_v, cand_i)
            return
        flat = (sims > self.threshold).view(-1).nonzero().squeeze(1)
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
        if self.compiled:
            if self.first_pass == "bf16":
                # the rows of every block since the last snapshot, normalised again as they were
                self.rows.resolve((start, self.replay(start, end).numpy()) for start, end in self.unresolved)
                self.unresolved = []
            v, i = self.rows.top()
            return TopK(torch.from_numpy(v), torch.from_numpy(i), self.seen)
        self.merge()
        v = self.values if self.values.dtype == torch.float64 else self.values.float()
        return TopK(v.clone(), self.indices.clone(), self.seen)


@dataclass
class StreamJob:
    """One modality of a pass: its anchors [N, d] and its queries [Q, d] (normalised, compute dtype)."""
    anchors: object
    name: str
    queries: torch.Tensor
    first_row: int = 0   # row of anchors[0] in the whole set (a shard's), for the rows errors name
    centre: np.ndarray | None = None  # [d], subtracted from every unit anchor row (queries come centred)


def _block_buffer(block_size: int, dim: int, compute: Compute) -> torch.Tensor | None:
    """One flat buffer that every normalised block of a stream is written into (CPU), else None."""
    return torch.empty(block_size * dim, dtype=compute.dtype) if compute.device.type == "cpu" else None


def _anchor_block(job: StreamJob, compute: Compute, start: int, end: int, buf: torch.Tensor | None) -> torch.Tensor:
    """anchors[start:end] of a job, normalised (and centred) into ``buf``: the stream's block, and the
    same bits again when the bfloat16 pass replays it (the same slice through the same operations)."""
    return _normalized_block(job.anchors[start:end], compute, job.name, job.first_row + start, out=buf,
                             centre=job.centre)


def _anchor_blocks(job: StreamJob, counts: Sequence[int], compute: Compute, block_size: int,
                   first_block: int | None, buf: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (end, normalised block [b, d]) over job.anchors[0:counts[-1]], each written into ``buf``.

    Blocks never straddle a count, so a running state is exact at each one.
    Values are checked block by block: a memmap larger than RAM is read
    once, never whole. Each block is consumed before the next is made.
    """
    start = 0
    for stop in counts:
        while start < stop:
            # Blocks grow from first_block to block_size, each at most as large
            # as what came before it: a young threshold lets many entries
            # through, so the block it filters is kept small.
            size = block_size if not first_block else min(block_size, max(first_block, start))
            end = min(stop, start + size)
            yield end, _anchor_block(job, compute, start, end, buf)
            start = end


def _stream(jobs: Sequence[StreamJob], k: int, counts: list[int], compute: Compute) -> list[list[TopK]]:
    """One pass over coupled anchor arrays, a running top-k per job.

    All jobs' anchors have the same N (row i of each is the same pair).
    Returns, per job, one TopK per anchor count.
    """
    rows = sum(j.queries.shape[0] for j in jobs)
    dim = sum(_shape(j.anchors)[1] for j in jobs)
    bs = compute.block_size or choose_block_size(rows, dim, compute.device, compute.dtype, compute.memory_budget)
    # The first block is scanned whole (nothing to compare with yet), so keep
    # it small; later blocks only pass on entries above the running k-th value.
    first = compute.block_size or min(bs, max(4 * k, 4096))
    first_pass = compute.pass_for(rows * counts[-1], len(counts))
    if first_pass == "bf16" and not compute.block_size:
        bs = first = min(bs, precision.BLOCK)  # its products are scanned from cache (asif.precision.BLOCK)
    bufs = [_block_buffer(bs, _shape(j.anchors)[1], compute) for j in jobs]
    # The bfloat16 pass recomputes its candidates at each count from the rows of the blocks it saw,
    # normalised again into the stream's buffer (free by then), so no copy of the anchors is kept.
    runners = [_RunningTopK(j.queries, k, first_pass,
                            replay=functools.partial(_anchor_block, j, compute, buf=b)) for j, b in zip(jobs, bufs)]
    streams = [_anchor_blocks(j, counts, compute, bs, first, b) for j, b in zip(jobs, bufs)]
    out = [[] for _ in runners]
    pending = list(counts)
    with progress_bar(counts[-1], "anchors", compute.progress, unit="anchor") as bar:
        for blocks in zip(*streams):
            for r, (_, block) in zip(runners, blocks):
                r.update(block)
            end = blocks[0][0]
            bar.update(blocks[0][1].shape[0])
            if end == pending[0]:
                for r, o in zip(runners, out):
                    o.append(r.snapshot())
                pending.pop(0)
    return out


def top_k_similarities(queries, anchors, non_zeros: int = 800, *, anchor_counts: Sequence[int] | None = None,
                       block_size: int | None = None, device="auto", dtype=None,
                       memory_budget: int | None = None, progress: bool = False,
                       first_pass: str = "auto", centre=False) -> list[TopK]:
    """Exact top-``non_zeros`` similarities of each query to the anchors, streamed.

    Args:
        queries: [Q, d]; anchors: [N, d] (array, tensor, memmap or ShardedArray).
        anchor_counts: counts to snapshot at (default [N]), each exactly as if
            only the first n anchors existed, all in one pass.
        first_pass: "auto" (the default: "bf16" for a large stream with one
            count on a CPU that multiplies bfloat16 fast, else "fp32"), "fp32" (the plain product)
            or "bf16": candidates from a bfloat16 product, the ones that can
            still be in the top-k recomputed exactly (asif.precision); the
            same top-k as float64 rounded to float32.
        centre: False (the paper), True (centre queries and anchors on the
            mean of the first max(anchor_counts) unit anchors) or a vector [d].
    Returns:
        one TopK per count, values and indices [Q, min(k, n)].
    """
    k = _check_k(non_zeros)
    compute = Compute.of(device, dtype, block_size, memory_budget, progress, first_pass)
    check_embeddings(anchors, "anchors", full_scan=False)
    # values: when normalised
    check_embeddings(queries, "queries", dim=_shape(anchors)[1], full_scan=False, against="anchors")
    counts = _check_counts(_shape(anchors)[0], anchor_counts)
    c = _one_centre(centre, anchors, counts[-1], dtype=compute.dtype)
    job = StreamJob(anchors, "anchors", _normalized_block(queries, compute, "queries", 0, centre=c), centre=c)
    return _stream([job], k, counts, compute)[0]


# ---------------------------------------------------------------------------
# 3. Sharpen and normalise: the relative representation
# ---------------------------------------------------------------------------

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

    def to_dense(self) -> np.ndarray:
        """[Q, N] dense, as numpy."""
        out = torch.zeros(self.n_queries, self.n_anchors, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values).cpu().numpy()

    def entries(self) -> scoring.Entries:
        return scoring.entries_from_topk(self.indices, self.values, self.n_anchors)


def sharpen(top: TopK, exponent: float = 8.0) -> RelativeRepresentation:
    """Raise the kept similarities to ``exponent`` and L2-normalise: r(x)."""
    p = _check_exponent(exponent)
    v = top.values.double() if top.values.dtype == torch.float64 else top.values.float()
    v = v.clamp_min(0).pow(p)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    return RelativeRepresentation(top.indices, v, top.n_anchors)


def relative_representation(queries, anchors, non_zeros: int = 800, exponent: float = 8.0, *,
                            block_size: int | None = None, device="auto", dtype=None,
                            memory_budget: int | None = None, progress: bool = False,
                            first_pass: str = "auto", centre=False) -> RelativeRepresentation:
    """r(x) for each query: sparse, ``non_zeros`` entries, sharpened by ``exponent``, unit norm.

    Args:
        queries: [Q, d]; anchors: [N, d] of the same modality and encoder.
        centre: False, True or a vector [d], as in ``top_k_similarities``.
    Returns:
        RelativeRepresentation with indices and values [Q, min(non_zeros, N)].
    """
    top, = top_k_similarities(queries, anchors, non_zeros, block_size=block_size, device=device,
                              dtype=dtype, memory_budget=memory_budget, progress=progress, first_pass=first_pass,
                              centre=centre)
    return sharpen(top, exponent)


# ---------------------------------------------------------------------------
# 4. Image-text similarity and zero-shot class scores
# ---------------------------------------------------------------------------

def _same_anchors(a: RelativeRepresentation, b: RelativeRepresentation) -> None:
    if a.n_anchors != b.n_anchors:
        raise ASIFInputError(f"representations over {a.n_anchors} and {b.n_anchors} anchors; "
                             f"both sides must use the same anchor set")


def similarity(image_rep: RelativeRepresentation, text_rep: RelativeRepresentation) -> np.ndarray:
    """ASIF image-text similarity <r(x), r(t)>: [Q_img, Q_txt], values in [0, 1]."""
    _same_anchors(image_rep, text_rep)
    return scoring.product(image_rep.entries(), text_rep.entries()).cpu().numpy()


def class_scores(image_rep: RelativeRepresentation, prompt_rep: RelativeRepresentation, n_classes: int,
                 reduce: str = "max") -> np.ndarray:
    """Zero-shot class scores [Q, C].

    prompt_rep holds C*T prompts, class-major (the T templates of a class
    contiguous). reduce="max": a class scores its best template, as the
    paper's code does. reduce="mean": the prompt ensemble CLIP users know,
    the score against the normalised mean of the class's template r(t).
    """
    _check_reduce(reduce)
    t = _check_classes(prompt_rep.n_queries, n_classes)
    _same_anchors(image_rep, prompt_rep)
    if reduce == "mean":
        return scoring.product(image_rep.entries(), scoring.class_means(prompt_rep.entries(), n_classes)).cpu().numpy()
    s = scoring.product(image_rep.entries(), prompt_rep.entries())
    return s.view(s.shape[0], n_classes, t).amax(dim=2).cpu().numpy()


def classify(anchor_images, anchor_texts, images, prompts, n_classes: int, *, non_zeros: int = 800,
             exponent: float = 8.0, reduce: str = "max", centre=False, **compute) -> np.ndarray:
    """Zero-shot class scores [Q, C] of images [Q, d1] against C*T class-major prompts [P, d2].

    ``centre``: as in ``sweep``. ``compute``: device, dtype, block_size,
    memory_budget, progress, first_pass.
    """
    rows = sweep(anchor_images, anchor_texts, images, None, prompts, n_classes, non_zeros=non_zeros,
                 exponents=[exponent], reduce=reduce, return_scores=True, centre=centre, **compute)
    return rows[0]["scores"]


# ---------------------------------------------------------------------------
# 5. Accuracy against the number of anchors (paper Fig. 5), one pass
# ---------------------------------------------------------------------------

def sweep(anchor_images, anchor_texts, images, labels, prompts, n_classes: int, *,
          anchor_counts: Sequence[int] | None = None, exponents: Sequence[float] = (8.0,), non_zeros: int = 800,
          reduce: str = "max", block_size: int | None = None, device="auto", dtype=None,
          memory_budget: int | None = None, progress: bool = False, return_scores: bool = False,
          first_pass: str = "auto", centre=False) -> list[dict]:
    """Zero-shot accuracy for every (anchor count, exponent), in one pass over the anchors.

    Each count n is evaluated exactly as if only the first n anchors
    existed: the running top-k is snapshotted when the stream reaches n.
    With ``centre=True`` every count is centred on the same vectors, the
    means of all max(anchor_counts) anchors (one model, seen through fewer
    of its anchors); a pair (image, text) sets each modality on its own:
    a vector [d] is used as given, True/False as above.

    Args:
        anchor_images [N, d1], anchor_texts [N, d2]: coupled anchors.
        images [Q, d1]; labels [Q] (or None with return_scores);
        prompts [C*T, d2], class-major.
        anchor_counts: the n of the curve (default [N]); exponents: the p.
    Returns:
        one dict per (n, p), n ascending then p in the order given: n_anchors,
        exponent, non_zeros, reduce, acc1, acc5, mean_per_class_recall (with
        labels) and scores [Q, C] numpy (with return_scores).
    """
    k, ps, compute, counts, jobs = _sweep_inputs(anchor_images, anchor_texts, images, labels, prompts, n_classes,
                                                 anchor_counts, exponents, non_zeros, reduce, block_size, device,
                                                 dtype, memory_budget, progress, first_pass, return_scores, centre)
    img_tops, txt_tops = _stream(jobs, k, counts, compute)
    return _sweep_rows(counts, img_tops, txt_tops, ps, k, n_classes, reduce, labels, return_scores)


def _sweep_inputs(anchor_images, anchor_texts, images, labels, prompts, n_classes, anchor_counts, exponents,
                  non_zeros, reduce, block_size, device, dtype, memory_budget, progress, first_pass, return_scores,
                  centre=False):
    """Check a sweep's inputs -> (k, exponents, Compute, counts, the two StreamJobs).

    Shared by ``sweep`` and the distributed sweep (asif.distributed), so both
    refuse the same inputs with the same words.
    """
    k = _check_k(non_zeros)
    ps = [_check_exponent(p) for p in exponents]
    if not ps:
        raise ASIFInputError("exponents: empty list; give at least one (the paper uses 8)")
    _check_reduce(reduce)
    compute = Compute.of(device, dtype, block_size, memory_budget, progress, first_pass)
    check_anchors(anchor_images, anchor_texts, full_scan=False)
    # values are checked (NaN, zero rows) in the same pass that normalises them
    check_embeddings(images, "images", dim=_shape(anchor_images)[1], full_scan=False, against="anchor_images")
    check_embeddings(prompts, "prompts", dim=_shape(anchor_texts)[1], full_scan=False, against="anchor_texts")
    _check_classes(_shape(prompts)[0], n_classes)
    if labels is not None:
        check_labels(labels, _shape(images)[0], n_classes)
    elif not return_scores:
        raise ASIFInputError("labels: required to compute accuracy (or pass return_scores=True)")
    counts = _check_counts(_shape(anchor_images)[0], anchor_counts)
    ci, ct = _centres(centre, anchor_images, anchor_texts, counts[-1], compute.dtype)
    jobs = [StreamJob(anchor_images, "anchor_images", _normalized_block(images, compute, "images", 0, centre=ci),
                      centre=ci),
            StreamJob(anchor_texts, "anchor_texts", _normalized_block(prompts, compute, "prompts", 0, centre=ct),
                      centre=ct)]
    return k, ps, compute, counts, jobs


def _sweep_rows(counts, img_tops, txt_tops, ps, k, n_classes, reduce, labels, return_scores) -> list[dict]:
    """The sweep's rows from the top-k of images and prompts at each count (see ``sweep``)."""
    rows = []
    for n, ti, tt in zip(counts, img_tops, txt_tops):
        for p in ps:
            scores = class_scores(sharpen(ti, p), sharpen(tt, p), n_classes, reduce)
            row = {"n_anchors": n, "exponent": p, "non_zeros": k, "reduce": reduce}
            if labels is not None:
                row.update(classification_metrics(scores, labels))
            if return_scores:
                row["scores"] = scores
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# 6. Retrieval
# ---------------------------------------------------------------------------

@dataclass
class Retrieval:
    """The ``top`` best candidates of each query, best first: indices and scores [Q, top]."""
    indices: np.ndarray
    scores: np.ndarray


def retrieve(image_rep: RelativeRepresentation, text_rep: RelativeRepresentation, top: int = 5,
             direction: str = "image_to_text") -> Retrieval:
    """Rank texts for each image (``image_to_text``) or images for each text (``text_to_image``).

    Ties go to the lower candidate index.
    """
    if direction not in ("image_to_text", "text_to_image"):
        raise ASIFInputError(f"direction={direction!r}: use 'image_to_text' or 'text_to_image'")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ASIFInputError(f"top={top!r}: ask for at least one candidate")
    sim = similarity(image_rep, text_rep)
    sim = sim if direction == "image_to_text" else sim.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :top]
    return Retrieval(order, np.take_along_axis(sim, order, axis=1))


# ---------------------------------------------------------------------------
# 7. Explanations
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
# 8. The model: anchors, updates, save and load
# ---------------------------------------------------------------------------

class ASIF:
    """An image-text model made of coupled anchors; nothing is trained.

    anchor_images [N, d1] and anchor_texts [N, d2] (arrays or memmaps), row i
    of both from the same image-caption pair. Updating the model means
    adding or removing pairs: only new anchors need encoding. ``centre=True``
    centres both modalities on their anchors' mean (``anchor_centre``),
    recomputed when the anchors change; False is the paper's method.
    """

    def __init__(self, anchor_images, anchor_texts, non_zeros: int = 800, exponent: float = 8.0, *,
                 captions: Sequence[str] | None = None, device="auto", dtype=None,
                 block_size: int | None = None, memory_budget: int | None = None, meta: dict | None = None,
                 first_pass: str = "auto", centre: bool = False):
        check_anchors(anchor_images, anchor_texts, full_scan=_is_in_memory(anchor_images))
        self.anchor_images, self.anchor_texts = anchor_images, anchor_texts
        self.non_zeros, self.exponent = _check_k(non_zeros), _check_exponent(exponent)
        if captions is not None and len(captions) != _shape(anchor_images)[0]:
            raise ASIFInputError(f"captions: {len(captions)} for {_shape(anchor_images)[0]} anchors; give one per pair")
        self.captions = list(captions) if captions is not None else None
        self.compute = Compute.of(device, dtype, block_size, memory_budget, first_pass=first_pass)
        self.meta = dict(meta or {})
        if not isinstance(centre, (bool, np.bool_)):
            raise ASIFInputError(f"centre={centre!r}: use True (centre on the anchors' mean) or False")
        self.centre = bool(centre)
        if self.centre and self.n_anchors < 2:
            raise ASIFInputError("centre=True needs at least 2 anchors; add pairs or use centre=False")
        self._centre_vectors = None  # (image [d1], text [d2]), computed on first use

    @property
    def centres(self) -> tuple:
        """(image centre [d1], text centre [d2]) when ``centre``, else (None, None)."""
        if self.centre and self._centre_vectors is None:
            self._centre_vectors = _centres(True, self.anchor_images, self.anchor_texts, self.n_anchors,
                                            self.compute.dtype)
        return self._centre_vectors if self.centre else (None, None)

    @property
    def n_anchors(self) -> int:
        return int(_shape(self.anchor_images)[0])

    def _represent(self, x, anchors, name, anchor_name) -> RelativeRepresentation:
        check_embeddings(x, name, dim=_shape(anchors)[1], full_scan=False, against=anchor_name)
        c = self.centres[0 if anchor_name == "anchor_images" else 1]
        job = StreamJob(anchors, anchor_name, _normalized_block(x, self.compute, name, 0, centre=c), centre=c)
        top, = _stream([job], self.non_zeros, [self.n_anchors], self.compute)[0]
        return sharpen(top, self.exponent)

    def image_representation(self, images) -> RelativeRepresentation:
        """r(x) for images [Q, d1]."""
        return self._represent(images, self.anchor_images, "images", "anchor_images")

    def text_representation(self, texts) -> RelativeRepresentation:
        """r(t) for texts [Q, d2]."""
        return self._represent(texts, self.anchor_texts, "texts", "anchor_texts")

    def similarity(self, images, texts) -> np.ndarray:
        """[Q_img, Q_txt] ASIF similarity of image embeddings [Q_img, d1] and text embeddings [Q_txt, d2]."""
        return similarity(self.image_representation(images), self.text_representation(texts))

    def classify(self, images, prompts, n_classes: int, reduce: str = "max") -> np.ndarray:
        """Class scores [Q, C] for images [Q, d1] and class-major prompts [C*T, d2]."""
        return class_scores(self.image_representation(images), self.text_representation(prompts), n_classes, reduce)

    def retrieve(self, images, texts, top: int = 5, direction: str = "image_to_text") -> Retrieval:
        """The best ``top`` texts per image (or images per text) by ASIF similarity."""
        return retrieve(self.image_representation(images), self.text_representation(texts), top, direction)

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
        """Append coupled pairs [n, d1], [n, d2]; the existing anchors are kept as they are."""
        check_anchors(anchor_images, anchor_texts)
        check_embeddings(anchor_images, "anchor_images", dim=_shape(self.anchor_images)[1], full_scan=False,
                         against="the model's anchor images")
        check_embeddings(anchor_texts, "anchor_texts", dim=_shape(self.anchor_texts)[1], full_scan=False,
                         against="the model's anchor texts")
        if (captions is None) != (self.captions is None):
            raise ASIFInputError("captions: give captions for the new pairs exactly when the model has captions")
        if captions is not None and len(captions) != _shape(anchor_images)[0]:
            raise ASIFInputError("captions: give one caption per new pair")

        def grown(old, new):
            old = np.asarray(old)
            return np.concatenate([old, np.asarray(new, dtype=old.dtype)])
        self.anchor_images = grown(self.anchor_images, anchor_images)
        self.anchor_texts = grown(self.anchor_texts, anchor_texts)
        if captions is not None:
            self.captions.extend(captions)
        self._centre_vectors = None
        return self

    def remove_anchors(self, indices: Sequence[int]) -> "ASIF":
        """Drop the pairs at ``indices``; the order of the rest is kept."""
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= self.n_anchors):
            raise ASIFInputError(f"remove_anchors: indices must lie in 0..{self.n_anchors - 1}")
        if idx.size >= self.n_anchors - (1 if self.centre else 0):
            raise ASIFInputError("remove_anchors: this would remove every anchor; keep at least one pair "
                                 "(two with centre=True)")
        keep = np.ones(self.n_anchors, dtype=bool)
        keep[idx] = False
        self.anchor_images = np.asarray(self.anchor_images)[keep]
        self.anchor_texts = np.asarray(self.anchor_texts)[keep]
        if self.captions is not None:
            self.captions = [c for c, kept in zip(self.captions, keep) if kept]
        self._centre_vectors = None
        return self

    def save(self, folder) -> None:
        """Write the anchor set as folder/{image,text}/ embedding sets plus manifest.json.

        Built beside the target and swapped in whole: an interrupted save
        leaves the old anchor set intact.
        """
        with storage.atomic_folder(folder) as tmp:
            storage.save_embedding_set(tmp / "image", self.anchor_images, self.meta.get("image", {}))
            storage.save_embedding_set(tmp / "text", self.anchor_texts, self.meta.get("text", {}),
                                       captions=self.captions)
            storage.atomic_write_json(tmp / "manifest.json", {
                "format": ANCHOR_SET_FORMAT, "count": self.n_anchors,
                "non_zeros": self.non_zeros, "exponent": self.exponent, "centre": self.centre,
                **{k: v for k, v in self.meta.items() if k not in ("image", "text")}})

    @classmethod
    def load(cls, folder, verify: bool = False, **kwargs) -> "ASIF":
        """Open an anchor set saved by ``save``; anchors stay memory-mapped."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            raise ASIFInputError(f"{folder}: no manifest.json; not an anchor set folder (write one with ASIF.save)")
        manifest = storage.read_json(path)  # names the file when it is truncated or not JSON
        if not isinstance(manifest, dict) or manifest.get("format") != ANCHOR_SET_FORMAT:
            raise ASIFInputError(f"{folder}: manifest.json is not that of an anchor set ({ANCHOR_SET_FORMAT!r})")
        img = storage.load_embedding_set(folder / "image", verify)
        txt = storage.load_embedding_set(folder / "text", verify)
        # anchor sets saved before centring existed are the paper's method
        params = {"non_zeros": manifest["non_zeros"], "exponent": manifest["exponent"],
                  "centre": bool(manifest.get("centre", False)), **kwargs}
        layout = ("format", "count", "dim", "dtype", "shards")
        meta = {k: v for k, v in manifest.items() if k not in ("format", "count", "non_zeros", "exponent", "centre")}
        meta["image"] = {k: v for k, v in img.manifest.items() if k not in layout}
        meta["text"] = {k: v for k, v in txt.manifest.items() if k not in layout}
        return cls(img.array, txt.array, captions=txt.captions, meta=meta, **params)
