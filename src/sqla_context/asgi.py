"""Pure-ASGI integration: a scope per HTTP request, committed before the response starts.

Works with any ASGI application (FastAPI, Starlette, Litestar, Quart, a bare callable) and
imports no framework::

    app.add_middleware(SessionMiddleware)          # FastAPI / Starlette
    app = SessionMiddleware(app)                   # any ASGI app

When the commit happens
    The middleware holds the app's ``http.response.start`` message back, commits the
    request's sessions (or rolls them back, see ``commit_on``), and only then forwards it.
    If the commit fails, the client gets a plain ``500 Internal Server Error`` with
    ``connection: close`` instead of the app's response, the error is logged once and
    re-raised (so the server logs it too), and the app's remaining messages are dropped. A
    request whose data was not committed is never answered with the app's success status.

A handler that raised
    If the response starts while the app is handling an exception (a framework's exception
    handler turned the handler's exception into a response: Starlette's and FastAPI's
    ``exception_handlers``, Litestar's ``exception_handlers``), the request's work is
    rolled back whatever the status, 302 and 200 included. ``commit_on`` decides only for
    responses the app returned normally. Starlette's ``BaseHTTPMiddleware`` (FastAPI's
    ``@app.middleware("http")``) runs the rest of the app in a task of its own, out of
    this middleware's sight: when Starlette builds its middleware stack
    (``add_middleware``), this middleware finds those inside it and watches the app behind
    each from that task (an exception handler's response, an exception that ``dispatch``
    turns into a response). Wrapped around a whole Starlette app (``SessionMiddleware(app)``)
    it cannot see them.

Work after the response has started
    The sessions stay in the request's scope after the commit at the response start, with
    their connections back in the pool: a session a dependency handed out before the
    response (``Depends(db.session)``) is the same object, still usable, in a streaming
    body or a background task. Work done then is committed when the app call returns
    normally and rolled back if it raises; a failure is logged at ERROR and re-raised (the
    client already has its status by then). Once the app call has returned, the sessions
    are closed for good: using one again raises.

Client disconnects
    If the client hangs up before the response is complete, everything not yet committed is
    rolled back. Once a request has opened a session and its body has been read, the
    middleware listens on ``receive`` for the hang-up itself (once the body is read, the
    server's next message can only be ``http.disconnect``), so a handler that never reads
    ``receive`` is covered too; a request that opens no session pays nothing for this.
    With ``on_disconnect="cancel"`` the handler is also cancelled at once, so a slow query
    or call stops and the connection goes back to the pool. What was committed before the
    hang-up (``db.commit()``, ``db.close_session()``, the commit at the response start)
    stays committed: use idempotency keys where a client's retry must not apply twice.

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

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from ._scope import _current, _Unit, check_choice
from .exceptions import ConfigurationError, _describe

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["SessionMiddleware", "dispose_at_shutdown"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WebSocketMode = Literal["none", "connection"]
DisconnectMode = Literal["rollback", "cancel"]

_log = logging.getLogger("sqla_context")

_BODY_500 = b"Internal Server Error"
_START_500: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_BODY_500)).encode()),
        # The error is re-raised after this response, and servers then drop the socket: a
        # keep-alive client must not send its next request on it.
        (b"connection", b"close"),
    ],
}


def _is_success(status: int) -> bool:
    return status < 400


# The unit of the request a SessionMiddleware owns, for the watchers it put behind
# BaseHTTPMiddlewares (set only by a middleware that has watchers).
_request_unit: ContextVar[_Unit | None] = ContextVar("sqla_context.asgi.unit", default=None)


class SessionMiddleware:
    """ASGI middleware that runs every HTTP request in a :func:`~sqla_context.scope`.

    ``await db.session()`` then works anywhere in the request's handlers, dependencies and
    helpers. The sessions are committed right before the response headers are sent if
    ``commit_on(status)`` is true (default: status < 400) and the handler did not raise,
    rolled back otherwise and when the app raises, and always closed. See the module
    docstring for exception handlers, streaming responses, background tasks and WebSockets.

    Args:
        app: the ASGI application to wrap.
        commit_on: decides from the response status whether to commit.
        websocket: ``"none"`` (default): no scope for WebSocket connections; ``"connection"``:
            one scope for the whole connection.
        on_disconnect: what a client hang-up before the response is complete does to a
            request that opened a session: ``"rollback"`` (default): the handler runs on,
            and its work is rolled back instead of committed; ``"cancel"``: the handler is
            also cancelled at once (asyncio), its work rolled back and its connections
            returned to the pool; the cancellation ends at the middleware.

    Raises:
        ConfigurationError: ``websocket``, ``on_disconnect`` or ``commit_on`` is not valid.

    Example::

        app = FastAPI(lifespan=dispose_at_shutdown(db))
        app.add_middleware(SessionMiddleware)
    """

    __slots__ = ("_watching", "app", "commit_on", "on_disconnect", "websocket")

    def __init__(
        self,
        app: ASGIApp,
        *,
        commit_on: Callable[[int], bool] = _is_success,
        websocket: WebSocketMode = "none",
        on_disconnect: DisconnectMode = "rollback",
    ) -> None:
        check_choice("websocket", websocket, WebSocketMode)
        check_choice("on_disconnect", on_disconnect, DisconnectMode)
        if not callable(commit_on):
            raise ConfigurationError(
                f"commit_on must be a callable taking the status code, got {commit_on!r}; "
                "e.g. commit_on=lambda status: status < 400"
            )
        self.app = app
        self.commit_on = commit_on
        self.websocket: WebSocketMode = websocket
        self.on_disconnect: DisconnectMode = on_disconnect
        self._watching = _watch_other_tasks(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and (kind != "websocket" or self.websocket == "none"):
            await self.app(scope, receive, send)  # lifespan and friends pass through
            return
        active = _current.get()
        if active is not None and active.is_current():  # its owner commits and closes
            await self.app(scope, receive, send)
            return
        unit = _Unit(source=scope)
        request = _Request(unit, self.commit_on, scope, receive, send)
        if kind == "http":
            unit.on_session = request.session_opened
            if self.on_disconnect == "cancel":
                request.task = asyncio.current_task()
        token = unit.enter()
        watched = _request_unit.set(unit) if self._watching else None
        try:
            try:
                await self.app(scope, request.receive, request.send)
            except BaseException:
                await unit.end(failed=True)
                raise
            request.task = None  # nothing left to cancel
            # Work done after the response started (streaming, background tasks) commits
            # here, unless the client hung up first. An HTTP app that returned without
            # starting a response gets rolled back.
            # (Most requests of many apps use no database and register no on_commit()
            # callback: no await.)
            if unit.sessions or unit.callbacks:
                failed = request.disconnected or (kind == "http" and request.stage == _NOT_STARTED)
                await unit.end(failed=failed)
            else:
                unit.closed = True
        except asyncio.CancelledError:
            # on_disconnect="cancel": the cancellation this middleware caused ends here.
            if request.cancelled and _uncancel(request.task) == 0:
                return
            raise
        finally:
            if request.listener is not None:
                request.listener.cancel()
            if watched is not None:
                _request_unit.reset(watched)
            unit.exit(token)
            unit.source = None  # a context kept past the request must not hold the scope
            request.server_receive = _receive_after_return
            request.server_send = _send_after_return


# Where a request is in its response, in _Request.stage.
_NOT_STARTED, _STARTED, _COMPLETE = 0, 1, 2


class _Request:
    """The ASGI plumbing around one request's app call; its methods are the app's channels."""

    __slots__ = (
        "arrived",
        "body_read",
        "cancelled",
        "commit_on",
        "disconnected",
        "gone",
        "handling",
        "inbox",
        "listener",
        "scope",
        "server_receive",
        "server_send",
        "stage",
        "task",
        "unit",
    )

    def __init__(
        self,
        unit: _Unit,
        commit_on: Callable[[int], bool],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self.unit = unit
        self.commit_on = commit_on
        self.scope = scope
        self.server_receive = receive
        self.server_send = send
        self.stage = _NOT_STARTED
        self.disconnected = False
        # An exception the code around the middleware was already handling: not the app's.
        self.handling = sys.exc_info()[1]
        # Listening for a hang-up (see session_opened): the task that reads the server's
        # messages once the body has been read, what it read that the app has not, and the
        # hang-up once seen. ``task`` is the app's task, cancelled on a hang-up if set.
        self.body_read = False
        self.listener: asyncio.Task[None] | None = None
        self.inbox: deque[Message] = deque()
        self.arrived: asyncio.Event | None = None
        self.gone: Message | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cancelled = False

    async def receive(self) -> Message:
        if self.inbox:
            return self.inbox.popleft()
        if self.listener is not None:
            return await self._from_listener()
        message = await self.server_receive()
        kind = message["type"]
        if kind == "http.disconnect":
            self._hung_up()
        elif kind == "http.request" and not message.get("more_body", False):
            self.body_read = True
            if self.unit.sessions and not self.unit.closed:
                self._listen()
        return message

    def session_opened(self) -> None:
        """The request's first session: from now on, notice the client hanging up."""
        self.unit.on_session = None
        if self.body_read or _has_no_body(self.scope):
            self._listen()

    def _listen(self) -> None:
        # Once the body has been read, the server's next message can only be
        # http.disconnect. One task per request that uses a database, none otherwise.
        self.arrived = asyncio.Event()
        self.listener = asyncio.ensure_future(self._next_message())

    async def _next_message(self) -> None:
        arrived = self.arrived
        assert arrived is not None
        while True:
            message = await self.server_receive()
            if message["type"] == "http.disconnect":
                self.gone = message
                self._hung_up()
                arrived.set()
                return
            # A body after all (servers send an empty one for a request without a body;
            # HTTP/2 may send one without content-length): kept for the app. Listening
            # goes on after a complete body, once; otherwise the app reads on itself.
            self.inbox.append(message)
            arrived.set()
            if len(self.inbox) > 1 or message.get("more_body", False):
                self.listener = None
                return

    async def _from_listener(self) -> Message:
        arrived = self.arrived
        assert arrived is not None
        while True:
            if self.inbox:
                return self.inbox.popleft()
            if self.gone is not None:
                return self.gone
            if self.listener is None:
                return await self.receive()
            arrived.clear()
            await arrived.wait()

    def _hung_up(self) -> None:
        # A hang-up seen before the response is complete means the client will never know
        # the outcome: roll back. (After completion, servers report a disconnect as normal.)
        if self.stage == _COMPLETE:
            return
        self.disconnected = True
        if self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function returning the server's awaitable: only the response start of a
        # request that used a database needs a coroutine of ours.
        kind = message["type"]
        if kind == "http.response.start":
            if self.stage == _NOT_STARTED:
                self.stage = _STARTED
                # A request that used no database (and has no on_commit() callback) pays
                # no await here.
                if self.unit.sessions or self.unit.callbacks:
                    return self._end_then_start(message)
        elif kind == "http.response.body" or kind == "http.response.zerocopysend":
            if not message.get("more_body", False):
                self.stage = _COMPLETE
        elif kind == "http.response.pathsend":  # the whole body is a file: nothing follows
            self.stage = _COMPLETE
        return self.server_send(message)

    async def _end_then_start(self, start: Message) -> None:
        """Commit or roll back the sessions, then send ``start`` (or a 500 if that failed)."""
        unit, status = self.unit, start["status"]
        handling = sys.exc_info()[1]
        if handling is not None and handling is not self.handling:
            # The response answers an exception the app is handling (an exception handler
            # turned the handler's failure into this response): the work failed.
            unit.failed = True
        # A hang-up during the COMMIT must not cancel it: its outcome would be unknown.
        task, self.task = self.task, None
        try:
            failed = self.disconnected or not self.commit_on(status)
            if unit.watch is not None:
                unit.watch.note_response(status, disconnected=self.disconnected)
            await unit.end(failed=failed, close=False)
        except Exception as exc:
            server_send = self.server_send
            self.server_send = _drop  # the app's own response would follow our 500
            _log.error(
                "commit failed for %s %s; answering 500 instead of %s: %s",
                self.scope.get("method"),
                self.scope.get("path"),
                status,
                _describe(exc),
            )
            await server_send(_START_500)
            await server_send({"type": "http.response.body", "body": _BODY_500})
            raise
        finally:
            self.task = task
        await self.server_send(start)


def _has_no_body(scope: Scope) -> bool:
    """Whether an HTTP/1.x request declares that it has no body (no length, not chunked)."""
    if scope.get("http_version") not in ("1.1", "1.0"):
        return False  # HTTP/2 and 3 may send a body without content-length
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return False
    return True


def _uncancel(task: asyncio.Task[Any] | None) -> int:
    """Undo one ``task.cancel()``; the number of cancellations still pending."""
    return 0 if task is None else task.uncancel()


def _watch_other_tasks(app: Any) -> bool:
    """Watch the app behind every Starlette ``BaseHTTPMiddleware`` inside ``app``.

    Follows the chain of ``.app`` attributes that Starlette's middleware stack is made of
    (``add_middleware`` builds it inside out, so it exists when this middleware is built).
    Returns whether any was found.
    """
    base = sys.modules.get("starlette.middleware.base")
    if base is None:  # Starlette not imported: no BaseHTTPMiddleware can be in the stack
        return False
    found = False
    seen: set[int] = set()
    node = app
    while node is not None and id(node) not in seen and len(seen) < 100:
        seen.add(id(node))
        if isinstance(node, base.BaseHTTPMiddleware):
            if not isinstance(node.app, _Watcher):
                node.app = _Watcher(node.app)
            found = True
            node = node.app
        node = getattr(node, "app", None)
    return found


class _Watcher:
    """The app behind a ``BaseHTTPMiddleware``, watched for exceptions handled in its task.

    ``BaseHTTPMiddleware`` runs the rest of the app in a task of its own, which sends the
    response start through a stream to the middleware's task; there an exception handler
    that answered is no longer visible. This wrapper, in the app's own task, marks the
    request's unit failed when the response starts while the app is handling an exception,
    or when the app raises (``dispatch`` may turn that into a response).
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        unit = _request_unit.get()
        if unit is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer = sys.exc_info()[1]

        def watch(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                handling = sys.exc_info()[1]
                if handling is not None and handling is not outer:
                    unit.failed = True
            return send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            unit.failed = True
            raise


async def _receive_after_return() -> Message:
    raise RuntimeError("receive() called after the ASGI app call returned")


def _send_after_return(message: Message) -> Awaitable[None]:
    raise RuntimeError(f"send({message.get('type')!r}) called after the ASGI app call returned")


async def _drop(message: Message) -> None:
    """A ``send`` that discards the message (the app's response after our 500)."""


def dispose_at_shutdown(
    *databases: Database,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan handler that disposes ``databases`` when the application shuts down.

    Pass it as ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)``. Every database is
    disposed even if disposing another fails (that failure is logged). To combine with a
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
