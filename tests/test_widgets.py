"""Widgets and plots: a change saves the choice; uploads, Apply and bad input; figures draw what they are given."""
import datetime
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from asif import pipeline, widgets  # noqa: E402
from asif.errors import ASIFInputError  # noqa: E402

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def by_description(box, description):
    """The widget with this description anywhere inside ``box``."""
    stack = [box]
    while stack:
        w = stack.pop()
        if getattr(w, "description", None) == description:
            return w
        stack += list(getattr(w, "children", ()))
    raise KeyError(description)


def status_of(box):
    return box.children[-1].value


def test_dropdown_change_saves_the_choice_and_says_the_cells_below_are_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    seen = []
    box = widgets.choice_widgets(pipeline.Choice(), on_change=seen.append)
    by_description(box, "dataset").value = "cifar10"
    assert pipeline.load_choice().dataset == "cifar10" and seen[-1].dataset == "cifar10"
    assert "cells below still show the previous choice" in status_of(box)


def test_k_and_exponents_boxes_are_the_choice_01_to_04_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    box = widgets.choice_widgets(pipeline.Choice())
    by_description(box, "exponents (p)").value = "6, 2"
    by_description(box, "non_zeros (k)").value = 300
    assert pipeline.load_choice().exponents == [6.0, 2.0] and pipeline.load_choice().non_zeros == 300
    by_description(box, "exponents (p)").value = "8, x"
    assert "not saved" in status_of(box) and pipeline.load_choice().exponents == [6.0, 2.0]
    by_description(box, "exponents (p)").value = "8, 3"
    centre = by_description(box, "centre on the anchors' mean")
    assert centre.value is pipeline.Choice().centre
    centre.value = not centre.value
    assert pipeline.load_choice().centre is centre.value


def test_folder_datasets_take_their_path_from_a_box(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    box = widgets.choice_widgets(pipeline.Choice())
    folder = by_description(box, "dataset folder")
    assert folder.layout.display == "none"
    by_description(box, "dataset").value = "imagefolder"
    assert folder.layout.display == "" and "not saved" in status_of(box)
    assert pipeline.load_choice() == pipeline.Choice(), "an imagefolder without a path is not saved"
    folder.value = "/data/flowers"
    assert pipeline.load_choice().dataset == "imagefolder:/data/flowers"
    again = widgets.choice_widgets(pipeline.load_choice())
    assert by_description(again, "dataset").value == "imagefolder"
    assert by_description(again, "dataset folder").value == "/data/flowers"


def test_precomputed_dropdown_only_when_the_registry_has_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    registry = tmp_path / "registry.json"
    registry.write_text('{"embeddings": {}}')
    monkeypatch.setenv("ASIF_REGISTRY", str(registry))
    box = widgets.choice_widgets(pipeline.Choice())
    with pytest.raises(KeyError):
        by_description(box, "precomputed")
    assert "none in the registry" in box.children[-3].value
    registry.write_text('{"embeddings": {"mine": {}}}')
    box = widgets.choice_widgets(pipeline.Choice())
    drop = by_description(box, "precomputed")
    assert drop.value == "" and drop.label == "none: embed here"  # not a blank dropdown
    drop.value = "mine"
    assert pipeline.load_choice().precomputed == "mine"
    drop.value = ""
    assert pipeline.load_choice().precomputed is None


def png(colour=(255, 0, 0), alpha=255):
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), colour + (alpha,)).save(buf, "PNG")
    return buf.getvalue()


def upload(box, *files):
    box.upload.value = tuple({"name": n, "type": "image/png", "size": len(b), "content": memoryview(b),
                              "last_modified": NOW} for n, b in files)


def test_upload_hands_every_decoded_image_and_keeps_the_skipped_line():
    got = []
    box = widgets.upload_widget(lambda names, images: got.append((names, images)) or "<p>done</p>")
    assert box.panel.apply.disabled
    upload(box, ("ok.png", png(alpha=0)), ("broken.jpg", b"nope"), ("blue.png", png((0, 0, 255))))
    names, images = got[-1]
    assert names == ["ok.png", "blue.png"] and np.asarray(images[0])[0, 0].tolist() == [255, 255, 255]
    assert len(box.panel.thumbnails.children) == 2 and not box.panel.apply.disabled
    assert "skipped broken.jpg" in box.panel.notes.value and box.panel.result.children[0].value == "<p>done</p>"
    assert box.upload.value == (), "reset, so the same file can be chosen again"
    box.panel.apply.click()
    assert len(got) == 2 and got[-1][0] == names and "skipped broken.jpg" in box.panel.notes.value
    upload(box, ("red.png", png()))
    assert got[-1][0] == ["red.png"] and box.panel.notes.value == "", "the old skip line goes with its upload"


def test_classifier_widget_ranks_every_photo_and_apply_uses_edited_labels():
    def classify(image, labels):
        labels = [l.strip() for l in labels if l.strip()]
        if not labels:
            raise ASIFInputError("labels: empty class list; type at least one label")
        red = np.asarray(image)[0, 0, 0] / 255
        return sorted(((l, red if l == "red" else 1 - red) for l in labels), key=lambda x: -x[1])

    box = widgets.classifier_widget(classify, ["red", "blue"])
    upload(box, ("r.png", png()), ("b.png", png((0, 0, 255))))
    shown = box.panel.result.children[0].value
    assert shown.count("asif-ranked") == 2 and shown.index("r.png") < shown.index("b.png")
    assert shown.index("1.000</td><td>red") < shown.index("1.000</td><td>blue")
    box.text.value = "red, blue, green"
    box.panel.apply.click()
    assert box.panel.result.children[0].value.count("green") == 2
    box.text.value = " , "
    box.panel.apply.click()
    assert box.panel.notes.value.count("<div") == 1 and "empty class list" in box.panel.notes.value
    assert box.panel.result.children == ()


def test_similarity_widget_draws_a_heatmap_and_refuses_empty_captions():
    seen = []

    def similarity(images, captions):
        if not captions:
            raise ASIFInputError("give at least one image and one caption")
        seen.append(captions)
        return np.full((len(images), len(captions)), 0.5)

    box = widgets.similarity_widget(similarity, ["a sky", "the sea"])
    upload(box, ("x.png", png()))
    image = box.panel.result.children[0]
    assert image.format == "png" and image.value[:4] == b"\x89PNG" and seen[-1] == ["a sky", "the sea"]
    box.text.value = "\n  \n"
    box.panel.apply.click()
    assert "at least one image and one caption" in box.panel.notes.value and box.panel.result.children == ()


def test_accuracy_plot_curves_title_and_axis():
    rows = [{"n_anchors": n, "exponent": p, "acc1": a, "non_zeros": 50, "reduce": "max"} for n, p, a in
            [(64, 8.0, 0.2), (128, 8.0, 0.3), (300, 8.0, 0.35), (64, 1.0, 0.1), (128, 1.0, 0.15), (300, 1.0, 0.2)]]
    fig = widgets.plot_accuracy_vs_anchors(rows, chance=0.1, clip_acc=0.5, title="t")
    ax = fig.axes[0]
    curves = {line.get_label(): np.asarray(line.get_ydata(), dtype=float).tolist() for line in ax.get_lines()}
    assert curves["ASIF, p = 8"] == [20.0, 30.0, 35.0] and curves["ASIF, p = 1"] == [10.0, 15.0, 20.0]
    assert "chance (10%)" in curves and "CLIP baseline" in curves
    assert ax.get_title() == "t\nk = 50   p = 8, 1   reduce = max"
    centred = widgets.plot_accuracy_vs_anchors([dict(r, centre=True) for r in rows], chance=0.1, title="t")
    assert centred.axes[0].get_title() == "t\nk = 50   p = 8, 1   reduce = max   centred"
    lo, hi = ax.get_xlim()
    assert 300 < hi < 300 * 1.2 and 64 / 1.2 < lo < 64
    assert [float(t) for t in ax.get_xticks()] == [64, 128, 300]
    # the k ablation: one curve per k, and the majority-class rate as a line
    ablation = [dict(r, non_zeros=k, acc1=r["acc1"] + k / 1000) for k in (100, 800) for r in rows if r["exponent"] == 8]
    fig = widgets.plot_accuracy_vs_anchors(ablation, chance=0.1, majority=0.25, curve="non_zeros")
    curves = {line.get_label(): np.asarray(line.get_ydata(), dtype=float).tolist() for line in fig.axes[0].get_lines()}
    assert curves["ASIF, k = 100"] == pytest.approx([30.0, 40.0, 45.0])
    assert curves["ASIF, k = 800"] == pytest.approx([100.0, 110.0, 115.0])
    assert curves["majority class (25%)"] == [25.0, 25.0]
    assert fig.axes[0].get_title() == "k = 100, 800   p = 8   reduce = max"
    # k in numeric order in the title, not as text ("1600" before "400")
    fig = widgets.plot_accuracy_vs_anchors([dict(r, non_zeros=k) for k in (1600, 400) for r in rows
                                            if r["exponent"] == 8], chance=0.1, curve="non_zeros")
    assert fig.axes[0].get_title() == "k = 400, 1600   p = 8   reduce = max"


def test_similarity_heatmap_labels_show_weak_scores():
    photo = Image.new("RGB", (8, 8), (0, 0, 255))
    caption = "a very long caption about the deep blue sea at night"
    fig = widgets.plot_similarity(np.array([[0.25, 0.000123, 0.0]]), [photo], ["blue"], ["a sky", caption, "x"])
    ax = fig.axes[1]
    assert [t.get_text() for t in ax.texts] == ["0.25", "1.2e-04", "0"]
    label = ax.get_xticklabels()[1].get_text()
    words = label.split()
    assert words[-1] == "\u2026" and " ".join(words[:-1]) == " ".join(caption.split()[:len(words) - 1])


def test_wrap_breaks_at_words():
    assert widgets.wrap("a photo of a red motorcycle", 10) == "a photo of\na red\nmotorcycle"
    assert widgets.wrap("one two three four five six", 7, 2) == "one two\nthree \u2026"
    assert widgets.wrap("internationalisation", 5) == "internationalisation"


def test_confusion_plot_draws_counts():
    fig = widgets.plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["t-shirt", "trousers"], title="x")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t-shirt", "trousers"]
