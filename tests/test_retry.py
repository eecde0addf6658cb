"""Retried units of work: real serialization failures and deadlocks, counted attempts.

Conflicts are provoked for real on the servers: SERIALIZABLE write skew between two
concurrent units on PostgreSQL (both drivers), rows locked in opposite order on PostgreSQL
and MariaDB, lock waits that time out. The units are coordinated with asyncio.Event, so the
interleaving is the same on every run. An injected error (a genuine SQLAlchemy
``OperationalError`` wrapping a driver error with SQLSTATE 40001) is used only where the
origin of the failure does not matter: the hypothesis test over failure sequences, the
cancellation during the backoff, validation.

Every test checks the database afterwards through the backend's witness engine: rows, no
connection checked out, no transaction left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Integer, String, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import (
    CommitError,
    ConfigurationError,
    Database,
    NestedScopeError,
    Retry,
    RetryError,
    is_retryable,
    on_commit,
    run_isolated,
    scope,
)
from sqla_context import testing as sqla_testing

from .conftest import BACKENDS, Backend, insert

PG = [p for p in BACKENDS if p.id in ("pg-asyncpg", "pg-psycopg")]
SERVERS = [p for p in BACKENDS if p.id != "sqlite"]
WAIT = 10.0  # bound of every wait on an event


class Base(DeclarativeBase):
    pass


class Doctor(Base):
    __tablename__ = "doctors"
    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    on_call: Mapped[int] = mapped_column(Integer)


class _DriverError(Exception):
    """Stands for a driver's exception carrying a SQLSTATE (as asyncpg's and psycopg's do)."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def serialization_failure() -> OperationalError:
    """What SQLAlchemy raises for a serialization failure, with an injected driver error."""
    orig = _DriverError("could not serialize access due to concurrent update", "40001")
    return OperationalError("UPDATE t SET x = 1", {}, orig)


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


async def settled(backend: Backend, *dbs: Database) -> None:
    """No connection checked out, no transaction open on the server."""
    for db in dbs:
        if db._engine is not None:
            assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions(settle=True) == 0


@pytest.fixture(autouse=True)
def _no_testing_mode() -> Any:
    with sqla_testing.set_retry_testing(False):
        yield


async def make_doctors(backend: Backend) -> None:
    async with backend.witness.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS doctors"))
        await conn.execute(
            text("CREATE TABLE doctors (name VARCHAR(20) PRIMARY KEY, on_call INTEGER)")
        )
        await conn.execute(text("INSERT INTO doctors VALUES ('alice', 1), ('bob', 1)"))


async def doctors(backend: Backend) -> dict[str, int]:
    async with backend.witness.connect() as conn:
        rows = await conn.execute(text("SELECT name, on_call FROM doctors"))
        return {name: on_call for name, on_call in rows}


# -- write skew under SERIALIZABLE (PostgreSQL) -------------------------------------------------


class WriteSkew:
    """Two units, each taking its doctor off call if the other is still on call.

    Run alone, each is correct; run concurrently under SERIALIZABLE, both read "2 on call",
    and PostgreSQL aborts the one that commits second (or writes after the first commit):
    retried, it reads "1 on call" and leaves its doctor on call.
    """

    def __init__(self, db: Database, surface: str) -> None:
        self.db = db
        self.surface = surface
        self.read = {"alice": asyncio.Event(), "bob": asyncio.Event()}
        self.wrote = asyncio.Event()
        self.committed = asyncio.Event()
        self.attempts = {"alice": 0, "bob": 0}
        self.commits: list[tuple[str, int]] = []  # (unit, attempt) seen by after_commit

    def unit(self, name: str, nested: Any = "raise") -> Any:
        def after_commit(_session: AsyncSession) -> None:
            self.commits.append((name, self.attempts[name]))
            if name == "alice":
                self.committed.set()

        @scope(retry=Retry(attempts=3, backoff=0.001), after_commit=after_commit, nested=nested)
        async def leave(other: str) -> bool:
            self.attempts[name] += 1
            session = await self.db.session()
            count = select(func.count()).select_from(Doctor).where(Doctor.on_call == 1)
            on_call = await session.scalar(count)
            me = await session.get(Doctor, name)
            assert me is not None
            self.read[name].set()
            await wait(self.read[other])
            if name == "alice":  # the first to commit
                if on_call is not None and on_call >= 2:
                    me.on_call = 0
                    await session.flush()
                if self.surface == "commit":
                    await wait(self.wrote)
                return True
            # bob: conflicts with alice's committed write
            if self.surface != "commit":
                await wait(self.committed)
            if on_call is not None and on_call >= 2:
                me.on_call = 0
                if self.surface == "autoflush":
                    await session.scalar(count)  # autoflush sends the UPDATE
                else:
                    await session.flush()  # the UPDATE statement
            self.wrote.set()
            if self.surface == "commit":
                await wait(self.committed)
            return on_call is not None and on_call >= 2

        return leave


@pytest.mark.parametrize("backend", PG, indirect=True)
@pytest.mark.parametrize("surface", ["statement", "autoflush", "commit"])
async def test_write_skew_is_retried_until_consistent(
    backend: Backend, surface: str, caplog: pytest.LogCaptureFixture
) -> None:
    await make_doctors(backend)
    db = backend.database(engine_options={"isolation_level": "SERIALIZABLE"})
    skew = WriteSkew(db, surface)
    caplog.set_level(logging.WARNING, logger="sqla_context.retry")

    alice, bob = await asyncio.gather(skew.unit("alice")("bob"), skew.unit("bob")("alice"))

    assert (alice, bob) == (True, False)  # bob's retry saw alice off call
    assert skew.attempts == {"alice": 1, "bob": 2}
    assert await doctors(backend) == {"alice": 0, "bob": 1}
    # after_commit ran once per unit, for the attempt that committed; never for bob's first
    assert sorted(skew.commits) == [("alice", 1), ("bob", 2)]
    retries = [r for r in caplog.records if r.name == "sqla_context.retry"]
    assert len(retries) == 1
    assert "attempt 1/3" in retries[0].getMessage()
    assert "SQLSTATE 40001" in retries[0].getMessage()
    await settled(backend, db)


@pytest.mark.parametrize("backend", PG, indirect=True)
async def test_write_skew_without_retry_breaks_the_invariant_check(backend: Backend) -> None:
    """The same interleaving, unretried: bob's unit fails (the reason retries exist)."""
    await make_doctors(backend)
    db = backend.database(engine_options={"isolation_level": "SERIALIZABLE"})
    skew = WriteSkew(db, "commit")
    alice = skew.unit("alice")
    bob = skew.unit("bob")
    with sqla_testing.set_retry_testing(True):  # one attempt each
        results = await asyncio.gather(alice("bob"), bob("alice"), return_exceptions=True)
    assert results[0] is True
    assert isinstance(results[1], RetryError)
    assert results[1].attempts == 1
    assert isinstance(results[1].last, CommitError)
    assert is_retryable(results[1].last)
    assert results[1].__cause__ is results[1].last
    assert await doctors(backend) == {"alice": 0, "bob": 1}
    assert skew.commits == [("alice", 1)]
    await settled(backend, db)


# -- deadlocks (PostgreSQL and MariaDB) ---------------------------------------------------------


@pytest.mark.parametrize("backend", SERVERS, indirect=True)
async def test_deadlock_is_retried(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    async with backend.witness.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS counters"))
        await conn.execute(text("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER)"))
        await conn.execute(text("INSERT INTO counters VALUES (1, 0), (2, 0)"))
    db = backend.database()
    locked = {1: asyncio.Event(), 2: asyncio.Event()}
    attempts = {1: 0, 2: 0}
    commits: list[tuple[int, int]] = []
    caplog.set_level(logging.WARNING, logger="sqla_context.retry")
    bump = text("UPDATE counters SET n = n + 1 WHERE id = :id")

    def unit(first: int, second: int) -> Any:
        @scope(
            retry=Retry(attempts=4, backoff=0.001),
            after_commit=lambda _s: commits.append((first, attempts[first])),
        )
        async def transfer() -> None:
            attempts[first] += 1
            session = await db.session()
            if backend.kind == "postgresql":  # detect the deadlock after 50 ms, not 1 s
                await session.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
            await session.execute(bump, {"id": first})
            locked[first].set()
            await wait(locked[second])
            await session.execute(bump, {"id": second})

        return transfer

    await asyncio.gather(unit(1, 2)(), unit(2, 1)())

    assert sorted(attempts.values()) == [1, 2]  # one victim, retried once
    victim = 1 if attempts[1] == 2 else 2
    async with backend.witness.connect() as conn:
        rows = dict((await conn.execute(text("SELECT id, n FROM counters"))).all())
    assert rows == {1: 2, 2: 2}  # both transfers applied exactly once
    assert sorted(commits) == sorted([(victim, 2), (3 - victim, 1)])
    [record] = [r for r in caplog.records if r.name == "sqla_context.retry"]
    code = "SQLSTATE 40P01" if backend.kind == "postgresql" else "MySQL error 1213"
    assert code in record.getMessage()
    await settled(backend, db)


# -- lock waits that time out -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def row_locked(backend: Backend) -> AsyncIterator[Any]:
    """Hold a lock on the items row 'x' from the witness until the block ends (or release)."""
    async with backend.witness.connect() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('x')"))
        await conn.commit()
        await conn.execute(text("UPDATE items SET name = 'x' WHERE name = 'x'"))
        yield conn
        if conn.in_transaction():
            await conn.rollback()


async def set_short_lock_wait(session: AsyncSession, kind: str) -> None:
    if kind == "postgresql":
        await session.execute(text("SET LOCAL lock_timeout = '50ms'"))
    else:
        await session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))


@pytest.mark.parametrize("backend", SERVERS, indirect=True)
async def test_lock_timeout_is_not_retried_by_default(backend: Backend) -> None:
    db = backend.database()
    runs = 0

    @scope(retry=3)
    async def touch() -> None:
        nonlocal runs
        runs += 1
        session = await db.session()
        await set_short_lock_wait(session, backend.kind)
        await insert(session, "written")
        await session.execute(text("UPDATE items SET name = 'y' WHERE name = 'x'"))

    async with row_locked(backend):
        with pytest.raises(DBAPIError) as caught:  # asyncpg: not an OperationalError
            await touch()
    assert runs == 1
    assert not is_retryable(caught.value)
    assert is_retryable(caught.value, lock_timeouts=True)
    assert await backend.names() == ["x"]
    await settled(backend, db)


@pytest.mark.parametrize("backend", SERVERS, indirect=True)
async def test_lock_timeout_retried_when_asked(backend: Backend) -> None:
    db = backend.database()
    runs = 0
    seen: list[tuple[int, float]] = []

    async with row_locked(backend) as holder:

        async def release(attempt: int, exc: BaseException, delay: float) -> None:
            seen.append((attempt, delay))
            await holder.commit()  # the lock goes: the next attempt gets it

        @scope(retry=Retry(attempts=3, lock_timeouts=True, backoff=0.001, on_retry=release))
        async def touch() -> None:
            nonlocal runs
            runs += 1
            session = await db.session()
            await set_short_lock_wait(session, backend.kind)
            await insert(session, f"attempt {runs}")
            await session.execute(text("UPDATE items SET name = 'y' WHERE name = 'x'"))

        await touch()

    assert runs == 2
    assert [a for a, _ in seen] == [1]
    assert 0 <= seen[0][1] <= 0.001
    assert await backend.names() == ["attempt 2", "y"]  # attempt 1's insert rolled back
    await settled(backend, db)


@pytest.mark.parametrize("backend", PG, indirect=True)
async def test_exhausted_attempts_raise_retry_error_with_the_last_error(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    errors: list[BaseException] = []
    caplog.set_level(logging.WARNING, logger="sqla_context.retry")

    @scope(
        retry=Retry(
            attempts=3, backoff=0.001, lock_timeouts=True, on_retry=lambda a, e, d: errors.append(e)
        )
    )
    async def touch() -> None:
        session = await db.session()
        await set_short_lock_wait(session, backend.kind)
        await insert(session, "never")
        await session.execute(text("UPDATE items SET name = 'y' WHERE name = 'x'"))

    async with row_locked(backend):
        with pytest.raises(RetryError) as caught:
            await touch()
    assert caught.value.attempts == 3
    assert isinstance(caught.value.last, DBAPIError)
    assert caught.value.__cause__ is caught.value.last
    assert caught.value.last not in errors  # a fresh error per attempt; the last not retried
    assert len(errors) == 2
    assert "SQLSTATE 55P03" in str(caught.value)
    assert len([r for r in caplog.records if r.name == "sqla_context.retry"]) == 2
    assert await backend.names() == ["x"]
    await settled(backend, db)


# -- injected failures: where they surface, sequences, cancellation -----------------------------


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    failures=st.lists(st.sampled_from(["none", "before", "after", "commit"]), max_size=6),
    attempts=st.integers(min_value=1, max_value=5),
)
async def test_failure_sequences(backend: Backend, failures: list[str], attempts: int) -> None:
    """Attempt n fails as ``failures[n-1]`` says (before/after its insert, at COMMIT)."""
    async with backend.witness.begin() as conn:
        await conn.execute(text("DELETE FROM items"))
    db = backend.database()
    runs = 0
    committed: list[int] = []

    def fail_at_commit(_session: AsyncSession) -> None:
        if failures[runs - 1 : runs] == ["commit"]:
            raise serialization_failure()

    @scope(
        retry=Retry(attempts=attempts, backoff=0),
        before_commit=fail_at_commit,
        after_commit=lambda _s: committed.append(runs),
    )
    async def work() -> int:
        nonlocal runs
        runs += 1
        mode = failures[runs - 1] if runs <= len(failures) else "none"
        session = await db.session()
        if mode == "before":
            raise serialization_failure()
        await insert(session, f"run {runs}")
        if mode == "after":
            raise serialization_failure()
        return runs

    first_success = next(
        (i + 1 for i, mode in enumerate(failures) if mode == "none"), len(failures) + 1
    )
    if first_success <= attempts:
        assert await work() == first_success
        assert await backend.names() == [f"run {first_success}"]
        assert committed == [first_success]
    else:
        with pytest.raises(RetryError) as caught:
            await work()
        assert caught.value.attempts == attempts
        assert is_retryable(caught.value.last)
        assert await backend.names() == []
        assert committed == []
    assert runs == min(first_success, attempts)
    await db.dispose()
    await settled(backend, db)


async def test_cancellation_during_the_backoff_leaves_nothing_open(backend: Backend) -> None:
    db = backend.database()
    waiting = asyncio.Event()
    runs = 0

    @scope(retry=Retry(backoff=30, max_backoff=30, jitter=False, on_retry=lambda *_: waiting.set()))
    async def work() -> None:
        nonlocal runs
        runs += 1
        session = await db.session()
        await insert(session, "rolled back")
        raise serialization_failure()

    task = asyncio.create_task(work())
    await wait(waiting)
    assert db.engine.pool.checkedout() == 0  # the failed attempt ended before the wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == 1
    assert await backend.names() == []
    await settled(backend, db)


async def test_non_retryable_errors_propagate_after_one_attempt(backend: Backend) -> None:
    db = backend.database()
    runs = 0

    @scope(retry=5)
    async def work() -> None:
        nonlocal runs
        runs += 1
        session = await db.session()
        await insert(session, "dup")
        await insert(session, "dup")

    with pytest.raises(IntegrityError):
        await work()
    assert runs == 1
    assert await backend.names() == []
    await settled(backend, db)


async def test_custom_predicate_adds_retryable_errors(sqlite: Backend) -> None:
    db = sqlite.database()
    runs = 0

    class Flaky(Exception):
        pass

    @scope(retry=Retry(backoff=0, on=lambda exc: isinstance(exc, Flaky)))
    async def work() -> int:
        nonlocal runs
        runs += 1
        await insert(await db.session(), f"run {runs}")
        if runs < 3:
            raise Flaky
        return runs

    assert await work() == 3
    assert await sqlite.names() == ["run 3"]
    await settled(sqlite, db)


async def test_partially_committed_units_are_not_retried(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A second database's COMMIT failing after the first committed: running again would
    repeat the first database's work, so the CommitError propagates."""
    other = await backend.sibling()
    db, db2 = backend.database(name="main"), other.database(name="other")
    runs = 0

    def fail_other(session: AsyncSession) -> None:
        if session.bind is not None and session.bind.url.database == db2.engine.url.database:
            raise serialization_failure()

    @scope(retry=5, before_commit=fail_other)
    async def work() -> None:
        nonlocal runs
        runs += 1
        await insert(await db.session(), "main")
        await insert(await db2.session(), "other")

    with pytest.raises(CommitError) as caught:
        await work()
    assert runs == 1
    assert caught.value.committed == ["main"]
    assert is_retryable(caught.value)  # retryable in itself, but not after a partial commit
    assert "not retried" in caplog.text
    assert await backend.names() == ["main"]
    assert await other.names() == []
    await settled(backend, db)
    await settled(other, db2)


# -- nesting, misuse, the testing switch --------------------------------------------------------


async def test_retried_function_inside_a_scope_raises(sqlite: Backend) -> None:
    db = sqlite.database()
    runs = 0

    @scope(retry=3)
    async def work() -> None:
        nonlocal runs
        runs += 1

    async with scope():
        await insert(await db.session(), "outer")
        with pytest.raises(NestedScopeError, match="outermost"):
            await work()
    assert runs == 0
    assert await sqlite.names() == ["outer"]
    await settled(sqlite, db)


async def test_retried_function_with_nested_new_retries_on_its_own(sqlite: Backend) -> None:
    db = sqlite.database()
    runs = 0

    @scope(retry=Retry(backoff=0), nested="new")
    async def work() -> None:
        nonlocal runs
        runs += 1
        await insert(await db.session(), f"inner {runs}")
        if runs == 1:
            raise serialization_failure()

    async with scope():
        await work()
        assert await sqlite.names() == ["inner 2"]  # committed on its own, before the outer
        await insert(await db.session(), "outer")
    assert runs == 2
    assert await sqlite.names() == ["inner 2", "outer"]
    await settled(sqlite, db)


async def test_run_isolated_retries(sqlite: Backend) -> None:
    db = sqlite.database()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await insert(await db.session(), f"run {runs}")
        if runs == 1:
            raise serialization_failure()
        return "done"

    async with scope():  # isolated runs are outermost units of their own
        assert await run_isolated(work, retry=Retry(backoff=0)) == "done"
    assert runs == 2
    assert await sqlite.names() == ["run 2"]
    with pytest.raises(RetryError):
        runs = 0
        await run_isolated(work, retry=1)
    assert await sqlite.names() == ["run 2"]
    await settled(sqlite, db)


async def test_run_isolated_without_retry_passes_keywords_through(sqlite: Backend) -> None:
    async def echo(*, value: int) -> int:
        return value

    assert await run_isolated(echo, value=3) == 3
    assert await run_isolated(lambda: echo(value=4), retry=None) == 4


async def test_async_with_retry_is_refused(sqlite: Backend) -> None:
    db = sqlite.database()
    with pytest.raises(ConfigurationError, match="cannot re-run its block"):
        async with scope(retry=3):
            await insert(await db.session(), "never")
    assert await sqlite.names() == []
    await settled(sqlite, db)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": 3, "nested": "reuse"}, "nested='reuse'"),
        ({"retry": 3, "commit": "always"}, "commit='always'"),
        ({"retry": "3"}, "number of attempts"),
        ({"retry": True}, "number of attempts"),
        ({"retry": 0}, "attempts=0"),
    ],
)
def test_bad_scope_retry_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        scope(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": 2.0},
        {"backoff": -1},
        {"max_backoff": -1},
        {"backoff": 2, "max_backoff": 1},
        {"jitter": 1},
        {"lock_timeouts": "yes"},
        {"on": 3},
        {"on_retry": "log"},
    ],
)
def test_bad_retry_values(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Retry(**options)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    fixed = Retry(backoff=0.1, max_backoff=0.5, jitter=False)
    assert [fixed.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    jittered = Retry(backoff=0.1, max_backoff=0.5)
    for n in range(1, 6):
        bound = min(0.5, 0.1 * 2 ** (n - 1))
        delays = [jittered.delay(n) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert len(set(delays)) > 1  # drawn, not fixed


def test_is_retryable_looks_only_at_database_errors() -> None:
    assert is_retryable(serialization_failure())
    deadlock = OperationalError("x", {}, _DriverError("deadlock detected", "40P01"))
    assert is_retryable(deadlock)
    mysql = OperationalError("x", {}, Exception(1213, "Deadlock found"))
    assert is_retryable(mysql)
    assert not is_retryable(OperationalError("x", {}, Exception(1205, "Lock wait timeout")))
    assert is_retryable(OperationalError("x", {}, Exception(1205, "Lock wait")), lock_timeouts=True)
    assert not is_retryable(ValueError(1213))  # not a DBAPI error: its args mean nothing
    assert not is_retryable(OperationalError("x", {}, _DriverError("unique", "23505")))
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = serialization_failure()
    assert is_retryable(wrapped)
    context_only = RuntimeError("raised while handling")
    context_only.__context__ = serialization_failure()
    assert not is_retryable(context_only)  # translated on purpose by the application


async def test_testing_switch(sqlite: Backend) -> None:
    db = sqlite.database()
    runs = 0
    delays: list[float] = []

    @scope(
        retry=Retry(
            attempts=3, backoff=10, max_backoff=10, on_retry=lambda a, e, d: delays.append(d)
        )
    )
    async def work() -> None:
        nonlocal runs
        runs += 1
        await db.session()
        raise serialization_failure()

    with sqla_testing.set_retry_testing(True):  # retries off
        with pytest.raises(RetryError) as caught:
            await work()
        assert (runs, caught.value.attempts, delays) == (1, 1, [])
        with sqla_testing.set_retry_testing(True, attempts=None):  # attempts kept, no waits
            runs = 0
            with pytest.raises(RetryError) as caught:
                await asyncio.wait_for(work(), WAIT)
            assert (runs, delays) == (3, [0.0, 0.0])
        runs, delays[:] = 0, []
        with pytest.raises(RetryError):
            await work()
        assert runs == 1  # restored to "retries off" by the inner block's end
    with pytest.raises(ConfigurationError):
        sqla_testing.set_retry_testing(True, attempts=0)
    await settled(sqlite, db)


# -- composing with the ASGI middleware ---------------------------------------------------------


@pytest.mark.parametrize("backend", PG, indirect=True)
@pytest.mark.parametrize("form", ["run_isolated", "nested_new"])
async def test_fastapi_handler_retries_its_business_function(backend: Backend, form: str) -> None:
    """The documented pattern: the request's scope is never retried; the handler runs the
    conflicting business function as an isolated, retried unit. Real write skew."""
    from fastapi import FastAPI

    from sqla_context.asgi import SessionMiddleware

    await make_doctors(backend)
    db = backend.database(engine_options={"isolation_level": "SERIALIZABLE"})
    skew = WriteSkew(db, "commit")
    bob = skew.unit("bob", nested="new")
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/leave/{name}")
    async def leave(name: str) -> dict[str, Any]:
        await insert(await db.session(), f"request {name}")  # the request's own unit
        # A request scope is active: the business function runs as an independent unit
        # of its own, which is retried (with nested="raise" it would raise instead).
        if form == "run_isolated":
            business = functools.partial(bob.__wrapped__, "alice")
            left = await run_isolated(business, retry=Retry(attempts=3, backoff=0.001))
        else:
            left = await bob("alice")
        return {"left": left, "attempts": skew.attempts[name]}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response, alice = await asyncio.gather(client.post("/leave/bob"), skew.unit("alice")("bob"))
    assert response.status_code == 200
    assert response.json() == {"left": False, "attempts": 2}
    assert alice is True
    assert await doctors(backend) == {"alice": 0, "bob": 1}
    assert await backend.names() == ["request bob"]  # the request's unit committed once
    if form == "nested_new":
        assert sorted(skew.commits) == [("alice", 1), ("bob", 2)]
    await settled(backend, db)


async def test_decorated_retry_inside_a_request_answers_500(sqlite: Backend) -> None:
    from fastapi import FastAPI

    from sqla_context.asgi import SessionMiddleware

    db = sqlite.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @scope(retry=3)
    async def business() -> None:
        await insert(await db.session(), "never")

    @app.post("/")
    async def handler() -> None:
        await insert(await db.session(), "request")
        await business()

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/")
    assert response.status_code == 500
    assert await sqlite.names() == []
    await settled(sqlite, db)


async def test_on_commit_callbacks_of_failed_attempts_never_run(backend: Backend) -> None:
    """Each attempt is a fresh unit: a failed attempt's on_commit() callbacks go with it."""
    db = backend.database()
    ran: list[int] = []
    attempts = 0

    @scope(retry=Retry(attempts=3, backoff=0.001))
    async def job() -> None:
        nonlocal attempts
        attempts += 1
        attempt = attempts
        await insert(await db.session(), f"attempt{attempt}")
        on_commit(lambda: ran.append(attempt))
        if attempt < 3:
            raise serialization_failure()

    await job()
    assert attempts == 3
    assert ran == [3]
    assert await backend.names() == ["attempt3"]
    await settled(backend, db)
