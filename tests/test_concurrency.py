"""Concurrency: tasks sharing a scope, run_isolated() in parallel, racing engine creation.

Every test asserts on the database itself: the committed rows (read through the witness
engine), the pool's checked-out connections and the transactions left open on the server.
No test synchronises by sleeping: tasks signal events, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from sqla_context import Database, ScopeClosedError, run_isolated, scope

from .conftest import Backend, assert_clean, insert

#: Upper bound of every wait; never reached when a test passes.
TIMEOUT = 30.0


class Boom(Exception):
    pass


class Rendezvous:
    """A single-use barrier with a ``passed`` event to await (``asyncio.Barrier`` has none).

    ``wait()`` returns once ``parties`` tasks have called it; ``passed`` is set from then on.
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.passed = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.passed.set()
        await asyncio.wait_for(self.passed.wait(), TIMEOUT)


def counting_session_class(created: list[AsyncSession]) -> type[AsyncSession]:
    """An AsyncSession subclass (for ``session_options={"class_": ...}``) recording instances."""

    class CountingSession(AsyncSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    return CountingSession


async def connection_identity(backend: Backend, session: AsyncSession) -> object:
    """What identifies the server connection ``session`` is using (checks one out if needed)."""
    if backend.kind == "postgresql":
        return (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    if backend.kind == "mariadb":
        return (await session.execute(text("SELECT connection_id()"))).scalar_one()
    connection = await session.connection()
    return connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]


# -- one scope, many tasks ---------------------------------------------------------------------


@pytest.mark.parametrize("with_hook", [False, True], ids=["no-hook", "async-before-session"])
async def test_children_asking_at_the_same_moment_share_one_session(
    backend: Backend, with_hook: bool
) -> None:
    created: list[AsyncSession] = []
    hook_calls = 0

    async def before_session(db: Database) -> None:
        nonlocal hook_calls
        hook_calls += 1
        for _ in range(3):  # suspend, so that the other children ask while the hook runs
            await asyncio.sleep(0)

    db = backend.database(
        session_options={"class_": counting_session_class(created)},
        before_session=before_session if with_hook else None,
    )
    created.clear()  # Database() builds one unbound session to validate the options
    children = 20
    waiting = 0
    all_waiting = asyncio.Event()
    go = asyncio.Event()

    async def child() -> AsyncSession:
        nonlocal waiting
        waiting += 1
        if waiting == children:
            all_waiting.set()
        await go.wait()
        return await db.session()  # the first request for this scope's session

    async with scope():
        tasks = [asyncio.create_task(child()) for _ in range(children)]
        await asyncio.wait_for(all_waiting.wait(), TIMEOUT)
        go.set()  # wakes all 20 in the same loop iteration
        sessions = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        assert len({id(s) for s in sessions}) == 1
        assert len(created) == 1
        parent = await db.session()
        assert sessions[0] is parent
        await insert(parent, "shared")
        assert db.engine.pool.checkedout() == 1
    assert hook_calls == (1 if with_hook else 0)
    assert len(created) == 1
    await assert_clean(backend, db, ["shared"])


async def test_child_task_shares_the_session_and_gets_scope_closed_after_the_scope(
    backend: Backend,
) -> None:
    db = backend.database()
    child_wrote = asyncio.Event()
    scope_over = asyncio.Event()
    seen: list[AsyncSession] = []

    async def child() -> None:
        session = await db.session()
        seen.append(session)
        await insert(session, "from-child")
        child_wrote.set()
        await scope_over.wait()
        await db.session()  # the scope has ended by now: must raise, not reopen a session

    async def late_child() -> None:
        await scope_over.wait()
        await db.session()  # its first request, after the scope ended

    async with scope():
        task = asyncio.create_task(child())
        late = asyncio.create_task(late_child())
        await asyncio.wait_for(child_wrote.wait(), TIMEOUT)
        parent = await db.session()
        assert seen == [parent]
        await insert(parent, "from-parent")
        assert db.engine.pool.checkedout() == 1
    # The scope committed both tasks' work on its one session, and returned the connection.
    await assert_clean(backend, db, ["from-child", "from-parent"])
    scope_over.set()
    results = await asyncio.wait_for(asyncio.gather(task, late, return_exceptions=True), TIMEOUT)
    assert [type(r) for r in results] == [ScopeClosedError, ScopeClosedError]
    assert not parent.in_transaction()
    await assert_clean(backend, db, ["from-child", "from-parent"])


async def test_before_session_hook_still_running_when_the_scope_ends(backend: Backend) -> None:
    created: list[AsyncSession] = []
    hook_entered = asyncio.Event()
    hook_release = asyncio.Event()

    async def before_session(db: Database) -> None:
        hook_entered.set()
        await hook_release.wait()

    db = backend.database(
        session_options={"class_": counting_session_class(created)},
        before_session=before_session,
    )
    created.clear()
    async with scope():
        task = asyncio.create_task(db.session())
        await asyncio.wait_for(hook_entered.wait(), TIMEOUT)
    hook_release.set()  # the hook finishes after its scope has ended
    with pytest.raises(ScopeClosedError):
        await asyncio.wait_for(task, TIMEOUT)
    assert created == [], "no session may be opened for a scope that has ended"
    await assert_clean(backend, db, [])


# -- run_isolated() ----------------------------------------------------------------------------


async def test_run_isolated_calls_run_at_once_on_distinct_sessions_and_connections(
    backend: Backend,
) -> None:
    db = backend.database()
    barrier = Rendezvous(2)
    release = asyncio.Event()
    a_finished = asyncio.Event()
    # SQLite allows a single writer: "b" holding a write transaction at the barrier would
    # wait for "a"'s write lock while "a" waits for "b" at the barrier. So on SQLite "b"
    # only reads before the barrier and writes once "a" has committed.
    serial_writes = backend.kind == "sqlite"

    async def work(name: str) -> tuple[AsyncSession, object]:
        session = await db.session()
        if serial_writes and name == "b":
            await session.execute(text("SELECT count(*) FROM items"))
        else:
            await insert(session, name)
        identity = await connection_identity(backend, session)
        await barrier.wait()  # a sequential run_isolated() would never get past this
        await release.wait()
        if serial_writes and name == "b":
            await a_finished.wait()
            await insert(session, name)
        return session, identity

    async def isolated(name: str) -> tuple[AsyncSession, object]:
        try:
            return await run_isolated(work, name)
        finally:
            if name == "a":
                a_finished.set()

    async with scope():
        caller = await db.session()
        both = asyncio.gather(isolated("a"), isolated("b"))
        try:
            await asyncio.wait_for(barrier.passed.wait(), TIMEOUT)
            # Both calls are inside their work at once, each on a connection of its own.
            checked_out_at_barrier = db.engine.pool.checkedout()
            open_at_barrier = await backend.open_transactions()
            committed_at_barrier = await backend.names()
        finally:
            release.set()  # even if an assertion fails, let both calls end before the scope
            (session_a, id_a), (session_b, id_b) = await asyncio.wait_for(both, TIMEOUT)
        assert checked_out_at_barrier == 2
        assert open_at_barrier == (0 if backend.kind == "sqlite" else 2)
        assert committed_at_barrier == []
        assert session_a is not session_b
        assert caller is not session_a
        assert caller is not session_b
        assert id_a != id_b
        assert await db.session() is caller
        # Each committed its own work when it returned, before the caller's scope ends.
        assert await backend.names() == ["a", "b"]
        assert db.engine.pool.checkedout() == 0
    await assert_clean(backend, db, ["a", "b"])


async def test_failing_run_isolated_rolls_back_only_its_own_work(backend: Backend) -> None:
    db = backend.database()
    barrier = Rendezvous(2)
    failed = asyncio.Event()
    serial_writes = backend.kind == "sqlite"  # one writer at a time (see the test above)

    async def succeeds() -> str:
        session = await db.session()
        if serial_writes:
            await session.execute(text("SELECT count(*) FROM items"))
        else:
            await insert(session, "kept")
        await barrier.wait()
        if serial_writes:
            await failed.wait()  # the failing call has rolled back and released the lock
            await insert(session, "kept")
        return "ok"

    async def fails() -> str:
        session = await db.session()
        await insert(session, "discarded")
        await barrier.wait()
        raise Boom

    async def fails_then_signal() -> str:
        try:
            return await run_isolated(fails)
        finally:
            failed.set()

    async with scope():
        results = await asyncio.wait_for(
            asyncio.gather(run_isolated(succeeds), fails_then_signal(), return_exceptions=True),
            TIMEOUT,
        )
        assert results[0] == "ok"
        assert isinstance(results[1], Boom)
        assert await backend.names() == ["kept"]
        assert db.engine.pool.checkedout() == 0
        # The caller's scope is unaffected by the failure and commits its own work.
        await insert(await db.session(), "caller")
    await assert_clean(backend, db, ["caller", "kept"])


async def test_run_isolated_neither_sees_nor_commits_the_callers_work(backend: Backend) -> None:
    db = backend.database()

    async def peek() -> tuple[AsyncSession, list[str]]:
        session = await db.session()
        rows = await session.execute(text("SELECT name FROM items"))
        return session, [row[0] for row in rows]

    async with scope():
        caller = await db.session()
        await insert(caller, "caller")
        inner, seen = await asyncio.wait_for(run_isolated(peek), TIMEOUT)
        assert inner is not caller
        assert seen == [], "run_isolated() must not see the caller's uncommitted row"
        assert await backend.names() == [], "run_isolated() must not commit the caller's work"
        assert caller.in_transaction()
        assert db.engine.pool.checkedout() == 1  # only the caller's connection
        assert await db.session() is caller
    await assert_clean(backend, db, ["caller"])


async def test_run_isolated_work_survives_the_callers_rollback(backend: Backend) -> None:
    db = backend.database()

    async def write() -> None:
        await insert(await db.session(), "isolated")

    async def caller() -> None:
        async with scope():
            await asyncio.wait_for(run_isolated(write), TIMEOUT)
            # Written after the isolated call: SQLite allows one writer at a time.
            await insert(await db.session(), "caller")
            raise Boom

    with pytest.raises(Boom):
        await caller()
    await assert_clean(backend, db, ["isolated"])


# -- engine creation ---------------------------------------------------------------------------


async def test_engine_is_created_once_when_tasks_and_threads_race(backend: Backend) -> None:
    created: list[AsyncEngine] = []
    created_lock = threading.Lock()

    def factory() -> AsyncEngine:
        # Widen the window in which the other racers arrive; the assertions below do not
        # depend on it (a late racer simply finds the engine made).
        time.sleep(0.02)
        engine = create_async_engine(backend.url)
        with created_lock:
            created.append(engine)
        return engine

    db = Database(engine_factory=factory)
    backend.databases.append(db)  # disposed and checked for leaks at teardown
    threads = 8
    start = threading.Barrier(threads + 1)

    def from_thread() -> AsyncEngine:
        start.wait(TIMEOUT)
        return db.engine

    async def from_task() -> tuple[object, int]:
        async with scope():
            session = await db.session()
            return session.bind, (await session.execute(text("SELECT 1"))).scalar_one()

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(threads) as pool:
        from_threads = [loop.run_in_executor(pool, from_thread) for _ in range(threads)]
        start.wait(TIMEOUT)  # the event loop is the last party: all racers start together
        from_loop = db.engine
        tasks = [asyncio.create_task(from_task()) for _ in range(50)]
        thread_engines = await asyncio.wait_for(asyncio.gather(*from_threads), TIMEOUT)
        task_results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    assert len(created) == 1
    engine = created[0]
    assert from_loop is engine
    assert all(e is engine for e in thread_engines)
    assert all(bind is engine and one == 1 for bind, one in task_results)
    assert db.engine is engine
    assert engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_sessionmaker_first_used_in_a_thread_while_another_disposes(
    sqlite: Backend,
) -> None:
    """``db.sessionmaker`` must not fail when dispose() runs while it creates the engine.

    An app shutting down while a TestClient thread makes its first request: the engine is
    made, and read back, under the Database's lock, so a dispose() in between cannot leave
    the thread with nothing. Many rounds, each a thread's first use racing a dispose().
    """
    db = Database(sqlite.url)
    sqlite.databases.append(db)
    results: list[object] = []

    def first_use() -> None:
        try:
            results.append(db.sessionmaker)
        except BaseException as exc:  # reported below, not lost in the thread
            results.append(exc)

    for _ in range(50):
        await db.dispose()
        thread = threading.Thread(target=first_use, name="first-use")
        thread.start()
        await db.dispose()
        await asyncio.to_thread(thread.join, TIMEOUT)
        assert not thread.is_alive()
    assert len(results) == 50
    failures = [r for r in results if not isinstance(r, async_sessionmaker)]
    assert failures == [], f"first use failed: {failures[:3]!r}"
