"""Scale out on Ray: the anchors' embedding and the exact sweep, spread over a cluster.

Ray is an optional extra (``pip install -e ".[ray]"``); nothing else in the
project imports it. Two jobs outgrow one machine at the paper's scale and
beyond, and both split along the anchors:

* **Embedding anchors** (``RayEngine.encode_shards``, used by
  ``asif.cache.embed_cached(engine=...)`` and ``asif embed-anchors --engine
  ray``). The cache's shards are the unit of work: a Ray Data pipeline of
  shard descriptors goes through ``map_batches`` with a pool of actors per
  encoder (one GPU each when the encoder computes on CUDA and the cluster
  has GPUs, CPUs otherwise). Each
  actor loads its encoder once, decodes and embeds its shard with the very
  function the local path uses (same batches, same checkpoints), and sends
  the vectors back; the driver writes each shard into the cache as it
  arrives. So the folder is the one the local path writes, byte for byte,
  shards already there are skipped on a rerun, and a worker killed mid-run
  costs only the shard it held (Ray restarts the actor and retries it).
* **The exact sweep** (``sweep``, ``asif sweep --engine ray``). Anchors
  ``[0, N)`` are cut into contiguous shards, one Ray task each. A task runs
  the core's stream on its shard and returns each query's top-k at the
  shard's end and at every anchor count that falls inside it. The driver
  merges them in anchor order: the top-k over the first n anchors is the
  top-k of the union of the full shards before n and the snapshot of the
  shard holding n, ties to the lower anchor index as in one machine's
  stream. Scores are then computed once, on the driver, by the core.

Where the data lives: a ``.npy`` memmap of anchors is opened by path on each
worker (a real cluster needs it on a shared file system at the same path);
arrays in memory go through Ray's object store.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from asif.config import progress_bar
from asif.errors import ASIFInputError, DataError

__all__ = ["RAY_HINT", "ray_module", "connect", "RayEngine", "sweep", "merge_tops"]

RAY_HINT = 'install the Ray extra: pip install -e ".[ray]" (or pip install "ray[data]")'


def ray_module():
    """``import ray``, or a clear error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise ASIFInputError(f"the Ray engine needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """The ``ray`` module, connected to a cluster.

    ``address``: None starts a Ray instance on this machine (``num_cpus`` of
    its cores, default all); "auto" joins the cluster running here (``ray
    start --head`` on this node); "ray://host:10001" a remote one. An
    instance already connected in this process is used as it is.
    """
    ray = ray_module()
    if ray.is_initialized():
        return ray
    try:
        if address is None:
            # the workers' own output (model-loading bars) stays in Ray's logs; errors still come back
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="ERROR")
    except ConnectionError as e:
        raise ASIFInputError(f"--address {address}: no Ray cluster found there ({e}); start one with "
                             "`ray start --head` (then --address auto), or leave --address out to run Ray "
                             "on this machine alone") from None
    return ray


def _cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException ...)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None:
            break
        error = inner
    return error


# ---------------------------------------------------------------------------
# embedding: the cache's shards as Ray Data rows, an actor pool per encoder
# ---------------------------------------------------------------------------

class _ShardEmbedder:
    """A Ray Data actor: loads its encoder once, then embeds whole cache shards.

    Each input row is a shard (index, first and last row); the output row is
    its vectors (float32 bytes) and the items that could not be read.
    """

    def __init__(self, payload, folder: str, kind: str, batch_size: int, checkpoint_rows: int, threads: int):
        import ray
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.encoder, self.items, self.ids = ray.get(payload[0])
        self.folder, self.kind = folder, kind
        self.batch_size, self.checkpoint_rows = batch_size, checkpoint_rows

    def __call__(self, batch: dict) -> dict:
        import json
        from pathlib import Path
        from asif.cache import _encode_shard
        out = {"shard": [], "rows": [], "dim": [], "vectors": [], "failed": [], "error": []}
        for i, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            try:
                # the local path's own function: the same batches and in-shard checkpoints, so the same bytes
                block, failed = _encode_shard(Path(self.folder), int(i), self.encoder, self.kind, self.items,
                                              range(int(start), int(stop)), self.ids, self.batch_size,
                                              self.checkpoint_rows)
                error = ""
            except Exception as e:  # reported with its words, and the other shards go on (Ray's wrapper loses them)
                block, failed, error = np.zeros((0, 0), np.float32), [], f"{type(e).__name__}: {e}"
            block = np.ascontiguousarray(block, dtype=np.float32)
            out["shard"].append(int(i))
            out["rows"].append(block.shape[0])
            out["dim"].append(block.shape[1])
            out["vectors"].append(block.tobytes())
            out["failed"].append(json.dumps(failed))
            out["error"].append(error)
        return out


def _unloaded(encoder):
    """What to ship to the workers: a lazy encoder without the weights this process may have loaded."""
    from asif.encoders import LazyEncoder
    if isinstance(encoder, LazyEncoder):
        return LazyEncoder(encoder.name, encoder.identity, encoder.dim, encoder._load)
    return encoder


def _on_cuda(encoder) -> bool:
    """Whether an encoder computes on a GPU (a lazy one says so by its identity's half-precision dtype)."""
    device = encoder.__dict__.get("device")  # never loads a lazy encoder's weights
    if device is not None:
        return str(device).startswith("cuda")
    return str(getattr(encoder, "identity", {}).get("dtype", "")) in ("float16", "bfloat16", "torch.float16",
                                                                       "torch.bfloat16")


@dataclass
class RayEngine:
    """Where the cache's shards are embedded: on a Ray cluster.

    ``address``: see ``connect``. ``workers``: actors per encoder (default:
    one per GPU when GPU actors are used, else one per ``cpus_per_worker``
    cores). ``cpus_per_worker``: cores (torch threads) of each actor.
    """
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    num_cpus: int | None = None   # when a local instance is started: its cores (default all)

    def encode_shards(self, shards: Sequence[tuple[int, int, int]], *, folder, encoder, kind: str, items, ids,
                      batch_size: int, checkpoint_rows: int) -> Iterator[tuple[int, np.ndarray, list[dict]]]:
        """Embed the cache shards ``(index, start, stop)`` on the cluster.

        Yields (index, float32 [stop - start, dim], failed) in the order they
        finish; the caller writes each one, so what finished survives any
        later failure.
        """
        import json
        if not shards:
            return
        ray = connect(self.address, self.num_cpus)
        import ray.data
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the cache shows one bar for the whole set
        resources = ray.cluster_resources()
        # The vectors are those of the encoder named here, on its device and dtype (its identity keys the
        # cache): GPU actors when it computes on CUDA and the cluster has GPUs, CPU actors otherwise.
        gpus = int(resources.get("GPU", 0)) if _on_cuda(encoder) else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        per = max(1, int(self.cpus_per_worker))
        workers = self.workers or (gpus if gpus else max(1, cpus // per))
        workers = max(1, min(workers, len(shards)))
        payload = [ray.put((_unloaded(encoder), items, ids))]  # once into the object store, shared by the actors
        rows = [{"shard": int(i), "start": int(s), "stop": int(e)} for i, s, e in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(_ShardEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=per,
                            num_gpus=1 if gpus else 0, batch_format="default",
                            fn_constructor_kwargs=dict(payload=payload, folder=str(folder), kind=kind,
                                                       batch_size=batch_size, checkpoint_rows=checkpoint_rows,
                                                       threads=per))
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan, timings, bar notices: ours say enough
        errors = []
        try:
            for row in ds.iter_rows():
                if row["error"]:
                    errors.append((int(row["shard"]), row["error"]))
                    continue
                block = np.frombuffer(row["vectors"], dtype=np.float32).reshape(int(row["rows"]), int(row["dim"]))
                yield int(row["shard"]), block, json.loads(row["failed"])
        except (DataError, ASIFInputError):
            raise
        except Exception as e:
            cause = _cause(e)
            raise DataError(f"embedding on Ray failed: {type(cause).__name__}: {cause}; the shards finished before "
                            "are kept, a rerun does only the rest") from None
        if errors:
            shard, error = min(errors)
            raise DataError(f"embedding on Ray: {len(errors)} of {len(rows)} shards failed (shard {shard}: {error}); "
                            "the other shards are written, a rerun does only the rest")


# ---------------------------------------------------------------------------
# the exact sweep, sharded over the anchors
# ---------------------------------------------------------------------------

def merge_tops(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of the union of per-shard top-k lists.

    parts: (values [Q, k_j], global anchor indices [Q, k_j]) per shard, the
    shards in anchor order and each row in anchor order (as the stream gives
    them). Returns (values, indices) [Q, min(k, sum k_j)] in anchor order,
    ties to the lower anchor index: what one stream over all of them keeps.
    """
    values = np.concatenate([v for v, _ in parts], axis=1)
    indices = np.concatenate([i for _, i in parts], axis=1)
    if values.shape[1] <= k:
        return values, indices
    # The concatenation is in anchor order, so a stable sort on -value keeps
    # the lower index first among equals; sorting the kept positions puts
    # them back in anchor order.
    keep = np.sort(np.argsort(-values, axis=1, kind="stable")[:, :k], axis=1)
    return np.take_along_axis(values, keep, 1), np.take_along_axis(indices, keep, 1)


def _npy_source(x) -> str | None:
    """The path of the whole .npy file ``x`` is a memmap of, or None (then its rows are shipped)."""
    name = getattr(x, "filename", None)
    if not isinstance(x, np.memmap) or not name or not str(name).endswith(".npy"):
        return None
    try:
        whole = np.load(name, mmap_mode="r")
    except (OSError, ValueError):
        return None
    same = whole.shape == x.shape and whole.dtype == x.dtype and whole.flags.c_contiguous \
        and getattr(whole, "offset", None) == getattr(x, "offset", None)
    return str(name) if same else None


def _rows(source, start: int, stop: int):
    """Rows [start, stop) of a shipped array or of a .npy opened by path here, on the worker."""
    if isinstance(source, tuple) and source[0] == "npy":
        path = source[1]
        if not os.path.exists(path):
            import socket
            raise ASIFInputError(f"{path}: not readable on worker {socket.gethostname()}; put the anchors on a "
                                 "file system every node mounts at the same path")
        return np.load(path, mmap_mode="r")[start:stop]
    return source


def _shard_tops(anchor_images, anchor_texts, start: int, stop: int, local_counts: list[int], queries, k: int,
                compute_args: dict, threads: int, centres=(None, None)):
    """On a worker: the core's stream over anchors [start, stop), top-k at each local count.

    Returns, per modality (images, prompts), one (values, global indices)
    pair per local count.
    """
    import torch
    import asif_core as ac
    if threads:
        torch.set_num_threads(threads)
    images, prompts = queries
    ci, ct = centres  # the driver's, from all the anchors: every shard centres on the same vectors
    compute = ac.Compute.of(**compute_args)
    jobs = [ac.StreamJob(_rows(anchor_images, start, stop), "anchor_images",
                         ac._normalized_block(images, compute, "images", 0, centre=ci), start, ci),
            ac.StreamJob(_rows(anchor_texts, start, stop), "anchor_texts",
                         ac._normalized_block(prompts, compute, "prompts", 0, centre=ct), start, ct)]
    tops = ac._stream(jobs, k, local_counts, compute)
    return [[(t.values.cpu().numpy(), t.indices.cpu().numpy() + start) for t in job] for job in tops]


def _plan(counts: list[int], shards: int) -> list[tuple[int, int, list[int]]]:
    """Contiguous shards of [0, counts[-1]), each with the local counts to snapshot at."""
    n = counts[-1]
    shards = max(1, min(shards, n))
    bounds = [round(j * n / shards) for j in range(shards + 1)]
    plan = []
    for s, e in zip(bounds, bounds[1:]):
        local = sorted({c - s for c in counts if s < c < e} | {e - s})
        plan.append((s, e, local))
    return plan


def sweep(anchor_images, anchor_texts, images, labels, prompts, n_classes: int, *,
          anchor_counts: Sequence[int] | None = None, exponents: Sequence[float] = (8.0,), non_zeros: int = 800,
          reduce: str = "max", block_size: int | None = None, device="cpu", dtype=None,
          memory_budget: int | None = None, progress: bool = False, return_scores: bool = False,
          first_pass: str = "auto", centre=False, address: str | None = None, shards: int | None = None,
          cpus_per_worker: int | None = None, num_cpus: int | None = None) -> list[dict]:
    """``asif_core.sweep`` with the anchors split over a Ray cluster: the same rows, the same numbers.

    Args: those of ``asif_core.sweep`` (``device`` is each worker's; "cuda"
        gives every task a GPU), plus
        address: the cluster (see ``connect``).
        shards: anchor shards, one Ray task each (default: one per worker).
        cpus_per_worker: cores of each task, its torch threads (default: the
            cores of the smallest node, so one task fills a node).
        num_cpus: cores of a local Ray instance started here (address None).
    Returns:
        one dict per (n, p) as ``asif_core.sweep``.
    """
    import torch
    import asif_core as ac
    # Inputs are checked here, by the core's own checks (a CPU-side pass on the driver).
    k, ps, checked, counts, jobs = ac._sweep_inputs(
        anchor_images, anchor_texts, images, labels, prompts, n_classes, anchor_counts, exponents, non_zeros, reduce,
        block_size, "cpu", None if str(device).startswith("cuda") else dtype, memory_budget, False,
        first_pass if not str(device).startswith("cuda") else "fp32", return_scores, centre)
    centres = (jobs[0].centre, jobs[1].centre)
    # "auto" settled here, once for every shard, so that all of them compute the same values
    first_pass = checked.pass_for(sum(j.queries.shape[0] for j in jobs) * counts[-1], len(counts))
    ray = connect(address, num_cpus)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    smallest = min((int(r.get("CPU", 1)) for r in nodes), default=1)
    per = max(1, int(cpus_per_worker or smallest))
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // per)
    plan = _plan(counts, shards or workers)
    gpu = str(device).startswith("cuda")
    compute_args = dict(device=device, dtype=dtype, block_size=block_size, memory_budget=memory_budget,
                        first_pass=first_pass)

    def shipped(x):
        path = _npy_source(x)
        if path is not None:
            return lambda s, e: ("npy", path)
        return lambda s, e: ray.put(np.ascontiguousarray(x[s:e]) if not torch.is_tensor(x) else x[s:e].contiguous())

    ship_img, ship_txt = shipped(anchor_images), shipped(anchor_texts)
    queries = ray.put((_as_numpy(images), _as_numpy(prompts)))
    task = ray.remote(_shard_tops).options(num_cpus=per, num_gpus=1 if gpu else 0, max_retries=3)
    refs = [task.remote(ship_img(s, e), ship_txt(s, e), s, e, local, queries, k, compute_args, 0 if gpu else per,
                        centres) for s, e, local in plan]
    results = [None] * len(refs)
    where = {r: j for j, r in enumerate(refs)}
    try:
        with progress_bar(counts[-1], "anchors (ray)", progress, unit="anchor") as bar:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                j = where[done[0]]
                results[j] = ray.get(done[0])
                bar.update(plan[j][1] - plan[j][0])
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, (ASIFInputError, DataError)):
            raise cause from None
        raise DataError(f"the sweep on Ray failed: {type(cause).__name__}: {cause}") from None

    # Merge in anchor order: `prefix` holds the top-k of every full shard so far.
    img_tops, txt_tops = [], []
    prefix = [[], []]
    for (s, e, local), result in zip(plan, results):
        for c in counts:
            if s < c <= e:
                at = local.index(c - s)
                merged = [merge_tops(prefix[m] + [result[m][at]], k) for m in (0, 1)]
                img_tops.append(ac.TopK(torch.from_numpy(merged[0][0]), torch.from_numpy(merged[0][1]), c))
                txt_tops.append(ac.TopK(torch.from_numpy(merged[1][0]), torch.from_numpy(merged[1][1]), c))
        for m in (0, 1):  # the prefix grows by this shard's full top-k, merged to stay k wide
            prefix[m] = [merge_tops(prefix[m] + [result[m][-1]], k)]
    return ac._sweep_rows(counts, img_tops, txt_tops, ps, k, n_classes, reduce, labels, return_scores)


def _as_numpy(x) -> np.ndarray:
    import torch
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
