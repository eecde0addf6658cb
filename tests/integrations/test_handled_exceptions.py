"""A handler that raised is rolled back whatever status an exception handler answers.

Hardening defect 12: a handler writes a row, then raises ``OutOfStock``; the application maps
the exception to a 302 (a "sold out" page) or a 200. The row must not be committed, in
every framework and every way of installing the integration, while a request that returns
normally on the same app still commits. The backend's teardown checks that no connection
is left checked out and no transaction open.
"""

# No `from __future__ import annotations`: FastAPI and Litestar read the handlers'
# annotations at runtime.

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from sqla_context import Database
from sqla_context.aiohttp import session_middleware, setup
from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert

litestar = pytest.importorskip("litestar", reason="Litestar is not installed")
from litestar import Litestar  # noqa: E402
from litestar import Request as LitestarRequest  # noqa: E402
from litestar import Response as LitestarResponse  # noqa: E402
from litestar import post as litestar_post  # noqa: E402
from litestar.middleware import DefineMiddleware  # noqa: E402
from litestar.params import FromPath  # noqa: E402
from litestar.response import Redirect  # noqa: E402

from sqla_context.litestar import SqlaContextPlugin  # noqa: E402


class OutOfStock(Exception):
    pass


# Each builder returns an app with two routes: POST /buy/{name} writes and raises
# OutOfStock, which the app answers with `status`; POST /ok/{name} writes and returns.
Builder = Callable[[Database, int], Any]


# -- FastAPI -----------------------------------------------------------------------------------


def fastapi_app(db: Database, status: int, *, layout: str) -> FastAPI:
    app = FastAPI()

    def answer() -> Any:
        if status == 302:
            return RedirectResponse("/sold-out", status_code=302)
        return JSONResponse({"sold_out": True}, status_code=status)

    async def out_of_stock(request: Request, exc: Exception) -> Any:
        return answer()

    async def passes(request: Request, call_next: Any) -> Any:  # @app.middleware("http")
        return await call_next(request)

    async def maps(request: Request, call_next: Any) -> Any:  # handles it in dispatch
        try:
            return await call_next(request)
        except OutOfStock:
            return answer()

    if layout == "session-inside-http-middleware":
        app.add_exception_handler(OutOfStock, out_of_stock)
        app.add_middleware(SessionMiddleware)
        app.middleware("http")(passes)  # added last: outermost
    elif layout == "session-outside-http-middleware":
        app.add_exception_handler(OutOfStock, out_of_stock)
        app.middleware("http")(passes)
        app.add_middleware(SessionMiddleware)
    else:  # the exception reaches a BaseHTTPMiddleware, whose dispatch answers it
        app.middleware("http")(maps)
        app.middleware("http")(passes)  # one more in between
        app.add_middleware(SessionMiddleware)

    @app.post("/buy/{name}")
    async def buy(name: str) -> None:
        await insert(await db.session(), name)
        raise OutOfStock

    @app.post("/ok/{name}")
    async def ok(name: str) -> None:
        await insert(await db.session(), name)

    return app


# -- Litestar ----------------------------------------------------------------------------------


def litestar_app(db: Database, status: int, *, install: str) -> Any:
    def out_of_stock(request: LitestarRequest, exc: Exception) -> LitestarResponse[Any]:
        if status == 302:
            return Redirect("/sold-out", status_code=302)
        return LitestarResponse({"sold_out": True}, status_code=status)

    @litestar_post("/buy/{name:str}")
    async def buy(name: FromPath[str]) -> None:
        await insert(await db.session(), name)
        raise OutOfStock

    @litestar_post("/ok/{name:str}", status_code=200)
    async def ok(name: FromPath[str]) -> None:
        await insert(await db.session(), name)

    options: dict[str, Any] = {
        "route_handlers": [buy, ok],
        "exception_handlers": {OutOfStock: out_of_stock},
        "logging_config": None,
    }
    if install == "plugin":
        return Litestar(plugins=[SqlaContextPlugin(db)], **options)
    if install == "middleware":
        return Litestar(middleware=[DefineMiddleware(SessionMiddleware)], **options)
    return SessionMiddleware(Litestar(**options))  # type: ignore[arg-type]


# -- aiohttp -----------------------------------------------------------------------------------


def aiohttp_app(db: Database, status: int, *, install: str) -> web.Application:
    @web.middleware
    async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OutOfStock:
            if status == 302:
                return web.Response(status=302, headers={"Location": "/sold-out"})
            return web.json_response({"sold_out": True}, status=status)

    async def buy(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        raise OutOfStock

    async def ok(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        return web.Response(text="ok")

    if install == "outside":  # the error pages see the session middleware's exception
        app = web.Application(middlewares=[error_pages, session_middleware()])
    elif install == "setup":  # setup() puts the session middleware outside the error pages
        app = web.Application(middlewares=[error_pages])
        setup(app, db)
    else:  # error pages appended after setup(): still inside its marker once started
        app = web.Application()
        setup(app, db)
        app.middlewares.append(error_pages)
    app.router.add_post("/buy/{name}", buy)
    app.router.add_post("/ok/{name}", ok)
    return app


# -- the requests ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def post_to(app: Any) -> AsyncIterator[Callable[[str], Any]]:
    """A function that POSTs a path to ``app`` and returns the status, redirects not followed."""
    if isinstance(app, web.Application):
        async with TestServer(app, host="127.0.0.1") as server, TestClient(server) as client:

            async def post_aiohttp(path: str) -> int:
                async with client.post(path, allow_redirects=False) as response:
                    return response.status

            yield post_aiohttp
        return
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def post_asgi(path: str) -> int:
            return (await client.post(path)).status_code

        yield post_asgi


APPS = [
    pytest.param(
        lambda db, s: fastapi_app(db, s, layout="session-inside-http-middleware"),
        id="fastapi-session-inside-http-middleware",
    ),
    pytest.param(
        lambda db, s: fastapi_app(db, s, layout="session-outside-http-middleware"),
        id="fastapi-session-outside-http-middleware",
    ),
    pytest.param(
        lambda db, s: fastapi_app(db, s, layout="dispatch-answers"),
        id="fastapi-http-middleware-dispatch-answers",
    ),
    pytest.param(lambda db, s: litestar_app(db, s, install="plugin"), id="litestar-plugin"),
    pytest.param(lambda db, s: litestar_app(db, s, install="middleware"), id="litestar-middleware"),
    pytest.param(lambda db, s: litestar_app(db, s, install="wrapped"), id="litestar-wrapped"),
    pytest.param(lambda db, s: aiohttp_app(db, s, install="outside"), id="aiohttp-outside"),
    pytest.param(lambda db, s: aiohttp_app(db, s, install="setup"), id="aiohttp-setup"),
    pytest.param(
        lambda db, s: aiohttp_app(db, s, install="appended-after-setup"),
        id="aiohttp-appended-after-setup",
    ),
]


@pytest.mark.parametrize("status", [302, 200])
@pytest.mark.parametrize("build", APPS)
async def test_handled_exception_is_rolled_back_whatever_the_status(
    backend: Backend, build: Builder, status: int
) -> None:
    db = backend.database()
    async with post_to(build(db, status)) as post:
        assert await post("/buy/half-done") == status, "the status the handler mapped"
        assert await post("/ok/kept") == 200
    assert await backend.names() == ["kept"], "the raising handler's row was not committed"
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0
