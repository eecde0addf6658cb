"""What users install: imports stay light, typing ships, names are documented."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

import sqla_context

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("fastapi", "starlette", "litestar", "httpx", "uvicorn", "anyio", "pydantic")
DRIVERS = ("asyncpg", "psycopg", "aiosqlite", "asyncmy", "aiomysql")


def imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_pulls_in_no_framework_and_no_driver() -> None:
    for statement in ("import sqla_context", "import sqla_context.asgi"):
        loaded = imported_after(statement)
        assert "sqla_context" in loaded
        leaked = [m for m in HEAVY + DRIVERS if m in loaded]
        assert leaked == [], f"{statement} imported {leaked}"


def test_ships_py_typed() -> None:
    assert files("sqla_context").joinpath("py.typed").is_file()


def test_exceptions_share_one_base() -> None:
    from sqla_context import exceptions

    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), sqla_context.SqlaContextError), name


def _run_py() -> Any:
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_claimed_pythons_are_the_ones_ci_runs() -> None:
    """requires-python and the classifiers name exactly the Pythons of the matrix legs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    tested = {"3.11"} | {version for version, _ in _run_py().LEGS.values()}  # 3.11: run.py test
    classified = {
        c.rsplit(":: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert classified == tested
    assert project["requires-python"] == f">={min(tested, key=lambda v: int(v.split('.')[1]))}"


def test_lowest_leg_pins_every_floor() -> None:
    """The constraints of the "lowest" leg pin each `>=` floor of pyproject.toml exactly."""
    constraints = _run_py().floor_constraints().splitlines()
    pins = dict(line.split("==") for line in constraints)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = [r for r in requirements if ">=" in r and not r.startswith("sqla-context")]
    assert floors, "pyproject.toml has no floors?"
    for requirement in floors:
        name, floor = re.split(r"(?:\[[^\]]*\])?>=", requirement)
        assert pins[re.sub(r"[-_.]+", "-", name).lower()] == floor, requirement
    assert pins["sqlalchemy"] == "2.0.55"
