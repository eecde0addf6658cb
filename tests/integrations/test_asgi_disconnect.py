"""A client that hangs up while its handler runs: the handler's work is not committed.

The handler never reads ``receive``: the middleware itself listens for ``http.disconnect``
once the request has opened a session and its body has been read. Over the wire with a
real uvicorn server (100 clients hanging up at once), and in process with a scripted
server for the cases a real server does not produce on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from sqlalchemy import text

from sqla_context import Database
from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert
from .test_asgi_uvicorn import Finished, raw_request, serve, serving

CLIENTS = 100


def build(db: Database, written: Callable[[], None], slow: Callable[[], Awaitable[Any]],
          **options: Any) -> FastAPI:  # fmt: skip
    app = FastAPI()
    app.add_middleware(SessionMiddleware, **options)

    @app.get("/slow/{name}")
    async def slow_call(name: str) -> dict[str, str]:
        await insert(await db.session(), name)
        written()
        await slow()  # a slow call while the transaction is open
        return {"name": name}

    return app


@pytest.mark.parametrize("mode", ["rollback", "cancel"])
async def test_hundred_hangups_commit_nothing(backend: Backend, mode: str) -> None:
    if backend.kind == "sqlite":
        pytest.skip("one SQLite writer at a time: the single-client tests below cover SQLite")
    db = backend.database(engine_options={"pool_size": 20, "max_overflow": 0})
    writing = 0
    all_writing = asyncio.Event()

    def written() -> None:
        nonlocal writing
        writing += 1
        if writing == 20:  # the pool is full: every connection holds an uncommitted row
            all_writing.set()

    # rollback: the handlers run on until every hang-up has reached the server, then end
    # (the ones still queued for the pool run after the hang-ups); cancel: the handlers stop
    # at once, though their slow call would never end.
    server_saw_hangups = asyncio.Event()
    slow = server_saw_hangups.wait if mode == "rollback" else asyncio.Event().wait
    app = Finished(build(db, written, slow, on_disconnect=mode))
    async with serving(app) as (port, server):
        writers = [
            (await raw_request(port, f"GET /slow/n{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode()))[1]
            for i in range(CLIENTS)
        ]
        await asyncio.wait_for(all_writing.wait(), 20)
        loop = asyncio.get_running_loop()
        hung_up = loop.time()
        for writer in writers:
            writer.close()
        if mode == "cancel":
            while db.engine.pool.checkedout() and loop.time() - hung_up < 10:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            returned = (loop.time() - hung_up) * 1000
            print(f"cancel: connections back in the pool {returned:.0f} ms after the hang-ups")
            assert db.engine.pool.checkedout() == 0
            assert await backend.open_transactions() == 0
        else:
            while server.server_state.connections and loop.time() - hung_up < 10:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert not server.server_state.connections
            server_saw_hangups.set()
        for _ in range(CLIENTS):
            await asyncio.wait_for(app.done.get(), 30)
    assert await backend.names() == [], "a request whose client had gone was committed"
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_a_client_that_stays_gets_its_commit(backend: Backend) -> None:
    db = backend.database()
    app = Finished(build(db, lambda: None, lambda: asyncio.sleep(0.05), on_disconnect="cancel"))
    async with serve(app) as port:
        reader, writer = await raw_request(port, b"GET /slow/kept HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await asyncio.wait_for(app.done.get(), 10)
    assert await backend.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0


# -- in process: a scripted server ----------------------------------------------------------


class Server:
    """An ASGI server's side of one request: scripted ``receive``, recorded ``send``."""

    def __init__(self, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None,
                 http_version: str = "1.1") -> None:  # fmt: skip
        self.scope = {
            "type": "http", "method": method, "path": "/", "raw_path": b"/", "root_path": "",
            "query_string": b"", "headers": headers or [], "http_version": http_version,
            "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
        }  # fmt: skip
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.receive_calls = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.receive_calls += 1
        return await self.messages.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def hang_up(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})


Handler = Callable[[Any], Awaitable[None]]


def asgi_app(handler: Handler) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await handler(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_get_without_reading_receive_rolls_back(backend: Backend) -> None:
    db = backend.database()
    server = Server()
    reached = asyncio.Event()
    release = asyncio.Event()

    async def handler(receive: Any) -> None:
        await insert(await db.session(), "gone")
        reached.set()
        await release.wait()  # the handler never reads receive

    call = asyncio.create_task(SessionMiddleware(asgi_app(handler))(
        server.scope, server.receive, server.send))  # fmt: skip
    await reached.wait()
    server.hang_up()
    release.set()
    await call
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_body_is_read_before_listening(backend: Backend) -> None:
    """A session opened before the body is read: listening starts once the app read it."""
    db = backend.database()
    server = Server("POST", [(b"content-length", b"4")])
    server.messages.put_nowait({"type": "http.request", "body": b"data", "more_body": False})
    bodies: list[bytes] = []
    reached = asyncio.Event()
    release = asyncio.Event()

    async def handler(receive: Any) -> None:
        await insert(await db.session(), "gone")
        assert server.receive_calls == 0, "the middleware must not take the app's body"
        bodies.append((await receive())["body"])
        reached.set()
        await release.wait()

    call = asyncio.create_task(SessionMiddleware(asgi_app(handler))(
        server.scope, server.receive, server.send))  # fmt: skip
    await reached.wait()
    server.hang_up()
    release.set()
    await call
    assert bodies == [b"data"]
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_unexpected_body_goes_to_the_app(sqlite: Backend) -> None:
    """HTTP/2 without content-length, or a server that reports a body after all: kept."""
    db = sqlite.database()
    server = Server("GET")  # declares no body, then sends one
    seen: list[dict[str, Any]] = []

    async def handler(receive: Any) -> None:
        await insert(await db.session(), "kept")
        for _ in range(3):
            server.messages.put_nowait({"type": "http.request", "body": b"x", "more_body": True})
        server.messages.put_nowait({"type": "http.request", "body": b"y", "more_body": False})
        seen.extend([await receive() for _ in range(4)])

    await SessionMiddleware(asgi_app(handler))(server.scope, server.receive, server.send)
    assert [m["body"] for m in seen] == [b"x", b"x", b"x", b"y"]
    assert server.sent[0]["status"] == 200
    assert await sqlite.names() == ["kept"]
    assert db.engine.pool.checkedout() == 0


async def test_listener_reads_at_most_two_messages_for_a_chatty_server(sqlite: Backend) -> None:
    """A test double that answers every receive() with a body must not be drained forever."""
    db = sqlite.database()
    scope = Server().scope
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def handler(_: Any) -> None:
        await insert(await db.session(), "kept")
        for _ in range(5):
            await asyncio.sleep(0)

    await SessionMiddleware(asgi_app(handler))(scope, receive, send)
    assert calls <= 2  # the empty body a server sends, then one more: kept, not drained
    assert await sqlite.names() == ["kept"]


async def test_cancel_mode_stops_the_handler_and_ends_quietly(backend: Backend) -> None:
    db = backend.database()
    server = Server()
    reached = asyncio.Event()
    cancelled = False

    async def handler(receive: Any) -> None:
        nonlocal cancelled
        await insert(await db.session(), "gone")
        reached.set()
        try:
            await asyncio.Event().wait()  # would wait forever
        except asyncio.CancelledError:
            cancelled = True
            raise

    call = asyncio.create_task(SessionMiddleware(asgi_app(handler), on_disconnect="cancel")(
        server.scope, server.receive, server.send))  # fmt: skip
    await reached.wait()
    server.hang_up()
    await asyncio.wait_for(call, 10)  # returns normally: the cancellation was the middleware's
    assert cancelled
    assert not call.cancelled()
    assert server.sent == []
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_cancel_of_the_server_still_propagates(sqlite: Backend) -> None:
    """A cancellation from outside (server shutdown) is not swallowed as if it were ours."""
    db = sqlite.database()
    server = Server()
    reached = asyncio.Event()

    async def handler(receive: Any) -> None:
        await insert(await db.session(), "gone")
        reached.set()
        await asyncio.Event().wait()

    call = asyncio.create_task(SessionMiddleware(asgi_app(handler), on_disconnect="cancel")(
        server.scope, server.receive, server.send))  # fmt: skip
    await reached.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await sqlite.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_hangup_during_the_commit_does_not_cancel_it(backend: Backend) -> None:
    """Once the COMMIT has begun, cancelling it would leave its outcome unknown."""
    in_hook = asyncio.Event()
    go_on = asyncio.Event()

    async def before_commit(session: Any) -> None:
        in_hook.set()
        await go_on.wait()

    db = backend.database(before_commit=before_commit)
    server = Server()

    async def handler(receive: Any) -> None:
        await insert(await db.session(), "committed")

    call = asyncio.create_task(SessionMiddleware(asgi_app(handler), on_disconnect="cancel")(
        server.scope, server.receive, server.send))  # fmt: skip
    await in_hook.wait()
    server.hang_up()
    while server.messages.qsize():  # noqa: ASYNC110 - the middleware's listener takes it
        await asyncio.sleep(0)
    go_on.set()
    await asyncio.wait_for(call, 10)
    assert await backend.names() == ["committed"]
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert db.engine.pool.checkedout() == 0


async def test_default_mode_starts_no_task(sqlite: Backend) -> None:
    """on_disconnect="rollback": the hang-up is taken at the response start, without a task."""
    db = sqlite.database()
    server = Server()
    counts: list[int] = []

    async def handler(receive: Any) -> None:
        before = len(asyncio.all_tasks())
        await insert(await db.session(), "kept")
        counts.append(len(asyncio.all_tasks()) - before)

    await SessionMiddleware(asgi_app(handler))(server.scope, server.receive, server.send)
    assert counts == [0]
    assert server.receive_calls == 1  # looked once, at the response start; nothing was there
    assert await sqlite.names() == ["kept"]


async def test_no_listener_task_for_a_request_without_a_session(sqlite: Backend) -> None:
    db = sqlite.database()
    counts: dict[str, int] = {}

    app = FastAPI()
    app.add_middleware(SessionMiddleware, on_disconnect="cancel")

    @app.get("/nodb")
    async def nodb() -> dict[str, int]:
        counts["nodb"] = len(asyncio.all_tasks())
        return {}

    @app.get("/db")
    async def with_db(request: Request) -> dict[str, int]:
        before = len(asyncio.all_tasks())
        (await (await db.session()).execute(text("SELECT 1"))).scalar_one()
        counts["db"] = len(asyncio.all_tasks()) - before
        return {}

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        counts[f"{scope['path']} outside"] = len(asyncio.all_tasks())
        await app(scope, receive, send)

    for path in ("/nodb", "/db"):
        server = Server()
        server.scope["path"], server.scope["raw_path"] = path, path.encode()
        await outer(server.scope, server.receive, server.send)
        assert server.sent[0]["status"] == 200
        assert server.receive_calls <= (1 if path == "/db" else 0)
    assert counts["nodb"] == counts["/nodb outside"], "a request without a session got a task"
    assert counts["db"] == 1, "the listener of a request with a session"
    assert db.engine.pool.checkedout() == 0


def test_on_disconnect_is_checked() -> None:
    from sqla_context.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="on_disconnect='abort' is not valid"):
        SessionMiddleware(asgi_app(lambda _: asyncio.sleep(0)), on_disconnect="abort")  # type: ignore[arg-type]
