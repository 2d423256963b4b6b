"""ASIF: an image-text model from two frozen unimodal encoders and coupled anchor pairs, with no training.

The few names most users need::

    import asif
    enc_img, enc_txt = asif.load_image_encoder(), asif.load_text_encoder()     # offline defaults
    anchors = asif.load_anchor_embeddings("clipart+tuxpaint", enc_img, enc_txt)  # embedded once, cached
    model = asif.ASIF(anchors.A_img, anchors.A_txt, non_zeros=800, exponent=8, captions=anchors.captions)
    model.similarity(enc_img.encode(photos), enc_txt.encode(["a cat", "a dog"]))  # [n_photos, 2]

The method itself is ``asif_core`` (one file, in the paper's order); the
modules of this package each do one job around it: ``scoring`` and
``storage`` below the core; ``images``, ``encoders``, ``datasets``,
``anchors``, ``cache`` and ``registry`` above it; ``pipeline``, ``demos``,
``widgets`` and ``cli`` on top. Names are loaded on first use, so
``import asif`` is cheap.
"""
from __future__ import annotations

import importlib

__all__ = ["ASIF", "sweep", "load_image_encoder", "load_text_encoder", "load_anchor_embeddings",
           "load_eval_embeddings", "prepare", "run_zero_shot"]

_WHERE = {"ASIF": "asif_core", "sweep": "asif_core",
          "load_image_encoder": "asif.encoders", "load_text_encoder": "asif.encoders",
          "load_anchor_embeddings": "asif.cache", "load_eval_embeddings": "asif.cache",
          "prepare": "asif.pipeline", "run_zero_shot": "asif.pipeline"}


def __getattr__(name: str):
    # Lazy: asif_core imports asif.scoring, so importing asif_core here at
    # package import would be circular, and `asif --help` stays fast.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'asif' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
