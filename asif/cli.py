"""The ``asif`` command.

Each group of subcommands is added by one ``_add_*`` function below; every
command function takes the parsed ``args`` and returns an exit status. Bad
input (``ASIFInputError``, a missing file, an option out of range) exits with
status 2 and one line on stderr that names the option or file and what is
wrong; numbers are range-checked when the command line is parsed, outputs are
checked for writability before any work, and nothing half-written is left at
``--out``.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from asif.config import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from asif.errors import ASIFInputError


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default after its text, unless the default is None or False
    (the text then says what happens without the option)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------
# option types: every option value is checked here, when the line is parsed
# ---------------------------------------------------------------------------

def _number(kind, low, above: bool = False, what: str = ""):
    """An argparse type: ``kind`` (int or float), finite, >= ``low`` (> with ``above``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {what}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, what="an integer >= 1")
positive_float = _number(float, 0, above=True, what="a number > 0")
non_negative_float = _number(float, 0, what="a number >= 0")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps; whether it exists here is checked when the command starts."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def dtype_name(text: str) -> str:
    from asif_core import parse_dtype  # torch is imported only when --dtype is given
    try:
        parse_dtype(text)
    except ASIFInputError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use float32, float16, bfloat16 or float64") \
            from None
    return text


def plot_file(text: str) -> str:
    """A figure file whose extension matplotlib can write (checked before anything is computed)."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = Path(text).suffix.lower().lstrip(".")
    if ext not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: {'.' + ext if ext else 'no extension'} is not a figure format; "
                                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (the usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_out(path, option: str, size: int = 0) -> None:
    """Before any work: ``path`` can take a file of ``size`` bytes (asif.storage.check_writable)."""
    from asif.storage import check_writable
    check_writable(path, option, size)


# ---------------------------------------------------------------------------
# core commands: sweep, similarity (precomputed embeddings)
# ---------------------------------------------------------------------------

def _load_npy(path: str, what: str):
    """Open a .npy memory-mapped (anchors may exceed RAM); one line naming ``what`` and the file if it can't be."""
    import numpy as np
    where = f"{what} {path}"
    if Path(path).is_dir():
        raise UsageError(f"{where}: is a directory, not a .npy file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot be read ({e.strerror})") from None
    if not head:
        raise UsageError(f"{where}: the file is empty (0 bytes); write the array with numpy.save")
    if head.startswith(b"PK\x03\x04"):
        raise UsageError(f"{where}: is an .npz archive of several arrays, not one .npy array; "
                         "save the one you mean with numpy.save (np.load(FILE)[NAME])")
    if not head.startswith(b"\x93NUMPY"):
        raise UsageError(f"{where}: not a .npy file (it starts with {head[:6]!r}); write the array with numpy.save")
    for mmap in ("r", None):  # an empty array cannot be memory-mapped: read it
        try:
            return np.load(path, mmap_mode=mmap, allow_pickle=False)
        except ValueError as e:
            if "pickle" in str(e) or "Python objects" in str(e):
                raise UsageError(f"{where}: holds Python objects (dtype object), not numbers; save a numeric array") \
                    from None
            error = e
        except (OSError, EOFError) as e:
            error = e
    raise UsageError(f"{where}: a damaged or truncated .npy file ({error}); write it again with numpy.save")


def _blame(error: Exception, names: dict) -> UsageError:
    """The core's message with its argument names (``anchor_images``, ``block_size=`` ...) replaced,
    in one pass, by the options and files the user gave (``--anchor-images A.npy``, ``--block-size=``)."""
    plain = [re.escape(n) for n in names if "_" not in n]      # images, labels ...: only as the subject
    ident = [re.escape(n) for n in names if "_" in n]          # anchor_images, n_classes ...: anywhere
    parts = ([rf"^(?:{'|'.join(plain)})(?=[:=])"] if plain else []) + \
        ([rf"(?<![\w/.-])(?:{'|'.join(ident)})\b"] if ident else [])
    return UsageError(re.sub("|".join(parts), lambda m: names[m.group(0)], str(error)) if parts else str(error))


def _stream_names(args, *files: str) -> dict:
    names = {f: f"--{f.replace('_', '-')} {getattr(args, f)}" for f in files}
    names.update({p: f"--{p.replace('_', '-')}" for p in ("n_classes", "non_zeros", "block_size", "anchor_counts",
                                                           "device", "dtype")})
    names["exponent"] = "--exponents" if hasattr(args, "exponents") else "--exponent"
    return names


def _pass_that_ran(args, images, prompts, rows) -> str:
    """"fp32" or "bf16": ``--first-pass`` with "auto" settled as the sweep settled it."""
    import asif_core as ac
    compute = ac.Compute.of(args.device, args.dtype, first_pass=args.first_pass)  # "auto" is "fp32" off the CPU
    counts = {r["n_anchors"] for r in rows}
    return compute.pass_for((len(images) + len(prompts)) * max(counts), len(counts))


def _print_table(rows, columns) -> None:
    widths = [max(len(c), *(len(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])) for r in rows)) for c in columns]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(w) for c, w in zip(columns, widths)))


def cmd_sweep(args) -> int:
    import time
    import numpy as np
    import asif_core as ac
    from asif.metrics import zero_shot_result
    from asif.storage import atomic_write_json
    if args.out:
        _check_out(args.out, "--out")
    ai = _load_npy(args.anchor_images, "--anchor-images")
    at = _load_npy(args.anchor_texts, "--anchor-texts")
    x = _load_npy(args.images, "--images")
    y = np.asarray(_load_npy(args.labels, "--labels"))
    p = _load_npy(args.prompts, "--prompts")
    start = time.perf_counter()
    run = ac.sweep
    extra = {}
    if args.engine == "ray":
        from asif import distributed
        run = distributed.sweep
        extra = dict(address=args.address, shards=args.shards, cpus_per_worker=args.cpus_per_worker)
    try:
        rows = run(ai, at, x, y, p, args.n_classes, anchor_counts=args.anchor_counts, exponents=args.exponents,
                   non_zeros=args.non_zeros, reduce=args.reduce, device=args.device, dtype=args.dtype,
                   block_size=args.block_size, progress=not args.quiet, first_pass=args.first_pass,
                   centre=args.centre, **extra)
    except ASIFInputError as e:
        raise _blame(e, _stream_names(args, "anchor_images", "anchor_texts", "images", "labels", "prompts")) from None
    wall = time.perf_counter() - start
    _print_table(rows, ["n_anchors", "exponent", "acc1", "acc5", "mean_per_class_recall"])
    print(f"{len(rows)} points in {wall:.2f} s")
    if args.out:
        from asif.metrics import majority_class_rate
        params = {"non_zeros": args.non_zeros, "exponents": args.exponents,
                  "anchor_counts": sorted({r["n_anchors"] for r in rows}),
                  "reduce": args.reduce, "device": str(ac.pick_device(args.device)), "n_classes": args.n_classes,
                  "first_pass": _pass_that_ran(args, x, p, rows), "engine": args.engine, "centre": args.centre,
                  "chance": 1 / args.n_classes, "majority_class_rate": majority_class_rate(y),
                  "anchor_images": args.anchor_images, "anchor_texts": args.anchor_texts}
        atomic_write_json(args.out, zero_shot_result(rows, dataset=args.dataset, model=args.model, params=params,
                                                     wall_time=wall))
    return 0


def cmd_similarity(args) -> int:
    import asif_core as ac
    from asif.storage import atomic_save_npy
    _check_out(args.out, "--out")
    ai, at = _load_npy(args.anchor_images, "--anchor-images"), _load_npy(args.anchor_texts, "--anchor-texts")
    x, t = _load_npy(args.images, "--images"), _load_npy(args.texts, "--texts")
    if x.ndim == 2 and t.ndim == 2:  # the matrix must fit where it goes: known before computing it
        _check_out(args.out, "--out", 4 * x.shape[0] * t.shape[0] + 128)
    try:
        model = ac.ASIF(ai, at, non_zeros=args.non_zeros, exponent=args.exponent, device=args.device,
                        dtype=args.dtype, block_size=args.block_size, first_pass=args.first_pass,
                        centre=args.centre)
        s = model.similarity(x, t)
    except ASIFInputError as e:
        raise _blame(e, _stream_names(args, "anchor_images", "anchor_texts", "images", "texts")) from None
    atomic_save_npy(args.out, s.astype("float32"))
    print(f"wrote {args.out}: similarity {s.shape[0]} images x {s.shape[1]} texts")
    return 0


def _add_stream_options(p) -> None:
    p.add_argument("--anchor-images", required=True, metavar="A_IMG.npy", help="anchor image embeddings [N, d1]")
    p.add_argument("--anchor-texts", required=True, metavar="A_TXT.npy", help="anchor caption embeddings [N, d2], row i pairs with image row i")
    p.add_argument("--non-zeros", type=positive_int, default=800, help="k: anchors kept per relative representation (paper: 800)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", type=dtype_name, default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16 (CUDA), float64")
    p.add_argument("--block-size", type=positive_int, default=None, help="anchors per block (default: from free memory)")
    p.add_argument("--first-pass", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 (CPU): candidates from bfloat16 products, those that can still be in the top-k "
                        "recomputed exactly: the same top-k as float64 rounded to float32, in about half the time "
                        "where the CPU multiplies bfloat16 fast (AMX); fp32: plain float32 products; auto: "
                        "bf16 for a large run with one anchor count where this CPU is found fast, else fp32 "
                        "(benchmarks/README.md)")
    p.add_argument("--centre", action="store_true",
                   help="centre each modality on its anchors' mean before the cosines (default: off, the paper's "
                        "method; see `asif eval --help`)")


def _add_engine_options(p, shards_help: str | None = None) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: spread over a Ray cluster (pip install -e \".[ray]\"), "
                        "the same numbers")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: 'auto' joins the cluster started here by `ray start --head`, "
                        "ray://HOST:10001 a remote one (default: Ray on this machine alone)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=None, metavar="N",
                   help="with --engine ray: cores (torch threads) of each worker (default: 1 for embedding, "
                        "the cores of the smallest node for the sweep)")
    if shards_help:
        p.add_argument("--shards", type=positive_int, default=None, metavar="N", help=f"with --engine ray: {shards_help}")
    else:
        p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="with --engine ray: actors per encoder (default: one per GPU, else one per "
                            "--cpus-per-worker cores)")


def _add_core_commands(sub) -> None:
    p = sub.add_parser("sweep", help="zero-shot accuracy against anchor count and exponent (paper Fig. 5) from .npy embeddings")
    _add_stream_options(p)
    p.add_argument("--images", required=True, metavar="X.npy", help="test image embeddings [Q, d1]")
    p.add_argument("--labels", required=True, metavar="y.npy", help="class index of each test image [Q]")
    p.add_argument("--prompts", required=True, metavar="P.npy", help="prompt embeddings [C*T, d2], class-major (T consecutive rows per class)")
    p.add_argument("--n-classes", type=positive_int, required=True, help="C")
    p.add_argument("--exponents", type=positive_float, nargs="+", default=[8.0], help="p values (paper: 8)")
    p.add_argument("--anchor-counts", "--n-anchors", dest="anchor_counts", type=positive_int, nargs="+", default=None,
                   help="anchor counts, each evaluated on the first n anchors (default: all)")
    p.add_argument("--reduce", choices=["max", "mean"], default="max", help="class score: best template (paper) or prompt ensemble")
    p.add_argument("--dataset", default="custom", help="dataset name for the JSON")
    p.add_argument("--model", default="asif", help="model name for the JSON")
    p.add_argument("--out", default=None, metavar="result.json", help="clip_benchmark-style JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_options(p, "anchor shards, one Ray task each (default: one per worker)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("similarity", help="ASIF image-text similarity matrix from .npy embeddings")
    _add_stream_options(p)
    p.add_argument("--images", required=True, metavar="X.npy", help="image embeddings [Q_img, d1]")
    p.add_argument("--texts", required=True, metavar="T.npy", help="text embeddings [Q_txt, d2]")
    p.add_argument("--exponent", type=positive_float, default=8.0, help="p (paper: 8)")
    p.add_argument("--out", required=True, metavar="S.npy", help="where to write the [Q_img, Q_txt] float32 matrix")
    p.set_defaults(func=cmd_similarity)


# ---------------------------------------------------------------------------
# encoder commands: encoders, embed-images, embed-texts
# ---------------------------------------------------------------------------

def _add_encoder_commands(sub) -> None:
    """``asif encoders``, ``asif embed-images``, ``asif embed-texts`` (asif.encoders)."""

    def cmd_encoders(args) -> int:
        from asif.encoders import list_encoders
        rows = list_encoders()
        w = max(len(r["name"]) for r in rows)
        print(f"{'name':<{w}}  modality  offline   dim  description")
        for r in rows:
            print(f"{r['name']:<{w}}  {r['modality']:<8}  {'yes' if r['offline'] else '-':<7}  "
                  f"{r['dim'] or '?':>4}  {r['description']}")
        print("offline = weights installed as a package; any timm image model name and any "
              "sentence-transformers name or folder also works (online, or once cached)")
        return 0

    def _done(out, x, quiet) -> int:
        from asif.storage import atomic_save_npy
        # written only after every input was encoded, atomically: a failure
        # leaves nothing (or the previous file) at --out
        atomic_save_npy(out, x)
        if not quiet:
            print(f"wrote {out}: {x.shape[0]} x {x.shape[1]} float32, L2-normalised")
        return 0

    def cmd_embed_images(args) -> int:
        import os
        from asif.encoders import load_image_encoder
        from asif.errors import BadImagesError
        from asif.storage import printable
        _check_out(args.out, "--out", 4 * 2048 * len(args.files))
        hint = "Fix or remove them, or pass --skip-bad to leave them out"
        # files that are missing or folders are all reported before the model is
        # loaded (seconds saved); unreadable ones are found while decoding
        skipped = [(i, printable(f), "no such file" if not os.path.exists(f) else
                    "it is a directory; give the image files inside it (DIR/*.jpg)")
                   for i, f in enumerate(args.files) if not os.path.isfile(f)]
        if skipped and not args.skip_bad:
            raise BadImagesError(skipped, len(args.files), hint)
        kept = [i for i in range(len(args.files)) if i not in {s[0] for s in skipped}]
        x = None
        if kept:
            enc = load_image_encoder(args.encoder, device=args.device, backend=args.backend)
            x, failed = enc.encode_checked([args.files[i] for i in kept], batch_size=args.batch_size,
                                           progress=not args.quiet, keep_going=args.skip_bad)
            if failed and not args.skip_bad:
                raise BadImagesError([(kept[j], label, why) for j, label, why in failed], len(args.files), hint)
            bad = {j for j, _, _ in failed}
            skipped += [(kept[j], label, why) for j, label, why in failed]
            x, kept = x[[j for j in range(len(kept)) if j not in bad]], [k for j, k in enumerate(kept) if j not in bad]
        if not kept:
            raise BadImagesError(sorted(skipped), len(args.files), "none is left to embed")
        for _, label, why in sorted(skipped):
            print(f"skipped {label}: {why}", file=sys.stderr)
        if skipped:  # on the console, whatever --quiet says: the rows no longer match the arguments one to one
            print(f"skipped {len(skipped)} of {len(args.files)} files (--skip-bad); row i of {args.out} is the "
                  "i-th file that was kept", file=sys.stderr)
        return _done(args.out, x, args.quiet)

    def cmd_embed_texts(args) -> int:
        from asif.encoders import load_text_encoder
        from asif.storage import read_text
        _check_out(args.out, "--out")
        texts = list(args.texts)
        if args.from_file:
            where = f"--from-file {args.from_file}"
            if not Path(args.from_file).is_file():
                raise ASIFInputError(f"{where}: " + ("is a directory; give a text file, one text per line"
                                                     if Path(args.from_file).is_dir() else "no such file"))
            lines = read_text(args.from_file, where).splitlines()
            while lines and not lines[-1].strip():
                lines.pop()  # trailing blank lines only; a blank line inside would shift rows
            blank = [i + 1 for i, t in enumerate(lines) if not t.strip()]
            if blank:
                raise ASIFInputError(f"{where}: line {blank[0]} is empty; one text per line, "
                                     "row i of the output is line i")
            texts += lines
        if not texts:
            raise ASIFInputError("no texts: give them as arguments or with --from-file PATH")
        enc = load_text_encoder(args.encoder, device=args.device)
        return _done(args.out, enc.encode(texts, batch_size=args.batch_size, progress=not args.quiet), args.quiet)

    p = sub.add_parser("encoders", help="list the image, text and CLIP encoders (offline ones marked)")
    p.set_defaults(func=cmd_encoders)

    p = sub.add_parser("embed-images", help="embed image files into an [n, dim] .npy (L2-normalised, float32)")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files; row i of --out is FILE i")
    p.add_argument("--encoder", default=DEFAULT_IMAGE_ENCODER, help="image encoder name (see `asif encoders`)")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: ONNX Runtime on the CPU (faster there; needs onnxruntime)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out files that cannot be read (listed on stderr) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    p.set_defaults(func=cmd_embed_images)

    p = sub.add_parser("embed-texts", help="embed texts (anchors' captions, prompts) into an [n, dim] .npy")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts; row i of --out is TEXT i")
    p.add_argument("--from-file", metavar="PATH", help="read texts from PATH, one per line (after any TEXT)")
    p.add_argument("--encoder", default=DEFAULT_TEXT_ENCODER, help="text encoder name or folder (see `asif encoders`)")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    p.set_defaults(func=cmd_embed_texts)


# ---------------------------------------------------------------------------
# data commands: data build, eval, fetch, publish
# ---------------------------------------------------------------------------

def _add_data_commands(sub) -> None:
    # the data modules are imported inside the commands: `asif --help` stays fast.
    def cmd_fetch(args) -> int:
        from asif import registry
        folder = registry.fetch(args.name, registry=args.registry, root=args.cache, progress=not args.quiet)
        print(folder)
        return 0

    def cmd_publish(args) -> int:
        from asif import registry
        entry = registry.publish(args.folder, name=args.name, url=args.url, gdrive_id=args.gdrive_id,
                                  registry=args.registry, out=args.out)
        print(f"archive  {entry['archive']}\nsha256   {entry['sha256']}\nsize     {entry['size']}\n"
              f"registry {entry['registry']}")
        if entry["source"] is None:
            print("next: upload the archive and add its url or gdrive_id to the entry (or publish again with --url/--gdrive-id)")
        return 0

    p = sub.add_parser("fetch", help="download precomputed embeddings by registry name (checked by sha256)")
    p.add_argument("name", help="a name in data/registry.json")
    p.add_argument("--registry", help="registry JSON (default: data/registry.json or $ASIF_REGISTRY)")
    p.add_argument("--cache", help="cache folder (default: $ASIF_CACHE or cache/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("publish", help="pack an embedding set folder and write its registry entry")
    p.add_argument("folder", help="an embedding set folder (manifest.json + shards), or a folder of several")
    p.add_argument("--name", help="registry name (default: the folder's name)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="where the uploaded archive can be downloaded")
    src.add_argument("--gdrive-id", help="Google Drive file id of the uploaded archive")
    p.add_argument("--registry", help="registry JSON to update (default: data/registry.json or $ASIF_REGISTRY)")
    p.add_argument("--out", help="folder for the archive (default: <cache>/published)")
    p.set_defaults(func=cmd_publish)


# ---------------------------------------------------------------------------
# end to end: data build, eval, notebooks, report
# ---------------------------------------------------------------------------

def cmd_embed_anchors(args) -> int:
    import time
    from asif import storage
    from asif.cache import load_anchor_embeddings
    from asif.config import cache_root
    if args.out:
        for side in ("images", "texts"):
            _check_out(Path(args.out) / side / "manifest.json", "--out")
    engine = None
    if args.engine == "ray":
        from asif.distributed import RayEngine
        engine = RayEngine(address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker or 1)
    start = time.perf_counter()
    anchors = load_anchor_embeddings(args.anchors, args.image_encoder, args.text_encoder, limit=args.limit,
                                     progress=not args.quiet, batch_size=args.batch_size, engine=engine)
    wall = time.perf_counter() - start
    print(f"{len(anchors)} anchor pairs of {args.anchors} embedded ({args.engine}) in {wall:.1f} s; "
          f"image {anchors.A_img.shape[1]}-d, text {anchors.A_txt.shape[1]}-d; cache {cache_root()}")
    if anchors.dropped:
        print(f"left out: {len(anchors.dropped)} pairs with an unreadable image (first: {anchors.dropped[0]['id']})")
    if args.out:
        meta = {"anchor_set": args.anchors, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder}
        for side, array in (("images", anchors.A_img), ("texts", anchors.A_txt)):
            storage.save_embedding_set(Path(args.out) / side, array, dict(meta, kind=side), captions=anchors.captions)
        print(f"wrote {args.out}/images and {args.out}/texts (row i of both is pair i)")
    return 0


def cmd_data_build(args) -> int:
    import time
    from asif.config import cache_root
    from asif.pipeline import build_default
    start = time.perf_counter()
    report = build_default(progress=not args.quiet, limit=args.limit)
    for what, (rows, seconds) in report.items():
        print(f"{what:32s} {rows:>7} rows  {seconds:8.1f} s")
    print(f"built in {time.perf_counter() - start:.1f} s; cache {cache_root()}")
    return 0


def cmd_data_verify(args) -> int:
    """Hash every shard in the cache; damaged ones are removed (recomputed or unpacked again at next use)."""
    import time
    from asif.config import cache_root
    from asif.pipeline import verify_cache
    start = time.perf_counter()
    report = verify_cache(args.cache, repair=not args.dry_run, progress=not args.quiet)
    for r in report:
        if r["damaged"]:
            print(f"damaged  {r['folder']}: {', '.join(r['damaged'])}; {r['action']}")
    damaged = sum(len(r["damaged"]) for r in report)
    print(f"verified {len(report)} embedding sets, {sum(r['shards'] for r in report)} shards "
          f"({sum(r['bytes'] for r in report) / 1e6:.1f} MB) in {cache_root(args.cache)} in "
          f"{time.perf_counter() - start:.1f} s: " + (f"{damaged} damaged files" if damaged else "all intact"))
    return 1 if damaged else 0


def _names_or_file(values: list[str] | None, option: str) -> list[str] | None:
    """--classnames / --templates: the values, or the lines of the one file they name."""
    import os
    from asif.storage import read_text
    if values and len(values) == 1 and os.path.isfile(values[0]):
        lines = read_text(values[0], f"{option} {values[0]}").splitlines()
        return [line.strip() for line in lines if line.strip()]
    return values


def cmd_eval(args) -> int:
    import time
    from asif import pipeline
    for path, option in ((args.out, "--out"), (args.plot, "--plot")):
        if path:
            _check_out(path, option)
    start = time.perf_counter()
    choice = pipeline.Choice(image_encoder=args.image_encoder, text_encoder=args.text_encoder,
                             dataset=args.dataset, anchor_set=args.anchors, non_zeros=args.non_zeros,
                             exponents=list(args.exponents), classnames=_names_or_file(args.classnames, "--classnames"),
                             templates=_names_or_file(args.templates, "--templates"), centre=args.centre)
    prepared = pipeline.prepare(choice, progress=not args.quiet, limit=args.limit, anchor_limit=args.anchor_limit,
                                split=args.split, device=args.device)
    run = pipeline.run_zero_shot(prepared, exponents=args.exponents, non_zeros=args.non_zeros, reduce=args.reduce,
                                 anchor_counts=args.anchor_counts, device=args.device, progress=not args.quiet)
    wall = time.perf_counter() - start
    _print_table(run.rows, ["n_anchors", "exponent", "acc1", "acc5", "mean_per_class_recall"])
    print(f"{run.summary()}; {len(prepared.anchors)} anchors, {wall:.1f} s end to end")
    left_out = _left_out(prepared)
    if left_out:
        print(f"left out: {left_out}")
    if args.out:
        run.result["wall_time_s"] = round(wall, 3)
        run.save(args.out)
    if args.plot:
        from asif.storage import atomic_write
        from asif.widgets import plot_accuracy_vs_anchors
        fig = plot_accuracy_vs_anchors(run.rows, run.chance, title=f"{args.dataset}: {args.image_encoder} + "
                                       f"{args.text_encoder}, anchors {args.anchors}",
                                       majority=run.result["params"]["majority_class_rate"])
        fmt = Path(args.plot).suffix.lstrip(".").lower()
        atomic_write(args.plot, lambda f: fig.savefig(f, format=fmt, dpi=120))
    return 0


def _left_out(prepared) -> str:
    """What the run could not use, counted by reason: unreadable test images, anchor pairs whose
    image failed, anchor items skipped while listing (no caption ...), repeated captions."""
    from collections import Counter
    anchor_set = prepared.anchors.anchor_set
    split = prepared.evals.dataset.identity.get("split", "test")
    skipped = Counter(i["reason"] for i in anchor_set.skipped)
    counts = ((f"{split} images unreadable", len(prepared.evals.dropped), None),
              ("anchor pairs with an unreadable image", len(prepared.anchors.dropped), None),
              ("anchor items skipped while listing", len(anchor_set.skipped), skipped),
              ("anchor pairs whose caption an earlier pair of their source has", anchor_set.repeated, None))
    parts = []
    for what, n, reasons in counts:
        if n:
            detail = f" ({', '.join(f'{r}: {k}' for r, k in reasons.most_common(3))})" if reasons else ""
            parts.append(f"{n} {what}{detail}")
    return "; ".join(parts)


NOTEBOOKS = ("00_setup", "01_zero_shot", "02_similarity", "03_interpretability", "04_webcam")


def cmd_notebooks(args) -> int:
    """Run the notebooks top to bottom headless; executed copies and their HTML go to --out."""
    import os
    import time
    import nbformat
    from nbclient import NotebookClient
    from asif.config import PROJECT_ROOT
    here = PROJECT_ROOT / "notebooks"
    if not here.is_dir():
        raise UsageError(f"no notebooks folder at {here}; `asif notebooks` runs them from a checkout of the project")
    from asif.storage import make_folder
    out = make_folder(args.out)
    if args.smoke:
        os.environ["ASIF_SMOKE"] = "1"
    os.environ.setdefault("ASIF_BUILD", str(out.parent.resolve() if out.name == "notebooks" else out.resolve()))
    from asif.notebook_html import widget_script, write_html
    widget_js, why = widget_script()
    if widget_js is None:
        print(f"note: the HTML copies load their widget script from a CDN ({why})", flush=True)
    for name in args.names or NOTEBOOKS:
        path = here / f"{name}.ipynb"
        if not path.exists():
            raise UsageError(f"no notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(here)}}).execute()
        tmp = out / f".{name}.ipynb.tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, out / f"{name}.ipynb")
        write_html(nb, out / f"{name}.html", widget_js)  # widgets drawn offline, state stored by nbclient
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


REPORT_START, REPORT_END = "<!-- results:start -->", "<!-- results:end -->"


def _report_lines(results, link_figure, times: dict) -> list[str]:
    """The report's Markdown lines from result JSON paths; ``link_figure(png)`` gives the link of a
    figure that exists (or None to leave it out); ``times``: the run's wall times, if known."""
    import os
    import asif_core as ac
    from asif.metrics import headline_row, results_table
    from asif.pipeline import rows_from_result
    from asif.pipeline import DEFAULT_ANCHORS, TEST_SETS
    from asif.storage import read_json
    loaded = []
    for path in results:
        res = read_json(path)
        if not (isinstance(res, dict) and isinstance(res.get("params"), dict) and "results" in res):
            raise UsageError(f"{path}: not a zero-shot result of `asif eval`; remove it or run it again")
        loaded.append((path, res))

    def rank(item):
        # the default general anchors first, then the in-domain reference, then the rest; test sets in order
        res = item[1]
        kind = {DEFAULT_ANCHORS: 0, "fashion-mnist-train": 1}.get(res["params"].get("anchor_set"), 2)
        data = TEST_SETS.index(res["dataset"]) if res["dataset"] in TEST_SETS else len(TEST_SETS)
        return kind, data, res["params"].get("anchor_set", ""), item[0].name

    loaded.sort(key=rank)
    seen, unique = set(), []
    for path, res in loaded:  # notebook 01 and the main job may write the same curve: report it once
        key = (res["dataset"], res["params"].get("anchor_set"), res["params"].get("non_zeros"),
               res["params"].get("reduce"), res["params"].get("mixing", "union"), bool(res["params"].get("centre")))
        if key not in seen:
            seen.add(key)
            unique.append((path, res))
    loaded = unique
    try:
        lines = _summary_lines([res for _, res in loaded])
    except (KeyError, TypeError) as e:
        raise UsageError(f"a result in {results[0].parent} is not a zero-shot result of `asif eval` (no {e}); "
                         "remove it or run it again") from None
    for path, res in loaded:
        p = res["params"]
        try:
            rows = rows_from_result(res)
        except (KeyError, TypeError) as e:
            raise UsageError(f"{path}: not a zero-shot result of `asif eval` (no {e}); remove it or run it again") \
                from None
        chance = p.get("chance") or 1 / max(1, len(p.get("classnames", [])) or 10)
        top = headline_row(rows)  # as the JSON's metrics, also for results written before they were
        majority = p.get("majority_class_rate")
        lines += [f"### {res['dataset']}, anchors {_anchor_column(p)}", "",
                  f"{p.get('image_encoder')} + {p.get('text_encoder')}, k = {p.get('non_zeros')}, "
                  f"reduce = {p.get('reduce')}{', centred on the anchors mean' if p.get('centre') else ''}, "
                  f"top-1 accuracy on {p.get('n_test', '?')} test images. "
                  f"Headline (all {top['n_anchors']} anchors, p = {top['exponent']:g}): "
                  f"**{100 * top['acc1']:.1f}%**; chance {100 * chance:.0f}%"
                  + (f", majority class {100 * majority:.0f}%" if majority is not None else "")
                  + f". Wall time of this evaluation {res.get('wall_time_s', '?')} s.", ""]
        link = link_figure(path.with_name(path.name.replace("zero_shot_", "fig5_").replace(".json", ".png")))
        if link:
            lines += [f"![accuracy against anchors]({link})", ""]
        lines += [results_table(rows), ""]
    if times.get("seconds") is not None:
        built = "" if times.get("build_seconds") is None else \
            f", of which {times['build_seconds'] / 60:.1f} min building or checking the embeddings"
        lines += [f"This `bash run.sh` took {times['seconds'] / 60:.1f} min{built}, on "
                  f"{os.cpu_count()} CPU cores (device {ac.pick_device('auto')}).", ""]
    return lines


def _anchor_column(params: dict) -> str:
    """How a result's anchors are named in the report: the set, and "centred" when it was."""
    return f"`{params.get('anchor_set', '?')}`" + (" centred" if params.get("centre") else "")


def _summary_lines(results: list[dict]) -> list[str]:
    """One table: each test set's headline top-1 (and mean per-class recall) per anchor set, beside chance
    and the majority-class rate."""
    from asif.metrics import headline_row
    from asif.pipeline import rows_from_result
    anchor_sets = list(dict.fromkeys(_anchor_column(r["params"]) for r in results))
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    cell = {}
    info = {}
    for res in results:
        top = headline_row(rows_from_result(res))
        p = res["params"]
        cell[(res["dataset"], _anchor_column(p))] = (f"**{100 * top['acc1']:.1f}%** "
                                                            f"({100 * top['mean_per_class_recall']:.1f}%)")
        info.setdefault(res["dataset"], (p.get("n_test", "?"), len(p.get("classnames", [])) or "?",
                                         p.get("chance"), p.get("majority_class_rate"), top["exponent"],
                                         p.get("non_zeros"), p.get("reduce")))
    lines = ["Zero-shot top-1 accuracy with all anchors of each set (mean per-class recall in brackets), "
             "k = {5}, p = {4:g}, reduce = {6}; no parameter tuned on a test set.".format(*next(iter(info.values()))),
             "", "| test set | images | classes | chance | majority class | "
             + " | ".join(anchor_sets) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(anchor_sets)]
    for d in datasets:
        n, c, chance, majority, *_ = info[d]
        pct = (lambda v: f"{100 * v:.1f}%" if v is not None else "?")
        lines.append(f"| {d} | {n} | {c} | {pct(chance)} | {pct(majority)} | "
                     + " | ".join(cell.get((d, a), "") for a in anchor_sets) + " |")
    return lines + [""]


def cmd_report(args) -> int:
    """The Markdown report of a run, ``<build>/report.md`` (figures linked where they lie); with
    ``--readme``, the same text replaces the README's results section and the figures are copied
    to docs/figures beside it (a maintainer's step: ``bash run.sh`` never edits tracked files)."""
    import os
    import shutil
    from asif.errors import StorageError
    from asif.storage import atomic_write, atomic_write_json, make_folder, read_json, read_text
    build = Path(args.build)
    results = sorted(build.glob("zero_shot_*.json"))
    if not results:
        raise UsageError(f"no zero_shot_*.json in {build}; run `bash run.sh` (or notebook 01) first")
    out = Path(args.out) if args.out else build / "report.md"
    _check_out(out, "--out")
    if args.readme:
        if not Path(args.readme).is_file():
            raise UsageError(f"--readme {args.readme}: no such file")
        _check_out(args.readme, "--readme")
    times_path = build / "run_times.json"  # kept, so a later --readme states the run's times too
    if args.seconds is not None:
        atomic_write_json(times_path, {"seconds": args.seconds, "build_seconds": args.build_seconds})
    try:
        times = read_json(times_path) if times_path.exists() else {}
    except StorageError:  # damaged: the report just leaves the times out
        times = {}

    def here(fig):
        return Path(os.path.relpath(fig, out.parent)).as_posix() if fig.exists() else None

    text = "\n".join(["# Results", "", f"_Written by `asif report` from the run in `{build}`._", "",
                      *_report_lines(results, here, times)])
    atomic_write(out, lambda f: f.write(text.encode()))
    print(f"wrote {out} from {len(results)} result files")
    if args.readme:
        readme = Path(args.readme)
        figures = readme.parent / "docs" / "figures"

        def copied(fig):
            if not fig.exists():
                return None
            make_folder(figures)
            shutil.copyfile(fig, figures / fig.name)
            return f"{figures.relative_to(readme.parent).as_posix()}/{fig.name}"

        parts = [REPORT_START, "", "_Written by `asif report --readme README.md` from the last `bash run.sh`; "
                 "do not edit by hand._", "", *_report_lines(results, copied, times), REPORT_END]
        body = read_text(readme, f"--readme {readme}")
        if REPORT_START in body and REPORT_END in body:
            body = body[:body.index(REPORT_START)] + "\n".join(parts) + body[body.index(REPORT_END) + len(REPORT_END):]
        else:
            body = body.rstrip() + "\n\n## Results\n\n" + "\n".join(parts) + "\n"
        atomic_write(readme, lambda f: f.write(body.encode()))
        print(f"updated {readme} and {figures}")
    return 0


def _add_run_commands(sub) -> None:
    from asif.config import DEFAULT_ANCHORS, DEFAULT_CENTRE, DEFAULT_DATASET
    p = sub.add_parser("embed-anchors", help="embed an anchor set's images and captions into the cache, here or "
                                             "on a Ray cluster (--engine ray)")
    p.add_argument("--anchors", default=DEFAULT_ANCHORS, metavar="SET",
                   help="iconify, clipart, tuxpaint, fashion-mnist-train, captions:FILE.csv|jsonl, "
                        "webdataset:PATTERN; combine with +")
    p.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER, metavar="NAME", help="see `asif encoders`")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, metavar="NAME", help="see `asif encoders`")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="the first N pairs in the set's seeded order")
    p.add_argument("--batch-size", type=positive_int, default=64)
    _add_engine_options(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the aligned anchors as two embedding sets, DIR/images and DIR/texts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_embed_anchors)

    p = sub.add_parser("data", help="build the offline default embeddings")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="embed fashion-mnist (train, test), clipart and tuxpaint with the default encoders")
    b.add_argument("--limit", type=positive_int, default=None, help="items per set (default: all; ASIF_SMOKE=1 gives 200)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_data_build)
    v = dsub.add_parser("verify", help="hash every shard in the cache (cache hits only check size and mtime) and "
                                       "remove damaged ones, so that the next run recomputes them")
    v.add_argument("--cache", help="cache folder (default: $ASIF_CACHE or cache/)")
    v.add_argument("--dry-run", action="store_true", help="report damage, remove nothing")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_data_verify)

    p = sub.add_parser(
        "eval", help="zero-shot accuracy against anchors from raw data, through the embedding cache",
        description="Zero-shot classification of a dataset's images with ASIF, one curve per exponent against "
                    "the number of anchors (paper Fig. 5), embedding what the cache does not hold yet. "
                    "Example: asif eval --dataset imagefolder:photos --classnames cat dog "
                    "--templates 'a photo of a {c}.' --out r.json")
    p.add_argument("--dataset", default=DEFAULT_DATASET, metavar="NAME",
                   help="evaluation data: tuxpaint-photos, fashion-mnist, clipart-objects (offline, Debian "
                        "packages); cifar10, cifar100, pets "
                        "(online, torchvision); imagenet:PATH (a local validation folder, one wnid subfolder per "
                        "class); imagefolder:PATH (your folder: one subfolder per class, the sorted subfolder "
                        "names are the classes, '_' read as a space)")
    p.add_argument("--split", default="test",
                   help="the dataset's split: test, or train (fashion-mnist, cifar, pets), or validation "
                        "(tuxpaint-photos, clipart-objects: other category folders, for choosing defaults); "
                        "folders have none")
    p.add_argument("--classnames", nargs="+", metavar="NAME", default=None,
                   help="class names in label order (a folder's: its sorted subfolders) in place of the "
                        "dataset's own; one argument that names a file reads one name per line")
    p.add_argument("--templates", nargs="+", metavar="TEMPLATE", default=None,
                   help="prompt templates with {c} for the class name, e.g. 'a photo of a {c}.' (the article "
                        "agrees: an apple, trousers), in place of the dataset's own; one argument that names a "
                        "file reads one per line")
    p.add_argument("--anchors", default=DEFAULT_ANCHORS, metavar="SET",
                   help="coupled image-caption anchors: iconify (npm package, fetched once), clipart, tuxpaint "
                        "(offline, Debian packages), "
                        "fashion-mnist-train (in-domain captions), captions:FILE.csv|jsonl (image path and caption "
                        "per row), webdataset:PATTERN (tar shards); combine sets with +")
    p.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER, metavar="NAME",
                   help="image encoder: a name from `asif encoders`, or any timm model (online)")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, metavar="NAME",
                   help="text encoder: a name from `asif encoders`, any sentence-transformers model (online) "
                        "or a local model folder")
    p.add_argument("--non-zeros", type=positive_int, default=800, metavar="K",
                   help="k: anchors kept in each relative representation (paper: 800)")
    p.add_argument("--exponents", type=positive_float, nargs="+", default=[8.0], metavar="P",
                   help="exponents p, one curve each; the first is the headline (paper: 8)")
    p.add_argument("--anchor-counts", "--n-anchors", dest="anchor_counts", type=positive_int, nargs="+", default=None,
                   metavar="N", help="anchor counts of the curve, each evaluated on the first N anchors "
                                     "(default: powers of two from 64, then all)")
    p.add_argument("--reduce", choices=["max", "mean"], default="max",
                   help="a class's score: its best template (max, the paper's code) or its prompts' mean "
                        "(mean, CLIP's prompt ensemble)")
    p.add_argument("--centre", action=argparse.BooleanOptionalAction, default=DEFAULT_CENTRE,
                   help="centre each modality on its anchors' mean before the cosines, the usual remedy for "
                        "hub anchors that sit in every top-k (default: off, the paper's method; "
                        "docs/default_anchors.md: better on clip-art, worse on the TuxPaint photos, whose "
                        "hubs it doubles)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="a seeded random subset of N test images, and the first N anchors unless --anchor-limit "
                        "(default: all; ASIF_SMOKE=1 gives 200)")
    p.add_argument("--anchor-limit", type=positive_int, default=None, metavar="N",
                   help="the first N anchor pairs of the set's seeded order (default: --limit, else all)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", default=None, metavar="result.json",
                   help="write clip_benchmark JSON: metrics = the headline (all anchors, the first exponent), "
                        "headline = its count, exponent and per-class recall, results = every (count, exponent), "
                        "params = encoders, data, class names, templates, prompts, chance, majority-class rate")
    p.add_argument("--plot", type=plot_file, default=None, metavar="fig.png",
                   help="also draw the accuracy-vs-anchors figure")
    p.add_argument("--quiet", action="store_true", help="no progress bars (embedding, loading weights, sweep)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("notebooks", help="run the notebooks headless, leaving executed copies (.ipynb, and .html "
                                         "that draws the widgets offline) in --out")
    p.add_argument("names", nargs="*", help=f"default: all of {', '.join(NOTEBOOKS)}")
    p.add_argument("--out", default="build/notebooks")
    p.add_argument("--smoke", action="store_true", help="small data (ASIF_SMOKE=1)")
    p.add_argument("--timeout", type=positive_int, default=3600, help="seconds per cell")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("report", help="the Markdown report of a run (<build>/report.md); --readme also puts "
                                      "it into the README (maintainers)")
    p.add_argument("--build", default="build", help="the run's folder: zero_shot_*.json and fig5_*.png")
    p.add_argument("--out", default=None, metavar="report.md", help="where to write the report "
                                                                   "(default: report.md in --build)")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="also rewrite this README's results section (between the results markers) and copy the "
                        "figures to docs/figures beside it; `bash run.sh` never does")
    p.add_argument("--seconds", type=non_negative_float, default=None,
                   help="wall time of the run, to state in the report (kept in <build>/run_times.json)")
    p.add_argument("--build-seconds", type=non_negative_float, default=None,
                   help="the part of it spent in `asif data build`")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="asif",
        description="ASIF: an image-text model from two frozen unimodal encoders and coupled anchor pairs, without training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_core_commands(sub)
    _add_encoder_commands(sub)
    _add_data_commands(sub)
    _add_run_commands(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help shows the defaults (HelpFormatter), subcommands of subcommands too."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a mistake already reported in one line (2)
        return int(e.code or 0)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        return int(args.func(args) or 0)
    except (ASIFInputError, UsageError, OSError) as e:
        # OSError: what the file system refused (a missing file, no permission ...), never a traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"asif {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asif {command}: interrupted; finished work is kept, run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
