"""The method in plain float64 numpy, as the paper states it: the reference that tests and benchmarks check against.

Dense and slow on purpose (a Q x N matrix): for tiny data only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["relative_representation", "similarity", "class_scores", "centre_of"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def centre_of(anchors: np.ndarray) -> np.ndarray:
    """[d]: the mean of the unit anchor rows."""
    return _unit(anchors).mean(axis=0)


def relative_representation(queries: np.ndarray, anchors: np.ndarray, k: int, p: float,
                            centre: np.ndarray | None = None) -> np.ndarray:
    """Dense r(x) [Q, N]: cosine to every anchor, negatives 0, the k largest kept (ties to the lower
    anchor index), raised to the power p, L2-normalised. ``centre`` [d]: subtracted from the unit
    queries and anchors, which are normalised again, before the cosines."""
    q, a = _unit(queries), _unit(anchors)
    if centre is not None:
        q, a = _unit(q - centre), _unit(a - centre)
    s = np.maximum(q @ a.T, 0)
    out = np.zeros_like(s)
    for i, row in enumerate(s):
        keep = np.argsort(-row, kind="stable")[:min(k, len(row))]
        out[i, keep] = row[keep] ** p
        norm = np.linalg.norm(out[i])
        if norm > 0:
            out[i] /= norm
    return out


def _reps(images, texts, anchor_images, anchor_texts, k, p, centre):
    ci, ct = (centre_of(anchor_images), centre_of(anchor_texts)) if centre else (None, None)
    return (relative_representation(images, anchor_images, k, p, ci),
            relative_representation(texts, anchor_texts, k, p, ct))


def similarity(images, texts, anchor_images, anchor_texts, k: int, p: float, centre: bool = False) -> np.ndarray:
    """sim(x, t) = <r(x), r(t)>: [Q_img, Q_txt]; ``centre``: each modality centred on its anchors' mean."""
    rx, rt = _reps(images, texts, anchor_images, anchor_texts, k, p, centre)
    return rx @ rt.T


def class_scores(anchor_images, anchor_texts, images, prompts, n_classes: int, k: int, p: float,
                 reduce: str = "max", centre: bool = False) -> np.ndarray:
    """[Q, C]: a class scores its best template (``max``) or its templates' normalised mean r(t) (``mean``);
    prompts are class-major, T = P / C per class."""
    rx, rt = _reps(images, prompts, anchor_images, anchor_texts, k, p, centre)
    t = len(prompts) // n_classes
    if reduce == "max":
        return (rx @ rt.T).reshape(len(images), n_classes, t).max(axis=2)
    mean = rt.reshape(n_classes, t, -1).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    # a class whose prompts keep no anchor has a zero mean: it scores 0, as a zero r(x) does
    mean = np.divide(mean, norm, out=np.zeros_like(mean), where=norm > 0)
    return rx @ mean.T
