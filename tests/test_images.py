"""The one image decoder: every PIL mode, file format and array kind against a reference
conversion computed here in numpy; same pixels from a path, bytes, a PIL image or an array; clear errors."""
import colorsys
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from asif.errors import ASIFInputError, ImageLoadError
from asif.images import LazyImages, load_image, render_svg, subset_images

RNG = np.random.default_rng(11)
H, W = 6, 8


def on_white(colour, alpha):
    """Reference compositing: colour [H, W, 3] (or [H, W]) at opacity alpha [H, W] 0..255 over white."""
    a = alpha.astype(np.float64)[..., None] / 255
    c = colour.astype(np.float64)
    c = c if c.ndim == 3 else np.repeat(c[..., None], 3, axis=2)
    return c * a + 255 * (1 - a)


def grey(values):
    """[H, W] -> [H, W, 3], R = G = B."""
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=2)


def saved(image, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes none with colour): colour type 0 grey, 2 RGB, 4 LA, 6 RGBA."""
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def check(item, expected, atol=1.0):
    got = np.asarray(load_image(item), dtype=np.float64)
    assert got.shape == expected.shape[:2] + (3,) and load_image(item).mode == "RGB"
    np.testing.assert_allclose(got, expected, atol=atol)


u8 = lambda *shape: RNG.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
u16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
U = u16.astype(np.float64)  # references computed in float64 (uint16 arithmetic would wrap)
PALETTE = u8(256, 3)
INDEX = RNG.integers(0, 256, (H, W), dtype=np.uint8)
L8, A8, RGB8, C4 = u8(H, W), u8(H, W), u8(H, W, 3), u8(H, W, 4)
BITS = RNG.integers(0, 2, (H, W), dtype=bool)


def palette_image(alpha_bytes=None, transparent_index=None):
    p = Image.fromarray(INDEX, "P")
    p.putpalette(PALETTE.ravel().tolist())
    if alpha_bytes is not None:
        p.info["transparency"] = bytes(alpha_bytes)
    if transparent_index is not None:
        p.info["transparency"] = transparent_index
    return p


PALETTE_ALPHA = u8(256)
Y, CB, CR = (RGB8[..., i].astype(np.float64) for i in range(3))

# (case, item, reference) -- each reference is computed from the raw values, not by PIL
CASES = [
    ("1 (PNG)", saved(Image.fromarray(BITS), "PNG"), grey(BITS * 255.0)),
    ("L (PNG)", saved(Image.fromarray(L8, "L"), "PNG"), grey(L8)),
    ("LA (PNG)", saved(Image.fromarray(np.dstack([L8, A8]), "LA"), "PNG"), on_white(L8, A8)),
    ("P (palette PNG)", saved(palette_image(), "PNG"), PALETTE[INDEX].astype(np.float64)),
    ("P, one transparent index (GIF)", saved(palette_image(transparent_index=int(INDEX[0, 0])), "GIF"),
     np.where((INDEX == INDEX[0, 0])[..., None], 255.0, PALETTE[INDEX])),
    ("P, alpha per palette entry (PNG)", saved(palette_image(alpha_bytes=PALETTE_ALPHA), "PNG"),
     on_white(PALETTE[INDEX], PALETTE_ALPHA[INDEX])),
    ("PA", Image.merge("PA", (palette_image(), Image.fromarray(A8, "L"))), on_white(PALETTE[INDEX], A8)),
    ("L, colour key (PNG tRNS)", saved(Image.fromarray(L8, "L"), "PNG", transparency=int(L8[0, 0])),
     np.where((L8 == L8[0, 0])[..., None], 255.0, grey(L8))),
    ("RGB (PNG)", saved(Image.fromarray(RGB8, "RGB"), "PNG"), RGB8.astype(np.float64)),
    ("RGB, colour key (PNG tRNS)", saved(Image.fromarray(RGB8, "RGB"), "PNG", transparency=tuple(int(v) for v in RGB8[0, 0])),
     np.where((RGB8 == RGB8[0, 0]).all(2)[..., None], 255.0, RGB8)),
    ("RGBA (PNG)", saved(Image.fromarray(C4, "RGBA"), "PNG"), on_white(C4[..., :3], C4[..., 3])),
    ("CMYK (TIFF)", saved(Image.fromarray(C4, "CMYK"), "TIFF"),
     (255 - C4[..., :3].astype(np.float64)) * (255 - C4[..., 3:4].astype(np.float64)) / 255),
    ("YCbCr (TIFF)", saved(Image.fromarray(RGB8, "YCbCr"), "TIFF"),
     np.clip(np.stack([Y + 1.402 * (CR - 128), Y - 0.344136 * (CB - 128) - 0.714136 * (CR - 128),
                       Y + 1.772 * (CB - 128)], -1), 0, 255)),
    ("HSV", Image.fromarray(RGB8, "HSV"),
     np.array([[colorsys.hsv_to_rgb(*(px / 255)) for px in row] for row in RGB8.astype(np.float64)]) * 255),
    ("I;16 (16-bit grey PNG)", png16(u16, 0), grey(U * 255 / 65535)),
    ("I;16 (16-bit grey TIFF)", saved(Image.fromarray(u16), "TIFF"), grey(U * 255 / 65535)),
    ("I;16B (big-endian)", Image.frombytes("I;16B", (W, H), u16.astype(">u2").tobytes()), grey(U * 255 / 65535)),
    ("I;16, colour key", saved(Image.fromarray(u16), "PNG", transparency=int(u16[0, 0])),
     np.where((u16 == u16[0, 0])[..., None], 255.0, grey(U * 255 / 65535))),
    ("16-bit RGB PNG", png16(np.stack([u16, u16[::-1], 65535 - u16], -1), 2),
     np.stack([U, U[::-1], 65535 - U], -1) * 255 / 65535),
    ("16-bit RGBA PNG", png16(np.stack([u16, u16[::-1], 65535 - u16, u16[:, ::-1]], -1), 6),
     on_white(np.stack([U, U[::-1], 65535 - U], -1) * 255 / 65535, np.floor(U[:, ::-1] / 256))),
    ("I (32-bit TIFF, 0..65535)", saved(Image.fromarray(u16.astype(np.int32)), "TIFF"), grey(U * 255 / 65535)),
    ("I (32-bit TIFF, negative values)", saved(Image.fromarray(u16.astype(np.int32) - 40000), "TIFF"),
     grey((U - U.min()) * 255 / (U.max() - U.min()))),
    ("F (float TIFF, 0..1)", saved(Image.fromarray((u16 / 65535).astype(np.float32)), "TIFF"),
     grey((U / 65535).astype(np.float32) * 255.0)),
    ("F (float TIFF, -3..7)", saved(Image.fromarray((u16 / 65535 * 10 - 3).astype(np.float32)), "TIFF"),
     grey((U - U.min()) * 255 / (U.max() - U.min()))),
]

def _premultiplied_cases():
    # PIL's own unpremultiply is what this checks against, so the reference is
    # written from the stored values: on white, c' + 255 - a (c' = c * a / 255 stored)
    la = Image.fromarray(np.dstack([L8, A8]), "LA").convert("La")
    stored = np.asarray(la).astype(np.float64)
    rgba = Image.fromarray(C4, "RGBA").convert("RGBa")
    stored4 = np.asarray(rgba).astype(np.float64)
    return [("La (premultiplied)", la, grey(np.clip(stored[..., 0] + 255 - stored[..., 1], 0, 255))),
            ("RGBa (premultiplied)", rgba, np.clip(stored4[..., :3] + 255 - stored4[..., 3:4], 0, 255))]


CASES += _premultiplied_cases()


@pytest.mark.parametrize("case,item,expected", CASES, ids=[c[0] for c in CASES])
def test_every_mode_matches_its_reference_conversion(case, item, expected, tmp_path):
    # premultiplied alpha rounds twice (when stored, when undone); 16-bit colour keeps PIL's high byte
    atol = 2.0 if "premultiplied" in case else 1.0
    check(item, expected, atol)
    if isinstance(item, bytes):  # the same file by path, by bytes and opened by PIL: one result
        path = tmp_path / "image"
        path.write_bytes(item)
        check(path, expected, atol)
        with Image.open(path) as im:
            check(im, expected, atol)


def test_multi_frame_files_give_their_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((H, W, 3), c, dtype=np.uint8)) for c in ((200, 10, 10), (10, 200, 10), (9, 9, 9))]
    for fmt, name in (("GIF", "anim.gif"), ("TIFF", "pages.tif"), ("PNG", "anim.png"), ("WEBP", "anim.webp")):
        frames[0].save(tmp_path / name, fmt, save_all=True, append_images=frames[1:], **(
            {"lossless": True} if fmt == "WEBP" else {}))
        with Image.open(tmp_path / name) as im:
            assert getattr(im, "n_frames", 1) == 3, f"{fmt} was written with 3 frames"
        got = np.asarray(load_image(tmp_path / name), dtype=np.float64)
        np.testing.assert_allclose(got, np.full((H, W, 3), (200, 10, 10), dtype=np.float64), atol=2, err_msg=fmt)
    with Image.open(tmp_path / "pages.tif") as im:  # an image opened on a later frame still gives frame 0
        im.seek(2)
        assert np.asarray(load_image(im))[0, 0].tolist() == [9, 9, 9], "a PIL image is taken as it is"


ARRAY_CASES = [
    ("uint8 [H, W]", L8, grey(L8)),
    ("uint8 [H, W, 1]", L8[..., None], grey(L8)),
    ("uint8 [H, W, 2] grey + alpha", np.dstack([L8, A8]), on_white(L8, A8)),
    ("uint8 [H, W, 3]", RGB8, RGB8.astype(np.float64)),
    ("uint8 [H, W, 4]", C4, on_white(C4[..., :3], C4[..., 3])),
    ("bool", BITS, grey(BITS * 255.0)),
    ("uint16", u16, grey(U * 255 / 65535)),
    ("uint16 [H, W, 3]", np.stack([u16] * 3, -1), grey(U * 255 / 65535)),
    ("float32 0..1", (u16 / 65535).astype(np.float32), grey((U / 65535).astype(np.float32) * 255.0)),
    ("float64 0..1 RGB", RGB8 / 255.0, RGB8.astype(np.float64)),
    ("float64 0..255 (out of the nominal range)", RGB8.astype(np.float64),
     (RGB8 - RGB8.min()) * 255.0 / (RGB8.max() - RGB8.min())),
    ("float constant 5.0", np.full((H, W), 5.0), np.full((H, W, 3), 255.0)),
]


@pytest.mark.parametrize("case,array,expected", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_arrays_follow_the_same_policy(case, array, expected):
    check(array, expected)


def test_transparency_goes_on_white_whatever_the_input(tmp_path):
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # red at half opacity
    rgba[:, :4, 3] = 0                     # left half fully transparent
    png = tmp_path / "x.png"
    Image.fromarray(rgba, "RGBA").save(png)
    for item in (png, str(png), png.read_bytes(), Image.open(png), rgba):
        check(item, on_white(rgba[..., :3], rgba[..., 3]))
    assert (np.asarray(load_image(png))[:, :4] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (2, 4)
    Image.fromarray(u16).save(tmp_path / "r.png", exif=exif.tobytes())  # 16-bit and rotated
    got = np.asarray(load_image(tmp_path / "r.png"), dtype=np.float64)
    np.testing.assert_allclose(got, grey(np.rot90(U, -1) * 255 / 65535), atol=1)


def test_unreadable_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    nan_tiff = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(nan_tiff)
    for bad in (corrupt, truncated, empty, nan_tiff, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageLoadError, match=bad.name) as e:
            load_image(bad)
        assert isinstance(e.value, ASIFInputError) and e.value.path == str(bad)
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(nan_tiff)
    with pytest.raises(ImageLoadError, match="upload.png"):
        load_image(b"garbage", name="upload.png")
    with pytest.raises(ASIFInputError, match="int64 is ambiguous"):
        load_image(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ASIFInputError, match=r"\[H, W, 1\|2\|3\|4\]"):
        load_image(np.zeros((3, 3, 5), dtype=np.uint8))
    with pytest.raises(ASIFInputError, match="file path, bytes"):
        load_image(3.14)


def test_svg_renders_on_white_and_bad_svg_is_named(tmp_path):
    svg = tmp_path / "dot.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 20">'
                   '<rect x="0" y="0" width="10" height="10" fill="#0000ff"/></svg>')
    im = render_svg(svg, size=64)
    assert im.mode == "RGB" and max(im.size) == 64 and im.size[1] == 64  # tall: the height is the size
    a = np.asarray(im)
    assert a[5, 5].tolist() == [0, 0, 255] and a[-2, 5].tolist() == [255, 255, 255]
    (tmp_path / "bad.svg").write_text("<svg><unclosed")
    with pytest.raises(ImageLoadError, match="bad.svg"):
        render_svg(tmp_path / "bad.svg")


def test_lazy_images_and_subsets():
    seen = []
    lazy = LazyImages(5, lambda i: seen.append(i) or i * 10)
    assert seen == [] and len(lazy) == 5 and lazy[-1] == 40 and lazy[1:3] == [10, 20]
    sub = subset_images(lazy, np.array([4, 0]))
    assert len(sub) == 2 and sub[0] == 40 and sub[1] == 0
    with pytest.raises(IndexError):
        lazy[5]


def _svgs(folder, n: int) -> list:
    """``n`` small SVG files of different shapes and colours (some tall), then the faults: unparseable,
    empty, missing."""
    paths = []
    for i in range(n):
        p = folder / f"s{i}.svg"
        w, h = (10, 10 + i % 3 * 7)
        p.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}">'
                     f'<circle cx="5" cy="5" r="{1 + i % 4}" fill="#{(i * 2654435761) % 0xFFFFFF:06x}"/></svg>')
        paths.append(p)
    (folder / "bad.svg").write_text("<svg><unclosed")
    (folder / "empty.svg").write_bytes(b"")
    return paths + [folder / "bad.svg", folder / "empty.svg", folder / "missing.svg"]


def test_svgs_rendered_in_processes_equal_those_rendered_here(tmp_path, monkeypatch):
    import asif.images as images_module
    from asif.images import RenderedSVGs
    monkeypatch.setattr(images_module, "PROCESS_MIN_SVGS", 1)  # a pool even for this handful
    paths = _svgs(tmp_path, 21)
    svgs = RenderedSVGs(paths, size=48)
    names = [p.name for p in paths]
    rows = list(range(len(paths)))[::-1]  # any order of rows
    here = images_module.load_many(svgs, rows, names, workers=1)
    pooled = images_module.load_many(svgs, rows, names, workers=2)
    assert [e for _, e in pooled] == [e for _, e in here]
    assert [r for r, (im, _) in zip(rows, pooled) if im is None] == [23, 22, 21]  # the three faults, named
    assert all("svg" in e for _, e in pooled[:3])
    for (a, _), (b, _), r in zip(here, pooled, rows):
        if r < 21:
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert np.array_equal(np.asarray(a), np.asarray(load_image(svgs[r])))  # as one item read alone
    # a subset keeps its rows' files and stays renderable in processes
    sub = subset_images(svgs, np.array([3, 0]))
    assert isinstance(sub, RenderedSVGs) and sub.paths == [paths[3], paths[0]]
    import pickle
    again = pickle.loads(pickle.dumps(sub))  # what a Ray worker receives
    assert np.array_equal(np.asarray(again[0]), np.asarray(svgs[3]))


def test_the_cache_embeds_rendered_svgs_as_it_embeds_any_lazy_images(tmp_path, fake_encoders, monkeypatch):
    # the cache takes the process path for RenderedSVGs: vectors and recorded failures must be those of
    # the thread path over the same renders
    from asif import cache
    monkeypatch.setattr(cache, "decode_threads", lambda: 2)  # two worker processes on any machine
    from asif.images import RenderedSVGs
    paths = _svgs(tmp_path, 40)
    svgs = RenderedSVGs(paths, size=32)
    plain = LazyImages(len(paths), lambda i: render_svg(paths[i], 32))
    ids = [p.name for p in paths]
    rows = list(range(len(paths)))
    img, _ = fake_encoders
    a, failed_a = cache._encode_images(img, svgs, rows, 16, ids)
    b, failed_b = cache._encode_images(img, plain, rows, 16, ids)
    np.testing.assert_array_equal(a, b)
    assert failed_a == failed_b and [f["id"] for f in failed_a] == ["bad.svg", "empty.svg", "missing.svg"]
    assert not a[-3:].any() and (np.linalg.norm(a[:-3], axis=1) > 0).all()
