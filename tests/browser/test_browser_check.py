"""The browser check of the built book (scripts/browser_check.py), in headless chromium.

Skipped unless Playwright's Python package and /usr/bin/chromium are installed
(`pip install playwright`, `apt-get install -y chromium`; never `playwright install`).
1. The checker itself, on a small synthetic site with one of each fault: it must find them all.
2. The real book, if it has been built to _build/html: it must pass.
"""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("playwright.sync_api")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

PNG_1x1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
# a dropdown that behaves like sphinx-togglebutton's: body hidden by a class until the title is clicked
TOGGLE = """<style>.toggle-hidden > :not(.admonition-title) {visibility: hidden; height: 0}</style>
<script>document.addEventListener('DOMContentLoaded', () => document.querySelectorAll('.admonition.dropdown')
  .forEach(d => { d.classList.add('toggle-hidden'); d.querySelector('.admonition-title')
  .addEventListener('click', () => d.classList.toggle('toggle-hidden')); }));</script>"""


def _site(tmp_path, good=True):
    (tmp_path / "img.png").write_bytes(PNG_1x1)
    cell = ('<div class="cell tag_solution"><div class="cell_input"><pre># EXERCISE ex-x\nx = 42</pre></div>'
            '</div>')
    dropdown = ('<div class="solution dropdown admonition"><p class="admonition-title">Solution</p>'
                f'<section><p>the answer</p>{cell}</section></div>')
    page2 = f"<html><head>{TOGGLE}</head><body><h1 id='sec'>Two</h1>{dropdown}<img src='img.png'></body></html>"
    (tmp_path / "page2.html").write_text(page2)
    if good:
        index = (f"<html><head>{TOGGLE}</head><body><a href='page2.html#sec'>two</a>"
                 f"<a href='https://example.org/'>away</a><img src='img.png'>{dropdown}</body></html>")
    else:  # no toggle script: the dropdown shows at once
        index = ("<html><body><a href='page2.html#nope'>bad anchor</a><a href='missing.html'>gone</a>"
                 "<img src='absent.png'><script>console.error('boom')</script>"
                 f"<script>undefined_function()</script>{dropdown}{cell}</body></html>")
    (tmp_path / "index.html").write_text(index)
    return tmp_path


def test_checker_passes_a_good_site(tmp_path):
    rep = bc.check_book(_site(tmp_path), screens=tmp_path, shots=("index.html",))
    assert rep["failures"] == [], rep["failures"]
    assert rep["pages"]["index.html"]["opened"] == "Solution"
    assert rep["pages"]["index.html"]["internal_links"] == 1
    assert (tmp_path / "index.png").stat().st_size > 0
    assert any(s.startswith("solution_") for s in rep["shots"])


def test_checker_finds_every_fault(tmp_path):
    rep = bc.check_book(_site(tmp_path, good=False), screens=None)
    text = "\n".join(rep["failures"])
    assert "no anchor #nope" in text
    assert "broken link /missing.html: HTTP 404" in text
    assert "image did not load" in text and "absent.png" in text
    assert "console error: boom" in text
    assert "uncaught:" in text and "undefined_function" in text
    assert "dropdown shown before it is toggled: 'Solution'" in text
    assert "solution code cell visible without toggling: '# EXERCISE ex-x'" in text
    assert all(f.startswith("index.html:") for f in rep["failures"])  # page2 is fine


@pytest.mark.skipif(not (ROOT / "_build" / "html" / "index.html").exists(),
                    reason="the book is not built (bash scripts/book.sh)")
def test_built_book_passes(tmp_path):
    rep = bc.check_book(ROOT / "_build" / "html", screens=tmp_path)
    assert rep["failures"] == [], "\n".join(rep["failures"])
