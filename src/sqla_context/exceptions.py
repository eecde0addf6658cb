"""Exceptions raised by sqla_context.

Every error derives from ``SqlaContextError``; each child also derives from the
builtin a caller may already catch::

    SqlaContextError
    ├── ConfigurationError (ValueError)       bad option value, raised by the call that got it
    ├── NoScopeError (LookupError)            db.session() or on_commit() with no active scope
    ├── ScopeClosedError (RuntimeError)       db.session() from a scope that has ended
    ├── NestedScopeError (RuntimeError)       scope() inside an active scope, without nested=
    ├── EventLoopError (RuntimeError)         a scope or pool used from another event loop
    ├── TransactionAlreadyOpenError (RuntimeError)
    │                                         db.transaction(existing="raise") with one open
    ├── ReadOnlyError (RuntimeError)          db.commit() on a Database(read_only=True)
    ├── CommitError                           a scope's commit failed; names what was committed
    ├── RetryError                            a retried unit failed on every attempt
    ├── UnsafeDatabaseError (RuntimeError)    sqla_context.testing refused a non-test database
    └── LeakError (AssertionError)            a test left a connection checked out

Errors raised by SQLAlchemy or the driver (``IntegrityError``, ``OperationalError``, ...)
pass through unchanged, except at scope exit, where a failed commit is wrapped in
``CommitError`` so that the message can say which databases were committed.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.exc import StatementError

__all__ = [
    "CommitError",
    "ConfigurationError",
    "EventLoopError",
    "LeakError",
    "NestedScopeError",
    "NoScopeError",
    "ReadOnlyError",
    "RetryError",
    "ScopeClosedError",
    "SqlaContextError",
    "TransactionAlreadyOpenError",
    "UnsafeDatabaseError",
]


class SqlaContextError(Exception):
    """Base class of every error raised by sqla_context."""


class ConfigurationError(SqlaContextError, ValueError):
    """An option got a value outside its allowed set.

    Raised by the call that received the value (``Database(...)``, ``scope(...)``,
    ``db.transaction(...)``), so the traceback points at the mistake.
    """


class NoScopeError(SqlaContextError, LookupError):
    """``await db.session()`` (or ``db.transaction()``, ``on_commit()``) ran with no active scope.

    ``db_name`` names the Database asked for; it is ``None`` for ``on_commit()``, which
    concerns the scope, not one database.
    """

    def __init__(self, db_name: str | None, *, what: str | None = None) -> None:
        what = what or f"No active scope for database {db_name!r}."
        super().__init__(
            f"{what} Add "
            "sqla_context.asgi.SessionMiddleware to the app, or run this code under "
            "`async with scope():` / `@scope()`. A task or thread started before "
            "the scope began cannot see it: pass it the session, or use "
            "`run_isolated()` / `db.new_session()` for independent work."
        )
        self.db_name = db_name


class ScopeClosedError(SqlaContextError, RuntimeError):
    """A scope that has already ended was asked for a session.

    Happens when code keeps a copy of the scope's context past its end: a task created
    inside the scope that outlives it, or a callback run later in a copy of its context. The
    scope's sessions are committed or rolled back and closed; a new one is not opened
    silently, because nothing would ever commit or close it.
    """

    def __init__(self, db_name: str) -> None:
        super().__init__(
            f"The scope has already closed; cannot open a session for database {db_name!r}. "
            "This code outlived the scope it was started in (e.g. a task created inside the "
            "scope). Give it a scope of its own: `async with scope(nested='new'):` or "
            "`await run_isolated(fn)`."
        )
        self.db_name = db_name


class NestedScopeError(SqlaContextError, RuntimeError):
    """``scope()`` was entered while another scope is active, without ``nested=``."""

    def __init__(self, *, retry: bool = False) -> None:
        if retry:
            message = (
                "A scope is already active in this context, and a retried unit must be the "
                "outermost one: retrying inside it would repeat only part of its transaction. "
                "Pass nested='new' to run the retried unit on its own (it does not see the "
                "active scope's uncommitted changes), or call it outside any scope (a request "
                "handler: see docs/retries.md)."
            )
        else:
            message = (
                "A scope is already active in this context. Pass nested='reuse' to join it "
                "(its owner commits and closes), or nested='new' to open an independent scope "
                "with its own sessions and connections."
            )
        super().__init__(message)


class EventLoopError(SqlaContextError, RuntimeError):
    """A scope, or a Database's pool, was used from an event loop it does not belong to.

    Sessions and pooled connections belong to the event loop that opened them. A thread
    that runs ``asyncio.run()`` (e.g. under ``asyncio.to_thread``) inherits the caller's
    context, so it sees the caller's scope, but it has a loop of its own. Nothing is sent
    to the database when this is raised.
    """

    def __init__(self, db_name: str, *, scope: bool = False) -> None:
        if scope:
            message = (
                f"The scope's session for database {db_name!r} belongs to another event loop "
                "(this code runs in a new loop, e.g. asyncio.run() in a thread, that inherited "
                "the scope). Open a scope in this loop: `async with scope():` (the other "
                "loop's scope is not active here), or pass plain values across the thread."
            )
        else:
            message = (
                f"Database {db_name!r} is in use by an event loop that is still running in "
                "another thread; its pooled connections cannot serve this loop. Use one "
                "Database object per event loop (a Database made in the thread), or call "
                "`await db.dispose()` in the other loop first."
            )
        super().__init__(message)
        self.db_name = db_name


class TransactionAlreadyOpenError(SqlaContextError, RuntimeError):
    """``db.transaction(existing="raise")`` found a transaction already open.

    The open transaction is left untouched.
    """

    def __init__(self, db_name: str) -> None:
        super().__init__(
            f"The scope's session for database {db_name!r} already has an open transaction. "
            "Commit or roll it back first, or choose another `existing=` mode: 'nest' (savepoint), "
            "'commit', 'rollback' or 'join'."
        )
        self.db_name = db_name


class ReadOnlyError(SqlaContextError, RuntimeError):
    """An explicit commit was asked of a read-only Database.

    Raised by ``db.commit()`` and ``db.close_session(commit=True)`` on a
    ``Database(..., read_only=True)``, which never sends COMMIT: its sessions always end with
    a rollback.
    """

    def __init__(self, db_name: str, call: str) -> None:
        super().__init__(
            f"{call} on the read-only database {db_name!r}: its sessions never commit (they "
            "end with a rollback). Write through the primary: `await primary.session()`, "
            "or leave read_only=False if this database should accept writes. "
            "(docs: replicas)"
        )


class CommitError(SqlaContextError):
    """Committing a scope's sessions at scope exit failed.

    The original exception is ``__cause__``. Sessions that were committed before the
    failure stay committed (a commit cannot be undone); the failed one and every later
    one were rolled back. All of them were closed.

    Attributes:
        failed: name of the database whose commit raised.
        committed: names of the databases committed before the failure.
        rolled_back: names of the databases rolled back because of it, ``failed`` first.
    """

    def __init__(
        self,
        failed: str,
        committed: Sequence[str],
        rolled_back: Sequence[str],
        cause: BaseException,
    ) -> None:
        self.failed = failed
        self.committed = list(committed)
        self.rolled_back = list(rolled_back)
        super().__init__(
            f"Commit failed for database {failed!r}: {_describe(cause)}. "
            f"Committed before the failure: {self.committed or 'none'}; "
            f"rolled back: {self.rolled_back}."
        )


class RetryError(SqlaContextError):
    """A retried unit of work failed with a retryable error on its last allowed attempt.

    Raised by ``@scope(retry=...)`` and ``run_isolated(fn, retry=...)``, chained ``from``
    the last error (also in ``last``). Every attempt was rolled back; nothing of the unit
    was committed.

    Attributes:
        attempts: how many times the unit ran.
        last: the error of the last attempt (a driver error wrapped by SQLAlchemy, or a
            ``CommitError`` if it surfaced at the COMMIT).
    """

    def __init__(self, attempts: int, last: BaseException, code: str | None = None) -> None:
        self.attempts = attempts
        self.last = last
        what = f"{code}, " if code else ""
        super().__init__(
            f"The unit of work failed on all {attempts} attempt(s); the last with "
            f"{what}{_describe(_unwrap_commit(last))}. "
            "Every attempt was rolled back. Contention this persistent calls for fewer "
            "concurrent writers of the same rows or shorter transactions; more attempts "
            "(Retry(attempts=...)) only wait longer. (docs: retries)"
        )


class UnsafeDatabaseError(SqlaContextError, RuntimeError):
    """``sqla_context.testing`` refused a server database that does not look like a test one.

    Rollback mode never keeps data, but commit mode empties tables: both refuse a database
    whose name fails the ``is_test_database`` rule (default: the name contains ``"test"``),
    so that a test run pointed at production by mistake stops before it writes.
    """


class LeakError(SqlaContextError, AssertionError):
    """A test ended with a connection of a ``Database`` still checked out.

    Raised by ``sqla_context.testing`` when the isolation ends; the message names the
    database. Usually a session made from ``db.sessionmaker()`` or a connection from
    ``db.engine.connect()`` that the test or the app never closed.
    """


def _unwrap_commit(exc: BaseException) -> BaseException:
    """The failure behind a ``CommitError``, else ``exc``: what a log line should show."""
    if isinstance(exc, CommitError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _describe(exc: BaseException) -> str:
    """``exc`` as one line for a log or an error message, without SQL parameters.

    A driver error rendered by SQLAlchemy carries the statement's parameters, and the
    server's detail line often quotes the row (``Key (email)=(...)``): both can hold
    personal data. The first line of the driver's message says what went wrong; the full
    error stays available as ``__cause__``.
    """
    if isinstance(exc, StatementError) and exc.orig is not None:
        exc = exc.orig
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
