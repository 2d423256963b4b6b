"""Widgets and plots: a dropdown change saves the choice; figures draw what they are given."""
import datetime
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from asif import pipeline, widgets  # noqa: E402

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def test_dropdown_change_saves_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    seen = []
    box = widgets.choice_widgets(pipeline.Choice(), on_change=seen.append)
    dataset = next(d for d in box.children if getattr(d, "description", "") == "dataset")
    dataset.value = "cifar10"
    assert pipeline.load_choice().dataset == "cifar10" and seen[-1].dataset == "cifar10"


def test_upload_widget_hands_decoded_images_and_reports_bad_files(capsys):
    got = []
    box = widgets.upload_widget(lambda names, images: got.append((names, images)))
    up = box.children[0]
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")
    up.value = ({"name": "ok.png", "type": "image/png", "size": len(buf.getvalue()),
                 "content": memoryview(buf.getvalue()), "last_modified": NOW},
                {"name": "broken.jpg", "type": "image/jpeg", "size": 4, "content": memoryview(b"nope"),
                 "last_modified": NOW})
    names, images = got[-1]
    assert names == ["ok.png"] and np.asarray(images[0])[0, 0].tolist() == [255, 255, 255]
    # without a kernel an Output widget captures nothing: the message goes to stdout
    assert "skipped broken.jpg" in capsys.readouterr().out


def test_plots_draw_their_data():
    rows = [{"n_anchors": n, "exponent": p, "acc1": a} for n, p, a in
            [(64, 8.0, 0.2), (128, 8.0, 0.3), (64, 1.0, 0.1), (128, 1.0, 0.15)]]
    fig = widgets.plot_accuracy_vs_anchors(rows, chance=0.1, clip_acc=0.5, title="t")
    ax = fig.axes[0]
    curves = {line.get_label(): np.asarray(line.get_ydata(), dtype=float).tolist() for line in ax.get_lines()}
    assert curves["ASIF, p = 8"] == [20.0, 30.0] and curves["ASIF, p = 1"] == [10.0, 15.0]
    assert "chance (10%)" in curves and "CLIP baseline" in curves
    photo = Image.new("RGB", (8, 8), (0, 0, 255))
    fig = widgets.plot_similarity(np.array([[0.25, 0.75]]), [photo], ["blue"], ["a sky", "the sea"])
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["0.25", "0.75"]
