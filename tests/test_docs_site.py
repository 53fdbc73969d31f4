"""The built documentation site (issue 12), served on localhost.

The site is the one in ``$RAYLEIGHFLOW_DOCS_SITE`` (``.ci/run`` builds it with
``mkdocs build --strict`` and then runs this file), or else one built here into a temporary
folder (slow: the build runs the tutorials). Marked ``slow``: run it with
``python -m pytest -m slow tests/test_docs_site.py``.

Checks: every local link and image of the getting-started page, the API page of ``certify`` and
the tutorial pages answers 200 over HTTP, every image is a valid PNG or SVG, every fragment
exists in its target page; the tutorials ran during the build that made the pages (each
figure's PNG metadata carries the page's build id and the caption printed under it); every
public name has its anchor on an API page; and, where Chromium is installed, the two pages
render in headless Chromium.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAGES = ["getting-started/", "api/certificates/#rayleighflow.certify.certify"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("RAYLEIGHFLOW_DOCS_SITE")
    if given:
        path = Path(given).resolve()
        assert (path / "index.html").is_file(), f"RAYLEIGHFLOW_DOCS_SITE={given}: no site there"
        return path
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=site))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "link" and a.get("rel") in ("stylesheet", "icon"):
            self.links.append(a.get("href", ""))
        elif tag == "script" and a.get("src"):
            self.links.append(a["src"])


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


def _parse(html: bytes) -> _Links:
    p = _Links()
    p.feed(html.decode("utf-8"))
    return p


def _local(base: str, href: str) -> str | None:
    if not href or href.startswith(("mailto:", "javascript:", "data:")):
        return None
    url, origin = urljoin(base, href), urlparse(base)
    return url if url.startswith(f"{origin.scheme}://{origin.netloc}/") else None


def _image_ok(body: bytes, ctype: str) -> bool:
    return body.startswith(PNG_MAGIC) or ("svg" in ctype and b"<svg" in body[:2000])


def _tutorial_pages() -> list[str]:
    return [f"tutorials/{p.stem}/" for p in sorted((ROOT / "docs" / "tutorials").glob("*.py"))]


@pytest.mark.parametrize("page", PAGES + _tutorial_pages())
def test_page_links_and_images_resolve(server, page):
    url = server + page
    status, html, _ = _get(urldefrag(url)[0])
    assert status == 200, f"{page}: HTTP {status}"
    parsed = _parse(html)
    fragment = urldefrag(url)[1]
    if fragment:
        assert fragment in parsed.ids, f"{page}: no element with id {fragment!r}"
    images = [img for img in parsed.images if img.get("src")]
    if page.startswith("tutorials/"):
        assert images, f"{page}: no figure on a tutorial page"
    for img in images:
        target = _local(url, img["src"])
        assert target is not None, f"{page}: image from outside the site: {img['src']}"
        code, body, ctype = _get(target)
        assert code == 200, f"{page}: image {img['src']} → HTTP {code}"
        assert _image_ok(body, ctype), f"{page}: {img['src']} is not a valid PNG/SVG"
    pages: dict[str, _Links] = {}
    for href in parsed.links:
        target = _local(url, href)
        if target is None:
            continue
        doc, frag = urldefrag(target)
        code, body, ctype = _get(doc)
        assert code == 200, f"{page}: link {href} → HTTP {code}"
        if frag and "html" in ctype:
            ids = pages.setdefault(doc, _parse(body)).ids
            assert frag in ids, f"{page}: link {href}: no id {frag!r} in its target"


def _build_id(html: str, page: str) -> str:
    m = re.search(r"build <code>([0-9a-f]{12})</code>", html)
    assert m, f"{page}: the page does not state its build id"
    return m.group(1)


def test_tutorials_ran_during_the_build_that_made_their_pages(site):
    from PIL import Image

    builds = set()
    for page in _tutorial_pages():
        html = (site / page / "index.html").read_text()
        build = _build_id(html, page)
        builds.add(build)
        figures = re.findall(r'<img alt="([^"]*)" src="([^"]+\.png)"', html)
        assert figures, f"{page}: no figure"
        for alt, src in figures:
            png = (site / page / src).resolve()
            assert png.read_bytes().startswith(PNG_MAGIC), f"{page}: {src} is not a PNG"
            text = Image.open(png).text
            assert text.get("Description") == build, (
                f"{page}: {src} was not written by this build ({text.get('Description')!r} "
                f"!= {build!r})")
            caption = _unescape(alt)
            assert text.get("Title") == caption, f"{page}: {src}: caption and figure disagree"
            assert re.search(r"\d", caption), f"{page}: {src}: a caption without a number"
            assert f"[figure] {png.name}: {caption}" in _unescape(html), (
                f"{page}: {src}: its caption is not in the printed output")
    assert len(builds) == 1, f"tutorial pages from different builds: {sorted(builds)}"


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_every_public_name_has_an_anchor_on_an_api_page(site):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_docs import EXEMPT_PAGE, PUBLIC, _api_entries, _resolve
    finally:
        sys.path.pop(0)
    ids: set[str] = set()
    for page in (site / "api").glob("*/index.html"):
        ids |= _parse(page.read_bytes()).ids
    anchored = [_resolve(path) for paths in _api_entries().values() for path in paths
                if path in ids]
    missing = [q for q, o in PUBLIC if q not in EXEMPT_PAGE and not any(o is a for a in anchored)]
    assert not missing, f"public names without an anchor in the built API pages: {missing}"


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("page", PAGES)
def test_pages_render_in_headless_chromium(server, page, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,1600", server + page]
    subprocess.run(cmd, timeout=90, capture_output=True, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    assert shot.read_bytes()[:8] == PNG_MAGIC
    colors = Image.open(BytesIO(shot.read_bytes())).convert("L").getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 16, "the screenshot is (nearly) blank"
