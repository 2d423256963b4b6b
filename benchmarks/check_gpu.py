"""Checks of the ASIF core on a CUDA device against the CPU in float64.

    python benchmarks/check_gpu.py [--json out.json]

The test suite runs on the CPU; this script is what to run on a machine
with a GPU. On synthetic coupled data it compares, for float64, float32 and
float16 on CUDA: the top-k indices and values of the relative
representations, the similarity matrix, the class scores and the sweep's
accuracies, with the same computed on the CPU in float64. It also runs the
dense scoring in row chunks (as when GPU memory is short), anchor updates,
and a memmapped anchor file. Exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import asif_core as ac
from asif import scoring
from asif.synthetic import synthetic_coupled_data

# float16 keeps about 3 decimal digits: scores agree to this, accuracies to a fraction of a point
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-2}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=50000)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--non-zeros", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself (float16 skipped)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the GPU path; the test suite covers the CPU")
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}; auto picks {ac.pick_device('auto')}, "
          f"default dtype there {ac.resolve_dtype(None, dev)}")
    d = synthetic_coupled_data(n_anchors=args.anchors, n_classes=20, n_templates=4, n_images=args.images,
                                  image_dim=256, text_dim=128, noise=1.5, seed=1)
    ai, at, x, y, p = d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"]
    k, counts = args.non_zeros, [1000, 5000, args.anchors]
    checks, failed = {}, []

    def check(name, ok, detail):
        checks[name] = {"ok": bool(ok), **detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)

    t = time.perf_counter()
    ref_rows = ac.sweep(ai, at, x, y, p, 20, anchor_counts=counts, non_zeros=k, device="cpu", dtype="float64",
                        return_scores=True)
    ref_rep = ac.relative_representation(x, ai, k, 8, device="cpu", dtype="float64")
    ref_sim = ac.similarity(ref_rep, ac.relative_representation(p, at, k, 8, device="cpu", dtype="float64"))
    print(f"CPU float64 reference: {time.perf_counter() - t:.1f} s")

    for dt in ("float64", "float32", "float16")[: 3 if dev.type == "cuda" else 2]:
        tol = TOLERANCE[dt]
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        rows = ac.sweep(ai, at, x, y, p, 20, anchor_counts=counts, non_zeros=k, device=dev, dtype=dt,
                        return_scores=True)
        sync()
        wall = time.perf_counter() - t
        score_err = max(float(np.abs(r["scores"].astype(np.float64) - q["scores"]).max()) for r, q in zip(rows, ref_rows))
        acc_gap = max(abs(r["acc1"] - q["acc1"]) for r, q in zip(rows, ref_rows))
        check(f"sweep {dt}", score_err <= tol and acc_gap <= (0 if dt != "float16" else 0.01),
              {"max_score_error": score_err, "max_acc1_gap": acc_gap, "seconds": round(wall, 3),
               "acc1": [round(r["acc1"], 4) for r in rows]})
        rep = ac.relative_representation(x, ai, k, 8, device=dev, dtype=dt)
        same = np.mean([len(set(a) & set(b)) / k for a, b in zip(rep.indices.cpu().numpy(), ref_rep.indices.numpy())])
        check(f"top-k {dt}", rep.indices.device.type == dev.type and same >= (1.0 if dt == "float64" else 0.99),
              {"mean_share_of_same_anchors": float(same)})
        sim = ac.similarity(rep, ac.relative_representation(p, at, k, 8, device=dev, dtype=dt)).astype(np.float64)
        check(f"similarity {dt}", np.abs(sim - ref_sim).max() <= tol, {"max_error": float(np.abs(sim - ref_sim).max())})

    # dense scoring in row chunks, as when free GPU memory is short
    rep_t = ac.relative_representation(p, at, k, 8, device=dev, dtype="float32")
    rep_i = ac.relative_representation(x, ai, k, 8, device=dev, dtype="float32")
    free = torch.cuda.mem_get_info
    try:
        if dev.type == "cuda":
            total = torch.cuda.mem_get_info(dev)[1]
            torch.cuda.mem_get_info = lambda device=None: (8 * 4 * (args.anchors + 1) * 50, total)  # ~100 rows a chunk
        with scoring.forced(dense_rows=100, way="dense"):  # the CPU's way to the same chunking
            sim = ac.similarity(rep_i, rep_t).astype(np.float64)
    finally:
        torch.cuda.mem_get_info = free
    check("row-chunked dense scoring", np.abs(sim - ref_sim).max() <= TOLERANCE["float32"],
          {"max_error": float(np.abs(sim - ref_sim).max())})

    # anchor updates on the GPU equal a rebuild
    half = args.anchors // 2
    model = ac.ASIF(ai[:half], at[:half], non_zeros=k, device=dev, dtype="float32")
    model.add_anchors(ai[half:], at[half:])
    model.remove_anchors(np.arange(0, args.anchors, 7))
    keep = np.setdiff1d(np.arange(args.anchors), np.arange(0, args.anchors, 7))
    rebuilt = ac.ASIF(ai[keep], at[keep], non_zeros=k, device=dev, dtype="float32")
    e = float(np.abs(model.classify(x[:500], p, 20) - rebuilt.classify(x[:500], p, 20)).max())
    check("add/remove equals rebuild", e <= TOLERANCE["float32"], {"max_error": e})

    # a float16 memmap streamed to the GPU block by block
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, arr in (("img", ai), ("txt", at)):
            mm = np.lib.format.open_memmap(Path(tmp) / f"{name}.npy", mode="w+", dtype=np.float16, shape=arr.shape)
            mm[:] = arr
            mm.flush()
            paths.append(Path(tmp) / f"{name}.npy")
        mi, mt = (np.load(q, mmap_mode="r") for q in paths)
        rows = ac.sweep(mi, mt, x, y, p, 20, anchor_counts=counts, non_zeros=k, device=dev, block_size=4096)
        gap = max(abs(r["acc1"] - q["acc1"]) for r, q in zip(rows, ref_rows))
        check("float16 memmap, 4096-anchor blocks", gap <= 0.01, {"max_acc1_gap": gap})

    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "checks": checks}, indent=2) + "\n")
    if failed:
        sys.exit(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    print("all checks passed")


if __name__ == "__main__":
    main()
