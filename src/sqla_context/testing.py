"""Test helpers that keep each test's database work apart; importable without pytest.

``isolated(*databases)`` is the building block of the pytest plugin
(:mod:`sqla_context.pytest_plugin`)::

    async with testing.isolated(db, replica):
        ...  # run the app: requests, jobs, direct calls
    # everything written in the block is gone

Rollback mode (default)
    Each database gets one connection with an outer transaction for the whole block, and
    every session the app opens through the Database (scope sessions, ``new_session()``,
    ``db.sessionmaker()``) is bound to it with SQLAlchemy's
    ``join_transaction_mode="create_savepoint"``: the app's commits release savepoints,
    its rollbacks roll back to them, so it behaves as in production, and data committed by
    one request is visible to the next and to the test. At the end the outer transaction is
    rolled back. The sessions share that one connection, so code that runs queries of one
    database concurrently (``run_isolated`` under ``gather``) needs commit mode.

Commit mode
    The app really commits; when the block ends, the tables it wrote to (seen through the
    engine's events) are emptied: ``TRUNCATE ... RESTART IDENTITY CASCADE`` on PostgreSQL,
    ``TRUNCATE`` with foreign-key checks off on MySQL/MariaDB, ``DELETE`` on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import URL, Connection, MetaData, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker, create_async_engine

from ._scope import check_choice
from .exceptions import LeakError, UnsafeDatabaseError

if TYPE_CHECKING:
    from ._database import Database

__all__ = [
    "IsolationMode",
    "RunDatabases",
    "isolated",
    "isolated_in",
    "looks_like_test_database",
    "worker_url",
]

IsolationMode = Literal["rollback", "commit"]

_WRITE = re.compile(
    r"^\s*(?:insert\s+(?:ignore\s+)?into|update|delete\s+from|replace\s+into)\s+"
    r"[`\"\[]?(?:\w+[`\"\]]?\.[`\"\[]?)?(\w+)",
    re.IGNORECASE,
)


def looks_like_test_database(name: str) -> bool:
    """The default rule: a server database is a test one if its name contains ``"test"``."""
    return "test" in name.lower()


def _check_safe(db: Database, rule: Callable[[str], bool]) -> None:
    url = db.engine.url
    if url.get_backend_name() == "sqlite":
        return  # a file (or memory) of the test's own
    if not rule(url.database or ""):
        raise UnsafeDatabaseError(
            f"{db!r}: database {url.database!r} does not look like a test database, so "
            "sqla_context.testing refuses to touch it. Point the tests at a database whose "
            "name contains 'test', or pass is_test_database= to change the rule."
        )


@contextlib.asynccontextmanager
async def isolated(
    *databases: Database,
    mode: IsolationMode = "rollback",
    is_test_database: Callable[[str], bool] = looks_like_test_database,
) -> AsyncIterator[None]:
    """Keep the block's database work from outliving it, for each of ``databases``.

    See the module docstring for the two modes. Works however the app is driven inside
    the block, as long as it runs in this event loop (direct calls, ``httpx.ASGITransport``);
    for an app running in another loop (``TestClient``), use :func:`isolated_in`.

    Raises:
        ConfigurationError: ``mode`` is not ``"rollback"`` or ``"commit"``.
        UnsafeDatabaseError: a server database's name fails ``is_test_database``.
        LeakError: at exit, a connection of one of the databases is still checked out.
    """
    check_choice("mode", mode, IsolationMode)
    for db in databases:
        _check_safe(db, is_test_database)
    async with contextlib.AsyncExitStack() as stack:
        for db in databases:
            if mode == "rollback":
                await stack.enter_async_context(_rolled_back(db))
            else:
                await stack.enter_async_context(_truncated_after(db))
        yield


class _Portal(Protocol):
    """What :func:`isolated_in` needs of an anyio ``BlockingPortal``."""

    def wrap_async_context_manager(
        self, cm: contextlib.AbstractAsyncContextManager[None]
    ) -> contextlib.AbstractContextManager[None]: ...


@contextlib.contextmanager
def isolated_in(
    portal: _Portal,
    *databases: Database,
    mode: IsolationMode = "rollback",
    is_test_database: Callable[[str], bool] = looks_like_test_database,
) -> Iterator[None]:
    """:func:`isolated`, run inside another thread's event loop; a plain ``with`` block.

    For Starlette's and FastAPI's ``TestClient``, which runs the app in an event loop of its
    own (its ``portal``) that the test's loop cannot share connections with::

        with TestClient(app) as client, isolated_in(client.portal, db):
            client.post("/orders", json={...})

    Requests made through ``client`` inside the block are isolated; the engines are disposed
    at the end, inside the portal's loop, because their pooled connections belong to it.
    Use ``TestClient`` as a context manager: without it, each request runs in a new loop.

    Raises:
        The same errors as :func:`isolated`, raised in the calling thread.
    """

    @contextlib.asynccontextmanager
    async def isolate_then_dispose() -> AsyncIterator[None]:
        try:
            async with isolated(*databases, mode=mode, is_test_database=is_test_database):
                yield
        finally:
            for db in databases:
                await db.dispose()

    with portal.wrap_async_context_manager(isolate_then_dispose()):
        yield


def _check_no_leak(db: Database, allowed: int) -> None:
    checked_out = db.engine.pool.checkedout()  # type: ignore[attr-defined]
    if checked_out > allowed:
        raise LeakError(
            f"{db!r}: {checked_out - allowed} connection(s) still checked out when the test "
            "ended. A session from db.sessionmaker() or a connection from db.engine.connect() "
            "was not closed."
        )


@contextlib.asynccontextmanager
async def _rolled_back(db: Database) -> AsyncIterator[None]:
    if db._bound_maker is not None:
        raise RuntimeError(f"{db!r} is already isolated by an enclosing isolated() block")
    conn = await db.engine.connect()
    sqlite = conn.dialect.name == "sqlite"
    try:
        await conn.begin()
        if sqlite:
            # The sqlite3 driver begins transactions only before writes, so a SAVEPOINT
            # would start (and its RELEASE commit) a transaction of its own: take control.
            await conn.run_sync(_sqlite_isolation_level, None)
            await conn.exec_driver_sql("BEGIN")
        db._bound_maker = async_sessionmaker(
            bind=conn, join_transaction_mode="create_savepoint", **db.session_options
        )
        try:
            yield
        finally:
            db._bound_maker = None
        _check_no_leak(db, allowed=1)
    finally:
        try:
            await conn.rollback()
            if sqlite:
                await conn.run_sync(_sqlite_isolation_level, "")  # the driver's default
        finally:
            await conn.close()


def _sqlite_isolation_level(conn: Connection, level: str | None) -> None:
    conn.connection.dbapi_connection.isolation_level = level  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def _truncated_after(db: Database) -> AsyncIterator[None]:
    written: set[str] = set()

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        match = _WRITE.match(statement)
        if match:
            written.add(match[1])

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield
        _check_no_leak(db, allowed=0)
    finally:
        event.remove(engine, "before_cursor_execute", record)
        if written:
            async with db.engine.connect() as conn:
                await _empty(conn, sorted(written))


async def _empty(conn: AsyncConnection, tables: list[str]) -> None:
    preparer = conn.dialect.identifier_preparer
    quoted = [preparer.quote(t) for t in tables]
    name = conn.dialect.name
    if name == "postgresql":
        await conn.exec_driver_sql(f"TRUNCATE {', '.join(quoted)} RESTART IDENTITY CASCADE")
    elif name in ("mysql", "mariadb"):
        await conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        try:
            for table in quoted:
                await conn.exec_driver_sql(f"TRUNCATE TABLE {table}")
        finally:
            await conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    else:
        for table in quoted:
            await conn.exec_driver_sql(f"DELETE FROM {table}")
    await conn.commit()


def worker_url(url: URL, worker: str) -> URL:
    """The URL of ``worker``'s own database: ``<name>_<worker>`` on a server, a sibling file
    ``<stem>_<worker><suffix>`` for SQLite (an in-memory SQLite URL is returned as is)."""
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return url
        path = PurePath(url.database)
        return url.set(database=str(path.with_name(f"{path.stem}_{worker}{path.suffix}")))
    return url.set(database=f"{url.database}_{worker}")


class RunDatabases:
    """The databases of a whole test run: per-worker copies and the schema.

    ``setup()`` (or ``async with``) checks every database with ``is_test_database``; with
    ``worker`` set (pytest-xdist's ``gw0``, ``gw1``, ...) it creates the worker's own
    database on the server (or uses a file of its own for SQLite) and points the Database
    at it with :meth:`~sqla_context.Database.switch_url`; then it creates ``metadata``'s
    tables. ``teardown()`` drops the tables, drops the worker database (or deletes its
    file), points each Database back at its original URL and disposes the engines.
    Both leave no connection open, so they may run in different event loops.

    To run Alembic migrations instead of ``create_all``, pass no ``metadata`` and run
    ``alembic upgrade head`` against ``db.url`` after ``setup()``.
    """

    def __init__(
        self,
        *databases: Database,
        worker: str | None = None,
        metadata: MetaData | None = None,
        is_test_database: Callable[[str], bool] = looks_like_test_database,
    ) -> None:
        self.databases = databases
        self.worker = worker
        self.metadata = metadata
        self.is_test_database = is_test_database
        self._original: dict[Database, URL] = {}
        self._created: list[tuple[URL, URL]] = []  # (admin url, worker url)

    async def __aenter__(self) -> RunDatabases:
        await self.setup()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.teardown()

    async def setup(self) -> None:
        """Check, create and point at the worker databases; create the schema."""
        for db in self.databases:
            _check_safe(db, self.is_test_database)
        for db in self.databases:
            original = db.engine.url
            self._original[db] = original
            if self.worker:
                target = worker_url(original, self.worker)
                if target != original and original.get_backend_name() != "sqlite":
                    if (original, target) not in self._created:
                        await _create_database(original, str(target.database))
                        self._created.append((original, target))
                elif target != original:
                    self._created.append((original, target))
                await db.switch_url(target)
            if self.metadata is not None:
                async with db.engine.begin() as conn:
                    await conn.run_sync(self.metadata.create_all)
            await db.dispose()

    async def teardown(self) -> None:
        """Drop the schema and the worker databases; restore the URLs; dispose."""
        try:
            for db in self.databases:
                if self.metadata is not None:
                    async with db.engine.begin() as conn:
                        await conn.run_sync(self.metadata.drop_all)
                await db.dispose()
        finally:
            for db, original in self._original.items():
                await db.switch_url(original)
                await db.dispose()
            for admin, target in self._created:
                await _drop_database(admin, target)
            self._original.clear()
            self._created.clear()


async def _create_database(admin_url: URL, name: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = text("SELECT 1 FROM pg_database WHERE datname = :n")
                if (await conn.execute(query, {"n": name})).first() is None:
                    quoted = conn.dialect.identifier_preparer.quote(name)
                    await conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
            else:
                quoted = conn.dialect.identifier_preparer.quote(name)
                await conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {quoted}")
    finally:
        await engine.dispose()


async def _drop_database(admin_url: URL, target: URL) -> None:
    if target.get_backend_name() == "sqlite":
        if target.database:
            await asyncio.to_thread(Path(target.database).unlink, missing_ok=True)
        return
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(str(target.database))
            if conn.dialect.name == "postgresql":
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            else:
                # MariaDB/MySQL wait for every open transaction on the database's tables.
                users = text("SELECT id FROM information_schema.processlist WHERE db = :n")
                for (thread,) in (await conn.execute(users, {"n": target.database})).all():
                    with contextlib.suppress(Exception):  # it may have ended meanwhile
                        await conn.exec_driver_sql(f"KILL {int(thread)}")
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
    finally:
        await engine.dispose()
