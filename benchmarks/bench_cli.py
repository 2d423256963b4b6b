"""`asif sweep` as a whole process against the same sweep in-process.

    python benchmarks/bench_cli.py                    # structured data, the reference shapes
    python benchmarks/bench_cli.py --first-pass fp32  # the float32 pass (default: auto, bf16 where fast)

Writes structured synthetic embeddings (asif.synthetic.structured_coupled_data)
as .npy files, then times, interleaved, best of ``--repeat``:

  in-process  asif_core.sweep on the loaded arrays, kernels already compiled
  process     ``asif sweep ... --quiet`` as a user runs it: interpreter start,
              imports, .npy loading (memmap), validation, the sweep, the JSON
  cold        the same process with an empty numba cache (a first run after
              installing: the kernels compile)

and prints the ratios. The figures go to benchmarks/README.md by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import asif_core as ac
from asif.synthetic import structured_coupled_data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=200000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--counts", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 200000])
    ap.add_argument("--first-pass", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    d = structured_coupled_data(args.anchors, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key in ("anchor_images", "anchor_texts", "images", "labels", "prompts"):
            paths[key] = Path(tmp) / f"{key}.npy"
            np.save(paths[key], d[key])
        argv = [sys.executable, "-m", "asif", "sweep", "--quiet", "--device", "cpu", "--first-pass", args.first_pass,
                "--n-classes", str(d["n_classes"]), "--out", str(Path(tmp) / "out.json"),
                "--anchor-counts", *map(str, args.counts)]
        for key, opt in (("anchor_images", "--anchor-images"), ("anchor_texts", "--anchor-texts"),
                         ("images", "--images"), ("labels", "--labels"), ("prompts", "--prompts")):
            argv += [opt, str(paths[key])]

        def in_process():
            ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], d["n_classes"],
                     anchor_counts=args.counts, device="cpu", first_pass=args.first_pass)

        def process(env=None):
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)

        def cold():
            with tempfile.TemporaryDirectory() as cache:
                process(dict(os.environ, NUMBA_CACHE_DIR=cache))

        in_process()  # kernels compiled and cached, as after any first run
        times = {"in_process": [], "process": [], "cold": []}
        for _ in range(args.repeat):
            for name, fn in (("in_process", in_process), ("process", process), ("cold", cold)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    res = dict(best, process_over_in_process=best["process"] / best["in_process"],
               cold_over_in_process=best["cold"] / best["in_process"], first_pass=args.first_pass,
               anchors=args.anchors, queries=args.queries, n_counts=len(args.counts))
    print(f"in-process sweep: {best['in_process']:.2f} s; `asif sweep` process: {best['process']:.2f} s "
          f"({res['process_over_in_process']:.2f}x); with an empty numba cache: {best['cold']:.2f} s "
          f"({res['cold_over_in_process']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
