"""Executed notebooks as HTML that shows its widgets without a network.

nbconvert's HTML loads the script that draws ipywidgets from a CDN, so an
offline reader sees blank dropdowns and bars. Here that script, the embedder
of the npm package ``@jupyter-widgets/html-manager`` (pinned, checked
against its sha512 integrity), is fetched once with ``npm pack`` into the
cache and written into each page; the widgets' state is already in the
executed notebook (nbclient stores it).
"""
from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from asif.config import cache_root
from asif.storage import atomic_write

__all__ = ["HTML_MANAGER", "widget_script", "notebook_html", "write_html"]

# the embedder that matches ipywidgets 8 (@jupyter-widgets/controls 5)
HTML_MANAGER = {"package": "@jupyter-widgets/html-manager", "version": "1.0.15",
                "integrity": "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA=="}
EMBED_FILE = "package/dist/embed.js"  # standalone: draws every widget-view script of the page, no require.js


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def widget_script(root=None, timeout: float = 120) -> tuple[str | None, str]:
    """(the widget embedder's JavaScript, "") or (None, why not): from the cache, else ``npm pack``."""
    target = cache_root(root) / "npm" / f"html-manager-{HTML_MANAGER['version']}-embed.js"
    if target.exists():
        return target.read_text(encoding="utf-8"), ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "no npm here to fetch the widget script (apt-get install npm)"
    spec = f"{HTML_MANAGER['package']}@{HTML_MANAGER['version']}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"npm pack {spec} took over {timeout:.0f} s"
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            last = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            return None, f"npm pack {spec} failed: {last}"
        data = tarballs[0].read_bytes()
    if _integrity(data) != HTML_MANAGER["integrity"]:
        return None, f"npm pack {spec}: the tarball's sha512 is not the pinned one; not used"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        script = tar.extractfile(EMBED_FILE).read()
    atomic_write(target, lambda f: f.write(script))
    return script.decode("utf-8"), ""


# nbconvert's lab page, its widget block replaced by the embedder itself (it draws the page's
# widget views on the window's load event)
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block jupyter_widgets %}
{%- if "widgets" in nb.metadata and resources.widget_js -%}
<script>{{ resources.widget_js }}</script>
{%- else -%}{{ super() }}{%- endif -%}
{% endblock jupyter_widgets %}
"""


def notebook_html(nb, widget_js: str | None = None) -> str:
    """An executed notebook as a standalone HTML page (nbconvert's lab template); with ``widget_js``
    the widgets are drawn by that script, written into the page, instead of one from a CDN."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    if widget_js is not None and "</script" in widget_js.lower():
        raise ValueError("the widget script cannot be written inline: it holds </script")
    exporter = HTMLExporter(template_name="lab", template_file="asif_offline.html.j2",
                            extra_loaders=[DictLoader({"asif_offline.html.j2": OFFLINE_TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources={"widget_js": widget_js})
    return body


def write_html(nb, path, widget_js: str | None = None) -> Path:
    """``notebook_html`` written atomically to ``path``."""
    text = notebook_html(nb, widget_js)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return Path(path)
