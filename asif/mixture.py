"""Anchors from several sources as one model: how their votes are mixed.

A source is one kind of coupled data (icons, clip-art, photo stamps ...).
Sources differ in style on each side: short icon names sit closer to a
prompt like "a photo of a shoe." than the long clip-art captions do, while a
photo sits closer to photo stamps than to line icons. Put into one top-k,
such a mix lets one source fill the text side and another the image side,
and the two relative representations of a matching pair then barely
overlap. The rules here (``RULES``):

  union   all anchors in one model: the paper's method as it stands
  mean    each source its own model (its own top-k, exponent and
          normalisation); sim(x, t) is the mean over sources of their
          similarities (sources with no anchor among the first n sit out)
  gated   as ``mean``, each source weighted per image by how close the image
          is to that source: the mean of its k largest cosine similarities
          to the source's anchor images, raised to the exponent p and
          normalised over sources

With one source all three are the paper's method. Which one the project
uses by default was chosen on validation data, by a rule written before any
test accuracy was seen (benchmarks/anchor_mix.py and benchmarks/README.md).

Shapes: ``N`` anchors, ``Q`` images, ``P`` prompts (C classes x T templates).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import asif_core
from asif.errors import ASIFInputError
from asif.metrics import classification_metrics

__all__ = ["RULES", "source_counts", "mixture_scores", "mixture_sweep", "rows_from_scores"]

RULES = ("union", "mean", "gated")


def source_counts(sources: np.ndarray, anchor_counts: Sequence[int]) -> dict[int, list[int]]:
    """{source: [its anchors among the first n of the order, for each n]}; ``sources``: int [N]."""
    return {int(s): [int((sources[:n] == s).sum()) for n in anchor_counts] for s in np.unique(sources)}


def _check(rule: str, sources: np.ndarray, n_anchors: int) -> None:
    if rule not in RULES:
        raise ASIFInputError(f"rule={rule!r}: use one of {', '.join(RULES)}")
    if sources.shape != (n_anchors,):
        raise ASIFInputError(f"sources: expected one source index per anchor, shape [{n_anchors}], got {sources.shape}")


def mixture_scores(anchor_images, anchor_texts, sources, images, prompts, n_classes: int, *,
                   anchor_counts: Sequence[int] | None = None, exponents: Sequence[float] = (8.0,),
                   non_zeros: int = 800, reduce: str = "max", rule: str = "mean", **compute) -> dict:
    """Class scores {(n, p): [Q, C]} of a mixture of sources, for every anchor count n and exponent p.

    anchor_images [N, d1], anchor_texts [N, d2] in the anchors' order;
    sources int [N], the source of each anchor; images [Q, d1]; prompts
    [C*T, d2] class-major. Each source's anchors are streamed once.
    """
    sources = np.asarray(sources)
    n = int(np.shape(anchor_images)[0])
    _check(rule, sources, n)
    counts = sorted(set(anchor_counts or [n]))
    ps = [float(p) for p in exponents]
    if rule == "union":
        rows = asif_core.sweep(anchor_images, anchor_texts, images, None, prompts, n_classes, anchor_counts=counts,
                               exponents=ps, non_zeros=non_zeros, reduce=reduce, return_scores=True, **compute)
        return {(r["n_anchors"], r["exponent"]): r["scores"] for r in rows}
    t = len(prompts) // n_classes
    total = {(c, p): 0.0 for c in counts for p in ps}
    weight = {(c, p): 0.0 for c in counts for p in ps}
    for s, per_count in source_counts(sources, counts).items():
        where = np.flatnonzero(sources == s)  # this source's anchors, in the global order
        sub_counts = sorted({m for m in per_count if m > 0})
        if not sub_counts:
            continue
        ai, at = np.asarray(anchor_images[where]), np.asarray(anchor_texts[where])
        # reduce="max" needs each prompt's similarity: one "class" per prompt, then the max over templates
        as_classes = len(prompts) if reduce == "max" else n_classes
        rows = asif_core.sweep(ai, at, images, None, prompts, as_classes, anchor_counts=sub_counts, exponents=ps,
                               non_zeros=non_zeros, reduce="max" if reduce == "max" else "mean",
                               return_scores=True, **compute)
        by = {(r["n_anchors"], r["exponent"]): r["scores"] for r in rows}
        gate = None
        if rule == "gated":
            # the gate compares images with images: of a centre given per side, the image side's
            centre = compute.get("centre", False)
            image_side = dict(compute, centre=centre[0] if isinstance(centre, (tuple, list)) else centre)
            tops = asif_core.top_k_similarities(images, ai, non_zeros, anchor_counts=sub_counts, **image_side)
            gate = {m: top.values.double().mean(1).cpu().numpy() for m, top in zip(sub_counts, tops)}
        for c, m in zip(counts, per_count):
            if m == 0:
                continue
            for p in ps:
                w = np.ones(len(images)) if gate is None else np.maximum(gate[m], 0) ** p  # [Q]
                total[(c, p)] = total[(c, p)] + w[:, None] * by[(m, p)]
                weight[(c, p)] = weight[(c, p)] + w
    out = {}
    for key, s in total.items():
        s = s / np.maximum(weight[key], 1e-30)[:, None]
        out[key] = s.reshape(len(images), n_classes, t).max(axis=2) if reduce == "max" else s
    return out


def mixture_sweep(anchor_images, anchor_texts, sources, images, labels, prompts, n_classes: int, *,
                  anchor_counts: Sequence[int] | None = None, exponents: Sequence[float] = (8.0,),
                  non_zeros: int = 800, reduce: str = "max", rule: str = "mean", **compute) -> list[dict]:
    """The accuracy-vs-anchors rows of ``asif_core.sweep`` for a mixture of sources (see ``RULES``)."""
    scores = mixture_scores(anchor_images, anchor_texts, sources, images, prompts, n_classes,
                            anchor_counts=anchor_counts, exponents=exponents, non_zeros=non_zeros,
                            reduce=reduce, rule=rule, **compute)
    return rows_from_scores(scores, labels, exponents, non_zeros, reduce, rule)


def rows_from_scores(scores: dict, labels, exponents: Sequence[float], non_zeros: int, reduce: str,
                     rule: str) -> list[dict]:
    """One row of metrics per (n, p) of ``mixture_scores``, n ascending, p in the order given."""
    rows = []
    for n in sorted({n for n, _ in scores}):
        for p in [float(p) for p in exponents]:
            rows.append({"n_anchors": n, "exponent": p, "non_zeros": non_zeros, "reduce": reduce, "rule": rule,
                         **classification_metrics(scores[(n, p)], labels)})
    return rows
