"""The documentation's code runs, its output is what the page shows, and its links resolve.

Rules for docs/*.md, docs/migrating/*.md and README.md:

- A fence tagged ``python`` is a complete program. It runs as a script in a fresh temporary
  directory (so ``sqlite+aiosqlite:///app.db`` is a new file), with warnings turned into errors,
  and must exit with status 0 without printing "Exception ignored" (what an unclosed
  connection or a never-awaited coroutine prints at exit).
- A fence tagged ``text`` that follows a ``python`` fence, with only blank lines between them,
  is that program's exact standard output.
- Fragments that cannot run alone are tagged ``py``; shell commands ``console``.
- Every page has at least one runnable block, so that this test cannot pass vacuously.
- Programs run in any order and any folder: each creates what it needs (dropping its own
  tables first), so running them one after another in one folder, forwards or backwards,
  gives the same results as running each alone.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import sqla_context

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "migrating").glob("*.md")),
    ROOT / "README.md",
]
EXPECTED_PAGES = {
    "index",
    "tutorial",
    "concepts",
    "howto",
    "reference",
    "troubleshooting",
    "web",
    "testing",
    "litestar",
    "aiohttp",
    "taskiq",
    "faststream",
    "integrations",
    "callbacks",
    "rules",
    "retries",
    "replicas",
    "migrating/index",
    "migrating/depends",
    "migrating/context-async-sqlalchemy",
    "migrating/fastapi-async-sqlalchemy",
    "migrating/advanced-alchemy",
    "migrating/flask-sqlalchemy",
    "observability",
}
LANGUAGES = {"python", "py", "text", "console"}
#: Upper bound for one program; they take about a second each.
TIMEOUT = 60

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^(?P<level>#{1,6}) +(?P<text>.+?) *#*$")


@dataclass(frozen=True)
class Fence:
    language: str
    start: int  # 0-based index of the opening line
    end: int  # 0-based index of the closing line
    text: str


@dataclass(frozen=True)
class Program:
    page: Path
    index: int  # position among the page's runnable blocks, from 1
    line: int  # 1-based line of the opening fence
    code: str
    output: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fences(page: Path) -> list[Fence]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Fence] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        for j in range(i + 1, len(lines)):
            closing = lines[j].strip()
            if closing.startswith(fence) and set(closing) == {fence[0]}:
                break
        else:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        body = [line.removeprefix(indent) for line in lines[i + 1 : j]]
        language = (match["info"].split() or [""])[0]
        found.append(Fence(language, i, j, "\n".join(body) + "\n"))
        i = j + 1
    return found


def programs(page: Path) -> list[Program]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = fences(page)
    found: list[Program] = []
    for position, fence in enumerate(blocks):
        if fence.language != "python":
            continue
        output = None
        if position + 1 < len(blocks):
            after = blocks[position + 1]
            between = lines[fence.end + 1 : after.start]
            if after.language == "text" and not any(line.strip() for line in between):
                output = after.text
        found.append(Program(page, len(found) + 1, fence.start + 1, fence.text, output))
    return found


ALL_PROGRAMS = [program for page in PAGES for program in programs(page)]


def program_id(program: Program) -> str:
    return f"{program.page.relative_to(ROOT).as_posix()}#{program.index}"


# -- running the programs ------------------------------------------------------------------------

# The sqla_context under test (a source tree on PYTHONPATH or the installed wheel) comes first,
# and relative PYTHONPATH entries are made absolute: the programs run in another directory.
_PYTHONPATH = os.pathsep.join(
    [
        str(Path(sqla_context.__file__).resolve().parents[1]),
        *(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p),
    ]
)


def run(program: Program, workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"{program.page.stem.lower()}_{program.index}.py"
    script.write_text(program.code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": _PYTHONPATH, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def workdir_name(program: Program) -> str:
    """docs/index.md and docs/migrating/index.md get different directories."""
    page = program.page.relative_to(ROOT).with_suffix("").as_posix().replace("/", "-")
    return f"{page}-{program.index}"


@pytest.fixture(scope="session")
def started(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Program, Future[subprocess.CompletedProcess[str]]]]:
    """Start the selected programs in the background, as many at a time as there are CPUs.

    Each spends most of its second importing SQLAlchemy; one after another, they would take
    about half a minute.
    """
    selected = [
        item.callspec.params["program"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_program" and hasattr(item, "callspec")
    ]
    base = tmp_path_factory.mktemp("docs")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures: dict[Program, Future[subprocess.CompletedProcess[str]]] = {
            program: pool.submit(run, program, base / workdir_name(program)) for program in selected
        }
        yield futures


@pytest.mark.parametrize("program", ALL_PROGRAMS, ids=program_id)
def test_program(
    program: Program, started: dict[Program, Future[subprocess.CompletedProcess[str]]]
) -> None:
    result = started[program].result()
    report = f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"{program.where} exited with {result.returncode}\n{report}"
    assert "Exception ignored" not in result.stderr, f"{program.where} leaked\n{report}"
    if program.output is not None:
        assert result.stdout.rstrip("\n") == program.output.rstrip("\n"), (
            f"{program.where} printed other output than the page shows\n{report}"
        )


@pytest.mark.timeout(900)  # about 40 programs one after another: a second or more each
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_programs_share_one_folder(order: str, tmp_path: Path) -> None:
    """All programs, one after another in one folder (as a reader trying them would)."""
    sequence = ALL_PROGRAMS if order == "forward" else ALL_PROGRAMS[::-1]
    failures = []
    for program in sequence:
        result = run(program, tmp_path)
        if result.returncode != 0 or (
            program.output is not None and result.stdout.rstrip("\n") != program.output.rstrip("\n")
        ):
            last = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            failures.append(f"{program.where} (exit {result.returncode}): {last}")
    assert list(tmp_path.glob("*.py")), "no program ran"
    assert not failures, (
        f"{len(failures)} of {len(sequence)} programs fail in a shared folder:\n"
        + "\n".join(failures)
    )


# -- the pages themselves ------------------------------------------------------------------------


def test_every_page_exists() -> None:
    found = {page.relative_to(ROOT / "docs").with_suffix("").as_posix() for page in PAGES[:-1]}
    missing = EXPECTED_PAGES - found
    assert not missing, f"docs/ lacks {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_page_has_runnable_code(page: Path) -> None:
    assert programs(page), f"{page.relative_to(ROOT)} has no ```python block"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_fence_is_tagged(page: Path) -> None:
    for fence in fences(page):
        assert fence.language in LANGUAGES, (
            f"{page.relative_to(ROOT)}:{fence.start + 1}: tag the fence with one of "
            f"{sorted(LANGUAGES)}, not {fence.language!r}"
        )


def slugs(page: Path) -> set[str]:
    """The anchors GitHub generates for the page's headings."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside = {n for f in fences(page) for n in range(f.start, f.end + 1)}
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for number, line in enumerate(lines):
        match = HEADING.match(line)
        if match is None or number in inside:
            continue
        slug = re.sub(r"[^\w\- ]", "", match["text"].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for fence in fences(page):  # code is not markdown
        text = text.replace(fence.text, "")
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: broken link {target!r}"
        if anchor and linked.suffix == ".md":
            assert anchor in slugs(linked), f"{page.relative_to(ROOT)}: no anchor for {target!r}"


# -- the docstrings document the code (the API reference is generated from them) ----------------

PUBLIC_MODULES = [
    "sqla_context",
    "sqla_context.asgi",
    "sqla_context.testing",
    "sqla_context.pytest_plugin",
    "sqla_context.litestar",
    "sqla_context.aiohttp",
    "sqla_context.taskiq",
    "sqla_context.faststream",
]


def type_module(name: str) -> str:
    """The module that defines the type alias ``name`` (re-exported by a public module)."""
    module = importlib.import_module(name.rsplit(".", 1)[0])
    alias = name.rsplit(".", 1)[1]
    for candidate in (module.__name__, *(m for m in sys.modules if m.startswith("sqla_context."))):
        source = inspect.getsource(sys.modules[candidate])
        if re.search(rf"^{alias} = ", source, re.M):
            return candidate
    return module.__name__


def public_api() -> list[tuple[str, Any]]:
    """Every name of every public module's ``__all__``, and the public members of its classes."""
    api: list[tuple[str, Any]] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name == "__version__":
                continue
            obj = getattr(module, name)
            api.append((f"{module_name}.{name}", obj))
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                api += [
                    (f"{module_name}.{name}.{member}", getattr(obj, member))
                    for member in vars(obj)
                    if not member.startswith("_")
                ]
    return api


def parameters(obj: Any) -> list[str]:
    """The parameters a reader passes: of functions, and of a class's constructor."""
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        target = obj.__init__
    elif inspect.isfunction(obj):
        target = obj
    else:  # exceptions (raised, not built, by users), properties, attributes
        return []
    return [
        name
        for name, parameter in inspect.signature(target).parameters.items()
        if name != "self"
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def framework_hook(name: str) -> bool:
    """A method a framework calls (it overrides a method of the framework's base class)."""
    owner, member = name.rsplit(".", 1)
    module_name, _, class_name = owner.rpartition(".")
    if owner in PUBLIC_MODULES or not module_name:
        return False
    cls = getattr(importlib.import_module(module_name), class_name, None)
    return inspect.isclass(cls) and any(
        member in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith("sqla_")
    )


def docstring(name: str, obj: Any) -> str:
    """The docstring a reader sees for ``obj``; a class attribute is described in its class's."""
    if typing.get_origin(obj) is typing.Literal:  # a type alias: its docstring follows it
        source = inspect.getsource(importlib.import_module(type_module(name)))
        match = re.search(
            rf"^{name.rsplit('.', 1)[1]} = .*\n\"\"\"(.+?)\"\"\"", source, re.M | re.S
        )
        return match[1] if match else ""
    if type(obj).__name__ in ("member_descriptor", "getset_descriptor") or not callable(obj):
        owner = importlib.import_module(name.rsplit(".", 2)[0])
        return inspect.getdoc(getattr(owner, name.rsplit(".", 2)[1])) or ""
    return inspect.getdoc(obj) or ""


@pytest.mark.parametrize(("name", "obj"), public_api(), ids=[name for name, _ in public_api()])
def test_docstring_documents_every_public_name(name: str, obj: Any) -> None:
    text = docstring(name, obj)
    assert text, f"{name} has no docstring (the API reference is generated from it)"
    if type(obj).__name__ in ("member_descriptor", "getset_descriptor"):
        assert re.search(rf"\b{name.rsplit('.', 1)[1]}\b", text), (
            f"{name}: the class docstring does not describe this attribute"
        )
    whole = text + (inspect.getdoc(obj.__init__) or "" if inspect.isclass(obj) else "")
    injected = framework_hook(name) or name.startswith("sqla_context.pytest_plugin.")
    for parameter in [] if injected else parameters(obj):  # a fixture's come from pytest
        assert re.search(rf"\b{parameter}\b", whole), (
            f"{name}: the docstring does not mention the parameter {parameter!r}"
        )
