"""`asif eval` and `asif report` end to end on small real data, and the shared notebook helpers."""
import json

import numpy as np
import pytest

import asif_cli
import asif_core as ac
import asif_data
import asif_ui

needs_data = pytest.mark.skipif(not asif_data.FASHION_MNIST_DIR.exists() or not asif_data.OPENCLIPART_DIR.exists(),
                                reason="Debian packages dataset-fashion-mnist and openclipart-svg are not installed")


@needs_data
def test_eval_then_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    build = tmp_path / "build"
    out, fig = build / "zero_shot_fm_clipart.json", build / "fig5_fm_clipart.png"
    argv = ["eval", "--dataset", "fashion-mnist", "--anchors", "clipart", "--limit", "60", "--anchor-limit", "90",
            "--exponents", "8", "3", "--n-anchors", "30", "90", "--non-zeros", "50", "--quiet",
            "--out", str(out), "--plot", str(fig)]
    assert asif_cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert [(r["n_anchors"], r["exponent"]) for r in res["results"]] == [(30, 8.0), (30, 3.0), (90, 8.0), (90, 3.0)]
    assert res["params"]["n_test"] == 60 and res["params"]["chance"] == pytest.approx(0.1)
    assert fig.stat().st_size > 1000
    # the numbers are the core's on the same cached embeddings
    ev = asif_data.load_eval_embeddings("fashion-mnist", limit=60, progress=False)
    an = asif_data.load_anchor_embeddings("clipart", limit=90, progress=False)
    rows = ac.sweep(an.A_img, an.A_txt, ev.images, ev.labels, ev.prompts, 10, n_anchors=[30, 90],
                    exponents=[8, 3], non_zeros=50)
    assert [r["metrics"]["acc1"] for r in res["results"]] == [r["acc1"] for r in rows]

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n")
    assert asif_cli.main(["report", "--build", str(build), "--readme", str(readme), "--seconds", "90"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert f"| 90 | {100 * rows[2]['acc1']:.1f}% | {100 * rows[3]['acc1']:.1f}% |" in text
    assert (tmp_path / "docs" / "figures" / fig.name).exists() and f"docs/figures/{fig.name}" in text


@needs_data
def test_eval_asks_for_more_anchors_than_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--anchors", "clipart", "--limit", "20", "--anchor-limit", "10", "--n-anchors", "50", "--quiet"]
    assert asif_cli.main(argv) == 2
    assert "has 10 pairs" in capsys.readouterr().err


def test_report_without_results_and_unknown_notebook(tmp_path, capsys):
    assert asif_cli.main(["report", "--build", str(tmp_path), "--readme", str(tmp_path / "R.md")]) == 2
    assert asif_cli.main(["notebooks", "99_nothing", "--out", str(tmp_path / "nb")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "no zero_shot_*.json" in err[0] and "no notebook" in err[1]


def test_anchor_counts_and_results_table():
    assert asif_ui.anchor_counts(1000) == [64, 128, 256, 512, 1000]
    assert asif_ui.anchor_counts(50) == [50]
    with pytest.raises(ac.ASIFInputError):
        asif_ui.anchor_counts(0)
    rows = [{"n_anchors": n, "exponent": p, "acc1": a} for n, p, a in [(10, 8.0, 0.5), (10, 1.0, 0.25), (20, 8.0, 0.75), (20, 1.0, 0.125)]]
    assert asif_ui.results_table(rows).splitlines() == [
        "| anchors | p = 8 | p = 1 |", "|---:|---:|---:|", "| 10 | 50.0% | 25.0% |", "| 20 | 75.0% | 12.5% |"]


class _Fake:
    """A deterministic stand-in encoder: each distinct string is its own direction."""
    def __init__(self, vocabulary):
        self.vocabulary, self.dim = list(vocabulary), len(vocabulary)

    def encode(self, items, progress=False):
        out = np.full((len(items), self.dim), 0.01, dtype=np.float32)
        for i, it in enumerate(items):
            out[i, self.vocabulary.index(it.replace("a photo of a ", "").rstrip("."))] = 1
        return out


def test_universal_classifier_ranks_and_refuses_empty_labels():
    labels = ["cat", "dog", "car"]
    enc = _Fake(labels + [f"img-{l}" for l in labels])
    # coupled anchors: a picture of each thing with its name as caption
    pairs = [labels[i % 3] for i in range(30)]
    model = ac.ASIF(enc.encode([f"img-{l}" for l in pairs]), enc.encode(pairs), non_zeros=10, exponent=3)
    for truth in labels:
        ranked = asif_ui.universal_classifier(model, enc, enc, f"img-{truth}", labels)
        assert ranked[0][0] == truth and sorted(l for l, _ in ranked) == sorted(labels)
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    with pytest.raises(ac.ASIFInputError, match="empty class list"):
        asif_ui.universal_classifier(model, enc, enc, "img", [" ", ""])
    with pytest.raises(ac.ASIFInputError, match="placeholder"):
        asif_ui.universal_classifier(model, enc, enc, "img", labels, templates=["no placeholder"])
