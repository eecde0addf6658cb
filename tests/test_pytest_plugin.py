"""The pytest plugin, run through pytester on every backend (and under pytest-xdist)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from pathlib import Path

import pytest
from sqlalchemy import inspect as sync_inspect
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

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
replica = Database(URL, name="replica")  # the usual test setup for a read replica
metadata = MetaData()
items = Table("plugin_items", metadata, Column("name", String(20)))

pytest_plugins = ["sqla_context.pytest_plugin"]


@pytest.fixture(scope="session")
def sqla_databases():
    return [db, replica]


@pytest.fixture(scope="session")
def sqla_metadata():
    return metadata


async def count(on=db):
    async with scope(nested="new"):
        session = await on.session()
        return (await session.execute(select(func.count()).select_from(items))).scalar_one()


async def add(name):
    async with scope():
        await (await db.session()).execute(insert(items).values(name=name))
"""

TESTS = """
import pytest
from conftest import add, count, replica


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


async def test_replica_sees_the_primarys_writes(sqla_isolation):
    await add("e")
    assert await count(on=replica) == 1
"""

WORKER_TESTS = """
import os

import pytest
from conftest import add, count, db


@pytest.mark.parametrize("n", range(6))
async def test_each_worker_has_its_own_database(sqla_isolation, n):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    assert "_" + worker + "_p" in str(db.url.database), "<name>_<worker>_<run token>"
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
    result.assert_outcomes(passed=5)
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


DOCS_TESTCLIENT = """
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from sqlalchemy import func, insert, select

from conftest import db, items
from sqla_context.asgi import SessionMiddleware
from sqla_context.testing import isolated_in

app = FastAPI()
app.add_middleware(SessionMiddleware)


@app.post("/items/{name}", status_code=201)
async def create(name: str) -> None:
    await (await db.session()).execute(insert(items).values(name=name))


@app.get("/items/count")
async def counted() -> int:
    session = await db.session()
    return (await session.execute(select(func.count()).select_from(items))).scalar_one()


@pytest.fixture(autouse=True)
def _isolate(sqla_isolation):
    yield


@pytest.fixture
def client(sqla_run_databases):
    with TestClient(app) as client, isolated_in(client.portal, *sqla_run_databases):
        yield client


@pytest.mark.parametrize("n", range(2))
def test_signup(client, n):
    assert client.post("/items/ada").status_code == 201
    assert client.get("/items/count").json() == 1
"""


async def test_autouse_isolation_composes_with_a_testclient_fixture(
    pytester: pytest.Pytester, backend: Backend
) -> None:
    project(pytester, backend, test_client=DOCS_TESTCLIENT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)
    assert await tables(backend) == []


async def test_is_test_database_can_be_set_for_the_plugin(
    pytester: pytest.Pytester, backend: Backend
) -> None:
    rule = 'import pytest\n\n@pytest.fixture(scope="session")\ndef sqla_is_test_database():\n'
    rule += "    return lambda name: name.startswith('qa_')\n"
    pytester.makeconftest(f"URL = {backend.url!r}\n" + APP + "\n" + rule)
    pytester.makepyfile(test_app=TESTS)
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    if backend.kind == "sqlite":  # a file of the run's own: no name rule
        result.assert_outcomes(passed=5)
    else:  # the run's database is test_sqla_ctx_<pid>: the rule given refuses it
        result.assert_outcomes(errors=5)
        result.stdout.fnmatch_lines(["*UnsafeDatabaseError*sqla_is_test_database*"])
    assert await tables(backend) == []


async def test_run_keeps_tables_that_existed_before_it(backend: Backend) -> None:
    from sqlalchemy import Column, MetaData, String, Table

    from sqla_context.testing import RunDatabases

    metadata = MetaData()
    Table("items", metadata, Column("name", String(100), primary_key=True))  # exists already
    Table("plugin_new", metadata, Column("name", String(20)))
    async with backend.witness.begin() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('precious')"))
    db = backend.database()
    async with RunDatabases(db, metadata=metadata):
        assert await tables(backend) == ["plugin_new"], "the missing table was created"
    assert await tables(backend) == [], "the run's own table was dropped"
    assert await backend.names() == ["precious"], "the table that existed before was kept"


async def test_worker_databases_are_unique_per_run(backend: Backend) -> None:
    from sqla_context.testing import RunDatabases, worker_url

    url = make_url(backend.url)
    # What another run on the same server may be using: the name the old scheme picked.
    theirs = worker_url(url, "gw0")
    if backend.kind == "sqlite":
        await asyncio.to_thread(Path(str(theirs.database)).write_bytes, b"")
    else:
        quoted = backend.witness.dialect.identifier_preparer.quote(str(theirs.database))
        await autocommit(backend, f"CREATE DATABASE {quoted}")
    try:
        one, two = backend.database(), backend.database()
        async with RunDatabases(one, worker="gw0"), RunDatabases(two, worker="gw0"):
            assert one.url != two.url, "two runs at once, two databases"
            assert theirs not in (one.url, two.url)
            async with one.engine.begin() as conn:  # each is usable
                await conn.execute(text("CREATE TABLE plugin_t (x INTEGER)"))
        assert (one.url, two.url) == (url, url), "pointed back"
        assert await databases_like(backend, "_gw0") == [str(theirs.database).split("/")[-1]], (
            "the runs dropped their own databases and left the other one alone"
        )
    finally:
        if backend.kind == "sqlite":
            await asyncio.to_thread(Path(str(theirs.database)).unlink)
        else:
            await autocommit(backend, f"DROP DATABASE {quoted}")


async def autocommit(backend: Backend, sql: str) -> None:
    engine = create_async_engine(backend.url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(sql))
    finally:
        await engine.dispose()
