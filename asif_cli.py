"""The ``asif`` command.

Each group of subcommands is added by one ``_add_*`` function below; every
command function takes the parsed ``args`` and returns an exit status. Bad
input (``ASIFInputError``, a missing file) exits with status 2 and one line
on stderr that says what is wrong; nothing half-written is left at ``--out``.
"""
from __future__ import annotations

import argparse
import sys

from asif_core import ASIFInputError


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------
# core commands: sweep, similarity (precomputed embeddings)
# ---------------------------------------------------------------------------

def _load_npy(path: str, what: str):
    """Open a .npy memory-mapped (anchors may exceed RAM); one clear line if it can't be read."""
    import numpy as np
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file {path!r}")
    except (ValueError, OSError) as e:
        raise UsageError(f"{what}: {path!r} is not a readable .npy file ({e})")


def _versions() -> dict:
    import platform
    import numpy as np
    import torch
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def _print_table(rows, columns) -> None:
    widths = [max(len(c), *(len(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])) for r in rows)) for c in columns]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(w) for c, w in zip(columns, widths)))


def sweep_result(rows, *, dataset: str, model: str, params: dict, wall_time: float) -> dict:
    """clip_benchmark-style JSON: one entry per (anchor count, exponent) under ``results``."""
    return {
        "dataset": dataset, "model": model, "task": "zeroshot_classification",
        "metrics": {k: rows[-1][k] for k in ("acc1", "acc5", "mean_per_class_recall")},
        "results": [{"n_anchors": r["n_anchors"], "exponent": r["exponent"], "non_zeros": r["non_zeros"],
                     "reduce": r["reduce"],
                     "metrics": {k: r[k] for k in ("acc1", "acc5", "mean_per_class_recall")}} for r in rows],
        "params": params, "versions": _versions(), "wall_time_s": round(wall_time, 3),
    }


def cmd_sweep(args) -> int:
    import time
    import numpy as np
    import asif_core as ac
    from asif_core import atomic_write_json
    ai = _load_npy(args.anchor_images, "--anchor-images")
    at = _load_npy(args.anchor_texts, "--anchor-texts")
    x = _load_npy(args.images, "--images")
    y = np.asarray(_load_npy(args.labels, "--labels"))
    p = _load_npy(args.prompts, "--prompts")
    start = time.perf_counter()
    rows = ac.sweep(ai, at, x, y, p, args.n_classes, n_anchors=args.n_anchors, exponents=args.exponents,
                    non_zeros=args.non_zeros, reduce=args.reduce, device=args.device, dtype=args.dtype,
                    block_size=args.block_size, progress=not args.quiet)
    wall = time.perf_counter() - start
    _print_table(rows, ["n_anchors", "exponent", "acc1", "acc5", "mean_per_class_recall"])
    print(f"{len(rows)} points in {wall:.2f} s")
    if args.out:
        params = {"non_zeros": args.non_zeros, "exponents": args.exponents, "n_anchors": sorted({r["n_anchors"] for r in rows}),
                  "reduce": args.reduce, "device": str(ac.pick_device(args.device)), "n_classes": args.n_classes,
                  "anchor_images": args.anchor_images, "anchor_texts": args.anchor_texts}
        atomic_write_json(args.out, sweep_result(rows, dataset=args.dataset, model=args.model, params=params, wall_time=wall))
    return 0


def cmd_similarity(args) -> int:
    import asif_core as ac
    model = ac.ASIF(_load_npy(args.anchor_images, "--anchor-images"), _load_npy(args.anchor_texts, "--anchor-texts"),
                    non_zeros=args.non_zeros, exponent=args.exponent, device=args.device, dtype=args.dtype,
                    block_size=args.block_size)
    s = model.similarity(_load_npy(args.images, "--images"), _load_npy(args.texts, "--texts"))
    ac.atomic_save_npy(args.out, s.astype("float32"))
    print(f"wrote {args.out}: similarity {s.shape[0]} images x {s.shape[1]} texts")
    return 0


def _add_stream_options(p) -> None:
    p.add_argument("--anchor-images", required=True, metavar="A_IMG.npy", help="anchor image embeddings [N, d1]")
    p.add_argument("--anchor-texts", required=True, metavar="A_TXT.npy", help="anchor caption embeddings [N, d2], row i pairs with image row i")
    p.add_argument("--non-zeros", type=int, default=800, help="k: anchors kept per relative representation (paper: 800)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16, float64")
    p.add_argument("--block-size", type=int, default=None, help="anchors per block (default: from free memory)")


def _add_core_commands(sub) -> None:
    p = sub.add_parser("sweep", help="zero-shot accuracy against anchor count and exponent (paper Fig. 5) from .npy embeddings")
    _add_stream_options(p)
    p.add_argument("--images", required=True, metavar="X.npy", help="test image embeddings [Q, d1]")
    p.add_argument("--labels", required=True, metavar="y.npy", help="class index of each test image [Q]")
    p.add_argument("--prompts", required=True, metavar="P.npy", help="prompt embeddings [C*T, d2], class-major (T consecutive rows per class)")
    p.add_argument("--n-classes", type=int, required=True, help="C")
    p.add_argument("--exponents", type=float, nargs="+", default=[8.0], help="p values (paper: 8)")
    p.add_argument("--n-anchors", type=int, nargs="+", default=None, help="anchor counts, each evaluated on the first n anchors (default: all)")
    p.add_argument("--reduce", choices=["max", "mean"], default="max", help="class score: best template (paper) or prompt ensemble")
    p.add_argument("--dataset", default="custom", help="dataset name for the JSON")
    p.add_argument("--model", default="asif", help="model name for the JSON")
    p.add_argument("--out", default=None, metavar="result.json", help="clip_benchmark-style JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("similarity", help="ASIF image-text similarity matrix from .npy embeddings")
    _add_stream_options(p)
    p.add_argument("--images", required=True, metavar="X.npy", help="image embeddings [Q_img, d1]")
    p.add_argument("--texts", required=True, metavar="T.npy", help="text embeddings [Q_txt, d2]")
    p.add_argument("--exponent", type=float, default=8.0, help="p (paper: 8)")
    p.add_argument("--out", required=True, metavar="S.npy", help="where to write the [Q_img, Q_txt] float32 matrix")
    p.set_defaults(func=cmd_similarity)


# ---------------------------------------------------------------------------
# encoder commands: encoders, embed-images, embed-texts
# ---------------------------------------------------------------------------

def _add_encoder_commands(sub) -> None:
    pass  # filled in with asif_encoders


# ---------------------------------------------------------------------------
# data commands: data build, eval, fetch, publish
# ---------------------------------------------------------------------------

def _add_data_commands(sub) -> None:
    pass  # filled in with asif_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asif",
        description="ASIF: an image-text model from two frozen unimodal encoders and coupled anchor pairs, without training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_core_commands(sub)
    _add_encoder_commands(sub)
    _add_data_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ASIFInputError, UsageError, FileNotFoundError) as e:
        print(f"asif {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
