"""The scoring engine: dense ``[Qa, Qb] = <a_i, b_j>`` for sparse rows over the same anchors.

ASIF's relative representations are sparse: k of N entries per row. The
score of an image and a text is the dot product of their rows, and a
classification or a similarity matrix needs it for every pair. This module
computes that product exactly, choosing per anchor between two ways:

  dense   anchors that sit in many top-k lists on both sides (hubs; all of
          them when there are few anchors) go into one BLAS product over
          those columns
  sparse  the rest into a tiled numba kernel (scipy without numba) that
          adds each shared anchor's outer product into the output

A cost model, in units of one sparse update, picks all-dense, all-sparse
or hubs-dense-plus-rest-sparse. On a GPU everything goes dense.

Shapes: ``Qa``/``Qb`` rows of either side, ``N`` anchors, ``nnz`` entries.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from asif.config import compiled_kernels

__all__ = ["Entries", "entries_from_topk", "class_means", "product", "forced", "sparse_kernels_available",
           "SPARSE_OP_COST"]

# A sparse accumulation costs about this many dense (BLAS) multiply-adds on
# the CPU; calibrated with benchmarks/bench_core.py on the reference machine.
SPARSE_OP_COST = 25.0
# A sparse product also costs about this many sparse ops per output entry.
SPARSE_FLOOR = 1.0
# Writing one entry of a dense copy (zero fill + scatter), in sparse-op units.
DENSIFY_COST = 0.1
# Splitting the entries into a dense and a sparse part, per entry of either side.
SPLIT_COST = 10.0
DENSE_COPY_BUDGET = 1 << 30   # bytes for the dense copies of the hub columns on the CPU
SPARSE_MAX_POINTERS = 1 << 25  # per side of the sparse kernel, int64 each


@dataclass
class _Forced:
    """Choices the tests force to check that every way gives the same numbers."""
    way: str | None = None          # "dense", "sparse" or "mixed" instead of the cost model's choice
    dense_rows: int | None = None   # the row chunking a GPU uses when its memory is short
    backend: str | None = None      # "scipy" instead of the numba kernel
    tiles: tuple | None = None      # small output tiles, so that several tiles meet in the kernel


FORCED = _Forced()


@contextlib.contextmanager
def forced(**choices):
    """Force ``way``, ``dense_rows``, ``backend`` or ``tiles`` inside a ``with`` block (tests)."""
    old = dict(vars(FORCED))
    unknown = set(choices) - set(old)
    if unknown:
        raise TypeError(f"forced: unknown choice {sorted(unknown)}; known: {sorted(old)}")
    try:
        for k, v in choices.items():
            setattr(FORCED, k, v)
        yield FORCED
    finally:
        for k, v in old.items():
            setattr(FORCED, k, v)


@dataclass
class Entries:
    """A sparse [n_rows, N] matrix as coordinate lists without duplicates: rows, cols, vals [nnz].

    rows ascend. ``topk`` is the (indices [n_rows, k], values [n_rows, k])
    form when the entries came from one: a dense copy is then one scatter.
    """
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple
    topk: tuple[torch.Tensor, torch.Tensor] | None = None


def entries_from_topk(indices: torch.Tensor, values: torch.Tensor, n_anchors: int) -> Entries:
    """The entries of a top-k form ``indices, values: [Q, k]`` (distinct indices per row).

    Entries whose value is 0 (clamped negatives, underflowed powers) are
    kept: they add nothing, and dropping them would cost a masked copy of
    every array, more than they cost in either product.
    """
    q, k = indices.shape
    rows = torch.arange(q, device=indices.device).repeat_interleave(k)
    return Entries(rows, indices.reshape(-1), values.reshape(-1), (q, n_anchors), (indices, values))


def class_means(e: Entries, n_classes: int) -> Entries:
    """Prompt ensemble: per class the mean of its templates' rows, re-normalised. Sparse [C, N].

    ``e`` holds C*T rows, class-major (row r belongs to class r // T).
    """
    t = e.shape[0] // n_classes
    n = e.shape[1]
    m = torch.sparse_coo_tensor(torch.stack([e.rows // t, e.cols]), e.vals / t, (n_classes, n),
                                check_invariants=False).coalesce()  # sums the templates' shared anchors
    rows, cols = m.indices()
    norms = torch.zeros(n_classes, dtype=m.dtype, device=m.device).index_add_(0, rows, m.values() ** 2).sqrt()
    return Entries(rows, cols, m.values() / norms.clamp_min(1e-30)[rows], (n_classes, n))


# ---------------------------------------------------------------------------
# the sparse kernel
# ---------------------------------------------------------------------------

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
    return compiled_kernels(globals(), lambda numba: (numba.njit(parallel=True, cache=True, nogil=True)(_bucket_by_tile),
                                                      numba.njit(parallel=True, cache=True, nogil=True)(_tiled_product)))


def sparse_kernels_available() -> bool:
    """True when the numba kernel is there (else scipy computes the sparse part, slower)."""
    return bool(_sparse_kernels())


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


def sparse_tiles(a: Entries, b: Entries) -> tuple[int, int]:
    """Output tile (rows, cols) for the numba product.

    Many updates per output entry (few anchors): small tiles that stay in
    the core's cache. Few (many anchors): large tiles, since the kernel
    walks all N anchors once per pair of tiles.
    """
    if FORCED.tiles:
        return FORCED.tiles
    (qa, n), qb = a.shape, b.shape[0]
    per_entry = len(a.vals) * len(b.vals) / max(1, n * qa * qb)  # updates per output entry, anchors alike
    ta, tb = (256, 512) if per_entry > 30 else (512, 1024)
    # Each side's pointers take n_tiles * N entries: within SPARSE_MAX_POINTERS (256 MiB) however
    # many queries and anchors (50k images against 1.6M anchors would otherwise need 1.2 GB).
    max_tiles = max(1, SPARSE_MAX_POINTERS // max(n, 1))
    ta, tb = max(ta, -(-qa // max_tiles)), max(tb, -(-qb // max_tiles))
    return min(ta, max(qa, 1)), min(tb, max(qb, 1))


def _bucket(kernel, m: Entries, tile: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m's entries sorted by (tile of rows, anchor): pointers [n_tiles * N + 1], tile-local rows, values."""
    n, rows = m.shape[1], m.rows.numpy()
    n_tiles = -(-m.shape[0] // tile)
    starts = np.searchsorted(rows, np.arange(n_tiles + 1) * tile)  # rows ascend
    ptr = np.zeros(n_tiles * n + 1, dtype=np.int64)
    out_rows, out_vals = np.empty(len(rows), dtype=np.int32), np.empty(len(rows), dtype=dtype)
    kernel(rows, m.cols.numpy(), m.vals.numpy().astype(dtype, copy=False), n, tile, starts, ptr, out_rows, out_vals)
    return ptr, out_rows, out_vals


def _sparse_product(a: Entries, b: Entries) -> np.ndarray:
    """Dense [Qa, Qb] = a @ b.T on the CPU: the numba kernels, else scipy."""
    kernels = _sparse_kernels() if FORCED.backend != "scipy" else False
    if not kernels:
        return (_csr(a) @ _csr(b).T).toarray()
    bucket, tiled = kernels
    (qa, n), qb = a.shape, b.shape[0]
    dtype = np.result_type(a.vals.numpy().dtype, b.vals.numpy().dtype)
    ta, tb = sparse_tiles(a, b)
    out = np.zeros((qa, qb), dtype=dtype)
    if qa and qb and n:
        tiled(*_bucket(bucket, a, ta, dtype), *_bucket(bucket, b, tb, dtype), n, ta, tb, out)
    return out


def _csr(m: Entries):
    """scipy CSR of entries whose rows are in ascending order (as entries_from_topk and coalesce give them).

    Built from the row pointers directly: no sorting, no duplicate pass.
    """
    import scipy.sparse as sp
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(m.rows.numpy(), minlength=m.shape[0]), out=indptr[1:])
    return sp.csr_matrix((m.vals.numpy(), m.cols.numpy(), indptr), shape=m.shape)


# ---------------------------------------------------------------------------
# the product, dense and sparse parts chosen by cost
# ---------------------------------------------------------------------------

def _choose_hubs(a: Entries, b: Entries, ca: torch.Tensor, cb: torch.Tensor, budget: int) -> torch.Tensor | None:
    """bool [N]: the anchors that go into the dense product (None: everything sparse).

    Costs in sparse-op units: a sparse product pays per multiply-add and a
    floor per output entry (accumulators, the dense copy); a dense one pays
    Qa*Qb per anchor column at BLAS speed. The cheapest of all dense, all
    sparse, and hubs dense + the rest sparse wins.
    """
    (qa, n), qb = a.shape, b.shape[0]
    shared = (ca > 0) & (cb > 0)
    if a.vals.device.type == "cuda":
        return shared  # a GPU does dense products so fast that all anchors go there
    ops = ca.double() * cb.double()
    per_column = qa * qb / SPARSE_OP_COST + (qa + qb) * DENSIFY_COST  # product + the dense copies
    hub = ops > per_column
    floor = SPARSE_FLOOR * qa * qb
    costs = {"dense": per_column * float(shared.sum()),
             "sparse": float(ops.sum()) + floor,
             "mixed": (per_column * float(hub.sum()) + float(ops[~hub].sum()) + floor
                       + SPLIT_COST * (len(a.vals) + len(b.vals)))}
    way = FORCED.way or min(costs, key=costs.get)
    if way == "sparse":
        return None
    if way == "dense":
        hub = shared
    if int(hub.sum()) * (qa + qb) * 4 > budget:  # keep the dense part within memory
        order = torch.argsort(ca * cb, descending=True)[: budget // (4 * (qa + qb))]
        hub = torch.zeros(n, dtype=torch.bool, device=ca.device)
        hub[order] = True
        hub &= shared
    return hub


def product(a: Entries, b: Entries, memory_budget: int | None = None) -> torch.Tensor:
    """Dense [Qa, Qb] = a @ b.T for sparse a [Qa, N], b [Qb, N], exactly.

    sum_j a[:, j] b[:, j]^T splits over anchors j, and each anchor's term is
    computed the cheaper of the two ways (see the module docstring).
    """
    (qa, n), qb = a.shape, b.shape[0]
    dev = a.vals.device
    out_dtype = torch.promote_types(a.vals.dtype, b.vals.dtype)
    budget = memory_budget or DENSE_COPY_BUDGET
    ca = torch.bincount(a.cols, minlength=n)
    cb = torch.bincount(b.cols, minlength=n)
    hub = _choose_hubs(a, b, ca, cb, budget)
    if hub is None:
        return torch.from_numpy(_sparse_product(a, b)).to(out_dtype)
    out = torch.zeros(qa, qb, dtype=out_dtype, device=dev)
    u = int(hub.sum())
    if u:
        # Hub columns renumbered 0..u-1; every other anchor goes to a spare
        # column u that the product leaves out, so no entry needs masking.
        # When (nearly) every anchor is a hub, the columns stay as they are
        # and a top-k form is densified with one scatter.
        whole = u == n or (u * 5 >= n * 4 and n * (qa + qb) * 4 <= budget)
        col = None
        if not whole:
            col = torch.full((n,), u, dtype=torch.long, device=dev)
            col[hub] = torch.arange(u, device=dev)
        tb = _densify(b, 0, qb, whole, col, u).T
        # On a GPU the union of used anchors can be large: image rows go in
        # chunks that fit half the free memory beside the text side.
        rows = FORCED.dense_rows or qa
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            rows = max(1, min(qa, (free // 2) // (4 * (tb.shape[0] + 1)) - qb))
        for lo in range(0, qa, rows):
            hi = min(qa, lo + rows)
            torch.addmm(out[lo:hi], _densify(a, lo, hi, whole, col, u), tb, out=out[lo:hi])  # no [rows, Qb] temporary
        if whole:
            return out  # every anchor went into the dense product
    rest = ~hub[b.cols] & (ca[b.cols] > 0)  # empty on CUDA, where every shared anchor is a hub
    if bool(rest.any()):
        # the numba kernel (or scipy) is several times faster than torch's sparse product on the CPU
        sb = Entries(b.rows[rest], b.cols[rest], b.vals[rest], b.shape)
        out += torch.from_numpy(_sparse_product(a, sb)).to(out_dtype)
    return out


def _densify(m: Entries, lo: int, hi: int, whole: bool, col: torch.Tensor | None, u: int) -> torch.Tensor:
    """Rows lo..hi of m as a dense [hi - lo, u] matrix over the hub columns (all N when ``whole``)."""
    n, dev = m.shape[1], m.vals.device
    if whole and m.topk is not None:
        idx, val = m.topk
        return torch.zeros(hi - lo, n, dtype=val.dtype, device=dev).scatter_(1, idx[lo:hi], val[lo:hi])
    s, e = (int(i) for i in torch.searchsorted(m.rows, torch.tensor([lo, hi], device=dev)))  # rows ascend
    width = n if whole else u + 1
    d = torch.zeros(hi - lo, width, dtype=m.vals.dtype, device=dev)
    d.view(-1)[(m.rows[s:e] - lo) * width + (m.cols[s:e] if whole else col[m.cols[s:e]])] = m.vals[s:e]
    return d if whole else d[:, :u]
