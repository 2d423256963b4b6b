"""The embedding cache: keys, shards, resume after a kill, repair, failed images.

A small deterministic fake encoder (same attributes as the real ones) keeps
these fast; one test at the end uses the real packaged encoders if present.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import asif_data as D

HERE = Path(__file__).resolve().parent


class FakeEncoder:
    """Deterministic stand-in: text -> vector from its sha256; image -> its 2x2
    mean colours (12 values) plus a constant. ``rows`` counts what it encoded."""

    def __init__(self, kind="image", weights="v1", preprocessing="2x2-mean", delay=0.0):
        self.name = f"fake-{kind}"
        self.dim = 13 if kind == "image" else 16
        self.identity = {"encoder": self.name, "weights": weights, "preprocessing": preprocessing}
        self.delay, self.rows = delay, 0

    def vector(self, x):
        if isinstance(x, str):
            v = np.frombuffer(hashlib.sha256(x.encode()).digest()[:16], dtype=np.uint8).astype(np.float32) + 1
        else:
            im = x if isinstance(x, Image.Image) else Image.open(x).convert("RGB")
            v = np.append(np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32).ravel(), 1.0)
        return v / np.linalg.norm(v)

    def encode(self, items, batch_size=64, progress=False):
        time.sleep(self.delay)
        self.rows += len(items)
        return np.stack([self.vector(x) for x in items]).astype(np.float32)


def write_images(folder: Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", (6, 5), ((37 * i) % 256, (91 * i) % 256, (13 * i + 7) % 256)).save(p)
        paths.append(p)
    return paths


def texts(n):
    return [f"caption number {i}" for i in range(n)]


def embed_texts(enc, root, n=40, shard_rows=8, dataset=None):
    items = texts(n)
    return D.embed_cached(enc, items, kind="text", dataset=dataset or {"d": "texts"},
                          ids=[str(i) for i in range(n)], name="t", root=root, shard_rows=shard_rows,
                          progress=False)


def test_cache_hit_and_values(tmp_path):
    enc = FakeEncoder("text")
    a = embed_texts(enc, tmp_path)
    assert enc.rows == 40
    np.testing.assert_array_equal(np.asarray(a.array), enc.encode(texts(40)))
    assert len(a.manifest["shards"]) == 5 and a.manifest["failed"] == []
    enc.rows = 0
    b = embed_texts(enc, tmp_path)
    assert enc.rows == 0, "a cache hit must not encode anything"
    assert b.folder == a.folder
    assert [json.loads(l)["caption"] for l in open(a.folder / "captions.jsonl")] == texts(40)


def test_repeated_captions_are_embedded_once(tmp_path):
    enc = FakeEncoder("text")
    items = [f"a photo of a {c}" for c in ("shirt", "bag", "shirt", "boot", "bag", "shirt")] * 5
    e = D.embed_cached(enc, items, kind="text", dataset={"d": "repeats"}, ids=[str(i) for i in range(30)],
                       name="r", root=tmp_path, shard_rows=12, progress=False)
    assert enc.rows == 3 * 3  # three distinct captions in each of the three shards
    np.testing.assert_array_equal(np.asarray(e.array), FakeEncoder("text").encode(items))


@pytest.mark.parametrize("change", ["weights", "preprocessing", "dataset", "texts"])
def test_cache_key_changes_never_serve_stale_vectors(tmp_path, change):
    base = FakeEncoder("text")
    first = embed_texts(base, tmp_path)
    enc = FakeEncoder("text", weights="v2" if change == "weights" else "v1",
                      preprocessing="other" if change == "preprocessing" else "2x2-mean")
    if change == "texts":
        items = texts(39) + ["a different caption"]
        second = D.embed_cached(enc, items, kind="text", dataset={"d": "texts"}, ids=[str(i) for i in range(40)],
                                name="t", root=tmp_path, shard_rows=8, progress=False)
    else:
        second = embed_texts(enc, tmp_path, dataset={"d": "other"} if change == "dataset" else None)
    assert second.folder != first.folder
    assert enc.rows == 40, "a changed key must recompute everything"


def test_corrupt_shard_is_detected_and_rebuilt(tmp_path):
    enc = FakeEncoder("text")
    a = embed_texts(enc, tmp_path)
    reference = np.asarray(a.array).copy()
    shard = a.folder / a.manifest["shards"][2]["file"]
    bad = np.load(shard)
    bad[0, 0] += 0.5  # still a valid .npy file, but different bytes
    np.save(shard, bad)
    enc.rows = 0
    b = embed_texts(enc, tmp_path)
    assert enc.rows == 8, "only the damaged shard is recomputed"
    np.testing.assert_array_equal(np.asarray(b.array), reference)
    D.load_embedding_set(b.folder, verify=True)  # manifest and shards agree again
    (a.folder / a.manifest["shards"][4]["file"]).unlink()  # a missing shard too
    c = embed_texts(enc, tmp_path)
    np.testing.assert_array_equal(np.asarray(c.array), reference)


def test_corrupt_image_keeps_alignment(tmp_path):
    paths = write_images(tmp_path / "imgs", 12)
    paths[3].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt
    paths[7].unlink()  # missing
    rows = [{"image": f"imgs/{p.name}", "caption": f"picture {p.stem}"} for p in paths]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    img_enc, txt_enc = FakeEncoder("image"), FakeEncoder("text")
    anchors = D.load_anchor_embeddings(f"captions:{tmp_path / 'pairs.jsonl'}", img_enc, txt_enc,
                                       root=tmp_path / "cache", progress=False)
    assert len(anchors) == 10
    assert {d["id"].split(":")[0].rsplit("/", 1)[-1] for d in anchors.dropped} == {"img003.png", "img007.png"}
    assert all("picture img003" != c and "picture img007" != c for c in anchors.captions)
    for i, caption in enumerate(anchors.captions):
        stem = caption.split()[-1]
        np.testing.assert_allclose(anchors.A_img[i], img_enc.vector(tmp_path / "imgs" / f"{stem}.png"), rtol=1e-6)
        np.testing.assert_allclose(anchors.A_txt[i], txt_enc.vector(caption), rtol=1e-6)
        assert anchors.thumbnail(i).size[0] <= 96
    # the failures are written in the image set's manifest, as zero rows
    manifest = next((tmp_path / "cache").rglob("image-fake-image-*/manifest.json"))
    m = json.loads(manifest.read_text())
    assert sorted(f["row"] for f in m["failed"]) == sorted(
        anchors.anchor_set.order[[anchors.anchor_set.ids.index(d["id"]) for d in anchors.dropped], 1].tolist())
    arr = D.load_embedding_set(manifest.parent).array
    assert all(not np.asarray(arr[f["row"]]).any() for f in m["failed"])


KILL_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import asif_data as D
from test_cache import FakeEncoder, texts
enc = FakeEncoder("text", delay=0.15)
D.embed_cached(enc, texts(64), kind="text", dataset={{"d": "kill"}}, ids=[str(i) for i in range(64)],
               name="k", root={cache!r}, shard_rows=8, progress=False)
"""


def test_killed_run_resumes_from_complete_shards(tmp_path):
    cache = tmp_path / "killed"
    script = KILL_SCRIPT.format(root=str(HERE.parent), tests=str(HERE), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 30
    try:
        while time.time() < deadline and len(list(cache.rglob(".progress/*.json"))) < 3:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(cache.rglob(".progress/*.json")))
    assert 3 <= done < 8, f"the run should have been killed mid-way ({done} shards done)"
    assert not list(cache.rglob("manifest.json")), "no manifest before the run completes"
    enc = FakeEncoder("text")
    resumed = D.embed_cached(enc, texts(64), kind="text", dataset={"d": "kill"}, ids=[str(i) for i in range(64)],
                             name="k", root=cache, shard_rows=8, progress=False)
    assert enc.rows == 64 - 8 * done, "completed shards are not recomputed"
    fresh = D.embed_cached(FakeEncoder("text"), texts(64), kind="text", dataset={"d": "kill"},
                           ids=[str(i) for i in range(64)], name="k", root=tmp_path / "fresh", shard_rows=8,
                           progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.array), np.asarray(fresh.array))
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in fresh.manifest["shards"]]


def test_eval_embeddings_are_class_major_and_drop_failed(tmp_path):
    for cls in ("cat", "dog"):
        write_images(tmp_path / "folder" / cls, 3)
    (tmp_path / "folder" / "dog" / "img001.png").write_bytes(b"garbage")
    img_enc, txt_enc = FakeEncoder("image"), FakeEncoder("text")
    e = D.load_eval_embeddings(f"imagefolder:{tmp_path / 'folder'}", img_enc, txt_enc, root=tmp_path / "c",
                               progress=False)
    assert e.images.shape == (5, 13) and e.labels.tolist() == [0, 0, 0, 1, 1]
    T = len(e.templates)
    assert e.prompts.shape == (2 * T, 16)
    np.testing.assert_allclose(e.prompts[T + 1], txt_enc.vector(e.templates[1].replace("{c}", "dog")), rtol=1e-6)
    assert len(e.dropped) == 1 and "img001" in e.dropped[0]["id"]


def test_real_encoders_through_cache(tmp_path):
    enc = pytest.importorskip("asif_encoders")
    try:
        image_encoder, text_encoder = enc.load_image_encoder(), enc.load_text_encoder()
    except Exception as e:  # packaged weights not installed here
        pytest.skip(f"real encoders unavailable: {e}")
    if FASHION_MNIST_MISSING:
        pytest.skip("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    t = time.time()
    e = D.load_eval_embeddings("fashion-mnist", image_encoder, text_encoder, limit=16, root=tmp_path,
                               progress=False)
    first = time.time() - t
    assert e.images.shape == (16, image_encoder.dim) and e.prompts.shape == (60, text_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(e.images, axis=1), 1, atol=1e-4)
    t = time.time()
    again = D.load_eval_embeddings("fashion-mnist", image_encoder, text_encoder, limit=16, root=tmp_path,
                                   progress=False)
    assert time.time() - t < max(1.0, first / 2)
    np.testing.assert_array_equal(again.images, e.images)


FASHION_MNIST_MISSING = not (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()
