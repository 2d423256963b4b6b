"""From names to results: the choice, prepare, run_zero_shot and its JSON, on fake encoders."""
import json

import numpy as np
import pytest
from PIL import Image

import asif_core as ac
from asif import cache, pipeline
from asif.errors import ASIFInputError

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
NAMES = ["red", "green", "blue"]


@pytest.fixture
def prepared(tmp_path, fake_encoders):
    """An image folder of 3 colour classes and 40 coupled anchors (a coloured square, its colour's name)."""
    img, txt = fake_encoders
    for c, (name, colour) in enumerate(zip(NAMES, COLOURS)):
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), tuple(max(0, v - 9 * i) for v in colour)).save(tmp_path / "test" / name / f"{i}.png")
    rows = []
    for i in range(40):
        p = tmp_path / "anchors" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (6, 6), COLOURS[i % 3]).save(p)
        rows.append({"image": str(p), "caption": f"a photo of a {NAMES[i % 3]}."})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choice = pipeline.Choice(image_encoder=img.name, text_encoder=txt.name, dataset=f"imagefolder:{tmp_path / 'test'}",
                             anchor_set=f"captions:{tmp_path / 'pairs.jsonl'}")
    evals = cache.load_eval_embeddings(choice.dataset, img, txt, root=tmp_path / "cache", progress=False)
    anchors = cache.load_anchor_embeddings(choice.anchor_set, img, txt, root=tmp_path / "cache", progress=False)
    return pipeline.Prepared(choice, evals, anchors, img, txt)


def test_default_anchor_counts():
    assert pipeline.default_anchor_counts(1000) == [64, 128, 256, 512, 1000]
    assert pipeline.default_anchor_counts(50) == [50]
    assert pipeline.default_anchor_counts(128) == [64, 128]
    # a power of two within a factor sqrt(2) of the full count would hide under its point
    assert pipeline.default_anchor_counts(8377) == [64, 128, 256, 512, 1024, 2048, 4096, 8377]
    assert pipeline.default_anchor_counts(725) == [64, 128, 256, 512, 725]
    assert pipeline.default_anchor_counts(723) == [64, 128, 256, 723]
    with pytest.raises(ASIFInputError):
        pipeline.default_anchor_counts(0)


@pytest.mark.parametrize("centre", [True, False])
def test_run_zero_shot_is_the_core_sweep_as_clip_benchmark_json(prepared, tmp_path, centre):
    prepared.choice.centre = centre
    run = pipeline.run_zero_shot(prepared, exponents=[8, 1], non_zeros=10, anchor_counts=[20, 40], progress=False,
                                 params={"note": "x"})
    e, a = prepared.evals, prepared.anchors
    rows = ac.sweep(a.A_img, a.A_txt, e.images, e.labels, e.prompts, 3, anchor_counts=[20, 40], exponents=[8, 1],
                    non_zeros=10, centre=centre)
    assert [(r["n_anchors"], r["exponent"], r["acc1"], r["centre"]) for r in run.rows] == \
        [(r["n_anchors"], r["exponent"], r["acc1"], centre) for r in rows]
    assert run.result["params"]["centre"] is centre
    assert run.chance == pytest.approx(1 / 3)
    # the colours are easy; centred, the fake text encoder's unrelated second template (a random vector)
    # lands exactly on one colour's duplicated anchors and ties that class with the right one
    assert run.rows[-1]["acc1"] > (0.6 if centre else 0.9)
    p = run.result["params"]
    assert p["anchor_counts"] == [20, 40] and p["n_test"] == 12 and p["note"] == "x"
    assert p["anchor_set"] == prepared.choice.anchor_set and p["chance"] == pytest.approx(1 / 3)
    assert p["majority_class_rate"] == pytest.approx(4 / 12) and p["anchors_shared_with_test_removed"] == 0
    assert run.result["model"] == f"asif:fake-image+fake-text@{prepared.choice.anchor_set}"
    back = json.loads(run.save(tmp_path / "out" / "r.json").read_text())
    assert pipeline.rows_from_result(back) == [{k: r[k] for k in ("n_anchors", "exponent", "acc1", "acc5",
                                                                   "mean_per_class_recall")} for r in run.rows]
    # the headline (all anchors, the first exponent) leads the JSON, with what it needs beside it
    assert run.result["metrics"]["acc1"] == run.rows[2]["acc1"] and run.headline is run.rows[2]
    assert run.result["headline"]["n_anchors"] == 40 and run.result["headline"]["exponent"] == 8.0
    classes = sorted(NAMES)  # an image folder's classes are its sorted subfolders
    assert p["classnames"] == classes and p["templates"] == e.templates and len(p["prompts"]) == 3 * len(e.templates)
    assert p["prompts"][0] == "a photo of a blue." and p["majority_class_rate"] == pytest.approx(1 / 3)
    scores = ac.classify(a.A_img, a.A_txt, e.images, e.prompts, 3, non_zeros=10, exponent=8, centre=centre)
    truth = np.zeros((3, 3), dtype=int)
    np.add.at(truth, (e.labels, scores.argmax(1)), 1)
    assert run.confusion.tolist() == truth.tolist() and run.classnames == classes
    assert run.result["headline"]["per_class_recall"] == {n: truth[i, i] / truth[i].sum() for i, n in enumerate(classes)}
    assert run.summary().startswith(f"top-1 accuracy {100 * run.rows[2]['acc1']:.1f}% with all 40 anchors, p = 8")
    with pytest.raises(ASIFInputError, match="has 40 pairs, asked for 41"):
        pipeline.run_zero_shot(prepared, anchor_counts=[41], progress=False)


def test_headline_scores_from_a_second_pass_when_the_sweep_would_hold_too_many(prepared, monkeypatch):
    one = pipeline.run_zero_shot(prepared, exponents=[3, 8], non_zeros=10, anchor_counts=[20, 40], progress=False)
    monkeypatch.setattr(pipeline, "SCORES_BUDGET", 0)
    two = pipeline.run_zero_shot(prepared, exponents=[3, 8], non_zeros=10, anchor_counts=[20, 40], progress=False)
    assert two.confusion.tolist() == one.confusion.tolist() and two.headline["exponent"] == 3.0
    assert two.result["headline"] == one.result["headline"] and "scores" not in two.rows[0]


def test_default_counts_end_at_all_anchors(prepared):
    run = pipeline.run_zero_shot(prepared, non_zeros=5, progress=False)
    assert [r["n_anchors"] for r in run.rows] == [40]


def test_choice_is_saved_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path))
    assert pipeline.load_choice() == pipeline.Choice()
    c = pipeline.Choice(dataset="cifar10", exponents=[8.0])
    assert pipeline.save_choice(c) == tmp_path / "choice.json"
    assert pipeline.load_choice() == c
    assert c.slug == "cifar10_iconify-clipart-tuxpaint"
    assert pipeline.parse_exponents("8, 3 1") == [8.0, 3.0, 1.0]
    for bad in ("", "8, -1", "eight", "0", "inf"):
        with pytest.raises(ASIFInputError, match="exponents"):
            pipeline.parse_exponents(bad)
    opts = pipeline.choice_options()
    assert ("fashion-mnist  (offline, Debian package)", "fashion-mnist") in opts["dataset"]
    assert opts["image_encoder"][0][1] == "efficientnet_lite0"


def test_mixing_of_two_sources_goes_through_the_mixture(prepared, tmp_path, fake_encoders):
    from asif import mixture
    img, txt = fake_encoders
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:25]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[25:]) + "\n")
    choice = pipeline.Choice(image_encoder=img.name, text_encoder=txt.name, dataset=prepared.choice.dataset,
                             anchor_set=f"captions:{tmp_path / 'a.jsonl'}+captions:{tmp_path / 'b.jsonl'}",
                             mixing="mean")
    anchors = cache.load_anchor_embeddings(choice.anchor_set, img, txt, root=tmp_path / "cache", progress=False)
    two = pipeline.Prepared(choice, prepared.evals, anchors, img, txt)
    assert sorted(set(anchors.sources.tolist())) == [0, 1]
    run = pipeline.run_zero_shot(two, non_zeros=6, anchor_counts=[20, 40], progress=False)
    e = prepared.evals
    want = mixture.mixture_sweep(anchors.A_img, anchors.A_txt, anchors.sources, e.images, e.labels, e.prompts, 3,
                                 anchor_counts=[20, 40], non_zeros=6, rule="mean", centre=choice.centre)
    assert [r["acc1"] for r in run.rows] == [r["acc1"] for r in want]
    assert run.result["params"]["mixing"] == "mean" and len(run.result["params"]["sources"]) == 2
    union = pipeline.run_zero_shot(two, non_zeros=6, anchor_counts=[40], progress=False, mixing="union")
    assert union.result["params"]["mixing"] == "union"
