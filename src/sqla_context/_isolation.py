"""How ``sqla_context.testing.isolated()`` works: rollback layers and commit-mode cleanup.

Rollback mode
    Databases of one ``isolated()`` call that point at the same database (a "replica" set up
    on the primary's URL) share one connection and its outer transaction, so each sees the
    others' writes. ``db._bound_maker`` becomes an ``_IsolatedSessionmaker``, which
    binds each new session to the isolation connection *of the event loop it is made in*:
    the pytest fixture (test loop) and ``isolated_in()`` (a ``TestClient``'s loop) each
    hold a layer of their own and compose.

Lock waits
    Everything the test writes stays uncommitted on the isolation connection, so another
    connection that waits for those rows waits for the end of the test, which never comes.
    While a block is active, each transaction begun on the databases' engines gets a lock
    timeout, and a lock-timeout error is replaced by ``IsolationError``, which says why.

Leaks
    Pool checkouts during the block are counted (works with every pool class), and sessions
    made by the isolation's sessionmaker that are still in a transaction at the end are leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import URL, Connection, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import JoinTransactionMode
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState, SingletonThreadPool, StaticPool

from .exceptions import LeakError, SqlaContextError

if TYPE_CHECKING:
    from ._database import Database

IsolationMode = Literal["rollback", "commit"]
"""The modes of ``isolated()``: ``"rollback"`` (nothing outlives the block) or ``"commit"``."""


class IsolationError(SqlaContextError, RuntimeError):
    """A test's isolation cannot do what the test asks; the message says what to change.

    Raised when a database is isolated twice in one event loop, when a session is made in an
    event loop where the database is not isolated while it is in another, and when a
    connection waited longer than ``lock_timeout`` for a lock (most likely held by the
    test's own uncommitted isolation transaction). Subclass of ``RuntimeError``.
    """


IsolationError.__module__ = "sqla_context.testing"

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}

# Which loops isolate which Database, and how; read from the test thread and portal threads.
_registry_lock = threading.Lock()
_active: weakref.WeakKeyDictionary[Database, dict[asyncio.AbstractEventLoop, IsolationMode]] = (
    weakref.WeakKeyDictionary()
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@contextlib.contextmanager
def registered(databases: tuple[Database, ...], mode: IsolationMode) -> Iterator[None]:
    """Mark ``databases`` isolated in this loop; refuse a second isolation in the same loop."""
    loop = asyncio.get_running_loop()
    with _registry_lock:
        for db in databases:
            if loop in _active.get(db, {}):
                raise IsolationError(
                    f"{db!r} is already isolated in this event loop, by an enclosing "
                    "isolated() block or the sqla_isolation fixture. Remove the inner "
                    "isolated(...) call (the enclosing one already isolates this code); for "
                    "an app served by a TestClient use isolated_in(client.portal, ...), which "
                    "composes with an enclosing isolation because it runs in the client's "
                    "own event loop."
                )
        for db in databases:
            _active.setdefault(db, {})[loop] = mode
    try:
        yield
    finally:
        with _registry_lock:
            for db in databases:
                loops = _active.get(db, {})
                loops.pop(loop, None)
                if not loops:
                    _active.pop(db, None)


def isolated_elsewhere(db: Database) -> bool:
    """Whether ``db`` is isolated in an event loop other than the running one."""
    loop = _running_loop()
    with _registry_lock:
        return any(other is not loop for other in _active.get(db, {}))


def same_database_key(url: URL) -> tuple[object, ...] | None:
    """What identifies the database ``url`` points at; ``None`` if nothing can share it."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        name = url.database or ""
        if name in ("", ":memory:") or name.startswith("file:"):
            return None  # each engine has a memory database of its own
        return ("sqlite", str(Path(name).resolve()))
    backend = "mysql" if backend == "mariadb" else backend
    return (backend, url.host or "", url.port or _DEFAULT_PORTS.get(backend), url.database)


# -- the sessionmaker a Database uses while isolated ------------------------------------------


class _Layer:
    """One database's sessions bound to one loop's isolation connection."""

    def __init__(self, maker: async_sessionmaker[AsyncSession]) -> None:
        self.maker = maker
        self.sessions: weakref.WeakSet[AsyncSession] = weakref.WeakSet()


class _IsolatedSessionmaker(async_sessionmaker[AsyncSession]):
    """``db._bound_maker`` while a rollback block is active: one layer per event loop."""

    def __init__(self, db: Database) -> None:
        super().__init__(**db.session_options)
        self.db = db
        self.layers: dict[asyncio.AbstractEventLoop, _Layer] = {}

    def __call__(self, **local_kw: Any) -> AsyncSession:
        loop = _running_loop()
        layer = self.layers.get(loop) if loop is not None else None
        if layer is None and loop is None and len(self.layers) == 1:
            layer = next(iter(self.layers.values()))  # made outside any loop: the only one
        if layer is not None:
            session = layer.maker(**local_kw)
            layer.sessions.add(session)
            return session
        with _registry_lock:
            committing = loop is not None and _active.get(self.db, {}).get(loop) == "commit"
        if committing:  # commit mode in this loop, rollback mode in another: the real engine
            plain: async_sessionmaker[AsyncSession] = async_sessionmaker(
                self.db.engine, **self.db.session_options
            )
            return plain(**local_kw)
        raise IsolationError(
            f"{self.db!r} is isolated (rollback mode) in another event loop than the one "
            "this session is made in, and a connection cannot be used across event loops. "
            "An app served by Starlette's or FastAPI's TestClient runs in a loop of its own: "
            "isolate it there with `isolated_in(client.portal, *databases)` (it composes "
            "with the sqla_isolation fixture), or drive the app from the test's loop with "
            "httpx.ASGITransport."
        )


class _JoiningSession(Session):
    """A session on a connection shared by several Databases (primary and replica).

    A scope commits its sessions in the order they were opened, but savepoints nest: the
    first session's RELEASE would also release the second one's. So a session that begins
    while another holds a savepoint on the connection joins that savepoint (its commit
    leaves it to the owner, as SQLAlchemy's ``"rollback_only"`` does) instead of nesting.
    """

    @property
    def join_transaction_mode(self) -> JoinTransactionMode:
        bind = self.bind
        if isinstance(bind, Connection) and bind.in_nested_transaction():
            return "rollback_only"
        return "create_savepoint"

    @join_transaction_mode.setter
    def join_transaction_mode(self, _value: JoinTransactionMode) -> None:
        pass  # decided per transaction above


def _install(db: Database, loop: asyncio.AbstractEventLoop, layer: _Layer) -> None:
    maker = db._bound_maker
    if not isinstance(maker, _IsolatedSessionmaker):
        maker = _IsolatedSessionmaker(db)
        db._bound_maker = maker
    maker.layers[loop] = layer


def _uninstall(db: Database, loop: asyncio.AbstractEventLoop) -> None:
    maker = db._bound_maker
    if isinstance(maker, _IsolatedSessionmaker):
        maker.layers.pop(loop, None)
        if not maker.layers:
            db._bound_maker = None


# -- lock timeouts ---------------------------------------------------------------------------


def _is_lock_timeout(dialect: str, error: BaseException | None) -> bool:
    if error is None:
        return False
    if dialect == "postgresql":
        return getattr(error, "sqlstate", None) == "55P03" or getattr(error, "pgcode", None) == (
            "55P03"
        )
    if dialect in ("mysql", "mariadb"):
        return bool(error.args) and error.args[0] in (1205, "1205")
    if dialect == "sqlite":
        return "database is locked" in str(error) or "database table is locked" in str(error)
    return False


def lock_wait_message(db: Database, lock_timeout: float | None) -> str:
    waited = f"more than {lock_timeout:g} s" if lock_timeout else "too long"
    return (
        f"{db!r}: a connection waited {waited} for a lock, most likely on rows this test "
        "wrote in rollback mode. There, everything the test writes stays uncommitted on one "
        "connection until the test ends, so a connection that bypasses it (db.engine.connect()"
        " or .begin(), another engine, a Database on the same database that is not isolated "
        "with it) waits for the end of the test, which never comes. Fix: isolate every "
        "Database of this database in one isolated() call / list it in sqla_databases (they "
        "then share the connection), use the Database's sessions instead of db.engine, or "
        "run this test in commit mode (@pytest.mark.sqla_commit or mode='commit'). If the "
        "lock belongs to another program and will be released, raise lock_timeout="
    )


@contextlib.contextmanager
def lock_timeouts(
    engines: dict[AsyncEngine, Database], lock_timeout: float | None
) -> Iterator[None]:
    """While active: a lock timeout on each transaction begun on ``engines``, explained."""
    listeners: list[tuple[Any, str, Callable[..., Any]]] = []
    for engine, db in engines.items():
        sync = engine.sync_engine
        name = sync.dialect.name

        def explain(ctx: ExceptionContext, db: Database = db, name: str = name) -> None:
            if _is_lock_timeout(name, ctx.original_exception):
                raise IsolationError(lock_wait_message(db, lock_timeout)) from (
                    ctx.sqlalchemy_exception or ctx.original_exception
                )

        listeners.append((sync, "handle_error", explain))
        if lock_timeout is not None and name == "postgresql":
            # SET LOCAL ends with the transaction: nothing to restore.
            sql = f"SET LOCAL lock_timeout = '{max(1, int(lock_timeout * 1000))}ms'"
            listeners.append((sync, "begin", _executor(sql)))
        elif lock_timeout is not None and name in ("mysql", "mariadb"):
            # MariaDB has no transaction-local setting: set it for the session and restore
            # the server's default when the connection goes back to the pool.
            sql = f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_timeout))}"
            listeners.append((sync, "begin", _executor(sql, mark=True)))
            listeners.append((sync.pool, "reset", _restorer()))
        # SQLite: the driver's busy timeout (5 s by default) already ends the wait.
    for target, identifier, fn in listeners:
        event.listen(target, identifier, fn)
    try:
        yield
    finally:
        for target, identifier, fn in listeners:
            event.remove(target, identifier, fn)


_MARK = "sqla_context.testing.lock_timeout"


def _executor(sql: str, *, mark: bool = False) -> Callable[[Connection], None]:
    def execute(conn: Connection) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return
        fairy = conn.connection
        cursor = fairy.cursor()
        try:
            cursor.execute(sql)
        finally:
            cursor.close()
        if mark:
            fairy.info[_MARK] = True

    return execute


def _restorer() -> Callable[[Any, ConnectionPoolEntry, PoolResetState], None]:
    # A new function per block: an identical listener would be registered only once.
    def restore(dbapi_connection: Any, record: ConnectionPoolEntry, state: PoolResetState) -> None:
        if record.info.pop(_MARK, None) and state.asyncio_safe and not state.terminate_only:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SET SESSION innodb_lock_wait_timeout = DEFAULT")
            finally:
                cursor.close()

    return restore


# -- leaks -----------------------------------------------------------------------------------


class CheckoutWatch:
    """Connections checked out of an engine's pool while the watch is on, not yet returned."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.pool = engine.sync_engine.pool
        self.out: set[ConnectionPoolEntry] = set()

    def _checkout(self, _dbapi: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        self.out.add(record)

    def _checkin(self, _dbapi: Any, record: ConnectionPoolEntry) -> None:
        self.out.discard(record)

    @contextlib.contextmanager
    def watching(self) -> Iterator[CheckoutWatch]:
        event.listen(self.pool, "checkout", self._checkout)
        event.listen(self.pool, "checkin", self._checkin)
        try:
            yield self
        finally:
            event.remove(self.pool, "checkout", self._checkout)
            event.remove(self.pool, "checkin", self._checkin)


def leak_error(db: Database, connections: int, sessions: int, extra: str = "") -> LeakError:
    what = []
    if connections:
        what.append(
            f"{connections} connection(s) still checked out (a db.engine.connect() or a "
            "session of another sessionmaker never closed)"
        )
    if sessions:
        what.append(
            f"{sessions} session(s) from db.sessionmaker() still in a transaction (opened "
            "and used, never committed or closed; in production each would hold a "
            "connection)"
        )
    return LeakError(
        f"{db!r}: {' and '.join(what)} when the test ended. Close them: `async with "
        f"db.sessionmaker() as session:` / `async with db.engine.connect() as conn:`.{extra}"
    )


# -- rollback mode ---------------------------------------------------------------------------


def _groups(databases: tuple[Database, ...]) -> list[list[Database]]:
    groups: dict[object, list[Database]] = {}
    for db in databases:
        key = same_database_key(db.engine.url)
        groups.setdefault(key if key is not None else ("own", id(db)), []).append(db)
    return list(groups.values())


@contextlib.asynccontextmanager
async def rolled_back(
    databases: tuple[Database, ...], lock_timeout: float | None
) -> AsyncIterator[None]:
    """Rollback mode for ``databases``; those on the same database share one connection."""
    async with contextlib.AsyncExitStack() as stack:
        for group in _groups(databases):
            await stack.enter_async_context(_shared_connection(group, lock_timeout))
        yield


def _shares_one_connection(engine: AsyncEngine) -> bool:
    # StaticPool (in-memory SQLite) hands out one connection for the engine's life:
    # closing it would lose the database.
    return isinstance(engine.sync_engine.pool, (StaticPool, SingletonThreadPool))


@contextlib.asynccontextmanager
async def _shared_connection(
    group: list[Database], lock_timeout: float | None
) -> AsyncIterator[None]:
    owner, loop = group[0], asyncio.get_running_loop()
    engine_of = {db: db.engine for db in group}
    engines = {engine_of[db]: db for db in reversed(group)}  # one entry per engine
    with lock_timeouts(engines, lock_timeout):
        conn = await owner.engine.connect()
        sqlite = conn.dialect.name == "sqlite"
        try:
            await conn.begin()
            if sqlite:
                # The sqlite3 driver begins transactions only before writes, so a SAVEPOINT
                # would start (and its RELEASE commit) a transaction of its own: take control.
                await conn.run_sync(_sqlite_isolation_level, None)
                await conn.exec_driver_sql("BEGIN")
            join = {"sync_session_class": _JoiningSession} if len(group) > 1 else {}
            layers = {
                db: _Layer(
                    async_sessionmaker(
                        bind=conn,
                        join_transaction_mode="create_savepoint",
                        **{**db.session_options, **join},
                    )
                )
                for db in group
            }
            watches = {engine: CheckoutWatch(engine) for engine in engines}
            with contextlib.ExitStack() as watching:
                for watch in watches.values():
                    watching.enter_context(watch.watching())
                for db, layer in layers.items():
                    _install(db, loop, layer)
                try:
                    yield
                finally:
                    for db in group:
                        _uninstall(db, loop)
            for db, layer in layers.items():  # only when the block succeeded
                sessions = sum(1 for session in list(layer.sessions) if session.in_transaction())
                engine = engine_of[db]
                connections = len(watches[engine].out) if engines[engine] is db else 0
                if connections or sessions:
                    raise leak_error(db, connections, sessions)
        finally:
            await _end(conn, sqlite)


async def _end(conn: AsyncConnection, sqlite: bool) -> None:
    try:
        await conn.rollback()
    finally:
        if _shares_one_connection(conn.engine):
            if sqlite:
                await conn.run_sync(_sqlite_isolation_level, "")  # the driver's default
            await conn.close()
        else:
            # Closed rather than pooled: it may belong to another event loop than the next
            # user of the pool (TestClient), and it carries the lock timeout / driver mode.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            await conn.close()


def _sqlite_isolation_level(conn: Connection, level: str | None) -> None:
    conn.connection.dbapi_connection.isolation_level = level  # type: ignore[union-attr]
