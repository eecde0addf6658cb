"""Cancellation by anyio (FastAPI, Starlette): cancel scopes, timeouts, failing task groups.

anyio cancels level-triggered: while a cancel scope is cancelled, every await inside it is
cancelled again, at once. A scope must still end cleanly (rolled back, or committed when
the COMMIT had completed; docs/concepts.md, "Cancellation"), give its connection back
before the cancellation goes on, let the cancellation reach the cancel scope that asked
for it, and not turn any wait of its clean-up into a busy loop.

The tests use anyio's primitives in the asyncio tasks pytest-asyncio runs (anyio's asyncio
backend works on any running loop). Trio is not tested: SQLAlchemy's async drivers run on
asyncio only. Every test checks, through the backend's witness connection, the committed
rows, the pool's checked-out connections and the server's open transactions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import Database, scope

from .conftest import Backend, assert_clean, end_stranded_aiosqlite_closes, insert

#: Upper bound of every wait; never reached when a test passes.
TIMEOUT = 30.0

#: How long the slow statements (and the slow COMMIT) run in the database: long enough
#: for a busy loop to show in the CPU time of the wait (see ``assert_no_spin``).
SLOW = 2.0


class Boom(Exception):
    """Raised by a task group's sibling task, which makes the group cancel the scope."""


def slow_sql(backend: Backend) -> str:
    """A statement that runs for ``SLOW`` seconds in the database (see ``slow_db``)."""
    if backend.kind == "postgresql":
        return f"SELECT pg_sleep({SLOW})"
    if backend.kind == "mariadb":
        return f"SELECT SLEEP({SLOW})"
    return f"SELECT sleep_seconds({SLOW})"


@pytest.fixture
async def slow_db(backend: Backend) -> AsyncIterator[Database]:
    """A Database of ``backend`` for ``slow_sql``; on SQLite with a ``sleep_seconds()``.

    The SQLite function runs in aiosqlite's worker thread, like any statement, and blocks
    only that thread. At teardown it is cut short and waited for: a worker thread still
    inside a statement when the test's event loop closes keeps the loop's shutdown from
    finishing (SQLAlchemy's interrupted graceful close of an aiosqlite connection waits
    for that thread).
    """
    db = backend.database()
    if backend.kind != "sqlite":
        yield db
        return
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    running = 0
    idle = asyncio.Event()
    idle.set()

    def ended() -> None:
        nonlocal running
        running -= 1
        if not running:
            idle.set()

    def sleep_seconds(seconds: float) -> int:
        nonlocal running
        running += 1  # the worker thread; read and written on the loop's thread too: a
        idle.clear()  # race only between a statement's start and the teardown's check
        try:
            stop.wait(seconds)
        finally:
            loop.call_soon_threadsafe(ended)
        return 1

    @event.listens_for(db.engine.sync_engine, "connect")
    def _register(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("sleep_seconds", 1, sleep_seconds)

    try:
        yield db
    finally:
        stop.set()
        await asyncio.wait_for(idle.wait(), TIMEOUT)
        await end_stranded_aiosqlite_closes()


def statement_started(db: Database, marker: str) -> asyncio.Event:
    """An event set when a statement containing ``marker`` is about to be sent.

    SQLAlchemy's async drivers take the connection's statement lock before their first
    await, so once this is set the statement holds the connection until it ends.
    """
    started = asyncio.Event()

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if marker.lower() in statement.lower():
            started.set()

    return started


def commit_started(db: Database) -> asyncio.Event:
    """An event set when SQLAlchemy is about to send a COMMIT (no await in between)."""
    started = asyncio.Event()

    @event.listens_for(db.engine.sync_engine, "commit")
    def _seen(_conn: Any) -> None:
        started.set()

    return started


def cpu_mark() -> tuple[float, float]:
    """Wall and CPU clocks now, for :func:`assert_no_spin`."""
    return time.monotonic(), time.process_time()


def assert_no_spin(mark: tuple[float, float]) -> float:
    """Assert that the process spent little CPU since ``mark``; return the wall time.

    A regression check for a busy loop: a cancelled scope whose clean-up waits under
    anyio's level-triggered cancellation used to spin for as long as it waited (a 1 s
    COMMIT cost up to 1 s of CPU). Measured on the clean-up test (1 s wait): shielded, as
    now, 0.002 s of CPU; unshielded, 0.19 to 0.34 s (anyio 4 paces its re-cancellation by
    loop turns, so the old loop burns a fifth to a third of a core here, a full core
    elsewhere). The limit, 10 % of the wall time plus 0.05 s for the work of ending itself
    (closing connections, logging; it matters only when the wait is short), sits far above
    the first and below the second. ``process_time()`` counts every thread of this
    process (aiosqlite's worker threads too), none of which should spin.
    """
    wall = time.monotonic() - mark[0]
    cpu = time.process_time() - mark[1]
    assert cpu < 0.1 * wall + 0.05, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting: a busy loop"
    return wall


@pytest.fixture
async def slow_commit(backend: Backend) -> str:
    """PostgreSQL: an INSERT whose COMMIT then runs for ``SLOW`` seconds on the server.

    A deferred constraint trigger runs at COMMIT; this one sleeps. Other backends have no
    deferred triggers (SQLite checks only deferred foreign keys at COMMIT, MariaDB none).
    """
    if backend.kind != "postgresql":
        pytest.skip(f"{backend.kind} has no deferred triggers to make a COMMIT slow")
    statements = [
        "DROP TABLE IF EXISTS slow_commit",
        "CREATE TABLE slow_commit (id INTEGER)",
        "CREATE OR REPLACE FUNCTION slow_commit_sleep() RETURNS trigger AS "
        f"$$ BEGIN PERFORM pg_sleep({SLOW}); RETURN NULL; END $$ LANGUAGE plpgsql",
        "CREATE CONSTRAINT TRIGGER slow_commit_at_commit AFTER INSERT ON slow_commit "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_sleep()",
    ]
    async with backend.witness.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))
    return "INSERT INTO slow_commit (id) VALUES (1)"


# -- mid-statement -----------------------------------------------------------------------------


async def test_move_on_after_mid_statement_rolls_back(backend: Backend, slow_db: Database) -> None:
    db = slow_db
    started = statement_started(db, "sleep")
    reached: list[str] = []
    with anyio.move_on_after(TIMEOUT) as cancel_scope:
        async with scope():
            session = await db.session()
            await insert(session, "rolled-back")

            async def cancel_once_running() -> None:
                await started.wait()
                cancel_scope.cancel()

            canceller = asyncio.create_task(cancel_once_running())
            mark = cpu_mark()
            await session.execute(text(slow_sql(backend)))  # cancelled while it runs
            reached.append("after the statement")
    wall = assert_no_spin(mark)
    assert cancel_scope.cancelled_caught, "the cancellation did not reach its cancel scope"
    assert canceller.done()
    assert reached == []
    assert wall < SLOW, "the cancelled statement was waited for"
    await assert_clean(backend, db, [], settle=True)


# -- at COMMIT: before it is sent, while it runs, after it completed ---------------------------


async def test_cancel_scope_before_commit_is_sent_rolls_back(backend: Backend) -> None:
    """Cancelled in a before_commit hook: the COMMIT is never sent, the work is rolled back."""
    db = backend.database()
    with anyio.CancelScope() as cancel_scope:

        async def before_commit(session: AsyncSession) -> None:
            cancel_scope.cancel()
            await anyio.sleep_forever()

        async with scope(before_commit=before_commit):
            await insert(await db.session(), "never-committed")
            mark = cpu_mark()
    assert_no_spin(mark)
    assert cancel_scope.cancelled_caught
    await assert_clean(backend, db, [], settle=True)


async def test_cancel_scope_after_commit_completed_keeps_the_commit(backend: Backend) -> None:
    """Cancelled in an after_commit hook: the COMMIT had completed, so the work stays
    committed; the cancellation still comes out of the scope."""
    db = backend.database()
    reached: list[str] = []
    with anyio.CancelScope() as cancel_scope:

        async def after_commit(session: AsyncSession) -> None:
            cancel_scope.cancel()
            await anyio.sleep_forever()

        async with scope(after_commit=after_commit):
            await insert(await db.session(), "committed")
            mark = cpu_mark()
        reached.append("after the scope")
    assert_no_spin(mark)
    assert cancel_scope.cancelled_caught
    assert reached == []
    await assert_clean(backend, db, ["committed"], settle=True)


async def test_failing_sibling_cancels_the_scope_mid_commit(
    backend: Backend, slow_commit: str
) -> None:
    """A task group's sibling fails while the scope's COMMIT runs on the server (2 s).

    The COMMIT is in flight, so the server decides (docs/concepts.md, "Cancellation"):
    the row may or may not be committed. Either way the connection is discarded, nothing
    is left checked out or open, the sibling's error comes out of the task group, and the
    cancelled scope does not busy-wait for the COMMIT.
    """
    db = backend.database()
    committing = commit_started(db)
    reached: list[str] = []

    async def unit_of_work() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "maybe-committed")
            await session.execute(text(slow_commit))
        reached.append("after the scope")

    marks: list[tuple[float, float]] = []

    async def sibling() -> None:
        await committing.wait()
        marks.append(cpu_mark())
        raise Boom

    # What pytest.RaisesGroup(Boom) checks (pytest 8.4+): a group holding exactly one Boom.
    with pytest.raises(ExceptionGroup) as raised, anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as group:
            group.start_soon(unit_of_work)
            group.start_soon(sibling)
    assert [type(error) for error in raised.value.exceptions] == [Boom], raised.value
    wall = assert_no_spin(marks[0])
    assert reached == []
    assert wall < SLOW, "the cancelled scope waited for its COMMIT"
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions(settle=True) == 0
    assert await backend.names() in ([], ["maybe-committed"])


# -- during the clean-up -----------------------------------------------------------------------


async def test_cancel_during_clean_up_waits_without_spinning(
    backend: Backend, slow_db: Database
) -> None:
    """The clean-up of a cancelled scope has to wait, and anyio keeps cancelling it.

    A task started inside the scope runs a 2 s statement on the scope's session when the
    scope is cancelled. The scope's rollback must wait for that statement (one session
    runs one operation at a time); anyio cancels that wait at once, so the rest of the
    clean-up moves to a task of its own which the scope waits for, shielded. That wait
    lasts about 2 s and must cost next to no CPU (the old busy loop); then the connection
    is back in the pool, nothing is committed, and the cancellation reaches its scope.
    """
    db = slow_db
    started = statement_started(db, "sleep")

    async def in_child_task() -> None:
        session = await db.session()  # the scope's session, from a task of its own
        await session.execute(text(slow_sql(backend)))

    children: list[asyncio.Task[None]] = []
    with anyio.CancelScope() as cancel_scope:
        async with scope():
            await insert(await db.session(), "rolled-back")
            children.append(asyncio.create_task(in_child_task()))
            await asyncio.wait_for(started.wait(), TIMEOUT)
            mark = cpu_mark()
            cancel_scope.cancel()
            await anyio.sleep_forever()
    wall = assert_no_spin(mark)
    # The measurement means something only if the scope really waited for the statement.
    assert wall > SLOW / 2, f"the clean-up did not wait for the running statement ({wall} s)"
    assert cancel_scope.cancelled_caught
    # The child's statement may succeed or fail (its session was closed under it): its
    # outcome is not this test's concern, only that it has ended.
    await asyncio.wait_for(asyncio.gather(*children, return_exceptions=True), TIMEOUT)
    await assert_clean(backend, db, [], settle=True)
