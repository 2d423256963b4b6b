"""Choose the default anchor mix on validation data, by the rule of docs/default_anchors.md.

    python benchmarks/anchor_mix.py [--json benchmarks/results_anchor_mix.json]

Validation sets (no test item): V1 2,000 Fashion-MNIST *training* images
(top-1); V2 500 clip-art pairs outside clipart-objects, V3 250 TuxPaint pairs
outside tuxpaint-photos, V4 500 icon pairs (image -> caption recall@5 among
each held-out group; those pairs leave the anchors). Scores every mixing rule
of asif/mixture.py and every source alone, then applies the rule: the
highest worst regret against the best single source, ties (0.5 points) to
the simpler rule. k = 800, p = 8, reduce = max throughout.

--centre runs the second round instead: union mixing with no centring, or
centring the image side, the text side or both on the anchors' mean.

--prompts runs the third round: the prompt style (each domain's templates,
the class name alone, or both) on V1 and the validation splits of
tuxpaint-photos (V5) and clipart-objects (V6), whose items leave the anchors.

--distinct runs the fourth round: every pair, or one pair per distinct caption
within each source, on V1, V5, V6 as the third round.

--text-encoders runs the fifth round: all-MiniLM-L6-v2 or all-mpnet-base-v2 for the
captions and prompts, today's anchors and prompts, on V1, V5, V6 as the third round.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import asif_core as ac
from asif import cache, datasets, mixture
from asif.anchors import load_anchor_set
from asif.encoders import load_image_encoder, load_text_encoder
from asif.metrics import retrieval_metrics

SOURCES = ("iconify", "clipart", "tuxpaint")
HELD_OUT = {"clipart": 500, "tuxpaint": 250, "iconify": 500}
TIE = 0.005
CENTRINGS = ("none", "image", "text", "both")
PROMPT_STYLES = ("dataset", "bare", "dataset+bare")
TEXT_ENCODERS = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")  # the fifth round's candidates, today's first


def print_table(table: dict, corner: str) -> None:
    """{row name: {validation set: score}} as percentages, one line per row."""
    domains = list(next(iter(table.values())))
    width = max(map(len, [corner, *table]))
    print(f"{corner:{width}}  " + "  ".join(f"{d:>28}" for d in domains))
    for k, row in table.items():
        print(f"{k:{width}}  " + "  ".join(f"{100 * row[d]:27.1f}%" for d in domains))


def held_out_rows(anchor_set, test_keys: set, seed: int = 0) -> dict:
    """{source: rows of the anchor order held out for validation}, none of them a test item."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, part in enumerate(anchor_set.parts):
        rows = np.flatnonzero(anchor_set.order[:, 0] == p)
        if part.keys is not None:
            rows = np.array([r for r in rows if part.keys[anchor_set.order[r, 1]] not in test_keys])
        out[part.name] = np.sort(rng.choice(rows, size=HELD_OUT[part.name], replace=False))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--non-zeros", type=int, default=800)
    ap.add_argument("--exponent", type=float, default=8.0)
    ap.add_argument("--centre", action="store_true",
                    help="second round: score the centring candidates (none/image/text/both) with union mixing")
    ap.add_argument("--prompts", action="store_true",
                    help="third round: score the prompt styles (dataset/bare/dataset+bare) on V1, V5, V6")
    ap.add_argument("--distinct", action="store_true",
                    help="fourth round: every pair or one pair per distinct caption, on V1, V5, V6")
    ap.add_argument("--text-encoders", action="store_true",
                    help="fifth round: MiniLM or MPNet for the text side, on V1, V5, V6")
    args = ap.parse_args()
    start = time.perf_counter()
    img_enc, txt_enc = load_image_encoder(), load_text_encoder()
    if args.prompts or args.distinct or args.text_encoders:
        return prompt_round(args, img_enc, txt_enc, start)
    test_keys = set(datasets.load_dataset("tuxpaint-photos").keys) | set(datasets.load_dataset("clipart-objects").keys)
    aset = load_anchor_set("+".join(SOURCES), one_per_caption=False)  # as the first two rounds ran
    union = cache.load_anchor_embeddings(aset, img_enc, txt_enc, progress=True)
    sources_all = aset.order[union.index, 0]  # the source of each anchor row
    row_of = {int(r): i for i, r in enumerate(union.index)}
    held = held_out_rows(aset, test_keys)
    held_rows = {s: np.array([row_of[int(r)] for r in rows if int(r) in row_of]) for s, rows in held.items()}
    keep = np.setdiff1d(np.arange(len(union)), np.concatenate(list(held_rows.values())))
    A_img, A_txt, src = union.A_img[keep], union.A_txt[keep], sources_all[keep]
    v1 = cache.load_eval_embeddings("fashion-mnist", img_enc, txt_enc, split="train", limit=2000, progress=True)
    common = dict(exponents=[args.exponent], non_zeros=args.non_zeros, reduce="max")

    def score(rule: str, only: int | None, centre: str = "none") -> dict:
        a_i, a_t, s = (A_img, A_txt, src) if only is None else (A_img[src == only], A_txt[src == only],
                                                              src[src == only])
        # the centring candidates of the second round: each side's mean from the anchors in use only
        side = (centre in ("image", "both"), centre in ("text", "both"))
        kw = dict(common, centre=(ac.anchor_centre(a_i) if side[0] else None,
                                  ac.anchor_centre(a_t) if side[1] else None))
        out = {}
        sc = mixture.mixture_scores(a_i, a_t, s, v1.images, v1.prompts, len(v1.classnames), rule=rule, **kw)
        out["V1 fashion-mnist-train top-1"] = float((next(iter(sc.values())).argmax(1) == v1.labels).mean())
        for name, v in (("clipart", "V2"), ("tuxpaint", "V3"), ("iconify", "V4")):
            rows = held_rows[name]
            sims = mixture.mixture_scores(a_i, a_t, s, union.A_img[rows], union.A_txt[rows], len(rows),
                                          rule=rule, **kw)
            sim = next(iter(sims.values()))
            out[f"{v} {name} pairs R@5"] = retrieval_metrics(sim, np.arange(len(rows)), ks=(5,))["text_retrieval_recall@5"]
        return out

    if args.centre:
        return centre_round(args, score, start)
    names = [p.name for p in aset.parts]
    table = {f"{n} alone": score("union", i) for i, n in enumerate(names)}
    for rule in mixture.RULES:
        table[f"all, {rule}"] = score(rule, None)
    domains = list(next(iter(table.values())))
    best_single = {d: max(table[f"{n} alone"][d] for n in names) for d in domains}
    regret = {rule: min(table[f"all, {rule}"][d] - best_single[d] for d in domains) for rule in mixture.RULES}
    best = max(regret.values())
    chosen = next(r for r in mixture.RULES if regret[r] >= best - TIE)  # ties to the simpler rule
    print_table(table, "")
    print("worst regret against the best single source:", {r: round(100 * v, 1) for r, v in regret.items()})
    print(f"chosen rule: {chosen}   ({time.perf_counter() - start:.0f} s; {len(keep)} anchors, "
          f"{sum(len(r) for r in held_rows.values())} held out)")
    if args.json:
        Path(args.json).write_text(json.dumps({"scores": table, "best_single": best_single, "worst_regret": regret,
                                               "chosen": chosen, "n_anchors": int(len(keep)),
                                               "held_out": {k: int(len(v)) for k, v in held_rows.items()},
                                               "non_zeros": args.non_zeros, "exponent": args.exponent},
                                              indent=2) + "\n")


def centre_round(args, score, start: float) -> None:
    """The second round of docs/default_anchors.md: centring candidates against ``none``, union mixing."""
    table = {c: score("union", None, centre=c) for c in CENTRINGS}
    domains = list(table["none"])
    gain = {c: {d: table[c][d] - table["none"][d] for d in domains} for c in CENTRINGS[1:]}
    admissible = [c for c, g in gain.items() if min(g.values()) >= -TIE and max(g.values()) > TIE]
    chosen = max(admissible, key=lambda c: np.mean(list(gain[c].values()))) if admissible else "none"
    print_table(table, "centre")
    print("admissible:", admissible, " chosen:", chosen, f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"scores": table, "gain": gain, "admissible": admissible,
                                               "chosen": chosen, "non_zeros": args.non_zeros,
                                               "exponent": args.exponent}, indent=2) + "\n")


def styled(templates: list[str], style: str) -> list[str]:
    """The templates of a prompt style: the domain's own, the class name alone, or both
    (the lists of templates.json end with the bare name since this round chose it)."""
    own = [t for t in templates if t != "{c}"]
    return {"dataset": own, "bare": ["{c}"], "dataset+bare": [*own, "{c}"]}[style]


def counted(right: np.ndarray, base: np.ndarray) -> float:
    """The accuracy difference of ``right`` over ``base`` (bool [n], the same images) where it
    exceeds 0.5 points and one paired standard error sqrt(n01 + n10) / n; else 0."""
    diff = float(right.mean() - base.mean())
    se = np.sqrt(np.sum(right != base)) / len(right)
    return diff if abs(diff) > max(TIE, se) else 0.0


def prompt_round(args, img_enc, txt_enc, start: float) -> None:
    """The third round of docs/default_anchors.md (prompt styles against ``dataset``), with
    ``args.distinct`` the fourth (one pair per caption against ``all``), with
    ``args.text_encoders`` the fifth (MPNet against MiniLM); union mixing."""
    v1 = cache.load_eval_embeddings("fashion-mnist", img_enc, txt_enc, split="train", limit=2000, progress=True)
    val = {"V1 fashion-mnist-train": v1.dataset}
    for name in ("tuxpaint-photos", "clipart-objects"):
        val[f"{'V5' if name == 'tuxpaint-photos' else 'V6'} {name}-validation"] = \
            datasets.load_dataset(name, split="validation")
    shared = [k for ds in val.values() for k in (ds.keys or ())]
    # every pair, as the third and fourth rounds were run (the fourth round's own candidate keeps
    # one per caption); the fifth round starts from today's anchors, one pair per caption
    aset = load_anchor_set("+".join(SOURCES), exclude=shared, one_per_caption=args.text_encoders)
    anchors = cache.load_anchor_embeddings(aset, img_enc, txt_enc, progress=True)
    print(f"{len(anchors)} anchors, {anchors.anchor_set.removed} shared with the validation sets removed")
    text_encoders = {}  # the fifth round: candidate -> its text encoder (other rounds use txt_enc)
    if args.text_encoders:
        candidates, styles = {}, {}
        for name in TEXT_ENCODERS:
            enc = txt_enc if name == txt_enc.name else load_text_encoder(name)
            emb = anchors if enc is txt_enc else cache.load_anchor_embeddings(aset, img_enc, enc, progress=True)
            candidates[name], styles[name], text_encoders[name] = (emb.A_img, emb.A_txt), "dataset+bare", enc
    elif args.distinct:
        kept = {tuple(r) for r in anchors.anchor_set.one_per_caption().order.tolist()}
        rows = np.array([tuple(anchors.anchor_set.order[i]) in kept for i in anchors.index])
        candidates = {"all": (anchors.A_img, anchors.A_txt),
                      "distinct": (anchors.A_img[rows], anchors.A_txt[rows])}
        print(f"distinct: {int(rows.sum())} anchors, {int((~rows).sum())} repeated captions left out")
        styles = {c: "dataset+bare" for c in candidates}
    else:
        candidates = {s: (anchors.A_img, anchors.A_txt) for s in PROMPT_STYLES}
        styles = {s: s for s in PROMPT_STYLES}
    base = next(iter(candidates))
    right, table = {}, {}
    for v, ds in val.items():
        for c, (a_img, a_txt) in candidates.items():
            emb = cache.load_eval_embeddings(ds.with_prompts(templates=styled(ds.templates, styles[c])),
                                             img_enc, text_encoders.get(c, txt_enc), progress=True)
            scores = ac.classify(a_img, a_txt, emb.images, emb.prompts, len(emb.classnames),
                                 non_zeros=args.non_zeros, exponent=args.exponent, reduce="max")
            right[v, c] = np.asarray(scores).argmax(1) == emb.labels
            table.setdefault(c, {})[v] = float(right[v, c].mean())
    others = [c for c in candidates if c != base]
    gain = {c: {v: counted(right[v, c], right[v, base]) for v in val} for c in others}
    admissible = [c for c, g in gain.items() if min(g.values()) >= 0 and max(g.values()) > 0]
    mean_gain = {c: float(np.mean([table[c][v] - table[base][v] for v in val])) for c in others}
    chosen = max(admissible, key=mean_gain.get) if admissible else base
    print_table(table, "text encoder" if args.text_encoders else "anchors" if args.distinct else "prompts")
    print("differences that count:", {c: {v: round(100 * g, 1) for v, g in gs.items()} for c, gs in gain.items()})
    print("admissible:", admissible, " chosen:", chosen, f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"scores": table, "counted": gain, "mean_gain": mean_gain,
                                               "admissible": admissible, "chosen": chosen,
                                               "n_anchors": {c: int(len(a)) for c, (a, _) in candidates.items()},
                                               "sizes": {v: len(d) for v, d in val.items()},
                                               "non_zeros": args.non_zeros, "exponent": args.exponent},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
