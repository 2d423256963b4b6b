"""Evaluation datasets: Fashion-MNIST from its Debian package (or its public source), torchvision, folders.

Real data where the Debian packages are installed (skipped with the package
name otherwise); downloads come from a server on 127.0.0.1 that the tests
start, never the internet.
"""
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asif import datasets as D
from asif.config import DATA_DIR, SMOKE_SIZE
from asif.errors import ASIFInputError, DataError, OfflineError
from asif.images import load_image
from conftest import closed_port_url, needs, write_images

FM = D.FASHION_MNIST_DIR  # asif.debian's, imported there


@needs("dataset-fashion-mnist")
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


@needs("dataset-fashion-mnist")
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
    assert len(D.load_dataset("fashion-mnist")) == SMOKE_SIZE
    prompts = a.prompts()
    T = len(a.templates)
    assert len(prompts) == 10 * T and prompts[T] == D.fill_template(a.templates[0], a.classnames[1])


def test_fill_template_makes_the_article_agree():
    cases = {("a photo of a {c}.", "trousers"): "a photo of trousers.",
             ("a photo of a {c}.", "ankle boot"): "a photo of an ankle boot.",
             ("a photo of a {c}.", "t-shirt"): "a photo of a t-shirt.",
             ("A {c} on a table.", "apple"): "An apple on a table.",
             ("a photo of a {c}.", "unicycle"): "a photo of a unicycle.",
             ("a photo of a {c}.", "hourglass"): "a photo of an hourglass.",
             ("a photo of a {c}.", "dress"): "a photo of a dress.",
             ("a photo of a {c}.", "bus"): "a photo of a bus.",
             ("a photo of the {c}.", "trousers"): "a photo of the trousers.",
             ("itap of a {c}.", "sunglasses"): "itap of sunglasses.",
             ("{c}", " cat "): "cat"}
    for (template, name), prompt in cases.items():
        assert D.fill_template(template, name) == prompt
    # no prompt of the project's own templates reads "a trousers" or "a ankle boot"
    prompts = [D.fill_template(t, c) for c in D.load_classnames("fashion-mnist")
               for t in D.load_templates("fashion-mnist")]
    assert "a photo of trousers." in prompts and "a photo of an ankle boot." in prompts
    assert not [p for p in prompts if " a trousers" in p or " a ankle" in p]


def test_with_prompts_renames_classes_and_checks_them(tmp_path):
    for cls in ("cat_pics", "dog_pics"):
        write_images(tmp_path / "pets" / cls, 2)
    ds = D.load_dataset(f"imagefolder:{tmp_path / 'pets'}")
    assert ds.name == "imagefolder-pets" and ds.classnames == ["cat pics", "dog pics"]
    named = ds.with_prompts(["cat", "dog"], ["a drawing of a {c}."])
    assert named.prompts() == ["a drawing of a cat.", "a drawing of a dog."]
    assert named.identity == ds.identity and named.ids == ds.ids, "the images' cache keys stay"
    with pytest.raises(ASIFInputError, match="3 class names given for 2 classes"):
        ds.with_prompts(["a", "b", "c"])
    with pytest.raises(ASIFInputError, match="no {c} placeholder"):
        ds.with_prompts(templates=["a photo"])


def test_classnames_and_templates_files():
    assert len(D.load_templates("cifar100")) == 18 and len(D.load_templates("imagenet")) == 7
    assert len(D.load_templates("pets")) == 3
    assert len(D.load_classnames("cifar100")) == 100 and len(set(D.load_classnames("cifar100"))) == 100
    assert len(D.load_classnames("pets")) == 37 and len(D.load_classnames("cifar10")) == 10
    for name in ("cifar10", "cifar100", "imagenet", "pets", "fashion-mnist", "imagefolder"):
        assert all("{c}" in t for t in D.load_templates(name))


@needs("dataset-fashion-mnist")
def test_fashion_mnist_public_source_when_package_absent(tmp_path, monkeypatch, server):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.files[f"/fm/{name}"] = (FM / name).read_bytes()
    monkeypatch.setenv("ASIF_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ASIF_FASHION_MNIST_URL", closed_port_url())
    with pytest.raises(OfflineError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")
    monkeypatch.setenv("ASIF_FASHION_MNIST_URL", server.url + "/fm/")
    ds = D.load_dataset("fashion-mnist", limit=5)
    assert len(ds) == 5 and (tmp_path / "cache" / "datasets" / "fashion-mnist").is_dir()
    server.files["/fm/t10k-labels-idx1-ubyte.gz"] = gzip.compress(b"\0\0\x08\x01" + b"\0\0\0\x01" + b"\x05")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(DataError, match="sha256"):
        D.load_dataset("fashion-mnist")


def test_torchvision_dataset_offline_error(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    monkeypatch.setattr(tvd.CIFAR10, "url", closed_port_url() + "cifar-10-python.tar.gz")
    with pytest.raises(OfflineError, match="network"):
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
    assert np.asarray(load_image(ds.images[4]))[0, 0].tolist() == [40, 10, 0]
    make_folder(tmp_path / "val", ["n01440764", "n01443537"], 2)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    inet = D.load_dataset(f"imagenet:{tmp_path / 'val'}")
    assert inet.classnames == ["tench", "goldfish"] and len(inet.templates) == 7
    with pytest.raises(DataError, match="not a folder"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown dataset"):
        D.load_dataset("mnist-but-wrong")


def test_file_and_folder_names_that_are_not_utf8(tmp_path, fake_encoders):
    """A Latin-1 name in an image folder: listed, hashed and cached like any other, shown as \\xNN."""
    from asif.cache import load_eval_embeddings
    root = tmp_path / "f"
    make_folder(root, ["cat"], 2)
    odd = os.fsdecode(b"caf\xe9")  # a class folder and a file whose bytes are not UTF-8
    (root / odd).mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / odd / os.fsdecode(b"cr\xe8me.png"))
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "cat" / os.fsdecode(b"\xff.png"))
    ds = D.load_dataset(f"imagefolder:{root}")
    assert ds.classnames == ["caf\\xe9", "cat"] and ds.labels.tolist() == [0, 1, 1, 1]
    assert ds.ids[0].startswith("caf\\xe9/cr\\xe8me.png:") and all(i.encode("utf-8") for i in ds.ids)
    img, txt = fake_encoders
    e = load_eval_embeddings(f"imagefolder:{root}", img, txt, root=tmp_path / "cache", progress=False)
    assert e.images.shape == (4, 13) and e.dropped == []
    np.testing.assert_allclose(e.images[0], img.vector(root / odd / os.fsdecode(b"cr\xe8me.png")), rtol=1e-6)


def test_torchvision_images_go_through_the_one_decoder(tmp_path):
    """Pets opens its files with convert("RGB") (transparency onto black): its file list is used instead."""
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: white through the one decoder, black through convert("RGB")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "pet.png")

    class Pets:  # what torchvision's OxfordIIITPet holds
        _images = [tmp_path / "pet.png"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return Image.open(self._images[i]).convert("RGB"), 0
    assert np.asarray(Pets()[0][0])[0, 0].tolist() == [255, 0, 0], "what torchvision itself would give"
    assert np.asarray(load_image(D.torchvision_images(Pets())[0]))[0, 0].tolist() == [255, 255, 255]

    class Cifar:
        data = np.full((2, 4, 4, 3), 7, dtype=np.uint8)
    assert np.asarray(D.torchvision_images(Cifar())[1])[0, 0].tolist() == [7, 7, 7]


@needs("tuxpaint-stamps-default")
def test_tuxpaint_photos_are_labelled_by_folder():
    ds = D.load_dataset("tuxpaint-photos")
    assert len(ds.classnames) == len(set(ds.classnames)) >= 15 and len(ds) >= 300
    counts = np.bincount(ds.labels, minlength=len(ds.classnames))
    assert counts.min() >= 8, "every category has at least 8 stamps"
    assert ds.majority_rate == counts.max() / len(ds)
    for i in (0, len(ds) // 2, len(ds) - 1):
        key = ds.keys[i].removeprefix("tuxpaint:")
        assert "cartoon" not in key and not key.startswith("symbols/")
        folder = "/".join(key.split("/")[:-1][:2])
        table = {k: v for k, v in json.loads((DATA_DIR / "classnames.json").read_text())["tuxpaint-photos"].items()}
        assert ds.classnames[ds.labels[i]] == table[folder]
    assert all("{c}" in t for t in ds.templates)
    small = D.load_dataset("tuxpaint-photos", limit=20)
    assert len(small) == 20 and small.keys == ds.keys, "a subset keeps the keys of the whole set"


@needs("openclipart-svg")
def test_clipart_objects_render_drawings_of_things():
    ds = D.load_dataset("clipart-objects", limit=6)
    assert "mammal" in ds.classnames and "vehicle" in ds.classnames
    im = load_image(ds.images[0])
    assert im.mode == "RGB" and max(im.size) == 224
    assert all(k.startswith("clipart:") and k.endswith(".svg") for k in ds.keys)
