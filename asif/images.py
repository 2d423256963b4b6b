"""The one image decoder: every image (anchor, query, upload, dataset item) becomes 8-bit RGB the same way.

Policy, in this order (``load_image``):
  1. decode fully (PIL is lazy: a truncated file must fail here, not inside
     a batch); a multi-frame file (GIF, TIFF, APNG, WebP) gives its first frame
  2. apply the EXIF orientation (a phone photo is embedded the way it is seen)
  3. bring the values to 8 bits by the mode's nominal range:
       1, L, P, RGB, CMYK, YCbCr, LAB, HSV  8-bit already; PIL's own conversion
                   to RGB (CMYK: R = (255 - C)(255 - K) / 255, likewise G, B;
                   YCbCr: JPEG's full-range BT.601)
       I;16        (16-bit greyscale PNG or TIFF) 0..65535 -> 0..255, v * 255 / 65535 rounded
       I           (32-bit integer) the same 0..65535 range when every value lies in it,
                   else the image's own min..max is stretched to 0..255
       F           (32-bit float) 0.0..1.0 when every value lies in it (the convention of
                   float images), else its own min..max; NaN or infinite pixels are an error
     A 16-bit colour PNG is read by PIL as 8-bit RGB(A) (its high byte: within 1 of the rule above).
  4. transparency is composited on white (clip-art, icons and stamps are drawn
     on transparent canvases; dropping alpha would turn them black): alpha
     channels (LA, La, PA, RGBA, RGBa) and a palette's or colour key's
     ``transparency``
  5. greyscale is repeated into R = G = B

Arrays follow the same rule: uint8 as is, bool as 1-bit, uint16 as I;16,
float as F; ``[H, W]``, ``[H, W, 1|2|3|4]`` (2: grey + alpha, 4: RGBA).
So one picture gives one vector whether it is an anchor, a query, an upload
or a dataset item. SVG files are rendered with cairosvg on white first.
``LazyImages`` is a sequence whose items are produced on access, so a
70k-image dataset costs nothing until it is embedded; ``RenderedSVGs`` is
one of SVG files, which bulk readers render in worker processes.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Callable, Sequence

import numpy as np

from asif.errors import ASIFInputError, ImageLoadError, MissingDataError

__all__ = ["IMAGE_EXTENSIONS", "BACKGROUND", "load_image", "to_8bit", "render_svg", "LazyImages", "RenderedSVGs",
           "load_many", "subset_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_NOMINAL = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8bit(values: np.ndarray, nominal: float, label: str = "image") -> np.ndarray:
    """Pixel values -> uint8 by step 3 of the policy: ``0..nominal`` maps to 0..255 when every
    value lies in it, else the image's own min..max does (a constant image is clipped)."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ImageLoadError(label, "it holds NaN or infinite pixel values")
    if v.size and (v.min() < 0 or v.max() > nominal):
        lo, hi = v.min(), v.max()
        v = (v - lo) * (nominal / (hi - lo)) if hi > lo else np.clip(v, 0, nominal)
    return np.rint(v * (255.0 / nominal)).astype(np.uint8)


def _on_white(image):
    """RGBA (or anything PIL turns into RGBA) composited on ``BACKGROUND`` -> RGB."""
    from PIL import Image
    image = image.convert("RGBA")
    canvas = Image.new("RGB", image.size, BACKGROUND)
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def _to_rgb(image, label: str = "image"):
    """Steps 3-5 of the policy: any PIL mode -> 8-bit RGB PIL image."""
    from PIL import Image
    mode = image.mode
    if mode in _NOMINAL:
        values = np.asarray(image)
        grey = Image.fromarray(to_8bit(values, _NOMINAL[mode], label), "L")
        key = image.info.get("transparency")
        if isinstance(key, (int, np.integer)):  # a 16-bit colour key: those pixels are transparent
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))))
        return _to_rgb(grey, label)
    if mode == "La":  # premultiplied: PIL converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _on_white(image)
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode PIL cannot turn into RGB
        raise ImageLoadError(label, f"PIL cannot convert its mode {mode} to RGB ({e})") from None


def _from_array(a: np.ndarray, label: str):
    from PIL import Image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise ASIFInputError(f"{label}: an image array must be [H, W] or [H, W, 1|2|3|4], got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = to_8bit(a, 65535, label)
    elif np.issubdtype(a.dtype, np.floating):
        a = to_8bit(a, 1.0, label)
    elif a.dtype != np.uint8:
        raise ASIFInputError(f"{label}: an image array of dtype {a.dtype} is ambiguous; give uint8 (0..255), "
                             "uint16 (0..65535), float (0..1) or bool")
    mode = "L" if a.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a), mode), label)


def load_image(item, name: str | None = None):
    """A path, raw bytes, PIL image or array (see the policy above) -> 8-bit RGB PIL image.

    ``name`` labels the image in error messages (bytes have no path).
    Raises ``ImageLoadError`` (an ``ASIFInputError``) for a missing, corrupt
    or unsupported image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    if isinstance(item, Image.Image):
        return _to_rgb(item, name or "image")
    if isinstance(item, np.ndarray):
        return _from_array(item, name or "image array")
    if isinstance(item, (bytes, bytearray, memoryview)):
        label, source = name or f"<{len(item)} bytes>", io.BytesIO(bytes(item))
    elif isinstance(item, (str, os.PathLike)):
        label, source = name or os.fsdecode(item), item
    else:
        raise ASIFInputError(f"an image must be a file path, bytes, a PIL image or an array, "
                             f"got {type(item).__name__}")
    try:
        with Image.open(source) as im:
            im.seek(0)  # a multi-frame file: its first frame
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im), label)
    except FileNotFoundError:
        raise ImageLoadError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(label, "it is a directory") from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not an image format PIL can identify (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(label, f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated data, bad headers, decoder errors
        if isinstance(e, ImageLoadError):
            raise
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
    return _to_rgb(image, os.fsdecode(path))


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


class RenderedSVGs(LazyImages):
    """SVG files rendered on access at ``size`` px (``render_svg``); ``load_many`` renders them in processes.

    cairosvg parses and draws in Python and holds the GIL for most of a render:
    on 2 cores, 120 Openclipart files render at 29 images/s in one thread, 31
    in two threads and 61 in two processes. So a bulk reader (the cache
    building an embedding set) renders them in worker processes, which give
    the same pixels as a render in this process.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], size: int = 224):
        self.paths, self.size = list(paths), int(size)
        super().__init__(len(self.paths), self._render)  # a bound method: the sequence pickles

    def _render(self, i: int):
        return render_svg(self.paths[i], self.size)

    def subset(self, index: np.ndarray) -> "RenderedSVGs":
        return RenderedSVGs([self.paths[int(i)] for i in index], self.size)



PROCESS_MIN_SVGS = 16  # per worker: below that, rendering in this process is quicker than starting a pool


def load_many(items: Sequence, rows: Sequence[int], names: Sequence[str], workers: int) -> list[tuple]:
    """``[(RGB PIL image, None) or (None, "Error: reason")]``: ``load_image(items[r], name=names[r])``
    for each of ``rows``, never raising for one item. ``RenderedSVGs`` render in ``workers``
    processes (cairosvg holds the GIL); anything else decodes in ``workers`` threads, since
    decoding releases the GIL for most of its time."""
    if isinstance(items, RenderedSVGs):
        jobs = [(items.paths[r], items.size, names[r]) for r in rows]
        if workers < 2 or len(jobs) < workers * PROCESS_MIN_SVGS:  # a pool costs more than it saves
            return [_load_rendered(job) for job in jobs]
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_load_rendered, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: _attempt(lambda: items[r], names[r]), rows))


def _attempt(produce: Callable[[], object], name: str) -> tuple:
    try:
        return load_image(produce(), name=name), None
    except Exception as e:  # any decoder/renderer error: the caller records it and goes on
        return None, f"{type(e).__name__}: {e}"


def _load_rendered(job: tuple) -> tuple:
    """(path, size, name) -> ``_attempt`` of its render; module-level so processes can run it."""
    path, size, name = job
    return _attempt(lambda: render_svg(path, size), name)


def subset_images(images: Sequence, index: np.ndarray) -> LazyImages:
    """The items of ``images`` at ``index``, produced on access (SVG files stay ``RenderedSVGs``)."""
    if isinstance(images, RenderedSVGs):
        return images.subset(index)
    return LazyImages(len(index), lambda i: images[int(index[i])])
