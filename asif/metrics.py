"""Metrics, named and shaped as LAION clip_benchmark reports them.

  classification   acc1, acc5, mean_per_class_recall from scores [Q, C] and labels [Q]
  per class        recall of each class, the confusion matrix, the majority-class rate
  retrieval        image_retrieval_recall@k and text_retrieval_recall@k from sim [n_images, n_texts]
  results JSON     ``dataset``, ``model``, ``task``, ``metrics`` (the headline: all anchors, the first
                   exponent) plus one entry per (anchor count, exponent)
"""
from __future__ import annotations

import platform
from typing import Sequence

import numpy as np
import torch

from asif.errors import ASIFInputError

__all__ = ["check_labels", "classification_metrics", "majority_class_rate", "confusion_matrix",
           "per_class_recall", "hub_share", "retrieval_metrics", "headline_row", "zero_shot_result",
           "results_table", "METRIC_KEYS"]

METRIC_KEYS = ("acc1", "acc5", "mean_per_class_recall")


def check_labels(labels, n_queries: int, n_classes: int) -> torch.Tensor:
    """labels as int64 [Q] class indices in 0..C-1, or ASIFInputError naming what is wrong."""
    a = np.array(labels)
    if a.dtype.kind not in "biuf":  # text, dates, objects: torch cannot hold them and they are not indices
        raise ASIFInputError(f"labels: dtype {a.dtype} is not a number; labels are integer class indices 0..C-1 "
                             "(map class names to their index first)")
    if a.ndim != 1 or a.shape[0] != n_queries:
        raise ASIFInputError(f"labels: expected shape [{n_queries}] (one class index per image), got {a.shape}")
    if a.dtype.kind == "f" and not (np.isfinite(a) & (a == np.round(a))).all():
        raise ASIFInputError("labels: must be integer class indices (found fractions, NaN or inf)")
    if n_queries and (a.min() < 0 or a.max() >= n_classes):  # checked before the cast: 1e30 must not wrap around
        raise ASIFInputError(f"labels: values must lie in 0..{n_classes - 1}, "
                             f"got {float(a.min()):g}..{float(a.max()):g}")
    return torch.as_tensor(a.astype(np.int64))  # native byte order too: torch reads no other


def classification_metrics(scores, labels) -> dict:
    """clip_benchmark's zero-shot metrics from scores [Q, C] and labels [Q].

    acc5 uses min(5, C) guesses; mean_per_class_recall averages top-1 recall
    over the classes present in ``labels``.
    """
    s = torch.as_tensor(scores)
    y = check_labels(labels, s.shape[0], s.shape[1]).to(s.device)
    top = s.topk(min(5, s.shape[1]), dim=1).indices
    hit1 = top[:, 0] == y
    hit5 = (top == y[:, None]).any(dim=1)
    n_per_class = torch.bincount(y, minlength=s.shape[1])
    present = n_per_class > 0
    recalls = torch.bincount(y, weights=hit1.double(), minlength=s.shape[1])[present] / n_per_class[present]
    return {"acc1": float(hit1.double().mean()), "acc5": float(hit5.double().mean()),
            "mean_per_class_recall": float(recalls.mean())}


def majority_class_rate(labels) -> float:
    """Accuracy of always answering the most frequent class of ``labels`` [Q]: the bar beside chance."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        raise ASIFInputError("labels: empty; the majority-class rate needs at least one label")
    return float(np.bincount(y).max() / y.size)


def confusion_matrix(scores, labels) -> np.ndarray:
    """int64 [C, C] from scores [Q, C] and labels [Q]: row = true class, column = top-1 prediction."""
    s = torch.as_tensor(scores)
    n_classes = s.shape[1]
    y = check_labels(labels, s.shape[0], n_classes).to(s.device)
    pred = s.argmax(dim=1)
    flat = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).cpu().numpy()


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    """Top-1 recall of each class [C] from a confusion matrix; NaN for a class with no test image."""
    confusion = np.asarray(confusion)
    n = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.diag(confusion) / np.maximum(n, 1), np.nan)


def source_share(indices, sources, n_sources: int, values=None, exponent: float = 1.0) -> np.ndarray:
    """Which source fills top-k lists: float64 [n_sources], summing to 1.

    ``indices``: [Q, k] anchor indices; ``sources``: int [N], the source of
    each anchor. Without ``values``: each source's share of all entries.
    With ``values`` ([Q, k] similarities): each row's weight
    max(v, 0) ** ``exponent`` is split by source and the rows are averaged,
    so the value says where a relative representation's weight comes from
    (a row with no positive value counts by entries).
    """
    idx = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices)
    src = np.asarray(sources)[idx]
    if idx.size == 0 or n_sources < 1:
        raise ValueError("source_share: needs entries and n_sources >= 1")
    if values is None:
        return np.bincount(src.ravel(), minlength=n_sources) / src.size
    v = np.asarray(values.cpu() if hasattr(values, "cpu") else values, dtype=np.float64)
    w = np.maximum(v, 0) ** exponent
    total = w.sum(1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1), 1 / idx.shape[1])
    share = np.zeros(n_sources)
    np.add.at(share, src.ravel(), w.ravel())
    return share / idx.shape[0]


def hub_share(indices, n_anchors: int, fraction: float = 0.01) -> float:
    """Hubness of top-k lists: the share of all their entries that fall on the ``fraction`` of the
    ``n_anchors`` anchors that appear in most lists. ``indices``: [Q, k] anchor indices.

    Without hubs each anchor would hold about the same share, so the value
    would be near ``fraction``; 1.0 means a few anchors fill every list.
    """
    idx = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices).ravel()
    if idx.size == 0 or n_anchors < 1 or not 0 < fraction <= 1:
        raise ValueError("hub_share: needs entries, n_anchors >= 1 and 0 < fraction <= 1")
    top = max(1, int(round(fraction * n_anchors)))
    counts = np.bincount(idx, minlength=n_anchors)
    return float(np.sort(counts)[::-1][:top].sum() / idx.size)


def retrieval_metrics(sim, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from sim [n_images, n_texts] and text_to_image [n_texts].

    Named as clip_benchmark does: image_retrieval_recall@k is text -> image
    (is the caption's image among the k best images), text_retrieval_recall@k
    is image -> text (is any of the image's captions among the k best texts).
    """
    s = torch.as_tensor(np.asarray(sim)).double()
    if s.ndim != 2:
        raise ASIFInputError(f"sim: expected [n_images, n_texts], got shape {tuple(s.shape)}")
    owner = torch.as_tensor(np.asarray(text_to_image)).long()
    n_img, n_txt = s.shape
    if owner.shape != (n_txt,):
        raise ASIFInputError(f"text_to_image: expected shape [{n_txt}] (the image index of each text), got {tuple(owner.shape)}")
    if n_txt and (int(owner.min()) < 0 or int(owner.max()) >= n_img):
        raise ASIFInputError(f"text_to_image: values must lie in 0..{n_img - 1}")
    out = {}
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[owner, torch.arange(n_txt)] = True
    for k in ks:
        if k < 1:
            raise ASIFInputError(f"ks: recall@{k} is undefined; use k >= 1")
        top_img = s.T.topk(min(k, n_img), dim=1).indices             # [n_txt, k]
        out[f"image_retrieval_recall@{k}"] = float((top_img == owner[:, None]).any(1).double().mean())
        top_txt = s.topk(min(k, n_txt), dim=1).indices                # [n_img, k]
        has_text = positive.any(1)
        hit = positive.gather(1, top_txt).any(1)
        out[f"text_retrieval_recall@{k}"] = float(hit[has_text].double().mean())
    return out


def headline_row(rows: Sequence[dict]) -> dict:
    """The row a result leads with: every anchor (the largest count) and the first exponent asked for
    (the paper's p = 8 in the defaults). Rows come as the sweep gives them: count ascending, then
    exponents in the order asked."""
    if not rows:
        raise ASIFInputError("no results: the sweep returned no rows")
    n_max = max(r["n_anchors"] for r in rows)
    return next(r for r in rows if r["n_anchors"] == n_max)


def zero_shot_result(rows: Sequence[dict], *, dataset: str, model: str, params: dict | None = None,
                     wall_time: float | None = None, headline: dict | None = None) -> dict:
    """The sweep's rows as clip_benchmark-style JSON.

    ``metrics`` holds the headline (``headline_row``: all anchors, the first
    exponent), which ``headline`` names (``n_anchors``, ``exponent``, plus
    what the ``headline`` argument adds, e.g. per-class recall); ``results``
    one entry per (anchor count, exponent); plus the parameters, library
    versions and wall time.
    """
    top = headline_row(rows)
    out = {
        "dataset": dataset, "model": model, "task": "zeroshot_classification",
        "metrics": {k: top[k] for k in METRIC_KEYS},
        "headline": {"n_anchors": top["n_anchors"], "exponent": top["exponent"], **(headline or {})},
        "results": [{"n_anchors": r["n_anchors"], "exponent": r["exponent"], "non_zeros": r["non_zeros"],
                     "reduce": r["reduce"], "metrics": {k: r[k] for k in METRIC_KEYS}} for r in rows],
        "params": dict(params or {}),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
    }
    if wall_time is not None:
        out["wall_time_s"] = round(float(wall_time), 3)
    return out


def results_table(rows: Sequence[dict], metric: str = "acc1") -> str:
    """Markdown table: one row per anchor count, one column per exponent."""
    ps = sorted({r["exponent"] for r in rows}, reverse=True)
    ns = sorted({r["n_anchors"] for r in rows})
    val = {(r["n_anchors"], r["exponent"]): r[metric] for r in rows}
    lines = ["| anchors | " + " | ".join(f"p = {p:g}" for p in ps) + " |", "|---:|" + "---:|" * len(ps)]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(f"{100 * val[(n, p)]:.1f}%" for p in ps) + " |")
    return "\n".join(lines)
