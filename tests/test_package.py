"""What users install: imports stay light, typing ships, names are documented."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import sqla_context

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
