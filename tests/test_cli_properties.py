"""Property-based: generated arrays, files and options for `asif sweep` and `asif similarity`.

For every generated case the command either exits 0 with the answer of the
float64 reference (asif/reference.py), or exits 2 with exactly one line on
stderr and no traceback, and leaves nothing at --out. Which of the two is
decided here, from the inputs, before the command runs: valid input must
succeed and invalid input must fail. Examples are few and derandomised so
CI stays fast and reproducible; ASIF_HYPOTHESIS_EXAMPLES=500 explores more.
"""
import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asif import cli
from asif import reference as ref

EXAMPLES = int(os.environ.get("ASIF_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# what can be wrong with one embedding input; the first two are valid encodings of valid data
ARRAY_FAULTS = ["big-endian", "float16", "nan", "inf", "zero-row", "wrong-dim", "one-d", "three-d", "no-rows",
                "ints", "zero-bytes", "text", "npz", "missing", "folder"]
VALID_FAULTS = {"big-endian", "float16"}
LABEL_FAULTS = ["out-of-range", "strings", "fractions", "too-few", "nan"]


def write_array(path: Path, a: np.ndarray, fault: str | None) -> None:
    """``a`` as a .npy at ``path``, spoiled by ``fault``."""
    a = np.asarray(a)
    if fault == "big-endian":
        a = a.astype(a.dtype.newbyteorder(">"))
    elif fault == "float16":
        a = a.astype(np.float16)
    elif fault in ("nan", "inf", "zero-row"):
        a = a.copy()
        a[len(a) // 2] = {"nan": np.nan, "inf": -np.inf, "zero-row": 0.0}[fault]
    elif fault == "wrong-dim":
        a = np.hstack([a, a[:, :1]])
    elif fault == "one-d":
        a = a[0]
    elif fault == "three-d":
        a = a[None]
    elif fault == "no-rows":
        a = a[:0]
    elif fault == "ints":
        a = np.round(a * 10).astype(np.int32)
    if fault == "zero-bytes":
        path.write_bytes(b"")
    elif fault == "text":
        path.write_text("\n".join(" ".join(f"{v:.3f}" for v in row) for row in a))
    elif fault == "npz":
        with open(path, "wb") as f:
            np.savez(f, a=a)
    elif fault == "folder":
        path.mkdir()
    elif fault != "missing":
        np.save(path, a)


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def check_failure(code: int, err: str, out: Path) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("asif ") and ": error: " in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def as_read(arrays: dict, faults: dict) -> dict:
    """What the command reads from the files write_array wrote for a valid case, in float64."""
    out = {}
    for key, a in arrays.items():
        a = a.astype(np.float16) if faults[key] == "float16" else a
        out[key] = (np.hstack([a, a[:, :1]]) if faults[key] == "wrong-dim" else a).astype(np.float64)
    return out


def inputs_valid(faults: dict, harmless: set = frozenset()) -> bool:
    """No fault but valid encodings; a changed dim only where the two sides of a modality disagree."""
    def dim(key):
        return 1 if faults[key] == "wrong-dim" else 0
    return (all(f is None or f in VALID_FAULTS or f == "wrong-dim" or key in harmless for key, f in faults.items())
            and dim("anchor_images") == dim("images") and dim("anchor_texts") == dim("prompts"))


def number(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


@st.composite
def data_shapes(draw):
    return dict(seed=draw(st.integers(0, 2**31 - 1)), n=draw(st.integers(1, 40)), q=draw(st.integers(1, 12)),
                d1=draw(st.integers(1, 6)), d2=draw(st.integers(1, 6)))


def anchors_and_queries(shape, n_prompts):
    rng = np.random.default_rng(shape["seed"])
    # continuous random values: ties at the k-th similarity (where float rounding could choose) do not occur
    return {"anchor_images": rng.standard_normal((shape["n"], shape["d1"])).astype(np.float32),
            "anchor_texts": rng.standard_normal((shape["n"], shape["d2"])).astype(np.float32),
            "images": rng.standard_normal((shape["q"], shape["d1"])).astype(np.float32),
            "prompts": rng.standard_normal((n_prompts, shape["d2"])).astype(np.float32)}


options_k = st.one_of(st.integers(1, 60), st.integers(-3, 0))
options_p = st.one_of(st.floats(0.25, 12), st.sampled_from([0.0, -1.0, math.nan, math.inf]))
options_block = st.one_of(st.none(), st.integers(1, 50), st.integers(-3, 0))
options_dtype = st.sampled_from([None, "float64"])
fault_of = st.one_of(st.none(), st.none(), st.sampled_from(ARRAY_FAULTS))


@SETTINGS
@given(shape=data_shapes(), c=st.integers(1, 4), t=st.integers(1, 3), n_classes=st.one_of(st.none(), st.integers(-1, 7)),
       k=options_k, ps=st.lists(options_p, min_size=1, max_size=3), block=options_block, dtype=options_dtype,
       counts=st.one_of(st.none(), st.lists(st.integers(-1, 45), min_size=1, max_size=3)),
       reduce=st.sampled_from(["max", "mean"]), faults=st.fixed_dictionaries({
           "anchor_images": fault_of, "anchor_texts": fault_of, "images": fault_of, "prompts": fault_of}),
       label_fault=st.one_of(st.none(), st.none(), st.sampled_from(LABEL_FAULTS)))
def test_sweep_answers_right_or_says_why_in_one_line(shape, c, t, n_classes, k, ps, block, dtype, counts, reduce,
                                                     faults, label_fault):
    arrays = anchors_and_queries(shape, c * t)
    labels = np.random.default_rng(shape["seed"] + 1).integers(0, c, shape["q"])
    n_classes = c if n_classes is None else n_classes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        argv = ["sweep", "--quiet", "--n-classes", n_classes, "--non-zeros", k, "--reduce", reduce,
                "--exponents", *map(number, ps), "--out", tmp / "out" / "r.json"]
        for key, a in arrays.items():
            write_array(tmp / f"{key}.npy", a, faults[key])
            argv += [f"--{key.replace('_', '-')}", tmp / f"{key}.npy"]
        spoilt = {"out-of-range": labels + c, "strings": labels.astype(str), "fractions": labels + 0.5,
                  "too-few": labels[:-1], "nan": np.where(labels == labels[0], np.nan, labels)}
        np.save(tmp / "labels.npy", spoilt[label_fault] if label_fault else labels)
        argv += ["--labels", tmp / "labels.npy"]
        if counts is not None:
            argv += ["--anchor-counts", *counts]
        if block is not None:
            argv += ["--block-size", block]
        if dtype:
            argv += ["--dtype", dtype]
        (tmp / "out").mkdir()
        # a bad value in an anchor row past the largest count is never read: the answer cannot depend on it
        used = max(counts) if counts and all(1 <= n <= shape["n"] for n in counts) else shape["n"]
        harmless = {key for key in ("anchor_images", "anchor_texts")
                    if faults[key] in ("nan", "inf", "zero-row") and shape["n"] // 2 >= used}
        valid = (inputs_valid(faults, harmless) and label_fault is None
                 and k >= 1 and all(math.isfinite(p) and p > 0 for p in ps) and (block is None or block >= 1)
                 and (counts is None or all(1 <= n <= shape["n"] for n in counts))
                 and n_classes >= 1 and (c * t) % n_classes == 0 and labels.max() < n_classes)
        code, err = run(argv)
        out = tmp / "out" / "r.json"
        if not valid:
            check_failure(code, err, out)
            return
        assert code == 0, err
        rows = json.loads(out.read_text())["results"]
        want = [(n, float(p)) for n in sorted(set(counts or [shape["n"]])) for p in ps]
        assert [(r["n_anchors"], r["exponent"]) for r in rows] == want
        source = as_read(arrays, faults)  # a harmless fault sits in rows that no count reaches
        window = 1e-9 if dtype == "float64" else 1e-4
        for r in rows:
            n, p = r["n_anchors"], r["exponent"]
            scores = ref.class_scores(source["anchor_images"][:n], source["anchor_texts"][:n], source["images"],
                                      source["prompts"], n_classes, k, p, reduce)
            for metric, (lo, hi) in metric_bounds(scores, labels, window).items():
                assert lo - 1e-12 <= r["metrics"][metric] <= hi + 1e-12, (metric, r, lo, hi)


def metric_bounds(scores: np.ndarray, labels: np.ndarray, window: float) -> dict:
    """(lowest, highest) value of each metric that some order of near-tied class scores can give:
    scores within ``window`` of each other may be ranked either way by float rounding."""
    s_label = scores[np.arange(len(labels)), labels][:, None]
    above = (scores > s_label + window).sum(1)           # classes surely ranked above the label
    level = (scores >= s_label - window).sum(1)          # the label and those that may be ranked above it
    m = min(5, scores.shape[1])
    bounds = {"acc1": (level <= 1, above < 1), "acc5": (level <= m, above < m)}
    out = {name: (sure.mean(), maybe.mean()) for name, (sure, maybe) in bounds.items()}
    sure, maybe = bounds["acc1"]
    present = np.unique(labels)
    out["mean_per_class_recall"] = (np.mean([sure[labels == y].mean() for y in present]),
                                    np.mean([maybe[labels == y].mean() for y in present]))
    return out


@SETTINGS
@given(shape=data_shapes(), n_texts=st.integers(1, 9), k=options_k, p=options_p, block=options_block,
       dtype=options_dtype, faults=st.fixed_dictionaries({
           "anchor_images": fault_of, "anchor_texts": fault_of, "images": fault_of, "prompts": fault_of}))
def test_similarity_answers_right_or_says_why_in_one_line(shape, n_texts, k, p, block, dtype, faults):
    arrays = anchors_and_queries(shape, n_texts)
    names = {"anchor_images": "--anchor-images", "anchor_texts": "--anchor-texts", "images": "--images",
             "prompts": "--texts"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        argv = ["similarity", "--non-zeros", k, "--exponent", number(p), "--out", tmp / "out" / "S.npy"]
        for key, a in arrays.items():
            write_array(tmp / f"{key}.npy", a, faults[key])
            argv += [names[key], tmp / f"{key}.npy"]
        if block is not None:
            argv += ["--block-size", block]
        if dtype:
            argv += ["--dtype", dtype]
        (tmp / "out").mkdir()
        valid = (inputs_valid(faults) and k >= 1
                 and math.isfinite(p) and p > 0 and (block is None or block >= 1))
        code, err = run(argv)
        out = tmp / "out" / "S.npy"
        if not valid:
            check_failure(code, err, out)
            bad = [names[key] for key, f in faults.items() if f is not None and f not in VALID_FAULTS]
            if bad and k >= 1 and math.isfinite(p) and p > 0 and (block is None or block >= 1):
                assert any(f"{option} {tmp}" in err for option in bad), ("names a faulty input", bad, err)
            return
        assert code == 0, err
        source = as_read(arrays, faults)
        want = ref.similarity(source["images"], source["prompts"], source["anchor_images"], source["anchor_texts"], k, p)
        got = np.load(out)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-6 if dtype == "float64" else 2e-4)
