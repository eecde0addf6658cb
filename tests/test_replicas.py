"""Read-only Databases (every backend) and read routing on a real PostgreSQL hot standby.

The standby is the cluster ``scripts/standby.sh start`` creates (``.ci/run`` does it) on
port 5433, streaming from the test cluster. Its tests skip with the reason when it is not
reachable, unless SQLA_CONTEXT_REQUIRE_SERVERS=1. Every test that uses it holds a shared
lock on a file; the test that stops and restarts the standby holds it exclusively, so that
parallel workers never see the standby stopped by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sqla_context import (
    CommitError,
    ConfigurationError,
    Database,
    NoScopeError,
    ReadOnlyError,
    run_isolated,
    scope,
)
from sqla_context._replicas import may_write

from .conftest import PG_URL, PSYCOPG_URL, REQUIRE_SERVERS, Backend, Item, _run_url, _server_urls

ROOT = Path(__file__).resolve().parents[1]
STANDBY_URL = os.environ.get(
    "SQLA_CONTEXT_STANDBY_URL", "postgresql+asyncpg://postgres@127.0.0.1:5433/test"
)
LOCK_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "sqla_context_standby.lock"


def count_commits(db: Database) -> list[str]:
    """Every COMMIT and ROLLBACK ``db``'s current engine sends, in order."""
    sent: list[str] = []
    event.listen(db.engine.sync_engine, "commit", lambda conn: sent.append("commit"))
    event.listen(db.engine.sync_engine, "rollback", lambda conn: sent.append("rollback"))
    return sent


# -- read-only Databases, on every backend ----------------------------------------------------


async def test_a_write_through_a_read_only_database_fails_at_the_server(backend: Backend) -> None:
    ro = backend.database(read_only=True)
    with pytest.raises(DBAPIError) as raised:
        async with scope():
            await (await ro.session()).execute(text("INSERT INTO items (name) VALUES ('x')"))
    assert "read" in str(raised.value.orig).lower()  # "read-only transaction", "readonly"
    with pytest.raises(DBAPIError):
        async with scope():
            (await ro.session()).add(Item(name="orm"))
            await (await ro.session()).flush()
    assert await backend.names() == []


async def test_a_read_only_database_still_reads(backend: Backend) -> None:
    async with backend.witness.begin() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('there')"))
    ro = backend.database(read_only=True)
    async with scope():
        session = await ro.session()
        assert (await session.scalars(select(Item.name))).all() == ["there"]


async def test_read_only_holds_in_autocommit_mode(backend: Backend) -> None:
    # The access mode is the connection's default, not a per-transaction statement, so a
    # connection that never opens a transaction refuses writes too.
    ro = backend.database(read_only=True, engine_options={"isolation_level": "AUTOCOMMIT"})
    with pytest.raises(DBAPIError):
        async with scope():
            await (await ro.session()).execute(text("INSERT INTO items (name) VALUES ('x')"))
    assert await backend.names() == []


async def test_a_read_only_scope_rolls_back_a_changed_object_instead_of_committing(
    backend: Backend,
) -> None:
    # The FastAPI story: code changed an object loaded through the replica session.
    # Committing it would send the UPDATE to the replica; a read-only scope discards it.
    async with backend.witness.begin() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('old')"))
    ro = backend.database(read_only=True, session_options={"autoflush": False})
    sent = count_commits(ro)
    async with scope(commit="always"):
        session = await ro.session()
        item = (await session.scalars(select(Item))).one()
        item.name = "changed"
    assert "commit" not in sent
    assert sent == ["rollback"]
    assert item.name == "changed"  # still readable after the scope (expunged, not expired)
    assert await backend.names() == ["old"]


async def test_explicit_commits_on_a_read_only_database_raise(backend: Backend) -> None:
    hooks: list[str] = []
    ro = backend.database(
        read_only=True,
        before_commit=lambda s: hooks.append("before"),
        after_commit=lambda s: hooks.append("after"),
    )
    sent = count_commits(ro)
    with pytest.raises(ReadOnlyError, match="read-only database"):
        await ro.commit()  # also outside a scope: the mistake is in the code, not the state
    async with scope():
        session = await ro.session()
        await session.execute(select(Item.name))
        with pytest.raises(ReadOnlyError):
            await ro.commit()
        with pytest.raises(ReadOnlyError):
            await ro.close_session(commit=True)
        assert session.in_transaction()  # refused before touching the session
        await ro.close_session()  # the default ending: rolled back
        assert not session.in_transaction()
        async with ro.transaction() as block:  # a block ends with a rollback too
            await block.execute(select(Item.name))
        assert not block.in_transaction()
        async with ro.new_session(begin=True) as independent:
            await independent.execute(select(Item.name))
    assert hooks == []
    assert "commit" not in sent
    assert sent.count("rollback") == 3


async def test_a_failed_primary_commit_still_rolls_back_the_replica(backend: Backend) -> None:
    primary, ro = backend.database(name="primary"), backend.database(name="ro", read_only=True)
    sent = count_commits(ro)
    with pytest.raises(CommitError) as raised:
        async with scope():
            await (await ro.session()).execute(select(Item.name))
            await backend.doom(await primary.session())
    assert raised.value.committed == []
    assert sent == ["rollback"]
    assert "doomed" not in await backend.names()


async def test_configuration_errors(sqlite: Backend) -> None:
    url = sqlite.url
    writable = Database(url)
    ro = Database(url, read_only=True)
    with pytest.raises(ConfigurationError, match="not read-only"):
        Database(url, replicas=[writable])
    with pytest.raises(ConfigurationError, match="list of Database"):
        Database(url, replicas=ro)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Database"):
        Database(url, replicas=[url])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="twice"):
        Database(url, replicas=[ro, ro])
    with pytest.raises(ConfigurationError, match="replicas of its own"):
        Database(url, replicas=[Database(url, read_only=True, replicas=[ro])])
    with pytest.raises(ConfigurationError, match="replicas="):
        Database(url, read_from_primary=lambda db: True)
    with pytest.raises(ConfigurationError, match="callable"):
        Database(url, replicas=[ro], read_from_primary=True)  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(ConfigurationError, match="replica_retry"):
            Database(url, replicas=[ro], replica_retry=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="replicas"):
        writable.scope_wrote()
    primary = Database(url, replicas=[ro])
    assert primary.replicas == (ro,)
    assert ro.read_only
    assert not primary.read_only
    with pytest.raises(NoScopeError):
        primary.scope_wrote()
    with pytest.raises(NoScopeError):
        await primary.read_session()
    for db in (writable, ro, primary):
        await db.dispose()


async def test_without_replicas_read_session_is_session(sqlite: Backend) -> None:
    db = sqlite.database()
    async with scope():
        assert await db.read_session() is await db.session()


async def test_routing_on_sqlite_replica_files(sqlite: Backend) -> None:
    # No streaming replica on SQLite, but the routing is the same: a second file stands in.
    other = await sqlite.sibling()
    ro = other.database(read_only=True, name="replica")
    db = sqlite.database(replicas=[ro], name="primary")
    async with scope():
        assert await db.read_session() is await ro.session()
        assert not db.scope_wrote()
        (await db.session()).add(Item(name="p"))
        await (await db.session()).flush()
        assert db.scope_wrote()
        assert await db.read_session() is await db.session()
    assert await sqlite.names() == ["p"]
    assert await other.names() == []


@pytest.mark.parametrize(
    ("statement", "writes"),
    [
        ("SELECT 1", False),
        ("  select * from t", False),
        ("/* hint */ SELECT 1", False),
        ("-- comment\nSELECT 1", False),
        ("(SELECT 1) UNION (SELECT 2)", False),
        ("SHOW server_version", False),
        ("SAVEPOINT sa_savepoint_1", False),
        ("RELEASE SAVEPOINT sa_savepoint_1", False),
        ("ROLLBACK TO SAVEPOINT sa_savepoint_1", False),
        ("BEGIN", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", True),
        ("INSERT INTO t VALUES (1)", True),
        ("update t set a = 1", True),
        ("DELETE FROM t", True),
        ("CREATE TABLE t (a int)", True),
        ("SET LOCAL statement_timeout = 1", True),
        ("CALL proc()", True),
        ("", True),
    ],
)
def test_which_statements_count_as_writes(statement: str, writes: bool) -> None:
    assert may_write(statement) is writes


# -- routing on a real hot standby ------------------------------------------------------------


@contextlib.contextmanager
def standby_lock(exclusive: bool) -> Iterator[None]:
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


async def lsn_replayed(primary: AsyncEngine, standby: AsyncEngine, timeout: float = 30) -> None:
    """Wait, bounded, until the standby has replayed everything the primary wrote so far.

    Asks the standby's ``postgres`` database: the test database may not be there yet.
    """
    async with primary.connect() as conn:
        lsn = (await conn.execute(text("SELECT pg_current_wal_lsn()::text"))).scalar_one()
    admin = create_async_engine(standby.url.set(database="postgres"))
    query = text("SELECT pg_last_wal_replay_lsn() >= CAST(CAST(:lsn AS TEXT) AS pg_lsn)")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    try:
        async with admin.connect() as conn:
            while not (await conn.execute(query, {"lsn": lsn})).scalar_one():
                if loop.time() > deadline:
                    raise AssertionError(f"the standby did not replay {lsn} within {timeout}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
    finally:
        await admin.dispose()


@dataclass
class Standby:
    primary: Backend  # the per-process test database on the primary
    replica: Backend  # the same database as the standby serves it (read-only witness)

    async def replayed(self) -> None:
        await lsn_replayed(self.primary.witness, self.replica.witness)

    def dbs(self, **primary_options: Any) -> tuple[Database, Database]:
        replica = self.replica.database(
            name="standby", read_only=True, engine_options={"pool_pre_ping": True}
        )
        primary = self.primary.database(name="primary", replicas=[replica], **primary_options)
        return primary, replica


async def in_recovery(session: AsyncSession) -> bool:
    return bool((await session.execute(text("SELECT pg_is_in_recovery()"))).scalar_one())


async def _standby(request: pytest.FixtureRequest, exclusive: bool) -> AsyncIterator[Standby]:
    # The lock is taken before the probe: the test that stops the standby holds it exclusively,
    # and a probe made while it holds it would find the standby down.
    with standby_lock(exclusive):
        async for sb in _locked_standby(request):
            yield sb


async def _locked_standby(request: pytest.FixtureRequest) -> AsyncIterator[Standby]:
    base = PG_URL if request.param == "asyncpg" else PSYCOPG_URL
    standby_base = STANDBY_URL.replace("+asyncpg", f"+{request.param}")
    probe = create_async_engine(standby_base)

    async def is_standby() -> bool:
        async with probe.connect() as conn:
            return bool((await conn.execute(text("SELECT pg_is_in_recovery()"))).scalar_one())

    try:
        if not await asyncio.wait_for(is_standby(), 10):
            pytest.fail(f"{standby_base} is not a standby (pg_is_in_recovery() is false)")
    except (TimeoutError, DBAPIError, OSError) as exc:
        reason = (
            f"the standby {standby_base} is unreachable ({type(exc).__name__}: {exc}); "
            "start it with scripts/standby.sh start"
        )
        if REQUIRE_SERVERS:
            pytest.fail(f"SQLA_CONTEXT_REQUIRE_SERVERS is set but {reason}")
        pytest.skip(reason)
    finally:
        await probe.dispose()
    _server_urls.add(base)
    primary_url = await _run_url(base)  # this process's database, replicated to the standby
    database = primary_url.rsplit("/", 1)[1]
    replica_url = standby_base.rsplit("/", 1)[0] + "/" + database
    primary = Backend("postgresql", primary_url, request.param)
    replica = Backend("postgresql", replica_url, request.param)
    await primary.setup()
    try:
        sb = Standby(primary, replica)
        await sb.replayed()
        yield sb
    finally:
        try:
            await replica.teardown()
        finally:
            await primary.teardown()


@pytest.fixture(params=["asyncpg", "psycopg"])
async def standby(request: pytest.FixtureRequest) -> AsyncIterator[Standby]:
    async for sb in _standby(request, exclusive=False):
        yield sb


async def test_reads_go_to_the_standby(standby: Standby) -> None:
    async with standby.primary.witness.begin() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('replicated')"))
    await standby.replayed()
    db, replica = standby.dbs()
    async with scope():
        session = await db.read_session()
        assert session is await replica.session()
        assert session is not await db.session()
        assert await in_recovery(session)
        assert (await session.scalars(select(Item.name))).all() == ["replicated"]
        assert await db.read_session() is session  # sticky within the scope
        assert not db.scope_wrote()
    assert replica.engine.pool.checkedout() == 0


@pytest.mark.parametrize("how", ["orm-flush", "core-insert", "text", "new_session"])
async def test_a_write_makes_the_rest_of_the_scope_read_from_the_primary(
    standby: Standby, how: str
) -> None:
    db, _ = standby.dbs()
    async with scope():
        first = await db.read_session()
        assert await in_recovery(first)
        assert (await first.scalars(select(Item.name))).all() == []
        # A read through the primary's session is no write: reads still go to the standby.
        await (await db.session()).execute(select(Item.name))
        assert await db.read_session() is first
        writer = await db.session()
        if how == "orm-flush":
            writer.add(Item(name="mine"))
            await writer.flush()
        elif how == "core-insert":
            await writer.execute(insert(Item).values(name="mine"))
        elif how == "text":
            await writer.execute(text("INSERT INTO items (name) VALUES ('mine')"))
        else:
            async with db.new_session(begin=True) as independent:
                await independent.execute(insert(Item).values(name="mine"))
        assert db.scope_wrote()
        after = await db.read_session()
        assert after is writer
        assert not await in_recovery(after)
        assert (await after.scalars(select(Item.name))).all() == ["mine"]  # read your writes
        assert await db.read_session() is writer
        # The replica's session lives on; it cannot see what the scope has not committed.
        # (new_session() committed already, and the standby may have replayed it.)
        if how != "new_session":
            assert (await first.scalars(select(Item.name))).all() == []
    assert await standby.primary.names() == ["mine"]
    await standby.replayed()
    assert await standby.replica.names() == ["mine"]


async def test_a_write_before_the_first_read_skips_the_replica(standby: Standby) -> None:
    db, replica = standby.dbs()
    async with scope():
        await (await db.session()).execute(text("INSERT INTO items (name) VALUES ('w')"))
        assert await db.read_session() is await db.session()
    assert replica._engine is None or replica.engine.pool.checkedout() == 0
    assert await standby.primary.names() == ["w"]


async def test_concurrent_scopes_track_their_own_writes(standby: Standby) -> None:
    db, _ = standby.dbs()
    wrote = asyncio.Event()

    async def writer() -> bool:
        await (await db.session()).execute(text("INSERT INTO items (name) VALUES ('a')"))
        wrote.set()
        return await in_recovery(await db.read_session())

    async def reader() -> bool:
        await asyncio.wait_for(wrote.wait(), 10)
        return await in_recovery(await db.read_session())

    assert await asyncio.gather(run_isolated(writer), run_isolated(reader)) == [False, True]
    assert await standby.primary.names() == ["a"]


async def test_a_write_through_the_read_session_fails(standby: Standby) -> None:
    db, _ = standby.dbs()
    with pytest.raises(DBAPIError, match="read-only transaction"):
        async with scope():
            session = await db.read_session()
            session.add(Item(name="oops"))
            await session.execute(select(Item.name))  # autoflush sends the INSERT
    assert await standby.primary.names() == []


async def test_read_from_primary_hook(standby: Standby) -> None:
    calls: list[Database] = []
    sticky = {"value": True}

    def recently_wrote(db: Database) -> bool:
        calls.append(db)
        return sticky["value"]

    db, replica = standby.dbs(read_from_primary=recently_wrote)
    async with scope():
        assert not await in_recovery(await db.read_session())
        assert await db.read_session() is await db.session()
    sticky["value"] = False
    async with scope():
        assert await in_recovery(await db.read_session())
        assert await db.read_session() is await replica.session()
    assert calls == [db, db]  # once per scope


@pytest.fixture(params=["asyncpg", "psycopg"])
async def stoppable_standby(request: pytest.FixtureRequest) -> AsyncIterator[Standby]:
    async for sb in _standby(request, exclusive=True):
        yield sb


def standby_script(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "standby.sh"), action], check=True, timeout=120)


async def test_a_stopped_standby_falls_back_to_the_primary_and_recovers(
    stoppable_standby: Standby, caplog: pytest.LogCaptureFixture
) -> None:
    sb = stoppable_standby
    db, replica = sb.dbs(replica_retry=0.2)
    caplog.set_level(logging.INFO, logger="sqla_context")
    async with scope():  # a pooled connection to the standby, about to go stale
        assert await in_recovery(await db.read_session())
    try:
        await asyncio.to_thread(standby_script, "stop")
        for _ in range(3):
            async with scope():
                session = await db.read_session()
                assert session is await db.session()
                assert not await in_recovery(session)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per outage, not per scope
        assert "standby" in warnings[0].getMessage()
        assert "reading from the primary" in warnings[0].getMessage()
    finally:
        await asyncio.to_thread(standby_script, "start")
    await sb.replayed()
    # Recovers once replica_retry has passed: poll, bounded, until a scope reads it again.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        async with scope():
            if await in_recovery(await db.read_session()):
                break
        assert loop.time() < deadline, "reads never went back to the standby"
        await asyncio.sleep(0.05)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert replica.engine.pool.checkedout() == 0


# A sequence of operations in a scope, against a model of where each read must go.
OPS = st.lists(
    st.sampled_from(["read", "read-primary", "write", "close-primary", "close-replica"]),
    max_size=12,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scopes=st.lists(st.tuples(st.booleans(), OPS), min_size=1, max_size=3))
async def test_reads_follow_the_model(
    standby: Standby, scopes: list[tuple[bool, list[str]]]
) -> None:
    async with standby.primary.witness.begin() as conn:
        await conn.execute(text("DELETE FROM items"))
    sticky = {"value": False}
    db, replica = standby.dbs(read_from_primary=lambda db: sticky["value"])
    written = 0
    try:
        for from_primary, ops in scopes:
            sticky["value"] = from_primary
            # The model: the hook is asked at the scope's first routing; a write sends every
            # later read to the primary.
            on_primary = from_primary
            wrote = False
            async with scope():
                for op in ops:
                    if op == "read":
                        session = await db.read_session()
                        assert (not await in_recovery(session)) is on_primary, (op, ops)
                        assert (session is await db.session()) is on_primary
                    elif op == "read-primary":
                        await (await db.session()).execute(select(Item.name))
                    elif op == "write":
                        written += 1
                        await (await db.session()).execute(insert(Item).values(name=f"w{written}"))
                        on_primary = wrote = True
                    elif op == "close-primary":
                        await db.close_session()
                    else:
                        await replica.close_session()
                    assert db.scope_wrote() is wrote
        assert len(await standby.primary.names()) == written
        assert replica.engine.pool.checkedout() == 0
        assert db.engine.pool.checkedout() == 0
    finally:
        await db.dispose()
        await replica.dispose()
