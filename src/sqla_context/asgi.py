"""Pure-ASGI integration: a scope per HTTP request, committed before the response starts.

Works with any ASGI application (FastAPI, Starlette, Litestar, Quart, a bare callable) and
imports no framework::

    app.add_middleware(SessionMiddleware)          # FastAPI / Starlette
    app = SessionMiddleware(app)                   # any ASGI app

When the commit happens
    The middleware holds the app's ``http.response.start`` message back, commits the
    request's sessions (or rolls them back, see ``commit_on``), and only then forwards it.
    If the commit fails, the client gets a plain ``500 Internal Server Error`` instead of
    the app's response, the error is logged and re-raised (so the server logs it too), and
    the app's remaining messages are dropped. A request whose data was not committed is
    never answered with the app's success status.

Work after the response has started
    Queries made while a streaming body is produced, or in background tasks that run after
    the response, get fresh sessions in the same scope. They are committed when the app
    call returns normally and rolled back if it raises; a failure is logged at ERROR and
    re-raised (the client already has its status by then).

Client disconnects
    If the app is cancelled, or the server reports ``http.disconnect`` through ``receive``
    before the response is complete (Starlette listens for it while streaming), everything
    not yet committed is rolled back. A server gives no signal to a handler that never
    reads ``receive``: such a handler runs to its end and commits as usual, like any work
    that outlives its client (use idempotency keys where a retry must not apply twice).

WebSockets
    By default (``websocket="none"``) a WebSocket connection gets no scope, because a scope
    held for the life of a connection would hold a database connection for hours. Open a
    short scope per message instead (``async with scope():`` inside the receive loop).
    ``websocket="connection"`` opens one scope for the whole connection, for short-lived
    sockets.

Already inside a scope
    If the request runs inside an active scope (a test that opened ``scope()`` and drives
    the app with ``httpx.ASGITransport``), the middleware joins it: it neither commits nor
    closes what that scope owns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from ._scope import _current, _Unit, check_choice, settle

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["SessionMiddleware", "dispose_at_shutdown"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WebSocketMode = Literal["none", "connection"]

_log = logging.getLogger("sqla_context")

_BODY_500 = b"Internal Server Error"
_START_500: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_BODY_500)).encode()),
    ],
}


def _is_success(status: int) -> bool:
    return status < 400


class SessionMiddleware:
    """ASGI middleware that runs every HTTP request in a :func:`~sqla_context.scope`.

    ``await db.session()`` then works anywhere in the request's handlers, dependencies and
    helpers. The sessions are committed right before the response headers are sent if
    ``commit_on(status)`` is true (default: status < 400), rolled back otherwise and when
    the app raises, and always closed. See the module docstring for streaming responses,
    background tasks and WebSockets.

    Args:
        app: the ASGI application to wrap.
        commit_on: decides from the response status whether to commit.
        websocket: ``"none"`` (default): no scope for WebSocket connections; ``"connection"``:
            one scope for the whole connection.

    Raises:
        ConfigurationError: ``websocket`` is not ``"none"`` or ``"connection"``.

    Example::

        app = FastAPI(lifespan=dispose_at_shutdown(db))
        app.add_middleware(SessionMiddleware)
    """

    __slots__ = ("app", "commit_on", "websocket")

    def __init__(
        self,
        app: ASGIApp,
        *,
        commit_on: Callable[[int], bool] = _is_success,
        websocket: WebSocketMode = "none",
    ) -> None:
        check_choice("websocket", websocket, WebSocketMode)
        self.app = app
        self.commit_on = commit_on
        self.websocket: WebSocketMode = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and (kind != "websocket" or self.websocket == "none"):
            await self.app(scope, receive, send)  # lifespan and friends pass through
            return
        active = _current.get()
        if active is not None and not active.closed:  # its owner commits and closes
            await self.app(scope, receive, send)
            return

        unit = _Unit()
        token = _current.set(unit)
        started = answered_500 = complete = disconnected = False

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            # A hang-up seen before the response is complete means the client will never know
            # the outcome: roll back. (After completion, servers report a disconnect as normal.)
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        async def send_after_commit(message: Message) -> None:
            nonlocal started, answered_500, complete
            if answered_500:
                return  # the app's own response would follow our 500: drop it
            msg_type = message["type"]
            if msg_type == "http.response.start" and not started:
                started = True
                status = message["status"]
                try:
                    if unit.sessions:  # a request that used no database pays no await here
                        commit = self.commit_on(status) and not disconnected
                        await settle(unit, failed=not commit, keep_open=True)
                except Exception:
                    answered_500 = True
                    _log.error(
                        "commit failed for %s %s; answering 500 instead of %s",
                        scope.get("method"),
                        scope.get("path"),
                        status,
                    )
                    await send(_START_500)
                    await send({"type": "http.response.body", "body": _BODY_500})
                    raise
            elif msg_type == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive_watching, send_after_commit)
        except BaseException:
            await settle(unit, failed=True)
            raise
        else:
            # Work done after the response started (streaming, background tasks) commits
            # here, unless the client hung up first. An HTTP app that returned without
            # starting a response gets rolled back.
            if unit.sessions:
                await settle(unit, failed=disconnected or (kind == "http" and not started))
            unit.closed = True
        finally:
            # ValueError: reset from another context; the unit is closed either way. (Not
            # contextlib.suppress: this runs on every request, and it costs an object.)
            try:  # noqa: SIM105
                _current.reset(token)
            except ValueError:
                pass


def dispose_at_shutdown(
    *databases: Database,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan handler that disposes ``databases`` when the application shuts down.

    Pass it as ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)``. To combine with a
    lifespan of your own, use the databases as async context managers instead::

        @asynccontextmanager
        async def lifespan(app):
            async with db, replica:  # disposed on the way out
                yield
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for db in databases:
                try:
                    await db.dispose()
                except Exception:
                    _log.warning("disposing %r failed", db, exc_info=True)

    return lifespan
