"""Shared test fixtures: the fake encoder, a local HTTP server with faults, tiny coupled data.

Tests run on the CPU and offline, against the installed package (``pip
install -e .``): no path is added here.
"""
import hashlib
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

TESTS = Path(__file__).resolve().parent
DEBIAN_DATA = {
    "dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    "openclipart-svg": Path("/usr/share/openclipart/svg"),
    "tuxpaint-stamps-default": Path("/usr/share/tuxpaint/stamps"),
}


def needs(package: str):
    """Skip unless the Debian data package is installed (the skip names the package to install)."""
    return pytest.mark.skipif(not DEBIAN_DATA[package].exists(),
                              reason=f"Debian package {package} not installed (apt-get install {package})")


@pytest.fixture(autouse=True)
def _full_size_data(monkeypatch):
    # `bash run.sh test` sets ASIF_SMOKE for the notebooks; unit tests choose
    # their own sizes and set it themselves where they test it.
    monkeypatch.delenv("ASIF_SMOKE", raising=False)


class FakeEncoder:
    """A deterministic stand-in for an image or text encoder, with the same attributes.

    text -> a vector from its sha256; image -> its 2x2 mean colours (12
    values) plus a constant. ``rows`` counts what it encoded; ``delay`` slows
    each call (to kill a run mid-way).
    """

    def __init__(self, kind="image", weights="v1", preprocessing="2x2-mean", delay=0.0):
        self.name = f"fake-{kind}"
        self.dim = 13 if kind == "image" else 16
        self.identity = {"encoder": self.name, "weights": weights, "preprocessing": preprocessing}
        self.delay, self.rows = delay, 0

    def vector(self, x):
        if isinstance(x, str):
            v = np.frombuffer(hashlib.sha256(x.encode()).digest()[:16], dtype=np.uint8).astype(np.float32) + 1
        else:
            from asif.images import load_image
            v = np.append(np.asarray(load_image(x).resize((2, 2)), dtype=np.float32).ravel(), 1.0)
        return v / np.linalg.norm(v)

    def encode(self, items, batch_size=64, progress=False):
        time.sleep(self.delay)
        self.rows += len(items)
        return np.stack([self.vector(x) for x in items]).astype(np.float32)


@pytest.fixture
def fake_encoders():
    """(image encoder, text encoder), fresh per test."""
    return FakeEncoder("image"), FakeEncoder("text")


@pytest.fixture
def tiny():
    """Coupled synthetic data in float64: 97 anchors, 4 classes x 3 templates, 23 images."""
    from asif.synthetic import synthetic_coupled_data
    return synthetic_coupled_data(n_anchors=97, n_classes=4, n_templates=3, n_images=23,
                                  image_dim=12, text_dim=7, latent_dim=5, noise=1.5, seed=3, dtype=np.float64)


def write_images(folder: Path, n: int, size=(6, 5)):
    """``n`` small PNGs of distinct colours; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (13 * i + 7) % 256)).save(p)
        paths.append(p)
    return paths


class Server:
    """Serves ``files`` {path: bytes} on 127.0.0.1 with Range support.

    ``mode``: ok | html (a Drive quota page) | 404 | truncate (sends half,
    announces all) | corrupt (first bytes flipped) | norange (ignores Range:
    always the whole file, status 200).
    """

    def __init__(self):
        self.files, self.mode, self.requests = {}, "ok", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None or server.mode == "404":
                    self.send_error(404)
                    return
                if server.mode == "html":
                    page = (b"<!DOCTYPE html><html><body>Quota exceeded. Too many users have viewed or "
                            b"downloaded this file recently.</body></html>")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if server.mode == "corrupt":
                    body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and server.mode != "norange":
                    start, status = int(rng[6:].split("-")[0]), 206
                self.send_response(status)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", '"v1"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.mode == "truncate":
                    self.wfile.write(payload[:len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def published(tmp_path, server):
    """An embedding set published as an archive and served; returns (registry path, original array, cache)."""
    from asif.registry import publish
    from asif.storage import save_embedding_set
    rng = np.random.default_rng(0)
    # 50 x 6000 float32 = 1.2 MB: more than gdown's 512 KB chunk, so half a transfer leaves bytes to resume
    array = rng.standard_normal((50, 6000)).astype(np.float32)
    save_embedding_set(tmp_path / "mine" / "images", array, {"encoder": {"encoder": "fake"}, "kind": "image"},
                       shard_rows=20)
    save_embedding_set(tmp_path / "mine" / "texts", array[:, :4], {"encoder": {"encoder": "fake-text"}},
                       captions=[f"c{i}" for i in range(50)])
    registry = tmp_path / "registry.json"
    entry = publish(tmp_path / "mine", name="mine", registry=registry, out=tmp_path / "out")
    again = publish(tmp_path / "mine", name="mine", registry=registry, out=tmp_path / "out2")
    assert again["sha256"] == entry["sha256"], "publishing is deterministic"
    assert entry["count"] == {"images": 50, "texts": 50} and entry["dims"] == {"images": 6000, "texts": 4}
    assert entry["encoders"] == ["fake", "fake-text"]
    server.files["/mine.tar"] = Path(entry["archive"]).read_bytes()
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"]["source"] = {"url": server.url + "/mine.tar"}
    registry.write_text(json.dumps(data))
    return registry, array, tmp_path / "cache"


class _FullFile:
    """A file object whose writes fail with ENOSPC once ``room`` bytes are written: a full disk."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(room)``: from now on, files that asif.storage writes hit a full disk after
    ``room`` bytes, and the disk reports that little free space."""
    import shutil
    from asif import storage

    def fill(room: int = 0):
        real = os.fdopen
        monkeypatch.setattr(storage.os, "fdopen", lambda fd, *a, **k: _FullFile(real(fd, *a, **k), room))
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - room, room))
    return fill


@pytest.fixture(params=["compiled", "torch"])
def selection_way(request, monkeypatch):
    """The running top-k two ways on the CPU: the compiled kernel, and the torch selection a GPU uses."""
    import asif_core
    monkeypatch.setattr(asif_core, "COMPILED_SELECTION", request.param == "compiled")
    return request.param
