"""The one image decoder: every image (anchor, query, upload) becomes RGB the same way.

Policy, in this order:
  1. decode fully (PIL is lazy: a truncated file must fail here, not inside a batch)
  2. apply the EXIF orientation (a phone photo is embedded the way it is seen)
  3. transparency is composited on white (clip-art, icons and stamps are drawn
     on transparent canvases; dropping alpha would turn them black)
  4. convert to 8-bit RGB

So one PNG gives one vector whether it is an anchor, a query or an upload.
SVG files are rendered with cairosvg on white first. ``LazyImages`` is a
sequence whose items are produced on access, so a 70k-image dataset costs
nothing until it is embedded.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Sequence

import numpy as np

from asif.errors import ASIFInputError, ImageLoadError, MissingDataError

__all__ = ["IMAGE_EXTENSIONS", "BACKGROUND", "load_image", "render_svg", "LazyImages", "subset_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def _to_rgb(image):
    """RGB PIL image; transparency composited on ``BACKGROUND``."""
    from PIL import Image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(item, name: str | None = None):
    """A path, raw bytes, PIL image or uint8 array ``[H, W]`` / ``[H, W, 3|4]`` -> RGB PIL image.

    ``name`` labels the image in error messages (bytes have no path).
    Raises ``ImageLoadError`` (an ``ASIFInputError``) for a missing, corrupt
    or unsupported image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise ASIFInputError(f"image array must be uint8 [H, W] or [H, W, 3|4], got {item.dtype} {item.shape}")
        return _to_rgb(Image.fromarray(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        label, source = name or f"<{len(item)} bytes>", io.BytesIO(bytes(item))
    elif isinstance(item, (str, os.PathLike)):
        label, source = name or str(item), item
    else:
        raise ASIFInputError(f"an image must be a file path, bytes, a PIL image or a uint8 array, "
                             f"got {type(item).__name__}")
    try:
        with Image.open(source) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise ImageLoadError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(label, "it is a directory") from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not an image format PIL can identify (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(label, f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, bad headers, decoder errors
        raise ImageLoadError(label, f"corrupt or truncated ({e})") from None


def render_svg(path: str | os.PathLike, size: int = 224):
    """Render an SVG file to an RGB PIL image on white, longer side ``size`` px.

    Raises ``ImageLoadError`` if cairosvg cannot render it (some clip-art uses
    SVG features cairosvg lacks); callers record such files and skip them.
    """
    try:
        import cairosvg
    except ImportError:
        raise MissingDataError("rendering SVG needs cairosvg: pip install cairosvg") from None
    from PIL import Image
    try:
        png = cairosvg.svg2png(url=str(path), output_width=size)
        image = Image.open(io.BytesIO(png))
        image.load()
        if image.height > image.width:  # tall drawing: render again so the height is `size`
            png = cairosvg.svg2png(url=str(path), output_height=size)
            image = Image.open(io.BytesIO(png))
            image.load()
    except Exception as e:  # cairosvg raises many types on SVG it cannot draw
        raise ImageLoadError(path, f"SVG cannot be rendered ({type(e).__name__}: {e})") from None
    return _to_rgb(image)


class LazyImages(Sequence):
    """A sequence of ``n`` images produced on access by ``get(i)`` (PIL, a path or bytes)."""

    def __init__(self, n: int, get: Callable[[int], object]):
        self._n, self._get = int(n), get

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)


def subset_images(images: Sequence, index: np.ndarray) -> LazyImages:
    """The items of ``images`` at ``index``, produced on access."""
    return LazyImages(len(index), lambda i: images[int(index[i])])
