"""Read-only Databases, and reads routed to replicas until the scope writes (read-your-writes).

A read-only Database sets the access mode of each new connection, once, when the pool opens
it (no statement per transaction), so every transaction on it is read-only at the server,
also in autocommit mode. A primary with replicas watches the statements its engine sends:
the first one that may write, sent from inside a scope, makes that scope read from the
primary for the rest of its life.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from ._scope import _current
from .exceptions import ConfigurationError, NoScopeError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from ._database import Database

_log = logging.getLogger("sqla_context")

#: Per dialect: the statement that makes every later transaction of a connection read-only.
#: None of them is undone by the pool's rollback-on-return.
_READ_ONLY_SQL = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",  # MySQL and MariaDB
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


def make_read_only(engine: AsyncEngine, db_name: str) -> None:
    """Make every connection ``engine`` opens from now on refuse writes at the server.

    Raises:
        ConfigurationError: the engine's dialect has no read-only mode we know of.
    """
    dialect = engine.dialect.name
    if dialect not in _READ_ONLY_SQL:
        raise ConfigurationError(
            f"read_only=True is not supported for {dialect!r} databases ({db_name!r}); "
            f"supported: {', '.join(sorted(_READ_ONLY_SQL))}. Connect with a user that has "
            "read permissions only, and leave read_only=False."
        )
    listener = _LISTENERS[dialect]
    if not event.contains(engine.sync_engine, "connect", listener):  # an engine_factory's
        event.listen(engine.sync_engine, "connect", listener)  # engine may come back


def _read_only_listener(sql: str) -> Any:
    def _set_read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql)
        finally:
            cursor.close()
        # PostgreSQL's SET is transactional, and the driver began a transaction for it.
        dbapi_connection.commit()

    return _set_read_only


#: One listener per dialect, so that event.contains() can tell it is installed already.
_LISTENERS = {dialect: _read_only_listener(sql) for dialect, sql in _READ_ONLY_SQL.items()}


# The first keyword of a statement, after comments and opening parentheses.
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)
_DML = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
#: Statements that change no data. Everything else counts as a write (conservative).
_NOT_WRITING = frozenset(
    {"SELECT", "SHOW", "VALUES", "BEGIN", "START", "SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT"}
)


@functools.lru_cache(maxsize=1024)
def may_write(statement: str) -> bool:
    """True unless ``statement`` is a plain read (``SELECT``, ``SHOW``, transaction control).

    A ``WITH`` query counts as a write when it contains ``INSERT``, ``UPDATE``, ``DELETE``
    or ``MERGE``. A ``SELECT`` of a function that writes (``nextval()``) is not detected.
    """
    match = _FIRST_WORD.match(statement)
    if match is None:
        return True
    word = match[1].upper()
    if word == "WITH":
        return _DML.search(statement) is not None
    return word not in _NOT_WRITING


def track_writes(db: Database, engine: AsyncEngine) -> None:
    """Record, in the running scope, each statement ``engine`` sends that may write."""

    def _before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # SQLAlchemy runs this sync event in a greenlet that carries the awaiting task's
        # context, so the ContextVar names the scope that sent the statement.
        unit = _current.get()
        if unit is None or unit.closed or not may_write(statement):
            return
        if unit.wrote is None:
            unit.wrote = set()
        unit.wrote.add(db)

    event.listen(engine.sync_engine, "before_cursor_execute", _before_cursor_execute)


async def read_session(db: Database) -> AsyncSession:
    """The session ``db.read_session()`` returns; see ``Database.read_session()``."""
    unit = _current.get()
    if unit is None:
        raise NoScopeError(db.name)
    target = unit.routes.get(db) if unit.routes is not None else None
    if target is None or (target is not db and unit.wrote is not None and db in unit.wrote):
        target = await _route(db)
    return await target.session()


async def _route(db: Database) -> Database:
    """Choose where this scope's reads of ``db`` go from now on (and remember it)."""
    unit = _current.get()
    assert unit is not None
    if unit.routes is None:
        unit.routes = {}
    routes = unit.routes
    routes[db] = db  # set before any await: a second caller meanwhile reads the primary
    if unit.wrote is not None and db in unit.wrote:
        return db
    hook = db.read_from_primary
    if hook is not None and hook(db):
        return db
    now = time.monotonic()
    candidates = [r for r in db.replicas if db._replica_down.get(r, 0.0) <= now]
    random.shuffle(candidates)
    for replica in candidates:
        routes[db] = replica
        session = await replica.session()
        if session.in_transaction():  # already used in this scope: it works
            return replica
        try:
            # Connect now, so that an unreachable replica sends the reads to the primary
            # instead of failing the caller's first query.
            await session.connection()
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            routes[db] = db
            await replica.close_session(commit=False)
            _replica_failed(db, replica, exc)
            continue
        if db._replica_down.pop(replica, None) is not None:
            _log.info("replica %r of %r is reachable again", replica.name, db.name)
        return replica
    return db


def _replica_failed(db: Database, replica: Database, exc: BaseException) -> None:
    first = replica not in db._replica_down
    db._replica_down[replica] = time.monotonic() + db.replica_retry
    log = _log.warning if first else _log.debug
    log(
        "replica %r of %r cannot be reached (%s: %s); reading from the primary, "
        "trying the replica again in %ss",
        replica.name,
        db.name,
        type(exc).__name__,
        exc,
        db.replica_retry,
    )
