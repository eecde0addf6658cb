"""sqla_context.aiohttp behind a real aiohttp server on 127.0.0.1, on every backend.

Each test runs ``aiohttp.test_utils.TestServer`` in its own event loop and talks to it over
TCP with ``TestClient``; assertions read the database through the backend's own engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from sqlalchemy import text

from sqla_context import CommitError, ConfigurationError, Database, NoScopeError, scope
from sqla_context.aiohttp import dispose_on_cleanup, session_middleware, setup

from ..conftest import Backend, insert

WAIT = 10  # seconds: the bound on every wait for the server


class RunAppServer(TestServer):
    """A TestServer with ``web.run_app``'s default: a handler whose client left runs on.

    (TestServer itself starts its runner with ``handler_cancellation=True``.)
    """

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, server_class: type[TestServer] = TestServer
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with server_class(app, host="127.0.0.1") as server, TestClient(server) as client:
        yield client


def finished(app: web.Application) -> asyncio.Queue[str]:
    """Put the path of every finished request in a queue, *after* session_middleware ended.

    Installs an outermost middleware, so a test can wait for the rollback/close of a
    request whose client has gone instead of sleeping.
    """
    done: asyncio.Queue[str] = asyncio.Queue()

    @web.middleware
    async def report(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            done.put_nowait(request.path)

    app.middlewares.insert(0, report)
    return done


def make_app(backend: Backend, db: Database, **options: Any) -> web.Application:
    app = web.Application(middlewares=[session_middleware(**options)])
    routes = web.RouteTableDef()

    @routes.post("/items/{name}")
    async def create(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        return web.json_response({"name": request.match_info["name"]}, status=201)

    @routes.post("/items/{name}/status/{status}")
    async def create_with_status(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        return web.Response(status=int(request.match_info["status"]))

    @routes.post("/items/{name}/raise")
    async def create_then_raise(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        raise RuntimeError("handler bug")

    @routes.post("/items/{name}/not-found")
    async def create_then_not_found(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        raise web.HTTPNotFound(text="no such thing")

    @routes.post("/items/{name}/redirect")
    async def create_then_redirect(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        raise web.HTTPFound("/elsewhere")

    @routes.post("/doom")
    async def doom(request: web.Request) -> web.Response:
        await backend.doom(await db.session())
        return web.json_response({"status": "looks fine to the handler"})

    @routes.post("/doom/redirect")
    async def doom_then_redirect(request: web.Request) -> web.Response:
        await backend.doom(await db.session())
        raise web.HTTPFound("/elsewhere")

    @routes.post("/early-close/{name}")
    async def early_close(request: web.Request) -> web.Response:
        await insert(await db.session(), request.match_info["name"])
        await db.close_session()
        checked_out = db.engine.pool.checkedout()
        committed = len(await backend.names())
        return web.json_response({"checked_out": checked_out, "committed": committed})

    app.add_routes(routes)
    return app


async def test_success_commits_before_the_response(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db)
    before_sending: list[list[str]] = []

    @web.middleware
    async def outermost(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        assert not response.prepared, "aiohttp has not sent a byte of it yet"
        before_sending.append(await backend.names())
        return response

    app.middlewares.insert(0, outermost)
    async with serve(app) as client:
        response = await client.post("/items/a")
        assert response.status == 201
        assert await response.json() == {"name": "a"}
    assert before_sending == [["a"]], "committed before aiohttp sent the response"
    assert db.engine.pool.checkedout() == 0


@pytest.mark.parametrize("status", [200, 201, 204, 302, 399])
async def test_status_below_400_commits(backend: Backend, status: int) -> None:
    db = backend.database()
    async with serve(make_app(backend, db)) as client:
        response = await client.post(f"/items/s{status}/status/{status}", allow_redirects=False)
        assert response.status == status
    assert await backend.names() == [f"s{status}"]


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
async def test_error_status_rolls_back(backend: Backend, status: int) -> None:
    db = backend.database()
    async with serve(make_app(backend, db)) as client:
        response = await client.post(f"/items/s{status}/status/{status}")
        assert response.status == status
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_exception_rolls_back_and_answers_500(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        async with serve(make_app(backend, db)) as client:
            response = await client.post("/items/x/raise")
            assert response.status == 500
    assert "handler bug" in caplog.text, "aiohttp logs the handler's exception"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_raised_http_not_found_rolls_back(backend: Backend) -> None:
    db = backend.database()
    async with serve(make_app(backend, db)) as client:
        response = await client.post("/items/x/not-found")
        assert response.status == 404
        assert await response.text() == "no such thing"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_raised_http_found_commits(backend: Backend) -> None:
    db = backend.database()
    async with serve(make_app(backend, db)) as client:
        response = await client.post("/items/moved/redirect", allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"
    assert await backend.names() == ["moved"]
    assert db.engine.pool.checkedout() == 0


async def test_failed_commit_turns_200_into_500(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR):
        async with serve(make_app(backend, db)) as client:
            response = await client.post("/doom")
            assert response.status == 500
            body = await response.text()
    assert "looks fine" not in body
    assert "commit failed for POST /doom; answering 500 instead of 200" in caplog.text
    # aiohttp got the CommitError from the middleware and logged it with its traceback.
    server_errors = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server_errors
    assert server_errors[0].exc_info is not None
    assert isinstance(server_errors[0].exc_info[1], CommitError)
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_failed_commit_turns_a_raised_redirect_into_500(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with serve(make_app(backend, db)) as client:
            response = await client.post("/doom/redirect", allow_redirects=False)
            assert response.status == 500
    assert "commit failed for POST /doom/redirect; answering 500 instead of 302" in caplog.text
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_outer_middleware_sees_the_commit_error(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db)
    seen: list[BaseException] = []

    @web.middleware
    async def error_page(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except CommitError as exc:
            seen.append(exc)
            return web.json_response({"error": "please retry"}, status=503)

    app.middlewares.insert(0, error_page)
    async with serve(app) as client:
        response = await client.post("/doom")
        assert response.status == 503
        assert await response.json() == {"error": "please retry"}
    assert len(seen) == 1
    assert await backend.names() == []


async def test_custom_commit_on(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db, commit_on=lambda status: status in (200, 201, 409))
    async with serve(app) as client:
        assert (await client.post("/items/conflict/status/409")).status == 409
        assert (await client.post("/items/accepted/status/202")).status == 202
        assert (await client.post("/items/plain")).status == 201
    assert await backend.names() == ["conflict", "plain"]


async def test_commit_on_that_raises_rolls_back(sqlite: Backend) -> None:
    db = sqlite.database()

    def broken(status: int) -> bool:
        raise ValueError("bad commit_on")

    async with serve(make_app(sqlite, db, commit_on=broken)) as client:
        assert (await client.post("/items/x")).status == 500
        assert (await client.post("/items/y/redirect", allow_redirects=False)).status == 500
    assert await sqlite.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_early_close_returns_the_connection_mid_request(backend: Backend) -> None:
    db = backend.database()
    async with serve(make_app(backend, db)) as client:
        response = await client.post("/early-close/e")
        assert await response.json() == {"checked_out": 0, "committed": 1}
    assert await backend.names() == ["e"]


async def test_request_without_database_work_touches_no_engine(sqlite: Backend) -> None:
    db = sqlite.database()

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application(middlewares=[session_middleware()])
    app.router.add_get("/ping", ping)
    async with serve(app) as client:
        assert await (await client.get("/ping")).text() == "pong"
    assert db.engine.pool.checkedin() + db.engine.pool.checkedout() == 0, "never connected"


# -- responses the handler started itself --------------------------------------------------------


def stream_app(backend: Backend, db: Database, seen: dict[str, Any]) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        status = int(request.query.get("status", "200"))
        response = web.StreamResponse(status=status)
        await response.prepare(request)  # status line and headers go out now
        await response.write(b"start;")
        session = await db.session()
        if name == "doomed":
            await backend.doom(session)
        else:
            await insert(session, name)
        seen["committed_while_streaming"] = await backend.names()
        await response.write(b"inserted;")
        return response

    app = web.Application(middlewares=[session_middleware()])
    app.router.add_post("/stream/{name}", stream)
    return app


async def test_prepared_stream_commits_when_the_handler_returns(backend: Backend) -> None:
    db = backend.database()
    seen: dict[str, Any] = {}
    async with serve(stream_app(backend, db, seen)) as client:
        response = await client.post("/stream/streamed")
        assert response.status == 200
        assert await response.read() == b"start;inserted;"
    assert seen["committed_while_streaming"] == [], "not committed mid-stream"
    assert await backend.names() == ["streamed"]
    assert db.engine.pool.checkedout() == 0


async def test_prepared_stream_with_error_status_rolls_back(backend: Backend) -> None:
    db = backend.database()
    async with serve(stream_app(backend, db, {})) as client:
        response = await client.post("/stream/failed?status=500")
        assert response.status == 500
        assert await response.read() == b"start;inserted;"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_failed_commit_of_a_prepared_stream_cuts_the_body_off(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with serve(stream_app(backend, db, {})) as client:
            response = await client.post("/stream/doomed")
            assert response.status == 200, "the status was sent before the commit"
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # the chunked body never gets its last chunk
    assert "commit failed for POST /stream/doomed after its 200 response had started" in (
        caplog.text
    )
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


# -- WebSockets ----------------------------------------------------------------------------------


async def test_websocket_gets_no_scope_and_uses_one_per_message(backend: Backend) -> None:
    db = backend.database()
    outside: list[str] = []

    async def chat(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            await db.session()
        except NoScopeError as exc:  # no scope for the whole connection
            outside.append(type(exc).__name__)
        async for message in ws:
            async with scope():
                await insert(await db.session(), message.data)
            await ws.send_str(f"stored {message.data}")  # committed before we answer
        return ws

    app = web.Application(middlewares=[session_middleware()])
    app.router.add_get("/ws", chat)
    async with serve(app) as client, client.ws_connect("/ws") as ws:
        for name in ("m1", "m2"):
            await ws.send_str(name)
            assert await asyncio.wait_for(ws.receive_str(), WAIT) == f"stored {name}"
            assert name in await backend.names()
    assert outside == ["NoScopeError"]
    assert await backend.names() == ["m1", "m2"]
    assert db.engine.pool.checkedout() == 0


async def test_websocket_connection_mode_commits_when_the_handler_returns(
    backend: Backend,
) -> None:
    db = backend.database()
    app = web.Application(middlewares=[session_middleware(websocket="connection")])
    done = finished(app)

    async def short(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await insert(await db.session(), await ws.receive_str())
        await ws.close()
        return ws

    app.router.add_get("/ws", short)
    async with serve(app) as client:
        async with client.ws_connect("/ws") as ws:
            await ws.send_str("whole-connection")
            await asyncio.wait_for(ws.receive(), WAIT)  # the server's close
        assert await asyncio.wait_for(done.get(), WAIT) == "/ws"
    assert await backend.names() == ["whole-connection"]
    assert db.engine.pool.checkedout() == 0


async def test_websocket_commit_survives_the_client_closing_the_connection(
    backend: Backend,
) -> None:
    # A client closes the TCP connection right after the closing handshake. TestServer runs
    # with handler_cancellation=True, so aiohttp cancels the handler's task then, possibly
    # while the middleware commits (seen once under load on MariaDB). The commit here waits
    # until the server has seen the connection go: the cancellation lands in the middle.
    requests: list[web.Request] = []

    async def slow_commit(session: Any) -> None:
        deadline = asyncio.get_running_loop().time() + WAIT
        while requests[0].transport is not None:  # the server has not seen the hang-up yet
            assert asyncio.get_running_loop().time() < deadline, "the connection stayed open"
            await asyncio.sleep(0.01)

    db = backend.database(before_commit=slow_commit)
    app = web.Application(middlewares=[session_middleware(websocket="connection")])
    outcomes: list[str] = []

    @web.middleware
    async def outcome(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise

    app.middlewares.insert(0, outcome)
    done = finished(app)

    async def short(request: web.Request) -> web.WebSocketResponse:
        requests.append(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await insert(await db.session(), await ws.receive_str())
        await ws.close()
        return ws

    app.router.add_get("/ws", short)
    async with serve(app) as client:
        async with client.ws_connect("/ws") as ws:
            await ws.send_str("kept")
            await asyncio.wait_for(ws.receive(), WAIT)  # the server's close
        assert await asyncio.wait_for(done.get(), WAIT) == "/ws"
    assert outcomes == ["cancelled"], "the server cancelled the handler during the commit"
    assert await backend.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


def test_invalid_websocket_mode() -> None:
    with pytest.raises(ConfigurationError, match="'none', 'connection'"):
        session_middleware(websocket="always")  # type: ignore[arg-type]


# -- an active scope, setup() and cleanup --------------------------------------------------------


async def test_request_inside_an_open_scope_joins_it(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db)
    seen: list[bool] = []

    async def same(request: web.Request) -> web.Response:
        seen.append(await db.session() is mine)
        return web.Response(text="ok")

    app.router.add_get("/same", same)
    async with scope(commit="never"):
        mine = await db.session()
        # The server's tasks copy the context it was started in: this scope.
        async with serve(app) as client:
            assert (await client.get("/same")).status == 200
            assert (await client.post("/items/joined")).status == 201
        assert seen == [True]
        assert mine.in_transaction(), "the middleware did not end the test's transaction"
        rows = await mine.execute(text("SELECT name FROM items"))
        assert rows.scalars().all() == ["joined"]
        assert await backend.names() == [], "nothing committed behind the test's back"
    assert await backend.names() == []


async def test_setup_installs_the_middleware_first_and_disposes_on_cleanup(
    backend: Backend,
) -> None:
    db = backend.database()
    app = make_app(backend, db)
    app.middlewares.clear()
    user: list[str] = []

    @web.middleware
    async def load_user(request: web.Request, handler: Handler) -> web.StreamResponse:
        await db.session()  # runs inside the request's scope: setup() put it outside
        user.append("loaded")
        return await handler(request)

    app.middlewares.append(load_user)
    setup(app, db)
    assert app.middlewares[1] is load_user
    async with serve(app) as client:
        assert (await client.post("/items/set-up")).status == 201
        engine = db.engine
        assert engine.pool.checkedout() == 0
    # Leaving `serve` shut the app down: on_cleanup disposed the engine.
    assert db._engine is None
    assert user == ["loaded"]
    assert await backend.names() == ["set-up"]


async def test_dispose_on_cleanup_disposes_every_database(
    sqlite: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = sqlite.database(), sqlite.database()

    class Broken(Database):
        async def dispose(self) -> None:
            raise OSError("dispose failed")

    app = web.Application()
    dispose_on_cleanup(app, first, Broken(sqlite.url), second)
    for db in (first, second):
        assert db.engine is not None
    with caplog.at_level(logging.WARNING, logger="sqla_context"):
        async with serve(app):
            pass
    assert first._engine is None
    assert second._engine is None, "a failing dispose() does not stop the others"
    assert "disposing" in caplog.text
    assert "dispose failed" in caplog.text


# -- clients that disconnect mid-request ---------------------------------------------------------


class Slow:
    """An app whose handler inserts, then waits for ``release``: the client hangs up meanwhile."""

    def __init__(self, db: Database) -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self.request: web.Request | None = None
        self.app = web.Application(middlewares=[session_middleware()])
        self.app.router.add_post("/slow/{name}", self.handler)
        self.done = finished(self.app)
        self.db = db

    async def handler(self, request: web.Request) -> web.Response:
        await insert(await self.db.session(), request.match_info["name"])
        self.request = request
        self.reached.set()
        await self.release.wait()
        return web.Response(text="done")

    async def hang_up(self, client: TestClient[web.Request, web.Application]) -> None:
        """Send a request, and close the connection once the handler has inserted its row."""
        sent = asyncio.create_task(client.post("/slow/abandoned"))
        await asyncio.wait_for(self.reached.wait(), WAIT)
        assert self.db.engine.pool.checkedout() == 1
        sent.cancel()  # aiohttp's client closes the connection of a cancelled request
        with pytest.raises(asyncio.CancelledError):
            await sent


async def test_disconnect_cancels_the_handler_and_rolls_back(backend: Backend) -> None:
    # TestServer runs with handler_cancellation=True: the hang-up cancels the handler task.
    slow = Slow(backend.database())
    async with serve(slow.app) as client:
        await slow.hang_up(client)
        assert await asyncio.wait_for(slow.done.get(), WAIT) == "/slow/abandoned"
        assert not slow.release.is_set(), "the handler was cancelled while it waited"
        assert slow.db.engine.pool.checkedout() == 0
        assert await backend.open_transactions() == 0
    assert await backend.names() == []


async def test_disconnect_under_run_app_defaults_rolls_back_at_the_end(backend: Backend) -> None:
    # web.run_app() does not cancel handlers: this one runs to its end, then its response
    # finds no client, and the middleware rolls back instead of committing.
    slow = Slow(backend.database())
    async with serve(slow.app, RunAppServer) as client:
        await slow.hang_up(client)
        assert slow.request is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while slow.request.transport is not None:  # until the server notices the hang-up
            assert loop.time() < deadline, "the server never noticed the disconnect"
            await asyncio.sleep(0.01)
        assert slow.done.empty(), "the handler is still running"
        assert slow.db.engine.pool.checkedout() == 1
        slow.release.set()
        assert await asyncio.wait_for(slow.done.get(), WAIT) == "/slow/abandoned"
        assert slow.db.engine.pool.checkedout() == 0
        assert await backend.open_transactions() == 0
    assert await backend.names() == []
