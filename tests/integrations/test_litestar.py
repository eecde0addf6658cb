"""SqlaContextPlugin: Litestar's test clients, httpx and a real uvicorn server."""

# No `from __future__ import annotations`: Litestar reads the handlers' annotations, which
# refer to names local to the test functions.

import asyncio
import logging

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import ConfigurationError, Database

from ..conftest import Backend, insert
from .test_asgi_uvicorn import serve

litestar = pytest.importorskip("litestar", reason="Litestar is not installed")
from litestar import Litestar, Response, get, post  # noqa: E402
from litestar.di import NamedDependency  # noqa: E402
from litestar.params import FromPath, FromQuery  # noqa: E402

from sqla_context.litestar import SqlaContextPlugin  # noqa: E402


def make_app(backend: Backend, db: Database, **plugin_options: object) -> Litestar:
    @post("/items/{name:str}")
    async def create(name: FromPath[str], status: FromQuery[int] = 201) -> Response[str]:
        await insert(await db.session(), name)
        return Response("ok", status_code=status)

    @post("/raise/{name:str}")
    async def create_then_raise(name: FromPath[str]) -> None:
        await insert(await db.session(), name)
        raise RuntimeError("handler bug")

    @post("/doom")
    async def doom() -> str:
        await backend.doom(await db.session())
        return "looks fine"

    @get("/same")
    async def same(session: NamedDependency[AsyncSession]) -> dict[str, bool]:
        return {"same": session is await db.session()}

    @get("/items")
    async def read(session: NamedDependency[AsyncSession]) -> list[str]:
        rows = await session.execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())

    return Litestar(
        route_handlers=[create, create_then_raise, doom, same, read],
        plugins=[SqlaContextPlugin(db, **plugin_options)],  # type: ignore[arg-type]
        logging_config=None,  # leave logging to pytest (caplog)
    )


def client(app: Litestar) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_plugin_commits_rolls_back_and_turns_failed_commits_into_500(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with client(make_app(backend, db)) as c:
            assert (await c.post("/items/kept")).status_code == 201
            assert (await c.post("/items/dropped?status=422")).status_code == 422
            assert (await c.post("/raise/raised")).status_code == 500
            failed = await c.post("/doom")
    assert failed.status_code == 500
    assert failed.text != "looks fine"
    assert "commit failed for POST /doom" in caplog.text
    assert await backend.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0


async def test_session_dependency_is_the_scope_session(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        assert (await c.get("/same")).json() == {"same": True}
        assert (await c.post("/items/a")).status_code == 201
        assert (await c.get("/items")).json() == ["a"]


async def test_custom_commit_on(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db, commit_on=lambda status: status in (201, 409))
    async with client(app) as c:
        assert (await c.post("/items/conflict?status=409")).status_code == 409
        assert (await c.post("/items/accepted?status=202")).status_code == 202
    assert await backend.names() == ["conflict"]


async def test_shutdown_disposes_and_litestar_test_client_works(backend: Backend) -> None:
    from litestar.testing import TestClient

    db = backend.database()
    app = make_app(backend, db)

    def drive() -> int:
        with TestClient(app=app) as tc:  # runs startup and shutdown in a loop of its own
            return tc.post("/items/via-test-client").status_code

    assert await asyncio.to_thread(drive) == 201
    assert db._engine is None, "disposed on shutdown"
    assert await backend.names() == ["via-test-client"]


async def test_real_uvicorn_server(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db)
    async with serve(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.post("/items/wire")).status_code == 201
        assert (await c.post("/doom")).status_code == 500
        assert (await c.get("/items")).json() == ["wire"]
    assert await backend.names() == ["wire"]
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


def test_plugin_needs_a_database() -> None:
    with pytest.raises(ConfigurationError, match="at least one Database"):
        SqlaContextPlugin()
    with pytest.raises(ConfigurationError, match="'none', 'connection'"):
        SqlaContextPlugin(Database("sqlite+aiosqlite://"), websocket="always")  # type: ignore[arg-type]
