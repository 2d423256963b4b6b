"""Widgets and plots for the notebooks: ipywidgets and matplotlib only, no logic of their own.

Every widget callback calls a plain function (asif.pipeline, asif.demos)
that the headless notebook cells and the tests call too, so the code behind
a click runs in CI.
"""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import numpy as np

from asif.environment import in_colab, machine_summary
from asif.errors import ASIFInputError
from asif.images import load_image
from asif.pipeline import Choice, choice_options, load_choice, save_choice

__all__ = ["show_machine", "choice_widgets", "upload_widget", "classifier_widget", "colab_camera_capture",
           "plot_accuracy_vs_anchors", "plot_similarity", "plot_explanations", "plot_anchor_samples"]


def show_machine() -> dict:
    info = machine_summary()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return info


def choice_widgets(choice: Choice | None = None, on_change: Callable[[Choice], None] | None = None):
    """Dropdowns for encoders, dataset, anchor set and precomputed embeddings.

    Each change updates the choice and saves it with ``save_choice`` (the
    function the headless path calls); ``on_change`` then gets the new choice.
    """
    import ipywidgets as w
    choice = choice or load_choice()
    options = choice_options()
    boxes = {}
    for key, opts in options.items():
        value = getattr(choice, key)
        if value not in [v for _, v in opts]:
            opts = opts + [(f"{value}  (custom)", value)]
        boxes[key] = w.Dropdown(options=opts, value=value, description=key.replace("_", " "),
                                style={"description_width": "120px"}, layout=w.Layout(width="560px"))
    status = w.HTML()

    def changed(_=None):
        for key, box in boxes.items():
            setattr(choice, key, box.value)
        path = save_choice(choice)
        status.value = f"<small>saved to {path.name}</small>"
        if on_change:
            on_change(choice)

    for box in boxes.values():
        box.observe(changed, names="value")
    return w.VBox(list(boxes.values()) + [status])


def plot_accuracy_vs_anchors(rows: Sequence[dict], chance: float, clip_acc: float | None = None,
                             title: str = "", metric: str = "acc1"):
    """Paper Fig. 5: accuracy against the number of anchors (log x), one curve per exponent."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in sorted({r["exponent"] for r in rows}, reverse=True):
        pts = sorted((r["n_anchors"], r[metric]) for r in rows if r["exponent"] == p)
        ax.plot([n for n, _ in pts], [100 * a for _, a in pts], marker="o", label=f"ASIF, p = {p:g}")
    ax.axhline(100 * chance, color="grey", linestyle=":", label=f"chance ({100 * chance:.0f}%)")
    if clip_acc is not None:
        ax.axhline(100 * clip_acc, color="black", linestyle="--", label="CLIP baseline")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import ScalarFormatter
    ax.xaxis.set_major_formatter(ScalarFormatter())  # anchor counts as numbers, not powers
    ax.set_xlabel("number of anchors")
    ax.set_ylabel("zero-shot top-1 accuracy (%)" if metric == "acc1" else metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_similarity(sim: np.ndarray, images: Sequence, image_names: Sequence[str], captions: Sequence[str],
                    title: str = "ASIF image-text similarity"):
    """Heatmap with image thumbnails as row labels and captions as columns."""
    import matplotlib.pyplot as plt
    n_i, n_t = sim.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.2 * n_t, 1.0 + 1.0 * n_i),
                             gridspec_kw={"width_ratios": [1, max(n_t, 1) * 1.1]})
    thumbs, ax = axes
    thumbs.axis("off")
    for i, im in enumerate(images):
        sub = thumbs.inset_axes([0, 1 - (i + 1) / n_i, 1, 1 / n_i])
        sub.imshow(load_image(im))
        sub.axis("off")
    m = ax.imshow(sim, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n_t), [c if len(c) < 40 else c[:37] + "..." for c in captions], rotation=35, ha="right")
    ax.set_yticks(range(n_i), image_names)
    for i in range(n_i):
        for j in range(n_t):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center",
                    color="white" if sim[i, j] < sim.max() * 0.6 else "black", fontsize=8)
    fig.colorbar(m, ax=ax, fraction=0.03)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def upload_widget(on_images: Callable[[list, list], None], description: str = "Upload images"):
    """A FileUpload that hands (names, PIL images) to ``on_images``; unreadable files are reported, not fatal."""
    import ipywidgets as w
    up = w.FileUpload(accept="image/*", multiple=True, description=description)
    out = w.Output()

    def changed(change):
        names, images = [], []
        for f in change["new"]:
            try:
                images.append(load_image(bytes(f["content"]), name=f["name"]))  # the one decoder, as for anchors
                names.append(f["name"])
            except ASIFInputError as e:
                with out:
                    print(f"skipped {f['name']}: {e}")
        if images:
            with out:
                out.clear_output(wait=True)
                on_images(names, images)

    up.observe(changed, names="value")
    return w.VBox([up, out])


def plot_explanations(result: dict, anchors, test_image=None, top: int = 6):
    """Side by side: the test image, then for the predicted and true class the anchors with their share."""
    import matplotlib.pyplot as plt
    roles = ["predicted", "true"]
    fig, axes = plt.subplots(2, top + 1, figsize=(1.9 * (top + 1), 5.2))
    for r, role in enumerate(roles):
        ex = result[f"{role}_explanation"]
        ax = axes[r, 0]
        if test_image is not None:
            ax.imshow(load_image(test_image))
        ax.set_title(f"{role}: {ex['class']}\nscore {ex['score']:.3f}", fontsize=8)
        ax.axis("off")
        for c in range(top):
            ax = axes[r, c + 1]
            ax.axis("off")
            if c < len(ex["anchors"]):
                a = ex["anchors"][c]
                ax.imshow(anchors.thumbnail(a["anchor"], 128))
                cap = "\n".join(textwrap.wrap(a["caption"], 22)[:3])
                ax.set_title(f"{100 * a['share']:.0f}% of score\n{cap}", fontsize=7)
    fig.tight_layout()
    return fig


def colab_camera_capture(quality: float = 0.8, timeout_s: float = 60):
    """Take a photo with the browser camera in Colab (JavaScript); returns an RGB PIL image."""
    import base64
    from google.colab.output import eval_js  # only in Colab
    from IPython.display import Javascript, display
    js = """
    async function takePhoto(quality) {
      const div = document.createElement('div');
      const button = document.createElement('button');
      button.textContent = 'Capture';
      div.appendChild(button);
      const video = document.createElement('video');
      video.style.display = 'block';
      const stream = await navigator.mediaDevices.getUserMedia({video: true});
      document.body.appendChild(div);
      div.appendChild(video);
      video.srcObject = stream;
      await video.play();
      google.colab.output.setIframeHeight(document.documentElement.scrollHeight, true);
      await new Promise((resolve) => button.onclick = resolve);
      const canvas = document.createElement('canvas');
      canvas.width = video.videoWidth; canvas.height = video.videoHeight;
      canvas.getContext('2d').drawImage(video, 0, 0);
      stream.getVideoTracks()[0].stop();
      div.remove();
      return canvas.toDataURL('image/jpeg', quality);
    }"""
    display(Javascript(js))
    data = eval_js(f"takePhoto({quality})", timeout_sec=timeout_s)
    return load_image(base64.b64decode(data.split(",", 1)[1]), name="camera photo")


def classifier_widget(classify: Callable[[object, list], list], labels: Sequence[str]):
    """Labels box + image source (camera in Colab, upload elsewhere) -> ranked list.

    ``classify(image, labels)`` is the same function the headless cell calls.
    """
    import ipywidgets as w
    text = w.Textarea(value=", ".join(labels), description="labels", layout=w.Layout(width="560px"))
    out = w.Output()

    def run(image):
        with out:
            out.clear_output(wait=True)
            try:
                ranked = classify(image, [l for l in text.value.split(",")])
            except ASIFInputError as e:
                print(e)
                return
            for label, score in ranked:
                print(f"{score:6.3f}  {label}")

    if in_colab():
        button = w.Button(description="Take a picture")
        button.on_click(lambda _: run(colab_camera_capture()))
        source = button
    else:
        source = upload_widget(lambda names, images: run(images[0]), description="Upload a photo")
    return w.VBox([text, source, out])


def plot_anchor_samples(anchors, n: int = 8, seed: int = 0):
    """A row of anchor images with their captions: what the coupled data looks like."""
    import matplotlib.pyplot as plt
    n = min(n, len(anchors))
    pick = np.random.default_rng(seed).choice(len(anchors), size=n, replace=False)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.6), squeeze=False)
    for ax, i in zip(axes[0], pick):
        ax.imshow(anchors.thumbnail(int(i), 128))
        ax.set_title("\n".join(textwrap.wrap(anchors.captions[i], 20)[:4]), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig
