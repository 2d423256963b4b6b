"""Where a run happens: the data package list shared with run.sh, and the notebooks' first call."""
from pathlib import Path

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
