"""How SessionMiddleware forwards the app's messages to the server.

A callback the server creates while handling a message (uvicorn's keep-alive timer) keeps
a copy of the request's context, and with it the request's unit of work: the unit must
hold nothing of the server once the request is over. These tests drive the middleware with
hand-written "servers": plain coroutines standing in for uvicorn's ``receive``/``send``.
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Awaitable, Callable, Generator
from contextvars import Context, ContextVar, copy_context
from typing import Any

import pytest

from sqla_context import CommitError
from sqla_context._scope import _current, _Unit
from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert

Message = dict[str, Any]

_outer: ContextVar[str] = ContextVar("outer", default="unset")
_inner: ContextVar[str] = ContextVar("inner", default="unset")

HTTP_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "POST",
    "path": "/",
    "headers": [],
}
START: Message = {"type": "http.response.start", "status": 200, "headers": []}
PART: Message = {"type": "http.response.body", "body": b"part;", "more_body": True}
LAST: Message = {"type": "http.response.body", "body": b"last"}


async def receive_nothing() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Server:
    """Records, for every message it is sent, what the code handling it could see."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, bool]] = []
        self.gate: asyncio.Event | None = None  # set: the last message waits for it
        self.fail_last: BaseException | None = None
        self.finally_ran_in_scope: bool | None = None
        self.waiting = asyncio.Event()  # set once the last message waits for the gate

    def look(self, message: Message) -> None:
        in_scope = _current.get() is not None
        self.seen.append((message["type"], _outer.get(), _inner.get(), in_scope))

    async def send(self, message: Message) -> None:
        self.look(message)
        if message is not LAST:
            return
        try:
            if self.gate is not None:
                self.waiting.set()
                await self.gate.wait()  # like a transport asking the writer to wait
                self.look(message)
            if self.fail_last is not None:
                raise self.fail_last
        finally:
            self.finally_ran_in_scope = _current.get() is not None


async def serve(
    app: Any, server: Server, send: Callable[[Message], Awaitable[None]] | None = None
) -> None:
    """What an outer middleware plus a server do: set a context variable, call the app."""
    _outer.set("outer")
    await app(dict(HTTP_SCOPE), receive_nothing, send or server.send)


def streaming_app(after_last: list[bool] | None = None) -> SessionMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        _inner.set("inner")
        await send(START)
        await send(PART)
        await send(LAST)
        if after_last is not None:  # like a background task, after the response
            after_last.append(_current.get() is not None)

    return SessionMiddleware(app)


async def test_a_callback_created_for_the_last_message_does_not_hold_the_scope() -> None:
    held: list[Any] = []

    class KeepAliveServer(Server):
        async def send(self, message: Message) -> None:
            if message is LAST:  # uvicorn: loop.call_later(timeout, ...) copies the context
                held.append(copy_context())

    await asyncio.create_task(serve(streaming_app(), KeepAliveServer()))
    (context,) = held
    assert context[_outer] == "outer"
    unit = context[_current]  # the request's unit: closed, and holding nothing of it
    assert isinstance(unit, _Unit)
    assert unit.closed
    assert unit.sessions == {}


@pytest.mark.parametrize("wait", [False, True], ids=["at-once", "after-waiting"])
async def test_an_error_sending_the_last_message_reaches_the_app(wait: bool) -> None:
    server = Server()
    server.fail_last = OSError("client went away")
    if wait:
        server.gate = asyncio.Event()
        server.gate.set()
    with pytest.raises(OSError, match="client went away"):
        await asyncio.create_task(serve(streaming_app(), server))
    assert server.seen[-1][0] == "http.response.body"


async def test_cancelled_while_the_last_message_waits(sqlite: Backend) -> None:
    db = sqlite.database()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        await insert(await db.session(), "streamed")  # after the start: committed at the end
        await send(LAST)

    server = Server()
    server.gate = asyncio.Event()  # never set
    request = asyncio.create_task(serve(SessionMiddleware(app), server))
    await server.waiting.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert server.finally_ran_in_scope is not None  # the server's code saw the cancellation
    assert await sqlite.names() == []  # rolled back
    assert db.engine.pool.checkedout() == 0


async def test_a_server_send_that_is_a_generator_based_coroutine() -> None:
    server = Server()

    @types.coroutine
    def old_style_send(message: Message) -> Generator[Any, Any, None]:
        server.look(message)
        yield  # one trip through the event loop
        server.look(message)

    await asyncio.create_task(serve(streaming_app(), server, old_style_send))
    assert [entry[0] for entry in server.seen] == [
        "http.response.start",
        "http.response.start",
        "http.response.body",
        "http.response.body",
        "http.response.body",
        "http.response.body",
    ]


async def test_messages_after_a_failed_commit_are_dropped(backend: Backend) -> None:
    db = backend.database()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.doom(await db.session())
        await send(START)  # the commit fails here: the server gets a 500 instead
        await send(LAST)  # dropped

    sent: list[Message] = []

    async def server_send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(CommitError):
        await SessionMiddleware(app)(dict(HTTP_SCOPE), receive_nothing, server_send)
    assert [(m["type"], m.get("status")) for m in sent] == [
        ("http.response.start", 500),
        ("http.response.body", None),
    ]
    # The error is re-raised and the server drops the socket: tell keep-alive clients.
    assert (b"connection", b"close") in sent[0]["headers"]


async def test_a_context_kept_after_the_request_holds_nothing_of_the_server() -> None:
    # A driver's cancelled timer or a task the app started keeps a copy of the request's
    # context, and with it the scope object: that must not keep the server's objects alive.
    held: list[Any] = []
    asgi_scope = dict(HTTP_SCOPE)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        held.append(copy_context())
        await send(START)
        await send(LAST)

    async def server_send(message: Message) -> None:
        pass

    await asyncio.create_task(SessionMiddleware(app)(asgi_scope, receive_nothing, server_send))
    unit = held[0][_current]
    assert isinstance(unit, _Unit)
    assert unit.closed
    reachable = gc.get_referents(unit)
    for server_object in (asgi_scope, server_send, receive_nothing):
        assert not any(ref is server_object for ref in reachable)
    assert not any(isinstance(ref, Context) for ref in reachable)


async def test_send_or_receive_after_the_app_returned_is_a_clear_error() -> None:
    kept: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept.update(receive=receive, send=send)
        await send(START)
        await send(LAST)

    async def server_send(message: Message) -> None:
        pass

    await SessionMiddleware(app)(dict(HTTP_SCOPE), receive_nothing, server_send)
    with pytest.raises(RuntimeError, match=r"send\('http.response.body'\) called after"):
        await kept["send"](LAST)
    with pytest.raises(RuntimeError, match=r"receive\(\) called after"):
        await kept["receive"]()
