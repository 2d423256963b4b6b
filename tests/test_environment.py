"""Where a run happens: the data package list shared with run.sh, and the notebooks' first call."""
import os
from pathlib import Path

import numpy as np
import pytest

from asif import environment

ROOT = Path(__file__).resolve().parents[1]


def test_apt_packages_are_the_ones_run_sh_installs():
    assert "dataset-fashion-mnist" in environment.APT_PACKAGES
    assert "asif/data/apt-packages.txt" in (ROOT / "run.sh").read_text()


def test_setup_notebook_installs_nothing_outside_colab(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(environment, "missing_apt_packages", lambda: calls.append("asked") or ["x"])
    info = environment.setup_notebook()
    assert calls == [] and info["device"] == "cpu"
    assert capsys.readouterr().out.strip() == "full mode | device: cpu"
    monkeypatch.setenv("ASIF_SMOKE", "1")
    environment.setup_notebook(install=False)
    assert capsys.readouterr().out.startswith("smoke mode")


def test_missing_apt_packages_lists_only_known_packages():
    missing = environment.missing_apt_packages()
    assert set(missing) <= set(environment.APT_PACKAGES)


def test_chromium_for_tests_is_not_in_the_colab_list():
    assert "chromium" not in environment.APT_PACKAGES
    assert "chromium" in (ROOT / "tests" / "apt-packages.txt").read_text().split()
    assert "tests/apt-packages.txt" in (ROOT / "run.sh").read_text()


def test_asif_errors_show_as_one_line_in_a_notebook():
    """A choice that cannot run here (offline, a missing folder) ends a notebook cell in one line."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from asif.environment import one_line_errors\none_line_errors()"),
                nbformat.v4.new_code_cell("from asif.datasets import load_dataset\n"
                                          "load_dataset('imagefolder:/no/such/folder')"),
                nbformat.v4.new_code_cell("1 / 0")]
    NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True).execute()
    error = nb.cells[1].outputs[0]
    assert error.output_type == "error" and error.ename == "DataError"
    assert error.traceback == ["DataError: imagefolder: /no/such/folder is not a folder; give a folder with one "
                               "subfolder per class"]
    assert len(nb.cells[2].outputs[0].traceback) > 1, "other errors keep their traceback"


def test_compile_kernels_fills_numba_cache_so_a_first_run_compiles_nothing(tmp_path):
    """After compile_kernels (run.sh's last install step) a first `asif sweep` finds every kernel cached."""
    import subprocess
    import sys
    from asif.config import numba_module
    from asif.synthetic import synthetic_coupled_data
    if numba_module() is None:
        pytest.fail("numba is a dependency of the project; it must be installed")
    cache = tmp_path / "numba"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    subprocess.run([sys.executable, "-c", "from asif.environment import compile_kernels; compile_kernels()"],
                   check=True, env=env)
    compiled = {p.name for p in cache.rglob("*") if p.is_file()}
    assert any(name.endswith(".nbc") for name in compiled)
    d = synthetic_coupled_data(n_anchors=900, n_classes=4, n_images=30, seed=1)
    argv = [sys.executable, "-m", "asif", "sweep", "--quiet", "--device", "cpu", "--n-classes", "4",
            "--non-zeros", "40", "--anchor-counts", "300", "900", "--reduce", "mean"]
    for key in ("anchor_images", "anchor_texts", "images", "labels", "prompts"):
        np.save(tmp_path / f"{key}.npy", d[key])
        argv += ["--" + key.replace("_", "-"), str(tmp_path / f"{key}.npy")]
    for extra in ([], ["--reduce", "max"], ["--dtype", "float64"]):
        subprocess.run(argv + extra, check=True, env=env, stdout=subprocess.DEVNULL)
    assert {p.name for p in cache.rglob("*") if p.is_file()} == compiled, "a kernel compiled at run time"
