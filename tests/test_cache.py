"""The embedding cache: keys, shards, resume after a kill, repair, failed images, and old caches still valid."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from asif import cache as C
from asif.storage import load_embedding_set
from conftest import DEBIAN_DATA, FakeEncoder, write_images

HERE = Path(__file__).resolve().parent


def texts(n):
    return [f"caption number {i}" for i in range(n)]


def embed_texts(enc, root, n=40, shard_rows=8, dataset=None):
    items = texts(n)
    return C.embed_cached(enc, items, kind="text", dataset=dataset or {"d": "texts"},
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
    e = C.embed_cached(enc, items, kind="text", dataset={"d": "repeats"}, ids=[str(i) for i in range(30)],
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
        second = C.embed_cached(enc, items, kind="text", dataset={"d": "texts"}, ids=[str(i) for i in range(40)],
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
    load_embedding_set(b.folder, verify=True)  # manifest and shards agree again
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
    anchors = C.load_anchor_embeddings(f"captions:{tmp_path / 'pairs.jsonl'}", img_enc, txt_enc,
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
    arr = load_embedding_set(manifest.parent).array
    assert all(not np.asarray(arr[f["row"]]).any() for f in m["failed"])


KILL_SCRIPT = """
from asif import cache as C
from conftest import FakeEncoder
enc = FakeEncoder("text", delay=0.15)
C.embed_cached(enc, [f"caption number {{i}}" for i in range(64)], kind="text", dataset={{"d": "kill"}},
               ids=[str(i) for i in range(64)], name="k", root={cache!r}, shard_rows=8, progress=False)
"""


def kill_when(script: str, cache: Path, pattern: str, count: int, timeout: float = 60) -> int:
    """Run ``script`` in a process of its own and kill -9 it once ``count`` files under ``cache``
    match ``pattern``; return how many match then."""
    env = dict(os.environ, PYTHONPATH=str(HERE))  # the fake encoder lives in conftest
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and len(list(cache.rglob(pattern))) < count:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return len(list(cache.rglob(pattern)))


def test_killed_run_resumes_from_complete_shards(tmp_path):
    cache = tmp_path / "killed"
    done = kill_when(KILL_SCRIPT.format(cache=str(cache)), cache, ".progress/*.json", 3, timeout=30)
    assert 3 <= done < 8, f"the run should have been killed mid-way ({done} shards done)"
    assert not list(cache.rglob("manifest.json")), "no manifest before the run completes"
    enc = FakeEncoder("text")
    resumed = C.embed_cached(enc, texts(64), kind="text", dataset={"d": "kill"}, ids=[str(i) for i in range(64)],
                             name="k", root=cache, shard_rows=8, progress=False)
    assert enc.rows == 64 - 8 * done, "completed shards are not recomputed"
    fresh = C.embed_cached(FakeEncoder("text"), texts(64), kind="text", dataset={"d": "kill"},
                           ids=[str(i) for i in range(64)], name="k", root=tmp_path / "fresh", shard_rows=8,
                           progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.array), np.asarray(fresh.array))
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in fresh.manifest["shards"]]


def test_eval_embeddings_are_class_major_and_drop_failed(tmp_path):
    for cls in ("cat", "dog"):
        write_images(tmp_path / "folder" / cls, 3)
    (tmp_path / "folder" / "dog" / "img001.png").write_bytes(b"garbage")
    img_enc, txt_enc = FakeEncoder("image"), FakeEncoder("text")
    e = C.load_eval_embeddings(f"imagefolder:{tmp_path / 'folder'}", img_enc, txt_enc, root=tmp_path / "c",
                               progress=False)
    assert e.images.shape == (5, 13) and e.labels.tolist() == [0, 0, 0, 1, 1]
    T = len(e.templates)
    assert e.prompts.shape == (2 * T, 16)
    np.testing.assert_allclose(e.prompts[T + 1], txt_enc.vector(e.templates[1].replace("{c}", "dog")), rtol=1e-6)
    assert len(e.dropped) == 1 and "img001" in e.dropped[0]["id"]


@pytest.mark.skipif(not DEBIAN_DATA["dataset-fashion-mnist"].exists(),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_real_encoders_through_cache(tmp_path):
    from asif.encoders import load_image_encoder, load_text_encoder
    image_encoder, text_encoder = load_image_encoder(), load_text_encoder()
    e = C.load_eval_embeddings("fashion-mnist", image_encoder, text_encoder, limit=16, root=tmp_path,
                               progress=False)
    assert e.images.shape == (16, image_encoder.dim) and e.prompts.shape == (10 * len(e.templates), text_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(e.images, axis=1), 1, atol=1e-4)
    calls = []
    real = image_encoder.encode
    image_encoder.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    again = C.load_eval_embeddings("fashion-mnist", image_encoder, text_encoder, limit=16, root=tmp_path,
                                   progress=False)
    assert calls == [], "a cache hit encodes nothing"
    np.testing.assert_array_equal(again.images, e.images)


def test_a_cache_built_before_the_package_layout_is_still_valid(tmp_path, monkeypatch):
    """tests/data/cache_v1 was written by the single-file data module that came before asif/:
    same keys, same folders, same values, nothing encoded again."""
    fixture = HERE / "data" / "cache_v1"
    shutil.copytree(fixture, tmp_path / "v1")
    monkeypatch.chdir(tmp_path / "v1")  # the anchor set was named by a relative pattern
    stamp = 1_700_000_000_000_000_000  # the image folder's ids hold each file's mtime
    for p in Path("inputs/folder").rglob("*.png"):
        os.utime(p, ns=(stamp, stamp))
    img, txt = FakeEncoder("image"), FakeEncoder("text")
    before = sorted(str(p) for p in Path("cache").rglob("*") if p.is_file())
    a = C.load_anchor_embeddings("webdataset:inputs/shard-00000.tar", img, txt, root="cache", progress=False)
    e = C.load_eval_embeddings("imagefolder:inputs/folder", img, txt, root="cache", progress=False)
    assert img.rows == txt.rows == 0, "every vector came from the old cache"
    # the image folder's sets moved from the loader's name to the folder's; nothing else changed
    renamed = sorted(p.replace("/imagefolder-/", "/imagefolder-folder/")
                     .replace("/imagefolder-prompts/", "/imagefolder-folder-prompts/") for p in before)
    assert renamed != before
    assert sorted(str(p) for p in Path("cache").rglob("*") if p.is_file() and "verified" not in p.name) == renamed
    assert len(a) == 5 and [d["row"] for d in a.dropped] == [3], "the corrupt image is still the failed row"
    assert e.images.shape == (6, 13) and e.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # and the stored vectors are what the encoders give today
    fresh_img, fresh_txt = FakeEncoder("image"), FakeEncoder("text")
    new = C.load_anchor_embeddings("webdataset:inputs/shard-00000.tar", fresh_img, fresh_txt,
                                   root=tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(a.A_img, new.A_img, atol=1e-7)
    np.testing.assert_allclose(a.A_txt, new.A_txt, atol=1e-7)
    assert a.captions == new.captions and fresh_img.rows == 5


KILL_IN_SHARD_SCRIPT = """
from asif import cache as C
from conftest import FakeEncoder
enc = FakeEncoder("{kind}", delay=0.1)
items = {items}
C.embed_cached(enc, items, kind="{kind}", dataset={{"d": "small"}}, ids=[str(i) for i in range(len(items))],
               name="s", root={cache!r}, batch_size=4, checkpoint_rows=4, progress=False)
"""


@pytest.mark.parametrize("kind", ["text", "image"])
def test_a_run_smaller_than_one_shard_resumes_from_its_checkpoints(tmp_path, kind):
    """60 inputs, one 4096-row shard: a kill keeps every finished chunk of 4, and the rerun encodes only the rest."""
    if kind == "image":
        items = [str(p) for p in write_images(tmp_path / "imgs", 60)]
    else:
        items = [f"caption number {i}" for i in range(60)]
    cache = tmp_path / "cache"
    script = KILL_IN_SHARD_SCRIPT.format(kind=kind, items=items, cache=str(cache))
    chunks = kill_when(script, cache, ".progress/00000.part-*.json", 4)
    assert 4 <= chunks < 15, f"the run should have been killed inside its only shard ({chunks} chunks done)"
    assert not list(cache.rglob("manifest.json")) and not list(cache.rglob("embeddings-00000.npy"))
    enc = FakeEncoder(kind)
    resumed = C.embed_cached(enc, items, kind=kind, dataset={"d": "small"}, ids=[str(i) for i in range(60)],
                             name="s", root=cache, batch_size=4, checkpoint_rows=4, progress=False)
    assert enc.rows == 60 - 4 * chunks, "finished chunks are not encoded again"
    assert not list(cache.rglob(".progress/*.part-*")), "checkpoints go once the shard is written"
    fresh = FakeEncoder(kind)  # (the fake takes a str as a text: paths go in as Path)
    np.testing.assert_array_equal(np.asarray(resumed.array), fresh.encode([Path(i) for i in items] if kind == "image"
                                                                          else items))


def test_checkpoints_that_do_not_fit_are_recomputed(tmp_path):
    """A damaged chunk, or chunks of another size from an earlier run, are never used."""
    enc = FakeEncoder("text")
    items = texts(20)
    folder = None
    for damage in ("bytes", "record", "size"):
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        first = C.embed_cached(enc, items, kind="text", dataset={"d": 1}, ids=[str(i) for i in range(20)], name="x",
                               root=tmp_path / "c", checkpoint_rows=5, progress=False)
        folder = first.folder
        # put the checkpoints of an interrupted run back: shard and manifest gone, chunks kept
        progress = folder / ".progress"
        for c in range(4):
            lo = 5 * c
            np.save(progress / f"00000.part-{c:05d}.npy", np.asarray(first.array)[lo:lo + 5])
            from asif.storage import sha256_file
            (progress / f"00000.part-{c:05d}.json").write_text(json.dumps(
                {"start": lo, "items": 5, "failed": [], "sha256": sha256_file(progress / f"00000.part-{c:05d}.npy")}))
        (folder / "manifest.json").unlink()
        (folder / "embeddings-00000.npy").unlink()
        (progress / "00000.json").unlink()
        if damage == "bytes":
            bad = np.load(progress / "00000.part-00001.npy")
            bad[0, 0] += 1
            np.save(progress / "00000.part-00001.npy", bad)
        elif damage == "record":
            (progress / "00000.part-00002.json").write_text("{")
        enc.rows = 0
        again = C.embed_cached(enc, items, kind="text", dataset={"d": 1}, ids=[str(i) for i in range(20)], name="x",
                               root=tmp_path / "c", checkpoint_rows=10 if damage == "size" else 5, progress=False)
        assert enc.rows == {"bytes": 5, "record": 5, "size": 20}[damage], damage
        np.testing.assert_array_equal(np.asarray(again.array), FakeEncoder("text").encode(items))


@pytest.mark.parametrize("content", [b"", b'{"format": "asif-embeddings/1", "cache_k', b"null", b"[]"])
def test_an_unreadable_manifest_is_rebuilt_from_the_intact_shards(tmp_path, content):
    enc = FakeEncoder("text")
    a = embed_texts(enc, tmp_path)
    reference = np.asarray(a.array).copy()
    (a.folder / "manifest.json").write_bytes(content)
    (a.folder / a.manifest["shards"][3]["file"]).unlink()  # and one shard lost with it
    enc.rows = 0
    b = embed_texts(enc, tmp_path)
    assert enc.rows == 8, "only the missing shard is encoded again"
    np.testing.assert_array_equal(np.asarray(b.array), reference)
    assert json.loads((a.folder / "manifest.json").read_text())["count"] == 40


def test_damaged_progress_records_are_redone(tmp_path):
    enc = FakeEncoder("text")
    a = embed_texts(enc, tmp_path)
    (a.folder / "manifest.json").unlink()
    (a.folder / ".progress" / "00001.json").write_text("")
    (a.folder / ".progress" / "00002.json").write_text('{"rows": 8}')  # no sha256: cannot be trusted
    enc.rows = 0
    b = embed_texts(enc, tmp_path)
    assert enc.rows == 16
    np.testing.assert_array_equal(np.asarray(b.array), FakeEncoder("text").encode(texts(40)))


def test_a_full_disk_in_the_cache_is_named_and_finished_shards_are_kept(tmp_path, full_disk):
    enc = FakeEncoder("text")
    items = texts(40)
    real_encode = enc.encode
    calls = []

    def encode_then_fill(batch, **kw):
        calls.append(len(batch))
        if len(calls) == 3:
            full_disk(room=0)  # the disk fills up while the third shard is encoded
        return real_encode(batch, **kw)
    enc.encode = encode_then_fill
    from asif.errors import StorageError
    with pytest.raises(StorageError) as e:
        C.embed_cached(enc, items, kind="text", dataset={"d": "full"}, ids=[str(i) for i in range(40)], name="t",
                       root=tmp_path, shard_rows=8, progress=False)
    message = str(e.value)
    assert "the disk is full" in message and "embeddings-00002.npy" in message and str(tmp_path) in message
    assert "ASIF_CACHE" in message and "\n" not in message


def test_texts_must_be_text(tmp_path):
    from asif.errors import DataError
    with pytest.raises(DataError, match=r"1 of 3 texts are not strings \(item '1' is NoneType\)"):
        C.embed_cached(FakeEncoder("text"), ["a", None, "c"], kind="text", dataset={}, ids=["0", "1", "2"],
                       root=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.npy")), "nothing is embedded"


def test_verify_cache_finds_bit_rot_and_the_next_run_recomputes_only_that(tmp_path):
    from asif.pipeline import verify_cache
    from test_storage import flip_in_place
    enc = FakeEncoder("text")
    a = embed_texts(enc, tmp_path)
    reference = np.asarray(a.array).copy()
    damaged = a.folder / a.manifest["shards"][2]["file"]
    flip_in_place(damaged)
    enc.rows = 0
    trusted = embed_texts(enc, tmp_path)
    assert enc.rows == 0 and not np.array_equal(np.asarray(trusted.array), reference), \
        "the documented policy: size and mtime unchanged, the shard is trusted on a hit"
    report = verify_cache(tmp_path, repair=False, progress=False)
    assert [r["damaged"] for r in report] == [[damaged.name]] and damaged.exists(), "a dry run removes nothing"
    report = verify_cache(tmp_path, progress=False)
    assert report[0]["damaged"] == [damaged.name] and "recomputes" in report[0]["action"]
    assert not damaged.exists()
    c = embed_texts(enc, tmp_path)
    assert enc.rows == 8, "only the damaged shard is encoded again"
    np.testing.assert_array_equal(np.asarray(c.array), reference)
    assert [r["damaged"] for r in verify_cache(tmp_path, progress=False)] == [[]]


def test_most_of_a_part_embeds_the_whole_part_once(tmp_path, fake_encoders):
    paths = write_images(tmp_path / "imgs", 10)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": f"pic {i}"}) + "\n"
                                              for i, p in enumerate(paths)))
    from asif.anchors import load_anchor_set
    img, txt = fake_encoders
    name = f"captions:{tmp_path / 'a.jsonl'}"
    s = load_anchor_set(name)
    s.parts[0].keys = [f"k{i}" for i in range(10)]
    seven = C.load_anchor_embeddings(s.without({"k1", "k4", "k8"}), img, txt, root=tmp_path / "c", progress=False)
    assert len(seven) == 7 and img.rows == 10, "7 of 10 rows: the whole part is embedded, then selected"
    np.testing.assert_allclose(seven.A_img, img.encode([paths[int(c.split()[1])] for c in seven.captions]), atol=1e-7)
    img.rows = txt.rows = 0
    whole = C.load_anchor_embeddings(name, img, txt, root=tmp_path / "c", progress=False)
    assert len(whole) == 10 and img.rows == 0, "and every later use of the part reads it"
    two = C.load_anchor_embeddings(name, img, txt, limit=2, root=tmp_path / "c", progress=False)
    assert len(two) == 2 and img.rows == 0 and txt.rows == 0, "a few rows are read from the whole part cached"
    np.testing.assert_array_equal(two.A_img, whole.A_img[:2])
    np.testing.assert_array_equal(two.A_txt, whole.A_txt[:2])
    fresh = C.load_anchor_embeddings(name, img, txt, limit=2, root=tmp_path / "d", progress=False)
    assert len(fresh) == 2 and img.rows == 2, "with no whole part cached, a few rows are embedded alone"
    np.testing.assert_array_equal(fresh.A_img, two.A_img)
