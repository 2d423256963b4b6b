"""The `asif` command end to end: one test per command, bad input as one line and exit status 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import asif_core as ac
from asif import cli
from asif.cache import load_anchor_embeddings, load_eval_embeddings
from asif.synthetic import synthetic_coupled_data
from conftest import needs


def image_encoder():
    from asif.encoders import load_image_encoder
    return load_image_encoder("efficientnet_lite0", device="cpu")


def text_encoder():
    from asif.encoders import load_text_encoder
    return load_text_encoder("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture
def photos():
    import skimage.data
    return {"chelsea": Image.fromarray(skimage.data.chelsea()), "coffee": Image.fromarray(skimage.data.coffee())}


# --- sweep and similarity on .npy files

@pytest.fixture
def files(tmp_path):
    d = synthetic_coupled_data(n_anchors=300, n_classes=5, n_templates=2, n_images=40, seed=2)
    paths = {}
    for key in ("anchor_images", "anchor_texts", "images", "labels", "prompts"):
        paths[key] = tmp_path / f"{key}.npy"
        np.save(paths[key], d[key])
    return d, paths, tmp_path


def sweep_args(p, out, **over):
    args = {"--anchor-images": p["anchor_images"], "--anchor-texts": p["anchor_texts"], "--images": p["images"],
            "--labels": p["labels"], "--prompts": p["prompts"], "--n-classes": "5", "--non-zeros": "30",
            "--out": out}
    args.update(over)
    argv = ["sweep", "--quiet", "--exponents", "8", "3", "--anchor-counts", "100", "300"]
    for k, v in args.items():
        argv += [k, str(v)]
    return argv


def test_sweep_writes_clip_benchmark_json(files, capsys):
    d, p, tmp = files
    out = tmp / "res" / "result.json"
    assert cli.main(sweep_args(p, out)) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "zeroshot_classification"
    assert [(r["n_anchors"], r["exponent"]) for r in res["results"]] == [(100, 8.0), (100, 3.0), (300, 8.0), (300, 3.0)]
    # same numbers as the library on the same data
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5,
                    anchor_counts=[100, 300], exponents=[8, 3], non_zeros=30)
    assert [r["metrics"]["acc1"] for r in res["results"]] == [r["acc1"] for r in rows]
    # metrics is the headline: all anchors and the first exponent asked for
    assert res["metrics"] == res["results"][2]["metrics"] and res["headline"] == {"n_anchors": 300, "exponent": 8.0}
    counts = np.bincount(d["labels"])
    assert res["params"]["majority_class_rate"] == pytest.approx(counts.max() / counts.sum())
    assert {"torch", "numpy"} <= set(res["versions"]) and res["wall_time_s"] > 0
    printed = capsys.readouterr().out
    assert "acc1" in printed and "mean_per_class_recall" in printed


def test_similarity_command(files):
    d, p, tmp = files
    out = tmp / "S.npy"
    argv = ["similarity", "--anchor-images", str(p["anchor_images"]), "--anchor-texts", str(p["anchor_texts"]),
            "--images", str(p["images"]), "--texts", str(p["prompts"]), "--non-zeros", "30", "--out", str(out)]
    assert cli.main(argv) == 0
    s = np.load(out)
    ref = ac.ASIF(d["anchor_images"], d["anchor_texts"], 30, 8).similarity(d["images"], d["prompts"])
    np.testing.assert_allclose(s, ref, rtol=1e-6)


@pytest.mark.parametrize("change,needle", [
    ({"--n-classes": "7"}, "do not split"),
    ({"--labels": "missing.npy"}, "no such file"),
    ({"--non-zeros": "0"}, "non_zeros"),
    ({"--images": "BAD"}, "not a readable .npy"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(files, change, needle, capsys):
    d, p, tmp = files
    (tmp / "BAD").write_text("not numpy")
    change = {k: (tmp / v if v in ("missing.npy", "BAD") else v) for k, v in change.items()}
    out = tmp / "result.json"
    assert cli.main(sweep_args(p, out, **change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists() and not list(tmp.glob(".result.json*"))


def test_console_script_runs_as_a_process(files):
    d, p, tmp = files
    out = tmp / "r.json"
    cmd = [sys.executable, "-m", "asif"] + [str(a) for a in sweep_args(p, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run(cmd[:-2] + ["--out", str(out), "--n-classes", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "n_classes" in bad.stderr


# --- eval and report on small real data

@needs("dataset-fashion-mnist")
@needs("openclipart-svg")
def test_eval_then_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    build = tmp_path / "build"
    out, fig = build / "zero_shot_fm_clipart.json", build / "fig5_fm_clipart.png"
    argv = ["eval", "--dataset", "fashion-mnist", "--anchors", "clipart", "--limit", "60", "--anchor-limit", "90",
            "--exponents", "8", "3", "--anchor-counts", "30", "90", "--non-zeros", "50", "--quiet",
            "--out", str(out), "--plot", str(fig)]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert [(r["n_anchors"], r["exponent"]) for r in res["results"]] == [(30, 8.0), (30, 3.0), (90, 8.0), (90, 3.0)]
    assert res["params"]["n_test"] == 60 and res["params"]["chance"] == pytest.approx(0.1)
    assert fig.stat().st_size > 1000
    # the numbers are the core's on the same cached embeddings
    ev = load_eval_embeddings("fashion-mnist", limit=60, progress=False)
    an = load_anchor_embeddings("clipart", limit=90, progress=False)
    rows = ac.sweep(an.A_img, an.A_txt, ev.images, ev.labels, ev.prompts, 10, anchor_counts=[30, 90],
                    exponents=[8, 3], non_zeros=50)
    assert [r["metrics"]["acc1"] for r in res["results"]] == [r["acc1"] for r in rows]

    assert res["metrics"]["acc1"] == rows[2]["acc1"], "the headline: 90 anchors, p = 8"
    assert res["params"]["classnames"][1] == "trousers" and "a photo of trousers." in res["params"]["prompts"]
    recall = res["headline"]["per_class_recall"]
    assert list(recall) == res["params"]["classnames"]
    assert res["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean([r for r in recall.values() if r is not None]))

    # the report goes to build/; the README changes only when asked to
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n")
    assert cli.main(["report", "--build", str(build), "--seconds", "90"]) == 0
    report = (build / "report.md").read_text()
    assert f"| 90 | {100 * rows[2]['acc1']:.1f}% | {100 * rows[3]['acc1']:.1f}% |" in report
    assert f"]({fig.name})" in report and "took 1.5 min" in report and "old" in readme.read_text()
    assert cli.main(["report", "--build", str(build), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n") and "took 1.5 min" in text
    assert f"| 90 | {100 * rows[2]['acc1']:.1f}% | {100 * rows[3]['acc1']:.1f}% |" in text
    assert (tmp_path / "docs" / "figures" / fig.name).exists() and f"docs/figures/{fig.name}" in text


def test_eval_on_a_folder_with_its_own_names_and_templates(tmp_path, monkeypatch, photos, capfd):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    for folder, name in (("cat_photos", "chelsea"), ("mugs", "coffee")):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        for i in range(3):
            w, h = photos[name].size
            photos[name].crop((10 * i, 0, w - 10 * i, h)).save(tmp_path / "photos" / folder / f"{i}.jpg")
    pairs = []
    for i in range(24):  # anchors: crops of the two photos captioned with what they show
        name = ("chelsea", "coffee")[i % 2]
        path = tmp_path / "anchors" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        w, h = photos[name].size
        photos[name].crop((5 * i, 3 * i, w - 4 * i, h - 2 * i)).resize((64, 48)).save(path)
        pairs.append({"image": str(path), "caption": ("a cat on a sofa", "a cup of coffee on a saucer")[i % 2]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    names = tmp_path / "names.txt"
    names.write_text("cat\ncup of coffee\n")
    out = tmp_path / "r.json"
    argv = ["eval", "--dataset", f"imagefolder:{tmp_path / 'photos'}", "--anchors", f"captions:{tmp_path / 'pairs.jsonl'}",
            "--classnames", str(names), "--templates", "a photo of a {c}.", "a {c} on a table",
            "--non-zeros", "10", "--exponents", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    assert "embed imagefolder-photos images (efficientnet_lite0)" in err
    assert (tmp_path / "cache" / "embeddings" / "imagefolder-photos").is_dir()
    res = json.loads(out.read_text())
    assert res["params"]["classnames"] == ["cat", "cup of coffee"]
    assert res["params"]["prompts"] == ["a photo of a cat.", "a cat on a table", "a photo of a cup of coffee.",
                                        "a cup of coffee on a table"]
    assert res["params"]["majority_class_rate"] == 0.5 and res["headline"]["n_anchors"] == 24
    # again, quiet and cached: nothing on stderr, not even the weights-loading bar
    assert cli.main(argv + ["--quiet"]) == 0
    assert capfd.readouterr().err == ""
    assert json.loads(out.read_text())["results"] == res["results"]
    assert cli.main(argv[:5] + ["--classnames", "a", "b", "c", "--quiet"]) == 2
    assert "3 class names given for 2 classes" in capfd.readouterr().err


def test_every_eval_option_is_explained_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "imagefolder:PATH" in text and "captions:FILE" in text and "(default: fashion-mnist)" in text
    assert "(default: 800)" in text and "(default: max)" in text and "headline" in text
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for action in sub.choices["eval"]._actions:
        assert action.help, f"{action.option_strings} has no help text"


@needs("dataset-fashion-mnist")
@needs("openclipart-svg")
def test_eval_asks_for_more_anchors_than_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--anchors", "clipart", "--limit", "20", "--anchor-limit", "10", "--n-anchors", "50", "--quiet"]
    assert cli.main(argv) == 2
    assert "has 10 pairs" in capsys.readouterr().err


def test_report_without_results_and_unknown_notebook(tmp_path, capsys):
    assert cli.main(["report", "--build", str(tmp_path), "--readme", str(tmp_path / "R.md")]) == 2
    assert cli.main(["notebooks", "99_nothing", "--out", str(tmp_path / "nb")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "no zero_shot_*.json" in err[0] and "no notebook" in err[1]


# --- encoders

def test_cli_encoders(capsys):
    assert cli.main(["encoders"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("efficientnet_lite0"))
    assert "yes" in line and "1280" in line


def test_cli_embed_images(photos, tmp_path, capsys):
    files = []
    for name in ("chelsea", "coffee"):
        files.append(str(tmp_path / f"{name}.png"))
        photos[name].save(files[-1])
    out = tmp_path / "x.npy"
    assert cli.main(["embed-images", "--encoder", "efficientnet_lite0", "--out", str(out), *files]) == 0
    x = np.load(out)
    np.testing.assert_allclose(x, image_encoder().encode(files, progress=False), atol=1e-5)

    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    bad_out = tmp_path / "bad.npy"
    capsys.readouterr()
    assert cli.main(["embed-images", "--quiet", "--out", str(bad_out), files[0], str(corrupt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.jpg" in err and len(err.splitlines()) == 1
    assert not bad_out.exists() and not list(tmp_path.glob(".bad.npy*"))
    assert cli.main(["embed-images", "--out", str(bad_out), str(tmp_path / "nope.png")]) == 2
    assert cli.main(["embed-images", "--encoder", "no_such_net", "--out", str(bad_out), files[0]]) == 2
    assert not bad_out.exists()


def test_cli_embed_texts(tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a photo of a dog.\na photo of a cat.\n\n", encoding="utf-8")
    out = tmp_path / "t.npy"
    assert cli.main(["embed-texts", "--out", str(out), "a photo of a car.", "--from-file", str(lines)]) == 0
    t = np.load(out)
    expected = ["a photo of a car.", "a photo of a dog.", "a photo of a cat."]
    np.testing.assert_allclose(t, text_encoder().encode(expected, progress=False), atol=1e-5)

    holes = tmp_path / "holes.txt"
    holes.write_text("one\n\nthree\n", encoding="utf-8")
    bad = tmp_path / "bad.npy"
    assert cli.main(["embed-texts", "--out", str(bad), "--from-file", str(holes)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli.main(["embed-texts", "--out", str(bad)]) == 2
    assert cli.main(["embed-texts", "--out", str(bad), "--from-file", str(tmp_path / "none.txt")]) == 2
    assert not bad.exists()


# --- registry

def test_cli_fetch_and_publish(published, tmp_path, capsys):
    registry, array, cache = published
    assert cli.main(["fetch", "mine", "--registry", str(registry), "--cache", str(cache), "--quiet"]) == 0
    assert "precomputed" in capsys.readouterr().out
    assert cli.main(["publish", str(tmp_path / "mine" / "images"), "--name", "imgs", "--url", "http://x/y.tar",
                          "--registry", str(registry), "--out", str(tmp_path / "o")]) == 0
    entry = json.loads(registry.read_text())["embeddings"]["imgs"]
    assert entry["source"] == {"url": "http://x/y.tar"} and entry["count"] == {".": 50}
    assert cli.main(["fetch", "missing", "--registry", str(registry), "--cache", str(cache)]) == 2
    assert "no precomputed embeddings named" in capsys.readouterr().err
