"""sqla_context.testing.isolated(): rollback and commit modes, on every backend."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqla_context import (
    ConfigurationError,
    Database,
    LeakError,
    UnsafeDatabaseError,
    run_isolated,
    scope,
)
from sqla_context.asgi import SessionMiddleware
from sqla_context.testing import IsolationError, isolated, looks_like_test_database

from .conftest import Backend, insert


class Boom(Exception):
    pass


async def names_in(db: Database) -> list[str]:
    """The rows as the app sees them, through a scope of its own."""
    async with scope(nested="new"):
        rows = await (await db.session()).execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())


async def test_rollback_mode_keeps_app_behaviour_and_discards_everything(
    backend: Backend,
) -> None:
    db = backend.database()
    async with isolated(db):
        async with scope():
            await insert(await db.session(), "committed-by-scope")
        assert await names_in(db) == ["committed-by-scope"], "visible to the next unit of work"
        with pytest.raises(Boom):
            async with scope():
                await insert(await db.session(), "rolled-back")
                raise Boom
        async with scope():
            session = await db.session()
            await insert(session, "early")
            await db.commit()
            await insert(session, "discarded")
            await db.rollback()
            await insert(session, "closed-early")
            await db.close_session()
            assert await names_in(db) == ["closed-early", "committed-by-scope", "early"]
            async with db.transaction():
                await insert(await db.session(), "block")
            with pytest.raises(Boom):
                async with db.transaction():
                    await insert(await db.session(), "failed-savepoint")
                    raise Boom
        async with db.new_session(begin=True) as independent:
            await insert(independent, "independent")
        assert await names_in(db) == [
            "block",
            "closed-early",
            "committed-by-scope",
            "early",
            "independent",
        ]
        assert await backend.names() == [], "nothing is really committed"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_rollback_mode_through_asgi_requests(backend: Backend) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> None:
        await insert(await db.session(), name)

    @app.get("/items")
    async def read() -> list[str]:
        rows = await (await db.session()).execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())

    transport = httpx.ASGITransport(app=app)
    async with isolated(db), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/items/a")).status_code == 201
        assert (await c.post("/items/b")).status_code == 201
        assert (await c.get("/items")).json() == ["a", "b"], "request 2 sees request 1"
        assert await names_in(db) == ["a", "b"], "and so does the test"
    assert await backend.names() == []


async def test_several_databases_are_each_isolated(backend: Backend) -> None:
    other = await backend.sibling()
    primary, secondary = backend.database(), other.database()
    async with isolated(primary, secondary):
        async with scope():
            await insert(await primary.session(), "p")
            await insert(await secondary.session(), "s")
        assert await names_in(primary) == ["p"]
        assert await names_in(secondary) == ["s"]
    assert await backend.names() == []
    assert await other.names() == []


async def test_commit_mode_really_commits_then_empties(backend: Backend) -> None:
    db = backend.database()
    async with isolated(db, mode="commit"):
        async with scope():
            await insert(await db.session(), "real")
        assert await backend.names() == ["real"], "really committed"
        async with scope():
            await (await db.session()).execute(text("INSERT INTO parents (id) VALUES (7)"))
    assert await backend.names() == []
    async with backend.witness.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM parents"))).scalar_one() == 0


async def test_commit_mode_sees_real_commit_failures(backend: Backend) -> None:
    from sqla_context import CommitError

    db = backend.database()
    async with isolated(db, mode="commit"):
        with pytest.raises(CommitError):
            async with scope():
                await backend.doom(await db.session())
    assert await backend.names() == []


async def test_commit_mode_allows_concurrent_isolated_work(backend: Backend) -> None:
    import asyncio

    db = backend.database()

    async def add(name: str) -> None:
        await insert(await db.session(), name)

    async with isolated(db, mode="commit"):
        if backend.kind == "sqlite":  # one writer at a time
            await run_isolated(add, "x")
            await run_isolated(add, "y")
        else:
            await asyncio.gather(run_isolated(add, "x"), run_isolated(add, "y"))
        assert await backend.names() == ["x", "y"]
    assert await backend.names() == []


async def test_leaked_connection_fails_naming_the_database(backend: Backend) -> None:
    db = backend.database(name="leaky")
    leaked = None
    with pytest.raises(LeakError, match="'leaky'"):
        async with isolated(db):
            leaked = await db.engine.connect()
    assert leaked is not None
    await leaked.close()
    assert await backend.names() == []


async def test_refuses_a_server_database_that_is_not_a_test_one(backend: Backend) -> None:
    from sqlalchemy import make_url

    if backend.kind == "sqlite":  # a file of the test's own: the name rule does not apply
        db = Database(f"sqlite+aiosqlite:///{make_url(backend.url).database}.prod.db")
        backend.databases.append(db)
        async with isolated(db):
            pass
        return
    other = "postgres" if backend.kind == "postgresql" else "mysql"
    db = Database(make_url(backend.url).set(database=other))
    backend.databases.append(db)
    with pytest.raises(UnsafeDatabaseError, match=repr(other)):
        async with isolated(db):
            pytest.fail("must not run")
    async with isolated(db, is_test_database=lambda name: name == other):
        pass  # a rule of one's own lets it through


def test_default_rule() -> None:
    assert looks_like_test_database("app_test")
    assert looks_like_test_database("TEST_shop")
    assert not looks_like_test_database("shop")


async def test_invalid_mode(sqlite: Backend) -> None:
    with pytest.raises(ConfigurationError, match="'rollback', 'commit'"):
        async with isolated(sqlite.database(), mode="truncate"):  # type: ignore[arg-type]
            pass


async def test_nested_isolation_is_refused(sqlite: Backend) -> None:
    db = sqlite.database()
    async with isolated(db):
        with pytest.raises(IsolationError, match=r"already isolated.*isolated_in"):
            async with isolated(db):
                pass


async def test_testclient_in_its_own_event_loop(backend: Backend) -> None:
    import asyncio

    from starlette.testclient import TestClient

    from sqla_context.testing import isolated_in

    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> None:
        await insert(await db.session(), name)

    @app.post("/items/{name}/reject", status_code=409)
    async def reject(name: str) -> None:
        await insert(await db.session(), name)

    @app.get("/items")
    async def read() -> list[str]:
        rows = await (await db.session()).execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())

    def drive() -> list[str]:
        with TestClient(app) as client, isolated_in(client.portal, db):
            assert client.post("/items/a").status_code == 201
            assert client.post("/items/b/reject").status_code == 409
            assert client.post("/items/c").status_code == 201
            listed: list[str] = client.get("/items").json()
            return listed

    assert await asyncio.to_thread(drive) == ["a", "c"], "one request sees the previous ones"
    assert await backend.names() == [], "and all of it was rolled back"


async def test_testclient_commit_mode(backend: Backend) -> None:
    import asyncio

    from starlette.testclient import TestClient

    from sqla_context.testing import isolated_in

    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)
    seen: list[list[str]] = []

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> None:
        await insert(await db.session(), name)

    async def committed() -> list[str]:  # a witness of the portal's own event loop
        engine = create_async_engine(backend.url)
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(text("SELECT name FROM items"))).scalars())
        finally:
            await engine.dispose()

    def drive() -> None:
        with TestClient(app) as client, isolated_in(client.portal, db, mode="commit"):
            assert client.post("/items/real").status_code == 201
            seen.append(client.portal.call(committed))

    await asyncio.to_thread(drive)
    assert seen == [["real"]], "really committed during the test"
    assert await backend.names() == [], "emptied afterwards"


# -- hardening: what real suites run into ----------------------------------------------------

BOUND = 30  # seconds: a test that would hang fails with an explanation instead


async def bounded(coro: Any, what: str) -> Any:
    try:
        return await asyncio.wait_for(coro, BOUND)
    except TimeoutError:
        pytest.fail(f"{what} did not finish within {BOUND} s: it hangs")


def quick_lock(backend: Backend) -> dict[str, Any]:
    """Engine options that make SQLite give up a lock wait after 1 s (the driver's 5 s)."""
    return {"connect_args": {"timeout": 1}} if backend.kind == "sqlite" else {}


async def test_replica_on_the_same_url_sees_the_primarys_writes(backend: Backend) -> None:
    primary, replica = backend.database(), backend.database(name="replica")
    async with isolated(primary, replica):
        async with scope():
            await insert(await primary.session(), "written")
        assert await names_in(replica) == ["written"], "a later unit of work on the replica"
        async with scope():
            await insert(await primary.session(), "same-scope")
            rows = await (await replica.session()).execute(text("SELECT name FROM items"))
            assert sorted(rows.scalars()) == ["same-scope", "written"]
    assert await backend.names() == []
    assert primary.engine.pool.checkedout() == replica.engine.pool.checkedout() == 0


async def test_lock_wait_on_the_tests_own_rows_fails_with_an_explanation(
    backend: Backend,
) -> None:
    db = backend.database(engine_options=quick_lock(backend))

    async def bypass() -> None:
        async with db.engine.begin() as conn:  # not isolated: waits for the test's rows
            await conn.execute(text("INSERT INTO items (name) VALUES ('a')"))

    async with isolated(db, lock_timeout=1):
        async with scope():
            await insert(await db.session(), "a")
        with pytest.raises(IsolationError, match="rollback mode") as caught:
            await bounded(bypass(), "a connection waiting on the isolation transaction")
        assert "sqla_databases" in str(caught.value)
        assert "commit mode" in str(caught.value)
        assert await names_in(db) == ["a"], "the isolation connection is unharmed"
    assert await backend.names() == []
    assert await backend.open_transactions(settle=True) == 0


async def test_testclient_composes_with_an_enclosing_isolation(backend: Backend) -> None:
    from starlette.testclient import TestClient

    from sqla_context.testing import isolated_in

    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> None:
        await insert(await db.session(), name)

    @app.get("/items")
    async def read() -> list[str]:
        rows = await (await db.session()).execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())

    def drive() -> list[str]:
        with TestClient(app) as client, isolated_in(client.portal, db):
            assert client.post("/items/a").status_code == 201
            listed: list[str] = client.get("/items").json()
            return listed

    async with isolated(db):  # what the autouse sqla_isolation fixture does
        assert await bounded(asyncio.to_thread(drive), "the TestClient") == ["a"]
        assert await names_in(db) == [], "the test's own loop has a connection of its own"
    assert await backend.names() == []


async def test_session_in_a_loop_that_is_not_isolated_says_what_to_do(backend: Backend) -> None:
    from starlette.testclient import TestClient

    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> None:
        await insert(await db.session(), name)

    def drive() -> None:
        with TestClient(app) as client:
            client.post("/items/a")

    async with isolated(db):
        with pytest.raises(IsolationError, match=r"isolated_in\(client.portal"):
            await bounded(asyncio.to_thread(drive), "a request in the TestClient's loop")
    await db.dispose()
    assert await backend.names() == []


async def test_rollback_mode_catches_a_never_closed_sessionmaker_session(
    backend: Backend,
) -> None:
    db = backend.database(name="forgetful")
    with pytest.raises(LeakError, match=r"'forgetful'.*1 session\(s\) from db.sessionmaker"):
        async with isolated(db):
            forgotten = db.sessionmaker()
            await insert(forgotten, "never-closed")
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_commit_mode_leaked_connection_raises_leak_error_instead_of_hanging(
    backend: Backend,
) -> None:
    db = backend.database(name="leaky", engine_options=quick_lock(backend))
    leaked = None

    async def run() -> None:
        nonlocal leaked
        async with isolated(db, mode="commit", lock_timeout=1):
            async with scope():
                await insert(await db.session(), "committed")
            leaked = await db.engine.connect()
            await leaked.execute(text("INSERT INTO items (name) VALUES ('uncommitted')"))

    with pytest.raises(LeakError, match=r"'leaky'.*NOT emptied"):
        await bounded(run(), "commit mode's clean-up behind a leaked connection")
    assert leaked is not None
    await leaked.rollback()
    await leaked.close()
    assert await backend.names() == ["committed"], "left in place, as the error says"
    async with backend.witness.begin() as conn:
        await conn.execute(text("DELETE FROM items"))


@pytest.mark.parametrize("poolclass", ["NullPool", "StaticPool"])
async def test_isolated_works_with_pools_that_do_not_count(
    backend: Backend, poolclass: str
) -> None:
    import sqlalchemy.pool

    pool = getattr(sqlalchemy.pool, poolclass)
    if poolclass == "StaticPool" and backend.kind == "sqlite":
        db = Database("sqlite+aiosqlite://", engine_options={"poolclass": pool})  # in memory
        async with db.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE items (name VARCHAR(100) PRIMARY KEY)"))
    else:
        db = backend.database(engine_options={"poolclass": pool})
    try:
        async with isolated(db):
            async with scope():
                await insert(await db.session(), "a")
            assert await names_in(db) == ["a"]
        assert await names_in(db) == [], "rolled back (in memory: the same connection)"
        with pytest.raises(LeakError):
            async with isolated(db):
                leaked = await db.engine.connect()
        await leaked.close()
    finally:
        await db.dispose()
    assert await backend.names() == []


async def other_schema(backend: Backend, tmp: Any) -> tuple[Database, str]:
    """A Database whose connections see a second schema holding its own ``items`` table."""
    if backend.kind == "postgresql":
        async with backend.witness.begin() as conn:
            await conn.execute(text("DROP SCHEMA IF EXISTS iso_s CASCADE"))
            await conn.execute(text("CREATE SCHEMA iso_s"))
            await conn.execute(text("CREATE TABLE iso_s.items (name VARCHAR(100))"))
        return backend.database(), "iso_s"
    if backend.kind == "mariadb":
        sibling = await backend.sibling()  # on MariaDB a schema is a database
        return backend.database(), str(make_url(sibling.url).database)
    path = f"{tmp}/iso_s.db"
    db = backend.database()

    @event.listens_for(db.engine.sync_engine, "connect")
    def attach(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{path}' AS iso_s")

    async with db.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE iso_s.items (name VARCHAR(100))"))
    return db, "iso_s"


async def test_commit_mode_empties_the_written_table_in_its_own_schema_only(
    backend: Backend, tmp_path: Any
) -> None:
    from sqlalchemy import Column, MetaData, String, Table
    from sqlalchemy import insert as core_insert

    db, schema = await other_schema(backend, tmp_path)
    async with backend.witness.begin() as conn:  # a row the test did not write
        await conn.execute(text("INSERT INTO items (name) VALUES ('keep')"))
    other = Table("items", MetaData(), Column("name", String(100)), schema=schema)
    async with isolated(db, mode="commit"), scope():
        session = await db.session()
        await session.execute(text(f"INSERT INTO {schema}.items (name) VALUES ('raw')"))
        await session.execute(core_insert(other).values(name="core"))
        rows = await session.execute(text(f"SELECT count(*) FROM {schema}.items"))
        assert rows.scalar_one() == 2
    assert await backend.names() == ["keep"], "a table of the same name in another schema"
    async with db.engine.connect() as conn:
        rows = await conn.execute(text(f"SELECT count(*) FROM {schema}.items"))
        assert rows.scalar_one() == 0, "the written table was emptied"
    if backend.kind == "postgresql":
        async with backend.witness.begin() as conn:
            await conn.execute(text("DROP SCHEMA iso_s CASCADE"))
    async with backend.witness.begin() as conn:
        await conn.execute(text("DELETE FROM items"))


def test_written_table_keeps_the_schema_of_raw_sql() -> None:
    from sqla_context._cleanup import written_table

    assert written_table(None, "INSERT INTO s.items VALUES (1)") == "s.items"
    assert written_table(None, 'insert into "S" . "Items" (a) values (1)') == '"S"."Items"'
    assert written_table(None, "UPDATE `db`.`t` SET a = 1") == "`db`.`t`"
    assert written_table(None, "delete from only items where x") == "items"
    assert written_table(None, "INSERT IGNORE INTO t (a) VALUES (1)") == "t"
    assert written_table(None, "SELECT * FROM items") is None
