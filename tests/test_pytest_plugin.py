"""The pytest plugin, run through pytester on every backend (and under pytest-xdist)."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
from sqlalchemy import inspect as sync_inspect
from sqlalchemy import make_url, text

from .conftest import Backend

pytest_plugins = ["pytester"]

# pytester restores sys.modules after each test, dropping modules first imported during it;
# importing a C extension such as ssl a second time can crash the interpreter. Import what
# the backends load now, so that it stays.
for _module in (
    "ssl",
    "asyncpg",
    "psycopg",
    "asyncmy",
    "aiosqlite",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.mysql.asyncmy",
    "sqlalchemy.dialects.sqlite.aiosqlite",
):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)

APP = """
import pytest
from sqlalchemy import Column, MetaData, String, Table, func, insert, select
from sqla_context import Database, scope

db = Database(URL)
metadata = MetaData()
items = Table("plugin_items", metadata, Column("name", String(20)))

pytest_plugins = ["sqla_context.pytest_plugin"]


@pytest.fixture(scope="session")
def sqla_databases():
    return [db]


@pytest.fixture(scope="session")
def sqla_metadata():
    return metadata


async def count():
    async with scope(nested="new"):
        session = await db.session()
        return (await session.execute(select(func.count()).select_from(items))).scalar_one()


async def add(name):
    async with scope():
        await (await db.session()).execute(insert(items).values(name=name))
"""

TESTS = """
import pytest
from conftest import add, count


async def test_first(sqla_isolation):
    assert sqla_isolation == "rollback"
    await add("a")
    assert await count() == 1


async def test_second_starts_empty(sqla_isolation):
    assert await count() == 0
    await add("b")
    await add("c")
    assert await count() == 2


@pytest.mark.sqla_commit
async def test_commit_mode(sqla_isolation):
    assert sqla_isolation == "commit"
    await add("d")
    assert await count() == 1


async def test_after_commit_mode_it_is_empty(sqla_isolation):
    assert await count() == 0
"""

WORKER_TESTS = """
import os

import pytest
from conftest import add, count, db


@pytest.mark.parametrize("n", range(6))
async def test_each_worker_has_its_own_database(sqla_isolation, n):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    assert str(db.url.database).replace(".db", "").endswith("_" + worker)
    await add(f"{worker}-{n}")
    assert await count() == 1
"""


def project(pytester: pytest.Pytester, backend: Backend, **tests: str) -> None:
    pytester.makeconftest(f"URL = {backend.url!r}\n" + APP)
    pytester.makepyfile(**tests)
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")


async def tables(backend: Backend) -> list[str]:
    async with backend.witness.connect() as conn:
        names = await conn.run_sync(lambda sync: sync_inspect(sync).get_table_names())
    return [n for n in names if n.startswith("plugin_")]


async def databases_like(backend: Backend, marker: str) -> list[str]:
    url = make_url(backend.url)
    if backend.kind == "sqlite":
        folder = Path(str(url.database)).parent
        return sorted(p.name for p in folder.iterdir() if marker in p.name)
    sql = "SELECT datname FROM pg_database" if backend.kind == "postgresql" else "SHOW DATABASES"
    async with backend.witness.connect() as conn:
        names = (await conn.execute(text(sql))).scalars().all()
    return sorted(n for n in names if n.startswith(f"{url.database}{marker}"))


async def test_plugin_isolates_tests(pytester: pytest.Pytester, backend: Backend) -> None:
    project(pytester, backend, test_app=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    assert await tables(backend) == [], "the schema was created for the run and dropped after"


async def test_plugin_gives_each_xdist_worker_a_database(
    pytester: pytest.Pytester, backend: Backend
) -> None:
    project(pytester, backend, test_workers=WORKER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*2 workers*"])
    assert await databases_like(backend, "_gw") == [], "worker databases are dropped at the end"
    assert await tables(backend) == []


def test_plugin_is_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(sqla_isolation):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'sqla_isolation' not found*"])


def test_missing_databases_fixture_explains(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["sqla_context.pytest_plugin"]\n')
    pytester.makepyfile(test_x="async def test_x(sqla_isolation):\n    pass\n")
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*define a session-scoped `sqla_databases` fixture*"])
    assert result.ret != 0
