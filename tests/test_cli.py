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
from asif.config import DEFAULT_CENTRE
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


def test_sweep_first_pass_bf16_gives_the_same_curve(files):
    d, p, tmp = files
    plain, fast = tmp / "plain.json", tmp / "fast.json"
    assert cli.main(sweep_args(p, plain)) == 0
    assert cli.main(sweep_args(p, fast, **{"--first-pass": "bf16", "--device": "cpu"})) == 0
    a, b = (json.loads(f.read_text()) for f in (plain, fast))
    assert b["params"]["first_pass"] == "bf16" and a["params"]["first_pass"] == "fp32"
    assert [r["metrics"] for r in a["results"]] == [r["metrics"] for r in b["results"]]


def test_sweep_and_similarity_centre_on_request(files):
    d, p, tmp = files
    plain, centred = tmp / "plain.json", tmp / "centred.json"
    assert cli.main(sweep_args(p, plain)) == 0
    assert cli.main(sweep_args(p, centred) + ["--centre"]) == 0
    a, b = (json.loads(f.read_text()) for f in (plain, centred))
    assert a["params"]["centre"] is False and b["params"]["centre"] is True
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5,
                    anchor_counts=[100, 300], exponents=[8, 3], non_zeros=30, centre=True, return_scores=True)
    assert [r["metrics"]["acc1"] for r in b["results"]] == [r["acc1"] for r in rows]
    out = tmp / "S.npy"
    argv = ["similarity", "--anchor-images", str(p["anchor_images"]), "--anchor-texts", str(p["anchor_texts"]),
            "--images", str(p["images"]), "--texts", str(p["prompts"]), "--non-zeros", "30", "--out", str(out),
            "--centre"]
    assert cli.main(argv) == 0
    model = ac.ASIF(d["anchor_images"], d["anchor_texts"], 30, 8, centre=True)
    np.testing.assert_allclose(np.load(out), model.similarity(d["images"], d["prompts"]), rtol=1e-6)


def test_sweep_first_pass_bf16_with_float64_is_one_line(files, capsys):
    d, p, tmp = files
    assert cli.main(sweep_args(p, tmp / "x.json", **{"--first-pass": "bf16", "--dtype": "float64"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0] and "Traceback" not in err[0]
    assert not (tmp / "x.json").exists()


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
    ({"--non-zeros": "0"}, "argument --non-zeros: 0 is out of range"),
    ({"--images": "BAD"}, "BAD: not a .npy file"),
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
    assert bad.returncode == 2 and "argument --n-classes: 0 is out of range" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


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
                    exponents=[8, 3], non_zeros=50, centre=DEFAULT_CENTRE)
    assert res["params"]["centre"] is DEFAULT_CENTRE
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

    # a centred run of the same data and anchors is its own column, not a duplicate of the plain one
    centred_out = build / "zero_shot_fm_clipart_centred.json"
    assert cli.main(argv[:argv.index("--out")] + ["--out", str(centred_out), "--centre"]) == 0
    centred = ac.sweep(an.A_img, an.A_txt, ev.images, ev.labels, ev.prompts, 10, anchor_counts=[30, 90],
                       exponents=[8, 3], non_zeros=50, centre=True)
    assert cli.main(["report", "--build", str(build)]) == 0
    report = (build / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| test set |"))
    assert header.endswith("| `clipart` | `clipart` centred |")
    assert f"**{100 * rows[2]['acc1']:.1f}%**" in report and f"**{100 * centred[2]['acc1']:.1f}%**" in report
    assert "### fashion-mnist, anchors `clipart` centred" in report


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
    assert cli.main(["eval", "--help"]) == 0  # main returns argparse's exit status
    text = capsys.readouterr().out
    assert "imagefolder:PATH" in text and "captions:FILE" in text and "(default: tuxpaint-photos)" in text
    assert "(default: 800)" in text and "(default: max)" in text and "headline" in text
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for action in sub.choices["eval"]._actions:
        assert action.help, f"{action.option_strings} has no help text"


@needs("dataset-fashion-mnist")
@needs("openclipart-svg")
def test_eval_asks_for_more_anchors_than_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--dataset", "fashion-mnist", "--anchors", "clipart", "--limit", "20", "--anchor-limit", "10",
            "--n-anchors", "50", "--quiet"]
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


# --- every bad input: exit 2, one line naming the option and the file, nothing computed or written

def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _numeric_options():
    """(command words, option, type function) of every numeric option of every command, from the parser."""
    found = []

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, __import__("argparse")._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + [name])
            elif action.type in (cli.positive_int, cli.positive_float, cli.non_negative_float):
                found.append((words, action.option_strings[0], action.type))
    walk(cli.build_parser(), [])
    return found


NUMERIC = _numeric_options()
BAD_VALUES = {cli.positive_int: ["-5", "0", "1.5", "x", "nan", "", "1e3"],
              cli.positive_float: ["0", "-2", "nan", "inf", "-inf", "x", ""],
              cli.non_negative_float: ["-1", "nan", "inf", "x"]}


def test_every_numeric_option_is_range_checked_when_parsed(capsys):
    assert len(NUMERIC) >= 18, "the walk finds the options of every command"
    tried = 0
    for words, option, kind in NUMERIC:
        for value in BAD_VALUES[kind]:
            assert cli.main(words + [option, value]) == 2, (words, option, value)
            line = one_line(capsys)
            assert line.startswith(f"asif {' '.join(words)}: error: argument {option}") and "--help" in line
            tried += 1
    assert tried == sum(len(BAD_VALUES[k]) for _, _, k in NUMERIC)


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["sweep", "--device", "meta"], "argument --device: 'meta' is not a device"),
    (["similarity", "--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
    (["embed-images", "--device", "xpu"], "argument --device: 'xpu' is not a device"),
    (["eval", "--device", ""], "argument --device: '' is not a device"),
    (["sweep", "--dtype", "int8"], "argument --dtype: 'int8' is not a dtype"),
    (["eval", "--plot", "fig.xyz"], "argument --plot: 'fig.xyz': .xyz is not a figure format"),
    (["eval", "--plot", "fig"], "argument --plot: 'fig': no extension is not a figure format"),
    (["sweep", "--reduce", "median"], "argument --reduce: invalid choice"),
    (["nonsense"], "argument command: invalid choice"),
    (["data"], "the following arguments are required: data_command"),
])
def test_other_option_values_are_checked_when_parsed(argv, needle, capsys):
    assert cli.main(argv) == 2
    assert needle in one_line(capsys)


def test_a_device_that_is_not_here_is_named(files, capsys):
    d, p, tmp = files
    out = tmp / "r.json"
    assert cli.main(sweep_args(p, out, **{"--device": "cuda:99"})) == 2
    assert one_line(capsys).startswith("asif sweep: error: --device='cuda:99': ") and not out.exists()


def write_npy_faults(tmp, good: np.ndarray) -> dict:
    """{fault: (path, what the one line must say)} for an input whose valid form is ``good`` [rows, dim]."""
    faults = {}

    def put(name, write, needle):
        path = tmp / f"{name}.npy"
        write(path)
        faults[name] = (path, needle)
    put("zero-bytes", lambda p: p.write_bytes(b""), "the file is empty (0 bytes)")
    put("text", lambda p: p.write_text("0.1 0.2 0.3\n"), "not a .npy file")
    put("npz", lambda p: p.write_bytes((lambda b: (np.savez(b, x=good), b.getvalue())[1])(__import__("io").BytesIO())),
        "is an .npz archive")
    put("pickle", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "holds Python objects")
    put("truncated", lambda p: p.write_bytes((lambda b: (np.save(b, good), b.getvalue())[1])(
        __import__("io").BytesIO())[:200]), "damaged or truncated")
    put("one-d", lambda p: np.save(p, good[0]), "expected a 2-D array")
    put("three-d", lambda p: np.save(p, good[None]), "expected a 2-D array")
    put("no-rows", lambda p: np.save(p, good[:0]), "empty array")
    put("ints", lambda p: np.save(p, (good * 10).astype(np.int64)), "is not floating point")
    put("strings", lambda p: np.save(p, good.astype(str)), "is not floating point")
    put("complex", lambda p: np.save(p, good.astype(np.complex64)), "is not floating point")
    put("nan-row", lambda p: np.save(p, np.where(np.arange(len(good))[:, None] == 1, np.nan, good)), "row 1 holds NaN")
    put("inf-row", lambda p: np.save(p, np.where(np.arange(len(good))[:, None] == 2, np.inf, good)), "row 2 holds NaN or inf")
    put("zero-row", lambda p: np.save(p, np.where(np.arange(len(good))[:, None] == 3, 0.0, good)), "row 3 is all zeros")
    put("wrong-dim", lambda p: np.save(p, good[:, :-1]), "dim")
    (tmp / "a-folder.npy").mkdir()
    faults["folder"] = (tmp / "a-folder.npy", "is a directory")
    faults["missing"] = (tmp / "missing.npy", "no such file")
    return faults


@pytest.mark.parametrize("option", ["--anchor-images", "--anchor-texts", "--images", "--prompts"])
def test_sweep_blames_the_input_at_fault(files, option, capsys):
    d, p, tmp = files
    key = option[2:].replace("-", "_")
    faults = write_npy_faults(tmp / key, d[key]) if (tmp / key).mkdir() is None else None
    out = tmp / "r.json"
    for fault, (path, needle) in faults.items():
        assert cli.main(sweep_args(p, out, **{option: path})) == 2, fault
        line = one_line(capsys)
        # a dimension mismatch names both sides (either may be the wrong one); everything else starts with the culprit
        assert line.startswith(f"asif sweep: error: {option} {path}") or (
            fault == "wrong-dim" and f"{option} {path} has dim" in line), (fault, line)
        assert needle in line, (fault, line)
        assert not out.exists() and not list(tmp.glob(".r.json*"))


def test_big_endian_and_float16_inputs_give_the_same_answer(files, capsys):
    d, p, tmp = files
    base = tmp / "base.json"
    assert cli.main(sweep_args(p, base)) == 0
    swapped = {}
    for key in ("anchor_images", "anchor_texts", "images", "prompts", "labels"):
        swapped[f"--{key.replace('_', '-')}"] = tmp / f"be-{key}.npy"
        np.save(swapped[f"--{key.replace('_', '-')}"], d[key].astype(d[key].dtype.newbyteorder(">")))
    out = tmp / "be.json"
    assert cli.main(sweep_args(p, out, **swapped)) == 0
    assert [r["metrics"] for r in json.loads(out.read_text())["results"]] == \
        [r["metrics"] for r in json.loads(base.read_text())["results"]]


@pytest.mark.parametrize("labels,needle", [
    (np.array(["cat"] * 40), "dtype <U3 is not a number"),
    (np.full(40, 0.5), "must be integer class indices"),
    (np.full(40, np.nan), "must be integer class indices"),
    (np.arange(40), "values must lie in 0..4"),
    (np.full(40, 1e30), "values must lie in 0..4"),
    (np.zeros((40, 1), dtype=np.int64), "expected shape [40]"),
    (np.zeros(39, dtype=np.int64), "expected shape [40]"),
])
def test_bad_labels_are_named(files, labels, needle, capsys):
    d, p, tmp = files
    np.save(tmp / "bad-labels.npy", labels)
    out = tmp / "r.json"
    assert cli.main(sweep_args(p, out, **{"--labels": tmp / "bad-labels.npy"})) == 2
    line = one_line(capsys)
    assert line.startswith(f"asif sweep: error: --labels {tmp / 'bad-labels.npy'}: ") and needle in line
    assert not out.exists()


@pytest.mark.parametrize("option", ["--anchor-images", "--anchor-texts", "--images", "--texts"])
@pytest.mark.parametrize("fault", ["nan-row", "zero-row"])
def test_similarity_blames_anchors_not_queries(files, option, fault, capsys):
    d, p, tmp = files
    key = {"--texts": "prompts"}.get(option, option[2:].replace("-", "_"))
    bad = d[key].copy()
    bad[5] = np.nan if fault == "nan-row" else 0.0
    np.save(tmp / "bad.npy", bad)
    given = {"--anchor-images": p["anchor_images"], "--anchor-texts": p["anchor_texts"], "--images": p["images"],
             "--texts": p["prompts"]}
    given[option] = tmp / "bad.npy"
    out = tmp / "S.npy"
    argv = ["similarity", "--non-zeros", "30", "--out", str(out)] + [str(a) for kv in given.items() for a in kv]
    assert cli.main(argv) == 2
    line = one_line(capsys)
    assert line.startswith(f"asif similarity: error: {option} {tmp / 'bad.npy'}: row 5 ")
    assert not out.exists()


def test_anchor_rows_that_disagree_name_both_files(files, capsys):
    d, p, tmp = files
    np.save(tmp / "short.npy", d["anchor_texts"][:-1])
    assert cli.main(sweep_args(p, tmp / "r.json", **{"--anchor-texts": tmp / "short.npy"})) == 2
    line = one_line(capsys)
    assert f"--anchor-images {p['anchor_images']} has 300 rows but --anchor-texts {tmp / 'short.npy'} has 299" in line


# --- outputs: checked before any work

@pytest.fixture
def no_work(monkeypatch):
    """Make computing fail loudly: an output fault must stop the command before it."""
    import asif.encoders
    import asif.pipeline

    def refuse(*a, **k):
        raise AssertionError("computed before the output was checked")
    monkeypatch.setattr(ac, "sweep", refuse)
    monkeypatch.setattr(ac.ASIF, "similarity", refuse)
    monkeypatch.setattr(asif.encoders, "load_image_encoder", refuse)
    monkeypatch.setattr(asif.encoders, "load_text_encoder", refuse)
    monkeypatch.setattr(asif.pipeline, "prepare", refuse)


def output_commands(p, tmp, out):
    sim = ["similarity", "--anchor-images", p["anchor_images"], "--anchor-texts", p["anchor_texts"],
           "--images", p["images"], "--texts", p["prompts"], "--non-zeros", "30", "--out", out]
    (tmp / "one.png").write_bytes(b"")
    return {"sweep": sweep_args(p, out), "similarity": [str(a) for a in sim],
            "embed-images": ["embed-images", "--out", str(out), str(tmp / "one.png")],
            "embed-texts": ["embed-texts", "--out", str(out), "a text"],
            "eval --out": ["eval", "--out", str(out)], "eval --plot": ["eval", "--plot", str(out) + ".png"]}


@pytest.mark.parametrize("fault", ["directory", "under a file", "read-only", "full disk"])
def test_outputs_that_cannot_be_written_stop_before_any_work(files, fault, no_work, full_disk, monkeypatch, capsys):
    from asif import storage
    d, p, tmp = files
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "adir.png").mkdir()
    out = {"directory": tmp / "adir", "under a file": tmp / "afile" / "r", "read-only": tmp / "ro" / "r",
           "full disk": tmp / "r"}[fault]
    if fault == "read-only":  # refused like a read-only mount (root ignores permission bits)
        real = storage.tempfile.mkstemp
        monkeypatch.setattr(storage.tempfile, "mkstemp", lambda *a, dir=None, **k: (_ for _ in ()).throw(
            OSError(__import__("errno").EROFS, "Read-only file system")) if "ro" in str(dir) else real(*a, dir=dir, **k))
    if fault == "full disk":
        full_disk(room=0)
    needle = {"directory": "is a directory", "under a file": "afile is a file, not a folder",
              "read-only": "read-only file system", "full disk": "the disk is full"}[fault]
    for name, argv in output_commands(p, tmp, out).items():
        assert cli.main([str(a) for a in argv]) == 2, name
        line = one_line(capsys)
        assert needle in line and (": error: --out " in line or ": error: --plot " in line), (name, line)
    assert sorted(x.name for x in tmp.iterdir() if x.name.startswith(".")) == []


def test_embed_images_names_all_bad_files_or_skips_them(photos, tmp_path, capsys):
    good = tmp_path / "chelsea.png"
    photos["chelsea"].save(good)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    folder = tmp_path / "pictures"
    folder.mkdir()
    out = tmp_path / "x.npy"
    assert cli.main(["embed-images", "--quiet", "--out", str(out), str(folder)]) == 2
    assert f"{folder} (it is a directory; give the image files inside it" in one_line(capsys)
    argv = ["embed-images", "--quiet", "--out", str(out), str(good), str(tmp_path / "broken.jpg"), str(good),
            str(tmp_path / "empty.png"), str(tmp_path / "missing.png")]
    assert cli.main(argv) == 2
    line = one_line(capsys)
    assert line.startswith("asif embed-images: error: 1 of 5 images cannot be read: ")  # missing: before the model
    assert "missing.png (no such file)" in line and "--skip-bad" in line and not out.exists()
    (tmp_path / "missing.png").write_bytes(b"now here but not an image")
    assert cli.main(argv) == 2
    line = one_line(capsys)
    assert line.startswith("asif embed-images: error: 3 of 5 images cannot be read: ")
    assert all(f"{n} (" in line for n in ("broken.jpg", "empty.png", "missing.png")) and not out.exists()
    assert cli.main(argv + ["--skip-bad"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [e.split(":")[0] for e in err[:3]] == [f"skipped {tmp_path / n}" for n in ("broken.jpg", "empty.png",
                                                                                      "missing.png")]
    assert err[3].startswith("skipped 3 of 5 files (--skip-bad)")
    x = np.load(out)
    np.testing.assert_allclose(x, image_encoder().encode([good, good], progress=False), atol=1e-5)
    assert cli.main(["embed-images", "--skip-bad", "--out", str(tmp_path / "y.npy"), str(tmp_path / "empty.png")]) == 2
    assert "none is left to embed" in one_line(capsys) and not (tmp_path / "y.npy").exists()


def test_embed_texts_from_files_in_other_encodings(tmp_path, capsys):
    (tmp_path / "latin.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    out = tmp_path / "t.npy"
    assert cli.main(["embed-texts", "--out", str(out), "--from-file", str(tmp_path / "latin.txt")]) == 2
    assert f"--from-file {tmp_path / 'latin.txt'}: not UTF-8 text (byte 0xe9 on line 1)" in one_line(capsys)
    assert cli.main(["embed-texts", "--out", str(out), "--from-file", str(tmp_path)]) == 2
    assert "is a directory" in one_line(capsys)
    (tmp_path / "bom.txt").write_bytes("\ufeffa photo of a dog.\n".encode("utf-8"))
    assert cli.main(["embed-texts", "--quiet", "--out", str(out), "--from-file", str(tmp_path / "bom.txt")]) == 0
    np.testing.assert_allclose(np.load(out), text_encoder().encode(["a photo of a dog."], progress=False), atol=1e-5)


def test_an_interrupted_command_says_so_in_one_line(files, monkeypatch, capsys):
    d, p, tmp = files

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ac, "sweep", interrupted)
    assert cli.main(sweep_args(p, tmp / "r.json")) == 130
    assert "interrupted" in one_line(capsys) and not (tmp / "r.json").exists()


UMASK_CLI = """
import os, sys
os.umask(0o027)
from asif import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_outputs_follow_the_umask_end_to_end(files):
    d, p, tmp = files
    for argv, out in ((sweep_args(p, tmp / "new" / "r.json"), tmp / "new" / "r.json"),
                      (["similarity", "--anchor-images", p["anchor_images"], "--anchor-texts", p["anchor_texts"],
                        "--images", p["images"], "--texts", p["prompts"], "--out", tmp / "S.npy"], tmp / "S.npy")):
        r = subprocess.run([sys.executable, "-c", UMASK_CLI] + [str(a) for a in argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert oct(out.stat().st_mode & 0o777) == oct(0o640), out
    assert oct((tmp / "new").stat().st_mode & 0o777) == oct(0o750)


def test_data_verify_finds_and_removes_damage(tmp_path, capsys):
    from asif.cache import embed_cached
    from conftest import FakeEncoder
    from test_storage import flip_in_place
    items = [f"text {i}" for i in range(12)]
    e = embed_cached(FakeEncoder("text"), items, kind="text", dataset={"d": 1}, ids=[str(i) for i in range(12)],
                     name="t", root=tmp_path, shard_rows=5, progress=False)
    assert cli.main(["data", "verify", "--cache", str(tmp_path), "--quiet"]) == 0
    assert "verified 1 embedding sets, 3 shards" in capsys.readouterr().out
    flip_in_place(e.folder / "embeddings-00001.npy")
    assert cli.main(["data", "verify", "--cache", str(tmp_path), "--quiet", "--dry-run"]) == 1
    assert "embeddings-00001.npy; not repaired" in capsys.readouterr().out
    assert cli.main(["data", "verify", "--cache", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "embeddings-00001.npy; removed; the next run that uses this set recomputes them" in out
    assert "1 damaged files" in out and not (e.folder / "embeddings-00001.npy").exists()


def test_eval_prints_what_it_left_out(tmp_path, monkeypatch, capsys):
    """A user's folder and captions file with an unreadable test image, an unreadable anchor image and
    a caption that is null: the run goes on, and the console says what was left out and why."""
    from conftest import write_images
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "cache"))
    for cls in ("red", "blue"):
        write_images(tmp_path / "test" / cls, 3)
    (tmp_path / "test" / "blue" / "img001.png").write_bytes(b"not a png")
    pics = write_images(tmp_path / "pics", 6)
    pics[2].write_bytes(b"")
    rows = [{"image": str(p), "caption": None if i == 4 else f"a picture number {i}"} for i, p in enumerate(pics)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, fig = tmp_path / "r.json", tmp_path / "fig.svg"
    argv = ["eval", "--dataset", f"imagefolder:{tmp_path / 'test'}", "--anchors", f"captions:{tmp_path / 'pairs.jsonl'}",
            "--non-zeros", "2", "--anchor-counts", "2", "4", "--quiet", "--out", str(out), "--plot", str(fig)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert ("left out: 1 test images unreadable; 1 anchor pairs with an unreadable image; "
            "1 anchor items skipped while listing (caption missing (null): 1)") in printed
    params = json.loads(out.read_text())["params"]
    assert params["dropped_test_images"] == 1 and params["dropped_anchor_pairs"] == 1 and params["n_test"] == 5
    assert fig.read_text().lstrip().startswith(("<?xml", "<svg")), "the figure in the format its name asks for"


@pytest.mark.parametrize("option", ["--classnames", "--templates"])
def test_eval_name_files_in_another_encoding(tmp_path, option, no_work, capsys):
    (tmp_path / "names.txt").write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    assert cli.main(["eval", "--dataset", f"imagefolder:{tmp_path}", option, str(tmp_path / "names.txt")]) == 2
    assert f"{option} {tmp_path / 'names.txt'}: not UTF-8 text (byte 0xe9 on line 1)" in one_line(capsys)
