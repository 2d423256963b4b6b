"""asif.precision and the core's bfloat16 first pass: exact top-k against a float64 brute force."""
import numpy as np
import pytest
import torch

import asif_core as ac
from asif import precision
from asif.errors import ASIFInputError
from asif.synthetic import structured_coupled_data


def normalised(x):
    """The float32 unit rows the core computes on (the same normalisation code)."""
    return ac._normalized_block(x, ac.Compute.of("cpu"), "x", 0)


def reference_top_k(queries, anchors, k):
    """Brute force: float64 dot products of the float32 unit rows, rounded once to float32, negatives as 0,
    the k largest with ties to the lower anchor index. Returns (indices, values) [Q, k]."""
    v = (normalised(queries).double() @ normalised(anchors).double().T).float().clamp(min=0).numpy()
    idx = np.argsort(-v, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(v, idx, 1)


def assert_same_top_k(top, ref_idx, ref_val):
    got_i, got_v = top.indices.numpy(), top.values.numpy()
    for r in range(len(ref_idx)):
        # entries of value 0 are interchangeable (they add nothing to r(x)): compare the positive ones
        want = {(int(i), float(v)) for i, v in zip(ref_idx[r], ref_val[r]) if v > 0}
        got = {(int(i), float(v)) for i, v in zip(got_i[r], got_v[r]) if v > 0}
        assert got == want, f"row {r}: {len(got ^ want)} entries differ"


def near_tie_data(seed=0, n=3000, d=48):
    """Anchors that crowd each query's k-th value: exact duplicates (ties) and copies moved by ~1 ulp."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((40, d)).astype(np.float32)
    anchors = np.repeat(base, n // 40, axis=0)
    jitter = rng.integers(-2, 3, anchors.shape).astype(np.float32)
    anchors = np.nextafter(anchors, anchors + jitter)  # some rows untouched (ties), most a few ulps apart
    anchors[::7] = anchors[::7][:, ::-1]  # and some rows far from the crowd
    rng.shuffle(anchors)
    queries = base[:12] + 0.05 * rng.standard_normal((12, d)).astype(np.float32)
    return queries, anchors


@pytest.mark.parametrize("block_size", [None, 257, 1000])
def test_bf16_first_pass_equals_float64_reference(block_size):
    d = structured_coupled_data(n_anchors=6000, n_images=60, n_classes=6, n_templates=2, image_dim=96,
                                text_dim=40, n_clusters=120)
    for q, a in ((d["images"], d["anchor_images"]), (d["prompts"], d["anchor_texts"])):
        top, = ac.top_k_similarities(q, a, 150, first_pass="bf16", block_size=block_size, device="cpu")
        assert_same_top_k(top, *reference_top_k(q, a, 150))


@pytest.mark.parametrize("k", [1, 37, 200])
def test_bf16_first_pass_on_ties_and_near_ties(k):
    q, a = near_tie_data()
    ref = reference_top_k(q, a, k)
    # the data is adversarial: a bfloat16 product alone picks other anchors
    approx = (normalised(q).bfloat16() @ normalised(a).bfloat16().T).float().numpy()
    approx_idx = np.argsort(-approx, axis=1, kind="stable")[:, :k]
    assert any(set(x) != set(y) for x, y in zip(approx_idx, ref[0]))
    for bs in (None, 100):
        top, = ac.top_k_similarities(q, a, k, first_pass="bf16", block_size=bs, device="cpu")
        assert_same_top_k(top, *ref)


def rounding_adversary(n=4000, d=64, seed=0):
    """Anchors whose every component sits 0.45 ulp from a bfloat16 number, above it for half of
    them and below for the rest, in a crowd of near-equal similarities to the all-equal query:
    the bfloat16 product moves half the crowd down and half up, past each other."""
    rng = np.random.default_rng(seed)
    base = np.float32(0.125) * (1 + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
    grid = torch.from_numpy(base).bfloat16().float().numpy()
    ulp = np.float32(2.0) ** (np.floor(np.log2(np.abs(grid))) - 7)
    sign = np.where(np.arange(n)[:, None] % 2 == 0, 1, -1).astype(np.float32)
    a = (grid + sign * 0.45 * ulp).astype(np.float32)
    return np.full((3, d), 0.125, dtype=np.float32), a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [50, 400, 1500])
def test_bf16_first_pass_on_rounding_adversary(k):
    q, a = rounding_adversary()
    top, = ac.top_k_similarities(q, a, k, first_pass="bf16", block_size=200, device="cpu")
    assert_same_top_k(top, *reference_top_k(q, a, k))


def test_without_the_bound_entries_are_lost(monkeypatch):
    """The adversary bites: with no error allowance, entries of the true top-k are missed."""
    q, a = rounding_adversary()
    ref = reference_top_k(q, a, 400)
    monkeypatch.setattr(precision, "error_bound", lambda x, y: torch.zeros(x.shape[0], 1))
    monkeypatch.setattr(precision, "OUTPUT_REL", 0.0)
    top, = ac.top_k_similarities(q, a, 400, first_pass="bf16", block_size=200, device="cpu")
    with pytest.raises(AssertionError):
        assert_same_top_k(top, *ref)


def test_the_bound_holds_on_the_products_of_this_machine():
    g = torch.Generator().manual_seed(3)
    for shift in (0.0, 0.7):  # centred rows, and anisotropic ones (large positive cosines)
        q = torch.nn.functional.normalize(torch.randn(300, 512, generator=g) + shift, dim=1)
        a = torch.nn.functional.normalize(torch.randn(4000, 512, generator=g) + shift, dim=1)
        ql = q.bfloat16()
        approx = (ql @ a.bfloat16().T).double()
        exact = q.double() @ a.double().T
        slack = precision.error_bound(q, ql).double() + precision.OUTPUT_REL * approx.abs()
        err = (approx - exact).abs()
        assert bool((err <= slack).all())
        assert float((err / slack).max()) > 0.05  # and it is not vacuous


def test_candidate_threshold_keeps_every_entry_that_can_pass():
    t = torch.tensor([[0.5], [0.004], [-0.2]])
    e = torch.full((3, 1), 0.01)
    thr = torch.tensor([[precision.candidate_threshold(float(tt), float(ee))] for tt, ee in zip(t.view(-1), e.view(-1))])
    # S~ at the threshold, plus its largest possible error, must reach t
    for s_tilde, tt, ee in zip(thr.view(-1).tolist(), t.view(-1).tolist(), e.view(-1).tolist()):
        assert s_tilde + ee + precision.OUTPUT_REL * abs(s_tilde) <= tt + 1e-9
        s_up = np.nextafter(np.float32(s_tilde), np.float32(1))
        assert s_up + ee + precision.OUTPUT_REL * abs(s_up) > tt - 2e-6


def test_exact_dots_match_float64_and_fallback(monkeypatch):
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((20, 37)).astype(np.float32))
    a = torch.from_numpy(rng.standard_normal((50, 37)).astype(np.float32))
    rows, cols = torch.from_numpy(rng.integers(0, 20, 300)), torch.from_numpy(rng.integers(0, 50, 300))
    want = (q.double()[rows] * a.double()[cols]).sum(1).float()
    got = precision.exact_dots(q, rows, a, cols)
    assert torch.equal(got, want)
    monkeypatch.setattr(precision, "_KERNELS", False)  # no numba: the einsum path
    assert torch.equal(precision.exact_dots(q, rows, a, cols), want)


def test_bfloat16_floor_keys_order_like_the_values():
    from asif.selection import _bf16_floor_key
    thr = [0.0, 1e-38 * 1.5, 0.3, 0.30078125, 0.7071, 2.5, 3e38]
    keys = np.array([_bf16_floor_key(t) for t in thr], dtype=np.int16)
    below = torch.from_numpy(keys).view(torch.bfloat16).double().numpy()
    assert (below <= np.array(thr)).all()  # never above: no candidate is lost
    above = torch.from_numpy(keys + np.int16(1)).view(torch.bfloat16).double().numpy()
    assert (above > np.array(thr)).all()  # the largest such bfloat16
    assert _bf16_floor_key(-0.1) < -32768  # negative: every key passes
    assert _bf16_floor_key(1e-40) == 0     # subnormal: +0.0, below it (conservative)


def test_float32_pass_matches_float64_reference_both_selections(selection_way):
    """The plain pass: the same anchors as the float64 brute force, values within float32 rounding."""
    d = structured_coupled_data(n_anchors=4000, n_images=40, n_classes=4, n_templates=2, image_dim=64,
                                text_dim=32, n_clusters=80)
    q, a = d["images"], d["anchor_images"]
    for bs in (None, 300):
        top, = ac.top_k_similarities(q, a, 120, block_size=bs, device="cpu")
        ref_i, ref_v = reference_top_k(q, a, 120)
        for r in range(len(q)):
            assert set(top.indices[r].tolist()) == set(ref_i[r].tolist())
        np.testing.assert_allclose(np.sort(top.values.numpy(), 1), np.sort(ref_v, 1), atol=2e-6)


def structured_small():
    d = structured_coupled_data(n_anchors=5000, n_images=40, n_classes=4, n_templates=2, image_dim=64,
                                text_dim=32, n_clusters=80)
    return d["images"], d["anchor_images"]


@pytest.mark.parametrize("capacity", [4.0, 1.1])
@pytest.mark.parametrize("data", [near_tie_data, rounding_adversary, structured_small])
def test_bf16_counts_and_buffer_growth_equal_the_reference(monkeypatch, capacity, data):
    """Every count of a sweep is exact, and so is a row that outgrows its buffer (a small capacity
    makes the bands overflow: the buffers grow and the rows take their block again)."""
    from asif import selection
    grown = []
    grow = selection.BoundedRowBuffers._grow
    monkeypatch.setattr(selection.BoundedRowBuffers, "CAPACITY", capacity)
    monkeypatch.setattr(selection.BoundedRowBuffers, "_grow", lambda self: (grown.append(1), grow(self)))
    q, a = data()
    for k in (1, 150, 700):
        counts = [1, k // 2 + 1, 2 * k + 3, len(a) // 2, len(a)]
        for bs in (None, 97):
            tops = ac.top_k_similarities(q, a, k, first_pass="bf16", block_size=bs, device="cpu",
                                         anchor_counts=counts)
            for n, top in zip(sorted(set(counts)), tops):
                assert top.values.shape == (len(q), min(k, n))
                assert_same_top_k(top, *reference_top_k(q, a[:n], k))
    if capacity < 2:
        assert grown  # the growth path ran


def test_bf16_rows_with_no_positive_similarity_keep_their_k_entries():
    """A row whose similarities are all negative holds k entries of value 0, like the float32 pass
    (an interval entirely below 0 still reaches a k-th lower bound of 0)."""
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    a = np.array([[-1.0, 0.05], [-0.9, -0.3], [-0.3, 0.9], [-0.5, 0.2]], dtype=np.float32)
    for counts in ([1, 2, 4], [4]):
        fast = ac.top_k_similarities(q, a, 2, first_pass="bf16", device="cpu", anchor_counts=counts)
        plain = ac.top_k_similarities(q, a, 2, device="cpu", anchor_counts=counts)
        for f, p in zip(fast, plain):
            assert f.values.shape == p.values.shape
            assert torch.equal(f.values.sort(1).values, p.values.sort(1).values)
    assert float(fast[-1].values[0].max()) == 0.0  # row 0 has no positive similarity


def test_bf16_values_are_the_exact_dots_of_their_pairs():
    q, a = structured_small()
    top, = ac.top_k_similarities(q, a, 150, first_pass="bf16", device="cpu")
    rows = torch.arange(len(q)).repeat_interleave(150)
    want = precision.exact_dots(normalised(q), rows, normalised(a), top.indices.reshape(-1)).clamp(min=0)
    assert torch.equal(top.values.reshape(-1), want)  # bit for bit: one definition of the exact value


def test_resolve_refuses_to_give_unrecomputed_values():
    from asif import selection
    q, a = structured_small()
    qn, an = normalised(q), normalised(a)
    rows = selection.BoundedRowBuffers(qn.numpy(), np.full(len(q), 0.01), 20)
    for start in (0, 100):
        rows.absorb((qn.bfloat16() @ an[start:start + 100].bfloat16().T).view(torch.int16).numpy(), start)
    with pytest.raises(RuntimeError, match="replay"):
        rows.resolve([(100, an[100:200].numpy())])  # the first block is missing


@pytest.mark.parametrize("quantised", [False, True])
def test_kth_lower_bound_is_a_valid_bound_near_the_kth(quantised):
    from asif.selection import _kth_lower_bound
    rng = np.random.default_rng(0)
    for n, k in ((1, 1), (5, 5), (300, 1), (300, 299), (4096, 800), (9000, 800)):
        lo = rng.standard_normal(n) * 0.05 + 0.3
        if quantised:  # bfloat16 values: a few hundred distinct ones, many ties
            lo = torch.from_numpy(lo).bfloat16().double().numpy()
        low = _kth_lower_bound(lo, n, k)
        kth = np.sort(lo)[::-1][k - 1]
        assert low <= kth and (lo >= low).sum() >= k  # valid: k entries are worth at least L
        assert (lo > low).sum() <= k + 4 * n // 128 + 1  # and close: within a few sample steps of the k-th


@pytest.mark.parametrize("fast", [True, False])
def test_auto_takes_bf16_where_it_is_fast_and_the_stream_large(monkeypatch, fast):
    from asif import selection
    used = []
    for cls in (selection.BoundedRowBuffers, selection.RowBuffers):
        top = cls.top
        monkeypatch.setattr(cls, "top", lambda self, top=top, cls=cls: (used.append(cls.__name__), top(self))[1])
    monkeypatch.setitem(precision._FAST, "cpu", (fast, "as the test says"))
    q, a = structured_small()
    top, = ac.top_k_similarities(q, a, 150, device="cpu")  # first_pass="auto", the default
    assert used == ["RowBuffers"]  # a small stream stays float32 without asking the CPU
    assert ac.Compute.of("cpu").pass_for(len(q) * len(a)) == "fp32"
    monkeypatch.setattr(precision, "AUTO_MIN_SIMILARITIES", 0)
    used.clear()
    top, = ac.top_k_similarities(q, a, 150, device="cpu")
    assert used == ["BoundedRowBuffers" if fast else "RowBuffers"]
    assert ac.Compute.of("cpu").pass_for(1) == ("bf16" if fast else "fp32")
    assert ac.Compute.of("cpu").pass_for(1, n_counts=3) == "fp32"  # a sweep stays float32 unless asked
    used.clear()
    ac.top_k_similarities(q, a, 150, device="cpu", anchor_counts=[1000, len(a)])
    assert used == ["RowBuffers"] * 2
    assert ac.Compute.of("cpu", dtype="float64").pass_for(1) == "fp32"  # bf16 recomputes float32 only
    ref_i, ref_v = reference_top_k(q, a, 150)
    if fast:
        assert_same_top_k(top, ref_i, ref_v)
    else:
        np.testing.assert_allclose(np.sort(top.values.numpy(), 1), np.sort(ref_v, 1), atol=2e-6)


def test_bf16_runs_as_fp32_on_a_cpu_without_the_instructions(monkeypatch):
    """There torch emulates the bfloat16 product, which the bound was not checked for: an explicit
    "bf16" (or a Ray shard whose driver settled "auto" as "bf16") runs the float32 pass instead,
    with the same exact result."""
    from asif import selection
    used = []
    for cls in (selection.BoundedRowBuffers, selection.RowBuffers):
        top = cls.top
        monkeypatch.setattr(cls, "top", lambda self, top=top, cls=cls: (used.append(cls.__name__), top(self))[1])
    q, a = structured_small()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "avx2", "fma"})
    assert not precision.bf16_instructions()
    assert precision.choose_first_pass("bf16", torch.device("cpu"), 10**9, True) == "fp32"
    top, = ac.top_k_similarities(q, a, 150, first_pass="bf16", device="cpu")
    plain, = ac.top_k_similarities(q, a, 150, first_pass="fp32", device="cpu")
    assert used == ["RowBuffers", "RowBuffers"]
    assert torch.equal(top.indices, plain.indices) and torch.equal(top.values, plain.values)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "avx512_bf16"})
    assert precision.bf16_instructions() and precision.choose_first_pass("bf16", torch.device("cpu"), 1, True) == "bf16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set())  # /proc/cpuinfo unreadable: the probe decides
    assert precision.bf16_instructions()


def test_bf16_needs_the_compiled_selection(monkeypatch):
    monkeypatch.setattr(ac, "COMPILED_SELECTION", False)
    q, a = near_tie_data()
    with pytest.raises(ASIFInputError, match="fp32"):
        ac.top_k_similarities(q, a, 5, first_pass="bf16", device="cpu")


def test_sweep_with_bf16_first_pass_matches_float32():
    d = structured_coupled_data(n_anchors=5000, n_images=80, n_classes=5, n_templates=3, image_dim=64,
                                text_dim=32, n_clusters=60)
    args = (d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5)
    kw = dict(anchor_counts=[500, 2000, 5000], exponents=[8, 1], non_zeros=100, device="cpu", return_scores=True)
    fast, plain = ac.sweep(*args, first_pass="bf16", **kw), ac.sweep(*args, **kw)
    for f, p in zip(fast, plain):
        assert f["n_anchors"] == p["n_anchors"] and f["acc1"] == p["acc1"]
        np.testing.assert_allclose(f["scores"], p["scores"], atol=1e-5)


def test_model_takes_the_first_pass():
    d = structured_coupled_data(n_anchors=3000, n_images=30, n_classes=3, n_templates=2, image_dim=32,
                                text_dim=16, n_clusters=30)
    m = ac.ASIF(d["anchor_images"], d["anchor_texts"], non_zeros=50, device="cpu", first_pass="bf16")
    ref = ac.ASIF(d["anchor_images"], d["anchor_texts"], non_zeros=50, device="cpu")
    np.testing.assert_allclose(m.similarity(d["images"], d["prompts"]), ref.similarity(d["images"], d["prompts"]),
                               atol=1e-5)


@pytest.mark.parametrize("kw, words", [
    (dict(first_pass="fp16"), "first_pass='fp16'.*auto, fp32, bf16"),
    (dict(first_pass="bf16", dtype="float64"), "float32"),
])
def test_first_pass_errors_say_what_to_do(kw, words):
    d = structured_coupled_data(n_anchors=200, n_images=5, n_classes=2, n_templates=1, image_dim=8, text_dim=8,
                                n_clusters=4)
    with pytest.raises(ASIFInputError, match=words):
        ac.top_k_similarities(d["images"], d["anchor_images"], 5, device="cpu", **kw)


def test_structured_data_has_hubs_and_a_shared_direction():
    d = structured_coupled_data(n_anchors=8000, n_images=200, n_classes=10, n_templates=2, image_dim=64,
                                text_dim=32, n_clusters=200)
    s = d["images"] @ d["anchor_images"].T
    assert 0.1 < s.mean() < 0.4  # anisotropic, unlike random unit vectors (mean ~0)
    top = np.argsort(-s, axis=1)[:, :40]
    in_degree = np.bincount(top.ravel(), minlength=8000)
    assert in_degree.max() > 10 * in_degree[in_degree > 0].mean()  # hubs: some anchors in many top-k lists
    # coupled: class c's images and prompts come from the same cluster, so ASIF classifies above chance
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 10,
                    non_zeros=100, device="cpu")
    assert rows[0]["acc1"] > 0.3
