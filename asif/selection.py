"""The exact running top-k on the CPU, compiled: one pass over each block of similarities.

The stream's cost is the product ``queries @ block.T``; selection must stay
small beside it. Each query row keeps a buffer of at most ``2k`` entries
(value, anchor index) in anchor order, and a threshold ``tau``: the k-th
value of the row's entries once it holds k (-inf before, so that every
entry enters while the first k arrive; values are clamped at 0: negatives
count as 0). An entry
of a new block enters only if its value is strictly above ``tau``: a later
anchor that ties an earlier one loses, as the paper's ``topk`` over the
whole row would have it with ties to the lower index. When a buffer is full
it is compacted to its k best in place: the k-th value ``t`` is found by a
partition, every entry above ``t`` stays, and entries equal to ``t`` stay in
buffer order (lowest anchor index first, since the buffer is in anchor
order) until there are k. ``tau`` then rises to ``t``.

Two ways to feed it, rows in parallel:

  ``absorb``      a float32/float64 block of similarities (the plain pass)
  ``absorb_bf16`` a bfloat16 block seen as int16 keys: only entries above a
                  candidate threshold are recomputed exactly (asif.precision)
                  and offered; the threshold follows ``tau`` as it rises.

Shapes: ``Q`` query rows, ``b`` anchors in the block, ``k`` kept per row.
"""
from __future__ import annotations

import math

import numpy as np

from asif import precision
from asif.config import compiled_kernels, numba_module

__all__ = ["RowBuffers", "kernels", "available"]

_KERNELS = None


def _compact(v, i, n, k):  # pragma: no cover (compiled)
    # The k best of v[:n], i[:n] in place, ties to the earlier entry (lower anchor index). Returns the k-th value.
    t = np.partition(v[:n].copy(), n - k)[n - k]
    greater = 0
    for x in range(n):
        if v[x] > t:
            greater += 1
    ties = k - greater
    w = 0
    for x in range(n):
        keep = v[x] > t
        if not keep and v[x] == t and ties > 0:
            keep = True
            ties -= 1
        if keep:
            v[w] = v[x]
            i[w] = i[x]
            w += 1
    return t


def _bf16_floor_key(thr):  # pragma: no cover (compiled)
    # The int16 key (bfloat16 bits) of the largest bfloat16 <= thr, for thr >= 0; below every
    # key when thr < 0 (then all entries are candidates). thr = m 2^ex, m in [0.5, 1): the
    # bfloat16 below it keeps the top 8 bits of m.
    if thr < 0:
        return -40000
    m, ex = math.frexp(thr)
    biased = ex - 1 + 127
    if thr == 0 or biased <= 0:
        return 0  # zero, or below the normal range: +0.0 is at or below it
    if biased >= 255:
        return 0x7F7F  # the largest finite bfloat16
    return (biased << 7) | (int(math.floor(m * 256.0)) - 128)


def _push(v_row, i_row, n, t, v, idx, k):  # pragma: no cover (compiled)
    # Append (v, idx) to a row holding n entries above t, compacting first when full; returns (n, t).
    if n == v_row.shape[0]:
        t = compact(v_row, i_row, n, k)
        n = k
        if not v > t:
            return n, t
    v_row[n] = v
    i_row[n] = idx
    n += 1
    if n == k and t == -np.inf:
        t = compact(v_row, i_row, n, k)  # k held: from now on an entry must beat the k-th
    return n, t


def _absorb(sims, offset, buf_v, buf_i, fill, tau, k):  # pragma: no cover (compiled)
    for r in prange(sims.shape[0]):
        n, t = fill[r], tau[r]
        v_row, i_row = buf_v[r], buf_i[r]
        for j in range(sims.shape[1]):
            v = sims[r, j]
            if v > t:  # every entry while the row fills (t = -inf); negatives then count as 0
                n, t = push(v_row, i_row, n, t, max(v, 0.0), offset + j, k)
        fill[r], tau[r] = n, t


def _absorb_bf16(keys, q, block, err, rel, margin, offset, buf_v, buf_i, fill, tau, k):  # pragma: no cover
    for r in prange(keys.shape[0]):
        n, t, qr = fill[r], tau[r], q[r]
        v_row, i_row = buf_v[r], buf_i[r]
        floor = bf16_floor_key(candidate_threshold(t, err[r], rel, margin))  # all pass while t = -inf
        for j in range(keys.shape[1]):
            if np.int32(keys[r, j]) > floor:
                v = max(np.float32(dot(qr, block[j])), np.float32(0.0))  # exact (asif.precision.exact_dots)
                if v > t:
                    before = t
                    n, t = push(v_row, i_row, n, t, v, offset + j, k)
                    if t != before:  # the threshold rose: so does the candidate test
                        floor = bf16_floor_key(candidate_threshold(t, err[r], rel, margin))
        fill[r], tau[r] = n, t


def _finish(buf_v, buf_i, fill, tau, k, out_v, out_i):  # pragma: no cover (compiled)
    # Compact every row to its k best and copy them out, rows in parallel.
    for r in prange(buf_v.shape[0]):
        if fill[r] > k:
            tau[r] = compact(buf_v[r], buf_i[r], fill[r], k)
            fill[r] = k
        for x in range(out_v.shape[1]):
            out_v[r, x] = buf_v[r, x]
            out_i[r, x] = buf_i[r, x]


prange = range
compact = _compact
push = _push
bf16_floor_key = _bf16_floor_key
candidate_threshold = precision.candidate_threshold
dot = None


def available() -> bool:
    """True when numba is there to compile the kernels (else the core selects with torch)."""
    return numba_module() is not None


def kernels():
    """(absorb, absorb_bf16, finish), compiled once (numba, cached on disk)."""
    def build(numba):
        precision._kernels()  # the compiled dot, shared with exact_dots: one sum order for every pair
        g = globals()
        g["dot"] = precision.dot
        inline = numba.njit(cache=True, nogil=True, inline="always")
        g["compact"] = numba.njit(cache=True, nogil=True)(_compact)
        g["push"] = inline(_push)
        g["bf16_floor_key"] = inline(_bf16_floor_key)
        g["candidate_threshold"] = inline(precision.candidate_threshold)
        jit = numba.njit(parallel=True, cache=True, nogil=True)
        return (jit(_absorb), numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)(_absorb_bf16),
                jit(_finish))
    return compiled_kernels(globals(), build)


class RowBuffers:
    """The running top-k of Q rows: buffers [Q, 2k] in anchor order, fill [Q], tau [Q]."""

    def __init__(self, n_rows: int, k: int, dtype):
        self.k = k
        cap = 2 * k
        self.values = np.empty((n_rows, cap), dtype=dtype)
        self.indices = np.empty((n_rows, cap), dtype=np.int64)
        self.fill = np.zeros(n_rows, dtype=np.int64)
        self.tau = np.full(n_rows, -np.inf, dtype=dtype)

    def absorb(self, sims: np.ndarray, offset: int) -> None:
        """sims [Q, b]: similarities of the rows to anchors offset .. offset + b - 1."""
        kernels()[0](sims, offset, self.values, self.indices, self.fill, self.tau, self.k)

    def absorb_bf16(self, keys: np.ndarray, queries: np.ndarray, block: np.ndarray, err: np.ndarray,
                    offset: int) -> None:
        """keys [Q, b] int16 (a bfloat16 product's bits); queries [Q, d], block [b, d] float32; err [Q]."""
        kernels()[1](keys, queries, block, err, precision.OUTPUT_REL, precision.MARGIN, offset, self.values,
                     self.indices, self.fill, self.tau, self.k)

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) [Q, min(k, seen)]: the exact top-k now (order within a row: anchor order)."""
        # every row holds min(k, anchors seen): all entries enter until a row holds k
        n = min(self.k, int(self.fill[0])) if len(self.fill) else 0
        out_v = np.empty((len(self.fill), n), dtype=self.values.dtype)
        out_i = np.empty((len(self.fill), n), dtype=np.int64)
        kernels()[2](self.values, self.indices, self.fill, self.tau, self.k, out_v, out_i)
        return out_v, out_i
