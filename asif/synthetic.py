"""Synthetic coupled data: two unrelated "encoders" of one latent world, for tests, benchmarks and demos.

ASIF needs no real model to be checked: if an image encoder and a text
encoder see the same latent things through different random maps, anchors
coupled through those things let ASIF find the structure, and anchors whose
coupling is shuffled do not.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["synthetic_coupled_data", "structured_coupled_data"]


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


def structured_coupled_data(n_anchors: int = 200000, n_images: int = 2000, n_classes: int = 100,
                            n_templates: int = 18, image_dim: int = 768, text_dim: int = 384,
                            n_clusters: int = 2000, zipf: float = 1.1, hub_fraction: float = 0.01,
                            seed: int = 0, dtype=np.float32) -> dict:
    """Embeddings shaped like real encoders' (clusters, hubs, a heavy tail), at benchmark scale.

    Random unit vectors are nearly orthogonal (cosines ~ N(0, 1/d)); real
    embeddings are not, and the stream's cost depends on how many anchors
    sit near each query's k-th similarity. Each modality here is

        x = 0.45 mu + 0.55 c[cluster] + 0.75 noise / sqrt(d), normalised,

    with mu one shared direction (real encoders are anisotropic: every
    pair has a positive cosine, ~0.2 here), cluster centres c drawn at
    random, and clusters of Zipf-distributed sizes (exponent ``zipf``:
    a few large topics, a long tail of small ones). A ``hub_fraction`` of
    the anchors lean towards mu (generic pictures and captions): they sit
    in many queries' top-k lists, as hubs do. Both modalities of an anchor
    share its cluster, with independent centres and noise per modality
    (two unrelated encoders of one world); class c's images and prompts are
    drawn from cluster c. Generated in chunks, so 2M anchors fit in RAM.

    Returns the keys of :func:`synthetic_coupled_data`.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** zipf
    weights /= weights.sum()
    clusters = rng.permutation(n_clusters)  # class c is cluster clusters[c]: big and small topics alike
    cluster_of_anchor = rng.choice(n_clusters, size=n_anchors, p=weights)
    hub = rng.random(n_anchors) < hub_fraction

    def modality(dim: int):
        mu = rng.standard_normal(dim)
        mu /= np.linalg.norm(mu)
        centres = rng.standard_normal((n_clusters, dim)) / math.sqrt(dim)

        def view(cluster_ids, hubs=None):
            out = np.empty((len(cluster_ids), dim), dtype=dtype)
            for s in range(0, len(cluster_ids), 50000):
                ids = cluster_ids[s:s + 50000]
                m = len(ids)
                lean = np.full((m, 1), 0.45)
                if hubs is not None:
                    lean[hubs[s:s + 50000]] = 1.2
                x = lean * mu + 0.55 * centres[ids] + 0.75 * rng.standard_normal((m, dim)) / math.sqrt(dim)
                out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
            return out
        return view

    image_view, text_view = modality(image_dim), modality(text_dim)
    labels = rng.integers(0, n_classes, n_images)
    return {"anchor_images": image_view(cluster_of_anchor, hub), "anchor_texts": text_view(cluster_of_anchor, hub),
            "images": image_view(clusters[labels]), "labels": labels.astype(np.int64),
            "prompts": text_view(np.repeat(clusters[:n_classes], n_templates)), "n_classes": n_classes}
