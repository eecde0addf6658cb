"""Test helpers that keep each test's database work apart; importable without pytest.

``isolated(*databases)`` is the building block of the pytest plugin
(``sqla_context.pytest_plugin``)::

    async with testing.isolated(db, replica):
        ...  # run the app: requests, jobs, direct calls
    # everything written in the block is gone

Rollback mode (default)
    Each database gets one connection with an outer transaction for the whole block, and
    every session the app opens through the Database (scope sessions, ``new_session()``,
    ``db.sessionmaker()``) is bound to it with SQLAlchemy's
    ``join_transaction_mode="create_savepoint"``: the app's commits release savepoints,
    its rollbacks roll back to them, so it behaves as in production, and data committed by
    one request is visible to the next and to the test. Databases of one call that point at
    the same database (a replica on the primary's URL) share that connection. At the end the
    outer transaction is rolled back. The sessions share one connection, so code that runs
    queries of one database concurrently (``run_isolated`` under ``gather``) needs commit mode.
    ``on_commit()`` callbacks run as in production, after the app's (savepoint) commit;
    ``captured_on_commit()`` holds them back for the test to inspect and run.

Commit mode
    The app really commits; when the block ends, the tables it wrote to (with their schema,
    from the compiled statements) are emptied: ``TRUNCATE ... RESTART IDENTITY CASCADE`` on
    PostgreSQL, ``TRUNCATE`` with foreign-key checks off on MySQL/MariaDB, ``DELETE`` on
    SQLite.

Errors::

    IsolationError (RuntimeError)   nested isolation, a session in a non-isolated event loop,
                                    a lock wait longer than lock_timeout
    LeakError (AssertionError)      a connection or session still open at the end
    UnsafeDatabaseError             a server database whose name fails is_test_database
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import URL, MetaData, Table, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from ._cleanup import truncated_after
from ._isolation import IsolationError, IsolationMode, registered, rolled_back
from ._retry import _RetryTesting
from ._retry import set_retry_testing as _set_retry_testing
from ._scope import _captures, _Entry, check_choice, run_callbacks
from .exceptions import ConfigurationError, UnsafeDatabaseError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from ._database import Database
    from ._typing import CommitCallback

__all__ = [
    "CapturedCallbacks",
    "IsolationError",
    "IsolationMode",
    "RunDatabases",
    "captured_on_commit",
    "isolated",
    "isolated_in",
    "looks_like_test_database",
    "set_retry_testing",
    "worker_url",
]

#: Seconds a connection may wait for a lock during an isolated block (see ``isolated()``).
DEFAULT_LOCK_TIMEOUT = 10.0


def set_retry_testing(testing: bool, *, attempts: int | None = 1) -> _RetryTesting:
    """Make retried units fast and predictable in tests (process-wide), or back to normal.

    ``set_retry_testing(True)`` turns retries off: a unit runs once, and a retryable error
    raises ``RetryError`` at once. ``attempts=n`` allows up to ``n`` runs
    (capped by each ``Retry``'s own), ``attempts=None`` keeps each ``Retry``'s own. In
    testing mode there is never a wait between attempts. ``set_retry_testing(False)``
    restores normal retrying. Used as a context manager, the call restores the previous
    state at the end of the block::

        with testing.set_retry_testing(True, attempts=None):
            ...  # retries as configured, without backoff

    Raises:
        ConfigurationError: ``attempts`` is not None or an int >= 1.
    """
    return _set_retry_testing(testing, attempts=attempts)


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
            "name contains 'test', or pass is_test_database= to change the rule (with the "
            "pytest plugin: override the `sqla_is_test_database` fixture)."
        )


def _check_lock_timeout(lock_timeout: float | None) -> None:
    if lock_timeout is not None and not lock_timeout > 0:
        raise ConfigurationError(
            f"lock_timeout={lock_timeout!r} is not valid: give a number of seconds > 0, or "
            "None to wait as long as the server lets a lock wait"
        )


@contextlib.asynccontextmanager
async def isolated(
    *databases: Database,
    mode: IsolationMode = "rollback",
    is_test_database: Callable[[str], bool] = looks_like_test_database,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
) -> AsyncIterator[None]:
    """Keep the block's database work from outliving it, for each of ``databases``.

    See the module docstring for the two modes. Works however the app is driven inside
    the block, as long as it runs in this event loop (direct calls, ``httpx.ASGITransport``);
    for an app running in another loop (``TestClient``), use ``isolated_in()``, which
    composes with an ``isolated()`` block of the test's own loop.

    Pass every Database of the app in one call: in rollback mode those that point at the
    same database then share the test's connection and see each other's writes.

    Args:
        databases: the Databases to isolate.
        mode: ``"rollback"`` (default) or ``"commit"``.
        is_test_database: a function of a server database's name; ``False`` refuses it.
        lock_timeout: seconds a connection of these databases may wait for a lock inside the
            block (rollback mode: every transaction; commit mode: the final clean-up), or
            ``None`` for the server's setting. In rollback mode the test's writes stay
            uncommitted until the end, so a connection that waits for them would wait
            forever. Not applied on SQLite, whose driver gives up after 5 s by default.

    Raises:
        ConfigurationError: ``mode`` is not ``"rollback"`` or ``"commit"``, or
            ``lock_timeout`` is not positive.
        UnsafeDatabaseError: a server database's name fails ``is_test_database``.
        IsolationError: a database is already isolated in this event loop; a lock wait
            exceeded ``lock_timeout`` (raised where the waiting query ran); a session was
            made in another event loop while the database is isolated in rollback mode.
        LeakError: at exit, a connection checked out in the block is still checked out, or
            (rollback mode) a session made in the block is still in a transaction.
    """
    check_choice("mode", mode, IsolationMode)
    _check_lock_timeout(lock_timeout)
    for db in databases:
        _check_safe(db, is_test_database)
    with registered(databases, mode):
        if mode == "rollback":
            async with rolled_back(databases, lock_timeout):
                yield
        else:
            async with contextlib.AsyncExitStack() as stack:
                for db in databases:
                    await stack.enter_async_context(truncated_after(db, lock_timeout))
                yield


class _Portal(Protocol):
    """What ``isolated_in()`` needs of an anyio ``BlockingPortal``."""

    def wrap_async_context_manager(
        self, cm: contextlib.AbstractAsyncContextManager[None]
    ) -> contextlib.AbstractContextManager[None]: ...


@contextlib.contextmanager
def isolated_in(
    portal: _Portal,
    *databases: Database,
    mode: IsolationMode = "rollback",
    is_test_database: Callable[[str], bool] = looks_like_test_database,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
) -> Iterator[None]:
    """``isolated()``, run inside another thread's event loop; a plain ``with`` block.

    For Starlette's and FastAPI's ``TestClient``, which runs the app in an event loop of its
    own (its ``portal``) that the test's loop cannot share connections with::

        with TestClient(app) as client, isolated_in(client.portal, db):
            client.post("/orders", json={...})

    Requests made through ``client`` inside the block are isolated; the engines are disposed
    at the end, inside the portal's loop, because their pooled connections belong to it.
    Use ``TestClient`` as a context manager: without it, each request runs in a new loop.

    It composes with an ``isolated()`` block (or the ``sqla_isolation`` fixture) of the
    test's own event loop: each loop has its own connection, and sessions are bound to the
    one of the loop they are made in. Writes made through the client are therefore not
    visible to queries the test runs in its own loop; read them through the client.

    Args:
        portal: the ``TestClient``'s portal (``client.portal``), whose loop runs the app.
        *databases: as for ``isolated()``.
        mode: as for ``isolated()``.
        is_test_database: as for ``isolated()``.
        lock_timeout: as for ``isolated()``.

    Raises:
        SqlaContextError: the same errors as ``isolated()``, raised in the calling thread.
    """

    @contextlib.asynccontextmanager
    async def isolate_then_dispose() -> AsyncIterator[None]:
        try:
            async with isolated(
                *databases,
                mode=mode,
                is_test_database=is_test_database,
                lock_timeout=lock_timeout,
            ):
                yield
        finally:
            for db in databases:
                await db.dispose()

    with portal.wrap_async_context_manager(isolate_then_dispose()):
        yield


class CapturedCallbacks:
    """The ``on_commit()`` callbacks held back by ``captured_on_commit()``, in order.

    ``callbacks`` lists them in the order they would have run (compare them, or their
    ``functools.partial`` arguments, in assertions); ``await run()`` runs them.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    @property
    def callbacks(self) -> list[CommitCallback]:
        """The captured callbacks not run yet, in the order they would have run."""
        return [callback for callback, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    async def run(self) -> None:
        """Run the captured callbacks in order (with no scope active) and forget them.

        Every callback runs even if one fails; then the first exception is raised, whatever
        ``raise_errors`` said (a test wants to see it), and the others are logged.
        """
        entries = list(self._entries)
        self._entries.clear()
        await run_callbacks(entries, raise_all=True)


@contextlib.contextmanager
def captured_on_commit() -> Iterator[CapturedCallbacks]:
    """Hold back ``on_commit()`` callbacks instead of running them, for a test to inspect.

    Inside the block, the callbacks of every scope whose work commits (in rollback mode of
    ``isolated()``: whose work is "committed" to the test's savepoints) are collected in
    the yielded ``CapturedCallbacks`` instead of being run; callbacks dropped by a
    rollback are not collected. The block itself runs nothing: call ``await
    captured.run()``. Works with or without ``isolated()``, in either mode, and for apps
    running in another thread (``TestClient``): the capture is process-wide while it is
    open. Blocks may nest; the innermost one captures.

    Example::

        with captured_on_commit() as captured:
            await client.post("/signup", json={"email": "ada@example.com"})
        [welcome] = captured.callbacks              # a functools.partial(send_welcome, ...)
        assert welcome.args == ("ada@example.com",)
        await captured.run()
    """
    captured = CapturedCallbacks()
    _captures.append(captured._entries)
    try:
        yield captured
    finally:
        for index in range(len(_captures) - 1, -1, -1):
            if _captures[index] is captured._entries:  # identity: empty lists are all equal
                del _captures[index]
                break


def worker_url(url: URL, worker: str) -> URL:
    """The URL of ``worker``'s own database, made from ``url``: ``<name>_<worker>`` on a server,
    a sibling file ``<stem>_<worker><suffix>`` for SQLite (an in-memory SQLite URL is returned
    as is).

    ``RunDatabases`` passes ``<worker>_<random token>`` as ``worker``, so that two runs
    on one server never pick the same name. A server name is shortened to 63 characters
    (PostgreSQL's limit) by cutting the original name, never the suffix.
    """
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return url
        path = PurePath(url.database)
        return url.set(database=str(path.with_name(f"{path.stem}_{worker}{path.suffix}")))
    suffix = f"_{worker}"
    return url.set(database=f"{(url.database or '')[: 63 - len(suffix)]}{suffix}")


class RunDatabases:
    """The databases of a whole test run: per-worker copies and the schema.

    ``setup()`` (or ``async with``) checks every database with ``is_test_database``; with
    ``worker`` set (pytest-xdist's ``gw0``, ``gw1``, ...) it creates a database of the run's
    own (``<name>_<worker>_<random token>``; SQLite: a new file next to the original) and
    points the Database at it with ``switch_url()``; then it creates
    those of ``metadata``'s tables that do not exist yet. ``teardown()`` drops only what
    ``setup()`` created: the tables it created (tables that existed before are kept, with
    their rows) and the databases or files it created; it points each Database back at its
    original URL and disposes the engines. Both leave no connection open, so they may run
    in different event loops.

    To run Alembic migrations instead of ``create_all``, pass no ``metadata`` and run
    ``alembic upgrade head`` against ``db.url`` after ``setup()``.

    Raises:
        UnsafeDatabaseError: from ``setup()``, a server database's name fails
            ``is_test_database``; nothing was created.
        sqlalchemy.exc.DBAPIError: ``setup()`` could not create the worker database (for
            instance, the user lacks the CREATEDB privilege).
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
        #: Unique to this run: part of every database name it creates.
        self.token = f"p{os.getpid()}{secrets.token_hex(3)}"
        self._original: dict[Database, URL] = {}
        self._created: list[tuple[URL, URL]] = []  # (admin url, worker url) created by us
        self._tables: dict[Database, list[Table]] = {}  # tables created by us, per Database

    async def __aenter__(self) -> RunDatabases:
        await self.setup()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.teardown()

    async def setup(self) -> None:
        """Check, create and point at the worker databases; create the missing tables."""
        for db in self.databases:
            _check_safe(db, self.is_test_database)
        for db in self.databases:
            original = db.engine.url
            self._original[db] = original
            if self.worker:
                target = worker_url(original, f"{self.worker}_{self.token}")
                if target != original and all(t != target for _, t in self._created):
                    await _create_database(original, target)
                    self._created.append((original, target))
                await db.switch_url(target)
            if self.metadata is not None:
                async with db.engine.begin() as conn:
                    created = await conn.run_sync(_create_missing, self.metadata)
                self._tables[db] = created
            await db.dispose()

    async def teardown(self) -> None:
        """Drop what setup() created (tables, worker databases); restore the URLs; dispose."""
        try:
            for db in self.databases:
                tables = self._tables.get(db)
                if tables and self.metadata is not None:
                    async with db.engine.begin() as conn:
                        await conn.run_sync(self.metadata.drop_all, tables=tables)
                await db.dispose()
        finally:
            for db, original in self._original.items():
                await db.switch_url(original)
                await db.dispose()
            for admin, target in self._created:
                await _drop_database(admin, target)
            self._original.clear()
            self._created.clear()
            self._tables.clear()


def _create_missing(conn: Connection, metadata: MetaData) -> list[Table]:
    inspector = inspect(conn)
    missing = [
        table
        for table in metadata.sorted_tables
        if not inspector.has_table(table.name, schema=table.schema)
    ]
    metadata.create_all(conn, tables=missing, checkfirst=False)
    return missing


async def _create_database(admin_url: URL, target: URL) -> None:
    if target.get_backend_name() == "sqlite":
        exists: bool = bool(target.database) and await asyncio.to_thread(
            Path(target.database or "").exists
        )
        if exists:
            raise FileExistsError(f"{target.database} exists; it is not this run's to use")
        return  # SQLite creates the file on first connect
    engine = create_async_engine(admin_url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            # No IF NOT EXISTS: a database of that name is not ours, and an error says so.
            quoted = conn.dialect.identifier_preparer.quote(str(target.database))
            await conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    finally:
        await engine.dispose()


async def _drop_database(admin_url: URL, target: URL) -> None:
    """Drop a database (or file) this run created; its name carries the run's token."""
    if target.get_backend_name() == "sqlite":
        if target.database:
            await asyncio.to_thread(Path(target.database).unlink, missing_ok=True)
        return
    engine = create_async_engine(admin_url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            quoted = conn.dialect.identifier_preparer.quote(str(target.database))
            if conn.dialect.name == "postgresql":
                # FORCE ends connections this run left open: the database is the run's own.
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            else:
                # MariaDB/MySQL wait for every open transaction on the database's tables;
                # the only ones are this run's leftovers.
                users = text("SELECT id FROM information_schema.processlist WHERE db = :n")
                for (thread,) in (await conn.execute(users, {"n": target.database})).all():
                    with contextlib.suppress(Exception):  # it may have ended meanwhile
                        await conn.exec_driver_sql(f"KILL {int(thread)}")
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
    finally:
        await engine.dispose()
