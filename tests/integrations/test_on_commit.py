"""on_commit() through every integration: each ends its unit through ``_Unit.end``, so a
callback runs after a committed request/job, never after a failed one.

Each callback records whether its row was visible through the backend's witness engine
when it ran: "after the commit" is observed, not assumed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from litestar import Litestar, Response, post
from litestar.params import FromPath, FromQuery

from sqla_context import Database, on_commit
from sqla_context.asgi import SessionMiddleware
from sqla_context.litestar import SqlaContextPlugin

from ..conftest import Backend, insert


class Seen:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ran: list[tuple[str, bool]] = []  # (row, committed when the callback ran)

    async def write(self, db: Database, name: str) -> None:
        await insert(await db.session(), name)
        on_commit(functools.partial(self._check, name))

    async def _check(self, name: str) -> None:
        self.ran.append((name, name in await self.backend.names()))


async def assert_clean(backend: Backend, db: Database) -> None:
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions(settle=True) == 0


def asgi_client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


# -- ASGI (FastAPI) ---------------------------------------------------------------------------


async def test_asgi_runs_them_after_a_committed_request_only(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    seen = Seen(backend)
    plain: list[str] = []
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}/status/{status}")
    async def create(name: str, status: int) -> JSONResponse:
        await seen.write(db, name)
        return JSONResponse({}, status_code=status)

    @app.post("/raise/{name}")
    async def create_then_raise(name: str) -> None:
        await seen.write(db, name)
        raise RuntimeError("handler bug")

    @app.post("/no-database")
    async def no_database() -> dict[str, str]:
        on_commit(lambda: plain.append("ran"))
        return {}

    @app.post("/strict/{name}")
    async def strict(name: str) -> dict[str, str]:
        await seen.write(db, name)
        on_commit(_broken, raise_errors=True)
        return {}

    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with asgi_client(app) as c:
            assert (await c.post("/items/ok/status/201")).status_code == 201
            assert (await c.post("/items/refused/status/422")).status_code == 422
            assert (await c.post("/raise/raised")).status_code == 500
            assert (await c.post("/no-database")).status_code == 200
            # raise_errors: the failure comes out before the response: a 500 for committed data
            assert (await c.post("/strict/committed")).status_code == 500
    assert seen.ran == [("ok", True), ("committed", True)]
    assert plain == ["ran"]
    assert await backend.names() == ["committed", "ok"]
    await assert_clean(backend, db)


def _broken() -> None:
    raise RuntimeError("callback failed")


# -- Litestar ---------------------------------------------------------------------------------


async def test_litestar_runs_them_after_a_committed_request_only(backend: Backend) -> None:
    db = backend.database()
    seen = Seen(backend)

    @post("/items/{name:str}")
    async def create(name: FromPath[str], status: FromQuery[int] = 201) -> Response[str]:
        await seen.write(db, name)
        return Response("ok", status_code=status)

    @post("/raise/{name:str}")
    async def create_then_raise(name: FromPath[str]) -> None:
        await seen.write(db, name)
        raise RuntimeError("handler bug")

    app = Litestar(
        route_handlers=[create, create_then_raise],
        plugins=[SqlaContextPlugin(db)],
        logging_config=None,
    )
    async with asgi_client(app) as c:
        assert (await c.post("/items/ok")).status_code == 201
        assert (await c.post("/items/refused?status=422")).status_code == 422
        assert (await c.post("/raise/raised")).status_code == 500
    assert seen.ran == [("ok", True)]
    assert await backend.names() == ["ok"]
    await assert_clean(backend, db)


# -- aiohttp ----------------------------------------------------------------------------------


async def test_aiohttp_runs_them_after_a_committed_request_only(backend: Backend) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from sqla_context.aiohttp import session_middleware

    db = backend.database()
    seen = Seen(backend)
    app = web.Application(middlewares=[session_middleware()])
    routes = web.RouteTableDef()

    @routes.post("/items/{name}/status/{status}")
    async def create(request: web.Request) -> web.Response:
        await seen.write(db, request.match_info["name"])
        return web.Response(status=int(request.match_info["status"]))

    @routes.post("/raise/{name}")
    async def create_then_raise(request: web.Request) -> web.Response:
        await seen.write(db, request.match_info["name"])
        raise RuntimeError("handler bug")

    app.add_routes(routes)
    async with TestServer(app, host="127.0.0.1") as server, TestClient(server) as c:
        assert (await c.post("/items/ok/status/201")).status == 201
        assert (await c.post("/items/refused/status/422")).status == 422
        assert (await c.post("/raise/raised")).status == 500
    assert seen.ran == [("ok", True)]
    assert await backend.names() == ["ok"]
    await assert_clean(backend, db)


# -- FastStream (in-memory broker) and taskiq (Redis) -----------------------------------------


async def test_faststream_runs_them_after_a_committed_message_only(backend: Backend) -> None:
    from faststream.rabbit import RabbitBroker, TestRabbitBroker

    from sqla_context.faststream import SessionMiddleware as FastStreamMiddleware

    db = backend.database()
    seen = Seen(backend)
    broker = RabbitBroker(middlewares=[FastStreamMiddleware])

    @broker.subscriber("orders")
    async def handle(body: str) -> None:
        await seen.write(db, body)
        if body == "bad":
            raise ValueError(body)

    async with TestRabbitBroker(broker) as test_broker:
        await test_broker.publish("ok", "orders")
        with pytest.raises(ValueError, match="bad"):
            await test_broker.publish("bad", "orders")
    assert seen.ran == [("ok", True)]
    assert await backend.names() == ["ok"]
    await assert_clean(backend, db)


async def test_taskiq_runs_them_after_a_committed_job_only(
    backend: Backend, redis_url: str
) -> None:
    from taskiq_redis import RedisStreamBroker

    from .test_taskiq import worker

    db = backend.database()
    seen = Seen(backend)

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="add")
        async def add(name: str) -> None:
            await seen.write(db, name)
            if name == "bad":
                raise ValueError(name)

    async with worker(redis_url, register) as w:
        await w.kiq("add", "ok")
        assert await w.receiver.next_finished() is None
        await w.kiq("add", "bad")
        await w.receiver.next_finished()
    assert seen.ran == [("ok", True)]
    assert await backend.names() == ["ok"]
    await assert_clean(backend, db)
