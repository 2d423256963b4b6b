"""Synthetic coupled data: two unrelated "encoders" of one latent world, for tests, benchmarks and demos.

ASIF needs no real model to be checked: if an image encoder and a text
encoder see the same latent things through different random maps, anchors
coupled through those things let ASIF find the structure, and anchors whose
coupling is shuffled do not.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["synthetic_coupled_data"]


def synthetic_coupled_data(n_anchors: int = 4096, n_classes: int = 10, n_templates: int = 3, n_images: int = 500,
                           image_dim: int = 64, text_dim: int = 32, latent_dim: int = 16, noise: float = 0.5,
                           seed: int = 0, dtype=np.float32) -> dict:
    """Two unrelated 'encoders' of one latent world, so that ASIF has something to find.

    A latent vector z is seen by the image encoder as tanh(z W1) + noise and
    by the text encoder as tanh(z W2) + noise, with W1, W2 random; anchors
    are (image, caption) views of the same z. Classes are latent cluster
    centres; prompts are noisy text views of them. Returns normalised
    anchor_images [N, image_dim], anchor_texts [N, text_dim], images [Q, image_dim],
    labels [Q], prompts [C*T, text_dim] (class-major).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((latent_dim, image_dim)) / math.sqrt(latent_dim)
    w2 = rng.standard_normal((latent_dim, text_dim)) / math.sqrt(latent_dim)
    centres = rng.standard_normal((n_classes, latent_dim)) * 1.5

    def views(z, w):
        x = np.tanh(z @ w) + noise * rng.standard_normal((len(z), w.shape[1])) / math.sqrt(w.shape[1]) * 3
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

    za = centres[rng.integers(0, n_classes, n_anchors)] + rng.standard_normal((n_anchors, latent_dim))
    labels = rng.integers(0, n_classes, n_images)
    zq = centres[labels] + rng.standard_normal((n_images, latent_dim))
    zp = np.repeat(centres, n_templates, axis=0) + 0.3 * rng.standard_normal((n_classes * n_templates, latent_dim))
    return {"anchor_images": views(za, w1), "anchor_texts": views(za, w2), "images": views(zq, w1),
            "labels": labels.astype(np.int64), "prompts": views(zp, w2), "n_classes": n_classes}
