"""Atomic writes, embedding-set folders, shard verification, and the faults of disks and files."""
import errno
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from asif import storage
from asif.errors import ASIFInputError, StorageError


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


# --- faults of the place written to: found before any work, reported in one line

def test_check_writable_names_every_fault_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    storage.check_writable(tmp_path / "new" / "deeper" / "out.json", "--out")  # folders to be made: fine
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    cases = [(tmp_path, "is a directory"), (tmp_path / "afile" / "out.json", "afile is a file, not a folder"),
             (tmp_path / "afile" / "a" / "b.json", "afile is a file, not a folder")]
    for path, needle in cases:
        with pytest.raises(StorageError, match=needle) as e:
            storage.check_writable(path, "--out")
        assert str(e.value).startswith(f"--out {path}") and "\n" not in str(e.value)
    # read-only: root ignores permission bits, so the probe write is refused the way a read-only mount refuses it
    real = storage.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if str(dir).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    with pytest.raises(StorageError, match="read-only file system"):
        storage.check_writable(tmp_path / "ro" / "out.npy", "--out")
    with pytest.raises(StorageError, match="cannot write .*ro/x.json: read-only file system; write somewhere else"):
        storage.atomic_write_json(tmp_path / "ro" / "x.json", {})
    monkeypatch.undo()
    if os.geteuid() != 0:  # a real permission fault, where permissions apply
        (tmp_path / "locked").mkdir(mode=0o555)
        with pytest.raises(StorageError, match="permission denied"):
            storage.check_writable(tmp_path / "locked" / "out.npy", "--out")


def test_a_full_disk_is_named_with_the_folder_and_the_old_file_is_kept(tmp_path, full_disk):
    storage.atomic_save_npy(tmp_path / "x.npy", np.ones(3))
    full_disk(room=100)
    with pytest.raises(StorageError) as e:
        storage.check_writable(tmp_path / "y.npy", "--out", size=10**6)
    assert "the disk is full" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(StorageError) as e:
        storage.atomic_save_npy(tmp_path / "x.npy", np.zeros(10**5))
    message = str(e.value)
    assert "x.npy: the disk is full" in message and f"on the disk holding {tmp_path}" in message
    assert "ASIF_CACHE" in message and "\n" not in message
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"], "no temporary file is left"


def test_folders_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="a parent of it is a file"):
        storage.atomic_write_json(tmp_path / "afile" / "sub" / "x.json", {})
    (tmp_path / "adir").mkdir()
    with pytest.raises(StorageError, match="adir: it is a directory"):
        storage.atomic_write_json(tmp_path / "adir", {})
    assert (tmp_path / "adir").is_dir() and not list((tmp_path / "adir").iterdir())
    with pytest.raises(StorageError, match="a parent of it is a file"):
        storage.make_folder(tmp_path / "afile" / "sub")
    with pytest.raises(StorageError, match="a parent of it is a file"):
        with storage.atomic_folder(tmp_path / "afile" / "set"):
            pass


# --- text and JSON that is damaged or in another encoding

def test_read_text_takes_utf8_with_or_without_bom_and_names_other_encodings(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\n".encode("utf-8"))
    assert storage.read_text(tmp_path / "bom.csv") == "image,caption\n"
    (tmp_path / "latin.txt").write_bytes("one\ncaf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(StorageError, match=r"--from-file X: not UTF-8 text \(byte 0xe9 on line 2\)"):
        storage.read_text(tmp_path / "latin.txt", "--from-file X")
    (tmp_path / "utf16.txt").write_text("a photo\n", encoding="utf-16")
    with pytest.raises(StorageError, match="utf16.txt: not UTF-8 text .* on line 1"):
        storage.read_text(tmp_path / "utf16.txt")


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b'{"format": "asif', "truncated"),
                                            (b"\x00\x00\x00", "truncated"), (b"  \n", "empty")])
def test_read_json_names_damaged_files(tmp_path, content, needle):
    (tmp_path / "m.json").write_bytes(content)
    with pytest.raises(StorageError, match=f"m.json: .*{needle}"):
        storage.read_json(tmp_path / "m.json")


def test_damaged_manifests_are_named(tmp_path):
    storage.save_embedding_set(tmp_path / "s", np.ones((4, 3)))
    manifest = tmp_path / "s" / "manifest.json"
    for content in (b"", manifest.read_bytes()[:40], b"[1, 2]", b'{"count": 4}'):
        manifest.write_bytes(content)
        with pytest.raises(StorageError, match="manifest.json"):
            storage.load_embedding_set(tmp_path / "s")


def test_captions_are_text_never_none(tmp_path):
    for bad in ([None, "b"], ["a", 3], ["a", float("nan")]):
        with pytest.raises(ASIFInputError, match="caption [01] is"):
            storage.write_captions(tmp_path / "c.jsonl", bad)
    assert not (tmp_path / "c.jsonl").exists()


def test_file_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # what the file system gives for Latin-1 bytes
    assert storage.printable(name) == "caf\\xe9.png" and storage.printable("café.png") == "café.png"
    assert storage.sha256_text(name) != storage.sha256_text(os.fsdecode(b"caf\xe8.png"))
    assert storage.sha256_text("café") == __import__("hashlib").sha256("café".encode()).hexdigest()


# --- the verification policy: size + mtime trusted on a hit, `verify_folder` hashes everything

def flip_in_place(path):
    """Change one byte of a file and put its size and modification time back (bit rot)."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_verify_folder_finds_what_the_stamps_cannot(tmp_path):
    m = storage.save_embedding_set(tmp_path / "s", np.arange(30.0).reshape(10, 3), shard_rows=4)
    shards = [tmp_path / "s" / s["file"] for s in m["shards"]]
    assert storage.verify_folder(tmp_path / "s") == []
    flip_in_place(shards[1])
    # the documented trade: a hit trusts a shard whose size and mtime did not move ...
    assert storage.verify_shard(shards[1], m["shards"][1]["sha256"], storage.VerifiedShards(tmp_path / "s"))
    # ... and the full check finds it, and makes the next hit hash it again
    assert storage.verify_folder(tmp_path / "s") == [shards[1].name]
    assert not storage.verify_shard(shards[1], m["shards"][1]["sha256"], storage.VerifiedShards(tmp_path / "s"))
    shards[2].unlink()
    assert storage.verify_folder(tmp_path / "s") == [shards[1].name, shards[2].name]
    (tmp_path / "s" / "manifest.json").write_text('{"shards": [')
    assert storage.verify_folder(tmp_path / "s") == ["manifest.json"]


def test_damaged_verified_stamps_only_cost_a_rehash(tmp_path):
    m = storage.save_embedding_set(tmp_path / "s", np.ones((4, 3)))
    (tmp_path / "s" / ".progress").mkdir()
    for content in ("", "[1, 2", "[]"):
        (tmp_path / "s" / ".progress" / "verified.json").write_text(content)
        verified = storage.VerifiedShards(tmp_path / "s")
        assert verified.stamps == {}
        assert storage.verify_shard(tmp_path / "s" / m["shards"][0]["file"], m["shards"][0]["sha256"], verified)
