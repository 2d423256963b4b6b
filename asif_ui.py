"""Widgets and plots that the notebooks share.

The notebooks hold narrative, parameters and calls; everything they compute
lives here or below (asif_data, asif_encoders, asif_core). Every widget
callback calls a plain function that the headless path also calls, so the
code behind a click runs in CI too.

Modes: ``ASIF_SMOKE=1`` shrinks datasets and anchor sets (CI); in Colab the
notebooks install the project and use the GPU through the core.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import asif_core as ac
import asif_data
import asif_encoders
from asif_data import is_smoke  # re-exported: the notebooks call ui.is_smoke()

__all__ = [
    "is_smoke", "in_colab", "machine_summary", "show_machine", "Choice", "load_choice", "save_choice",
    "choice_options", "choice_widgets", "prepare", "build_model", "anchor_counts", "zero_shot_curve",
    "clip_zero_shot", "plot_accuracy_vs_anchors", "save_zero_shot", "sample_photos", "similarity_matrix",
    "plot_similarity", "upload_widget", "explain_prediction", "plot_explanations", "universal_classifier",
    "classifier_widget", "colab_camera_capture", "build_dir", "plot_anchor_samples", "results_table",
]


# ---------------------------------------------------------------------------
# where we run
# ---------------------------------------------------------------------------

def in_colab() -> bool:
    return "google.colab" in sys.modules


def machine_summary() -> dict:
    """Device, GPU memory and library versions: what a result was computed on."""
    import torch
    dev = ac.pick_device("auto")
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(dev), "smoke": is_smoke(), "colab": in_colab()}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        out.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_GiB=round(total / 2**30, 1),
                   gpu_free_GiB=round(free / 2**30, 1))
    for mod in ("numpy", "torch", "timm", "sentence_transformers", "open_clip", "scipy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # an optional library that is absent is simply not reported
            out[mod] = None
    return out


def show_machine() -> dict:
    info = machine_summary()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return info


# ---------------------------------------------------------------------------
# the user's choice of encoders, dataset and anchors, shared by the notebooks
# ---------------------------------------------------------------------------

@dataclass
class Choice:
    """What the notebooks run on; saved by 00_setup, read by the others."""
    image_encoder: str = asif_encoders.DEFAULT_IMAGE_ENCODER
    text_encoder: str = asif_encoders.DEFAULT_TEXT_ENCODER
    dataset: str = "fashion-mnist"
    anchor_set: str = "clipart+tuxpaint"
    non_zeros: int = 800
    exponents: list = field(default_factory=lambda: [8.0, 3.0, 1.0])
    precomputed: str | None = None  # a registry name, fetched instead of embedding


def choice_path() -> Path:
    return asif_data.cache_root() / "choice.json"


def load_choice() -> Choice:
    """The saved choice, or the offline defaults when nothing was saved."""
    path = choice_path()
    if not path.exists():
        return Choice()
    saved = json.loads(path.read_text())
    known = Choice.__dataclass_fields__
    return Choice(**{k: v for k, v in saved.items() if k in known})


def save_choice(choice: Choice) -> Path:
    ac.atomic_write_json(choice_path(), asdict(choice))
    return choice_path()


def choice_options() -> dict:
    """Dropdown options: (label, value) pairs, offline ones first and marked."""
    enc = asif_encoders.list_encoders()
    def opts(modality):
        return [(f"{e['name']}  ({'offline' if e['offline'] else 'online'})", e["name"])
                for e in enc if e["modality"] == modality]
    datasets = [("fashion-mnist  (offline, Debian package)", "fashion-mnist"),
                ("cifar100  (online, torchvision)", "cifar100"), ("cifar10  (online, torchvision)", "cifar10"),
                ("pets  (online, torchvision)", "pets"), ("imagenet  (local val folder: imagenet:PATH)", "imagenet")]
    anchors = [("clipart+tuxpaint  (offline, general captions)", "clipart+tuxpaint"),
               ("clipart  (offline)", "clipart"), ("tuxpaint  (offline)", "tuxpaint"),
               ("fashion-mnist-train  (offline, in-domain captions)", "fashion-mnist-train")]
    precomputed = [("none: embed here", None)] + [(f"{k}  (registry, download)", k) for k in asif_data.load_registry()]
    return {"image_encoder": opts("image"), "text_encoder": opts("text"), "dataset": datasets,
            "anchor_set": anchors, "precomputed": precomputed}


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


# ---------------------------------------------------------------------------
# embeddings and the model
# ---------------------------------------------------------------------------

def prepare(choice: Choice, progress: bool = True, limit: int | None = None):
    """Embeddings for the choice, built through the cache (or fetched from the registry).

    Returns (EvalEmbeddings, AnchorEmbeddings). In smoke mode both are small.
    """
    if choice.precomputed:
        asif_data.fetch(choice.precomputed, progress=progress)
    image_encoder = asif_encoders.load_image_encoder(choice.image_encoder)
    text_encoder = asif_encoders.load_text_encoder(choice.text_encoder)
    evals = asif_data.load_eval_embeddings(choice.dataset, image_encoder, text_encoder, limit=limit, progress=progress)
    anchors = asif_data.load_anchor_embeddings(choice.anchor_set, image_encoder, text_encoder, limit=limit,
                                               progress=progress)
    return evals, anchors


def build_model(anchors, non_zeros: int = 800, exponent: float = 8.0, device="auto") -> ac.ASIF:
    """An ASIF model over aligned anchor embeddings (asif_data.AnchorEmbeddings)."""
    return ac.ASIF(anchors.A_img, anchors.A_txt, non_zeros, exponent, captions=anchors.captions, device=device)


# ---------------------------------------------------------------------------
# 01: zero-shot accuracy against the number of anchors (paper Fig. 5)
# ---------------------------------------------------------------------------

def anchor_counts(n_max: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` up to n_max, and n_max itself: the x axis of Fig. 5."""
    if n_max < 1:
        raise ac.ASIFInputError("no anchors: the anchor set is empty")
    counts, n = [], min(smallest, n_max)
    while n < n_max:
        counts.append(n)
        n *= 2
    return counts + [n_max]


def zero_shot_curve(evals, anchors, exponents: Sequence[float] = (8, 3, 1), non_zeros: int = 800,
                    reduce: str = "max", counts: Sequence[int] | None = None, device="auto",
                    progress: bool = True) -> list[dict]:
    """Accuracy for every (anchor count, exponent) in one pass (asif_core.sweep)."""
    counts = counts or anchor_counts(len(anchors))
    return ac.sweep(anchors.A_img, anchors.A_txt, evals.images, evals.labels, evals.prompts,
                    len(evals.classnames), n_anchors=counts, exponents=exponents, non_zeros=non_zeros,
                    reduce=reduce, device=device, progress=progress)


def clip_zero_shot(evals, model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k",
                   device="auto", limit: int | None = None) -> tuple[dict | None, str]:
    """CLIP's zero-shot metrics on the same images and prompts, or (None, why) when it can't run.

    CLIP is the baseline: its weights must be downloadable (online) or cached.
    """
    try:
        clip = asif_encoders.load_clip(model, pretrained, device=device)
    except Exception as e:  # no network, no open_clip: the notebook says why and goes on
        return None, f"CLIP baseline not run: {e}"
    images = evals.dataset.images
    keep = np.arange(len(images)) if limit is None else np.arange(min(limit, len(images)))
    x = clip.encode_image([images[i] for i in keep])
    t = clip.encode_text(evals.dataset.prompts())
    c, n_t = len(evals.classnames), len(evals.templates)
    # CLIP's own recipe: the normalised mean of the templates' embeddings
    cls = t.reshape(c, n_t, -1).mean(1)
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    return ac.classification_metrics(x @ cls.T, evals.dataset.labels[keep]), f"CLIP {model}/{pretrained}"


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


def save_zero_shot(rows, path, *, dataset: str, model: str, params: dict, wall_time: float | None = None) -> dict:
    """Write the sweep as clip_benchmark-style JSON (atomic); return the dict."""
    res = ac.zero_shot_result(rows, dataset=dataset, model=model, params=params, wall_time=wall_time)
    ac.atomic_write_json(path, res)
    return res


# ---------------------------------------------------------------------------
# 02: image-text similarity
# ---------------------------------------------------------------------------

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


def sample_photos(names: Sequence[str] = SAMPLE_PHOTOS) -> dict:
    """{name: RGB PIL image} of scikit-image's sample photos (offline)."""
    from PIL import Image
    import skimage.data
    out = {}
    for n in names:
        a = getattr(skimage.data, n)()
        a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle is (left, right, disparity)
        out[n.replace("stereo_", "")] = Image.fromarray(a).convert("RGB")
    return out


def similarity_matrix(model: ac.ASIF, image_encoder, text_encoder, images: Sequence, captions: Sequence[str]) -> np.ndarray:
    """ASIF similarity [n_images, n_captions] of raw images (PIL or paths) and captions."""
    if not len(images) or not len(captions):
        raise ac.ASIFInputError("give at least one image and one caption")
    return model.similarity(image_encoder.encode(list(images), progress=False),
                            text_encoder.encode(list(captions), progress=False))


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
        sub.imshow(asif_encoders.open_image(im))
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
    import io
    import ipywidgets as w
    from PIL import Image
    up = w.FileUpload(accept="image/*", multiple=True, description=description)
    out = w.Output()

    def changed(change):
        names, images = [], []
        for f in change["new"]:
            try:
                images.append(Image.open(io.BytesIO(bytes(f["content"]))).convert("RGB"))
                names.append(f["name"])
            except Exception as e:
                with out:
                    print(f"skipped {f['name']}: not a readable image ({e})")
        if images:
            with out:
                out.clear_output(wait=True)
                on_images(names, images)

    up.observe(changed, names="value")
    return w.VBox([up, out])


# ---------------------------------------------------------------------------
# 03: interpretability
# ---------------------------------------------------------------------------

def explain_prediction(model: ac.ASIF, evals, index: int, top: int = 8) -> dict:
    """Prediction of test image ``index`` and the anchors behind it, for the predicted and the true class.

    For a class, the explaining prompt is its best template (the one that
    gives the class its score under reduce="max").
    """
    if not 0 <= index < len(evals.labels):
        raise ac.ASIFInputError(f"index {index} out of range 0..{len(evals.labels) - 1}")
    x = evals.images[index:index + 1]
    rx = model.image_representation(x)
    rt = model.text_representation(evals.prompts)
    c, t = len(evals.classnames), len(evals.templates)
    sim = ac.similarity(rx, rt).cpu().numpy()[0].reshape(c, t)
    scores = sim.max(1)
    pred, true = int(scores.argmax()), int(evals.labels[index])
    out = {"index": index, "predicted": pred, "true": true, "scores": scores, "classnames": evals.classnames}
    for role, cls in (("predicted", pred), ("true", true)):
        j = int(sim[cls].argmax())
        parts = ac.explain(rx, rt, top=top, text_row=cls * t + j)
        for p in parts:
            p["caption"] = model.captions[p["anchor"]] if model.captions else str(p["anchor"])
        out[f"{role}_explanation"] = {"class": evals.classnames[cls], "prompt": evals.dataset.prompts()[cls * t + j],
                                      "score": float(sim[cls, j]), "anchors": parts}
    return out


def plot_explanations(result: dict, anchors, test_image=None, top: int = 6):
    """Side by side: the test image, then for the predicted and true class the anchors with their share."""
    import matplotlib.pyplot as plt
    import textwrap
    roles = ["predicted", "true"]
    fig, axes = plt.subplots(2, top + 1, figsize=(1.9 * (top + 1), 5.2))
    for r, role in enumerate(roles):
        ex = result[f"{role}_explanation"]
        ax = axes[r, 0]
        if test_image is not None:
            ax.imshow(asif_encoders.open_image(test_image))
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


# ---------------------------------------------------------------------------
# 04: the universal classifier (webcam)
# ---------------------------------------------------------------------------

def universal_classifier(model: ac.ASIF, image_encoder, text_encoder, image, labels: Sequence[str],
                         templates: Sequence[str] = ("a photo of a {c}.",), reduce: str = "max") -> list[tuple[str, float]]:
    """Rank free-text ``labels`` for one image (PIL/path): [(label, score)], best first."""
    labels = [l.strip() for l in labels if l and l.strip()]
    if not labels:
        raise ac.ASIFInputError("labels: empty class list; type at least one label")
    if any("{c}" not in t for t in templates):
        raise ac.ASIFInputError("templates: each needs the {c} placeholder")
    prompts = [t.replace("{c}", l) for l in labels for t in templates]
    x = image_encoder.encode([image], progress=False)
    scores = model.classify(x, text_encoder.encode(prompts, progress=False), len(labels), reduce=reduce)[0]
    order = np.argsort(-scores, kind="stable")
    return [(labels[i], float(scores[i])) for i in order]


def colab_camera_capture(quality: float = 0.8, timeout_s: float = 60):
    """Take a photo with the browser camera in Colab (JavaScript); returns an RGB PIL image."""
    import base64
    import io
    from PIL import Image
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
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")


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
            except ac.ASIFInputError as e:
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


# ---------------------------------------------------------------------------
# small helpers the notebooks share
# ---------------------------------------------------------------------------

def build_dir() -> Path:
    """Where notebooks leave figures and results: $ASIF_BUILD, else build/ at the project root."""
    path = Path(os.environ.get("ASIF_BUILD") or Path(__file__).resolve().parent / "build")
    path.mkdir(parents=True, exist_ok=True)
    return path


def plot_anchor_samples(anchors, n: int = 8, seed: int = 0):
    """A row of anchor images with their captions: what the coupled data looks like."""
    import matplotlib.pyplot as plt
    import textwrap
    n = min(n, len(anchors))
    pick = np.random.default_rng(seed).choice(len(anchors), size=n, replace=False)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.6), squeeze=False)
    for ax, i in zip(axes[0], pick):
        ax.imshow(anchors.thumbnail(int(i), 128))
        ax.set_title("\n".join(textwrap.wrap(anchors.captions[i], 20)[:4]), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def results_table(rows: Sequence[dict], metric: str = "acc1") -> str:
    """Markdown table: one row per anchor count, one column per exponent."""
    ps = sorted({r["exponent"] for r in rows}, reverse=True)
    ns = sorted({r["n_anchors"] for r in rows})
    val = {(r["n_anchors"], r["exponent"]): r[metric] for r in rows}
    lines = ["| anchors | " + " | ".join(f"p = {p:g}" for p in ps) + " |", "|---:|" + "---:|" * len(ps)]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(f"{100 * val[(n, p)]:.1f}%" for p in ps) + " |")
    return "\n".join(lines)
