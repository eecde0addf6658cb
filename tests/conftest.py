"""The backend matrix: every test that takes ``backend`` runs on each real database.

SQLite (a file in the test's tmp dir) always runs. PostgreSQL (asyncpg and psycopg 3) and
MariaDB (asyncmy) run when reachable; otherwise they skip with the reason, unless
SQLA_CONTEXT_REQUIRE_SERVERS=1 (set by .ci/run), which turns an unreachable server into a
failure. Override the server URLs with SQLA_CONTEXT_PG_URL / _PSYCOPG_URL / _MARIADB_URL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sqla_context import Database

REQUIRE_SERVERS = os.environ.get("SQLA_CONTEXT_REQUIRE_SERVERS", "") not in ("", "0")

PG_URL = os.environ.get("SQLA_CONTEXT_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PSYCOPG_URL = os.environ.get(
    "SQLA_CONTEXT_PSYCOPG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get("SQLA_CONTEXT_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306/test")

BACKENDS = [
    pytest.param(("sqlite", "sqlite+aiosqlite:///{tmp}/test.db", "aiosqlite"), id="sqlite"),
    pytest.param(("postgresql", PG_URL, "asyncpg"), id="pg-asyncpg"),
    pytest.param(("postgresql", PSYCOPG_URL, "psycopg"), id="pg-psycopg"),
    pytest.param(("mariadb", MARIADB_URL, "asyncmy"), id="mariadb"),
]

_unreachable: dict[str, str] = {}  # url -> reason, so a dead server costs one timeout per run


@event.listens_for(Engine, "connect")
def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite enforces foreign keys (and so deferred ones, checked at COMMIT) only when asked.
    if "sqlite" in type(dbapi_connection).__module__:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


async def _why_unusable(url: str, driver: str) -> str | None:
    if importlib.util.find_spec(driver) is None:
        return f"driver {driver!r} is not installed (pip install 'sqla-context[test]')"
    if url in _unreachable:
        return _unreachable[url]
    if url.startswith("sqlite"):
        return None
    engine = create_async_engine(url)

    async def probe() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))

    try:
        await asyncio.wait_for(probe(), 10)
    except Exception as exc:
        _unreachable[url] = f"{url} is unreachable: {type(exc).__name__}: {exc}"
        return _unreachable[url]
    finally:
        await engine.dispose()
    return None


class Backend:
    """One real database for one test: tables, an independent witness engine, helpers.

    Assertions read through ``witness`` (its own engine and pool), never through the
    session under test. Databases made with :meth:`database` are checked at teardown: no
    connection may still be checked out.
    """

    def __init__(self, kind: str, url: str, driver: str) -> None:
        self.kind = kind  # "sqlite" | "postgresql" | "mariadb"
        self.url = url
        self.driver = driver
        self.witness: AsyncEngine = create_async_engine(url)
        self.databases: list[Database] = []
        self.siblings: list[Backend] = []

    def database(self, **options: Any) -> Database:
        db = Database(self.url, **options)
        self.databases.append(db)
        return db

    async def setup(self) -> None:
        deferred = "" if self.kind == "mariadb" else " DEFERRABLE INITIALLY DEFERRED"
        async with self.witness.begin() as conn:
            for table in ("children", "parents", "items"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            await conn.execute(text("CREATE TABLE items (name VARCHAR(100) PRIMARY KEY)"))
            await conn.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
            await conn.execute(
                text(
                    "CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER "
                    f"REFERENCES parents (id){deferred})"
                )
            )

    async def sibling(self) -> Backend:
        """Another database of the same kind (same server, or another SQLite file), set up."""
        url = make_url(self.url)
        name = f"{url.database.removesuffix('.db')}_sibling{len(self.siblings) + 1}"
        if self.kind == "sqlite":
            other = url.set(database=f"{name}.db")
        else:
            await _create_database(self.witness, name)
            other = url.set(database=name)
        be = Backend(self.kind, other.render_as_string(hide_password=False), self.driver)
        await be.setup()
        self.siblings.append(be)
        return be

    async def teardown(self) -> None:
        for sibling in self.siblings:
            await sibling.teardown()
        try:
            leaks = {
                db.name: db.engine.pool.checkedout()
                for db in self.databases
                if db._engine is not None
            }
            for db in self.databases:
                await db.dispose()
            assert not any(leaks.values()), f"connections still checked out: {leaks}"
            assert await self.open_transactions() == 0, "a transaction was left open"
        finally:
            await self.witness.dispose()

    async def names(self) -> list[str]:
        """The committed rows of ``items``, sorted, as seen from another connection."""
        async with self.witness.connect() as conn:
            rows = await conn.execute(text("SELECT name FROM items ORDER BY name"))
            return [r[0] for r in rows]

    async def open_transactions(self) -> int:
        """Server-side transactions left open by other connections (0 on SQLite)."""
        if self.kind == "sqlite":
            return 0
        if self.kind == "postgresql":
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
            )
        else:
            sql = (
                "SELECT count(*) FROM information_schema.innodb_trx "
                "WHERE trx_mysql_thread_id <> connection_id()"
            )
        async with self.witness.connect() as conn:
            return int((await conn.execute(text(sql))).scalar_one())

    async def doom(self, session: AsyncSession) -> None:
        """Make the next COMMIT of ``session`` fail at the server, after a successful write.

        PostgreSQL and SQLite: a row violating a deferred foreign key (checked at COMMIT).
        MariaDB has no deferred constraints: its connection is killed from outside.
        """
        if self.kind == "mariadb":
            await session.execute(text("INSERT INTO items (name) VALUES ('doomed')"))
            conn_id = (await session.execute(text("SELECT connection_id()"))).scalar_one()
            async with self.witness.connect() as conn:
                await conn.execute(text(f"KILL {int(conn_id)}"))
        else:
            await session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))


_created: set[str] = set()


async def _create_database(witness: AsyncEngine, name: str) -> None:
    if f"{witness.url}/{name}" in _created:
        return
    async with witness.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if witness.dialect.name == "postgresql":
            query = text("SELECT 1 FROM pg_database WHERE datname = :n")
            if (await conn.execute(query, {"n": name})).first() is None:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        else:
            await conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
    _created.add(f"{witness.url}/{name}")


async def insert(session: AsyncSession, name: str) -> None:
    await session.execute(text("INSERT INTO items (name) VALUES (:name)"), {"name": name})


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind, url_template, driver = request.param
    url = url_template.format(tmp=tmp_path)
    problem = await _why_unusable(url, driver)
    if problem is not None:
        if REQUIRE_SERVERS:
            pytest.fail(f"SQLA_CONTEXT_REQUIRE_SERVERS is set but {problem}")
        pytest.skip(problem)
    be = Backend(kind, url, driver)
    await be.setup()
    try:
        yield be
    finally:
        await be.teardown()


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    """SQLite only, for behaviour that does not depend on the database."""
    be = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path}/test.db", "aiosqlite")
    await be.setup()
    try:
        yield be
    finally:
        await be.teardown()
