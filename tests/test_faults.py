"""Network faults between the driver and the server: cut and stalled connections.

Each test points a ``Database`` at a ``FaultProxy`` in front of the real server (PostgreSQL
through asyncpg and psycopg, MariaDB through asyncmy), breaks the connection at a chosen
moment (mid-statement, at COMMIT) and asserts through the backend's own witness engine:
nothing committed that should not be, no connection checked out, no transaction left open
on the server, and the next scope on the same ``Database`` works. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from sqla_context import CommitError, Database, scope

from .conftest import BACKENDS, Backend, insert
from .faultproxy import COMMIT, FaultProxy, fault_proxy

#: Bound of every wait in these tests; a test that needs it has found a hang.
BOUND = 10.0

SERVER_BACKENDS = [p for p in BACKENDS if p.id in ("pg-asyncpg", "pg-psycopg", "mariadb")]
pytestmark = [
    pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True),
    pytest.mark.timeout(30),
]


def slow_sql(backend: Backend, marker: str) -> str:
    """A statement that runs for 1 s on the server, recognisable by ``marker`` on the wire.

    Short on purpose: a server notices a vanished client only once the running statement
    ends (MariaDB's SLEEP does not poll the socket), and only then ends its transaction.
    """
    if backend.kind == "postgresql":
        return f"SELECT pg_sleep(1) AS {marker}"
    return f"SELECT SLEEP(1) AS {marker}"


@pytest.fixture
async def proxy(backend: Backend) -> AsyncIterator[FaultProxy]:
    async with fault_proxy(backend.url) as p:
        yield p


def proxied(backend: Backend, proxy: FaultProxy) -> Database:
    db = Database(proxy.url(backend.url), engine_options={"pool_pre_ping": True})
    backend.databases.append(db)  # the backend's teardown checks it for leaks too
    return db


async def assert_clean(backend: Backend, db: Database, rows: list[str]) -> None:
    assert await backend.names() == rows
    assert db.engine.pool.checkedout() == 0, "a connection is still checked out"
    assert await backend.open_transactions(settle=True) == 0, "a transaction is left open"


async def assert_next_scope_works(backend: Backend, db: Database, rows: list[str]) -> None:
    async def next_scope() -> None:
        async with scope():
            await insert(await db.session(), "next-scope")

    await asyncio.wait_for(next_scope(), BOUND)
    await assert_clean(backend, db, sorted([*rows, "next-scope"]))


async def test_cut_mid_statement_fails_the_scope_and_commits_nothing(
    backend: Backend, proxy: FaultProxy
) -> None:
    db = proxied(backend, proxy)
    proxy.arm(b"cut_here", "cut_after")  # the server is running the statement when it is cut

    async def body() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "lost")
            await session.execute(text(slow_sql(backend, "cut_here")))

    with pytest.raises(Exception) as info:  # noqa: PT011 - each driver raises its own error
        await asyncio.wait_for(body(), BOUND)
    assert proxy.triggered.is_set()
    assert not isinstance(info.value, asyncio.TimeoutError), "the cut went unnoticed"
    await assert_clean(backend, db, [])
    await assert_next_scope_works(backend, db, [])


async def test_cut_at_commit_raises_commit_error_and_leaks_nothing(
    backend: Backend, proxy: FaultProxy
) -> None:
    db = proxied(backend, proxy)

    async def body() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "never-committed")
            proxy.arm(COMMIT, "cut")  # the COMMIT never reaches the server

    with pytest.raises(CommitError):
        await asyncio.wait_for(body(), BOUND)
    assert proxy.triggered.is_set(), "no COMMIT went through the proxy"
    await assert_clean(backend, db, [])
    await assert_next_scope_works(backend, db, [])


async def test_stall_at_commit_then_cut_raises_commit_error(
    backend: Backend, proxy: FaultProxy
) -> None:
    db = proxied(backend, proxy)

    async def body() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "stalled")
            proxy.arm(COMMIT, "stall")

    task = asyncio.create_task(body())
    await asyncio.wait_for(proxy.triggered.wait(), BOUND)
    await asyncio.sleep(0.2)  # a real stall: nothing may come back meanwhile
    assert not task.done(), "the scope ended while its COMMIT was held by the proxy"
    proxy.cut()
    (result,) = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), BOUND)
    assert isinstance(result, CommitError), repr(result)
    await assert_clean(backend, db, [])
    await assert_next_scope_works(backend, db, [])


async def test_stall_at_commit_then_resume_commits(backend: Backend, proxy: FaultProxy) -> None:
    db = proxied(backend, proxy)

    async def body() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "late-but-committed")
            proxy.arm(COMMIT, "stall")

    task = asyncio.create_task(body())
    await asyncio.wait_for(proxy.triggered.wait(), BOUND)
    assert not task.done()
    proxy.resume()
    await asyncio.wait_for(task, BOUND)
    await assert_clean(backend, db, ["late-but-committed"])


async def test_cancel_during_a_stalled_statement_is_bounded_and_leaks_nothing(
    backend: Backend, proxy: FaultProxy
) -> None:
    """asyncio.timeout() cancels a scope whose statement hangs in the network.

    The cancellation must come out within a bounded time although the connection can
    no longer carry a ROLLBACK, and the connection must be discarded, not returned to
    the pool or leaked.
    """
    db = proxied(backend, proxy)
    proxy.arm(b"stall_here", "stall_after")

    async def body() -> None:
        async with scope():
            session = await db.session()
            await insert(session, "rolled-back")
            await session.execute(text(slow_sql(backend, "stall_here")))

    task = asyncio.create_task(asyncio.wait_for(body(), 0.5))  # the timeout under test
    started = time.monotonic()
    try:
        done, _ = await asyncio.wait({task}, timeout=BOUND)
        elapsed = time.monotonic() - started
        assert done, f"the cancelled scope had not ended after {BOUND} s"
        assert proxy.triggered.is_set()
        assert isinstance(task.exception(), asyncio.TimeoutError), repr(task.exception())
        # psycopg answers a cancellation by sending a cancel request and waiting for the
        # stalled connection up to its own 5 s cancel timeout (the driver's behaviour, logged
        # by psycopg as "query cancellation failed"); the others give up at once.
        limit = 3.0 + (5.0 if backend.driver == "psycopg" else 0.0)
        assert elapsed < limit, f"the cancellation took {elapsed:.1f} s to propagate"
        assert db.engine.pool.checkedout() == 0, "the stalled connection is still checked out"
    finally:
        proxy.resume()
        proxy.cut()  # drop the stalled connection so the server ends its transaction
        if not task.done():
            await asyncio.wait({task}, timeout=BOUND)
    await assert_clean(backend, db, [])
    await assert_next_scope_works(backend, db, [])
