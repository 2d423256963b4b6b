"""asif_core against the float64 reference of the paper (asif.reference), plus properties."""
import numpy as np
import pytest
import torch

import asif_core as ac
from asif import reference, scoring, storage
from asif.synthetic import synthetic_coupled_data


def ref_relative(q, a, k, p):
    return reference.relative_representation(q, a, k, p)


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


# --- relative representations

@pytest.mark.parametrize("block", [1, 7, 32, 1000])
@pytest.mark.parametrize("k", [1, 5, 40, 97, 500])
@pytest.mark.parametrize("p", [1, 3, 8])
def test_relative_matches_reference(block, k, p, selection_way):
    q, a = rand((9, 6), 0), rand((97, 6), 1)
    r = ac.relative_representation(q, a, k, p, block_size=block, dtype="float64", device="cpu")
    np.testing.assert_allclose(r.to_dense(), ref_relative(q, a, k, p), atol=1e-12)
    assert r.indices.shape == (9, min(k, 97))


def test_float32_default_close_to_reference():
    q, a = rand((20, 32), 2), rand((3000, 32), 3)
    r = ac.relative_representation(q, a, 50, 8, block_size=256)
    assert r.values.dtype == torch.float32
    np.testing.assert_allclose(r.to_dense(), ref_relative(q, a, 50, 8), atol=2e-5)


@pytest.mark.parametrize("block", [1, 3, 10])
def test_ties_go_to_the_lower_anchor_index(block, selection_way):
    # Entries +-1 in 4 dims: norms are 2, so every cosine is an exact sum of
    # +-1/4 whatever the summation order, and equal anchors tie exactly. The
    # reference keeps the earliest of equal anchors; so must the stream.
    rng = np.random.default_rng(4)
    base = rng.choice([-1.0, 1.0], (5, 4))
    a = np.concatenate([base, base, base[::-1], base, rng.choice([-1.0, 1.0], (7, 4))])
    q = np.concatenate([base[:3], rng.choice([-1.0, 1.0], (5, 4))])
    for k in (1, 2, 3, 6, 7, 12):
        r = ac.relative_representation(q, a, k, 3, block_size=block, dtype="float64")
        ref = ref_relative(q, a, k, 3)
        np.testing.assert_allclose(r.to_dense(), ref, atol=1e-12)
        pos = r.values > 0
        want = [sorted(np.flatnonzero(row > 0)) for row in ref]
        assert [sorted(r.indices[i][pos[i]].tolist()) for i in range(len(q))] == want


def test_sparsity_norm_and_no_negatives():
    q, a = rand((30, 8), 6), rand((400, 8), 7)
    for k in (10, 400, 1000):
        top, = ac.top_k_similarities(q, a, k, block_size=33, dtype="float64")
        kk = min(k, 400)
        assert top.values.shape == (30, kk) and top.indices.shape == (30, kk)
        assert (top.values >= 0).all()
        # distinct anchors per row, and nothing outside the top-k
        assert all(len(set(row.tolist())) == kk for row in top.indices)
        s = np.maximum((q / np.linalg.norm(q, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T, 0)
        kth = np.sort(s, axis=1)[:, -kk]
        assert (top.values.numpy() >= kth[:, None] - 1e-12).all()
        r = ac.sharpen(top, 8)
        assert torch.allclose(torch.linalg.vector_norm(r.values, dim=1), torch.ones(30, dtype=r.values.dtype))


def test_all_negative_row_gives_zero_representation():
    a = np.eye(4)
    q = -np.ones((1, 4))
    r = ac.relative_representation(q, a, 2, 8, dtype="float64")
    assert torch.count_nonzero(r.values) == 0


def test_rotation_of_either_space_changes_nothing(tiny):
    d = tiny
    rng = np.random.default_rng(9)
    r1, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    r2, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    args = dict(anchor_counts=[30, 97], exponents=[1, 8], non_zeros=20, dtype="float64", return_scores=True)
    a = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 4, **args)
    b = ac.sweep(d["anchor_images"] @ r1, d["anchor_texts"] @ r2, d["images"] @ r1, d["labels"], d["prompts"] @ r2, 4, **args)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["scores"], y["scores"], atol=1e-10)
        assert x["acc1"] == y["acc1"]


def test_scaling_inputs_changes_nothing(tiny):
    d = tiny
    s1 = ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 4, non_zeros=10, dtype="float64")
    s2 = ac.classify(d["anchor_images"] * 7.5, d["anchor_texts"] * 0.01, d["images"] * 3, d["prompts"] * 2, 4,
                     non_zeros=10, dtype="float64")
    np.testing.assert_allclose(s1, s2, atol=1e-12)


# --- similarity, classification, sweep

@pytest.mark.parametrize("way", [None, "dense", "sparse"])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("k,p", [(5, 1), (20, 3), (97, 8), (300, 8)])
def test_class_scores_match_reference(tiny, reduce, k, p, way):
    d = tiny
    with scoring.forced(way=way, tiles=(3, 5)):  # way None: the cost model's choice
        s = ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 4, non_zeros=k,
                        exponent=p, reduce=reduce, dtype="float64", block_size=16)
    ref = reference.class_scores(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 4, k, p, reduce)
    assert isinstance(s, np.ndarray)
    np.testing.assert_allclose(s, ref, atol=1e-12)


def test_every_point_of_the_sweep_equals_a_run_on_that_prefix(tiny, selection_way):
    d = tiny
    sizes, ps = [3, 10, 50, 97], [1, 3, 8]
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 4,
                    anchor_counts=sizes, exponents=ps, non_zeros=20, dtype="float64", block_size=7, return_scores=True)
    assert [(r["n_anchors"], r["exponent"]) for r in rows] == [(n, float(p)) for n in sizes for p in ps]
    for r in rows:
        n = r["n_anchors"]
        alone = ac.sweep(d["anchor_images"][:n], d["anchor_texts"][:n], d["images"], d["labels"], d["prompts"], 4,
                         exponents=[r["exponent"]], non_zeros=20, dtype="float64", return_scores=True)[0]
        np.testing.assert_allclose(r["scores"], alone["scores"], atol=1e-12)
        for m in ("acc1", "acc5", "mean_per_class_recall"):
            assert r[m] == alone[m]


def test_sweep_finds_the_signal_in_coupled_data():
    d = synthetic_coupled_data(n_anchors=2000, n_classes=10, n_images=300, noise=1.0, seed=1)
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 10,
                    anchor_counts=[2000], non_zeros=100)
    assert rows[0]["acc1"] > 0.5  # chance is 0.1
    # with the text anchors shuffled the coupling is gone and so is the signal
    perm = np.random.default_rng(0).permutation(2000)
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"][perm], d["images"], d["labels"], d["prompts"], 10,
                    non_zeros=100)
    assert rows[0]["acc1"] < 0.3


# --- retrieval and explanations

def test_explanation_products_sum_to_the_similarity(tiny):
    d = tiny
    model = ac.ASIF(d["anchor_images"], d["anchor_texts"], non_zeros=40, exponent=3, dtype="float64",
                    captions=[f"pair {i}" for i in range(97)])
    x, t = d["images"][0], d["prompts"][0]
    parts = model.explain(x, t, top=1000)
    sim = model.similarity(x[None], t[None])[0, 0]
    assert sum(p["product"] for p in parts) == pytest.approx(sim)
    assert sum(p["share"] for p in parts) == pytest.approx(1.0)
    assert [p["product"] for p in parts] == sorted((p["product"] for p in parts), reverse=True)
    rx, rt = ref_relative(x[None], d["anchor_images"], 40, 3)[0], ref_relative(t[None], d["anchor_texts"], 40, 3)[0]
    best = int(np.argmax(rx * rt))
    assert parts[0]["anchor"] == best and parts[0]["caption"] == f"pair {best}"
    assert len(model.explain(x, t, top=2)) == 2


# --- the model: updates, save/load, memmaps

def test_add_and_remove_equal_a_rebuild(tiny):
    d = tiny
    ai, at = d["anchor_images"], d["anchor_texts"]
    caps = [f"c{i}" for i in range(97)]
    grown = ac.ASIF(ai[:60], at[:60], 12, 3, dtype="float64", captions=caps[:60]).add_anchors(ai[60:], at[60:], caps[60:])
    full = ac.ASIF(ai, at, 12, 3, dtype="float64", captions=caps)
    np.testing.assert_allclose(grown.similarity(d["images"], d["prompts"]), full.similarity(d["images"], d["prompts"]), atol=0)
    drop = [0, 5, 50, 96]
    keep = np.setdiff1d(np.arange(97), drop)
    shrunk = full.remove_anchors(drop)
    rebuilt = ac.ASIF(ai[keep], at[keep], 12, 3, dtype="float64")
    np.testing.assert_allclose(shrunk.similarity(d["images"], d["prompts"]), rebuilt.similarity(d["images"], d["prompts"]), atol=0)
    assert shrunk.captions == [caps[i] for i in keep]


def test_save_load_round_trip(tmp_path, tiny):
    d = tiny
    caps = [f"a caption, number {i} \u00e9" for i in range(97)]
    model = ac.ASIF(d["anchor_images"], d["anchor_texts"], 11, 5, captions=caps, meta={"image": {"encoder": "x"}})
    model.save(tmp_path / "set")
    model.save(tmp_path / "set")  # overwriting leaves one complete set, no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    back = ac.ASIF.load(tmp_path / "set", verify=True)
    assert isinstance(back.anchor_images, np.memmap)
    assert (back.non_zeros, back.exponent, back.captions) == (11, 5.0, caps)
    assert back.meta["image"]["encoder"] == "x"
    np.testing.assert_array_equal(np.asarray(back.anchor_texts), d["anchor_texts"])
    np.testing.assert_allclose(back.similarity(d["images"], d["prompts"]), model.similarity(d["images"], d["prompts"]))
    # a corrupted shard is caught by verify
    shard = tmp_path / "set" / "image" / "embeddings-00000.npy"
    raw = bytearray(shard.read_bytes()); raw[-1] ^= 0xFF; shard.write_bytes(bytes(raw))
    with pytest.raises(ac.ASIFInputError, match="sha256"):
        ac.ASIF.load(tmp_path / "set", verify=True)


def test_sharded_memmap_anchors_stream_like_arrays(tmp_path, tiny):
    d = tiny
    storage.save_embedding_set(tmp_path / "img", d["anchor_images"].astype(np.float16), {"encoder": "x"},
                               shard_rows=10)
    es = storage.load_embedding_set(tmp_path / "img", verify=True)
    assert isinstance(es.array, storage.ShardedArray) and es.array.shape == (97, 12)
    a16 = d["anchor_images"].astype(np.float16).astype(np.float64)
    top, = ac.top_k_similarities(d["images"], es.array, 9, block_size=13)
    ref, = ac.top_k_similarities(d["images"], a16, 9, dtype="float64")
    np.testing.assert_allclose(np.sort(top.values.numpy(), 1), np.sort(ref.values.numpy(), 1), atol=1e-6)


def test_block_size_from_memory_budget():
    cpu = torch.device("cpu")
    small = ac.choose_block_size(2000, 768, cpu, torch.float32, memory_budget=8 * 2**20)
    large = ac.choose_block_size(2000, 768, cpu, torch.float32, memory_budget=512 * 2**20)
    assert 1 <= small < large
    assert small * (4 * (2000 + 768) + 4 * 768) <= 8 * 2**20
    # a GPU with room for millions of anchors still stages each block within the host's RAM budget
    gpu = ac.choose_block_size(2000, 1152, torch.device("cuda"), torch.float16, memory_budget=100 * 2**30)
    assert gpu * 1152 * 4 <= ac.DEFAULT_RAM_BUDGET < (gpu + 1) * 1152 * 4


# --- bad input: a clear error that names the argument

@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(a, anchor_texts=a["anchor_texts"][:-1]), "coupled"),
    (lambda a: dict(a, images=a["images"][:, :-1]), "images: has dim"),
    (lambda a: dict(a, prompts=a["prompts"][0]), "prompts: expected a 2-D"),
    (lambda a: dict(a, images=np.where(np.arange(a["images"].size).reshape(a["images"].shape) == 5, np.nan, a["images"])), "row 0 holds NaN"),
    (lambda a: dict(a, anchor_images=np.vstack([a["anchor_images"][:3], np.zeros((1, 12)), a["anchor_images"][4:]])), "row 3 is all zeros"),
    (lambda a: dict(a, n_classes=0), "empty class list"),
    (lambda a: dict(a, n_classes=5), "do not split"),
    (lambda a: dict(a, labels=a["labels"][:-1]), "labels"),
    (lambda a: dict(a, labels=a["labels"] + 10), "labels: values"),
    (lambda a: dict(a, non_zeros=0), "non_zeros"),
    (lambda a: dict(a, exponents=[0]), "exponent"),
    (lambda a: dict(a, exponents=[]), "exponents"),
    (lambda a: dict(a, anchor_counts=[10, 1000]), "anchor_counts"),
    (lambda a: dict(a, reduce="sum"), "reduce"),
    (lambda a: dict(a, images=np.zeros((0, 12))), "empty"),
])
def test_bad_input_is_named(tiny, mutate, match):
    args = dict(tiny)
    args.update(anchor_counts=[10, 97], exponents=[8], non_zeros=20, reduce="max")
    args = mutate(args)
    with pytest.raises(ac.ASIFInputError, match=match):
        ac.sweep(args["anchor_images"], args["anchor_texts"], args["images"], args["labels"], args["prompts"],
                 args["n_classes"], anchor_counts=args["anchor_counts"], exponents=args["exponents"],
                 non_zeros=args["non_zeros"], reduce=args["reduce"])


def test_half_precision_is_refused_on_cpu():
    with pytest.raises(ac.ASIFInputError, match="CUDA"):
        ac.relative_representation(rand((2, 3), 0), rand((5, 3), 1), 2, dtype="float16", device="cpu")


def test_memmap_with_nan_found_while_streaming(tmp_path):
    a = rand((50, 4), 0)
    a[37, 2] = np.nan
    np.save(tmp_path / "a.npy", a)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    with pytest.raises(ac.ASIFInputError, match="row 37"):
        ac.relative_representation(rand((3, 4), 1), mm, 5, block_size=8)


# --- retrieval, return types, compute options

def test_retrieve_ranks_by_similarity_both_ways(tiny):
    d = tiny
    model = ac.ASIF(d["anchor_images"], d["anchor_texts"], 20, 3, dtype="float64")
    sim = model.similarity(d["images"], d["prompts"])
    assert isinstance(sim, np.ndarray) and sim.shape == (23, 12)
    r = model.retrieve(d["images"], d["prompts"], top=3)
    assert r.indices.shape == r.scores.shape == (23, 3)
    np.testing.assert_allclose(r.scores, -np.sort(-sim, axis=1)[:, :3])
    np.testing.assert_allclose(np.take_along_axis(sim, r.indices, 1), r.scores)
    t = model.retrieve(d["images"], d["prompts"], top=30, direction="text_to_image")
    assert t.indices.shape == (12, 23)  # top is capped by the candidates there are
    np.testing.assert_allclose(t.scores, -np.sort(-sim.T, axis=1))
    with pytest.raises(ac.ASIFInputError, match="direction"):
        model.retrieve(d["images"], d["prompts"], direction="sideways")


@pytest.mark.parametrize("block", [0, -5, 2.5, True])
def test_block_size_must_be_a_positive_integer(block):
    with pytest.raises(ac.ASIFInputError, match="block_size"):
        ac.relative_representation(rand((2, 3), 0), rand((5, 3), 1), 2, block_size=block)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "meta", "xpu", "cuda:99", "cuda:-1", ""])
def test_unknown_device_is_one_clear_error(device):
    with pytest.raises(ac.ASIFInputError, match="device"):
        ac.pick_device(device)


def test_anchor_faults_are_blamed_on_the_anchors_while_streaming(tmp_path, tiny):
    """Memory-mapped anchors are checked block by block: a bad row names the anchors, never the queries."""
    d = tiny
    for key, other in (("anchor_images", "anchor_texts"), ("anchor_texts", "anchor_images")):
        for value in (np.nan, 0.0):
            bad = d[key].copy()
            bad[60] = value
            np.save(tmp_path / "bad.npy", bad)
            np.save(tmp_path / "ok.npy", d[other])
            mm, ok = np.load(tmp_path / "bad.npy", mmap_mode="r"), np.load(tmp_path / "ok.npy", mmap_mode="r")
            model = ac.ASIF(*((mm, ok) if key == "anchor_images" else (ok, mm)), 20, 3, block_size=16)
            with pytest.raises(ac.ASIFInputError, match=rf"^{key}: row 60 "):
                model.similarity(d["images"], d["prompts"])


def test_dims_that_disagree_name_both_arrays(tiny):
    d = tiny
    with pytest.raises(ac.ASIFInputError, match="images: has dim 11 but anchor_images has dim 12"):
        ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"][:, :11], d["labels"], d["prompts"], 4)
    with pytest.raises(ac.ASIFInputError, match="texts: has dim 6 but anchor_texts has dim 7"):
        ac.ASIF(d["anchor_images"], d["anchor_texts"], 20).similarity(d["images"], d["prompts"][:, :6])


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.complex64, "U4", bool])
def test_non_float_embeddings_are_refused_before_streaming(tmp_path, tiny, dtype):
    d = tiny
    np.save(tmp_path / "a.npy", d["anchor_images"].astype(dtype))
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")  # a memmap is not scanned up front: its dtype says it all
    with pytest.raises(ac.ASIFInputError, match="anchor_images: dtype .* is not floating point"):
        ac.sweep(mm, d["anchor_texts"], d["images"], d["labels"], d["prompts"], 4)
    with pytest.raises(ac.ASIFInputError, match="images: dtype .* is not floating point"):
        ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"].astype(dtype), d["labels"], d["prompts"], 4)


def test_big_endian_arrays_give_the_same_answer(tmp_path, tiny):
    d = tiny
    big = {k: d[k].astype(d[k].dtype.newbyteorder(">")) for k in ("anchor_images", "anchor_texts", "images",
                                                                   "prompts", "labels")}
    np.save(tmp_path / "a.npy", big["anchor_images"])
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert not mm.dtype.isnative
    kw = dict(anchor_counts=[40, 97], exponents=[8, 1], non_zeros=20, dtype="float64", return_scores=True, block_size=16)
    want = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 4, **kw)
    got = ac.sweep(mm, big["anchor_texts"], big["images"], big["labels"], big["prompts"], 4, **kw)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["scores"], g["scores"])
        assert w["acc1"] == g["acc1"]


# --- centring on the anchors' mean

def hubby(seed=7, n=150, q=30, classes=5, templates=3):
    """Coupled data whose image side shares one large direction (non-negative, like pooled CNN features)."""
    d = synthetic_coupled_data(n_anchors=n, n_classes=classes, n_templates=templates, n_images=q, image_dim=12,
                               text_dim=7, latent_dim=5, noise=1.2, seed=seed, dtype=np.float64)
    for key in ("anchor_images", "images"):
        d[key] = np.abs(d[key]) + 0.5
    return d


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("first_pass", ["fp32", "bf16"])
def test_centred_scores_match_the_float64_reference(reduce, first_pass):
    d = hubby()
    args = (d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 5)
    want = reference.class_scores(*args, k=20, p=8, reduce=reduce, centre=True)
    assert np.abs(want - reference.class_scores(*args, k=20, p=8, reduce=reduce)).max() > 0.05  # it does something
    got64 = ac.classify(*args, non_zeros=20, exponent=8, reduce=reduce, centre=True, device="cpu", dtype="float64")
    np.testing.assert_allclose(got64, want, atol=1e-12)
    ai, at = (d[k].astype(np.float32) for k in ("anchor_images", "anchor_texts"))
    got32 = ac.classify(ai, at, d["images"], d["prompts"], 5, non_zeros=20, exponent=8, reduce=reduce, centre=True,
                        device="cpu", first_pass=first_pass, block_size=16)
    np.testing.assert_allclose(got32, want, atol=2e-5)
    model = ac.ASIF(ai, at, 20, 8, centre=True, block_size=16)
    np.testing.assert_allclose(model.classify(d["images"], d["prompts"], 5, reduce), got32, atol=1e-6)


def test_centring_a_sweep_uses_the_whole_set_for_every_count():
    d = hubby()
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5,
                    anchor_counts=[40, 150], non_zeros=20, centre=True, device="cpu", dtype="float64",
                    return_scores=True)
    ci, ct = reference.centre_of(d["anchor_images"]), reference.centre_of(d["anchor_texts"])
    rx = reference.relative_representation(d["images"], d["anchor_images"][:40], 20, 8, ci)
    rt = reference.relative_representation(d["prompts"], d["anchor_texts"][:40], 20, 8, ct)
    np.testing.assert_allclose(rows[0]["scores"], (rx @ rt.T).reshape(30, 5, 3).max(2), atol=1e-12)
    # explicit centres are used as given: those of the first 40 anchors give the 40-anchor model exactly
    mine = (reference.centre_of(d["anchor_images"][:40]), reference.centre_of(d["anchor_texts"][:40]))
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5,
                    anchor_counts=[40], non_zeros=20, centre=mine, device="cpu", dtype="float64", return_scores=True)
    np.testing.assert_allclose(rows[0]["scores"], ac.ASIF(d["anchor_images"][:40], d["anchor_texts"][:40], 20,
                                                          centre=True, dtype="float64").classify(
        d["images"], d["prompts"], 5), atol=1e-12)


def test_each_side_can_be_centred_alone():
    d = hubby()
    ci = reference.centre_of(d["anchor_images"])
    rx = reference.relative_representation(d["images"], d["anchor_images"], 20, 8, ci)
    rt = reference.relative_representation(d["prompts"], d["anchor_texts"], 20, 8)
    want = (rx @ rt.T).reshape(30, 5, 3).max(2)
    for centre in ((True, None), (ci, False)):
        got = ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 5, non_zeros=20,
                          centre=centre, device="cpu", dtype="float64")
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_anchor_centre_streams_a_memmap_and_names_bad_rows(tmp_path):
    d = hubby()
    np.save(tmp_path / "a.npy", d["anchor_images"].astype(np.float32))
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_allclose(ac.anchor_centre(mm, block=7, dtype=torch.float64), reference.centre_of(mm), atol=1e-12)
    np.testing.assert_allclose(ac.anchor_centre(mm, 40, block=7, dtype=torch.float64), reference.centre_of(mm[:40]),
                               atol=1e-12)
    # float32 rows (the default, as the products use), summed in float64
    np.testing.assert_allclose(ac.anchor_centre(mm, block=7), reference.centre_of(mm), atol=1e-7)
    bad = d["anchor_images"].copy()
    bad[77, 3] = np.nan
    with pytest.raises(ac.ASIFInputError, match="row 77"):
        ac.anchor_centre(bad, block=10)


def test_centred_model_updates_saves_and_loads(tmp_path):
    d = hubby()
    ai, at, x, t = d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"]
    grown = ac.ASIF(ai[:60], at[:60], 12, 3, dtype="float64", centre=True)
    before = grown.similarity(x, t)
    grown.add_anchors(ai[60:], at[60:])  # the centre follows the anchors
    full = ac.ASIF(ai, at, 12, 3, dtype="float64", centre=True)
    np.testing.assert_allclose(grown.similarity(x, t), full.similarity(x, t), atol=0)
    assert np.abs(before - grown.similarity(x, t)[:, :]).max() > 0
    drop = [0, 5, 50, 149]
    keep = np.setdiff1d(np.arange(150), drop)
    np.testing.assert_allclose(full.remove_anchors(drop).similarity(x, t),
                               ac.ASIF(ai[keep], at[keep], 12, 3, dtype="float64", centre=True).similarity(x, t), atol=0)
    full.save(tmp_path / "set")
    back = ac.ASIF.load(tmp_path / "set", dtype="float64")
    assert back.centre is True
    np.testing.assert_allclose(back.similarity(x, t), full.similarity(x, t), atol=1e-12)
    # an anchor set saved before centring existed has no "centre": the paper's method
    manifest = storage.read_json(tmp_path / "set" / "manifest.json")
    del manifest["centre"]
    storage.atomic_write_json(tmp_path / "set" / "manifest.json", manifest)
    assert ac.ASIF.load(tmp_path / "set").centre is False


@pytest.mark.parametrize("call,match", [
    (lambda d: ac.ASIF(d["anchor_images"][:1], d["anchor_texts"][:1], 5, centre=True), "at least 2 anchors"),
    (lambda d: ac.ASIF(d["anchor_images"], d["anchor_texts"], 5, centre="yes"), "centre='yes'"),
    (lambda d: ac.ASIF(d["anchor_images"][:3], d["anchor_texts"][:3], 5, centre=True).remove_anchors([0, 1]),
     "two with centre=True"),
    (lambda d: ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 5,
                           centre=(np.zeros(11), np.zeros(7))), r"shape \(12,\)"),
    (lambda d: ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 5,
                           centre=(np.full(12, np.nan), np.zeros(7))), "finite vector"),
    (lambda d: ac.classify(d["anchor_images"], d["anchor_texts"], d["images"], d["prompts"], 5,
                           centre=np.zeros(12)), "a pair"),
])
def test_bad_centre_is_named(call, match):
    with pytest.raises(ac.ASIFInputError, match=match):
        call(hubby())
