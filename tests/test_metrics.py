"""Metrics by hand and by brute force, and the clip_benchmark JSON."""
import numpy as np
import pytest

from asif import metrics
from asif.errors import ASIFInputError


def test_classification_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    m = metrics.classification_metrics(scores, [0, 1, 1, 2])
    assert m["acc1"] == 0.5
    assert m["acc5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)


@pytest.mark.parametrize("labels,match", [
    ([0, 1], "shape"), ([0, 1, 1, 3], "values"), ([0.5, 1, 1, 2], "integer"), ([0, 1, np.nan, 2], "integer"),
    ([0, 1, np.inf, 2], "integer"), (["a", "b", "c", "a"], "dtype <U1 is not a number"),
    ([b"a", b"b", b"c", b"a"], "dtype |S1 is not a number"), ([0, 1, 1e30, 2], "got 0..1e"),
    (np.array(["2020-01-01"] * 4, dtype="datetime64[D]"), "is not a number"), ([[0], [1], [1], [2]], "shape"),
    ([-1, 1, 1, 2], "values must lie in 0..2, got -1..2"),
])
def test_bad_labels_are_named(labels, match):
    with pytest.raises(ASIFInputError, match=match):
        metrics.classification_metrics(np.zeros((4, 3)), labels)


def test_labels_in_any_byte_order_or_integer_type():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    want = metrics.classification_metrics(scores, [0, 1, 1, 2])
    for labels in (np.array([0, 1, 1, 2], dtype=">i8"), np.array([0, 1, 1, 2], dtype=np.uint8),
                   np.array([0.0, 1.0, 1.0, 2.0], dtype=">f4"), np.array([False, True, True, True])[[0, 1, 2, 1]]):
        got = metrics.classification_metrics(scores, labels)
        assert got == want or labels.dtype == bool


def test_confusion_recall_and_majority_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.0, 0.9, 0.1]])
    labels = [0, 1, 1, 2, 1]
    c = metrics.confusion_matrix(scores, labels)
    assert c.tolist() == [[1, 0, 0], [0, 2, 1], [1, 0, 0]]
    np.testing.assert_allclose(metrics.per_class_recall(c), [1.0, 2 / 3, 0.0])
    assert c.sum() == 5 and np.trace(c) / 5 == metrics.classification_metrics(scores, labels)["acc1"]
    assert metrics.per_class_recall(np.array([[2, 0], [0, 0]])).tolist()[0] == 1.0
    assert np.isnan(metrics.per_class_recall(np.array([[2, 0], [0, 0]]))[1])  # no image of class 1
    assert metrics.majority_class_rate(labels) == 3 / 5
    with pytest.raises(ASIFInputError, match="empty"):
        metrics.majority_class_rate([])


def test_retrieval_metrics_by_brute_force():
    rng = np.random.default_rng(0)
    sim = rng.random((6, 12))
    owner = np.repeat(np.arange(6), 2)
    m = metrics.retrieval_metrics(sim, owner, ks=(1, 3))
    for k in (1, 3):
        i2t = np.mean([bool(set(np.argsort(-sim[i])[:k]) & set(np.flatnonzero(owner == i))) for i in range(6)])
        t2i = np.mean([owner[j] in np.argsort(-sim[:, j])[:k] for j in range(12)])
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
    perfect = metrics.retrieval_metrics(np.eye(4), np.arange(4), ks=(1,))
    assert perfect["image_retrieval_recall@1"] == perfect["text_retrieval_recall@1"] == 1.0


def test_zero_shot_result_and_table():
    rows = [{"n_anchors": n, "exponent": p, "non_zeros": 5, "reduce": "max", "acc1": a, "acc5": 1.0,
             "mean_per_class_recall": a}
            for n, p, a in [(10, 8.0, 0.5), (10, 1.0, 0.25), (20, 8.0, 0.75), (20, 1.0, 0.125)]]
    res = metrics.zero_shot_result(rows, dataset="d", model="m", params={"x": 1}, wall_time=1.23456,
                                   headline={"extra": 2})
    # the headline: all anchors (20) and the first exponent (8), not the last row
    assert res["task"] == "zeroshot_classification" and res["metrics"]["acc1"] == 0.75
    assert res["headline"] == {"n_anchors": 20, "exponent": 8.0, "extra": 2}
    assert [(r["n_anchors"], r["exponent"], r["metrics"]["acc1"]) for r in res["results"]] == \
        [(r["n_anchors"], r["exponent"], r["acc1"]) for r in rows]
    assert res["wall_time_s"] == 1.235 and res["params"] == {"x": 1}
    assert metrics.results_table(rows).splitlines() == [
        "| anchors | p = 8 | p = 1 |", "|---:|---:|---:|", "| 10 | 50.0% | 25.0% |", "| 20 | 75.0% | 12.5% |"]


def test_hub_share_counts_the_most_listed_anchors():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 1000, size=(50, 20))
    by_hand = sorted(np.bincount(idx.ravel(), minlength=1000).tolist(), reverse=True)[:10]
    assert metrics.hub_share(idx, 1000, 0.01) == sum(by_hand) / idx.size
    hubs = np.tile(np.arange(10), (50, 2))  # 10 anchors fill every list
    assert metrics.hub_share(hubs, 1000, 0.01) == 1.0
    assert metrics.hub_share(np.arange(1000).reshape(50, 20), 1000, 0.01) == pytest.approx(0.01)


def test_source_share_by_entries_and_by_weight():
    sources = np.array([0, 0, 1, 2, 2, 2])
    idx = np.array([[0, 2, 3], [1, 4, 5]])
    np.testing.assert_allclose(metrics.source_share(idx, sources, 3), [2 / 6, 1 / 6, 3 / 6])
    vals = np.array([[0.5, 0.5, -0.2], [0.0, 0.0, 0.0]])  # row 2: no positive value, counted by entries
    by_weight = metrics.source_share(idx, sources, 3, vals, exponent=2.0)
    np.testing.assert_allclose(by_weight, [(0.5 + 1 / 3) / 2, 0.5 / 2, (2 / 3) / 2])
    assert by_weight.sum() == pytest.approx(1.0) and by_weight.shape == (3,)
    # a larger exponent moves the weight to the largest value
    sharp = metrics.source_share(np.array([[0, 2]]), sources, 3, np.array([[0.9, 0.6]]), exponent=8.0)
    assert sharp[0] == pytest.approx(0.9 ** 8 / (0.9 ** 8 + 0.6 ** 8)) and sharp[0] > 0.9
    with pytest.raises(ValueError):
        metrics.source_share(np.zeros((0, 3), int), sources, 3)
