"""Coupled anchor sources: captions, rendering, order, user files and webdataset shards."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from asif import anchors as A
from asif import datasets, debian
from asif.errors import DataError
from asif.images import render_svg
from conftest import needs
from test_datasets import make_folder


@needs("openclipart-svg")
def test_clipart_captions_and_rendering():
    bat = debian.OPENCLIPART_DIR / "animals" / "bat_orlando_karam_.svg"
    if bat.exists():
        assert A.svg_caption(bat) == "bat. mammal, animal."
    a = A.load_anchor_set("clipart", limit=30)
    b = A.load_anchor_set("clipart", limit=30)
    assert len(a) == 30 and a.ids == b.ids and a.captions == b.captions
    assert len(set(p for p, _ in a.order)) == 1
    ok = 0
    for i in range(30):
        try:
            im = a.image(i)
        except DataError:
            continue
        ok += 1
        assert im.mode == "RGB" and max(im.size) == 224
    assert ok >= 25
    mali = debian.OPENCLIPART_DIR / "signs_and_symbols" / "flags" / "africa" / "mali.svg"
    if mali.exists():  # uses a percentage opacity that cairosvg cannot parse
        with pytest.raises(DataError, match="cannot be rendered"):
            render_svg(mali)


@needs("tuxpaint-stamps-default")
def test_tuxpaint_captions_and_translations():
    a = A.load_anchor_set("tuxpaint", limit=25)
    assert len(a) == 25
    for i in range(25):
        part, j = a.order[i]
        txt = a.parts[part].ids[j].split("|")[1].rsplit(":", 2)[0]
        first = (debian.TUXPAINT_DIR / txt).read_text(encoding="utf-8").splitlines()[0].strip()
        assert a.captions[i] == first
    assert any("fr" in a.translations(i) for i in range(25))
    im = a.image(0)
    assert im.mode == "RGB"
    frog = debian.TUXPAINT_DIR / "animals" / "amphibians" / "frog.txt"
    if frog.exists():
        english, others = A.read_tuxpaint_text(frog)
        assert english == "A frog." and others["fr"] == "Une grenouille."
    full = A.load_anchor_set("tuxpaint")
    assert any(s["reason"] == "no .txt description" for s in full.skipped)


@needs("openclipart-svg")
@needs("tuxpaint-stamps-default")
def test_combined_anchor_sets_order():
    both = A.load_anchor_set("clipart+tuxpaint")
    clip, tux = A.load_anchor_set("clipart"), A.load_anchor_set("tuxpaint")
    assert len(both) == len(clip) + len(tux)
    head = A.load_anchor_set("clipart+tuxpaint", limit=500)
    assert head.ids == both.ids[:500]
    assert 0 < (head.order[:, 0] == 1).sum() < 500, "both parts appear among the first anchors"
    assert A.load_anchor_set("clipart+tuxpaint", seed=3).ids[:50] != both.ids[:50]


@needs("dataset-fashion-mnist")
def test_fashion_mnist_train_captions_from_labels():
    a = A.load_anchor_set("fashion-mnist-train", limit=200)
    ds = datasets.load_dataset("fashion-mnist", split="train")
    for i in range(200):
        j = int(a.ids[i].rsplit("/", 1)[1])
        phrase = A._FASHION_PHRASES[ds.labels[j]]
        assert phrase.split(" ", 1)[1] in a.captions[i].lower()
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(ds.images[j]))


def test_captions_csv_and_jsonl(tmp_path):
    make_folder(tmp_path / "img", ["x"], 3)
    (tmp_path / "a.csv").write_text("image_path,caption\nimg/x/0.png,first\nimg/x/1.png,\"second, with comma\"\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": str(tmp_path / "img/x/2.png"), "text": "third"}) + "\n")
    s = A.load_anchor_set(f"captions:{tmp_path / 'a.csv'}+captions:{tmp_path / 'b.jsonl'}")
    assert sorted(s.captions) == ["first", "second, with comma", "third"]
    i = s.captions.index("second, with comma")
    assert np.asarray(s.image(i))[0, 0].tolist() == [0, 10, 0]
    (tmp_path / "bad.csv").write_text("picture,words\na.png,b\n")
    with pytest.raises(DataError, match="image path"):
        A.load_anchor_set(f"captions:{tmp_path / 'bad.csv'}")


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
    s = A.load_anchor_set(f"webdataset:{tmp_path}/shard-{{00000..00001}}.tar")
    assert sorted(s.captions) == sorted(expected) and len(s.skipped) == 2
    for i, c in enumerate(s.captions):
        got = np.asarray(s.image(i))[2, 2].astype(int)
        assert np.abs(got - np.array(expected[c])).max() <= 3


# --- faults in user files: each one line naming the file, or a skipped pair with its reason

def test_csv_with_a_byte_order_mark_and_other_encodings(tmp_path):
    make_folder(tmp_path / "img", ["x"], 2)
    body = "image_path,caption\nimg/x/0.png,caf\u00e9 au lait\nimg/x/1.png,cr\u00e8me\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # as Excel saves "CSV UTF-8"
    assert sorted(A.load_anchor_set(f"captions:{tmp_path / 'bom.csv'}").captions) == ["caf\u00e9 au lait", "cr\u00e8me"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"image": "img/x/0.png", "caption": "a"}\n')
    assert A.load_anchor_set(f"captions:{tmp_path / 'bom.jsonl'}").captions == ["a"]
    for name, data in (("latin.csv", body.encode("latin-1")), ("utf16.csv", body.encode("utf-16")),
                       ("latin.jsonl", '{"image": "img/x/0.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"captions:.*{name}: not UTF-8 text .*line"):
            A.load_anchor_set(f"captions:{tmp_path / name}")


@pytest.mark.parametrize("line,needle", [
    ('["img/x/0.png", "a caption"]', "line 2 is a JSON list, not an object"),
    ('"just a string"', "line 2 is a JSON str, not an object"),
    ("42", "line 2 is a JSON int, not an object"),
    ("null", "line 2 is a JSON NoneType, not an object"),
    ('{"image": "img/x/0.png", "caption": "a"', "line 2 is not JSON"),
])
def test_jsonl_lines_that_are_not_objects(tmp_path, line, needle):
    make_folder(tmp_path / "img", ["x"], 1)
    (tmp_path / "a.jsonl").write_text('{"image": "img/x/0.png", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=needle):
        A.load_anchor_set(f"captions:{tmp_path / 'a.jsonl'}")


def test_missing_or_null_captions_are_skipped_with_the_reason_never_none(tmp_path):
    make_folder(tmp_path / "img", ["x"], 8)
    rows = [{"image": "img/x/0.png", "caption": "kept"}, {"image": "img/x/1.png", "caption": None},
            {"image": "img/x/2.png"}, {"image": "img/x/3.png", "caption": "   "},
            {"image": "img/x/4.png", "caption": ["a", "list"]}, {"image": None, "caption": "no image"},
            {"image": "img/x/6.png", "caption": 7}, {"image": "img/x/7.png", "caption": True}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = A.load_anchor_set(f"captions:{tmp_path / 'a.jsonl'}")
    assert sorted(s.captions) == ["7", "kept"] and "None" not in s.captions
    assert [(x["id"], x["reason"]) for x in s.skipped] == [
        ("a.jsonl:2", "caption missing (null)"), ("a.jsonl:3", "caption missing (null)"), ("a.jsonl:4", "caption empty"),
        ("a.jsonl:5", "caption a JSON list, not text"), ("a.jsonl:6", "image path missing (null)"),
        ("a.jsonl:8", "caption a JSON bool, not text")]
    # a CSV row shorter than its header has no caption either
    (tmp_path / "short.csv").write_text("image,caption\nimg/x/0.png,kept\nimg/x/1.png\nimg/x/2.png,\n")
    s = A.load_anchor_set(f"captions:{tmp_path / 'short.csv'}")
    assert s.captions == ["kept"] and [x["reason"] for x in s.skipped] == ["caption missing (null)", "caption empty"]
    (tmp_path / "none.csv").write_text("image,caption\nimg/x/0.png,\nimg/x/1.png,\n")
    with pytest.raises(DataError, match="none of its 2 rows has both an image path and a caption"):
        A.load_anchor_set(f"captions:{tmp_path / 'none.csv'}")


def test_captions_file_faults_are_named(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("image,caption\n")
    (tmp_path / "nul.csv").write_bytes(b"image,caption\na.png,b\x00c\n")
    (tmp_path / "adir.csv").mkdir()
    for name, needle in (("empty.csv", "no rows"), ("header.csv", "no rows"), ("adir.csv", "is a directory"),
                         ("missing.csv", "file not found")):
        with pytest.raises(DataError, match=f"{name}: {needle}"):
            A.load_anchor_set(f"captions:{tmp_path / name}")
    try:  # csv refuses NUL bytes on some Python versions: then one named line, never a traceback
        s = A.load_anchor_set(f"captions:{tmp_path / 'nul.csv'}")
        assert s.captions == ["b\x00c"]
    except DataError as e:
        assert "nul.csv: line 2 is not valid CSV" in str(e)


def write_shard(path, pairs, compress=False):
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for key, image, text in pairs:
            for name, data in ((f"{key}.png", image), (f"{key}.txt", text)):
                if data is None:
                    continue
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def png_bytes(colour=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), colour).save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_shard_faults_name_the_shard(tmp_path):
    good = [("a", png_bytes(), b"a caption"), ("b", png_bytes((9, 9, 9)), b"another caption")]
    write_shard(tmp_path / "ok.tar", good)
    whole = (tmp_path / "ok.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:700])        # cut inside the first member
    (tmp_path / "cut2.tar").write_bytes(whole[:1600])      # cut inside the second pair
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_text("not a tar at all\n" * 40)
    write_shard(tmp_path / "zipped.tar", good, compress=True)
    (tmp_path / "adir.tar").mkdir()
    for name, needle in (("cut.tar", "truncated|not a readable"), ("cut2.tar", "truncated|not a readable"),
                         ("empty.tar", "not a readable"), ("text.tar", "not a readable"),
                         ("zipped.tar", "not a readable uncompressed tar.*gunzip"), ("adir.tar", "not a file")):
        with pytest.raises(DataError, match=rf"shard {tmp_path / name} is ({needle})") as e:
            A.load_anchor_set(f"webdataset:{tmp_path / name}")
        assert "\n" not in str(e.value)
    s = A.load_anchor_set(f"webdataset:{tmp_path}/ok.tar")
    assert sorted(s.captions) == ["a caption", "another caption"]


def test_webdataset_captions_that_cannot_be_used_are_skipped(tmp_path):
    write_shard(tmp_path / "s.tar", [("a", png_bytes(), b"fine"), ("b", png_bytes(), "caf\u00e9".encode("latin-1")),
                                     ("c", png_bytes(), b"  \n"), ("d", png_bytes(), None),
                                     ("e", png_bytes(), b"\xef\xbb\xbfwith a bom")])
    s = A.load_anchor_set(f"webdataset:{tmp_path}/s.tar")
    assert sorted(s.captions) == ["fine", "with a bom"]
    assert sorted((x["id"], x["reason"]) for x in s.skipped) == [
        ("s.tar/b", "caption is not UTF-8 text"), ("s.tar/c", "caption empty"), ("s.tar/d", "needs an image and a .txt")]


def test_pairs_shared_with_a_test_set_leave_the_anchors(tmp_path):
    """The general rule: any anchor whose item key the test set holds is removed before the limit."""
    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(p)
        paths.append(p)
    (tmp_path / "a.csv").write_text("image,caption\n" + "".join(f"{p.name},thing {i}\n" for i, p in enumerate(paths)))
    s = A.load_anchor_set(f"captions:{tmp_path / 'a.csv'}")
    part = s.parts[0]
    part.keys = [f"test:{i}" for i in range(10)]
    shared = {"test:2", "test:5", "other:1"}
    kept = s.without(shared)
    assert kept.removed == 2 and len(kept) == 8
    assert sorted(kept.captions) == sorted(f"thing {i}" for i in range(10) if i not in (2, 5))
    assert [c for c in s.captions if c not in ("thing 2", "thing 5")] == kept.captions, "the order is kept"
    assert s.without(None) is s and kept.head(3).removed == 2


@needs("tuxpaint-stamps-default")
def test_tuxpaint_photos_leave_tuxpaint_anchors():
    photos = datasets.load_dataset("tuxpaint-photos")
    full = A.load_anchor_set("tuxpaint", one_per_caption=False)
    rest = A.load_anchor_set("tuxpaint", exclude=photos.keys, one_per_caption=False)
    assert rest.removed == len(full) - len(rest) == len(set(photos.keys) & set(full.parts[0].keys)) > 300
    assert not set(rest.parts[0].keys[j] for _, j in rest.order) & set(photos.keys)
    small = A.load_anchor_set("tuxpaint", limit=50, exclude=photos.keys, one_per_caption=False)
    assert len(small) == 50 and small.ids == rest.ids[:50], "exclusion comes before the limit"


@needs("tuxpaint-stamps-default")
def test_own_templates_or_class_names_keep_test_items_out_of_the_anchors(tmp_path, monkeypatch):
    """Renaming the prompts (``--templates``/``--classnames``) must not bring the test images back
    into the anchors: a leak of this kind once lifted tuxpaint-photos from 50% to 74%."""
    from asif import pipeline
    photos = datasets.load_dataset("tuxpaint-photos")
    renamed = photos.with_prompts(templates=["{c}"])
    assert renamed.keys == photos.keys and renamed.prompts()[0] == photos.classnames[0]
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    choice = pipeline.Choice(dataset="tuxpaint-photos", anchor_set="tuxpaint", templates=["{c}"])
    prepared = pipeline.prepare(choice, progress=False, limit=8, anchor_limit=16)
    assert prepared.anchors.anchor_set.removed == len(set(photos.keys) & set(A.load_anchor_set("tuxpaint")
                                                                            .parts[0].keys)) > 300
    kept = prepared.anchors.anchor_set
    assert len(prepared.anchors) == 16 and not {kept.parts[p].keys[j] for p, j in kept.order} & set(photos.keys)


@needs("tuxpaint-stamps-default")
@needs("openclipart-svg")
def test_validation_splits_share_no_item_with_the_test_sets():
    """The validation splits (for choosing defaults) are other folders of the same packages:
    no item of a test set, every item also an anchor item, so they leave the anchors when used."""
    for name, source in (("tuxpaint-photos", "tuxpaint"), ("clipart-objects", "clipart")):
        test, val = datasets.load_dataset(name), datasets.load_dataset(name, split="validation")
        assert len(val) >= 60 and not set(val.keys) & set(test.keys)
        assert val.templates == test.templates and not set(val.classnames) & {"household object"}
        assert set(val.keys) <= set(A.load_anchor_set(source).parts[0].keys)
        assert val.identity["split"] == "validation" and "split" not in test.identity
    with pytest.raises(DataError, match="splits 'test' and 'validation'"):
        datasets.load_dataset("tuxpaint-photos", split="train")


def test_one_pair_per_caption_after_the_test_items_leave(tmp_path):
    """Sources that ask for it keep the first pair (in their own order) of each caption among the
    pairs held; the test set's items leave first, so a caption keeps a pair wherever one is left."""
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4), (i * 30, 0, 0)).save(p)
        paths.append(p)
    captions = ["star", "star", "moon", "star", "sun", "moon", "tree", "star"]
    (tmp_path / "a.csv").write_text("image,caption\n" + "".join(f"{p.name},{c}\n" for p, c in zip(paths, captions)))
    s = A.load_anchor_set(f"captions:{tmp_path / 'a.csv'}")
    assert len(s) == 8 and s.repeated == 0, "user captions keep every pair"
    s.parts[0].one_per_caption = True
    s.parts[0].keys = [f"k{i}" for i in range(8)]
    kept = s.one_per_caption()
    assert sorted(kept.ids) == sorted(s.parts[0].ids[j] for j in (0, 2, 4, 6)) and kept.repeated == 4
    assert [i for i in s.ids if i in set(kept.ids)] == kept.ids, "the anchor order is kept"
    # item 0 (the first "star") is a test item: the next "star" (item 1) stands for the caption
    held = s.without({"k0"}).one_per_caption()
    assert sorted(held.ids) == sorted(s.parts[0].ids[j] for j in (1, 2, 4, 6))
    assert held.removed == 1 and held.repeated == 3 and held.head(2).repeated == 3
    assert kept.one_per_caption().ids == kept.ids, "idempotent"


@needs("openclipart-svg")
def test_clipart_keeps_one_drawing_per_caption():
    full = A.load_anchor_set("clipart", one_per_caption=False)
    kept = A.load_anchor_set("clipart")
    assert len(set(kept.captions)) == len(kept.captions) == len(set(full.captions))
    assert kept.repeated == len(full) - len(kept) > 1000  # 1,375 stars share one caption
