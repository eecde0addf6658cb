"""aiosqlite: close the cursor of a statement that a cancellation interrupted; on
SQLAlchemy 2.0, also mark the statements that are running.

When a ``CancelledError`` (or ``KeyboardInterrupt``) interrupts a statement, SQLAlchemy
invalidates the connection without closing the statement's cursor, and the cursor stays
reachable (from its adapter in SQLAlchemy 2.1, from the exception's traceback in both 2.0
and 2.1, so from the cancelled task) until the garbage collector frees it. Since Python
3.11, ``sqlite3.Connection.close()`` leaves the database handle open (``sqlite3_close_v2``:
a "zombie") while a statement of a live cursor is not reset, so the interrupted transaction
and its file lock outlive the close: every other connection's write fails with ``database is
locked`` until the task is collected.

The listener queues the cursor's ``close()`` on the connection's worker thread at once,
behind the interrupted statement and ahead of the close that the invalidation queues, so
that the close really ends the transaction. It only touches aiosqlite objects it finds
where it expects them, and does nothing otherwise.

The scope's clean-up waits for a statement still running on its session (another task's)
before it rolls back, through the lock SQLAlchemy's adapter holds around each statement
(``_scope._statements_done``). SQLAlchemy 2.0's aiosqlite adapter has no such lock:
:func:`track_statements` then keeps an event per connection instead, cleared while a
statement runs (:func:`statement_idle`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine


def close_interrupted_cursors(engine: AsyncEngine) -> None:
    """Install the listener on ``engine`` if it uses aiosqlite (once per engine)."""
    target = engine.sync_engine
    if engine.dialect.driver == "aiosqlite" and not event.contains(
        target, "handle_error", _close_interrupted_cursor
    ):
        event.listen(target, "handle_error", _close_interrupted_cursor)


#: ``connection.info`` key of the event set while no statement runs (SQLAlchemy 2.0 only).
_IDLE = "sqla_context.aiosqlite.idle"


def track_statements(engine: AsyncEngine) -> None:
    """Keep :func:`statement_idle` up to date on ``engine`` if it uses aiosqlite and the
    SQLAlchemy adapter has no statement lock of its own (SQLAlchemy 2.0); once per engine."""
    target = engine.sync_engine
    if (
        engine.dialect.driver != "aiosqlite"
        or _adapter_has_lock()
        or event.contains(target, "before_cursor_execute", _statement_starts)
    ):
        return
    event.listen(target, "before_cursor_execute", _statement_starts)
    event.listen(target, "after_cursor_execute", _statement_ends)
    event.listen(target, "handle_error", _statement_failed)


def statement_idle(connection: Any) -> asyncio.Event | None:
    """The event of ``connection`` (a SQLAlchemy ``Connection``) that is set while no
    statement runs on it; None where :func:`track_statements` does not track it."""
    try:
        idle = connection._dbapi_connection.info.get(_IDLE)
    except Exception:  # closed, invalidated or not a pooled connection: nothing runs
        return None
    return idle if isinstance(idle, asyncio.Event) else None


def _adapter_has_lock() -> bool:
    """Whether SQLAlchemy's aiosqlite adapter runs statements under ``_execute_mutex`` (2.1)."""
    from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
    from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection

    return issubclass(AsyncAdapt_aiosqlite_connection, AsyncAdapt_dbapi_connection)


def _statement_starts(conn: Connection, *_args: Any) -> None:
    idle = conn.info.get(_IDLE)
    if idle is None:
        idle = conn.info[_IDLE] = asyncio.Event()
    idle.clear()


def _statement_ends(conn: Connection, *_args: Any) -> None:
    idle = conn.info.get(_IDLE)
    if idle is not None:
        idle.set()


def _statement_failed(context: ExceptionContext) -> None:
    if context.connection is not None:
        _statement_ends(context.connection)


def _close_interrupted_cursor(context: ExceptionContext) -> None:
    if isinstance(context.original_exception, Exception):
        return  # SQLAlchemy closes the cursor itself after an ordinary error
    cursor = _interrupted_cursor(context)  # aiosqlite.Cursor
    connection = getattr(cursor, "_conn", None)  # aiosqlite.Connection
    sqlite_cursor = getattr(cursor, "_cursor", None)  # sqlite3.Cursor
    queue = getattr(connection, "_tx", None)
    if sqlite_cursor is None or queue is None or not getattr(connection, "_running", False):
        return
    # The worker thread runs (future, function) pairs in order and reports to the future.
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    done.add_done_callback(_ignore_outcome)
    queue.put_nowait((done, sqlite_cursor.close))


def _interrupted_cursor(context: ExceptionContext) -> Any:
    """The aiosqlite cursor of the interrupted statement, or None.

    SQLAlchemy 2.1 keeps it on its cursor adapter. SQLAlchemy 2.0 holds it only in a local
    variable of the adapter's ``execute()``, whose frame the exception's traceback still
    references: take it from there.
    """
    adapted = getattr(context.execution_context, "cursor", None)
    if adapted is None:
        return None
    cursor = getattr(adapted, "_cursor", None)
    traceback = context.original_exception.__traceback__
    while cursor is None and traceback is not None:
        frame = traceback.tb_frame
        if frame.f_locals.get("self") is adapted:
            cursor = frame.f_locals.get("_cursor")
        traceback = traceback.tb_next
    return cursor


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed close is not worth a warning
