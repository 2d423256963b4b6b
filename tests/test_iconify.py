"""The iconify anchor source on a small package the test writes and serves from 127.0.0.1."""
import base64
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from asif import iconify
from asif.errors import FetchError, ImageLoadError

SQUARE = '<path fill="currentColor" d="M4 4h16v16H4z"/>'


def icon_set(prefix, category, spdx, icons, name=None):
    return {"prefix": prefix, "width": 24, "height": 24, "icons": icons,
            "info": {"name": name or prefix.title(), "category": category, "license": {"spdx": spdx, "url": "u"},
                     "author": {"name": f"{prefix} authors", "url": "a"}}}


SETS = [
    icon_set("mdi", "Material", "Apache-2.0", {
        "heart": {"body": SQUARE}, "heart-outline": {"body": SQUARE}, "shoe-sneaker": {"body": SQUARE},
        "logo-github": {"body": SQUARE}, "secret": {"body": SQUARE, "hidden": True},
        "wide": {"body": SQUARE, "width": 48}, "broken": {"body": "<path d='M"}, "empty": {"body": ""}}),
    icon_set("tabler", "UI 24px", "MIT", {"heart-filled": {"body": SQUARE}, "bath-shower-2": {"body": SQUARE}}),
    icon_set("twemoji", "Emoji", "CC-BY-4.0", {"cat": {"body": SQUARE}}),
    icon_set("fluent-emoji", None, "MIT", {"dog": {"body": SQUARE}}, name="Fluent Emoji"),
    icon_set("simple-icons", "Logos", "CC0-1.0", {"github": {"body": SQUARE}}),
    icon_set("ps", None, "CC-BY-NC-4.0", {"tree": {"body": SQUARE}}),
    icon_set("fa6-brands", "Archive / Unmaintained", "CC-BY-4.0", {"safari": {"body": SQUARE}}, name="Font Awesome Brands"),
    # a set without a category is judged by its family's: devicon-original is a devicon, "Programming"
    icon_set("devicon-original", None, "MIT", {"vue": {"body": SQUARE}}, name="Devicon Original"),
    icon_set("devicon", "Programming", "MIT", {"react": {"body": SQUARE}}),
    # ... and one with no family is kept
    icon_set("bubbles", None, "MIT", {"kite-remix": {"body": SQUARE}}),
]


def tarball(sets=SETS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for s in sets:
            data = json.dumps(s).encode()
            ti = tarfile.TarInfo(f"package/json/{s['prefix']}.json")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def package(server, monkeypatch, tmp_path):
    """The small package served as the pinned version; the cache in tmp_path."""
    data = tarball()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    monkeypatch.setattr(iconify, "ICONIFY_INTEGRITY", integrity)
    server.files[f"/@iconify/json/-/json-{iconify.ICONIFY_VERSION}.tgz"] = data
    monkeypatch.setenv("ASIF_NPM_REGISTRY", server.url)
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    return data


def test_names_collapse_style_variants_and_drop_logos():
    assert iconify.canonical_name("heart-outline-2") == "heart"
    assert iconify.canonical_name("twotone-title") == "title"
    assert iconify.canonical_name("bath-shower-24px") == "bath shower"
    assert iconify.canonical_name("circle") == "circle"  # a style word alone is a thing
    assert iconify.canonical_name("arrow-up-16") == "arrow up"
    # the variant words of single large sets go too, from the end, one after another
    assert iconify.canonical_name("travel-places-hot-spring-remix") == "travel places hot spring"
    assert iconify.canonical_name("alarm-clock-solid-alerted") == "alarm clock"
    assert iconify.canonical_name("moon-twotone-loop") == "moon"
    assert iconify.canonical_name("bell-off") == "bell off"  # "off" names a state, not a style
    for excluded in ("logo-github", "brand-twitter", "flag-de", "social-medium", "2x", "x", "adonisjs-wordmark",
                     "circle-to-confirm-circle-transition"):
        assert iconify.canonical_name(excluded) is None, excluded


def test_set_exclusions_say_why():
    why = {s["prefix"]: iconify.set_is_excluded(s["prefix"], s["info"]) for s in SETS}
    assert why["mdi"] is None and why["tabler"] is None
    assert "emoji" in why["twemoji"] and "emoji" in why["fluent-emoji"]
    assert "logo" in why["simple-icons"] and "non-commercial" in why["ps"] and "logo" in why["fa6-brands"]
    assert why["devicon-original"] is None, "alone, an uncategorised set says nothing against it"
    categories = {s["prefix"]: s["info"]["category"] for s in SETS}
    assert iconify.family_category("devicon-original", categories) == "Programming"
    assert iconify.family_category("bubbles", categories) is None and iconify.family_category("mdi-x", {}) is None
    family = iconify.set_is_excluded("devicon-original", SETS[-3]["info"], categories)
    assert "programming" in family and "family" in family
    assert iconify.set_is_excluded("bubbles", SETS[-1]["info"], categories) is None


def test_index_keeps_one_icon_per_name_from_allowed_sets(package, tmp_path):
    index = iconify.load_index(progress=False)
    names = [r["name"] for r in index["icons"]]
    assert names == sorted({"heart", "shoe sneaker", "wide", "broken", "empty", "bath shower", "kite"})
    heart = next(r for r in index["icons"] if r["name"] == "heart")
    assert (heart["prefix"], heart["icon"]) in {("mdi", "heart"), ("mdi", "heart-outline"), ("tabler", "heart-filled")}
    assert set(index["sets"]) == {"mdi", "tabler", "bubbles"}
    assert set(index["excluded_sets"]) == {"twemoji", "fluent-emoji", "simple-icons", "ps", "fa6-brands",
                                           "devicon-original", "devicon"}
    assert "family" in index["excluded_sets"]["devicon-original"]
    assert next(r for r in index["icons"] if r["name"] == "wide")["width"] == 48
    assert iconify.load_index(progress=False) == index  # the second time from the cache
    assert "| Mdi (`mdi`) |" in iconify.credits_markdown(index)


def test_render_black_on_white_centred_and_bad_icons_named(package):
    index = iconify.load_index(progress=False)
    by = {r["name"]: r for r in index["icons"]}
    a = np.asarray(Image.open(io.BytesIO(iconify.render_icon(by["heart"]))))
    assert a.shape == (iconify.CANVAS, iconify.CANVAS, 3)
    dark = np.argwhere(a.min(axis=2) < 128)
    (y0, x0), (y1, x1) = dark.min(0), dark.max(0)
    # the 16/24 square of the 24-unit view box, inside an ICON_SIZE box in the middle
    side = iconify.ICON_SIZE * 16 / 24
    assert abs((x1 - x0 + 1) - side) <= 2 and abs((y1 - y0 + 1) - side) <= 2
    assert abs((x0 + x1) / 2 - iconify.CANVAS / 2) <= 1.5 and a[0, 0].tolist() == [255, 255, 255]
    wide = np.asarray(Image.open(io.BytesIO(iconify.render_icon(by["wide"]))))
    assert wide.shape == a.shape
    for bad in ("empty", "broken"):
        with pytest.raises(ImageLoadError, match=f"mdi:{bad}"):
            iconify.render_icon(by[bad])


def test_prerender_in_processes_resumes_and_counts_failures(package, tmp_path):
    index = iconify.load_index(progress=False)
    out = iconify.prerender(index, workers=2, progress=False)
    assert out["rendered"] == len(index["icons"]) - 2 and len(out["failed"]) == 2
    pngs = sorted((tmp_path / "cache").rglob("*.png"))
    assert len(pngs) == out["rendered"]
    stamp = [p.stat().st_mtime_ns for p in pngs]
    again = iconify.prerender(index, workers=2, progress=False)
    assert again == out and [p.stat().st_mtime_ns for p in pngs] == stamp  # nothing drawn twice


def test_anchor_source_skips_unrenderable_icons(package, fake_encoders, tmp_path):
    from asif.cache import load_anchor_embeddings
    img, txt = fake_encoders
    a = load_anchor_embeddings("iconify", img, txt, progress=False)
    assert sorted(a.captions) == ["bath shower", "heart", "kite", "shoe sneaker", "wide"]
    assert {d["id"] for d in a.dropped} == {"mdi:broken", "mdi:empty"}
    assert all(i.split(":")[0] in ("mdi", "tabler", "bubbles") for i in a.ids)


@pytest.mark.parametrize("mode,kind", [("corrupt", "archive"), ("html", "html"), ("404", "not_found")])
def test_a_bad_download_is_refused_and_not_kept(package, server, tmp_path, mode, kind):
    server.mode = mode
    with pytest.raises(FetchError) as err:
        iconify.fetch_package()
    assert err.value.kind in (kind, "checksum")
    assert not list((tmp_path / "cache").rglob("*.tgz"))


def test_an_altered_package_fails_the_integrity_check(package, server, tmp_path):
    sets = SETS[:1] + [icon_set("extra", "UI 24px", "MIT", {"x-ray": {"body": SQUARE}})]
    server.files[f"/@iconify/json/-/json-{iconify.ICONIFY_VERSION}.tgz"] = tarball(sets)
    with pytest.raises(FetchError, match="integrity") as err:
        iconify.fetch_package()
    assert err.value.kind == "checksum" and not list((tmp_path / "cache").rglob("*.tgz"))


@pytest.mark.parametrize("damage", [b"", b"\x1f\x8b\x08\x00 cut short", "not json"])
def test_a_damaged_index_is_built_again(package, tmp_path, damage):
    index = iconify.load_index(progress=False)
    path = next((tmp_path / "cache").rglob("index.json.gz"))
    path.write_bytes(damage if isinstance(damage, bytes) else __import__("gzip").compress(damage.encode()))
    assert iconify.load_index(progress=False) == index
