"""aiosqlite: close the cursor of a statement that a cancellation interrupted.

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
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine


def close_interrupted_cursors(engine: AsyncEngine) -> None:
    """Install the listener on ``engine`` if it uses aiosqlite (once per engine)."""
    target = engine.sync_engine
    if engine.dialect.driver == "aiosqlite" and not event.contains(
        target, "handle_error", _close_interrupted_cursor
    ):
        event.listen(target, "handle_error", _close_interrupted_cursor)


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
