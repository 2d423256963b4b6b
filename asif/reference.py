"""The method in plain float64 numpy, as the paper states it: the reference that tests and benchmarks check against.

Dense and slow on purpose (a Q x N matrix): for tiny data only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["relative_representation", "similarity", "class_scores"]


def relative_representation(queries: np.ndarray, anchors: np.ndarray, k: int, p: float) -> np.ndarray:
    """Dense r(x) [Q, N]: cosine to every anchor, negatives 0, the k largest kept (ties to the lower
    anchor index), raised to the power p, L2-normalised."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    s = np.maximum(q.astype(np.float64) @ a.astype(np.float64).T, 0)
    out = np.zeros_like(s)
    for i, row in enumerate(s):
        keep = np.argsort(-row, kind="stable")[:min(k, len(row))]
        out[i, keep] = row[keep] ** p
        norm = np.linalg.norm(out[i])
        if norm > 0:
            out[i] /= norm
    return out


def similarity(images, texts, anchor_images, anchor_texts, k: int, p: float) -> np.ndarray:
    """sim(x, t) = <r(x), r(t)>: [Q_img, Q_txt]."""
    return relative_representation(images, anchor_images, k, p) @ relative_representation(texts, anchor_texts, k, p).T


def class_scores(anchor_images, anchor_texts, images, prompts, n_classes: int, k: int, p: float,
                 reduce: str = "max") -> np.ndarray:
    """[Q, C]: a class scores its best template (``max``) or its templates' normalised mean r(t) (``mean``);
    prompts are class-major, T = P / C per class."""
    rx, rt = relative_representation(images, anchor_images, k, p), relative_representation(prompts, anchor_texts, k, p)
    t = len(prompts) // n_classes
    if reduce == "max":
        return (rx @ rt.T).reshape(len(images), n_classes, t).max(axis=2)
    mean = rt.reshape(n_classes, t, -1).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    # a class whose prompts keep no anchor has a zero mean: it scores 0, as a zero r(x) does
    mean = np.divide(mean, norm, out=np.zeros_like(mean), where=norm > 0)
    return rx @ mean.T
