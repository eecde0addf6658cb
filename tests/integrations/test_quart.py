"""SessionMiddleware unchanged in a Quart app (wrapping ``app.asgi_app``)."""

from __future__ import annotations

import httpx
import pytest

from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert

quart = pytest.importorskip("quart", reason="Quart is not installed")


async def test_quart_commit_rollback_and_failed_commit(backend: Backend) -> None:
    db = backend.database()
    app = quart.Quart(__name__)
    app.asgi_app = SessionMiddleware(app.asgi_app)  # type: ignore[method-assign]

    @app.post("/items/<name>")
    async def create(name: str) -> tuple[str, int]:
        await insert(await db.session(), name)
        return "ok", int(quart.request.args.get("status", "201"))

    @app.post("/doom")
    async def doom() -> str:
        await backend.doom(await db.session())
        return "looks fine"

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.post("/items/kept")).status_code == 201
        assert (await c.post("/items/dropped?status=409")).status_code == 409
        failed = await c.post("/doom")
    assert failed.status_code == 500
    assert failed.text == "Internal Server Error"
    assert await backend.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0


class OutOfStock(Exception):
    pass


@pytest.mark.parametrize("status", [302, 200])
async def test_error_handler_that_rolls_back_as_documented(backend: Backend, status: int) -> None:
    # Quart sends an errorhandler's response after its except block: the middleware cannot
    # tell it from a normal one, and docs/web.md has the handler roll back itself.
    db = backend.database()
    app = quart.Quart(__name__)
    app.asgi_app = SessionMiddleware(app.asgi_app)  # type: ignore[method-assign]

    @app.errorhandler(OutOfStock)
    async def out_of_stock(error: OutOfStock) -> quart.Response:
        await db.rollback()
        if status == 302:
            return quart.redirect("/sold-out")
        return quart.Response("sold out", status=status)

    @app.post("/buy/<name>")
    async def buy(name: str) -> str:
        await insert(await db.session(), name)
        raise OutOfStock

    @app.post("/ok/<name>")
    async def ok(name: str) -> str:
        await insert(await db.session(), name)
        return "ok"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.post("/buy/half-done")).status_code == status
        assert (await c.post("/ok/kept")).status_code == 200
    assert await backend.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0
