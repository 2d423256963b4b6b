"""Ray: the anchors embedded and the sweep run on a real local Ray cluster give what one process gives."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

import asif_core as ac
from asif import cache as C
from asif.cli import main
from asif.errors import ASIFInputError, DataError
from asif.synthetic import synthetic_coupled_data
from conftest import FakeEncoder, write_images

try:
    import ray
except ImportError:  # the default install is Ray-free; `bash run.sh test` installs the extra and sets this
    if os.environ.get("ASIF_REQUIRE_RAY"):
        raise
    pytest.skip('Ray is an optional extra: pip install -e ".[ray]"', allow_module_level=True)

from asif import distributed as D  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A real Ray instance on this machine: 2 CPUs, as small an object store as Ray allows."""
    import conftest
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             logging_level="ERROR")
    # the test encoders live in tests/ (not importable on a worker): ship them by value
    ray.cloudpickle.register_pickle_by_value(conftest)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


# --- the merge, against a brute-force reference (no cluster needed)

def test_merge_tops_is_the_top_k_of_the_union_with_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    q, k = 40, 9
    # values on a coarse grid: many ties, also at the k-th place
    sims = np.round(rng.random((q, 60)) * 6) / 6
    bounds = [0, 7, 8, 30, 60]
    parts = []
    for s, e in zip(bounds, bounds[1:]):
        block = sims[:, s:e]
        # each part as the stream gives it: its own top-k, ties to the lower index, in anchor order
        order = np.sort(np.argsort(-block, axis=1, kind="stable")[:, :k], axis=1)
        parts.append((np.take_along_axis(block, order, 1), order + s))
    v, i = D.merge_tops(parts, k)
    for r in range(q):
        ref = sorted(range(60), key=lambda a: (-sims[r, a], a))[:k]
        assert i[r].tolist() == sorted(ref)
        np.testing.assert_array_equal(v[r], sims[r, sorted(ref)])


def test_plan_cuts_the_anchors_and_snapshots_every_count_inside_a_shard():
    plan = D._plan([5, 10, 33, 100], 3)
    assert [(s, e) for s, e, _ in plan] == [(0, 33), (33, 67), (67, 100)]
    assert plan[0][2] == [5, 10, 33] and plan[1][2] == [34] and plan[2][2] == [33]
    assert len(D._plan([3], 10)) == 3  # never more shards than anchors


# --- the sweep

@pytest.mark.parametrize("shards,counts,k", [(3, [40, 333, 500, 1000, 2500], 100), (7, [2500], 300), (1, None, 50)])
def test_ray_sweep_equals_the_one_machine_sweep(cluster, shards, counts, k):
    d = synthetic_coupled_data(n_anchors=2500, n_classes=8, n_images=150, noise=1.2, seed=4)
    args = (d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 8)
    kw = dict(anchor_counts=counts, exponents=[8, 1], non_zeros=k, return_scores=True)
    one = ac.sweep(*args, device="cpu", **kw)
    # k=300 with 7 shards: a shard of ~357 anchors holds fewer than k above some counts' prefixes
    spread = D.sweep(*args, shards=shards, cpus_per_worker=1, **kw)
    assert [(r["n_anchors"], r["exponent"]) for r in spread] == [(r["n_anchors"], r["exponent"]) for r in one]
    for a, b in zip(one, spread):
        np.testing.assert_array_equal(a["scores"], b["scores"])  # the same numbers, not just close
        for m in ("acc1", "acc5", "mean_per_class_recall"):
            assert a[m] == b[m]


def test_ray_sweep_reads_npy_anchors_by_path_and_names_bad_rows_globally(cluster, tmp_path):
    d = synthetic_coupled_data(n_anchors=1200, n_classes=5, n_images=60, noise=1.0, seed=2)
    np.save(tmp_path / "ai.npy", d["anchor_images"])
    np.save(tmp_path / "at.npy", d["anchor_texts"])
    ai, at = np.load(tmp_path / "ai.npy", mmap_mode="r"), np.load(tmp_path / "at.npy", mmap_mode="r")
    assert D._npy_source(ai) == str(tmp_path / "ai.npy")
    assert D._npy_source(ai[10:]) is None  # a view is shipped, never mistaken for the whole file
    args = (d["images"], d["labels"], d["prompts"], 5)
    kw = dict(anchor_counts=[300, 1200], non_zeros=64, return_scores=True, centre=True)  # centres from the driver
    one = ac.sweep(ai, at, *args, device="cpu", **kw)
    spread = D.sweep(ai, at, *args, shards=4, cpus_per_worker=1, **kw)
    for a, b in zip(one, spread):
        np.testing.assert_array_equal(a["scores"], b["scores"])
    bad = np.array(d["anchor_texts"])
    bad[1000] = np.nan  # in the last shard: the error names the row of the whole set
    with pytest.raises(ASIFInputError, match="anchor_texts: row 1000 holds NaN"):
        D.sweep(d["anchor_images"], bad, *args, shards=4, cpus_per_worker=1, **kw)


def test_cli_sweep_on_ray_writes_the_same_json(cluster, tmp_path, capsys):
    d = synthetic_coupled_data(n_anchors=900, n_classes=6, n_images=80, noise=1.0, seed=5)
    files = {}
    for key in ("anchor_images", "anchor_texts", "images", "labels", "prompts"):
        files[key] = str(tmp_path / f"{key}.npy")
        np.save(files[key], d[key])
    common = ["sweep", "--anchor-images", files["anchor_images"], "--anchor-texts", files["anchor_texts"],
              "--images", files["images"], "--labels", files["labels"], "--prompts", files["prompts"],
              "--n-classes", "6", "--non-zeros", "50", "--anchor-counts", "100", "450", "900",
              "--exponents", "8", "3", "--quiet", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "one.json")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray.json"), "--engine", "ray", "--shards", "3",
                          "--cpus-per-worker", "1"]) == 0
    one, spread = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ray"))
    assert spread["params"]["engine"] == "ray" and one["params"]["engine"] == "local"
    assert spread["results"] == one["results"] and spread["metrics"] == one["metrics"]


# --- embedding anchors

def _images(tmp_path, n):
    paths = write_images(tmp_path / "img", n, size=(40, 30))
    return paths, [p.name for p in paths]


@pytest.fixture
def one_thread():
    """This process computes with one thread, as the 1-CPU workers do: torch's sums follow the thread
    count for some shapes (two MiniLM texts differ by 8e-8 between 1 and 2 threads), so byte-for-byte
    equality holds at equal thread counts."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_embedding_writes_the_local_folder_byte_for_byte_with_the_real_encoders(cluster, tmp_path, one_thread):
    from asif.encoders import lazy_image_encoder, lazy_text_encoder
    paths, ids = _images(tmp_path, 20)
    texts = [f"a photo of item {i}" for i in range(26)]
    for kind, items, item_ids, make in (("image", paths, ids, lazy_image_encoder),
                                        ("text", texts, [str(i) for i in range(26)], lazy_text_encoder)):
        sets = []
        for root, engine in ((tmp_path / "local", None), (tmp_path / "ray", D.RayEngine(cpus_per_worker=1))):
            sets.append(C.embed_cached(make(), items, kind=kind, dataset={"d": kind}, ids=item_ids, name=kind,
                                       root=root, shard_rows=8, progress=False, engine=engine))
        local, spread = sets
        assert len(local.manifest["shards"]) >= 3
        assert spread.folder.name == local.folder.name  # the same cache key: either serves the other
        for shard in local.manifest["shards"]:  # byte for byte, not merely close
            assert (spread.folder / shard["file"]).read_bytes() == (local.folder / shard["file"]).read_bytes()
        assert spread.manifest["shards"] == local.manifest["shards"]


def _name(image) -> str:
    """The file name write_images gave the image of this colour."""
    r, g, b = image.convert("RGB").getpixel((0, 0))
    return next(f"img{i:03d}.png" for i in range(256) if ((37 * i) % 256, (91 * i) % 256, (13 * i + 7) % 256) == (r, g, b))


class KillOnce(FakeEncoder):
    """A FakeEncoder that logs what it encodes and, once, kills the process it runs in."""

    def __init__(self, log: Path, trigger: Path, victim: str):
        super().__init__("image")
        self.log, self.trigger, self.victim = str(log), str(trigger), victim

    def encode(self, items, batch_size=64, progress=False):
        names = [_name(x) for x in items]  # the decoded images arrive, named back by their colour
        if self.victim in names and os.path.exists(self.trigger):
            os.unlink(self.trigger)
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-shard, as an OOM kill would do it
        with open(self.log, "a") as f:
            f.write("".join(n + "\n" for n in names))
        return super().encode(items, batch_size, progress)


def test_a_killed_worker_costs_only_its_shard_and_the_result_is_unchanged(cluster, tmp_path):
    paths, ids = _images(tmp_path, 40)
    log, trigger = tmp_path / "encoded.log", tmp_path / "kill-once"
    trigger.touch()
    enc = KillOnce(log, trigger, victim="img021.png")  # in shard 2 (rows 16..23)
    spread = C.embed_cached(enc, paths, kind="image", dataset={"d": "k"}, ids=ids, name="k", root=tmp_path / "ray",
                            shard_rows=8, progress=False, engine=D.RayEngine(cpus_per_worker=1))
    assert not trigger.exists(), "the worker was never killed: the test tests nothing"
    local = C.embed_cached(FakeEncoder("image"), paths, kind="image", dataset={"d": "k"}, ids=ids, name="k",
                           root=tmp_path / "local", shard_rows=8, progress=False)
    np.testing.assert_array_equal(np.asarray(spread.array), np.asarray(local.array))
    counts = {}
    for name in log.read_text().split():
        counts[name] = counts.get(name, 0) + 1
    assert sorted(counts) == sorted(ids)
    assert all(counts[i] == 1 for i in ids), "no shard is encoded twice (the killed one never finished its log)"


class FailOn(FakeEncoder):
    def __init__(self, victim: str):
        super().__init__("image")
        self.victim = victim

    def encode(self, items, batch_size=64, progress=False):
        if any(_name(x) == self.victim for x in items):
            raise DataError(f"{self.victim}: cannot be encoded")
        return super().encode(items, batch_size, progress)


def test_a_failed_ray_run_keeps_finished_shards_and_a_rerun_does_only_the_rest(cluster, tmp_path):
    paths, ids = _images(tmp_path, 40)
    kw = dict(kind="image", dataset={"d": "f"}, ids=ids, name="f", root=tmp_path, shard_rows=8, progress=False,
              engine=D.RayEngine(cpus_per_worker=1))
    with pytest.raises(DataError, match="1 of 5 shards failed .shard 4: DataError: img033.png: cannot be "
                                        "encoded.*a rerun does only the rest"):
        C.embed_cached(FailOn("img033.png"), paths, **kw)
    folder = next((tmp_path / "embeddings" / "f").iterdir())
    assert not (folder / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("embeddings-*.npy")}
    assert sorted(kept) == [f"embeddings-{i:05d}.npy" for i in range(4)], "every shard but the failed one is kept"
    enc = FakeEncoder("image")
    done = C.embed_cached(enc, paths, **kw)
    assert enc.rows == 0  # the driver's copy never encodes: the workers do
    for name, mtime in kept.items():  # what finished before the failure is read back, not recomputed
        assert (folder / name).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(np.asarray(done.array), np.stack([enc.vector(p) for p in paths]).astype(np.float32))


def test_cli_embed_anchors_on_ray_equals_local(cluster, tmp_path, monkeypatch, capsys, one_thread):
    paths, _ = _images(tmp_path, 12)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image_path,caption\n" + "".join(f"{p},a picture number {i}\n" for i, p in enumerate(paths)))
    out = {}
    for engine in ("local", "ray"):
        monkeypatch.setenv("ASIF_CACHE", str(tmp_path / f"cache-{engine}"))
        assert main(["embed-anchors", "--anchors", f"captions:{csv}", "--engine", engine, "--quiet",
                     "--out", str(tmp_path / engine)]) == 0
        assert f"12 anchor pairs of captions:{csv} embedded ({engine})" in capsys.readouterr().out
        out[engine] = tmp_path / engine
    from asif.storage import load_embedding_set
    for side in ("images", "texts"):
        a, b = (load_embedding_set(out[e] / side) for e in ("local", "ray"))
        np.testing.assert_array_equal(np.asarray(a.array), np.asarray(b.array))
        assert a.manifest["shards"] == b.manifest["shards"]


def test_the_default_install_never_imports_ray():
    import subprocess
    code = ("import sys, numpy as np, asif, asif_core as ac, asif.cli, asif.cache, asif.pipeline\n"
            "asif.cli.build_parser()\n"
            "x = np.eye(4, dtype=np.float32)\n"
            "ac.sweep(x, x, x, np.arange(4), x, 4, non_zeros=2)\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_actors_only_for_an_encoder_that_computes_on_cuda():
    from types import SimpleNamespace
    from asif.encoders import LazyEncoder
    assert not D._on_cuda(FakeEncoder("image"))
    assert D._on_cuda(SimpleNamespace(device="cuda:0", identity={}))
    assert not D._on_cuda(SimpleNamespace(device="cpu", identity={"dtype": "float16"}))

    def never():
        raise AssertionError("asking where it runs must not load the weights")
    assert D._on_cuda(LazyEncoder("x", {"dtype": "float16"}, 4, never))
    assert not D._on_cuda(LazyEncoder("x", {"dtype": "float32"}, 4, never))


def test_webdataset_anchors_embedded_on_ray_equal_local(cluster, tmp_path):
    """Tar shards (as img2dataset writes them): the workers read the images by offset from the shards."""
    import io
    import tarfile
    from PIL import Image
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:05d}.tar", "w") as tar:
            for k in range(9):
                buf = io.BytesIO()
                Image.new("RGB", (8, 6), (s * 90 + k, k * 25, 11)).save(buf, "PNG")
                for name, data in ((f"{s}{k:04d}.png", buf.getvalue()), (f"{s}{k:04d}.txt", f"thing {s} {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = f"webdataset:{tmp_path}/shard-{{00000..00001}}.tar"
    got = {}
    for engine in (None, D.RayEngine(cpus_per_worker=1)):
        got[engine is None] = C.load_anchor_embeddings(source, FakeEncoder("image"), FakeEncoder("text"),
                                                       root=tmp_path / f"cache-{engine is None}", progress=False,
                                                       engine=engine)
    local, spread = got[True], got[False]
    assert len(local) == 18 and spread.captions == local.captions
    np.testing.assert_array_equal(spread.A_img, local.A_img)
    np.testing.assert_array_equal(spread.A_txt, local.A_txt)
