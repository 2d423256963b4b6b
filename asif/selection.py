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

  ``RowBuffers``         float32/float64 blocks of similarities (the plain
                         pass): the buffers above.
  ``BoundedRowBuffers``  bfloat16 blocks seen as int16 keys (the exact
                         bfloat16 first pass, asif.precision): entries are
                         kept as intervals, compacted by bounds, and only
                         those still in play when an exact state is needed
                         are recomputed, block by block, from the anchors.

Shapes: ``Q`` query rows, ``b`` anchors in the block, ``k`` kept per row.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from asif import precision
from asif.config import compiled_kernels, numba_module

__all__ = ["RowBuffers", "kernels", "available"]

_KERNELS = None


def _compact(v, i, n, k):  # pragma: no cover (compiled)
    # The k best of v[:n], i[:n] in place, ties to the earlier entry (lower anchor index). Returns the k-th value.
    if n > k + 256:
        # Entries below a lower bound of the k-th value are out (strictly below it): dropping them
        # first leaves ~k for the exact selection, which costs ~10 ns per entry here.
        low = kth_lower_bound(v, n, k)
        w = 0
        for x in range(n):
            if v[x] >= low:
                v[w] = v[x]
                i[w] = i[x]
                w += 1
        n = w
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


def _lower(v, exact, e, rel):  # pragma: no cover (compiled)
    # The lower bound of an entry's exact value: itself once recomputed, else the bound of
    # asif.precision below its bfloat16 value (negatives count as 0, as everywhere).
    s = np.float64(v)
    if exact:
        return s
    return max(s - e - rel * abs(s), 0.0)


def _reach(low, e, rel, margin):  # pragma: no cover (compiled)
    # A bfloat16 value can reach L iff it is above this (asif.precision.candidate_threshold,
    # inclusive of hi == L through its margin). Values count as max(S, 0): with L <= 0, all do.
    if low <= 0:
        return -np.inf
    return candidate_threshold(low, e, rel, margin)


def _count_at_least(lo, n, t):  # pragma: no cover (compiled)
    c = 0
    for x in range(n):
        c += lo[x] >= t
    return c


def _kth_lower_bound(lo, n, k):  # pragma: no cover (compiled)
    # A value L <= the k-th largest of lo[:n] (n >= k), close to it: at least k entries are >= L,
    # which is all that a bound needs. An exact selection costs ~40 us for 4k entries here;
    # this searches a sorted sample of 128 with counting passes (~1 us each) and lands within
    # ~n/128 ranks of the k-th.
    m = min(n, 128)
    sample = np.empty(m, dtype=np.float64)
    for s in range(m):
        sample[s] = lo[(s * n) // m]
    sample.sort()
    if _count_at_least(lo, n, sample[0]) < k:
        best = sample[0]
        for x in range(n):
            best = min(best, lo[x])
        return best  # every entry is >= the minimum, and n >= k
    a, b = 0, m - 1  # count(lo >= sample[a]) >= k; find the largest such a
    while a < b:
        mid = (a + b + 1) >> 1
        if _count_at_least(lo, n, sample[mid]) >= k:
            a = mid
        else:
            b = mid - 1
    return sample[a]


def _reaches(v, exact, low, thr):  # pragma: no cover (compiled)
    # Whether an entry can reach L (``low``): a recomputed value iff v >= L, a bfloat16 one iff
    # v > thr, with thr = reach(L) (its upper bound is then >= L).
    return v >= low if exact else v > thr


def _keep_reaching(v, ex, i, n, low, thr):  # pragma: no cover (compiled)
    # The entries of v[:n], ex[:n], i[:n] that can reach L, moved to the front in buffer order; returns their count.
    w = 0
    for x in range(n):
        if reaches(v[x], ex[x], low, thr):
            v[w] = v[x]
            ex[w] = ex[x]
            i[w] = i[x]
            w += 1
    return w


def _compact_bounded(v, ex, i, n, k, e, rel, margin):  # pragma: no cover (compiled)
    # Keep, in buffer order, every entry whose interval reaches L, the k-th largest lower bound;
    # returns (kept, L). The buffer holds k entries worth at least L each, so the row's true k-th
    # value t >= L: an entry whose upper bound is below L is below t and can never be in the top-k.
    lo = np.empty(n, dtype=np.float64)
    for x in range(n):
        lo[x] = lower(v[x], ex[x], e, rel)
    low = kth_lower_bound(lo, n, k)
    return keep_reaching(v, ex, i, n, low, reach(low, e, rel, margin)), low


def _absorb_bounded(keys, done, offset, err, rel, margin, buf_v, buf_x, buf_i, fill, low, k, room):  # pragma: no cover
    # A bfloat16 block as int16 keys, rows with done[r] == 0. An entry is a candidate while its
    # interval can reach the row's L (``low``); nothing is recomputed here (``_resolve`` does, later,
    # for what is left). A row takes its block's candidates at once: if they overflow its buffer, L is
    # raised over buffer and candidates together and both are filtered by it, one compaction per
    # block at most. A row that would keep more than ``room`` entries is left as it was (done[r]
    # stays 0): the caller grows the buffers and calls again.
    b = keys.shape[1]
    cap = buf_v.shape[1]
    for r in prange(keys.shape[0]):
        if done[r]:
            continue
        n, lw, e = fill[r], low[r], err[r]
        v_row, x_row, i_row, k_row = buf_v[r], buf_x[r], buf_i[r], keys[r]
        floor = bf16_floor_key(reach(lw, e, rel, margin))  # all pass while L <= 0
        cand = np.empty(b, dtype=np.int32)
        c = 0
        for j in range(b):
            if np.int32(k_row[j]) > floor:  # the one compare most entries get
                cand[c] = j
                c += 1
        if c == 0:
            done[r] = 1
            continue
        vals = np.empty(c, dtype=np.float32)
        bits = vals.view(np.int32)  # a bfloat16's bits are the high half of the same float32's
        for x in range(c):
            bits[x] = np.int32(k_row[cand[x]]) << 16
        if n + c > cap:
            # L over the buffer and the candidates together, then keep what reaches it
            lo = np.empty(n + c, dtype=np.float64)
            for x in range(n):
                lo[x] = lower(v_row[x], x_row[x], e, rel)
            for x in range(c):
                lo[n + x] = lower(vals[x], 0, e, rel)
            lw = kth_lower_bound(lo, n + c, k)
            thr = reach(lw, e, rel, margin)
            kept = 0
            for x in range(n):
                kept += reaches(v_row[x], x_row[x], lw, thr)
            for x in range(c):
                kept += vals[x] > thr
            if kept > room:
                continue  # not done: more room first
            n = keep_reaching(v_row, x_row, i_row, n, lw, thr)
            for x in range(c):
                if vals[x] > thr:
                    v_row[n], x_row[n], i_row[n] = vals[x], 0, offset + cand[x]
                    n += 1
        else:
            for x in range(c):
                v_row[n], x_row[n], i_row[n] = vals[x], 0, offset + cand[x]
                n += 1
            if lw == -np.inf and n >= k:  # k held: from now on an entry must reach L
                n, lw = compact_bounded(v_row, x_row, i_row, n, k, e, rel, margin)
        fill[r], low[r], done[r] = n, lw, 1


def _tighten(err, rel, margin, buf_v, buf_x, buf_i, fill, low, k):  # pragma: no cover (compiled)
    # L raised over each row's buffer and what cannot reach it dropped: entries taken since the last
    # compaction were filtered by an older, lower L, and recomputing them would be wasted.
    for r in prange(buf_v.shape[0]):
        if fill[r] > k:
            fill[r], low[r] = compact_bounded(buf_v[r], buf_x[r], buf_i[r], fill[r], k, err[r], rel, margin)


def _resolve(q, block, offset, chunk, buf_v, buf_x, buf_i, fill, cursor):  # pragma: no cover (compiled)
    # Recompute exactly every held entry of anchors offset .. offset + len(block) - 1, a chunk of
    # anchor rows at a time (so that the rows read are in cache), query rows in parallel. Buffers
    # are in anchor order: cursor[r] walks row r's entries along the blocks.
    b = block.shape[0]
    for c0 in range(0, b, chunk):
        end = offset + min(b, c0 + chunk)
        for r in prange(buf_v.shape[0]):
            x, n, qr = cursor[r], fill[r], q[r]
            while x < n and buf_i[r, x] < end:
                if not buf_x[r, x] and buf_i[r, x] >= offset:  # (an entry before the block stays: resolve() raises)
                    buf_v[r, x] = max(np.float32(dot(qr, block[buf_i[r, x] - offset])), np.float32(0.0))
                    buf_x[r, x] = 1
                x += 1
            cursor[r] = x


def _finish_bounded(buf_v, buf_x, buf_i, fill, low, k, out_v, out_i):  # pragma: no cover (compiled)
    # Every entry exact (after ``_resolve``): the k best, ties to the lower index, copied out; L = t.
    for r in prange(buf_v.shape[0]):
        if fill[r] >= k:
            low[r] = compact(buf_v[r], buf_i[r], fill[r], k)  # moves values and indices ...
            fill[r] = k
            for x in range(k):
                buf_x[r, x] = 1  # ... every kept one exact
        for x in range(out_v.shape[1]):
            out_v[r, x] = buf_v[r, x]
            out_i[r, x] = buf_i[r, x]


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
lower = _lower
reaches = _reaches
keep_reaching = _keep_reaching
reach = _reach
kth_lower_bound = _kth_lower_bound
compact_bounded = _compact_bounded
candidate_threshold = precision.candidate_threshold
dot = None


def available() -> bool:
    """True when numba is there to compile the kernels (else the core selects with torch)."""
    return numba_module() is not None


def kernels():
    """(absorb, finish, absorb_bounded, resolve, finish_bounded, tighten), compiled once (numba, cached on disk)."""
    def build(numba):
        precision._kernels()  # the compiled dot, shared with exact_dots: one sum order for every pair
        g = globals()
        g["dot"] = precision.dot
        inline = numba.njit(cache=True, nogil=True, inline="always")
        g["_count_at_least"] = inline(_count_at_least)
        g["kth_lower_bound"] = numba.njit(cache=True, nogil=True)(_kth_lower_bound)
        g["compact"] = numba.njit(cache=True, nogil=True)(_compact)
        g["push"] = inline(_push)
        g["bf16_floor_key"] = inline(_bf16_floor_key)
        g["candidate_threshold"] = inline(precision.candidate_threshold)
        g["lower"] = inline(_lower)
        g["reach"] = inline(_reach)
        g["reaches"] = inline(_reaches)
        g["keep_reaching"] = inline(_keep_reaching)
        g["compact_bounded"] = numba.njit(cache=True, nogil=True)(_compact_bounded)
        jit = numba.njit(parallel=True, cache=True, nogil=True)
        # fastmath only where the compiled dot is inlined (it lets LLVM split the sum into SIMD lanes)
        return (jit(_absorb), jit(_finish), jit(_absorb_bounded),
                numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)(_resolve), jit(_finish_bounded),
                jit(_tighten))
    return compiled_kernels(globals(), build)


def empty(shape, dtype) -> np.ndarray:
    """np.empty through torch's allocator. Row buffers are large (~100 MB for 4k rows) and written
    once per call: numpy's fresh pages cost a fault each, ~0.26 s per 80 MB on the reference VM,
    while torch's large blocks get transparent huge pages (~0.03 s)."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype).numpy()


class RowBuffers:
    """The running top-k of Q rows: buffers [Q, 2k] in anchor order, fill [Q], tau [Q]."""

    def __init__(self, n_rows: int, k: int, dtype):
        self.k = k
        cap = 2 * k
        self.values = empty((n_rows, cap), dtype)
        self.indices = empty((n_rows, cap), np.int64)
        self.fill = np.zeros(n_rows, dtype=np.int64)
        self.tau = np.full(n_rows, -np.inf, dtype=dtype)

    def absorb(self, sims: np.ndarray, offset: int) -> None:
        """sims [Q, b]: similarities of the rows to anchors offset .. offset + b - 1."""
        kernels()[0](sims, offset, self.values, self.indices, self.fill, self.tau, self.k)

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) [Q, min(k, seen)]: the exact top-k now (order within a row: anchor order)."""
        # every row holds min(k, anchors seen): all entries enter until a row holds k
        n = min(self.k, int(self.fill[0])) if len(self.fill) else 0
        out_v = empty((len(self.fill), n), self.values.dtype)
        out_i = empty((len(self.fill), n), np.int64)
        kernels()[1](self.values, self.indices, self.fill, self.tau, self.k, out_v, out_i)
        return out_v, out_i


class BoundedRowBuffers:
    """The running top-k of Q rows from bfloat16 blocks, exact (asif.precision), recomputing lazily.

    Per row a buffer in anchor order of entries (value, exact?, anchor
    index): an entry is its bfloat16 value until recomputed, standing for
    the interval [lo, hi] that the proven bound puts around it. ``low`` [Q]
    is L, the k-th largest lower bound held; entries whose hi < L are
    dropped as the buffer fills, and new ones enter only if hi >= L. So the
    buffer always holds every anchor that can be in the exact top-k.
    ``resolve`` recomputes the held entries of a block of anchor rows
    (replayed by the caller, normalised as in the stream) and ``top`` then
    gives the exact top-k: what a stream recomputes is the final band,
    about k plus the entries within the bound of the k-th value (~1.5k per
    row at k = 800, d = 768), not every entry that passed a running k-th
    value on the way (~k (1 + ln(N/k)), 5k for N = 200k).
    """

    CAPACITY = 4.0  # entries a row holds, in units of k: ~1.4k are in play at k = 800 (benchmarks/README.md)

    def __init__(self, queries: np.ndarray, error: np.ndarray, k: int):
        self.queries = queries            # [Q, d] float32, normalised: what values are recomputed with
        self.error = error                # [Q] float64 e_q (precision.error_bound)
        self.k = k
        q, cap = len(queries), max(k + 2, int(self.CAPACITY * k))
        self.values = empty((q, cap), np.float32)
        self.exact = empty((q, cap), np.uint8)      # 1: the value is recomputed, exact
        self.indices = empty((q, cap), np.int64)
        self.fill = np.zeros(q, dtype=np.int64)
        self.low = np.full(q, -np.inf, dtype=np.float64)

    def _grow(self) -> None:
        """Twice the room for every row, entries kept."""
        w = self.values.shape[1]
        for name in ("values", "exact", "indices"):
            old = getattr(self, name)
            new = empty((old.shape[0], 2 * w), old.dtype)
            new[:, :w] = old
            setattr(self, name, new)

    def absorb(self, keys: np.ndarray, offset: int) -> None:
        """keys [Q, b] int16: the bits of a bfloat16 product with anchors offset .. offset + b - 1."""
        done = np.zeros(len(keys), dtype=np.uint8)
        while True:
            cap = self.values.shape[1]
            kernels()[2](keys, done, offset, self.error, precision.OUTPUT_REL, precision.MARGIN, self.values,
                         self.exact, self.indices, self.fill, self.low, self.k, (3 * cap) // 4)
            if done.all():
                return
            # some row would keep more than 3/4 of its buffer in play (similarities crowd its k-th
            # value): twice the room for every row, then those rows take the block again
            self._grow()

    def resolve(self, blocks) -> None:
        """Recompute every held entry exactly. ``blocks``: (offset, rows [b, d] float32) in anchor order,
        covering every anchor whose entry may still be a bfloat16 value, normalised as the stream did."""
        kernels()[5](self.error, precision.OUTPUT_REL, precision.MARGIN, self.values, self.exact, self.indices,
                     self.fill, self.low, self.k)
        cursor = np.zeros(len(self.fill), dtype=np.int64)
        for offset, rows in blocks:
            kernels()[3](self.queries, rows, offset, precision.RESOLVE_CHUNK, self.values, self.exact, self.indices,
                         self.fill, cursor)
        held = np.arange(self.values.shape[1]) < self.fill[:, None]
        if not self.exact[held].all():  # a block was left out of the replay: never give a bfloat16 value
            raise RuntimeError("BoundedRowBuffers.resolve: some held entries were not recomputed; "
                               "replay every block absorbed since the last resolve")

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) [Q, min(k, seen)] once resolved: the exact top-k (order within a row: anchor order)."""
        n = min(self.k, int(self.fill[0])) if len(self.fill) else 0
        out_v = empty((len(self.fill), n), np.float32)
        out_i = empty((len(self.fill), n), np.int64)
        kernels()[4](self.values, self.exact, self.indices, self.fill, self.low, self.k, out_v, out_i)
        return out_v, out_i
