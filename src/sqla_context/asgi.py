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
    rolled back. Once the body has been read, the server's next message can only be
    ``http.disconnect``: before committing, the middleware looks whether the server has it
    ready, without waiting, so a handler that never reads ``receive`` is covered too. With
    ``on_disconnect="cancel"`` a task waits for the hang-up and the handler is cancelled at
    once, so a slow query or call stops and the connection goes back to the pool. What was
    committed before the hang-up (``db.commit()``, ``db.close_session()``, the commit at the
    response start) stays committed: use idempotency keys where a client's retry must not
    apply twice.

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
    """ASGI middleware that runs every HTTP request in a ``scope()``.

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
        if kind == "http" and self.on_disconnect == "cancel":
            request.task = asyncio.current_task()
            unit.on_session = request.session_opened
        token = unit.enter()
        watched = _request_unit.set(unit) if self._watching else None
        try:
            try:
                await self.app(scope, request.receive, request.send)
            except BaseException:
                await unit.end(failed=True)
                raise
            request.cancellable = False  # the app has returned: nothing left to cancel
            # Work done after the response started (streaming, background tasks) commits
            # here, unless the client hung up first. An HTTP app that returned without
            # starting a response gets rolled back.
            # (Most requests of many apps use no database and register no on_commit()
            # callback: no await.)
            if unit.sessions or unit.callbacks:
                failed = (kind == "http" and request.stage == _NOT_STARTED) or request.gone()
                await unit.end(failed=failed)
            else:
                unit.closed = True
        except asyncio.CancelledError:
            # on_disconnect="cancel": the cancellation this middleware caused ends here.
            if request.cancelled and _uncancel(request.task) == 0:
                return
            raise
        finally:
            unit.on_session = None  # no cycle unit -> request -> unit: freed without the GC
            if (listener := request.listener) is not None:
                # Cancelled, and unlinked from it: the task's traceback (frames holding the
                # listener and the request) forms no cycle, so it is freed without the GC.
                task, listener.task, request.listener = listener.task, None, None
                if task is not None:
                    task.cancel()
            if watched is not None:
                _request_unit.reset(watched)
            unit.exit(token)
            unit.source = None  # a context kept past the request must not hold the scope
            request.server_receive = _receive_after_return
            request.server_send = _send_after_return


class _Listener:
    """Reads the server's messages for a request whose body has been read.

    Once the body has been read, the server's next message can only be ``http.disconnect``:
    a task waits for it (one task per request that uses a database). Messages of another
    kind (servers send an empty body for a request without one; HTTP/2 may send a body
    without content-length) are kept for the app; listening goes on after a complete body,
    once, and otherwise stops and lets the app read on itself.
    """

    __slots__ = ("arrived", "gone", "inbox", "reading", "task")

    def __init__(self, request: _Request, kept: Message | None = None) -> None:
        self.inbox: list[Message] = [] if kept is None else [kept]
        self.gone: Message | None = None
        # Made when the app waits for a message while the task reads (rare: most apps do
        # not read after the body).
        self.arrived: asyncio.Event | None = None
        # Without a task (a message taken by _Request.gone()), it only keeps that message.
        self.reading = kept is None
        self.task: asyncio.Task[None] | None = (
            asyncio.ensure_future(self._read(request)) if kept is None else None
        )

    async def _read(self, request: _Request) -> None:
        try:
            while True:
                message = await request.server_receive()
                if message["type"] == "http.disconnect":
                    self.gone = message
                    request._hung_up()
                    return
                self.inbox.append(message)
                if len(self.inbox) > 1 or message.get("more_body", False):
                    return
                if self.arrived is not None:
                    self.arrived.set()
        finally:
            self.reading = False
            if self.arrived is not None:
                self.arrived.set()

    async def next(self, request: _Request) -> Message:
        """The app's next message: kept, the hang-up, or (listening over) the server's."""
        while True:
            if self.inbox:
                return self.inbox.pop(0)
            if self.gone is not None:
                return self.gone
            if not self.reading:
                request.listener = None
                return await request.receive()
            if self.arrived is None:
                self.arrived = asyncio.Event()
            self.arrived.clear()
            await self.arrived.wait()


# Where a request is in its response, in _Request.stage.
_NOT_STARTED, _STARTED, _COMPLETE = 0, 1, 2


class _Request:
    """The ASGI plumbing around one request's app call; its methods are the app's channels."""

    __slots__ = (
        "body_read",
        "cancellable",
        "cancelled",
        "commit_on",
        "disconnected",
        "handling",
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
        # Noticing a hang-up (see gone()). on_disconnect="cancel": ``task`` is the app's
        # task, cancelled on a hang-up while ``cancellable``, and a listener task waits for
        # the hang-up once the request has a session and its body has been read.
        self.body_read = False
        self.listener: _Listener | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cancellable = True
        self.cancelled = False

    async def receive(self) -> Message:
        listener = self.listener
        if listener is not None and (listener.inbox or listener.reading or listener.gone):
            return await listener.next(self)
        message = await self.server_receive()
        kind = message["type"]
        if kind == "http.disconnect":
            self._hung_up()
        elif kind == "http.request" and not message.get("more_body", False):
            self.body_read = True
            if self.task is not None and self.unit.sessions and not self.unit.closed:
                self.listener = _Listener(self)
        return message

    def session_opened(self) -> None:
        """on_disconnect="cancel": the first session; from now on, listen for a hang-up."""
        self.unit.on_session = None
        if self.body_read or _has_no_body(self.scope):
            self.listener = _Listener(self)

    def gone(self) -> bool:
        """Whether the client has hung up, as far as the server has told by now.

        Once the body has been read, the server's next message can only be
        ``http.disconnect``, and a server has it ready at once if the client is gone. So
        it is taken without waiting: ``receive()`` is started and, if it would wait, closed
        again (no task and no await, for the common case: a request that uses a database
        and a client that is still there). Any other message is kept for the app.
        """
        if self.disconnected or self.listener is not None:
            return self.disconnected
        if self.stage == _COMPLETE or not (self.body_read or _has_no_body(self.scope)):
            return False
        message = _ready(self.server_receive)
        if message is not None:
            if message["type"] == "http.disconnect":
                self._hung_up()
            else:  # e.g. the empty body of a GET the app never read: the app's
                self.listener = _Listener(self, kept=message)
        return self.disconnected

    def _hung_up(self) -> None:
        # A hang-up seen before the response is complete means the client will never know
        # the outcome: roll back. (After completion, servers report a disconnect as normal.)
        if self.stage == _COMPLETE:
            return
        self.disconnected = True
        if self.task is not None and self.cancellable and not self.cancelled:
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
        cancellable, self.cancellable = self.cancellable, False
        try:
            failed = self.gone() or not self.commit_on(status)
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
            self.cancellable = cancellable
        await self.server_send(start)


def _has_no_body(scope: Scope) -> bool:
    """Whether an HTTP/1.x request declares that it has no body (no length, not chunked)."""
    if scope.get("http_version") not in ("1.1", "1.0"):
        return False  # HTTP/2 and 3 may send a body without content-length
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return False
    return True


def _ready(receive: Receive) -> Message | None:
    """The message ``receive()`` returns without waiting, or None if it would wait.

    Drives the awaitable one step by hand instead of awaiting it: a measured 4-5 % of the
    CPU of a one-row read less than a task that waits for the hang-up
    (benchmarks/README.md, "Noticing a client that has gone").
    """
    step = receive().__await__()
    try:
        step.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    step.close()  # it waits (the client is there): undo the wait
    return None


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
