"""MkDocs hooks: repository files the pages link to, and ``llms.txt``.

- The pages link to files outside ``docs/`` (``../examples/demo_app.py``,
  ``../benchmarks/README.md``), which read well on a repository host. For the site, such a
  link is pointed at a copy served under ``source/`` (Markdown files as ``.txt``).
- ``llms.txt`` (https://llmstxt.org), a plain-text map of the site: one line per page of the
  navigation, in its order and sections, with the page's first paragraph, so that a reader
  (or a code assistant) can pick the page to read. Built with the site, so it cannot drift.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
_OUTSIDE = re.compile(r"\]\((?P<target>\.\./[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")

_summaries: dict[str, str] = {}
_nav: Any = None


def _outside_target(page_uri: str, link: str) -> str | None:
    """The repository path a link of ``page_uri`` points to, if it is outside docs/."""
    target = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), link))
    return None if target.startswith(("docs/", "../")) else target


def _served_as(target: str) -> str:
    return f"source/{target}.txt" if target.endswith(".md") else f"source/{target}"


def on_files(files: Any, config: Any) -> Any:
    for page in [f for f in files if f.src_uri.endswith(".md")]:
        markdown = Path(config["docs_dir"], page.src_uri).read_text(encoding="utf-8")
        for match in _OUTSIDE.finditer(markdown):
            target = _outside_target(page.src_uri, match["target"])
            if target is None or files.get_file_from_path(_served_as(target)) is not None:
                continue
            path = ROOT / target
            if not path.is_file():
                continue  # left as it is: the strict build reports it
            files.append(File.generated(config, _served_as(target), content=path.read_bytes()))
    return files


def on_nav(nav: Any, config: Any, files: Any) -> Any:
    global _nav
    _nav = nav
    return nav


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    _summaries[page.file.src_uri] = _first_paragraph(markdown)
    uri = page.file.src_uri

    def serve(match: re.Match[str]) -> str:
        target = _outside_target(uri, match["target"])
        if target is None:
            return match[0]
        link = os.path.relpath(_served_as(target), posixpath.dirname(uri) or ".")
        return f"]({link})"  # the anchor is dropped: the copy is plain text

    return _OUTSIDE.sub(serve, markdown)


def on_post_build(config: Any) -> None:
    lines = [
        f"# {config['site_name']}",
        "",
        f"> {config['site_description']}",
        "",
        "Every page is also readable as Markdown in the repository's docs/ folder.",
    ]
    loose: list[str] = []
    for item in _nav.items if _nav is not None else []:
        if item.is_section:
            lines += ["", f"## {item.title}", ""]
            lines += [_entry(child) for child in item.children if child.is_page]
        elif item.is_page:
            loose.append(_entry(item))
    lines[5:5] = ["", "## Pages", "", *loose]
    Path(config["site_dir"], "llms.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _entry(page: Any) -> str:
    summary = _summaries.get(page.file.src_uri, "")
    return f"- [{page.title}]({page.url or './'}): {summary}".rstrip(": ")


def _first_paragraph(markdown: str) -> str:
    """The first paragraph of prose after the page title, on one line, links flattened."""
    paragraph: list[str] = []
    for line in markdown.splitlines():
        if line.startswith(("#", "```", ":::", "|", "-", ">")) or not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
