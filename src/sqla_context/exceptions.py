"""Exceptions raised by sqla_context.

Every error derives from :class:`SqlaContextError`; each child also derives from the
builtin a caller may already catch::

    SqlaContextError
    ├── ConfigurationError (ValueError)       bad option value, raised by the call that got it
    ├── NoScopeError (LookupError)            db.session() with no active scope
    ├── ScopeClosedError (RuntimeError)       db.session() from a scope that has ended
    ├── NestedScopeError (RuntimeError)       scope() inside an active scope, without nested=
    ├── TransactionAlreadyOpenError (RuntimeError)
    │                                         db.transaction(existing="raise") with one open
    ├── CommitError                           a scope's commit failed; names what was committed
    ├── UnsafeDatabaseError (RuntimeError)    sqla_context.testing refused a non-test database
    └── LeakError (AssertionError)            a test left a connection checked out

Errors raised by SQLAlchemy or the driver (``IntegrityError``, ``OperationalError``, ...)
pass through unchanged, except at scope exit, where a failed commit is wrapped in
:class:`CommitError` so that the message can say which databases were committed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CommitError",
    "ConfigurationError",
    "LeakError",
    "NestedScopeError",
    "NoScopeError",
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
    """``await db.session()`` (or ``db.transaction()``) ran where no scope is active."""

    def __init__(self, db_name: str) -> None:
        super().__init__(
            f"No active scope for database {db_name!r}. Add "
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

    def __init__(self) -> None:
        super().__init__(
            "A scope is already active in this context. Pass nested='reuse' to join it (its "
            "owner commits and closes), or nested='new' to open an independent scope with its "
            "own sessions and connections."
        )


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
            f"Commit failed for database {failed!r}: {type(cause).__name__}: {cause}. "
            f"Committed before the failure: {self.committed or 'none'}; "
            f"rolled back: {self.rolled_back}."
        )


class UnsafeDatabaseError(SqlaContextError, RuntimeError):
    """:mod:`sqla_context.testing` refused a server database that does not look like a test one.

    Rollback mode never keeps data, but commit mode empties tables: both refuse a database
    whose name fails the ``is_test_database`` rule (default: the name contains ``"test"``),
    so that a test run pointed at production by mistake stops before it writes.
    """


class LeakError(SqlaContextError, AssertionError):
    """A test ended with a connection of a :class:`~sqla_context.Database` still checked out.

    Raised by :mod:`sqla_context.testing` when the isolation ends; the message names the
    database. Usually a session made from ``db.sessionmaker()`` or a connection from
    ``db.engine.connect()`` that the test or the app never closed.
    """
