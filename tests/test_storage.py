"""Atomic writes, embedding-set folders and shard verification."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from asif import storage
from asif.errors import ASIFInputError


UMASK_SCRIPT = """
import sys
import numpy as np
from pathlib import Path
from asif import storage
out = Path(sys.argv[1])
storage.atomic_write_json(out / "a.json", {"x": 1})
with storage.atomic_folder(out / "set") as tmp:
    storage.atomic_save_npy(tmp / "e.npy", np.ones(3))
"""


def test_atomic_write_follows_the_umask_and_leaves_no_temporaries(tmp_path):
    # the module reads the umask once, at import: a fresh process with umask 027
    subprocess.run([sys.executable, "-c", UMASK_SCRIPT, str(tmp_path)], check=True,
                   preexec_fn=lambda: os.umask(0o027))
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "set").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "set" / "e.npy").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "set"]


def test_a_failed_write_keeps_the_old_file_and_folder(tmp_path):
    storage.atomic_write_json(tmp_path / "a.json", {"v": "old"})

    def boom(f):
        f.write(b"{half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        storage.atomic_write(tmp_path / "a.json", boom)
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": "old"}
    storage.save_embedding_set(tmp_path / "set", np.ones((3, 2)))
    with pytest.raises(RuntimeError):
        with storage.atomic_folder(tmp_path / "set") as tmp:
            storage.save_embedding_set(tmp, np.zeros((5, 2)))
            raise RuntimeError("interrupted")
    assert storage.load_embedding_set(tmp_path / "set").array.shape == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "set"]


def test_embedding_set_round_trip_with_captions_labels_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((25, 4)).astype(np.float32)
    caps = [f"caption {i} \u00e9" for i in range(25)]
    m = storage.save_embedding_set(tmp_path / "s", x, {"encoder": "e"}, shard_rows=10, captions=caps,
                                   labels=np.arange(25) % 3)
    assert [s["rows"] for s in m["shards"]] == [10, 10, 5] and m["encoder"] == "e"
    es = storage.load_embedding_set(tmp_path / "s", verify=True)
    assert isinstance(es.array, storage.ShardedArray)
    np.testing.assert_array_equal(np.asarray(es.array), x)
    np.testing.assert_array_equal(es.array[7:23], x[7:23])
    np.testing.assert_array_equal(es.array[-1], x[-1])
    assert es.captions == caps and es.labels.tolist() == (np.arange(25) % 3).tolist()
    assert es.ok.all() and es.failed_rows.size == 0


def test_corrupt_and_missing_shards_are_named(tmp_path):
    storage.save_embedding_set(tmp_path / "s", np.ones((12, 3)), shard_rows=5)
    shard = tmp_path / "s" / storage.shard_name(1)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    storage.load_embedding_set(tmp_path / "s")  # not verified: opened as is
    with pytest.raises(ASIFInputError, match="embeddings-00001.npy does not match its sha256"):
        storage.load_embedding_set(tmp_path / "s", verify=True)
    shard.unlink()
    with pytest.raises(ASIFInputError, match="embeddings-00001.npy is missing"):
        storage.load_embedding_set(tmp_path / "s")
    with pytest.raises(ASIFInputError, match="no manifest.json"):
        storage.load_embedding_set(tmp_path)


def test_verified_shards_skip_rehashing_only_while_size_and_mtime_hold(tmp_path, monkeypatch):
    m = storage.save_embedding_set(tmp_path / "s", np.ones((4, 3)))
    path, sha = tmp_path / "s" / m["shards"][0]["file"], m["shards"][0]["sha256"]
    verified = storage.VerifiedShards(tmp_path / "s")
    assert storage.verify_shard(path, sha, verified)
    verified.save()
    hashed = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    again = storage.VerifiedShards(tmp_path / "s")
    assert storage.verify_shard(path, sha, again) and hashed == []
    np.save(path, np.zeros((4, 3)))  # a rewrite changes the mtime: hashed again, and found wrong
    assert not storage.verify_shard(path, sha, again) and hashed == [path]
    assert not storage.verify_shard(tmp_path / "s" / "nothing.npy", sha)


def test_captions_with_ids_and_slug(tmp_path):
    storage.write_captions(tmp_path / "c.jsonl", ["a", "b"], ids=["x", "y"])
    assert [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()] == \
        [{"id": "x", "caption": "a"}, {"id": "y", "caption": "b"}]
    with pytest.raises(ASIFInputError):
        storage.write_captions(tmp_path / "d.jsonl", ["a"], ids=["x", "y"])
    assert storage.slug("webdataset:shards/{00..09}.tar") == "webdataset_shards_00..09_.tar"
