"""From names to results: what the command line and the notebooks run.

  Choice          what a run uses: encoders, dataset, anchor set, k, p (00_setup saves it)
  prepare         the choice's embeddings through the cache, and the two encoders, loaded once
  run_zero_shot   the accuracy-vs-anchors curve (paper Fig. 5) and its clip_benchmark JSON
  clip_zero_shot  CLIP on the same images and prompts, the baseline
  build_default   the offline default embedded end to end (``asif data build``)
  verify_cache    every shard of the cache hashed, the damaged ones removed (``asif data verify``)

Every cell of a notebook that computes something and every ``asif`` command
calls one of these, and so do the tests.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import asif_core
from asif import mixture, registry, storage
from asif.cache import AnchorEmbeddings, EvalEmbeddings, encoder_of, load_anchor_embeddings, load_eval_embeddings
from asif.config import DEFAULT_ANCHORS, DEFAULT_CENTRE, DEFAULT_DATASET, cache_root, progress_bar
from asif.datasets import load_dataset
from asif.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, list_encoders
from asif.errors import ASIFInputError
from asif.metrics import (METRIC_KEYS, classification_metrics, confusion_matrix, headline_row, majority_class_rate,
                          per_class_recall, zero_shot_result)

__all__ = ["Choice", "load_choice", "save_choice", "choice_options", "parse_exponents", "Prepared", "prepare",
           "build_model", "default_anchor_counts", "ZeroShotRun", "run_zero_shot", "clip_zero_shot", "build_default",
           "verify_cache"]


# ---------------------------------------------------------------------------
# the choice, shared by the notebooks
# ---------------------------------------------------------------------------


@dataclass
class Choice:
    """What a run uses; saved by 00_setup, read by the other notebooks."""
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str = DEFAULT_TEXT_ENCODER
    dataset: str = DEFAULT_DATASET
    anchor_set: str = DEFAULT_ANCHORS
    non_zeros: int = 800
    exponents: list = field(default_factory=lambda: [8.0, 3.0, 1.0])
    precomputed: str | None = None  # a registry name, fetched instead of embedding
    classnames: list | None = None  # the dataset's class names in label order, in place of its own
    templates: list | None = None   # prompt templates with {c}, in place of the dataset's own
    mixing: str = "union"           # how anchor sources are combined (asif.mixture.RULES)
    centre: bool = DEFAULT_CENTRE   # centre each modality on its anchors' mean (asif_core.anchor_centre)

    @property
    def model_name(self) -> str:
        return f"asif:{self.image_encoder}+{self.text_encoder}@{self.anchor_set}"

    @property
    def slug(self) -> str:
        """dataset_anchors, safe as part of a file name."""
        return storage.slug(f"{self.dataset}_{self.anchor_set}".replace("+", "-").replace(":", "-").replace("/", "-"))


def parse_exponents(text: str) -> list[float]:
    """Exponents p typed as "8, 3, 1" (commas or spaces) -> [8.0, 3.0, 1.0]; each must be > 0."""
    parts = [t for t in text.replace(",", " ").split() if t]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        raise ASIFInputError(f"exponents: {text!r} is not a list of numbers; type e.g. 8, 3, 1") from None
    if not values or any(not (v > 0) or v == float("inf") for v in values):
        raise ASIFInputError(f"exponents: {text!r}; give one or more numbers > 0, e.g. 8, 3, 1 (the paper: 8)")
    return values


def choice_path() -> Path:
    return cache_root() / "choice.json"


def load_choice() -> Choice:
    """The saved choice, or the offline defaults when nothing was saved."""
    path = choice_path()
    if not path.exists():
        return Choice()
    saved = storage.read_json(path, f"the saved choice {path} (run 00_setup again or delete it)")
    if not isinstance(saved, dict):
        raise ASIFInputError(f"the saved choice {path} is not a JSON object; run 00_setup again or delete it")
    known = Choice.__dataclass_fields__
    return Choice(**{k: v for k, v in saved.items() if k in known})


def save_choice(choice: Choice) -> Path:
    storage.atomic_write_json(choice_path(), asdict(choice))
    return choice_path()


def choice_options() -> dict:
    """Dropdown options: (label, value) pairs, offline ones first and marked."""
    enc = list_encoders()

    def opts(modality):
        return [(f"{e['name']}  ({'offline' if e['offline'] else 'online'})", e["name"])
                for e in enc if e["modality"] == modality]
    datasets = [("tuxpaint-photos  (offline, photo cut-outs, Debian package)", "tuxpaint-photos"),
                ("fashion-mnist  (offline, Debian package)", "fashion-mnist"),
                ("clipart-objects  (offline, drawings, Debian package)", "clipart-objects"),
                ("cifar100  (online, torchvision)", "cifar100"), ("cifar10  (online, torchvision)", "cifar10"),
                ("pets  (online, torchvision)", "pets"),
                ("imagenet  (a local validation folder: give its path)", "imagenet"),
                ("imagefolder  (a local folder, one subfolder per class: give its path)", "imagefolder")]
    anchors = [(f"{DEFAULT_ANCHORS}  (offline, general captions; icons from npm once)", DEFAULT_ANCHORS),
               ("clipart+tuxpaint  (offline, general captions)", "clipart+tuxpaint"),
               ("iconify  (offline once fetched, icon names)", "iconify"),
               ("clipart  (offline)", "clipart"), ("tuxpaint  (offline)", "tuxpaint"),
               ("fashion-mnist-train  (offline, in-domain captions)", "fashion-mnist-train")]
    # "" (not None, which a dropdown shows as a blank) stands for "embed here"
    precomputed = [("none: embed here", "")] + [(f"{k}  (registry, download)", k) for k in registry.load_registry()]
    return {"image_encoder": opts("image"), "text_encoder": opts("text"), "dataset": datasets,
            "anchor_set": anchors, "precomputed": precomputed}


# ---------------------------------------------------------------------------
# embeddings and the model
# ---------------------------------------------------------------------------

@dataclass
class Prepared:
    """The embeddings of a choice and the two encoders that made them (loaded once, reused)."""
    choice: Choice
    evals: EvalEmbeddings
    anchors: AnchorEmbeddings
    image_encoder: object
    text_encoder: object

    @property
    def chance(self) -> float:
        """1 / C: the accuracy of a uniform random guess."""
        return 1 / len(self.evals.classnames)



def prepare(choice: Choice, progress: bool = True, limit: int | None = None, anchor_limit: int | None = None,
            split: str = "test", device="auto") -> Prepared:
    """Embeddings for the choice, built through the cache (or fetched from the registry first).

    ``limit``: test images (default all; smoke mode a few hundred);
    ``anchor_limit``: anchor pairs, the first of the set's order (default
    ``limit``, then all).
    """
    if choice.precomputed:
        registry.fetch(choice.precomputed, progress=progress)
    from asif.encoders import lazy_image_encoder, lazy_text_encoder
    # the packaged encoders load their weights only if something must be embedded
    image_encoder = lazy_image_encoder(choice.image_encoder, device=device)
    text_encoder = lazy_text_encoder(choice.text_encoder, device=device, progress=progress)
    dataset = choice.dataset
    if choice.classnames or choice.templates:
        dataset = load_dataset(dataset, split, limit).with_prompts(choice.classnames, choice.templates)
    evals = load_eval_embeddings(dataset, image_encoder, text_encoder, split=split, limit=limit,
                                 progress=progress)
    # a test set read from a package that anchors come from too: its items leave the anchors
    anchors = load_anchor_embeddings(choice.anchor_set, image_encoder, text_encoder,
                                     limit=anchor_limit if anchor_limit is not None else limit, progress=progress,
                                     exclude=evals.dataset.keys)
    if anchors.anchor_set.removed and progress:
        print(f"{anchors.anchor_set.removed} anchor pairs left out: {choice.dataset} holds the same items")
    return Prepared(choice, evals, anchors, image_encoder, text_encoder)


def build_model(anchors: AnchorEmbeddings, non_zeros: int = 800, exponent: float = 8.0, device="auto",
                centre: bool = DEFAULT_CENTRE) -> asif_core.ASIF:
    """An ASIF model over aligned anchor embeddings, with their captions (``centre``: see ``Choice``)."""
    return asif_core.ASIF(anchors.A_img, anchors.A_txt, non_zeros, exponent, captions=anchors.captions,
                          device=device, centre=centre)


# ---------------------------------------------------------------------------
# zero-shot accuracy against the number of anchors (paper Fig. 5)
# ---------------------------------------------------------------------------

def default_anchor_counts(n_max: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` up to n_max, and n_max itself: the x axis of Fig. 5.

    A power of two closer to n_max than a factor sqrt(2) (half a step on the
    log axis) is left out: its point would sit on top of the full count's.
    """
    if n_max < 1:
        raise ASIFInputError("no anchors: the anchor set is empty")
    counts, n = [], min(smallest, n_max)
    while n < n_max:
        counts.append(n)
        n *= 2
    if counts and n_max < counts[-1] * 2 ** 0.5:
        counts.pop()
    return counts + [n_max]


# Scores of every (count, exponent) come back from the one pass when they fit
# in this many bytes; beyond (ImageNet-sized sweeps) the headline's scores
# take a second pass over its anchors.
SCORES_BUDGET = 256 * 2 ** 20


@dataclass
class ZeroShotRun:
    """A sweep's rows (one per anchor count and exponent), its clip_benchmark JSON, chance and wall time,
    and for the headline (all anchors, the first exponent) its confusion matrix [C, C] (row = true class)."""
    rows: list[dict]
    result: dict
    chance: float
    wall_time: float
    confusion: np.ndarray
    classnames: list[str]

    @property
    def headline(self) -> dict:
        """The row the result leads with: all anchors, the first exponent (``metrics.headline_row``)."""
        return headline_row(self.rows)

    def summary(self) -> str:
        """One labelled line: the headline's accuracy beside chance and the majority-class rate."""
        top, p = self.headline, self.result["params"]
        return (f"top-1 accuracy {100 * top['acc1']:.1f}% with all {top['n_anchors']} anchors, "
                f"p = {top['exponent']:g}, k = {top['non_zeros']}, reduce = {top['reduce']} "
                f"(chance {100 * self.chance:.1f}%, majority class {100 * p['majority_class_rate']:.1f}%; "
                f"{p['n_test']} {p.get('split', 'test')} images)")

    def save(self, path) -> Path:
        """Write the JSON atomically."""
        storage.atomic_write_json(path, self.result)
        return Path(path)


def run_zero_shot(prepared: Prepared, *, exponents: Sequence[float] = (8.0,), non_zeros: int = 800,
                  reduce: str = "max", anchor_counts: Sequence[int] | None = None, device="auto",
                  progress: bool = True, params: dict | None = None, mixing: str | None = None,
                  centre: bool | None = None) -> ZeroShotRun:
    """Accuracy for every (anchor count, exponent) in one pass, as clip_benchmark JSON.

    ``anchor_counts`` default: powers of two up to all anchors. ``mixing``
    (default: the choice's): how the anchor set's sources combine
    (asif.mixture; ``union`` is asif_core.sweep itself). ``centre``
    (default: the choice's): centre each modality on the mean of all the
    anchors of the run. ``params`` adds to the JSON's parameters (which
    already name the encoders, data, k, p, counts, reduce, mixing, centring,
    chance, majority rate and what was dropped).
    """
    evals, anchors, choice = prepared.evals, prepared.anchors, prepared.choice
    counts = list(anchor_counts or default_anchor_counts(len(anchors)))
    if max(counts) > len(anchors):
        raise ASIFInputError(f"anchor_counts: the anchor set {choice.anchor_set} has {len(anchors)} pairs, "
                             f"asked for {max(counts)}")
    mixing = mixing or choice.mixing
    centre = choice.centre if centre is None else bool(centre)
    n_classes = len(evals.classnames)
    start = time.perf_counter()
    if mixing != "union" and len(anchors.source_names) > 1:
        by = mixture.mixture_scores(anchors.A_img, anchors.A_txt, anchors.sources, evals.images, evals.prompts,
                                    n_classes, anchor_counts=counts, exponents=exponents, non_zeros=non_zeros,
                                    reduce=reduce, rule=mixing, device=device, centre=centre)
        rows = mixture.rows_from_scores(by, evals.labels, exponents, non_zeros, reduce, mixing)
        top = headline_row(rows)
        scores = by[(top["n_anchors"], top["exponent"])]
    else:
        keep_scores = 4 * len(evals.labels) * n_classes * len(counts) * len(exponents) <= SCORES_BUDGET
        rows = asif_core.sweep(anchors.A_img, anchors.A_txt, evals.images, evals.labels, evals.prompts, n_classes,
                               anchor_counts=counts, exponents=exponents, non_zeros=non_zeros, reduce=reduce,
                               device=device, progress=progress, return_scores=keep_scores, centre=centre)
        top = headline_row(rows)
        if keep_scores:
            scores = top["scores"]
            for r in rows:
                del r["scores"]
        else:
            n = top["n_anchors"]
            scores = asif_core.classify(anchors.A_img[:n], anchors.A_txt[:n], evals.images, evals.prompts,
                                        n_classes, non_zeros=non_zeros, exponent=top["exponent"], reduce=reduce,
                                        device=device, centre=centre)
    wall = time.perf_counter() - start
    for r in rows:
        r["centre"] = centre
    confusion = confusion_matrix(scores, evals.labels)
    recall = per_class_recall(confusion)
    info = {"non_zeros": non_zeros, "exponents": [float(p) for p in exponents], "anchor_counts": counts,
            "reduce": reduce, "mixing": mixing, "centre": centre, "sources": anchors.source_names,
            "image_encoder": choice.image_encoder, "text_encoder": choice.text_encoder,
            "anchor_set": choice.anchor_set, "split": evals.dataset.identity.get("split", "test"),
            "n_test": int(len(evals.labels)), "chance": prepared.chance,
            "majority_class_rate": majority_class_rate(evals.labels),
            "classnames": list(evals.classnames), "templates": list(evals.templates),
            "prompts": evals.dataset.prompts(),
            "dropped_test_images": len(evals.dropped), "dropped_anchor_pairs": len(anchors.dropped),
            "anchors_shared_with_test_removed": anchors.anchor_set.removed,
            "anchors_repeated_captions_removed": anchors.anchor_set.repeated,
            **(params or {})}
    # a class with no test image has no recall: null in the JSON
    headline = {"per_class_recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(evals.classnames, recall)}}
    result = zero_shot_result(rows, dataset=choice.dataset, model=choice.model_name, params=info, wall_time=wall,
                              headline=headline)
    return ZeroShotRun(rows, result, prepared.chance, wall, confusion, list(evals.classnames))


def clip_zero_shot(evals: EvalEmbeddings, model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k",
                   device="auto", limit: int | None = None) -> tuple[dict | None, str]:
    """CLIP's zero-shot metrics on the same images and prompts, or (None, why) when it can't run.

    CLIP is the baseline: its weights must be downloadable (online) or cached.
    """
    from asif.encoders import load_clip
    try:
        clip = load_clip(model, pretrained, device=device)
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
    return classification_metrics(x @ cls.T, evals.dataset.labels[keep]), f"CLIP {model}/{pretrained}"


def rows_from_result(result: dict) -> list[dict]:
    """The sweep's rows back from its JSON: n_anchors, exponent and the metrics."""
    return [dict(n_anchors=r["n_anchors"], exponent=r["exponent"], **{k: r["metrics"][k] for k in METRIC_KEYS})
            for r in result["results"]]


# ---------------------------------------------------------------------------
# the embedded default
# ---------------------------------------------------------------------------

TEST_SETS = ("tuxpaint-photos", "fashion-mnist", "clipart-objects")
IN_DOMAIN_ANCHORS = 16384  # the in-domain reference curve stops here: the main job shows no more


def build_default(progress: bool = True, limit: int | None = None, root=None,
                  image_encoder=DEFAULT_IMAGE_ENCODER, text_encoder=DEFAULT_TEXT_ENCODER) -> dict:
    """Embed, through the cache, what the main job shows: the three test sets (images + prompts), the
    general anchors (icons rendered first, in worker processes) and the in-domain Fashion-MNIST anchors.

    Already cached parts cost a checksum pass. Returns {what: (rows, seconds)}.
    """
    from asif import iconify
    image_encoder, text_encoder = encoder_of(image_encoder, "image"), encoder_of(text_encoder, "text")
    report = {}

    def timed(what, fn):
        t = time.time()
        n = fn()
        report[what] = (n, round(time.time() - t, 1))

    for name in TEST_SETS:
        timed(name, lambda: len(load_eval_embeddings(name, image_encoder, text_encoder, limit=limit, root=root,
                                                     progress=progress).labels))
    if limit is None:  # a small run renders the few icons it needs on the way
        timed("iconify rendering", lambda: iconify.prerender(iconify.load_index(root, progress), root,
                                                              progress=progress)["rendered"])
    for name in DEFAULT_ANCHORS.split("+"):
        timed(name, lambda: len(load_anchor_embeddings(name, image_encoder, text_encoder, limit=limit, root=root,
                                                       progress=progress)))
    timed("fashion-mnist-train (in-domain)",
          lambda: len(load_anchor_embeddings("fashion-mnist-train", image_encoder, text_encoder,
                                             limit=limit or IN_DOMAIN_ANCHORS, root=root, progress=progress)))
    return report


def verify_cache(root=None, repair: bool = True, progress: bool = True) -> list[dict]:
    """Hash every shard of every embedding set in the cache, whatever the size-and-mtime
    stamps say (the policy in ``asif.storage``); with ``repair``, remove what is damaged so
    that its next use recomputes it (cached sets: those shards only) or unpacks it again
    from its checked archive (fetched sets).

    Returns one dict per set: ``folder``, ``shards``, ``bytes``, ``damaged`` (file names), ``action``.
    """
    from asif.cache import invalidate_damaged
    base = cache_root(root)
    sets = []
    for kind in ("embeddings", "precomputed"):
        for manifest in sorted((base / kind).rglob("manifest.json")):
            rel = manifest.parent.relative_to(base / kind)
            if any(part.startswith(".") or part.endswith(".unpacking") for part in rel.parts):
                continue  # a build or an unpack in progress
            try:
                m = storage.read_json(manifest)
            except storage.StorageError:
                m = None
            if m is None or "shards" in m:  # an ASIF anchor-set manifest sits above two embedding sets
                sets.append((kind, manifest.parent, rel))
    report = []
    with progress_bar(len(sets), "verify", progress, unit="set") as bar:
        for kind, folder, rel in sets:
            damaged = storage.verify_folder(folder)
            shards = [p.stat().st_size for p in folder.glob("embeddings-*.npy")]
            action = ""
            if damaged and kind == "embeddings":
                action = "removed; the next run that uses this set recomputes them" if repair else "not repaired"
                if repair:
                    invalidate_damaged(folder, damaged)
            elif damaged:
                name = rel.parts[0]
                action = f"`asif fetch {name}` unpacks it again" if repair else "not repaired"
                if repair:
                    registry.forget(base / kind / name)
            report.append({"folder": folder, "shards": len(shards), "bytes": sum(shards),
                           "damaged": damaged, "action": action})
            bar.update(1)
    return report
