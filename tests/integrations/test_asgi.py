"""SessionMiddleware through httpx.ASGITransport, on every backend."""

# No `from __future__ import annotations`: FastAPI must evaluate the Depends(db.session)
# annotation that refers to a local `db`.

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from sqla_context import ConfigurationError, Database, scope
from sqla_context.asgi import SessionMiddleware, dispose_at_shutdown

from ..conftest import Backend, insert


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def make_app(backend: Backend, db: Database, **middleware: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, **middleware)
    seen: dict[str, Any] = {}
    app.state.seen = seen

    @app.post("/items/{name}", status_code=201)
    async def create(name: str) -> dict[str, str]:
        await insert(await db.session(), name)
        return {"name": name}

    @app.post("/items/{name}/status/{status}")
    async def create_with_status(name: str, status: int) -> JSONResponse:
        await insert(await db.session(), name)
        return JSONResponse({"name": name}, status_code=status)

    @app.post("/items/{name}/raise")
    async def create_then_raise(name: str) -> None:
        await insert(await db.session(), name)
        raise RuntimeError("handler bug")

    @app.post("/items/{name}/http-exception")
    async def create_then_reject(name: str) -> None:
        await insert(await db.session(), name)
        raise HTTPException(status_code=422, detail="rejected")

    @app.post("/doom")
    async def doom() -> dict[str, str]:
        await backend.doom(await db.session())
        return {"status": "looks fine to the handler"}

    @app.post("/early-close/{name}")
    async def early_close(name: str) -> dict[str, int]:
        await insert(await db.session(), name)
        await db.close_session()
        checked_out = db.engine.pool.checkedout()
        committed = len(await backend.names())
        return {"checked_out": checked_out, "committed": committed}

    @app.get("/depends")
    async def depends(session: Annotated[AsyncSession, Depends(db.session)]) -> dict[str, bool]:
        return {"same": session is await db.session()}

    @app.post("/stream/{name}")
    async def stream(name: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"start;"
            session = await db.session()  # after the headers: a fresh session
            await insert(session, name)
            seen["stream_committed_before_end"] = await backend.names()
            yield b"inserted;"

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/background/{name}")
    async def background(name: str, tasks: BackgroundTasks) -> dict[str, str]:
        await insert(await db.session(), name)

        async def later() -> None:
            await insert(await db.session(), f"{name}-bg")

        tasks.add_task(later)
        return {"queued": name}

    @app.post("/background-fails/{name}")
    async def background_fails(name: str, tasks: BackgroundTasks) -> dict[str, str]:
        await insert(await db.session(), name)

        async def later() -> None:
            await insert(await db.session(), f"{name}-bg")
            raise RuntimeError("background bug")

        tasks.add_task(later)
        return {"queued": name}

    return app


async def test_success_commits_before_the_response(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post("/items/a")
    assert response.status_code == 201
    assert await backend.names() == ["a"]
    assert db.engine.pool.checkedout() == 0


@pytest.mark.parametrize("status", [200, 204, 302, 399])
async def test_status_below_400_commits(backend: Backend, status: int) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post(f"/items/s{status}/status/{status}")
    assert response.status_code == status
    assert await backend.names() == [f"s{status}"]


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
async def test_error_status_rolls_back(backend: Backend, status: int) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post(f"/items/s{status}/status/{status}")
    assert response.status_code == status
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_exception_rolls_back_and_answers_500(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db), raise_app_exceptions=False) as c:
        response = await c.post("/items/x/raise")
    assert response.status_code == 500
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_http_exception_rolls_back(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post("/items/x/http-exception")
    assert response.status_code == 422
    assert await backend.names() == []


async def test_failed_commit_turns_200_into_500(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with client(make_app(backend, db), raise_app_exceptions=False) as c:
            response = await c.post("/doom")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "looks fine" not in response.text
    assert "commit failed for POST /doom; answering 500 instead of 200" in caplog.text
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_failed_commit_is_raised_to_the_server(backend: Backend) -> None:
    from sqla_context import CommitError

    db = backend.database()
    async with client(make_app(backend, db)) as c:
        with pytest.raises(CommitError):
            await c.post("/doom")
    assert db.engine.pool.checkedout() == 0


async def test_custom_commit_on(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db, commit_on=lambda status: status in (200, 201, 409))
    async with client(app) as c:
        assert (await c.post("/items/conflict/status/409")).status_code == 409
        assert (await c.post("/items/accepted/status/202")).status_code == 202
    assert await backend.names() == ["conflict"]


async def test_early_close_returns_the_connection_mid_request(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post("/early-close/e")
    assert response.json() == {"checked_out": 0, "committed": 1}
    assert await backend.names() == ["e"]


async def test_fastapi_depends_returns_the_scope_session(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.get("/depends")
    assert response.json() == {"same": True}


async def test_streaming_body_work_is_committed_when_the_app_returns(backend: Backend) -> None:
    db = backend.database()
    app = make_app(backend, db)
    async with client(app) as c:
        response = await c.post("/stream/streamed")
    assert response.status_code == 200
    assert response.text == "start;inserted;"
    assert app.state.seen["stream_committed_before_end"] == [], "not committed mid-stream"
    assert await backend.names() == ["streamed"]
    assert db.engine.pool.checkedout() == 0


async def test_background_task_work_is_committed(backend: Backend) -> None:
    db = backend.database()
    async with client(make_app(backend, db)) as c:
        response = await c.post("/background/job")
    assert response.status_code == 200
    assert await backend.names() == ["job", "job-bg"]
    assert db.engine.pool.checkedout() == 0


async def test_failing_background_task_rolls_back_only_its_own_work(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    async with client(make_app(backend, db), raise_app_exceptions=False) as c:
        response = await c.post("/background-fails/job")
    assert response.status_code == 200, "the response was already committed and sent"
    assert await backend.names() == ["job"]
    assert db.engine.pool.checkedout() == 0


async def test_request_inside_an_open_scope_joins_it(backend: Backend) -> None:
    db = backend.database()
    async with scope(commit="never"):
        mine = await db.session()
        async with client(make_app(backend, db)) as c:
            assert (await c.get("/depends")).json() == {"same": True}
            assert (await c.post("/items/joined")).status_code == 201
        assert mine.in_transaction(), "the middleware did not end the test's transaction"
        rows = await mine.execute(text("SELECT name FROM items"))
        assert rows.scalars().all() == ["joined"]
        assert await backend.names() == [], "nothing committed behind the test's back"
    assert await backend.names() == []


async def test_no_database_work_touches_no_engine(sqlite: Backend) -> None:
    db = sqlite.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    async with client(app) as c:
        assert (await c.get("/ping")).json() == "pong"
    assert db.engine.pool.checkedin() + db.engine.pool.checkedout() == 0, "never connected"


async def test_starlette_app(backend: Backend) -> None:
    db = backend.database()

    async def create(request: Request) -> PlainTextResponse:
        await insert(await db.session(), request.path_params["name"])
        status = int(request.query_params.get("status", "200"))
        return PlainTextResponse("ok", status_code=status)

    app = Starlette(routes=[Route("/items/{name}", create, methods=["POST"])])
    app.add_middleware(SessionMiddleware)
    async with client(app) as c:
        assert (await c.post("/items/kept")).status_code == 200
        assert (await c.post("/items/dropped?status=400")).status_code == 400
    assert await backend.names() == ["kept"]


async def test_bare_asgi_app(backend: Backend) -> None:
    db = backend.database()

    async def app(scope_: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        await insert(await db.session(), scope_["path"].strip("/"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with client(SessionMiddleware(app)) as c:
        assert (await c.get("/bare")).text == "ok"
    assert await backend.names() == ["bare"]


async def test_app_returning_without_a_response_rolls_back(backend: Backend) -> None:
    db = backend.database()

    async def app(scope_: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        await insert(await db.session(), "never-answered")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"nothing should be sent, got {message}")

    http_scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await SessionMiddleware(app)(http_scope, receive, send)  # the server would answer 500
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_lifespan_passes_through_and_disposes(sqlite: Backend) -> None:
    db = sqlite.database()
    engine = db.engine
    app = FastAPI(lifespan=dispose_at_shutdown(db))
    app.add_middleware(SessionMiddleware)
    events: list[dict[str, Any]] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert db._engine is None, "disposed at shutdown"
    assert engine is not None


async def talk_websocket(app: Any, texts: list[str]) -> list[str]:
    """Drive one WebSocket connection over raw ASGI messages; return the texts sent back."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in [{"type": "websocket.connect"}] + [
        {"type": "websocket.receive", "text": t} for t in texts
    ]:
        incoming.put_nowait(message)
    replies: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            replies.append(message["text"])

    ws_scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("test", 1234),
        "subprotocols": [],
        "state": {},
    }
    await asyncio.wait_for(app(ws_scope, incoming.get, send), 10)
    return replies


async def test_websocket_gets_a_short_scope_per_message(backend: Backend) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)
    outside: list[str] = []

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await db.session()
        except LookupError as exc:  # NoScopeError: no scope for the whole connection
            outside.append(type(exc).__name__)
        while (name := await websocket.receive_text()) != "bye":
            async with scope():
                await insert(await db.session(), name)
            await websocket.send_text(f"stored {name}")
        await websocket.close()

    assert await talk_websocket(app, ["m1", "m2", "bye"]) == ["stored m1", "stored m2"]
    assert outside == ["NoScopeError"]
    assert await backend.names() == ["m1", "m2"]
    assert db.engine.pool.checkedout() == 0


async def test_websocket_connection_mode_commits_at_close(sqlite: Backend) -> None:
    db = sqlite.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware, websocket="connection")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await insert(await db.session(), await websocket.receive_text())
        await websocket.close()

    await talk_websocket(app, ["whole-connection"])
    assert await sqlite.names() == ["whole-connection"]


def test_invalid_websocket_mode() -> None:
    with pytest.raises(ConfigurationError, match="'none', 'connection'"):
        SessionMiddleware(FastAPI(), websocket="always")  # type: ignore[arg-type]
