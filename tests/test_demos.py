"""The demos behind notebooks 02-04, on the shared fake encoders and synthetic data."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import asif_core as ac
from asif import demos
from asif.errors import ASIFInputError

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "car": (40, 40, 200)}


@pytest.fixture
def toy(fake_encoders):
    """Coupled anchors: a plain picture of each thing, captioned with its name."""
    img, txt = fake_encoders
    names = [list(COLOURS)[i % 3] for i in range(30)]
    pictures = [Image.new("RGB", (8, 8), COLOURS[n]) for n in names]
    model = ac.ASIF(img.encode(pictures), txt.encode(names), non_zeros=10, exponent=3, captions=names)
    return model, img, txt


def test_universal_classifier_ranks_and_refuses_empty_labels(toy):
    model, img, txt = toy
    labels = list(COLOURS)
    for truth, colour in COLOURS.items():
        ranked = demos.universal_classifier(model, img, txt, Image.new("RGB", (5, 5), colour), labels, ("{c}",))
        assert ranked[0][0] == truth and sorted(label for label, _ in ranked) == sorted(labels)
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    with pytest.raises(ASIFInputError, match="empty class list"):
        demos.universal_classifier(model, img, txt, Image.new("RGB", (5, 5)), [" ", ""])
    with pytest.raises(ASIFInputError, match="placeholder"):
        demos.universal_classifier(model, img, txt, Image.new("RGB", (5, 5)), labels, templates=["no placeholder"])


def test_similarity_matrix_puts_each_picture_with_its_caption(toy):
    model, img, txt = toy
    pictures = [Image.new("RGB", (4, 4), c) for c in COLOURS.values()]
    sim = demos.similarity_matrix(model, img, txt, pictures, list(COLOURS))
    assert sim.shape == (3, 3) and (sim.argmax(1) == np.arange(3)).all()
    assert ((sim >= 0) & (sim <= 1 + 1e-6)).all()
    with pytest.raises(ASIFInputError, match="at least one"):
        demos.similarity_matrix(model, img, txt, pictures, [])


def evals_of(d, c, t):
    """The parts of cache.EvalEmbeddings that explain_prediction reads."""
    classnames, templates = [f"class {i}" for i in range(c)], [f"t{j} {{c}}" for j in range(t)]
    texts = [tpl.replace("{c}", name) for name in classnames for tpl in templates]
    return SimpleNamespace(images=d["images"], labels=d["labels"], prompts=d["prompts"], classnames=classnames,
                           templates=templates, dataset=SimpleNamespace(prompts=lambda: texts))


def test_explain_prediction_shares_and_best_template(tiny):
    d = tiny
    model = ac.ASIF(d["anchor_images"], d["anchor_texts"], 20, 3, dtype="float64",
                    captions=[f"pair {i}" for i in range(97)])
    evals = evals_of(d, 4, 3)
    out = demos.explain_prediction(model, evals, 5, top=50)
    scores = model.classify(d["images"][5:6], d["prompts"], 4)[0]
    np.testing.assert_allclose(out["scores"], scores, atol=1e-12)
    assert out["predicted"] == int(scores.argmax()) and out["true"] == int(d["labels"][5])
    for role in ("predicted", "true"):
        ex = out[f"{role}_explanation"]
        assert sum(a["share"] for a in ex["anchors"]) == pytest.approx(1.0)
        assert ex["prompt"].endswith(ex["class"])
        assert ex["score"] == pytest.approx(scores[out[role]])
        assert all(a["caption"] == f"pair {a['anchor']}" for a in ex["anchors"])
    with pytest.raises(ASIFInputError, match="out of range"):
        demos.explain_prediction(model, evals, 23)
