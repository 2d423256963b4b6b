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
