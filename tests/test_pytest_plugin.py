"""The pytest plugin, run through pytester against a SQLite file and PostgreSQL."""

from __future__ import annotations

import contextlib
import importlib

import pytest
from sqlalchemy import text

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
import contextlib
import importlib

import pytest
from sqlalchemy import text
from sqla_context import Database, scope

db = Database(URL)

pytest_plugins = ["sqla_context.pytest_plugin"]


@pytest.fixture
def sqla_databases():
    return [db]


@pytest.fixture(autouse=True, scope="session")
def schema():
    import asyncio

    async def create():
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS plugin_items"))
            await conn.execute(text("CREATE TABLE plugin_items (name VARCHAR(20))"))
        await db.dispose()

    asyncio.run(create())


async def count():
    async with scope(nested="new"):
        session = await db.session()
        return (await session.execute(text("SELECT count(*) FROM plugin_items"))).scalar_one()


async def add(name):
    async with scope():
        await (await db.session()).execute(
            text("INSERT INTO plugin_items VALUES (:n)"), {"n": name}
        )
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


async def test_plugin_isolates_tests(pytester: pytest.Pytester, backend: Backend) -> None:
    pytester.makeconftest(f"URL = {backend.url!r}\n" + APP)
    pytester.makepyfile(test_app=TESTS)
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    async with backend.witness.connect() as conn:
        count = await conn.execute(text("SELECT count(*) FROM plugin_items"))
        assert count.scalar_one() == 0, "nothing any test wrote was left behind"


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
    result.stdout.fnmatch_lines(["*define a `sqla_databases` fixture*"])
    assert result.ret != 0
