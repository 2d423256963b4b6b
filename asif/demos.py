"""The demos of notebooks 02-04 as plain functions: similarity of raw images and captions,
the anchors behind a prediction, and the universal classifier.

The widgets (asif.widgets) call these, and so do the headless notebook
cells and the tests.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import asif_core
from asif.errors import ASIFInputError

__all__ = ["SAMPLE_PHOTOS", "sample_photos", "similarity_matrix", "explain_prediction", "universal_classifier"]

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


def sample_photos(names: Sequence[str] = SAMPLE_PHOTOS) -> dict:
    """{name: RGB PIL image} of scikit-image's sample photos (offline)."""
    import skimage.data
    from asif.images import load_image
    out = {}
    for n in names:
        a = getattr(skimage.data, n)()
        a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle is (left, right, disparity)
        out[n.replace("stereo_", "")] = load_image(a, name=n)
    return out


def similarity_matrix(model: asif_core.ASIF, image_encoder, text_encoder, images: Sequence,
                      captions: Sequence[str]) -> np.ndarray:
    """ASIF similarity [n_images, n_captions] of raw images (PIL, paths, bytes) and captions."""
    if not len(images) or not len(captions):
        raise ASIFInputError("give at least one image and one caption")
    return model.similarity(image_encoder.encode(list(images), progress=False),
                            text_encoder.encode(list(captions), progress=False))


def explain_prediction(model: asif_core.ASIF, evals, index: int, top: int = 8) -> dict:
    """Prediction of test image ``index`` and the anchors behind it, for the predicted and the true class.

    For a class, the explaining prompt is its best template (the one that
    gives the class its score under reduce="max").
    """
    if not 0 <= index < len(evals.labels):
        raise ASIFInputError(f"index {index} out of range 0..{len(evals.labels) - 1}")
    rx = model.image_representation(evals.images[index:index + 1])
    rt = model.text_representation(evals.prompts)
    c, t = len(evals.classnames), len(evals.templates)
    sim = asif_core.similarity(rx, rt)[0].reshape(c, t)
    scores = sim.max(1)
    pred, true = int(scores.argmax()), int(evals.labels[index])
    out = {"index": index, "predicted": pred, "true": true, "scores": scores, "classnames": evals.classnames}
    prompts = evals.dataset.prompts()
    for role, cls in (("predicted", pred), ("true", true)):
        j = int(sim[cls].argmax())
        parts = asif_core.explain(rx, rt, top=top, text_row=cls * t + j)
        for p in parts:
            p["caption"] = model.captions[p["anchor"]] if model.captions else str(p["anchor"])
        out[f"{role}_explanation"] = {"class": evals.classnames[cls], "prompt": prompts[cls * t + j],
                                      "score": float(sim[cls, j]), "anchors": parts}
    return out


def universal_classifier(model: asif_core.ASIF, image_encoder, text_encoder, image, labels: Sequence[str],
                         templates: Sequence[str] = ("a photo of a {c}.",),
                         reduce: str = "max") -> list[tuple[str, float]]:
    """Rank free-text ``labels`` for one image (PIL, path, bytes): [(label, score)], best first."""
    labels = [label.strip() for label in labels if label and label.strip()]
    if not labels:
        raise ASIFInputError("labels: empty class list; type at least one label")
    if any("{c}" not in t for t in templates):
        raise ASIFInputError("templates: each needs the {c} placeholder")
    prompts = [t.replace("{c}", label) for label in labels for t in templates]
    x = image_encoder.encode([image], progress=False)
    scores = model.classify(x, text_encoder.encode(prompts, progress=False), len(labels), reduce=reduce)[0]
    order = np.argsort(-scores, kind="stable")
    return [(labels[i], float(scores[i])) for i in order]
