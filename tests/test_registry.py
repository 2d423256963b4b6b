"""The registry: deterministic publish, and a checked fetch against a local server with faults."""
import errno
import json
import shutil

import numpy as np
import pytest

from asif import registry as R
from asif.config import DATA_DIR
from asif.errors import DataError, FetchError
from asif.storage import load_embedding_set
from conftest import closed_port_url


def test_fetch_ok_and_cached(published, server):
    registry, array, cache = published
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)
    assert load_embedding_set(folder / "texts").captions[3] == "c3"
    n = len(server.requests)
    assert R.fetch("mine", registry=registry, root=cache, progress=False) == folder
    assert len(server.requests) == n, "a fetched set is not downloaded again"


@pytest.mark.parametrize("mode,kind", [("html", "html"), ("404", "not_found"), ("corrupt", "checksum")])
def test_fetch_faults(published, server, mode, kind):
    registry, array, cache = published
    server.mode = mode
    with pytest.raises(FetchError) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == kind
    assert not (cache / "precomputed" / "mine").exists() and not (cache / "downloads" / "mine.tar").exists()
    if mode in ("html", "corrupt"):
        rejected = list((cache / "downloads" / "rejected").iterdir())
        assert len(rejected) == 1, "the bad file is moved aside"
        assert str(rejected[0]) in str(err.value)
    server.mode = "ok"
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images").array), array)


def test_fetch_truncated_then_resumed(published, server):
    registry, array, cache = published
    server.mode = "truncate"
    with pytest.raises(FetchError) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "truncated" and "resume" in str(err.value)
    parts = list((cache / "downloads").glob("*.part"))
    assert parts and parts[0].stat().st_size > 0, "the partial file is kept"
    server.mode = "ok"
    server.requests.clear()
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    assert any(r and not r.startswith("bytes=0-") for _, r in server.requests), "the download resumed"
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)


def test_fetch_no_space(published, server, monkeypatch):
    registry, _, cache = published
    monkeypatch.setattr(R.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(FetchError) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "no_space" and not server.requests
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(R, "_download", full)
    with pytest.raises(FetchError) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "no_space"


def test_fetch_unknown_name_and_network(published, tmp_path):
    registry, _, cache = published
    with pytest.raises(DataError, match="no precomputed embeddings named"):
        R.fetch("nope", registry=registry, root=cache)
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"]["source"] = {"url": closed_port_url() + "mine.tar"}
    registry.write_text(json.dumps(data))
    with pytest.raises(FetchError) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "network"


def test_repo_registry_is_valid():
    data = json.loads((DATA_DIR / "registry.json").read_text())
    assert data["format"] == R.REGISTRY_FORMAT
    for name, e in data["embeddings"].items():
        assert len(e["sha256"]) == 64 and e["size"] > 0 and e["source"], name


def test_fetch_drive_refusal_is_reported(published, monkeypatch):
    """gdown raises FileURLRetrievalError when Drive answers with its quota or
    permission page; fetch turns it into an 'html' FetchError that says so."""
    gdown = pytest.importorskip("gdown")
    registry, _, cache = published
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"]["source"] = {"gdrive_id": "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"}
    registry.write_text(json.dumps(data))

    def refuse(source, output, progress, timeout):
        assert source == {"gdrive_id": "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"}
        raise gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file recently.")
    monkeypatch.setattr(R, "_download", refuse)
    with pytest.raises(FetchError, match="quota") as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "html" and "Google Drive file 1AbCd" in str(err.value)


def test_a_server_that_ignores_byte_ranges_gets_a_fresh_download(published, server):
    """A partial file from a broken transfer, then a server that answers every Range with the whole
    file: the partial file is dropped and the download starts from zero (it used to stay and fail
    every later fetch)."""
    registry, array, cache = published
    server.mode = "truncate"
    with pytest.raises(FetchError):
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert list((cache / "downloads").glob("*.part"))
    server.mode = "norange"
    server.requests.clear()
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    ranges = [r for _, r in server.requests]
    assert any(r and r != "bytes=0-" for r in ranges) and ranges[-1] in (None, "bytes=0-"), ranges
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)
    assert not list((cache / "downloads").glob("*.part"))


def _serve(published, server, payload: bytes):
    """Serve ``payload`` under the registry entry, with its true sha256 and size."""
    import hashlib
    registry, _, cache = published
    server.files["/mine.tar"] = payload
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"].update(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    registry.write_text(json.dumps(data))
    return registry, cache


@pytest.mark.parametrize("payload,needle", [
    (b"just some bytes, not an archive" * 100, "not a valid tar archive"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 400, "not a valid tar archive"),  # gzip magic, broken body
    (None, "without any embedding set"),
])
def test_a_sha_valid_archive_that_is_not_a_usable_tar(published, server, payload, needle):
    if payload is None:  # a real tar, with the wrong content
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            ti = tarfile.TarInfo("notes.txt")
            ti.size = 5
            tar.addfile(ti, io.BytesIO(b"hello"))
        payload = buf.getvalue()
    registry, cache = _serve(published, server, payload)
    with pytest.raises(FetchError, match=needle) as err:
        R.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "archive" and "\n" not in str(err.value)
    assert not (cache / "precomputed" / "mine").exists() and not list((cache / "precomputed").glob("*.unpacking"))


def test_damaged_markers_and_registries(published, tmp_path):
    registry, array, cache = published
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    (folder / ".fetched.json").write_text('{"sha2')  # damaged marker: unpacked again from the checked archive
    (folder / "images" / "embeddings-00000.npy").unlink()
    assert R.fetch("mine", registry=registry, root=cache, progress=False) == folder
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)
    for content in ("", '{"format": "asif-registry/1", "embeddings": {"mi', '["a list"]'):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(DataError, match="bad.json"):
            R.load_registry(tmp_path / "bad.json")


def test_verify_cache_sends_a_damaged_precomputed_set_back_to_its_archive(published):
    from asif.pipeline import verify_cache
    from test_storage import flip_in_place
    registry, array, cache = published
    folder = R.fetch("mine", registry=registry, root=cache, progress=False)
    flip_in_place(folder / "images" / "embeddings-00001.npy")
    report = {r["folder"].name: r for r in verify_cache(cache, progress=False)}
    assert report["images"]["damaged"] == ["embeddings-00001.npy"] and report["texts"]["damaged"] == []
    assert "asif fetch mine" in report["images"]["action"]
    R.fetch("mine", registry=registry, root=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)
