"""Mixing anchor sources: every rule is the paper's method for one source; mean and gated by brute force."""
import numpy as np
import pytest

from asif import mixture, reference
from asif.errors import ASIFInputError


@pytest.mark.parametrize("rule", mixture.RULES)
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_one_source_is_the_paper_method(tiny, rule, reduce):
    d = tiny
    sources = np.zeros(97, dtype=int)
    got = mixture.mixture_scores(d["anchor_images"], d["anchor_texts"], sources, d["images"], d["prompts"], 4,
                                 anchor_counts=[40, 97], exponents=[8, 2], non_zeros=15, reduce=reduce, rule=rule,
                                 dtype="float64")
    for (n, p), s in got.items():
        want = reference.class_scores(d["anchor_images"][:n], d["anchor_texts"][:n], d["images"], d["prompts"], 4,
                                      15, p, reduce)
        np.testing.assert_allclose(s, want, atol=1e-12)


def test_mean_and_gated_by_brute_force(tiny):
    d = tiny
    sources = np.random.default_rng(0).integers(0, 3, 97)
    k, p, t = 10, 3.0, 3
    for rule in ("mean", "gated"):
        got = mixture.mixture_scores(d["anchor_images"], d["anchor_texts"], sources, d["images"], d["prompts"], 4,
                                     anchor_counts=[60, 97], exponents=[p], non_zeros=k, rule=rule, dtype="float64")
        for n in (60, 97):
            total, weight = 0, 0
            for s in range(3):
                idx = [i for i in range(n) if sources[i] == s]
                ai, at = d["anchor_images"][idx], d["anchor_texts"][idx]
                sim = reference.similarity(d["images"], d["prompts"], ai, at, k, p)
                if rule == "gated":
                    x = d["images"] / np.linalg.norm(d["images"], axis=1, keepdims=True)
                    a = ai / np.linalg.norm(ai, axis=1, keepdims=True)
                    cos = np.maximum(x @ a.T, 0)
                    w = np.sort(cos, axis=1)[:, ::-1][:, :min(k, len(idx))].mean(1) ** p
                else:
                    w = np.ones(len(d["images"]))
                total, weight = total + w[:, None] * sim, weight + w
            want = (total / weight[:, None]).reshape(23, 4, t).max(2)
            np.testing.assert_allclose(got[(n, p)], want, atol=1e-12)


def test_a_source_repeated_changes_nothing_under_mean(tiny):
    d = tiny
    ai, at = d["anchor_images"], d["anchor_texts"]
    one = mixture.mixture_scores(ai, at, np.zeros(97, int), d["images"], d["prompts"], 4, non_zeros=12,
                                 rule="mean", dtype="float64")
    # the same anchors as two interleaved sources, each seeing every anchor once
    twice = mixture.mixture_scores(np.repeat(ai, 2, 0), np.repeat(at, 2, 0), np.tile([0, 1], 97), d["images"],
                                   d["prompts"], 4, non_zeros=12, rule="mean", dtype="float64")
    np.testing.assert_allclose(twice[(194, 8.0)], one[(97, 8.0)], atol=1e-12)


def test_sweep_rows_and_bad_input(tiny):
    d = tiny
    sources = np.arange(97) % 2
    rows = mixture.mixture_sweep(d["anchor_images"], d["anchor_texts"], sources, d["images"], d["labels"],
                                 d["prompts"], 4, anchor_counts=[30, 97], exponents=[8, 1], non_zeros=10)
    assert [(r["n_anchors"], r["exponent"]) for r in rows] == [(30, 8.0), (30, 1.0), (97, 8.0), (97, 1.0)]
    assert all(0 <= r["acc1"] <= 1 and r["rule"] == "mean" for r in rows)
    with pytest.raises(ASIFInputError, match="rule"):
        mixture.mixture_scores(d["anchor_images"], d["anchor_texts"], sources, d["images"], d["prompts"], 4,
                               rule="vote")
    with pytest.raises(ASIFInputError, match="one source index per anchor"):
        mixture.mixture_scores(d["anchor_images"], d["anchor_texts"], sources[:5], d["images"], d["prompts"], 4)


@pytest.mark.parametrize("rule", ["mean", "gated"])
def test_centre_given_per_side_reaches_every_source(tiny, rule):
    d = tiny
    sources = np.arange(97) % 2
    args = (d["anchor_images"], d["anchor_texts"], sources, d["images"], d["prompts"], 4)
    both = mixture.mixture_scores(*args, non_zeros=10, rule=rule, centre=True, device="cpu", dtype="float64")
    sides = mixture.mixture_scores(*args, non_zeros=10, rule=rule, centre=(True, True), device="cpu", dtype="float64")
    plain = mixture.mixture_scores(*args, non_zeros=10, rule=rule, device="cpu", dtype="float64")
    key = next(iter(both))
    np.testing.assert_allclose(sides[key], both[key], atol=1e-12)
    assert np.abs(both[key] - plain[key]).max() > 1e-6  # centring changed something
