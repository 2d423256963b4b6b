"""An exact top-k from a bfloat16 first pass: the error bound, the detection, the fp64 recomputation.

Cost of ASIF is the products ``queries @ anchors.T``. CPUs with AMX or
AVX512-BF16 multiply bfloat16 matrices several times faster than float32
ones, but a bfloat16 similarity is off by up to ~1e-2, enough to swap
anchors near a query's k-th value. The core therefore uses the bfloat16
product only to *find candidates*: every entry whose true similarity could
still be in the top-k is kept, the kept ones are recomputed exactly when an
exact state is needed, and only recomputed values are given out. The
result is the top-k of

    v(q, a) = float32( sum_i float64(q_i) * float64(a_i) )

for the float32 normalised vectors q, a: the similarity rounded once, a
deterministic value that does not depend on block sizes or BLAS kernels.

The bound (why no entry of the true top-k is missed)
----------------------------------------------------
Let q, a be the float32 normalised query and anchor, S = <q, a> exactly,
q~ = bf16(q), a~ = bf16(a) (round to nearest), and S~ the value the
bfloat16 product returns. Three errors separate S~ from S:

1. input rounding. S - <q~, a~> = <q - q~, a> + <q~, a - a~>, so by
   Cauchy-Schwarz |S - <q~, a~>| <= |dq| |a| + |q~| |da|. |dq| is measured
   per query (in float64); for the anchors, round to nearest moves each
   component by at most u |a_i| with u = 2^-8, so |da| <= u |a|.
   |q|, |a| <= NORM_MAX (unit vectors normalised in float32).
2. accumulation. The products q~_i a~_i are exact in float32 (8 + 8
   significant bits) and summed in float32: any summation order is within
   gamma_d * sum |q~_i a~_i| <= gamma_d |q~| |a~| of the exact sum, with
   gamma_d = d 2^-24 / (1 - d 2^-24).
3. output rounding. The float32 sum is rounded to bfloat16: a relative
   error of at most 2^-8 (round to nearest); we allow 2^-7, which also
   covers truncation. So |S~ - sum| <= c |S~| with c = 2^-7 / (1 - 2^-7).

Together |S - S~| <= e_q + c |S~|, where e_q (per query, :func:`error_bound`)
gathers 1 and 2. Hence S > t implies S~ + e_q + c |S~| > t, i.e.

    S~ > (t - e_q) / (1 + c)   if t - e_q > 0,   else   S~ > (t - e_q) / (1 - c),

which is :func:`candidate_threshold` (lowered by a further 1e-6 for the
float32 arithmetic of the threshold itself). e_q holds a margin of 1e-6
(MARGIN), which also covers rounding fl64(S) once to float32. Values
count as max(S, 0), as everywhere in the method; clamping keeps every
bound below in force.

Recomputing lazily (asif.selection.BoundedRowBuffers)
-----------------------------------------------------
An entry is kept as its bfloat16 value S~ and stands for the interval
[lo, hi] = [S~ - e_q - c|S~|, S~ + e_q + c|S~|] (each clamped at 0) that
holds its exact value v; a recomputed entry is the point [v, v]. Let L be a
value with at least k held entries whose lo >= L (the k-th largest lo, or
anything below it). Those k entries are worth at least L each, so the exact
k-th value t of the row, over every anchor seen, is >= L: it only grows as
anchors arrive. Therefore

- an entry with hi < L has v <= hi < L <= t: strictly below the k-th
  value, it is in no exact top-k, now or later (a tie with t would need
  v = t). Dropping it is safe, and so is never taking a new entry with
  hi < L, which is the candidate test above with t replaced by L;
- every entry with v >= t is still held: it was never dropped (that needs
  hi < L <= t) and it was taken when it arrived.

When an exact state is needed (the end, or each count of a sweep), the
held entries are recomputed from the anchor rows, normalised again into
the same bits (the same slice of the anchors through the same
operations), and the top k of those exact values is selected with ties
to the lower anchor index. The top-k sets and values equal those of the
float64 computation rounded to float32, ties included. What is
recomputed is about k plus the entries within the bound of the k-th value
(~1.4k per row at k = 800 on the benchmark), once, not every entry that
passed a running k-th value on its way (~k (1 + ln(N/k)), 5k for N = 200k).

:func:`fast_bf16` tells whether this machine multiplies bfloat16 fast and
checks the bound on a probe. The default ``first_pass="auto"`` takes this
pass for large streams where it does (:func:`choose_first_pass`), and the
float32 pass elsewhere.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from asif.config import compiled_kernels

__all__ = ["U_BF16", "OUTPUT_REL", "error_bound", "candidate_threshold", "exact_dots", "fast_bf16",
           "FIRST_PASSES", "resolve_first_pass", "choose_first_pass"]

U_BF16 = 2.0 ** -8                       # unit roundoff of bfloat16, round to nearest
OUTPUT_REL = 2.0 ** -7 / (1 - 2.0 ** -7)  # output rounding, relative to |S~| (covers truncation too)
NORM_MAX = 1 + 1e-4                       # |x| of a float32-normalised row, with room for its rounding
MARGIN = 1e-6                             # for the float32 arithmetic of the thresholds
FIRST_PASSES = ("auto", "fp32", "bf16")
# "auto" keeps the float32 pass below this many similarities (query rows x anchors): there the
# products take well under a second and the one-off check of fast_bf16 (~0.1 s) would not pay.
AUTO_MIN_SIMILARITIES = 1 << 26
# Anchors per block of the bfloat16 pass (at most): the block's int16 product, scanned right after
# it is made, stays in cache (~1.8 s per evaluation on the benchmark against ~2.2 s with the float32
# pass's 22k blocks; 2k-12k all alike, benchmarks/README.md).
BLOCK = 8192
# Anchor rows per chunk of the recomputation: every query row reads its entries of one chunk before
# the next, so the rows of a chunk are read from cache (~20% faster than 512; flat from 2k up).
RESOLVE_CHUNK = 2048


def _gamma(d: int) -> float:
    """gamma_d = d u / (1 - d u), u = 2^-24: the float32 summation bound of d terms."""
    return d * 2.0 ** -24 / (1 - d * 2.0 ** -24)


def error_bound(queries: torch.Tensor, queries_low: torch.Tensor) -> torch.Tensor:
    """e_q [Q, 1] float32: input rounding + accumulation bound of the bfloat16 product (module docstring).

    queries: [Q, d] float32 normalised; queries_low: their bfloat16 rounding.
    """
    dq = torch.linalg.vector_norm(queries.double() - queries_low.double(), dim=1, keepdim=True)
    gamma = _gamma(queries.shape[1])
    q_low_norm = NORM_MAX + dq
    e = dq * NORM_MAX + q_low_norm * U_BF16 * NORM_MAX + gamma * q_low_norm * NORM_MAX * (1 + U_BF16)
    return (e + MARGIN).float()


def candidate_threshold(t, e, rel=OUTPUT_REL, margin=MARGIN):
    """An entry of the bfloat16 product can exceed the exact value t only if it exceeds this.

    One row's scalars: t its running k-th value, e its :func:`error_bound`.
    Compiled into the selection kernel (asif.selection) as it is.
    """
    s = np.float64(t) - e
    if s > 0:
        return s / (1 + rel) - margin
    return s / (1 - rel) - margin


# ---------------------------------------------------------------------------
# the exact recomputation
# ---------------------------------------------------------------------------

_KERNELS = None  # (dots,) compiled, or False without numba


def _dot(qr, ar):  # pragma: no cover (compiled; fastmath lets LLVM split the sum into SIMD lanes)
    s = 0.0
    for t in range(qr.shape[0]):
        s += np.float64(qr[t]) * np.float64(ar[t])
    return s


def _dots_kernel(q, rows, a, cols, out):  # pragma: no cover (compiled)
    for i in prange(rows.shape[0]):
        out[i] = dot(q[rows[i]], a[cols[i]])


prange = range  # numba.prange once numba is imported
dot = _dot      # its compiled form once numba is imported


def _kernels():
    def build(numba):
        # One compiled dot for every pair, in both kernels: the same sum order
        # for a pair whichever block or kernel recomputes it.
        globals()["dot"] = numba.njit(cache=True, nogil=True, fastmath=True, inline="always")(_dot)
        return (numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)(_dots_kernel),)
    return compiled_kernels(globals(), build)


def exact_dots(queries: torch.Tensor, rows: torch.Tensor, anchors: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float32 [n]: v = float32(<queries[rows[i]], anchors[cols[i]]> in float64), for each pair i.

    The exact value of the module docstring, for any pairs: the compiled
    running top-k (asif.selection) recomputes its entries with this same
    ``dot``, so a pair gets the same value from both.
    """
    q, a = queries.contiguous().numpy(), anchors.contiguous().numpy()
    r, c = rows.numpy(), cols.numpy()
    out = np.empty(len(r), dtype=np.float64)
    kernels = _kernels()
    if kernels and len(r):
        kernels[0](q, r, a, c, out)
    elif len(r):
        # without numba: the same float64 sums, in chunks that bound the temporaries
        for s in range(0, len(r), 65536):
            e = s + 65536
            out[s:e] = np.einsum("ij,ij->i", q[r[s:e]].astype(np.float64), a[c[s:e]].astype(np.float64))
    return torch.from_numpy(out.astype(np.float32))


# ---------------------------------------------------------------------------
# detection: is a bfloat16 product here both fast and as accurate as the bound says?
# ---------------------------------------------------------------------------

_FAST = {}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AMX-BF16 or AVX512-BF16); True where
    /proc/cpuinfo does not tell (the probe of :func:`fast_bf16` then decides)."""
    flags = _cpu_flags()
    return not flags or bool({"amx_bf16", "avx512_bf16"} & flags)


def fast_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(usable, why): whether a bfloat16 first pass pays off on this device, detected once per process.

    On the CPU: the instruction set must have bfloat16 dot products
    (AMX-BF16 or AVX512-BF16, where /proc/cpuinfo tells), a timed probe
    must show the bfloat16 product at least 1.5x faster than float32, and
    the bound of the module docstring must hold on the probe's values.
    """
    device = torch.device(device)
    key = str(device)
    if key in _FAST:
        return _FAST[key]
    if device.type != "cpu":
        _FAST[key] = (False, f"the exact bfloat16 first pass is implemented for the CPU; {device.type} uses its dtype")
        return _FAST[key]
    if not bf16_instructions():
        _FAST[key] = (False, "this CPU has no bfloat16 dot-product instructions (amx_bf16, avx512_bf16)")
        return _FAST[key]
    g = torch.Generator().manual_seed(0)
    # small enough to cost ~0.1 s once per process, large enough that AMX shows its speed
    q = torch.nn.functional.normalize(torch.randn(256, 768, generator=g) + 0.5, dim=1)
    a = torch.nn.functional.normalize(torch.randn(4096, 768, generator=g) + 0.5, dim=1)
    ql, al = q.bfloat16(), a.bfloat16()

    def best(f):
        f()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    t32, t16 = best(lambda: q @ a.T), best(lambda: ql @ al.T)
    approx = ql @ al.T
    exact = q.double() @ a.double().T
    slack = error_bound(q, ql).double() + OUTPUT_REL * approx.double().abs()
    if bool(((approx.double() - exact).abs() > slack).any()):
        _FAST[key] = (False, "the bfloat16 product here is less accurate than the bound assumes")
    elif t32 < 1.5 * t16:
        _FAST[key] = (False, f"bfloat16 products are not faster here ({t32 / t16:.1f}x float32)")
    else:
        _FAST[key] = (True, f"bfloat16 products {t32 / t16:.1f}x faster than float32")
    return _FAST[key]


def resolve_first_pass(first_pass: str, device: torch.device, dtype: torch.dtype) -> str:
    """Check a ``first_pass`` choice: "auto" (the default), "fp32" (the plain product) or "bf16".

    "bf16" is exact (module docstring) and, where the CPU multiplies
    bfloat16 fast (:func:`fast_bf16`), about half the time of the float32
    pass (benchmarks/README.md). It is a float32 computation on the CPU
    only. "auto" stays "auto" where "bf16" could run (float32 on the CPU)
    and becomes "fp32" elsewhere; each stream then settles it with
    :func:`choose_first_pass`.
    """
    from asif.errors import ASIFInputError
    if first_pass not in FIRST_PASSES:
        raise ASIFInputError(f"first_pass={first_pass!r}: use one of {', '.join(FIRST_PASSES)}")
    if first_pass == "auto":
        return "auto" if device.type == "cpu" and dtype == torch.float32 else "fp32"
    if first_pass == "bf16":
        if dtype != torch.float32:
            raise ASIFInputError(f"first_pass='bf16' recomputes candidates against float32 values; "
                                 f"dtype is {dtype} (use float32, or first_pass='fp32')")
        if device.type != "cpu":
            raise ASIFInputError("first_pass='bf16' is implemented for the CPU; on a GPU use dtype float16")
    return first_pass


def choose_first_pass(first_pass: str, device: torch.device, similarities: int, compiled: bool,
                      n_counts: int = 1) -> str:
    """The pass one stream runs. "auto" becomes "bf16" where it is exact and pays: the compiled
    selection is there, the stream has at least AUTO_MIN_SIMILARITIES similarities (query rows x
    anchors) and one anchor count, and :func:`fast_bf16` finds the CPU fast and the bound holding;
    else "fp32". A sweep over several counts stays "fp32": each count needs its own exact values,
    and a count of a few thousand anchors holds nearly all of them, so the recomputation can cost
    more than the product saves (on the real Fashion-MNIST sweep, 8.3 s against 7.8 s;
    benchmarks/README.md). ``first_pass="bf16"`` still runs it there when asked, except on a CPU
    without bfloat16 instructions: there torch emulates the product, whose accumulation the bound
    was not checked for, so it runs "fp32", the same exact top-k (this also covers a Ray worker on
    such a CPU when the driver's CPU settled "auto" as "bf16")."""
    if first_pass == "bf16" and not bf16_instructions():
        return "fp32"
    if first_pass != "auto":
        return first_pass
    if not compiled or n_counts != 1 or similarities < AUTO_MIN_SIMILARITIES:
        return "fp32"
    return "bf16" if fast_bf16(device)[0] else "fp32"
