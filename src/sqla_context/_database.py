"""Database: a lazily created engine, its session factory, and the scope's session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from threading import get_ident
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from . import _scope
from ._aiosqlite import close_interrupted_cursors, track_statements
from ._replicas import make_read_only, read_session, track_writes
from ._scope import _current, _Unit, check_hook, commit_session
from ._transaction import TransactionBlock
from .exceptions import (
    CommitError,
    ConfigurationError,
    EventLoopError,
    NoScopeError,
    ReadOnlyError,
    ScopeClosedError,
)

if TYPE_CHECKING:
    from ._typing import (
        BeforeSessionHook,
        EngineFactory,
        ExistingMode,
        ReadFromPrimaryHook,
        SessionHook,
    )

__all__ = ["Database"]

_log = logging.getLogger("sqla_context")

#: The extra that installs each async driver SQLAlchemy knows, for error messages.
_EXTRAS = {"asyncpg": "postgres", "psycopg": "psycopg", "aiosqlite": "sqlite", "asyncmy": "mysql"}


def _engine_from_url(url: URL, options: Mapping[str, Any]) -> AsyncEngine:
    """``create_async_engine(url, **options)``, with errors that say what to change.

    No I/O: an engine connects on first use. Done when the Database is created, so that a
    wrong driver, a missing driver package or a misspelt option fails at start-up.
    """
    try:
        return create_async_engine(url, **options)
    except NoSuchModuleError:
        raise ConfigurationError(
            f"SQLAlchemy has no dialect or driver {url.drivername!r}. Use an async driver, "
            "e.g. 'postgresql+asyncpg://', 'postgresql+psycopg://', 'sqlite+aiosqlite://', "
            "'mysql+asyncmy://'."
        ) from None
    except ImportError as exc:
        module = (exc.name or "").partition(".")[0] or str(exc)
        extra = _EXTRAS.get(module)
        fix = f"pip install 'sqla-context[{extra}]'" if extra else f"pip install {module}"
        raise ConfigurationError(
            f"the driver {module!r} for {url.drivername!r} URLs is not installed: {fix}"
        ) from exc
    except InvalidRequestError as exc:  # a sync driver, e.g. postgresql+psycopg2://
        raise ConfigurationError(
            f"{url.drivername!r} is not an async driver ({exc}); use e.g. "
            "'postgresql+asyncpg://', 'sqlite+aiosqlite://' or 'mysql+asyncmy://'"
        ) from None
    except (TypeError, ArgumentError) as exc:
        raise ConfigurationError(f"invalid engine_options: {exc}") from None


def _let_sqlalchemy_begin(engine: AsyncEngine) -> None:
    """Make SQLAlchemy, not the sqlite3 driver, decide where SQLite transactions begin."""

    @event.listens_for(engine.sync_engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver sends no BEGIN/COMMIT itself

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


class Database:
    """One database: its engine (created on first need) and the scope's session for it.

    Creating a ``Database`` does no I/O; create it at import time, next to your models. It
    builds the engine from ``url`` at once (an engine connects only on first use), so that
    an unknown driver, a driver package that is not installed or a misspelt
    ``engine_options`` key fails here, not at the first request. The engine and its pool
    live until ``dispose()``; an ``engine_factory`` is called the first time the engine
    is needed, exactly once even when many tasks or threads ask at the same moment.

    A Database serves one event loop at a time. Used from a new loop after the old one
    has stopped (two ``asyncio.run()`` calls), it starts a fresh connection pool.

    Args:
        url: the database URL, as a string or ``sqlalchemy.URL`` (parsed at once, so a
            malformed URL fails here). Exactly one of ``url`` and ``engine_factory``.
        engine_factory: a zero-argument callable returning an ``AsyncEngine``, for engines
            that need more than a URL and options.
        engine_options: keyword arguments for ``create_async_engine`` (``pool_size``,
            ``echo``, ...). With ``engine_factory`` they are used only by ``switch_url()``.
        session_options: keyword arguments for ``async_sessionmaker``. The default is
            ``expire_on_commit=False``: after a commit, SQLAlchemy would otherwise expire every
            loaded object, and the next attribute access would need an implicit refresh,
            which async code cannot do (``MissingGreenlet`` inside the scope,
            ``DetachedInstanceError`` after it has closed the session). Objects returned by a
            handler after an early commit stay readable. Pass ``expire_on_commit=True`` to
            get SQLAlchemy's default back.
        name: a label for logs and errors; defaults to the URL with the password hidden.
        before_session: ``async def hook(db)`` awaited before each scope session (and each
            ``new_session()``) is created. It may call ``switch_url()``, e.g. after asking
            a discovery service which host is the primary.
        before_commit: called with the session before each commit this library performs
            for this database (scope exit, ``commit()``, ``close_session()``,
            ``transaction()``). Sync or async. An exception aborts the commit.
        after_commit: called with the session after each such commit.
        sqlite_begin: SQLite only, for engines built from ``url``. Python's sqlite3 driver
            (and aiosqlite on top of it) sends ``BEGIN`` only before the first write, so reads
            and a SAVEPOINT sent before any write run outside a transaction, and the
            SAVEPOINT's RELEASE commits. ``True`` switches the driver's handling off and lets
            SQLAlchemy emit ``BEGIN`` (SQLAlchemy's documented recipe): transactions and
            savepoints then behave as on PostgreSQL, at the price of SQLite's real locking
            (a scope that has read holds a shared lock until it ends, which blocks other
            connections' commits unless the database is in WAL mode). ``False`` (default)
            keeps the driver's behaviour.
        read_only: every connection refuses writes at the server (PostgreSQL: ``SET SESSION
            CHARACTERISTICS AS TRANSACTION READ ONLY``; MySQL/MariaDB: ``SET SESSION
            TRANSACTION READ ONLY``; SQLite: ``PRAGMA query_only``, sent once per new
            connection), so a write (also an autoflush) raises the driver's error. Its
            sessions never commit: scope exit, ``close_session()`` and transaction blocks
            end them with a rollback, without the commit hooks; ``commit()`` and
            ``close_session(commit=True)`` raise ``ReadOnlyError``.
            For replicas, and for code that must not write. See docs/replicas.md.
        replicas: read-only ``Database`` objects (``read_only=True``) that serve
            ``read_session()`` until the scope writes to this database.
        read_from_primary: ``hook(db) -> bool``, sync, called on a scope's first
            ``read_session()``; ``True`` sends that scope's reads to this (primary)
            database, e.g. for a few seconds after the user's last write. Needs ``replicas``.
        replica_retry: seconds during which a replica that could not be reached is skipped
            (its reads go to the primary) before it is tried again. Default 5.
        hold_warning: seconds; when a connection of this database stays checked out longer
            (from its checkout to its return to the pool), log a WARNING on logger
            ``sqla_context.held`` naming the unit (route, task, function), how long the
            connection was held, how much of that no statement was running, and where the
            first statement was sent from. ``None`` (default): off. Cheap enough for staging:
            a few clock reads per statement. See the "Observability" page of the docs.

    Raises:
        ConfigurationError: neither or both of ``url`` and ``engine_factory``; a ``url``
            that cannot be parsed, names an unknown or sync driver, or a driver that is not
            installed (the message names the extra to install); an ``engine_options`` or
            ``session_options`` key that SQLAlchemy does not accept; a hook that is not
            callable; ``read_only=True`` for a dialect other than PostgreSQL, MySQL, MariaDB
            and SQLite; a replica that is not a read-only ``Database``, or has replicas
            itself; ``read_from_primary`` without ``replicas``; ``replica_retry <= 0``; a
            ``hold_warning`` that is not a positive number.
    """

    __slots__ = (
        "__weakref__",
        "_bound_maker",
        "_engine",
        "_factory",
        "_hold_warning",
        "_lock",
        "_loop",
        "_name",
        "_read_only",
        "_replica_down",
        "_replicas",
        "_retired",
        "_scope_options",
        "_sessionmaker",
        "_sqlite_begin",
        "_url",
        "_users",
        "after_commit",
        "before_commit",
        "before_session",
        "engine_options",
        "read_from_primary",
        "replica_retry",
        "session_options",
    )

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine_factory: EngineFactory | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        before_session: BeforeSessionHook | None = None,
        before_commit: SessionHook | None = None,
        after_commit: SessionHook | None = None,
        sqlite_begin: bool = False,
        read_only: bool = False,
        replicas: Iterable[Database] = (),
        read_from_primary: ReadFromPrimaryHook | None = None,
        replica_retry: float = 5.0,
        hold_warning: float | None = None,
    ) -> None:
        if (url is None) == (engine_factory is None):
            raise ConfigurationError("Database() needs exactly one of `url` and `engine_factory`")
        if engine_factory is not None and not callable(engine_factory):
            raise ConfigurationError(f"engine_factory must be callable, got {engine_factory!r}")
        for option, hook in (
            ("before_session", before_session),
            ("before_commit", before_commit),
            ("after_commit", after_commit),
            ("read_from_primary", read_from_primary),
        ):
            check_hook(option, hook)
        self._read_only = bool(read_only)
        self._replicas = self._check_replicas(replicas)
        if read_from_primary is not None and not self._replicas:
            raise ConfigurationError(
                "read_from_primary is called by read_session() to choose between the primary "
                "and its replicas: pass replicas=[...] too"
            )
        # type(): a string or a bool is a mistake, though float() would take it.
        retry = float(replica_retry) if type(replica_retry) in (int, float) else 0.0
        if not retry > 0:  # also NaN
            raise ConfigurationError(
                f"replica_retry must be a number of seconds > 0, got {replica_retry!r}"
            )
        self.read_from_primary = read_from_primary
        self.replica_retry = retry
        # Replicas that could not be reached -> when to try them again (time.monotonic()).
        self._replica_down: dict[Database, float] = {}
        try:
            self._url: URL | None = make_url(url) if url is not None else None
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(f"cannot parse the database URL: {exc}") from None
        self._factory = engine_factory
        self.engine_options: dict[str, Any] = dict(engine_options or {})
        options = {"expire_on_commit": False, **(session_options or {})}
        if "bind" in options:
            raise ConfigurationError(
                "session_options must not contain 'bind': the Database binds its engine"
            )
        try:  # fail here, not at the first request, on a misspelt option (no I/O involved)
            async_sessionmaker(**options)()
        except TypeError as exc:
            raise ConfigurationError(f"invalid session_options: {exc}") from None
        self.session_options: dict[str, Any] = options
        # Sessions this library ends are closed for good: one kept past its scope's end
        # raises when used again instead of silently opening a transaction nobody ends.
        self._scope_options = {} if "close_resets_only" in options else {"close_resets_only": False}
        self._name = name
        self.before_session = before_session
        self.before_commit = before_commit
        self.after_commit = after_commit
        self._sqlite_begin = sqlite_begin
        checked: object = hold_warning  # annotations are no guarantee: check the value
        if checked is not None and (
            isinstance(checked, bool) or not isinstance(checked, (int, float)) or not checked > 0
        ):
            raise ConfigurationError(
                f"hold_warning must be a number of seconds > 0, or None (off); got {hold_warning!r}"
            )
        self._hold_warning = hold_warning
        self._engine: AsyncEngine | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        # Set by sqla_context.testing: sessions bound to a test's outer transaction.
        self._bound_maker: async_sessionmaker[AsyncSession] | None = None
        # Open sessions per engine, so that an engine replaced by switch_url() is disposed
        # only once its last session has closed.
        self._users: dict[AsyncEngine, int] = {}
        self._retired: set[AsyncEngine] = set()
        self._lock = threading.Lock()
        # The event loop the pool's connections belong to (set on first use).
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._url is not None:
            self._install(_engine_from_url(self._url, self.engine_options))

    def _check_replicas(self, replicas: Iterable[Database]) -> tuple[Database, ...]:
        if isinstance(replicas, (Database, str, URL)):
            raise ConfigurationError(
                "replicas must be a list of Database objects: replicas=[Database(url, "
                "read_only=True)]"
            )
        checked: list[Database] = []
        for replica in replicas:
            if not isinstance(replica, Database):
                raise ConfigurationError(
                    f"each replica must be a Database(url, read_only=True), got {replica!r}"
                )
            if not replica.read_only:
                raise ConfigurationError(
                    f"replica {replica.name!r} is not read-only: create it with "
                    "Database(url, read_only=True), so that its sessions never commit and a "
                    "write through it fails instead of reaching the replica"
                )
            if replica.replicas:
                raise ConfigurationError(f"replica {replica.name!r} has replicas of its own")
            if replica in checked:
                raise ConfigurationError(f"replica {replica.name!r} is listed twice")
            checked.append(replica)
        return tuple(checked)

    # -- identity --------------------------------------------------------------------------

    @property
    def url(self) -> URL | None:
        """The URL new sessions connect to; ``None`` for an engine_factory not yet called."""
        if self._url is None and self._engine is not None:
            return self._engine.url
        return self._url

    @property
    def name(self) -> str:
        """The label used in logs and errors: ``name=`` or the URL with the password hidden."""
        if self._name is not None:
            return self._name
        url = self.url
        if url is not None:
            return url.render_as_string(hide_password=True)
        return f"<engine_factory {getattr(self._factory, '__qualname__', self._factory)!r}>"

    @property
    def hold_warning(self) -> float | None:
        """Seconds a connection may stay checked out before a WARNING; ``None``: off."""
        return self._hold_warning

    def __repr__(self) -> str:
        return f"Database({self.name!r})"

    @property
    def read_only(self) -> bool:
        """True for ``Database(..., read_only=True)``: its sessions never commit."""
        return self._read_only

    @property
    def replicas(self) -> tuple[Database, ...]:
        """The read-only Databases ``read_session()`` may choose from (``replicas=``)."""
        return self._replicas

    # -- engine lifecycle ------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The current ``AsyncEngine``, created on first access (also after ``dispose()``).

        Raises:
            EventLoopError: the engine's connections belong to an event loop that is still
                running in another thread.
        """
        with self._lock:  # threads too: an app and its TestClient may race here
            return self._current_locked()[0]

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """An ``async_sessionmaker`` bound to the current engine, for plain-SQLAlchemy use.

        Sessions made from it are yours to close; they are not part of any scope.
        """
        with self._lock:
            return self._bound_maker or self._current_locked()[1]

    def _current_locked(self) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
        """The engine and its session factory, made if needed; call with ``_lock`` held."""
        self._check_loop_locked()
        if self._engine is None:
            if self._url is not None:
                self._install(_engine_from_url(self._url, self.engine_options))
            else:
                assert self._factory is not None
                engine = self._factory()
                if not isinstance(engine, AsyncEngine):
                    raise ConfigurationError(
                        f"engine_factory must return an AsyncEngine, got {type(engine).__name__}"
                    )
                self._install(engine)
        assert self._engine is not None
        assert self._sessionmaker is not None
        return self._engine, self._sessionmaker

    def _install(self, engine: AsyncEngine) -> None:
        if self._sqlite_begin and self._factory is None and engine.dialect.name == "sqlite":
            _let_sqlalchemy_begin(engine)
        if self._read_only:
            make_read_only(engine, self.name)
        if self._replicas:
            track_writes(self, engine)
        close_interrupted_cursors(engine)
        if self._hold_warning is not None or _scope._observing:
            from ._observe import telemetry, track

            if self._hold_warning is not None or (telemetry and telemetry.watches(self)):
                track(self, engine)
        track_statements(engine)
        self._sessionmaker = async_sessionmaker(engine, **self.session_options)
        self._engine = engine

    def _check_loop_locked(self) -> None:
        """Follow the running event loop: a pool serves the loop its connections belong to."""
        loop = asyncio._get_running_loop()
        if loop is None or loop is self._loop or self._bound_maker is not None:
            # Isolated by sqla_context.testing in rollback mode: each loop's sessions use that
            # loop's own connection, never a pooled one, so several loops may share it.
            return
        old, self._loop = self._loop, loop
        if old is None:
            return
        if old.is_running():
            self._loop = old
            raise EventLoopError(self.name)
        # The old loop has stopped: its connections cannot be closed from this one. Start
        # fresh pools (same engines, listeners and options); the server ends the old
        # connections' sessions when their sockets are collected.
        for engine in (self._engine, *self._retired):
            if engine is not None:
                engine.sync_engine.dispose(close=False)
        self._users.clear()
        self._retired.clear()

    async def switch_url(self, url: str | URL) -> None:
        """Point new sessions at ``url`` (primary failover, replica rotation).

        Sessions already open finish on the old engine, which is disposed once the last of
        them has closed. The new engine is created at once with ``engine_options`` (no
        I/O). Switching to the URL already in use does nothing (an ``engine_factory``
        engine is kept, with its listeners and pool settings), so a ``before_session``
        hook may call this on every session.

        Raises:
            ConfigurationError: ``url`` cannot be parsed, or names an unusable driver.
        """
        try:
            new_url = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(f"cannot parse the database URL: {exc}") from None
        with self._lock:
            current = self._url
            if current is None:  # engine_factory: its engine's URL is the one in use
                current = self._current_locked()[0].url
            if new_url == current:
                return
            engine = _engine_from_url(new_url, self.engine_options)
            old = self._engine
            self._factory, self._url = None, new_url
            self._install(engine)
            dispose_now = old is not None and old not in self._users
            if old is not None and not dispose_now:
                self._retired.add(old)
        if dispose_now:
            assert old is not None
            await old.dispose()

    async def dispose(self) -> None:
        """Dispose the engine and close its pooled connections; call it at shutdown.

        Safe to call twice. Using the Database afterwards creates a fresh engine. An engine
        that scope sessions still use (requests still running) is disposed when the last
        of them closes; connections of sessions you made yourself from
        ``sessionmaker`` and never closed are not closed by it.
        """
        with self._lock:
            engines = [e for e in (self._engine, *self._retired) if e is not None]
            self._engine = self._sessionmaker = None
            self._retired.clear()
            now = [e for e in engines if e not in self._users]
            self._retired.update(e for e in engines if e in self._users)
        failure: Exception | None = None
        for engine in now:  # one failing dispose() must not keep the others open
            try:
                await engine.dispose()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def __aenter__(self) -> Database:
        """``async with db:`` returns ``db`` and disposes its engine when the block ends.

        Handy in an application's lifespan or a script's ``main()``.
        """
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.dispose()

    def _open_session(self) -> AsyncSession:
        # Under the lock from reading the factory to counting the engine's users: a
        # switch_url() or dispose() in another thread must not dispose the engine of a
        # session being opened.
        with self._lock:
            maker = self._bound_maker or self._current_locked()[1]
            session = maker(**self._scope_options)
            engine = session.bind
            if isinstance(engine, AsyncEngine):  # not a test's connection (sqla_context.testing)
                self._users[engine] = self._users.get(engine, 0) + 1
        return session

    async def _release(self, session: AsyncSession) -> None:
        engine = session.bind
        if not isinstance(engine, AsyncEngine):
            return
        with self._lock:
            count = self._users.get(engine, 0) - 1
            if count > 0:
                self._users[engine] = count
                return
            self._users.pop(engine, None)
            if engine not in self._retired:
                return
            self._retired.discard(engine)
        try:
            await engine.dispose()
        except Exception:  # the caller is closing other sessions: never stop it
            _log.warning("disposing a retired engine of %r failed", self, exc_info=True)

    # -- the scope's session ---------------------------------------------------------------

    async def session(self) -> AsyncSession:
        """Return the current scope's session for this database, creating it on first call.

        Every call in the same scope, at any depth and from any task created inside the
        scope, returns the same ``AsyncSession``. Creating it does no I/O: the first query
        checks out a connection and begins the transaction. When the scope already holds
        the session, this takes no lock and does no I/O.

        Warning:
            One ``AsyncSession`` must not run two queries at the same time. Do not
            ``asyncio.gather()`` coroutines that use the scope's session; give each its
            own with ``run_isolated()`` or ``new_session()``.

        Raises:
            NoScopeError: no scope is active (add the middleware or use ``scope()``).
            ScopeClosedError: the scope this code runs in has already ended.
            EventLoopError: the scope was opened in another event loop (a thread that runs
                ``asyncio.run()`` inherits the scope but not its loop).
        """
        unit = _current.get()
        if unit is None:
            raise NoScopeError(self.name)
        session = unit.sessions.get(self)
        if session is not None and unit.thread == get_ident():
            return session
        if unit.thread != get_ident():
            raise EventLoopError(self.name, scope=True)
        if unit.closed:
            raise ScopeClosedError(self.name)
        if self.before_session is None:  # no await from the check to the set: no race
            return unit.add(self, self._open_session())
        return await self._session_after_hook(unit)

    async def _session_after_hook(self, unit: _Unit) -> AsyncSession:
        # The hook awaits, so tasks asking at the same moment queue here and all get the
        # session the first one created. If the hook fails, the next caller runs it again.
        if unit.locks is None:
            unit.locks = {}
        lock = unit.locks.get(self)
        if lock is None:
            lock = unit.locks[self] = asyncio.Lock()
        async with lock:
            session = unit.sessions.get(self)
            if session is not None:
                return session
            assert self.before_session is not None
            await self.before_session(self)
            if unit.closed:
                raise ScopeClosedError(self.name)
            return unit.add(self, self._open_session())

    async def read_session(self) -> AsyncSession:
        """Return the scope's session for reading: a replica's, or the primary's after a write.

        Without ``replicas`` this is ``session()``. With them, the scope's first call
        chooses where its reads go, and later calls keep that choice:

        - the primary (``await db.session()``, the same session the scope writes with) if
          the scope has already sent a statement that may write through this database's
          engine, or if ``read_from_primary(db)`` returns ``True``;
        - otherwise a replica chosen at random among those not skipped after a failure. Its
          session (``await replica.session()``) connects at once: if that fails, a WARNING
          is logged, the replica is skipped for ``replica_retry`` seconds, and the next
          replica or the primary is used.

        Once the scope writes through this database (any statement except ``SELECT``,
        ``SHOW``, ``VALUES``, transaction control, and ``WITH`` queries without
        ``INSERT``/``UPDATE``/``DELETE``/``MERGE``, sent by the ORM, Core or ``text()``),
        later calls return the primary's session, which sees the scope's own writes. The
        replica's session stays open (objects loaded from it stay usable) until the scope ends.

        Raises:
            NoScopeError: no scope is active.
            ScopeClosedError: the scope this code runs in has already ended.
        """
        if not self._replicas:
            return await self.session()
        return await read_session(self)

    def scope_wrote(self) -> bool:
        """True if the current scope has sent a statement that may write to this database.

        Use it to carry read-your-writes past the scope, e.g. set a short-lived cookie that
        your ``read_from_primary`` hook reads in the user's next requests. Counts statements
        sent through this Database's engine from inside the scope (its session,
        ``new_session()``, ``db.engine``), also if they were rolled back later.

        Raises:
            NoScopeError: no scope is active.
            ConfigurationError: this Database has no ``replicas`` (writes are tracked only
                for a primary).
        """
        if not self._replicas:
            raise ConfigurationError(
                f"scope_wrote() tracks writes of a primary with replicas; {self.name!r} has "
                "none (pass replicas=[...])"
            )
        unit = _current.get()
        if unit is None:
            raise NoScopeError(self.name)
        return unit.wrote is not None and self in unit.wrote

    async def commit(self) -> None:
        """Commit the scope's session for this database now, running the commit hooks.

        Does nothing without a scope, without a session in it, or with nothing to commit.
        The session stays open; later queries begin a new transaction.

        Raises:
            ReadOnlyError: this Database is read-only (its sessions never commit).
            sqlalchemy.exc.SQLAlchemyError: the commit failed (the error of the driver, as
                ``session.commit()`` raises it).
        """
        if self._read_only:
            raise ReadOnlyError(self.name, "db.commit()")
        unit = _current.get()
        session = unit.sessions.get(self) if unit is not None else None
        if session is not None and session.in_transaction():
            assert unit is not None
            if unit.cancel_lost():  # see _Unit.cancel_lost(): the scope's end rolls back
                raise asyncio.CancelledError("cancelled (the cancellation had been swallowed)")
            await commit_session(self, unit, session)

    async def rollback(self) -> None:
        """Roll back the scope's session for this database now; no-op without one."""
        unit = _current.get()
        session = unit.sessions.get(self) if unit is not None else None
        if session is not None:
            if session.in_transaction():
                assert unit is not None
                unit.drop_callbacks()  # the work they were registered with is undone
            await session.rollback()

    async def close_session(self, *, commit: bool | None = None) -> None:
        """End this database's work in the current scope early and return its connection.

        Ends the session as a successful scope exit would: commit under the scope's
        ``commit="auto"``/``"always"``, roll back under ``"never"``; ``commit=True``/``False``
        overrides that. Then closes the session and removes it from the scope: a later
        ``session()`` call in the same scope opens a fresh one. Use it before a slow
        external call so that no connection is held while waiting. No-op without a session.

        A read-only Database's session is always rolled back.

        Raises:
            ReadOnlyError: ``commit=True`` on a read-only Database.
            CommitError: the commit failed; the session was rolled back and closed anyway.
        """
        if commit and self._read_only:
            raise ReadOnlyError(self.name, "db.close_session(commit=True)")
        unit = _current.get()
        session = unit.sessions.pop(self, None) if unit is not None else None
        if session is None:
            return
        assert unit is not None
        if commit is None:
            commit = unit.commit != "never"
        lost = commit and unit.cancel_lost()  # see _Unit.cancel_lost(): roll back instead
        commit = commit and not lost
        ending = _Unit("always" if commit else "never", unit.before_commit, unit.after_commit)
        ending.sessions[self] = session
        if not commit and session.in_transaction():
            unit.drop_callbacks()
        try:
            await ending.end(failed=False)
        except CommitError as exc:
            unit.drop_callbacks()
            if unit.watch is not None:
                unit.watch.closed_early(self, commit=commit, error=exc)
            raise
        if unit.watch is not None:
            unit.watch.closed_early(self, commit=commit, error=None)
        if lost:
            raise asyncio.CancelledError("cancelled (the cancellation had been swallowed)")
        if commit and unit.callbacks is not None and not unit.in_transaction():
            await unit.committed()

    # -- transactions and independent sessions ---------------------------------------------

    def transaction(self, *, existing: ExistingMode = "nest") -> TransactionBlock:
        """An explicit transaction block on the scope's session, as context manager or decorator.

        ``async with db.transaction() as session:`` begins a transaction, commits it when
        the block ends normally, rolls it back and re-raises if the block raises. As a
        decorator (``@db.transaction()``), each call of the async function is one block.

        If the session already has an open transaction (SQLAlchemy begins one on the first
        query or ``add()``), ``existing``
        decides:

        - ``"nest"`` (default): run the block in a SAVEPOINT. A failure inside rolls back to
          the savepoint only; success releases it, and the outer transaction commits later
          with the scope. Nothing earlier is committed by the block.
        - ``"commit"``: commit the open transaction first, then run the block in a new one.
        - ``"rollback"``: roll the open transaction back first, then run a new one.
        - ``"join"``: run in the open transaction and commit it at the end of the block
          (roll it back if the block raises).
        - ``"raise"``: raise ``TransactionAlreadyOpenError``
          and leave the open transaction untouched.

        Raises:
            ConfigurationError: ``existing`` is not one of the values above.
            NoScopeError: on entry, no scope is active.
            TransactionAlreadyOpenError: on entry, with ``existing="raise"``.
        """
        return TransactionBlock(self, existing)

    @contextlib.asynccontextmanager
    async def new_session(self, *, begin: bool = False) -> AsyncIterator[AsyncSession]:
        """An independent session outside the scope, closed when the block ends.

        ``async with db.new_session(begin=True) as s:`` commits when the block ends normally
        and rolls back if it raises. With ``begin=False`` (default) you commit yourself and
        anything uncommitted is rolled back at the end. Runs ``before_session`` first. Works
        with or without an active scope, and never touches the scope's session.

        Raises:
            CommitError: with ``begin=True``, the final commit failed.
        """
        if self.before_session is not None:
            await self.before_session(self)
        unit = _Unit("auto" if begin else "never")
        session = unit.sessions[self] = self._open_session()
        failed = True
        try:
            if begin:
                await session.begin()
            yield session
            failed = False
        finally:
            await unit.end(failed=failed)
