"""Context-scoped SQLAlchemy async sessions: one session per scope, committed at its end."""

from importlib.metadata import PackageNotFoundError, version

from ._database import Database
from ._pgbouncer import pgbouncer_options
from ._retry import Retry, is_retryable
from ._scope import on_commit, run_isolated, scope
from ._transaction import TransactionBlock
from .exceptions import (
    CommitError,
    ConfigurationError,
    EventLoopError,
    LeakError,
    NestedScopeError,
    NoScopeError,
    ReadOnlyError,
    RetryError,
    ScopeClosedError,
    SqlaContextError,
    TransactionAlreadyOpenError,
    UnsafeDatabaseError,
)

try:
    __version__ = version("sqla-context")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "CommitError",
    "ConfigurationError",
    "Database",
    "EventLoopError",
    "LeakError",
    "NestedScopeError",
    "NoScopeError",
    "ReadOnlyError",
    "Retry",
    "RetryError",
    "ScopeClosedError",
    "SqlaContextError",
    "TransactionAlreadyOpenError",
    "TransactionBlock",
    "UnsafeDatabaseError",
    "__version__",
    "is_retryable",
    "on_commit",
    "pgbouncer_options",
    "run_isolated",
    "scope",
]

# Show the public home in reprs and docs (httpx does the same).
for _obj in (
    Database,
    Retry,
    TransactionBlock,
    is_retryable,
    on_commit,
    pgbouncer_options,
    run_isolated,
    scope,
):
    _obj.__module__ = __name__
del _obj
