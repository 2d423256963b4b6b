"""The Ray engine against the local path: embedding speed-up with workers, and the sweep's overhead.

    python benchmarks/bench_ray.py                        # both parts, this machine's cores
    python benchmarks/bench_ray.py --images 256 --anchors 50000   # smaller

Embedding: ``--images`` synthetic photos (noise and shapes at 320x240, PNG
on disk, so decoding is real) through the default image encoder
(EfficientNet-Lite0), cache shards of ``--shard-rows``, timed

  local        ``embed_cached`` in this process (all cores as torch threads)
  ray 1x1      one Ray actor with 1 core
  ray 2x1      two actors with 1 core each (the speed-up of workers)
  ray 1x2      one actor with 2 cores (Ray's overhead on the local path's shape)

each into an empty cache, and each also for one shard alone (the start-up: workers load the model); the
same for ``--texts`` distinct captions through MiniLM (pure compute: a 1-core worker stays on 1 core,
while an image worker's decoding threads run beside its encoder), after Ray is up (its start is timed apart). The
decode-only rate (load_image + the encoder's preprocessing, one core) is the
figure a GPU cluster is sized by: the GPU does the product, the CPUs decode.

Sweep: structured synthetic embeddings (asif.synthetic) as .npy files, the
9-count sweep through ``asif_core.sweep`` and through
``asif.distributed.sweep`` with 1 shard x 2 cores and 2 shards x 1 core
(the workers open the .npy files by path). The numbers are checked equal.

Prints a JSON summary; the figures go to benchmarks/README.md by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def photos(folder: Path, n: int) -> list[Path]:
    """``n`` 320x240 PNGs with smooth shapes and noise: slow enough to decode to count, like photos."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        base = (rng.random((240, 320, 3)) * 60 + rng.integers(0, 190, 3)).astype(np.uint8)
        im = Image.fromarray(base)
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 300), rng.integers(0, 220)
            d.ellipse([x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        p = folder / f"photo{i:05d}.png"
        im.save(p)
        out.append(p)
    return out


def bench_embedding(args, tmp: Path) -> dict:
    import ray
    import torch
    from asif import cache as C
    from asif import distributed as D
    from asif.encoders import lazy_image_encoder, load_image_encoder
    paths = photos(tmp / "photos", args.images)
    ids = [p.name for p in paths]
    res = {"images": len(paths), "shard_rows": args.shard_rows, "cores": os.cpu_count()}

    # decode + preprocess only, one core: what a GPU worker needs from its CPUs per image
    enc = load_image_encoder()
    torch.set_num_threads(1)
    t = time.perf_counter()
    for p in paths[:128]:
        enc.preprocess(p)  # decode, resize, crop, normalise
    res["decode_preprocess_per_core_img_s"] = round(128 / (time.perf_counter() - t), 1)
    torch.set_num_threads(os.cpu_count() or 1)

    def run(root, engine, n=len(paths)):
        t = time.perf_counter()
        e = C.embed_cached(lazy_image_encoder(), paths[:n], kind="image", dataset={"bench": "photos"}, ids=ids[:n],
                           name="bench", root=root, shard_rows=args.shard_rows, progress=False, engine=engine)
        return time.perf_counter() - t, np.asarray(e.array)

    # Each configuration also embeds one shard alone, into a cache of its own: the time to load the
    # model (and build its ONNX session) in every worker, which a long run pays once.
    res["local_one_shard_s"] = round(run(tmp / "c-local-1", None, args.shard_rows)[0], 2)
    wall, local = run(tmp / "c-local", None)
    res["local_s"] = round(wall, 2)
    t = time.perf_counter()
    D.connect(None, os.cpu_count())
    res["ray_start_s"] = round(time.perf_counter() - t, 2)
    for label, workers, cpus in (("ray_1x1", 1, 1), ("ray_2x1", 2, 1), ("ray_1x2", 1, 2)):
        engine = D.RayEngine(workers=workers, cpus_per_worker=cpus)
        res[f"{label}_one_shard_s"] = round(run(tmp / f"c-{label}-1", engine, args.shard_rows)[0], 2)
        wall, got = run(tmp / f"c-{label}", engine)
        res[f"{label}_s"] = round(wall, 2)
        res[f"{label}_max_abs_diff_vs_local"] = float(np.abs(got - local).max())
    for k in ("local", "ray_1x1", "ray_2x1", "ray_1x2"):
        res[f"{k}_img_s"] = round(len(paths) / res[f"{k}_s"], 1)
        # steady state: the images beyond the first shard over the time beyond the one-shard run
        res[f"{k}_steady_img_s"] = round((len(paths) - args.shard_rows) / (res[f"{k}_s"] - res[f"{k}_one_shard_s"]), 1)
    res["speedup_2_workers_vs_1"] = round(res["ray_1x1_s"] / res["ray_2x1_s"], 2)
    res["speedup_2_workers_vs_1_steady"] = round(res["ray_2x1_steady_img_s"] / res["ray_1x1_steady_img_s"], 2)
    res["ray_1x2_over_local"] = round(res["ray_1x2_s"] / res["local_s"], 2)
    ray.shutdown()
    return res


def bench_text_embedding(args, tmp: Path) -> dict:
    """Captions through MiniLM: all compute, no decoding threads, so a 1-core worker is held to 1 core."""
    import ray
    from asif import cache as C
    from asif import distributed as D
    from asif.encoders import lazy_text_encoder
    words = "red blue small large wooden metal old new cat dog house tree car boat cup chair lamp river".split()
    rng = np.random.default_rng(1)
    texts = [f"{' '.join(rng.choice(words, 6))} number {i}" for i in range(args.texts)]
    ids = [str(i) for i in range(len(texts))]
    rows = args.text_shard_rows
    res = {"texts": len(texts), "shard_rows": rows}

    def run(root, engine, n=len(texts)):
        t = time.perf_counter()
        e = C.embed_cached(lazy_text_encoder(), texts[:n], kind="text", dataset={"bench": "texts"}, ids=ids[:n],
                           name="bench", root=root, shard_rows=rows, progress=False, engine=engine)
        return time.perf_counter() - t, np.asarray(e.array)

    res["local_one_shard_s"] = round(run(tmp / "t-local-1", None, rows)[0], 2)
    wall, local = run(tmp / "t-local", None)
    res["local_s"] = round(wall, 2)
    D.connect(None, os.cpu_count())
    for label, workers, cpus in (("ray_1x1", 1, 1), ("ray_2x1", 2, 1), ("ray_1x2", 1, 2)):
        engine = D.RayEngine(workers=workers, cpus_per_worker=cpus)
        res[f"{label}_one_shard_s"] = round(run(tmp / f"t-{label}-1", engine, rows)[0], 2)
        wall, got = run(tmp / f"t-{label}", engine)
        res[f"{label}_s"] = round(wall, 2)
        res[f"{label}_max_abs_diff_vs_local"] = float(np.abs(got - local).max())
    for k in ("local", "ray_1x1", "ray_2x1", "ray_1x2"):
        res[f"{k}_texts_s"] = round(len(texts) / res[f"{k}_s"], 1)
        res[f"{k}_steady_texts_s"] = round((len(texts) - rows) / (res[f"{k}_s"] - res[f"{k}_one_shard_s"]), 1)
    res["speedup_2_workers_vs_1"] = round(res["ray_1x1_s"] / res["ray_2x1_s"], 2)
    res["speedup_2_workers_vs_1_steady"] = round(res["ray_2x1_steady_texts_s"] / res["ray_1x1_steady_texts_s"], 2)
    ray.shutdown()
    return res


def bench_sweep(args, tmp: Path) -> dict:
    import asif_core as ac
    from asif import distributed as D
    from asif.synthetic import structured_coupled_data
    d = structured_coupled_data(n_anchors=args.anchors, n_images=args.queries)
    for key in ("anchor_images", "anchor_texts"):
        np.save(tmp / f"{key}.npy", d[key])
    ai = np.load(tmp / "anchor_images.npy", mmap_mode="r")
    at = np.load(tmp / "anchor_texts.npy", mmap_mode="r")
    n = args.anchors
    counts = sorted({min(n, 1024 * 2 ** i) for i in range(20) if 1024 * 2 ** i < n} | {n})[-9:]
    call = (ai, at, d["images"], d["labels"], d["prompts"], 100)
    kw = dict(anchor_counts=counts, exponents=[8.0], non_zeros=800, return_scores=True)
    ac.sweep(*call, device="cpu", **dict(kw, anchor_counts=[min(n, 5000)]))  # compile, warm the files
    t = time.perf_counter()
    one = ac.sweep(*call, device="cpu", **kw)
    res = {"anchors": n, "queries": args.queries, "counts": counts, "local_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    D.connect(None, os.cpu_count())
    res["ray_start_s"] = round(time.perf_counter() - t, 2)
    for label, shards, cpus in (("ray_1x2", 1, 2), ("ray_2x1", 2, 1)):
        # the first run starts the workers (imports, compiled kernels from the cache): timed apart
        t = time.perf_counter()
        D.sweep(*call, shards=shards, cpus_per_worker=cpus, **kw)
        res[f"{label}_first_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        got = D.sweep(*call, shards=shards, cpus_per_worker=cpus, **kw)
        res[f"{label}_s"] = round(time.perf_counter() - t, 2)
        res[f"{label}_same_numbers"] = all(np.array_equal(a["scores"], b["scores"]) for a, b in zip(one, got))
        res[f"{label}_over_local"] = round(res[f"{label}_s"] / res["local_s"], 2)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shard-rows", type=int, default=64)
    ap.add_argument("--anchors", type=int, default=200000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--texts", type=int, default=16384)
    ap.add_argument("--text-shard-rows", type=int, default=1024)
    ap.add_argument("--only", choices=["embed", "text", "sweep"], default=None)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "embed"):
            out["embedding"] = bench_embedding(args, Path(tmp))
            print(json.dumps(out["embedding"], indent=1), flush=True)
        if args.only in (None, "text"):
            out["text_embedding"] = bench_text_embedding(args, Path(tmp))
            print(json.dumps(out["text_embedding"], indent=1), flush=True)
        if args.only in (None, "sweep"):
            out["sweep"] = bench_sweep(args, Path(tmp))
            print(json.dumps(out["sweep"], indent=1), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
