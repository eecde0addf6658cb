"""sqla_context.testing.isolated(): rollback and commit modes, on every backend."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
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
from sqla_context.testing import isolated, looks_like_test_database

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
        with pytest.raises(RuntimeError, match="already isolated"):
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
