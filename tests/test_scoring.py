"""The scoring engine: every way of computing <r(x), r(t)> gives the reference's numbers."""
import numpy as np
import pytest
import torch

import asif_core as ac
from asif import reference, scoring


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def test_numba_kernel_is_there():
    # the fast sparse product is part of the install; without it scipy takes over silently
    assert scoring.sparse_kernels_available()


def test_sparse_kernel_pointers_stay_bounded():
    # tiles grow with the problem so that the (tile, anchor) pointers fit SPARSE_MAX_POINTERS
    def entries(rows, n):
        e = torch.zeros(1, dtype=torch.long)
        return scoring.Entries(e, e, torch.ones(1), (rows, n))
    for qa, qb, n in ((2000, 1800, 200000), (50000, 80000, 1600000), (7, 3, 10)):
        ta, tb = scoring.sparse_tiles(entries(qa, n), entries(qb, n))
        for q, t in ((qa, ta), (qb, tb)):
            assert 1 <= t <= q and -(-q // t) * n <= max(scoring.SPARSE_MAX_POINTERS, n)


@pytest.mark.parametrize("way,chunk,backend,tiles", [
    ("sparse", None, None, None), ("sparse", None, None, (4, 3)), ("sparse", None, "scipy", None),
    ("mixed", None, None, (2, 5)), ("dense", None, None, None), ("dense", 4, None, None), (None, None, None, None)])
def test_similarity_dense_and_sparse_paths_agree(monkeypatch, way, chunk, backend, tiles):
    q, t, ai, at = rand((15, 6), 10), rand((11, 5), 11), rand((300, 6), 12), rand((300, 5), 13)
    model = ac.ASIF(ai, at, non_zeros=9, exponent=3, dtype="float64")
    ref = reference.similarity(q, t, ai, at, 9, 3)
    monkeypatch.setattr(scoring, "SPARSE_OP_COST", 3.0)  # so that "mixed" has hubs and a sparse rest
    # backend None: the numba kernel; tiles: several output tiles, the last ones partial
    with scoring.forced(way=way, dense_rows=chunk, backend=backend, tiles=tiles):
        s = model.similarity(q, t)
    np.testing.assert_allclose(s, ref, atol=1e-12)
    assert (s >= -1e-15).all() and (s <= 1 + 1e-12).all()


def test_class_means_are_the_normalised_template_means():
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(np.stack([rng.permutation(20)[:6] for _ in range(12)]))  # 4 classes x 3 templates
    val = torch.from_numpy(rng.random((12, 6)))
    dense = np.zeros((12, 20))
    np.put_along_axis(dense, idx.numpy(), val.numpy(), axis=1)
    want = dense.reshape(4, 3, 20).mean(1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    m = scoring.class_means(scoring.entries_from_topk(idx, val, 20), 4)
    got = np.zeros((4, 20))
    got[m.rows.numpy(), m.cols.numpy()] = m.vals.numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_forced_restores_and_refuses_unknown_choices():
    with scoring.forced(way="dense"):
        assert scoring.FORCED.way == "dense"
    assert scoring.FORCED.way is None
    with pytest.raises(TypeError, match="unknown choice"):
        with scoring.forced(speed="fast"):
            pass
