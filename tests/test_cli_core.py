"""The `asif sweep` and `asif similarity` commands end to end on files the test writes."""
import json
import subprocess
import sys

import numpy as np
import pytest

import asif_cli
import asif_core as ac


@pytest.fixture
def files(tmp_path):
    d = ac.synthetic_coupled_data(n_anchors=300, n_classes=5, n_templates=2, n_images=40, seed=2)
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
    argv = ["sweep", "--quiet", "--exponents", "8", "3", "--n-anchors", "100", "300"]
    for k, v in args.items():
        argv += [k, str(v)]
    return argv


def test_sweep_writes_clip_benchmark_json(files, capsys):
    d, p, tmp = files
    out = tmp / "res" / "result.json"
    assert asif_cli.main(sweep_args(p, out)) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "zeroshot_classification"
    assert [(r["n_anchors"], r["exponent"]) for r in res["results"]] == [(100, 8.0), (100, 3.0), (300, 8.0), (300, 3.0)]
    # same numbers as the library on the same data
    rows = ac.sweep(d["anchor_images"], d["anchor_texts"], d["images"], d["labels"], d["prompts"], 5,
                    n_anchors=[100, 300], exponents=[8, 3], non_zeros=30)
    assert [r["metrics"]["acc1"] for r in res["results"]] == [r["acc1"] for r in rows]
    assert res["metrics"] == res["results"][-1]["metrics"]
    assert {"torch", "numpy"} <= set(res["versions"]) and res["wall_time_s"] > 0
    printed = capsys.readouterr().out
    assert "acc1" in printed and "mean_per_class_recall" in printed


def test_similarity_command(files):
    d, p, tmp = files
    out = tmp / "S.npy"
    argv = ["similarity", "--anchor-images", str(p["anchor_images"]), "--anchor-texts", str(p["anchor_texts"]),
            "--images", str(p["images"]), "--texts", str(p["prompts"]), "--non-zeros", "30", "--out", str(out)]
    assert asif_cli.main(argv) == 0
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
    assert asif_cli.main(sweep_args(p, out, **change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists() and not list(tmp.glob(".result.json*"))


def test_console_script_runs_as_a_process(files):
    d, p, tmp = files
    out = tmp / "r.json"
    cmd = [sys.executable, "-m", "asif_cli"] + [str(a) for a in sweep_args(p, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run(cmd[:-2] + ["--out", str(out), "--n-classes", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "n_classes" in bad.stderr
