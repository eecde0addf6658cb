"""The documentation site: it builds strictly, its API reference is the public API, and a real
browser shows what a reader expects.

The site is built once per run with MkDocs in strict mode (what ``python3 run.py docs --build``
does), into a temporary directory. The browser is Debian's headless Chromium, loading the built
pages from a local HTTP server; a screenshot of the home page is saved under
``build/artifacts/`` (the path is printed).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_docs import PUBLIC_MODULES

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "artifacts"
REQUIRE = os.environ.get("SQLA_CONTEXT_REQUIRE_SERVERS", "") not in ("", "0")

pytest.importorskip("mkdocs", reason="the site needs the [docs] extra")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"strict build failed:\n{result.stderr}"
    return out


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The check the site relies on can fail: a page with a dead link breaks the build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [nowhere](missing.md).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text("site_name: t\nstrict: true\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "-f", str(config), "-d", str(tmp_path / "s")],
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "missing.md" in result.stderr


def _reference_ids(site: Path) -> set[str]:
    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    return set(re.findall(r'id="(sqla_context[\w.]*)"', html))


def test_reference_lists_every_public_name(site: Path) -> None:
    ids = _reference_ids(site)
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if name != "__version__" and f"{module}.{name}" not in ids
    ]
    assert not missing, f"public names missing from the API reference: {missing}"


def test_reference_shows_nothing_that_does_not_exist(site: Path) -> None:
    ids = _reference_ids(site)
    assert len(ids) > 50
    for ident in sorted(ids):
        module_name, _, rest = ident.partition(".")
        obj: object = importlib.import_module(module_name)
        parts = rest.split(".") if rest else []
        while parts and isinstance(obj, type(sys)) and hasattr(obj, "__path__"):
            # a submodule (sqla_context.asgi) or a name of the package
            try:
                obj = importlib.import_module(f"{obj.__name__}.{parts[0]}")
            except ModuleNotFoundError:
                break
            parts.pop(0)
        for part in parts:
            assert hasattr(obj, part), f"the reference shows {ident}, which does not exist"
            obj = getattr(obj, part)


def test_llms_txt_maps_every_page(site: Path) -> None:
    text = (site / "llms.txt").read_text(encoding="utf-8")
    assert text.startswith("# sqla-context\n\n> ")
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    for page in pages:
        target = "./" if page == "index" else f"{page}/"
        assert f"]({target})" in text, f"llms.txt has no line for docs/{page}.md"
    assert "rules/" in text


# -- a real browser -------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if REQUIRE:
            pytest.fail("chromium is not installed (apt-get install chromium); CI requires it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browse(url: str, *extra: str) -> str:
    """What headless Chromium has in the page once its scripts ran (the DOM, serialised)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=3000", "--window-size=1280,900", *extra, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _text(html: str) -> str:
    without_code = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", without_code))


def test_browser_home_page(site: Path) -> None:
    with serving(site) as base:
        dom = browse(base + "/", "--dump-dom")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "docs-home.png"
        shot.unlink(missing_ok=True)
        browse(base + "/", f"--screenshot={shot}")
    assert re.search(r"<title>\s*sqla-context\s*</title>", dom)
    assert 'class="md-search__input"' in dom, "the search box"
    assert '<nav class="md-nav' in dom
    text = _text(dom)
    for entry in ("Tutorial", "Concepts", "Web applications", "API reference"):
        assert entry in text, f"navigation entry {entry!r}"
    assert "<pre" in dom, "a code block"
    assert "await db.session()" in text
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_browser_reference_and_a_guide(site: Path) -> None:
    with serving(site) as base:
        reference = _text(browse(base + "/reference/", "--dump-dom"))
        guide = browse(base + "/web/", "--dump-dom")
    assert "API reference" in reference
    for name in ("Database", "session", "SessionMiddleware", "isolated", "on_commit"):
        assert name in reference, f"{name} in the reference page"
    assert "Client disconnects and cancellation" in _text(guide)
    assert "<pre" in guide
