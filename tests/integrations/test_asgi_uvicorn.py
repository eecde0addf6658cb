"""SessionMiddleware behind a real uvicorn server on 127.0.0.1: disconnects and streaming.

The server runs in the test's event loop (so the test can read the pool directly), on a
socket bound to an ephemeral loopback port; clients talk to it over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from sqla_context import Database
from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert


class Finished:
    """Outermost ASGI wrapper: an event per finished HTTP request, set after the middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.done: asyncio.Queue[str] = asyncio.Queue()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.done.put_nowait(scope["path"])


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue here until uvicorn accepts them
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def build(backend: Backend, db: Database, reached: asyncio.Event) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.get("/stream/{name}")
    async def stream(name: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            await insert(await db.session(), name)
            reached.set()
            await asyncio.Event().wait()  # stalls until the client hangs up
            yield b"never sent\n"

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/stream-ok/{name}")
    async def stream_ok(name: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                await insert(await db.session(), f"{name}{i}")
                yield f"{i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/wait-for-hangup/{name}")
    async def wait_for_hangup(name: str, request: Request) -> dict[str, str]:
        await insert(await db.session(), name)
        reached.set()
        await request.body()
        message = await request.receive()  # body read: the next event is the hang-up
        assert message["type"] == "http.disconnect"
        return {"saw": message["type"]}

    @app.post("/doom")
    async def doom() -> dict[str, str]:
        await backend.doom(await db.session())
        return {"status": "ok"}

    return app


async def raw_request(port: int, request: bytes) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def test_hangup_mid_stream_rolls_back_and_leaks_nothing(backend: Backend) -> None:
    db = backend.database()
    reached = asyncio.Event()
    app = Finished(build(backend, db, reached))
    async with serve(app) as port:
        reader, writer = await raw_request(
            port, b"GET /stream/streamed HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"first chunk\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reached.wait(), 10)
        writer.close()  # the client hangs up mid-stream
        assert await asyncio.wait_for(app.done.get(), 10) == "/stream/streamed"
    assert await backend.names() == [], "the stream's work was rolled back"
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_hangup_before_the_response_rolls_back(backend: Backend) -> None:
    db = backend.database()
    reached = asyncio.Event()
    app = Finished(build(backend, db, reached))
    async with serve(app) as port:
        _, writer = await raw_request(
            port, b"POST /wait-for-hangup/gone HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        )
        await asyncio.wait_for(reached.wait(), 10)
        writer.close()
        assert await asyncio.wait_for(app.done.get(), 10) == "/wait-for-hangup/gone"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_streaming_over_the_wire_commits(backend: Backend) -> None:
    db = backend.database()
    app = Finished(build(backend, db, asyncio.Event()))
    async with serve(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        response = await c.get("/stream-ok/s")
        assert response.text == "0\n1\n2\n"
        assert await asyncio.wait_for(app.done.get(), 10) == "/stream-ok/s"
    assert await backend.names() == ["s0", "s1", "s2"]
    assert db.engine.pool.checkedout() == 0


async def test_failed_commit_is_a_500_on_the_wire(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    app = Finished(build(backend, db, asyncio.Event()))
    async with serve(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        response = await c.post("/doom")
        assert await asyncio.wait_for(app.done.get(), 10) == "/doom"
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0
