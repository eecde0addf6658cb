"""Network faults between the driver and the server: cut and stalled connections.

Each test points a ``Database`` at a ``FaultProxy`` in front of the real server (PostgreSQL
through asyncpg and psycopg, MariaDB through asyncmy), breaks the connection at a chosen
moment (mid-statement, at COMMIT) and asserts the outcome docs/concepts.md documents
("Cancellation", "Failed commits and several databases"), through the backend's own
witness engine: what is committed, no connection checked out, no transaction left open on
the server, and the next scope on the same ``Database`` works. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import CommitError, Database, scope

from .conftest import BACKENDS, Backend, insert
from .faultproxy import COMMIT, FaultProxy, fault_proxy

#: How long the drivers themselves wait, on a cancellation, for a connection that the
#: proxy holds stalled, before they give it up (measured: asyncpg 2.5 s, psycopg 5.5 s,
#: including the 0.5 s timeout of the test):
#: - asyncpg: SQLAlchemy closes an invalidated asyncpg connection gracefully first,
#:   ``close(timeout=2)`` (sqlalchemy/dialects/postgresql/asyncpg.py), then terminates it;
#: - psycopg: sends a cancel request and waits up to 5 s for the cancelled query to end
#:   before it closes the connection (psycopg ``AsyncConnection.wait``, logged as "query not
#:   terminated after cancellation");
#: - asyncmy: closes at once.
DRIVER_GIVE_UP = {"asyncpg": 2.0, "psycopg": 5.0, "asyncmy": 0.0}

#: Margin over the drivers' own waits for a loaded machine (CI runs two workers on two
#: cores next to the database servers). A hang shows as the scope's own 30 s bound
#: (``_FINISH_TIMEOUT``), far above every limit below.
SLACK = 2.0

#: Bound of every wait in these tests: above the longest legitimate wait (psycopg's 5 s
#: plus the test's 0.5 s timeout plus SLACK), below the scope's 30 s clean-up bound, so a
#: hang fails here instead of being waited out. A test that needs it has found a hang.
BOUND = 10.0

SERVER_BACKENDS = [p for p in BACKENDS if p.id in ("pg-asyncpg", "pg-psycopg", "mariadb")]
pytestmark = [
    pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True),
    pytest.mark.timeout(60),
]


def slow_sql(backend: Backend, marker: str) -> str:
    """A statement that runs for 1 s on the server, recognisable by ``marker`` on the wire.

    Short on purpose: a server notices a vanished client only once the running statement
    ends (MariaDB's SLEEP does not poll the socket), and only then ends its transaction.
    """
    if backend.kind == "postgresql":
        return f"SELECT pg_sleep(1) AS {marker}"
    return f"SELECT SLEEP(1) AS {marker}"


@dataclass
class Faulty:
    """A real server behind a fault proxy, and a ``Database`` that goes through it."""

    backend: Backend
    proxy: FaultProxy
    db: Database

    async def unit(
        self, name: str, then: Callable[[AsyncSession], Awaitable[object]] | None = None
    ) -> None:
        """One scope: insert ``name``, then run ``then(session)``, then end the scope."""
        async with scope():
            session = await self.db.session()
            await insert(session, name)
            if then is not None:
                await then(session)

    def start(
        self, name: str, then: Callable[[AsyncSession], Awaitable[object]] | None = None
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self.unit(name, then))

    async def outcome(self, task: asyncio.Task[None]) -> BaseException | None:
        """Wait (bounded) for ``task`` and return how it ended."""
        (result,) = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), BOUND)
        return result  # type: ignore[no-any-return]

    async def assert_clean(self, rows: list[str]) -> None:
        """Nothing checked out, no transaction open on the server, exactly ``rows`` committed.

        The server is let finish first (``settle``): it ends the transaction of a client
        that vanished only once it notices, and a COMMIT it received is then done.
        """
        assert self.db.engine.pool.checkedout() == 0, "a connection is still checked out"
        transactions = await self.backend.open_transactions(settle=True)
        assert transactions == 0, "a transaction is left open"
        assert await self.backend.names() == rows

    async def assert_next_scope_works(self, rows: list[str]) -> None:
        await asyncio.wait_for(self.unit("next-scope"), BOUND)
        await self.assert_clean(sorted([*rows, "next-scope"]))


@pytest.fixture
async def faulty(backend: Backend) -> AsyncIterator[Faulty]:
    async with fault_proxy(backend.url) as proxy:
        db = Database(proxy.url(backend.url), engine_options={"pool_pre_ping": True})
        backend.databases.append(db)  # the backend's teardown checks it for leaks too
        yield Faulty(backend, proxy, db)


# -- cut connections ---------------------------------------------------------------------------


async def test_cut_mid_statement_fails_the_scope_and_commits_nothing(faulty: Faulty) -> None:
    faulty.proxy.arm(b"cut_here", "cut_after")  # the server has the statement when it is cut

    async def slow(session: AsyncSession) -> object:
        return await session.execute(text(slow_sql(faulty.backend, "cut_here")))

    result = await faulty.outcome(faulty.start("lost", slow))
    assert faulty.proxy.triggered.is_set()
    # The driver's error comes out of the body as is; the scope rolled back (the rollback
    # itself fails on the dead connection, which is then discarded).
    assert isinstance(result, DBAPIError), repr(result)
    assert result.connection_invalidated, "the broken connection was not discarded"
    await faulty.assert_clean([])
    await faulty.assert_next_scope_works([])


async def test_cut_at_commit_raises_commit_error_and_leaks_nothing(faulty: Faulty) -> None:
    async def arm(session: AsyncSession) -> None:
        faulty.proxy.arm(COMMIT, "cut")  # the next COMMIT never reaches the server

    result = await faulty.outcome(faulty.start("never-committed", arm))
    assert faulty.proxy.triggered.is_set(), "no COMMIT went through the proxy"
    assert isinstance(result, CommitError), repr(result)
    assert (result.failed, result.committed, result.rolled_back) == (
        faulty.db.name,
        [],
        [faulty.db.name],
    )
    assert isinstance(result.__cause__, DBAPIError), repr(result.__cause__)
    await faulty.assert_clean([])
    await faulty.assert_next_scope_works([])


# -- stalled connections -----------------------------------------------------------------------


async def stall_commit(faulty: Faulty, name: str, action: str = "stall") -> asyncio.Task[None]:
    """Start a scope writing ``name`` whose COMMIT the proxy holds (``action``); wait for it.

    ``"stall"``: held before the server sees it; ``"stall_after"``: the server has it (and
    commits), its answer is held.
    """

    async def arm(session: AsyncSession) -> None:
        faulty.proxy.arm(COMMIT, action)

    task = faulty.start(name, arm)
    await asyncio.wait_for(faulty.proxy.triggered.wait(), BOUND)
    return task


async def test_stall_at_commit_then_cut_raises_commit_error(faulty: Faulty) -> None:
    task = await stall_commit(faulty, "stalled")
    # The COMMIT is held before the server: its transaction is still open there, so the
    # scope cannot have ended (no timed wait needed to see that nothing came back).
    assert await faulty.backend.open_transactions() == 1
    assert not task.done(), "the scope ended while its COMMIT was held by the proxy"
    faulty.proxy.cut()
    result = await faulty.outcome(task)
    assert isinstance(result, CommitError), repr(result)
    await faulty.assert_clean([])
    await faulty.assert_next_scope_works([])


async def test_stall_at_commit_then_resume_commits(faulty: Faulty) -> None:
    task = await stall_commit(faulty, "late-but-committed")
    assert await faulty.backend.open_transactions() == 1
    assert not task.done()
    faulty.proxy.resume()
    assert await faulty.outcome(task) is None
    await faulty.assert_clean(["late-but-committed"])
    await faulty.assert_next_scope_works(["late-but-committed"])


# -- cancellation while the network holds a statement ------------------------------------------


async def cancel_bounded(faulty: Faulty, task: asyncio.Task[None], *, after: float) -> None:
    """Wait until ``task`` (cancelled by a timeout of ``after`` s, or to be cancelled now if
    ``after`` is 0) has ended, and check that it took no longer than the driver's own wait
    for a stalled connection allows. The proxy keeps the connection stalled meanwhile: the
    scope cannot roll back over it and must discard it."""
    started = time.monotonic()
    if not after:
        task.cancel()
    done, _ = await asyncio.wait({task}, timeout=BOUND)
    elapsed = time.monotonic() - started
    assert done, f"the cancelled scope had not ended after {BOUND} s"
    limit = after + DRIVER_GIVE_UP[faulty.backend.driver] + SLACK
    assert elapsed < limit, f"the cancellation took {elapsed:.1f} s to come out (limit {limit})"
    # Discarded, not returned to the pool in an unknown state, before the task ended.
    assert faulty.db.engine.pool.checkedout() == 0, "the stalled connection is still checked out"


async def test_cancel_during_a_stalled_statement_is_bounded_and_leaks_nothing(
    faulty: Faulty,
) -> None:
    """asyncio.wait_for() cancels a scope whose statement hangs in the network.

    The cancellation must come out within a bounded time although the connection can
    no longer carry a ROLLBACK, and the connection must be discarded, not returned to
    the pool or leaked.
    """
    faulty.proxy.arm(b"stall_here", "stall_after")

    async def slow(session: AsyncSession) -> object:
        return await session.execute(text(slow_sql(faulty.backend, "stall_here")))

    timeout = 0.5
    task = asyncio.create_task(asyncio.wait_for(faulty.unit("rolled-back", slow), timeout))
    try:
        await cancel_bounded(faulty, task, after=timeout)
        assert faulty.proxy.triggered.is_set()
        assert isinstance(task.exception(), asyncio.TimeoutError), repr(task.exception())
    finally:
        faulty.proxy.cut()  # drop the stalled connection so the server ends its transaction
    await faulty.assert_clean([])
    await faulty.assert_next_scope_works([])


async def test_cancel_while_the_commit_is_held_before_the_server_commits_nothing(
    faulty: Faulty,
) -> None:
    """Cancelled while its COMMIT is in flight (held before the server): the server never
    sees the COMMIT, so nothing is committed; the task ends cancelled, the connection is
    discarded (docs/concepts.md, "Cancellation")."""
    task = await stall_commit(faulty, "never-committed", "stall")
    try:
        await cancel_bounded(faulty, task, after=0)
        assert task.cancelled(), repr(task)
    finally:
        faulty.proxy.cut()
    await faulty.assert_clean([])
    await faulty.assert_next_scope_works([])


async def test_cancel_while_the_commit_answer_is_held_keeps_what_the_server_committed(
    faulty: Faulty,
) -> None:
    """Cancelled while its COMMIT is in flight (the server has it, its answer is held): the
    server commits; the task still ends cancelled, so no success is reported, and the
    connection is discarded, never returned to the pool (docs/concepts.md, "Cancellation":
    "the server decides")."""
    task = await stall_commit(faulty, "committed-by-the-server", "stall_after")
    try:
        await cancel_bounded(faulty, task, after=0)
        assert task.cancelled(), repr(task)
    finally:
        faulty.proxy.cut()
    await faulty.assert_clean(["committed-by-the-server"])
    await faulty.assert_next_scope_works(["committed-by-the-server"])
