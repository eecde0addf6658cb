"""Database: a lazily created engine, its session factory, and the scope's session."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ._scope import _current, _Unit, commit_session, settle
from ._transaction import TransactionBlock
from .exceptions import ConfigurationError, NoScopeError, ScopeClosedError

if TYPE_CHECKING:
    from ._typing import BeforeSessionHook, EngineFactory, ExistingMode, SessionHook

__all__ = ["Database"]


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

    Creating a ``Database`` does no I/O and creates no engine; create it at import time,
    next to your models. The engine and its pool are built the first time they are needed,
    exactly once even when many tasks or threads ask at the same moment, and live until
    :meth:`dispose`.

    Args:
        url: the database URL, as a string or ``sqlalchemy.URL`` (parsed at once, so a
            malformed URL fails here). Exactly one of ``url`` and ``engine_factory``.
        engine_factory: a zero-argument callable returning an ``AsyncEngine``, for engines
            that need more than a URL and options.
        engine_options: keyword arguments for ``create_async_engine`` (``pool_size``,
            ``echo``, ...). With ``engine_factory`` they are used only by :meth:`switch_url`.
        session_options: keyword arguments for ``async_sessionmaker``. The default is
            ``expire_on_commit=False``: after a commit, SQLAlchemy would otherwise expire every
            loaded object, and the next attribute access would need an implicit refresh,
            which async code cannot do (``MissingGreenlet`` inside the scope,
            ``DetachedInstanceError`` after it has closed the session). Objects returned by a
            handler after an early commit stay readable. Pass ``expire_on_commit=True`` to
            get SQLAlchemy's default back.
        name: a label for logs and errors; defaults to the URL with the password hidden.
        before_session: ``async def hook(db)`` awaited before each scope session (and each
            :meth:`new_session`) is created. It may call :meth:`switch_url`, e.g. after asking
            a discovery service which host is the primary.
        before_commit: called with the session before each commit this library performs
            for this database (scope exit, :meth:`commit`, :meth:`close_session`,
            :meth:`transaction`). Sync or async. An exception aborts the commit.
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

    Raises:
        ConfigurationError: neither or both of ``url`` and ``engine_factory``, or a
            ``session_options`` key that ``AsyncSession`` does not accept.
        sqlalchemy.exc.ArgumentError: ``url`` cannot be parsed.
    """

    __slots__ = (
        "__weakref__",
        "_bound_maker",
        "_engine",
        "_factory",
        "_lock",
        "_name",
        "_retired",
        "_sessionmaker",
        "_sqlite_begin",
        "_url",
        "_users",
        "after_commit",
        "before_commit",
        "before_session",
        "engine_options",
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
    ) -> None:
        if (url is None) == (engine_factory is None):
            raise ConfigurationError("Database() needs exactly one of `url` and `engine_factory`")
        self._url: URL | None = make_url(url) if url is not None else None
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
        self._name = name
        self.before_session = before_session
        self.before_commit = before_commit
        self.after_commit = after_commit
        self._sqlite_begin = sqlite_begin
        self._engine: AsyncEngine | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        # Set by sqla_context.testing: sessions bound to a test's outer transaction.
        self._bound_maker: async_sessionmaker[AsyncSession] | None = None
        # Open sessions per engine, so that an engine replaced by switch_url() is disposed
        # only once its last session has closed.
        self._users: dict[AsyncEngine, int] = {}
        self._retired: set[AsyncEngine] = set()
        self._lock = threading.Lock()

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

    def __repr__(self) -> str:
        return f"Database({self.name!r})"

    # -- engine lifecycle ------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The current ``AsyncEngine``, created on first access (also after :meth:`dispose`)."""
        engine = self._engine
        if engine is None:
            engine, _ = self._create_engine()
        return engine

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """An ``async_sessionmaker`` bound to the current engine, for plain-SQLAlchemy use.

        Sessions made from it are yours to close; they are not part of any scope.
        """
        maker = self._bound_maker or self._sessionmaker
        if maker is None:
            _, maker = self._create_engine()
        return maker

    def _create_engine(self) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
        # Returns the pair it made or found under the lock: re-reading the attributes after
        # the lock is released could see a concurrent dispose() clear them.
        with self._lock:  # threads too: an app and its TestClient may race here
            if self._engine is None:
                if self._url is not None:
                    engine = create_async_engine(self._url, **self.engine_options)
                    if self._sqlite_begin and engine.dialect.name == "sqlite":
                        _let_sqlalchemy_begin(engine)
                else:
                    assert self._factory is not None
                    engine = self._factory()
                    if not isinstance(engine, AsyncEngine):
                        raise ConfigurationError(
                            "engine_factory must return an AsyncEngine, "
                            f"got {type(engine).__name__}"
                        )
                self._sessionmaker = async_sessionmaker(engine, **self.session_options)
                self._engine = engine
            assert self._sessionmaker is not None
            return self._engine, self._sessionmaker

    async def switch_url(self, url: str | URL) -> None:
        """Point new sessions at ``url`` (primary failover, replica rotation).

        Sessions already open finish on the old engine, which is disposed once the last of
        them has closed. The new engine is created lazily with ``engine_options``. Switching
        to the URL already in use does nothing, so a ``before_session`` hook may call this on
        every session.

        Raises:
            sqlalchemy.exc.ArgumentError: ``url`` cannot be parsed.
        """
        new_url = make_url(url)
        with self._lock:
            if new_url == self._url:
                return
            old, self._engine, self._sessionmaker = self._engine, None, None
            self._url, self._factory = new_url, None
            dispose_now = old is not None and old not in self._users
            if old is not None and not dispose_now:
                self._retired.add(old)
        if dispose_now:
            assert old is not None
            await old.dispose()

    async def dispose(self) -> None:
        """Dispose the engine and close its pooled connections; call it at shutdown.

        Safe to call twice. Using the Database afterwards creates a fresh engine. Sessions
        still open keep their connection until they close; it is then discarded.
        """
        with self._lock:
            engines = [e for e in (self._engine, *self._retired) if e is not None]
            self._engine = self._sessionmaker = None
            self._retired.clear()
        for engine in engines:
            await engine.dispose()

    async def __aenter__(self) -> Database:
        """``async with db:`` returns ``db`` and disposes its engine when the block ends.

        Handy in an application's lifespan or a script's ``main()``.
        """
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.dispose()

    def _open_session(self) -> AsyncSession:
        session = self.sessionmaker()
        engine = session.bind
        if isinstance(engine, AsyncEngine):  # not a test's connection (sqla_context.testing)
            with self._lock:
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
        await engine.dispose()

    # -- the scope's session ---------------------------------------------------------------

    async def session(self) -> AsyncSession:
        """Return the current scope's session for this database, creating it on first call.

        Every call in the same scope, at any depth and from any task created inside the
        scope, returns the same ``AsyncSession``. Creating it does no I/O: the first query
        checks out a connection and begins the transaction. When the scope already holds
        the session, this takes no lock and does no I/O.

        .. warning::
            One ``AsyncSession`` must not run two queries at the same time. Do not
            ``asyncio.gather()`` coroutines that use the scope's session; give each its
            own with :func:`~sqla_context.run_isolated` or :meth:`new_session`.

        Raises:
            NoScopeError: no scope is active (add the middleware or use ``scope()``).
            ScopeClosedError: the scope this code runs in has already ended.
        """
        unit = _current.get()
        if unit is not None:
            session = unit.sessions.get(self)
            if session is not None:
                return session
            if unit.closed:
                raise ScopeClosedError(self.name)
            if self.before_session is None:  # no await from the check to the set: no race
                session = unit.sessions[self] = self._open_session()
                return session
            return await self._session_after_hook(unit)
        raise NoScopeError(self.name)

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
            session = unit.sessions[self] = self._open_session()
            return session

    async def commit(self) -> None:
        """Commit the scope's session for this database now, running the commit hooks.

        Does nothing without a scope, without a session in it, or with nothing to commit.
        The session stays open; later queries begin a new transaction.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the commit failed (the error of the driver, as
                ``session.commit()`` raises it).
        """
        unit = _current.get()
        session = unit.sessions.get(self) if unit is not None else None
        if session is not None and session.in_transaction():
            await commit_session(self, unit, session)

    async def rollback(self) -> None:
        """Roll back the scope's session for this database now; no-op without one."""
        unit = _current.get()
        session = unit.sessions.get(self) if unit is not None else None
        if session is not None:
            await session.rollback()

    async def close_session(self, *, commit: bool | None = None) -> None:
        """End this database's work in the current scope early and return its connection.

        Ends the session as a successful scope exit would: commit under the scope's
        ``commit="auto"``/``"always"``, roll back under ``"never"``; ``commit=True``/``False``
        overrides that. Then closes the session and removes it from the scope: a later
        :meth:`session` call in the same scope opens a fresh one. Use it before a slow
        external call so that no connection is held while waiting. No-op without a session.

        Raises:
            CommitError: the commit failed; the session was rolled back and closed anyway.
        """
        unit = _current.get()
        session = unit.sessions.pop(self, None) if unit is not None else None
        if session is None:
            return
        assert unit is not None
        if commit is None:
            commit = unit.commit != "never"
        ending = _Unit("always" if commit else "never", unit.before_commit, unit.after_commit)
        ending.sessions[self] = session
        await settle(ending, failed=False)

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
        - ``"raise"``: raise :class:`~sqla_context.exceptions.TransactionAlreadyOpenError`
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
            await settle(unit, failed=failed)
