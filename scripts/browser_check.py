#!/usr/bin/env python3
"""Check the built book in a real browser: python scripts/browser_check.py [_build/html]

Serves the built HTML on localhost (http.server in a thread) and drives Debian's chromium
headless through Playwright's Python package, then, on every page of the book:

  * no console errors and no uncaught page errors (requests to other hosts are blocked, so the
    check is the same offline and online; they are listed, not failed, unless --online);
  * every <img> loaded (naturalWidth > 0), lazy images included;
  * every internal link resolves: HTTP 200 from the local server, and its #anchor exists in
    the target page;
  * every solution dropdown (`.admonition.dropdown`, sphinx-togglebutton) and every collapsed
    `<details>` starts hidden, and so does the code of every cell tagged `solution`; on each
    page the first dropdown is clicked and must become visible;
  * screenshots of a few pages (and of an opened solution) go to results/screens/*.png.

Exit code 0 only if every check passed. Needs: `apt-get install -y chromium` and
`pip install playwright` (no `playwright install`: the system chromium is used).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse, unquote

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DEFAULT_SHOTS = ("index.html", "book/how_to_run.html", "book/instructor.html", "notebooks/02_naive.html")
SKIP_DIRS = ("_static", "_sources", "_images", "_sphinx_design_static", "_panels_static")


# -- the local server ------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # The browser drops connections it no longer needs (a page left mid-load): not an error.
        import sys
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def serve(directory: Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


# -- links and anchors -----------------------------------------------------------------------

class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.names = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" or (tag == "a" and k == "name"):
                self.names.add(v)


class LinkChecker:
    def __init__(self, base: str):
        self.base = base
        self._status: dict[str, int] = {}
        self._anchors: dict[str, set] = {}

    def status(self, url: str) -> int:
        if url not in self._status:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    self._status[url] = r.status
                    if "html" in r.headers.get("Content-Type", ""):
                        p = _Anchors()
                        p.feed(r.read().decode("utf-8", "replace"))
                        self._anchors[url] = p.names
            except urllib.error.HTTPError as e:
                self._status[url] = e.code
            except Exception:
                self._status[url] = -1
        return self._status[url]

    def check(self, href: str) -> str | None:
        """None if `href` (absolute, on the local server) resolves, else why not."""
        url, frag = urldefrag(href)
        code = self.status(url)
        if code != 200:
            return f"HTTP {code}"
        if frag and url in self._anchors and unquote(frag) not in self._anchors[url]:
            return f"no anchor #{frag} in {url[len(self.base) - 1:]}"
        return None


# -- the browser -----------------------------------------------------------------------------

_IMAGES_JS = """async () => {
  const imgs = Array.from(document.images);
  for (const i of imgs) { i.loading = 'eager'; }
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
      i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 5000); })));
  return imgs.map(i => ({src: i.currentSrc || i.src, w: i.naturalWidth}));
}"""

_SHOWN = """const shown = (c) => { const st = getComputedStyle(c), r = c.getBoundingClientRect();
  return st.display !== 'none' && st.visibility !== 'hidden' && parseFloat(st.opacity) > 0
         && r.width > 0 && r.height > 0; };"""

_DROPDOWNS_JS = """() => { %s
  return Array.from(document.querySelectorAll('.admonition.dropdown')).map((d, n) => {
    d.setAttribute('data-bc', n);
    const body = Array.from(d.children).filter(c => !c.classList.contains('admonition-title'));
    return {n, shown: body.some(shown), cls: d.className,
            title: (d.querySelector('.admonition-title') || d).innerText.trim().slice(0, 80)};
  }); }""" % _SHOWN

_BODY_SHOWN_JS = """(n) => { %s
  const d = document.querySelector(`[data-bc="${n}"]`);
  const body = Array.from(d.children).filter(c => !c.classList.contains('admonition-title'));
  return body.length > 0 && body.every(shown); }""" % _SHOWN

_SOLUTION_CELLS_JS = """() => { %s
  return Array.from(document.querySelectorAll('.cell.tag_solution')).map(c => {
    const inp = c.querySelector('.cell_input') || c;
    return {shown: shown(inp), text: inp.innerText.trim().split('\\n')[0].slice(0, 60)};
  }); }""" % _SHOWN

_DETAILS_JS = """() => Array.from(document.querySelectorAll('details')).map(d => ({
  open: d.open, text: (d.querySelector('summary') || d).innerText.slice(0, 60)}))"""


def pages(html_dir: Path) -> list[str]:
    out = []
    for p in sorted(html_dir.rglob("*.html")):
        rel = p.relative_to(html_dir).as_posix()
        if rel.split("/")[0] in SKIP_DIRS or any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(rel)
    return out


def check_book(html_dir: Path, screens: Path | None, online: bool = False, shots: tuple = (),
               timeout_ms: int = 30000) -> dict:
    from playwright.sync_api import sync_playwright

    html_dir = Path(html_dir)
    all_pages = pages(html_dir)
    shots = tuple(p for p in (shots or DEFAULT_SHOTS) if p in all_pages) or tuple(all_pages[:3])
    httpd, base = serve(html_dir)
    links = LinkChecker(base)
    report = {"base": base, "pages": {}, "external": set(), "failures": []}
    host = urlparse(base).netloc
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            if not online:
                def route(r):
                    if urlparse(r.request.url).netloc not in (host, ""):
                        report["external"].add(urlparse(r.request.url).netloc)
                        return r.abort()
                    return r.continue_()
                ctx.route("**/*", route)
            page = ctx.new_page()
            page.set_default_timeout(timeout_ms)
            console, blocked = [], []

            def on_console(m):
                if m.type == "error":
                    loc = (m.location or {}).get("url", "")
                    if not online and loc and urlparse(loc).netloc not in (host, ""):
                        blocked.append(m.text)
                    elif not online and "net::ERR_FAILED" in m.text:
                        blocked.append(m.text)  # a blocked request to another host
                    else:
                        console.append(m.text)
            page.on("console", on_console)
            page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
            bad_responses = []
            page.on("response", lambda r: bad_responses.append(f"HTTP {r.status} {r.url}")
                    if r.status >= 400 and urlparse(r.url).netloc == host else None)

            for rel in all_pages:
                console.clear()
                blocked.clear()
                bad_responses.clear()
                fails = []
                page.goto(base + rel, wait_until="load")
                page.wait_for_timeout(150)  # let togglebutton & friends run their onload handlers
                imgs = page.evaluate(_IMAGES_JS)
                for im in imgs:
                    if im["w"] <= 0:
                        fails.append(f"image did not load: {im['src']}")
                hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
                n_internal = 0
                for h in sorted(set(hrefs)):
                    u = urlparse(h)
                    if u.scheme in ("http", "https") and u.netloc == host:
                        n_internal += 1
                        why = links.check(h)
                        if why:
                            fails.append(f"broken link {h[len(base) - 1:]}: {why}")
                drops = page.evaluate(_DROPDOWNS_JS)
                for d in drops:
                    if d["shown"]:
                        fails.append(f"dropdown shown before it is toggled: {d['title']!r}")
                for c in page.evaluate(_SOLUTION_CELLS_JS):
                    if c["shown"]:
                        fails.append(f"solution code cell visible without toggling: {c['text']!r} "
                                     "(put it in a gated solution, DEVNOTES 'Exercises')")
                for d in page.evaluate(_DETAILS_JS):
                    if d["open"]:
                        fails.append(f"<details> open before it is toggled: {d['text']!r}")
                opened = None
                if drops:
                    d = page.locator('[data-bc="0"]')
                    btn = d.locator("button.toggle-button")
                    (btn.first if btn.count() else d.locator(".admonition-title").first).click()
                    try:
                        page.wait_for_function(_BODY_SHOWN_JS, arg=0, timeout=3000)
                        opened = drops[0]["title"]
                    except Exception:
                        fails.append(f"dropdown did not open when clicked: {drops[0]['title']!r}")
                    if screens is not None and opened and "solution" in drops[0]["cls"] \
                            and not any(s.startswith("solution_") for s in report.get("shots", [])):
                        name = "solution_" + Path(rel).stem + ".png"
                        d.screenshot(path=str(screens / name))
                        report.setdefault("shots", []).append(name)
                page.wait_for_timeout(100)
                fails += [f"console error: {c}" for c in console]
                fails += [f"resource failed: {b}" for b in bad_responses]
                if screens is not None and rel in shots:
                    name = rel.replace("/", "_").replace(".html", ".png")
                    page.evaluate("window.scrollTo(0, 0)")
                    page.screenshot(path=str(screens / name))
                    report.setdefault("shots", []).append(name)
                report["pages"][rel] = {"images": len(imgs), "internal_links": n_internal,
                                        "dropdowns": len(drops), "opened": opened,
                                        "blocked_external": len(blocked), "failures": fails}
                report["failures"] += [f"{rel}: {f}" for f in fails]
            browser.close()
    finally:
        httpd.shutdown()
    report["external"] = sorted(report["external"])
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", nargs="?", type=Path, default=ROOT / "_build" / "html",
                    help="the built book (default _build/html)")
    ap.add_argument("--screens", type=Path, default=ROOT / "results" / "screens",
                    help="where screenshots go (default results/screens)")
    ap.add_argument("--no-screens", action="store_true")
    ap.add_argument("--shot", action="append", default=[],
                    help="page to screenshot, e.g. notebooks/02_naive.html (repeatable; default: a few)")
    ap.add_argument("--online", action="store_true",
                    help="let pages load from other hosts (MathJax's CDN) and count their errors")
    ap.add_argument("--json", type=Path, help="write the full report here")
    a = ap.parse_args(argv)
    if not (a.html / "index.html").exists():
        print(f"browser_check: no book at {a.html} (build it: jupyter-book build .)", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"browser_check: {CHROMIUM} missing (apt-get install -y chromium)", file=sys.stderr)
        return 2
    screens = None
    if not a.no_screens:
        screens = a.screens
        screens.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rep = check_book(a.html, screens, online=a.online, shots=tuple(a.shot))
    for rel, p in rep["pages"].items():
        status = "ok  " if not p["failures"] else "FAIL"
        print(f"{status} {rel}: {p['images']} images, {p['internal_links']} internal links, "
              f"{p['dropdowns']} dropdowns" + (" (one opened)" if p["opened"] else ""))
        for f in p["failures"]:
            print(f"       {f}")
    if rep["external"]:
        print(f"blocked requests to other hosts (not failures; --online to allow): {', '.join(rep['external'])}")
    if rep.get("shots"):
        print(f"screenshots: {', '.join(str(screens / s) for s in rep['shots'])}")
    n = len(rep["pages"])
    print(f"{n} pages, {len(rep['failures'])} failures, {time.time() - t0:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(rep, indent=1, default=list))
    return 0 if not rep["failures"] and n else 1


if __name__ == "__main__":
    sys.exit(main())
