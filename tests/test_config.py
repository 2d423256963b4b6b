"""Folders and modes from the environment."""
from pathlib import Path

from asif import config


def test_cache_and_build_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("ASIF_CACHE", raising=False)
    monkeypatch.delenv("ASIF_BUILD", raising=False)
    assert config.cache_root() == config.PROJECT_ROOT / "cache"  # a checkout keeps its cache beside the code
    assert config.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("ASIF_CACHE", str(tmp_path / "c"))
    assert config.cache_root() == tmp_path / "c"
    monkeypatch.setenv("ASIF_BUILD", str(tmp_path / "b"))
    assert config.build_dir() == tmp_path / "b" and (tmp_path / "b").is_dir()


def test_smoke_mode(monkeypatch):
    assert not config.is_smoke() and config.smoke_limit(None) is None and config.smoke_limit(7) == 7
    for on in ("1", "true", "Yes", " on "):
        monkeypatch.setenv("ASIF_SMOKE", on)
        assert config.is_smoke() and config.smoke_limit(None) == config.SMOKE_SIZE and config.smoke_limit(7) == 7
    monkeypatch.setenv("ASIF_SMOKE", "0")
    assert not config.is_smoke()


def test_package_data_is_installed_with_the_package():
    for name in ("classnames.json", "templates.json", "registry.json", "apt-packages.txt"):
        assert (config.DATA_DIR / name).is_file(), name
    assert Path(config.__file__).parent == config.PACKAGE_DIR
