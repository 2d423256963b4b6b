"""Datasets, anchor sets, the registry's checked download, and the data commands.

Real data from the Debian packages where they are installed (skipped with the
package name otherwise); everything else is written by the tests; downloads
come from an HTTP server on 127.0.0.1 that the tests start, never the internet.
"""
import gzip
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import asif_cli
import asif_data as D
from asif_core import load_embedding_set, save_embedding_set

FM = D.FASHION_MNIST_DIR
needs_fashion_mnist = pytest.mark.skipif(not (FM / "train-images-idx3-ubyte.gz").exists(),
                                         reason="Debian package dataset-fashion-mnist not installed")
needs_clipart = pytest.mark.skipif(not D.OPENCLIPART_DIR.is_dir(),
                                   reason="Debian package openclipart-svg not installed")
needs_tuxpaint = pytest.mark.skipif(not D.TUXPAINT_DIR.is_dir(),
                                    reason="Debian package tuxpaint-stamps-default not installed")


# ---------------------------------------------------------------------------
# a local HTTP server with injectable faults
# ---------------------------------------------------------------------------

class Server:
    """Serves ``files`` {path: bytes} on 127.0.0.1 with Range support.
    ``mode``: ok | html | 404 | truncate (sends half, announces all) | corrupt."""

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
                    page = b"<!DOCTYPE html><html><body>Quota exceeded. Too many users have viewed or downloaded this file recently.</body></html>"
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
                if rng and rng.startswith("bytes="):
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
                    payload = payload[:len(payload) // 2]
                    self.wfile.write(payload)
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


# ---------------------------------------------------------------------------
# evaluation datasets
# ---------------------------------------------------------------------------

@needs_fashion_mnist
def test_idx_decoding_matches_file_bytes():
    raw = gzip.decompress((FM / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((FM / "t10k-labels-idx1-ubyte.gz").read_bytes())
    ds = D.load_dataset("fashion-mnist", split="test")
    assert len(ds) == 10000 and ds.labels.dtype == np.int64
    for i in (0, 123, 9999):
        pixels = np.frombuffer(raw, np.uint8, 784, 16 + 784 * i).reshape(28, 28)
        image = ds.images[i]
        assert image.mode == "RGB" and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image)[:, :, 0], pixels)
        assert ds.labels[i] == labels[8 + i]
    assert ds.classnames[9] == "ankle boot" and len(ds.templates) >= 3


@needs_fashion_mnist
def test_subset_is_seeded_and_smoke_env(monkeypatch):
    a = D.load_dataset("fashion-mnist", limit=300, seed=1)
    b = D.load_dataset("fashion-mnist", limit=300, seed=1)
    c = D.load_dataset("fashion-mnist", limit=300, seed=2)
    assert len(a) == 300 and a.ids == b.ids and a.ids != c.ids
    full = D.load_dataset("fashion-mnist")
    i = int(a.ids[17].rsplit("/", 1)[1])
    assert np.array_equal(np.asarray(a.images[17]), np.asarray(full.images[i])) and a.labels[17] == full.labels[i]
    assert a.identity != full.identity
    monkeypatch.setenv("ASIF_SMOKE", "1")
    assert len(D.load_dataset("fashion-mnist")) == D.SMOKE_SIZE
    prompts = a.prompts()
    T = len(a.templates)
    assert len(prompts) == 10 * T and prompts[T] == a.templates[0].replace("{c}", a.classnames[1])


def test_classnames_and_templates_files():
    assert len(D.load_templates("cifar100")) == 18 and len(D.load_templates("imagenet")) == 7
    assert len(D.load_templates("pets")) == 3
    assert len(D.load_classnames("cifar100")) == 100 and len(set(D.load_classnames("cifar100"))) == 100
    assert len(D.load_classnames("pets")) == 37 and len(D.load_classnames("cifar10")) == 10
    for name in ("cifar10", "cifar100", "imagenet", "pets", "fashion-mnist", "imagefolder"):
        assert all("{c}" in t for t in D.load_templates(name))


@needs_fashion_mnist
def test_fashion_mnist_public_source_when_package_absent(tmp_path, monkeypatch, server):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.files[f"/fm/{name}"] = (FM / name).read_bytes()
    monkeypatch.setenv("ASIF_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ASIF_FASHION_MNIST_URL", closed_port_url())
    with pytest.raises(D.OfflineError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")
    monkeypatch.setenv("ASIF_FASHION_MNIST_URL", server.url + "/fm/")
    ds = D.load_dataset("fashion-mnist", limit=5)
    assert len(ds) == 5 and (tmp_path / "cache" / "datasets" / "fashion-mnist").is_dir()
    server.files["/fm/t10k-labels-idx1-ubyte.gz"] = gzip.compress(b"\0\0\x08\x01" + b"\0\0\0\x01" + b"\x05")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(D.DataError, match="sha256"):
        D.load_dataset("fashion-mnist")


def test_torchvision_dataset_offline_error(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    monkeypatch.setattr(tvd.CIFAR10, "url", closed_port_url() + "cifar-10-python.tar.gz")
    with pytest.raises(D.OfflineError, match="network"):
        D.load_dataset("cifar10")


def make_folder(root: Path, classes, n):
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / cls / f"{i}.png")


def test_imagefolder_and_imagenet(tmp_path):
    make_folder(tmp_path / "f", ["golden_retriever", "tabby"], 3)
    ds = D.load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert ds.classnames == ["golden retriever", "tabby"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.asarray(D.load_image(ds.images[4]))[0, 0].tolist() == [40, 10, 0]
    make_folder(tmp_path / "val", ["n01440764", "n01443537"], 2)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    inet = D.load_dataset(f"imagenet:{tmp_path / 'val'}")
    assert inet.classnames == ["tench", "goldfish"] and len(inet.templates) == 7
    with pytest.raises(D.DataError, match="not a folder"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.load_dataset("mnist-but-wrong")


# ---------------------------------------------------------------------------
# anchor sets
# ---------------------------------------------------------------------------

@needs_clipart
def test_clipart_captions_and_rendering():
    bat = D.OPENCLIPART_DIR / "animals" / "bat_orlando_karam_.svg"
    if bat.exists():
        assert D.svg_caption(bat) == "bat. mammal, animal."
    a = D.load_anchor_set("clipart", limit=30)
    b = D.load_anchor_set("clipart", limit=30)
    assert len(a) == 30 and a.ids == b.ids and a.captions == b.captions
    assert len(set(p for p, _ in a.order)) == 1
    ok = 0
    for i in range(30):
        try:
            im = a.image(i)
        except D.DataError:
            continue
        ok += 1
        assert im.mode == "RGB" and max(im.size) == 224
    assert ok >= 25
    mali = D.OPENCLIPART_DIR / "signs_and_symbols" / "flags" / "africa" / "mali.svg"
    if mali.exists():  # uses a percentage opacity that cairosvg cannot parse
        with pytest.raises(D.DataError, match="cannot be rendered"):
            D.render_svg(mali)


@needs_tuxpaint
def test_tuxpaint_captions_and_translations():
    a = D.load_anchor_set("tuxpaint", limit=25)
    assert len(a) == 25
    for i in range(25):
        part, j = a.order[i]
        txt = a.parts[part].ids[j].split("|")[1].rsplit(":", 2)[0]
        first = (D.TUXPAINT_DIR / txt).read_text(encoding="utf-8").splitlines()[0].strip()
        assert a.captions[i] == first
    assert any("fr" in a.translations(i) for i in range(25))
    im = a.image(0)
    assert im.mode == "RGB"
    frog = D.TUXPAINT_DIR / "animals" / "amphibians" / "frog.txt"
    if frog.exists():
        english, others = D.read_tuxpaint_text(frog)
        assert english == "A frog." and others["fr"] == "Une grenouille."
    full = D.load_anchor_set("tuxpaint")
    assert any(s["reason"] == "no .txt description" for s in full.skipped)


@needs_clipart
@needs_tuxpaint
def test_combined_anchor_sets_order():
    both = D.load_anchor_set("clipart+tuxpaint")
    clip, tux = D.load_anchor_set("clipart"), D.load_anchor_set("tuxpaint")
    assert len(both) == len(clip) + len(tux)
    head = D.load_anchor_set("clipart+tuxpaint", limit=500)
    assert head.ids == both.ids[:500]
    assert 0 < (head.order[:, 0] == 1).sum() < 500, "both parts appear among the first anchors"
    assert D.load_anchor_set("clipart+tuxpaint", seed=3).ids[:50] != both.ids[:50]


@needs_fashion_mnist
def test_fashion_mnist_train_captions_from_labels():
    a = D.load_anchor_set("fashion-mnist-train", limit=200)
    ds = D.load_dataset("fashion-mnist", split="train")
    for i in range(200):
        j = int(a.ids[i].rsplit("/", 1)[1])
        phrase = D._FASHION_PHRASES[ds.labels[j]]
        assert phrase.split(" ", 1)[1] in a.captions[i].lower()
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(ds.images[j]))


def test_captions_csv_and_jsonl(tmp_path):
    make_folder(tmp_path / "img", ["x"], 3)
    (tmp_path / "a.csv").write_text("image_path,caption\nimg/x/0.png,first\nimg/x/1.png,\"second, with comma\"\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": str(tmp_path / "img/x/2.png"), "text": "third"}) + "\n")
    s = D.load_anchor_set(f"captions:{tmp_path / 'a.csv'}+captions:{tmp_path / 'b.jsonl'}")
    assert sorted(s.captions) == ["first", "second, with comma", "third"]
    i = s.captions.index("second, with comma")
    assert np.asarray(s.image(i))[0, 0].tolist() == [0, 10, 0]
    (tmp_path / "bad.csv").write_text("picture,words\na.png,b\n")
    with pytest.raises(D.DataError, match="image path"):
        D.load_anchor_set(f"captions:{tmp_path / 'bad.csv'}")


def test_webdataset_shards(tmp_path):
    expected = {}
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:05d}.tar", "w") as tar:
            for k in range(3):
                key = f"{s}{k:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (5, 5), (s * 100, k * 50, 7)).save(buf, "PNG" if k % 2 else "JPEG", quality=100)
                for name, data in ((f"{key}.{'png' if k % 2 else 'jpg'}", buf.getvalue()),
                                   (f"{key}.txt", f"caption {key}".encode()),
                                   (f"{key}.json", b"{}")):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
                expected[f"caption {key}"] = (s * 100, k * 50, 7)
            ti = tarfile.TarInfo("orphan.txt")
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
    s = D.load_anchor_set(f"webdataset:{tmp_path}/shard-{{00000..00001}}.tar")
    assert sorted(s.captions) == sorted(expected) and len(s.skipped) == 2
    for i, c in enumerate(s.captions):
        got = np.asarray(s.image(i))[2, 2].astype(int)
        assert np.abs(got - np.array(expected[c])).max() <= 3


# ---------------------------------------------------------------------------
# registry: publish and checked fetch
# ---------------------------------------------------------------------------

@pytest.fixture
def published(tmp_path, server):
    """An embedding set published as an archive and served; returns (registry path, original array, name)."""
    rng = np.random.default_rng(0)
    # 50 x 6000 float32 = 1.2 MB: more than gdown's 512 KB chunk, so half a transfer leaves bytes to resume
    array = rng.standard_normal((50, 6000)).astype(np.float32)
    save_embedding_set(tmp_path / "mine" / "images", array, {"encoder": {"encoder": "fake"}, "kind": "image"},
                       shard_rows=20)
    save_embedding_set(tmp_path / "mine" / "texts", array[:, :4], {"encoder": {"encoder": "fake-text"}},
                       captions=[f"c{i}" for i in range(50)])
    registry = tmp_path / "registry.json"
    entry = D.publish(tmp_path / "mine", name="mine", registry=registry, out=tmp_path / "out")
    again = D.publish(tmp_path / "mine", name="mine", registry=registry, out=tmp_path / "out2")
    assert again["sha256"] == entry["sha256"], "publishing is deterministic"
    assert entry["count"] == {"images": 50, "texts": 50} and entry["dims"] == {"images": 6000, "texts": 4}
    assert entry["encoders"] == ["fake", "fake-text"]
    server.files["/mine.tar"] = Path(entry["archive"]).read_bytes()
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"]["source"] = {"url": server.url + "/mine.tar"}
    registry.write_text(json.dumps(data))
    return registry, array, tmp_path / "cache"


def test_fetch_ok_and_cached(published, server):
    registry, array, cache = published
    folder = D.fetch("mine", registry=registry, root=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)
    assert load_embedding_set(folder / "texts").captions[3] == "c3"
    n = len(server.requests)
    assert D.fetch("mine", registry=registry, root=cache, progress=False) == folder
    assert len(server.requests) == n, "a fetched set is not downloaded again"


@pytest.mark.parametrize("mode,kind", [("html", "html"), ("404", "not_found"), ("corrupt", "checksum")])
def test_fetch_faults(published, server, mode, kind):
    registry, array, cache = published
    server.mode = mode
    with pytest.raises(D.FetchError) as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == kind
    assert not (cache / "precomputed" / "mine").exists() and not (cache / "downloads" / "mine.tar").exists()
    if mode in ("html", "corrupt"):
        rejected = list((cache / "downloads" / "rejected").iterdir())
        assert len(rejected) == 1, "the bad file is moved aside"
        assert str(rejected[0]) in str(err.value)
    server.mode = "ok"
    folder = D.fetch("mine", registry=registry, root=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images").array), array)


def test_fetch_truncated_then_resumed(published, server):
    registry, array, cache = published
    server.mode = "truncate"
    with pytest.raises(D.FetchError) as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "truncated" and "resume" in str(err.value)
    parts = list((cache / "downloads").glob("*.part"))
    assert parts and parts[0].stat().st_size > 0, "the partial file is kept"
    server.mode = "ok"
    server.requests.clear()
    folder = D.fetch("mine", registry=registry, root=cache, progress=False)
    assert any(r and not r.startswith("bytes=0-") for _, r in server.requests), "the download resumed"
    np.testing.assert_array_equal(np.asarray(load_embedding_set(folder / "images", verify=True).array), array)


def test_fetch_no_space(published, server, monkeypatch):
    registry, _, cache = published
    monkeypatch.setattr(D.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(D.FetchError) as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "no_space" and not server.requests
    monkeypatch.undo()
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(D, "_download", full)
    with pytest.raises(D.FetchError) as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "no_space"


def test_fetch_unknown_name_and_network(published, tmp_path):
    registry, _, cache = published
    with pytest.raises(D.DataError, match="no precomputed embeddings named"):
        D.fetch("nope", registry=registry, root=cache)
    data = json.loads(registry.read_text())
    data["embeddings"]["mine"]["source"] = {"url": closed_port_url() + "mine.tar"}
    registry.write_text(json.dumps(data))
    with pytest.raises(D.FetchError) as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "network"


def test_cli_fetch_and_publish(published, tmp_path, capsys):
    registry, array, cache = published
    assert asif_cli.main(["fetch", "mine", "--registry", str(registry), "--cache", str(cache), "--quiet"]) == 0
    assert "precomputed" in capsys.readouterr().out
    assert asif_cli.main(["publish", str(tmp_path / "mine" / "images"), "--name", "imgs", "--url", "http://x/y.tar",
                          "--registry", str(registry), "--out", str(tmp_path / "o")]) == 0
    entry = json.loads(registry.read_text())["embeddings"]["imgs"]
    assert entry["source"] == {"url": "http://x/y.tar"} and entry["count"] == {".": 50}
    assert asif_cli.main(["fetch", "missing", "--registry", str(registry), "--cache", str(cache)]) == 2
    assert "no precomputed embeddings named" in capsys.readouterr().err


def test_repo_registry_is_valid():
    data = json.loads((D.DATA_DIR / "registry.json").read_text())
    assert data["format"] == D.REGISTRY_FORMAT
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
    monkeypatch.setattr(D, "_download", refuse)
    with pytest.raises(D.FetchError, match="quota") as err:
        D.fetch("mine", registry=registry, root=cache, progress=False)
    assert err.value.kind == "html" and "Google Drive file 1AbCd" in str(err.value)
