"""SessionMiddleware unchanged in a Litestar app (Litestar's native plugin comes separately)."""

from typing import Any

import httpx
import pytest
from sqlalchemy import text

from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert

litestar = pytest.importorskip("litestar", reason="Litestar is not installed")
from litestar import Litestar, Response, post  # noqa: E402
from litestar.middleware import DefineMiddleware  # noqa: E402
from litestar.params import FromPath, FromQuery  # noqa: E402


def make_app(backend: Backend, **kwargs: Any) -> Litestar:
    db = backend.database()

    @post("/items/{name:str}")
    async def create(name: FromPath[str], status: FromQuery[int] = 201) -> Response[str]:
        await insert(await db.session(), name)
        return Response("ok", status_code=status)

    @post("/doom")
    async def doom() -> str:
        await backend.doom(await db.session())
        return "looks fine"

    return Litestar(route_handlers=[create, doom], **kwargs)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda **kw: {"middleware": [DefineMiddleware(SessionMiddleware)]}, id="list"),
        pytest.param(None, id="wrapped"),
    ],
)
async def test_litestar_commit_and_rollback(backend: Backend, wrap: Any) -> None:
    app: Any = make_app(backend, **(wrap() if wrap else {}))
    if wrap is None:
        app = SessionMiddleware(app)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.post("/items/kept")).status_code == 201
        assert (await c.post("/items/dropped?status=409")).status_code == 409
        failed = await c.post("/doom")
    assert failed.status_code == 500
    assert failed.text != "looks fine"
    assert await backend.names() == ["kept"]


async def test_litestar_test_clients_with_isolation(backend: Backend) -> None:
    import asyncio

    from litestar import get
    from litestar.testing import AsyncTestClient, TestClient

    from sqla_context.testing import isolated_in

    db = backend.database()

    @post("/items/{name:str}", status_code=201)
    async def create(name: FromPath[str]) -> None:
        await insert(await db.session(), name)

    @get("/items")
    async def read() -> list[str]:
        rows = await (await db.session()).execute(text("SELECT name FROM items ORDER BY name"))
        return list(rows.scalars())

    app = Litestar(route_handlers=[create, read], middleware=[DefineMiddleware(SessionMiddleware)])

    # Both of Litestar's clients run the app in an event loop of their own (a portal).
    async with AsyncTestClient(app=app) as client:
        with isolated_in(client.blocking_portal, db):
            assert (await client.post("/items/a")).status_code == 201
            assert (await client.get("/items")).json() == ["a"]
    assert await backend.names() == []

    def drive() -> list[str]:  # the sync client runs the app in a loop of its own
        with TestClient(app=app) as client, isolated_in(client.blocking_portal, db):
            assert client.post("/items/b").status_code == 201
            listed: list[str] = client.get("/items").json()
            return listed

    assert await asyncio.to_thread(drive) == ["b"]
    assert await backend.names() == []
