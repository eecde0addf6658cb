"""PostgreSQL through PgBouncer in transaction-pooling mode, and ``pgbouncer_options()``.

The test PgBouncer (``scripts/pgbouncer.sh``) gives each database 2 server connections, so
the transactions of a few client connections keep changing server connection. The first
tests show the problem is real here: both drivers' default prepared statements fail. The
others run the same workload with ``pgbouncer_options()`` and check the database afterwards
through a direct connection (the backend fixture's witness and teardown).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import URL, func, make_url, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from sqla_context import ConfigurationError, Database, pgbouncer_options, scope

from .conftest import PG_URL, PGBOUNCER_BACKENDS, Backend, direct_url

through_pgbouncer = pytest.mark.parametrize("backend", PGBOUNCER_BACKENDS, indirect=True)

#: What both drivers raise when a prepared statement is looked for on the wrong server
#: connection, or created on one that already has it from another client.
# Each a prepared statement of another client met on a shared server connection.
#: The forms a prepared statement run on the wrong server connection takes, by SQLSTATE (all
#: seen in runs of the demonstration below): the name is unknown there, or taken, or it names
#: another statement, whose parameters then do not fit.
PREPARED_STATEMENT_MIXUPS = {
    "26000": 'prepared statement "..." does not exist',
    "42P05": 'prepared statement "..." already exists',
    "08P01": 'bind message supplies N parameters, but prepared statement "..." requires M',
    "22021": 'invalid byte sequence for encoding "UTF8": 0x00 (a binary integer read as text)',
}

CLIENTS = 5  # client connections (the pool), sharing 2 server connections
REQUESTS = 30  # scopes per client


async def _workload(db: Database) -> tuple[int, list[DBAPIError]]:
    """CLIENTS tasks, each running REQUESTS scopes of the same three statements.

    Returns the number of scopes that committed and the errors of the others. The same
    statements are repeated so that psycopg (which prepares a query from its 6th execution on
    a connection) and asyncpg (which prepares and caches every statement) both reuse them.
    """
    errors: list[DBAPIError] = []
    done = 0

    async def client(n: int) -> None:
        nonlocal done
        for i in range(REQUESTS):
            try:
                async with scope():
                    session = await db.session()
                    await session.execute(text("SELECT CAST(:n AS integer) + 1"), {"n": i})
                    await session.execute(
                        text("INSERT INTO items (name) VALUES (:name)"), {"name": f"{n}-{i}"}
                    )
                    await session.execute(select(func.count()).select_from(text("items")))
            except DBAPIError as exc:
                errors.append(exc)
            else:
                done += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return done, errors


async def _server_prepared_statements(backend: Backend) -> list[int]:
    """Prepared statements held by each of the database's 2 PgBouncer server connections.

    Two transactions held open at once occupy both server connections.
    """
    engine = create_async_engine(backend.url, pool_size=2, **pgbouncer_options(backend.url))
    try:
        async with engine.connect() as a, engine.connect() as b:
            counts = []
            for conn in (a, b):
                query = text("SELECT count(*) FROM pg_prepared_statements")
                counts.append(int((await conn.execute(query)).scalar_one()))
            pids = {
                int((await c.execute(text("SELECT pg_backend_pid()"))).scalar_one()) for c in (a, b)
            }
            assert len(pids) == 2, "expected the two transactions on two server connections"
            await a.rollback()
            await b.rollback()
        return counts
    finally:
        await engine.dispose()


async def _forget_prepared_statements(backend: Backend) -> None:
    """DEALLOCATE ALL on both server connections (left-overs of the demonstrations)."""
    engine = create_async_engine(backend.url, pool_size=2, **pgbouncer_options(backend.url))
    try:
        async with engine.begin() as a, engine.begin() as b:
            for conn in (a, b):
                await conn.exec_driver_sql("DEALLOCATE ALL")
    finally:
        await engine.dispose()


async def _rows(backend: Backend) -> int:
    return len(await backend.names())


# -- the problem, demonstrated -----------------------------------------------------------


@through_pgbouncer
async def test_demonstration_default_driver_options_fail_behind_pgbouncer(
    backend: Backend,
) -> None:
    """NOT a test of sqla_context: shows that the problem pgbouncer_options() solves is real.

    With their defaults, asyncpg (statement cache, SQLAlchemy's prepared statement cache)
    and psycopg (prepare after 5 executions) keep named prepared statements per client
    connection, which PgBouncer in transaction mode moves between server connections.
    """
    db = backend.database(preset=False)
    done, errors = await _workload(db)
    assert errors, "the default driver options unexpectedly worked through PgBouncer"
    for exc in errors:
        assert getattr(exc.orig, "sqlstate", None) in PREPARED_STATEMENT_MIXUPS, exc
    assert done + len(errors) == CLIENTS * REQUESTS
    assert await _rows(backend) == done  # every failed scope was rolled back
    await _forget_prepared_statements(backend)


# -- the preset ---------------------------------------------------------------------------


@through_pgbouncer
async def test_preset_runs_the_workload_without_errors(backend: Backend) -> None:
    db = backend.database()
    done, errors = await _workload(db)
    assert errors == []
    assert done == CLIENTS * REQUESTS
    assert await _rows(backend) == CLIENTS * REQUESTS


@through_pgbouncer
async def test_preset_leaves_no_prepared_statements_on_the_server_connections(
    backend: Backend,
) -> None:
    # Unique statement names (SQLAlchemy's prepared_statement_name_func) would avoid the
    # errors too, but leave statements behind: asyncpg closes a statement with its next one,
    # by then on another server connection.
    await _forget_prepared_statements(backend)
    db = backend.database()
    done, errors = await _workload(db)
    assert (done, errors) == (CLIENTS * REQUESTS, [])
    assert await _server_prepared_statements(backend) == [0, 0]


@through_pgbouncer
async def test_preset_with_pre_ping_and_autocommit(backend: Backend) -> None:
    """pool_pre_ping's ping and AUTOCOMMIT statements run outside a transaction block."""
    db = backend.database(engine_options={"pool_pre_ping": True, "pool_size": 2})
    done, errors = await _workload(db)
    assert (done, errors) == (CLIENTS * REQUESTS, [])
    async with db.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for i in range(10):
            await auto.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": f"auto-{i}"})
    assert await _rows(backend) == CLIENTS * REQUESTS + 10


@through_pgbouncer
async def test_failed_scope_rolls_back_through_pgbouncer(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(RuntimeError):
        async with scope():
            session = await db.session()
            await session.execute(text("INSERT INTO items (name) VALUES ('lost')"))
            raise RuntimeError
    async with scope():
        session = await db.session()
        await session.execute(text("INSERT INTO items (name) VALUES ('kept')"))
    assert await backend.names() == ["kept"]


@through_pgbouncer
async def test_set_local_stays_in_its_transaction(backend: Backend) -> None:
    """SET LOCAL (what sqla_context.testing uses for lock_timeout) is safe in this mode."""
    db = backend.database()
    async with scope():
        session = await db.session()
        await session.execute(text("SET LOCAL lock_timeout = '1234ms'"))
        assert (await session.execute(text("SHOW lock_timeout"))).scalar_one() == "1234ms"
    engine = create_async_engine(backend.url, pool_size=2, **pgbouncer_options(backend.url))
    try:
        async with engine.connect() as a, engine.connect() as b:
            for conn in (a, b):  # both server connections
                assert (await conn.execute(text("SHOW lock_timeout"))).scalar_one() == "0"
            await a.rollback()
            await b.rollback()
    finally:
        await engine.dispose()


def test_witness_is_a_direct_connection() -> None:
    pg = make_url(PG_URL)  # SQLA_CONTEXT_PG_URL: the server PgBouncer stands in front of
    direct = make_url(direct_url("postgresql+psycopg://postgres@127.0.0.1:6432/x"))
    assert (direct.host, direct.port, direct.database) == (pg.host, pg.port, "x")


# -- pgbouncer_options() ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "connect_args"),
    [
        (
            "postgresql+asyncpg://app:secret@bouncer:6432/shop",
            {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
        ),
        ("postgresql+psycopg://app@bouncer/shop", {"prepare_threshold": None}),
        ("postgresql+psycopg_async://app@bouncer/shop", {"prepare_threshold": None}),
        (URL.create("postgresql+asyncpg", host="bouncer"), {"statement_cache_size": 0}),
        ("asyncpg", {"statement_cache_size": 0, "prepared_statement_cache_size": 0}),
        ("psycopg", {"prepare_threshold": None}),
    ],
)
def test_options_per_driver(url: str | URL, connect_args: dict[str, Any]) -> None:
    options = pgbouncer_options(url)
    assert set(options) == {"connect_args"}
    assert connect_args.items() <= options["connect_args"].items()


def test_options_merge_engine_options_and_connect_args() -> None:
    options = pgbouncer_options(
        "postgresql+asyncpg://bouncer/shop",
        pool_pre_ping=True,
        connect_args={"timeout": 5, "statement_cache_size": 10},
    )
    assert options == {
        "pool_pre_ping": True,
        "connect_args": {
            "statement_cache_size": 10,
            "prepared_statement_cache_size": 0,
            "timeout": 5,
        },
    }


def test_options_are_accepted_by_database_and_create_async_engine() -> None:
    url = "postgresql+psycopg://app@bouncer:6432/shop"
    db = Database(url, engine_options=pgbouncer_options(url, pool_size=3))
    assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
    create_async_engine(url, **pgbouncer_options(url)).sync_engine.dispose()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("mysql+asyncmy://root@db/x", "not a PostgreSQL URL"),
        ("postgresql://app@bouncer/x", "names no driver"),
        ("postgresql+psycopg2://app@bouncer/x", "names 'psycopg2'"),
        ("postgresql+pg8000://app:secret@bouncer/x", "'postgresql\\+pg8000://app:\\*\\*\\*@"),
        ("pg8000", "knows the drivers 'asyncpg' and 'psycopg', not 'pg8000'"),
        ("postgresql+asyncpg://app@bouncer:port/x", "cannot parse the database URL"),
    ],
)
def test_options_reject_what_they_cannot_configure(given: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        pgbouncer_options(given)


def test_options_reject_connect_args_that_are_not_a_mapping() -> None:
    with pytest.raises(ConfigurationError, match="connect_args must be a mapping"):
        pgbouncer_options("asyncpg", connect_args=[("timeout", 5)])
