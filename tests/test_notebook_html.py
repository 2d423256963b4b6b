"""Offline HTML of executed notebooks: the widget script fetched once with npm, checked, written into the page.

A stand-in ``npm`` on PATH packs a tarball made here, so these run offline;
tests/test_browser.py opens a real page in Chromium with the network refused.
"""
import io
import os
import stat
import tarfile

import nbformat
import pytest

from asif import notebook_html as H


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An ``npm`` whose ``pack`` drops package.tgz (holding dist/embed.js) into --pack-destination."""
    buf = io.BytesIO()
    script = b"window.drawn = true; /* the embedder */"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(H.EMBED_FILE)
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
    tgz = tmp_path / "package.tgz"
    tgz.write_bytes(buf.getvalue())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\n[ -n "$NPM_FAIL" ] && {{ echo "npm error network" >&2; exit 1; }}\n'
                   f'while [ "$1" != "--pack-destination" ]; do shift; done\ncp {tgz} "$2"/\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(H.HTML_MANAGER, "integrity", H._integrity(buf.getvalue()))
    return script.decode()


def test_widget_script_is_fetched_once_and_checked(fake_npm, tmp_path, monkeypatch):
    js, why = H.widget_script(root=tmp_path / "cache")
    assert js == fake_npm and why == ""
    monkeypatch.setenv("NPM_FAIL", "1")
    assert H.widget_script(root=tmp_path / "cache") == (fake_npm, ""), "the second time from the cache"
    js, why = H.widget_script(root=tmp_path / "other")
    assert js is None and "npm error network" in why
    monkeypatch.delenv("NPM_FAIL")
    monkeypatch.setitem(H.HTML_MANAGER, "integrity", "sha512-wrong")
    js, why = H.widget_script(root=tmp_path / "other")
    assert js is None and "not the pinned one" in why and not (tmp_path / "other" / "npm").exists()


def test_page_holds_the_script_and_the_widget_state(fake_npm):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("w")]
    view = {"model_id": "m1", "version_major": 2, "version_minor": 0}
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", {"application/vnd.jupyter.widget-view+json": view,
                                                                   "text/plain": "Dropdown()"})]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "version_major": 2, "version_minor": 0, "state": {"m1": {"model_name": "DropdownModel", "state": {}}}}}
    page = H.notebook_html(nb, fake_npm)
    assert page.count(fake_npm) == 1 and "html-manager@" not in page and '"m1"' in page
    cdn = H.notebook_html(nb, None)
    assert fake_npm not in cdn and "html-manager@" in cdn
