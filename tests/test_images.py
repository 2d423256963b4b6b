"""The one image decoder: same pixels from a path, bytes, a PIL image or an array; clear errors."""

import numpy as np
import pytest
from PIL import Image

from asif.errors import ASIFInputError, ImageLoadError
from asif.images import LazyImages, load_image, render_svg, subset_images


def half_transparent_red():
    a = np.zeros((6, 8, 4), dtype=np.uint8)
    a[..., 0], a[..., 3] = 255, 128  # red at half opacity
    a[:, :4, 3] = 0                  # left half fully transparent
    return a


def test_transparency_goes_on_white_whatever_the_input(tmp_path):
    rgba = half_transparent_red()
    png = tmp_path / "x.png"
    Image.fromarray(rgba, "RGBA").save(png)
    # reference conversion: alpha blending on white, by hand
    alpha = rgba[..., 3:4] / 255.0
    want = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha))
    for item in (png, str(png), png.read_bytes(), Image.open(png), rgba):
        got = np.asarray(load_image(item), dtype=np.float64)
        assert got.shape == (6, 8, 3)
        np.testing.assert_allclose(got, want, atol=1)
    assert (np.asarray(load_image(png))[:, :4] == 255).all()


def test_palette_transparency_and_greyscale():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((1, 1), 1)
    rgb = np.asarray(load_image(p))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [10, 200, 30]
    grey = load_image(np.full((5, 6), 77, dtype=np.uint8))
    assert grey.size == (6, 5) and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (2, 4)


def test_unreadable_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for bad in (corrupt, truncated, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageLoadError, match=bad.name) as e:
            load_image(bad)
        assert isinstance(e.value, ASIFInputError) and e.value.path == str(bad)
    with pytest.raises(ImageLoadError, match="upload.png"):
        load_image(b"garbage", name="upload.png")
    with pytest.raises(ASIFInputError, match="uint8"):
        load_image(np.zeros((3, 3), dtype=np.float32))
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
