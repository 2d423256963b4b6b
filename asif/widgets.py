"""Widgets and plots for the notebooks: ipywidgets and matplotlib only, no logic of their own.

Every widget callback calls a plain function (asif.pipeline, asif.demos)
that the headless notebook cells and the tests call too, so the code behind
a click runs in CI.
"""
from __future__ import annotations

import html
import io
import textwrap
from typing import Callable, Sequence

import numpy as np

from asif.environment import in_colab, machine_summary
from asif.errors import ASIFInputError
from asif.images import load_image
from asif.pipeline import Choice, choice_options, load_choice, parse_exponents, save_choice

__all__ = ["show_machine", "choice_widgets", "ImagePanel", "upload_widget", "similarity_widget", "classifier_widget",
           "colab_camera_capture", "plot_accuracy_vs_anchors", "plot_confusion_matrix", "plot_similarity",
           "plot_explanations", "plot_anchor_samples", "figure_png", "wrap", "similarity_label", "ranked_html"]


def show_machine() -> dict:
    info = machine_summary()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return info


FOLDER_DATASETS = ("imagenet", "imagefolder")  # datasets read from a local folder: they need its path


def choice_widgets(choice: Choice | None = None, on_change: Callable[[Choice], None] | None = None):
    """Dropdowns for encoders, dataset (with a folder box for local datasets), anchor set and
    precomputed embeddings (when the registry has any), and boxes for k and the exponents p.

    Each valid change is saved with ``save_choice`` (the function the headless
    path calls) and the status line says that the cells below still show the
    previous choice; ``on_change`` then gets the new choice.
    """
    import ipywidgets as w
    choice = choice or load_choice()
    style, layout = {"description_width": "120px"}, w.Layout(width="560px")
    boxes = {}
    for key, opts in choice_options().items():
        if key == "precomputed" and len(opts) == 1:
            continue  # the registry is empty: nothing to fetch, no dropdown
        value = getattr(choice, key) or ""
        if key == "dataset":
            value = value.partition(":")[0]
        if value not in [v for _, v in opts]:
            opts = opts + [(f"{value}  (custom)", value)]
        boxes[key] = w.Dropdown(options=opts, value=value, description=key.replace("_", " "), style=style,
                                layout=layout)
    folder = w.Text(value=choice.dataset.partition(":")[2], description="dataset folder", style=style,
                    layout=w.Layout(width="560px"), placeholder="path of the folder (one subfolder per class)",
                    continuous_update=False)
    non_zeros = w.BoundedIntText(value=choice.non_zeros, min=1, max=10 ** 9, description="non_zeros (k)",
                                 style=style, layout=w.Layout(width="260px"))
    exponents = w.Text(value=", ".join(f"{p:g}" for p in choice.exponents), description="exponents (p)",
                       style=style, layout=w.Layout(width="360px"), continuous_update=False)
    centre = w.Checkbox(value=bool(choice.centre), description="centre on the anchors' mean", indent=False,
                        layout=w.Layout(width="260px"),
                        tooltip="off: the paper's method as published (docs/default_anchors.md)")
    status = w.HTML()

    def show_folder():
        folder.layout.display = "" if boxes["dataset"].value in FOLDER_DATASETS else "none"

    def changed(_=None):
        show_folder()
        try:
            kind, path = boxes["dataset"].value, folder.value.strip()
            if kind == "imagefolder" and not path:
                raise ASIFInputError("imagefolder: type the folder's path in the box below the dropdowns")
            new = dict(dataset=f"{kind}:{path}" if path and kind in FOLDER_DATASETS else kind,
                       non_zeros=int(non_zeros.value), exponents=parse_exponents(exponents.value),
                       centre=bool(centre.value),
                       **{k: (b.value or None) if k == "precomputed" else b.value
                          for k, b in boxes.items() if k != "dataset"})
        except ASIFInputError as e:
            status.value = f"<span style='color:#b00'>not saved: {html.escape(str(e))}</span>"
            return
        for key, value in new.items():
            setattr(choice, key, value)
        path = save_choice(choice)
        status.value = (f"saved to <code>{html.escape(path.name)}</code>. <b>The cells below still show the "
                        "previous choice</b>: run them again (Run &#9656; Run Selected Cell and All Below).")
        if on_change:
            on_change(choice)

    for box in [*boxes.values(), folder, non_zeros, exponents, centre]:
        box.observe(changed, names="value")
    show_folder()
    rows = list(boxes.values())
    rows.insert(list(boxes).index("dataset") + 1, folder)
    if "precomputed" not in boxes:
        rows.append(w.HTML("<small>precomputed embeddings: none in the registry yet (<code>asif publish</code> "
                           "adds a set); everything is embedded here</small>"))
    return w.VBox(rows + [w.HBox([non_zeros, exponents, centre]), status])


def wrap(text: str, width: int, lines: int = 3) -> str:
    """``text`` broken at word boundaries into at most ``lines`` lines of about ``width``
    characters, an ellipsis ending the last when there is more."""
    return "\n".join(textwrap.wrap(" ".join(str(text).split()), width, max_lines=lines, placeholder=" \u2026",
                                   break_long_words=False, break_on_hyphens=False))


def similarity_label(value: float) -> str:
    """A similarity as printed in a heatmap cell: two decimals, or two significant digits in
    scientific form below 0.01, so a weak but non-zero score never reads as 0.00."""
    if value == 0:
        return "0"
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.1e}"


def plot_accuracy_vs_anchors(rows: Sequence[dict], chance: float, clip_acc: float | None = None,
                             title: str = "", metric: str = "acc1", majority: float | None = None,
                             curve: str = "exponent"):
    """Paper Fig. 5: accuracy against the number of anchors (log x), one curve per exponent
    (``curve="non_zeros"``: one per k, the k ablation).

    Chance and, when given, the majority-class rate are drawn as lines. The
    title gets a second line with k, the exponents and reduce (from the
    rows); the x axis has a tick at every count and ends at the last point.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    exponents = sorted({r["exponent"] for r in rows}, reverse=True)
    name = {"exponent": "p", "non_zeros": "k"}[curve]
    for v in sorted({r[curve] for r in rows}, reverse=curve == "exponent"):
        pts = sorted((r["n_anchors"], r[metric]) for r in rows if r[curve] == v)
        ax.plot([n for n, _ in pts], [100 * a for _, a in pts], marker="o", label=f"ASIF, {name} = {v:g}")
    ax.axhline(100 * chance, color="grey", linestyle=":", label=f"chance ({100 * chance:.0f}%)")
    if majority is not None:
        ax.axhline(100 * majority, color="grey", linestyle="-.", label=f"majority class ({100 * majority:.0f}%)")
    if clip_acc is not None:
        ax.axhline(100 * clip_acc, color="black", linestyle="--", label="CLIP baseline")
    counts = sorted({r["n_anchors"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(counts))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in counts], rotation=45 if len(counts) > 6 else 0, fontsize=8)
    ax.set_xlim(counts[0] / 2 ** 0.25, counts[-1] * 2 ** 0.25)  # a quarter step of margin on the log axis
    ax.set_xlabel("number of anchors")
    ax.set_ylabel("zero-shot top-1 accuracy (%)" if metric == "acc1" else metric)
    params = []
    for key, name in (("non_zeros", "k"), ("reduce", "reduce")):
        values = [str(v) for v in sorted({r[key] for r in rows if key in r})]  # k in numeric order
        if values:
            params.append(f"{name} = {', '.join(values)}")
    params.insert(min(1, len(params)), "p = " + ", ".join(f"{p:g}" for p in exponents))
    centred = {r["centre"] for r in rows if "centre" in r}
    if centred:
        params.append("centred" if centred == {True} else "not centred" if centred == {False} else "centred or not")
    ax.set_title("\n".join(t for t in (wrap(title, 70, 2), "   ".join(params)) if t), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(confusion: np.ndarray, classnames: Sequence[str], title: str = ""):
    """Confusion matrix [C, C] (row = true class, column = predicted): each cell the share of the
    true class's images, counts written in the cells (up to 30 classes)."""
    import matplotlib.pyplot as plt
    confusion = np.asarray(confusion)
    c = len(classnames)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = min(12.0, 2.5 + 0.55 * c)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    m = ax.imshow(100 * share, cmap="Blues", vmin=0, vmax=100)
    names = [wrap(n, 14, 2) for n in classnames]
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(m, ax=ax, fraction=0.046, label="% of the true class")
    ax.set_title(wrap(title, 60, 2), fontsize=9)
    fig.tight_layout()
    return fig


def plot_similarity(sim: np.ndarray, images: Sequence, image_names: Sequence[str], captions: Sequence[str],
                    title: str = "ASIF image-text similarity"):
    """Heatmap with image thumbnails as row labels and captions (wrapped at word boundaries) as columns."""
    import matplotlib.pyplot as plt
    n_i, n_t = sim.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.2 * n_t, 1.6 + 1.0 * n_i),
                             gridspec_kw={"width_ratios": [1, max(n_t, 1) * 1.1]})
    thumbs, ax = axes
    thumbs.axis("off")
    for i, im in enumerate(images):
        sub = thumbs.inset_axes([0, 1 - (i + 1) / n_i, 1, 1 / n_i])
        sub.imshow(load_image(im))
        sub.axis("off")
    m = ax.imshow(sim, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n_t), [wrap(c, 16, 3) for c in captions], fontsize=8)
    ax.set_yticks(range(n_i), [wrap(n, 18, 2) for n in image_names], fontsize=8)
    for i in range(n_i):
        for j in range(n_t):
            ax.text(j, i, similarity_label(float(sim[i, j])), ha="center", va="center",
                    color="white" if sim[i, j] < sim.max() * 0.6 else "black", fontsize=8)
    fig.colorbar(m, ax=ax, fraction=0.03)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (a widget shows the PNG instead)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _thumbnail_png(image, size: int = 96) -> bytes:
    im = load_image(image).copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class ImagePanel:
    """The images a demo runs on, their thumbnails, an Apply button and the demo's result.

    ``run(names, images)`` returns what to show: an HTML string or a
    matplotlib figure (shown as a PNG). It runs on every new set of images
    and again on Apply, so text edited above (captions, labels) applies to
    the images already there. Files that could not be read and a bad input
    (``ASIFInputError``) show as one line each above the result and stay
    there until the next images arrive.
    """

    def __init__(self, run: Callable[[list, list], object]):
        import ipywidgets as w
        self.run, self.names, self.images, self.skipped = run, [], [], []
        self.apply = w.Button(description="Apply", disabled=True, icon="refresh",
                              tooltip="run again on the images shown, with the text above as it is now")
        self.apply.on_click(lambda _: self.refresh())
        self.notes = w.HTML()
        self.thumbnails = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.result = w.VBox()

    def set_images(self, names: list, images: list, skipped: Sequence[str] = ()) -> None:
        """New images (and the lines saying which files were skipped, and why): thumbnails, then the run."""
        import ipywidgets as w
        self.names, self.images, self.skipped = list(names), list(images), list(skipped)
        self.thumbnails.children = [
            w.VBox([w.Image(value=_thumbnail_png(im), format="png", layout=w.Layout(max_width="96px")),
                    w.HTML(f"<small>{html.escape(wrap(n, 16, 1))}</small>")]) for n, im in zip(names, images)]
        self.apply.disabled = not self.images
        self.refresh()

    def refresh(self) -> None:
        """Run the demo on the current images and show its result (or the one-line reason it can't)."""
        import ipywidgets as w
        lines = [f"skipped {s}" for s in self.skipped]
        shown = []
        if self.images:
            try:
                out = self.run(self.names, self.images)
                shown = [w.HTML(out) if isinstance(out, str) else
                         w.Image(value=figure_png(out), format="png", layout=w.Layout(max_width="100%"))]
            except ASIFInputError as e:
                lines.append(str(e))
        self.notes.value = "".join(f"<div style='color:#b00'>{html.escape(line)}</div>" for line in lines)
        self.result.children = shown


def upload_widget(on_images: Callable[[list, list], object], description: str = "Upload images",
                  above: Sequence = ()):
    """Upload (several files at once) + Apply, the thumbnails and ``on_images(names, images)``'s result
    (an HTML string or a figure, see ``ImagePanel``); ``above``: widgets shown first (the text boxes
    Apply re-reads). Unreadable files are skipped with a line that says so, not fatal.

    The box's ``upload`` and ``panel`` attributes are the FileUpload and the ImagePanel.
    """
    import ipywidgets as w
    panel = ImagePanel(on_images)
    up = w.FileUpload(accept="image/*", multiple=True, description=description, icon="upload",
                      layout=w.Layout(width="auto"))

    def changed(change):
        files = change["new"]
        if not files:
            return  # the reset below
        names, images, skipped = [], [], []
        for f in files:
            try:
                images.append(load_image(bytes(f["content"]), name=f["name"]))  # the one decoder, as for anchors
                names.append(f["name"])
            except ASIFInputError as e:
                skipped.append(f"{f['name']}: {e}")
        panel.set_images(names, images, skipped)
        up.value = ()  # choosing the same file again uploads it again

    up.observe(changed, names="value")
    box = w.VBox([*above, w.HBox([up, panel.apply]), panel.notes, panel.thumbnails, panel.result])
    box.upload, box.panel = up, panel
    return box


def similarity_widget(similarity: Callable[[list, list], np.ndarray], captions: Sequence[str]):
    """Captions box (one per line) + uploaded images -> the similarity heatmap; Apply redraws it for
    edited captions. ``similarity(images, captions)`` is the function the headless cell calls."""
    import ipywidgets as w
    text = w.Textarea(value="\n".join(captions), description="captions",
                      layout=w.Layout(width="560px", height="120px"))

    def show(names, images):
        caps = [c.strip() for c in text.value.splitlines() if c.strip()]
        return plot_similarity(similarity(images, caps), images, names, caps)

    box = upload_widget(show, "Upload images", above=[text])
    box.text = text
    return box


def ranked_html(name: str, ranked: Sequence[tuple[str, float]]) -> str:
    """One image's ranked labels as a small HTML table (class ``asif-ranked``), best first."""
    rows = "".join(f"<tr><td style='text-align:right;padding-right:8px'>{score:.3f}</td>"
                   f"<td>{html.escape(label)}</td></tr>" for label, score in ranked)
    return (f"<div class='asif-ranked' style='display:inline-block;vertical-align:top;margin-right:24px'>"
            f"<b>{html.escape(name)}</b><table>{rows}</table></div>")


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
                cap = wrap(a["caption"], 22, 3)
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
    """Labels box + images (camera in Colab, upload elsewhere) -> a ranked list per image; Apply
    ranks the same images again for edited labels.

    ``classify(image, labels)`` is the same function the headless cell calls.
    """
    import ipywidgets as w
    text = w.Textarea(value=", ".join(labels), description="labels", layout=w.Layout(width="560px"))

    def show(names, images):
        typed = text.value.split(",")
        return "".join(ranked_html(name, classify(image, typed)) for name, image in zip(names, images))

    if in_colab():
        panel = ImagePanel(show)
        button = w.Button(description="Take a picture", icon="camera", layout=w.Layout(width="auto"))
        button.on_click(lambda _: panel.set_images(["camera photo"], [colab_camera_capture()]))
        box = w.VBox([text, w.HBox([button, panel.apply]), panel.notes, panel.thumbnails, panel.result])
        box.panel = panel
    else:
        box = upload_widget(show, "Upload photos", above=[text])
    box.text = text
    return box


def plot_anchor_samples(anchors, n: int = 8, seed: int = 0):
    """A row of anchor images with their captions: what the coupled data looks like."""
    import matplotlib.pyplot as plt
    n = min(n, len(anchors))
    pick = np.random.default_rng(seed).choice(len(anchors), size=n, replace=False)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.9), squeeze=False)
    for ax, i in zip(axes[0], pick):
        ax.imshow(anchors.thumbnail(int(i), 128))
        ax.set_title(wrap(anchors.captions[i], 18, 4), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
