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

The response's last message
    The server's handling of the final ``http.response.body`` message runs in the context
    the middleware was called in (without the scope or variables the app set), so that a
    callback the server creates there, such as uvicorn's keep-alive timer, does not keep
    the request's objects alive. The app's own code runs in the scope throughout.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    MutableMapping,
)
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any, Literal

from ._scope import _current, _Unit, check_choice, settle
from ._typing import CommitMode, SessionHook

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
        request = _new_request(self.commit_on, scope, receive, send)
        token = _current.set(request)
        try:
            await self.app(scope, request.receive, request.send)
        except BaseException:
            await settle(request, failed=True)
            raise
        else:
            # Work done after the response started (streaming, background tasks) commits
            # here, unless the client hung up first. An HTTP app that returned without
            # starting a response gets rolled back.
            if request.sessions:
                failed = request.disconnected or (kind == "http" and not request.stage)
                await settle(request, failed=failed)
            request.closed = True
        finally:
            # The request object may outlive the request: any copy of the request's context
            # holds it (a timer a database driver armed and cancelled, a task the app
            # started). Let go of the server's objects, so that such a copy keeps only a
            # small object alive, not the scope, the server's request state and the app's
            # per-request objects (on a busy server they would all reach the older GC
            # generations and make the collections much more frequent). Assignments, not
            # del: cheaper, and a late call gets a clear error instead of an AttributeError.
            request.scope = _NO_SCOPE
            request.server_receive = _receive_after_return
            request.server_send = _send_after_return
            request.entry_context = _NO_CONTEXT
            # ValueError: reset from another context; the unit is closed either way. (Not
            # contextlib.suppress: this runs on every request, and it costs an object.)
            try:  # noqa: SIM105
                _current.reset(token)
            except ValueError:
                pass


# Where a request is in its response, in _Request.stage.
_NOT_STARTED, _STARTED, _COMPLETE = 0, 1, 2


class _Request(_Unit):
    """The scope of one request (a :class:`_Unit`) and the ASGI plumbing around the app.

    One object per request, because this runs on every request: its bound methods are the
    ``receive`` and ``send`` the app gets. Made by :func:`_new_request`, not by calling the
    class: a Python ``__init__`` called from C costs more than the whole assignment list.
    """

    __slots__ = (
        "commit_on",
        "disconnected",
        "entry_context",
        "scope",
        "server_receive",
        "server_send",
        "stage",
    )

    commit_on: Callable[[int], bool]
    disconnected: bool
    entry_context: Context
    scope: Scope
    server_receive: Receive
    server_send: Send
    stage: int

    # The unit fields a request never changes, as class attributes (no per-request store).
    commit: CommitMode = "auto"
    before_commit: SessionHook | None = None
    after_commit: SessionHook | None = None

    async def receive(self) -> Message:
        message = await self.server_receive()
        # A hang-up seen before the response is complete means the client will never know
        # the outcome: roll back. (After completion, servers report a disconnect as normal.)
        if message["type"] == "http.disconnect" and self.stage != _COMPLETE:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine function: every message of every request goes through here, and
        # most need nothing but the server's own coroutine (no coroutine of ours around it).
        msg_type = message["type"]
        if msg_type == "http.response.body":
            if not message.get("more_body", False):
                self.stage = _COMPLETE
                # The last message: the server's part runs in the entry context (_run_in).
                return _run_in(self.entry_context, self.server_send(message))
        elif msg_type == "http.response.start" and self.stage == _NOT_STARTED:
            self.stage = _STARTED
            if self.sessions:  # a request that used no database pays no await here
                return self._end_then_start(message)
        return self.server_send(message)

    async def _end_then_start(self, start: Message) -> None:
        """Commit or roll back the sessions, then send ``start`` (or a 500 if that failed)."""
        status = start["status"]
        try:
            commit = self.commit_on(status) and not self.disconnected
            await settle(self, failed=not commit, keep_open=True)
        except Exception:
            server_send = self.server_send
            self.server_send = _drop  # the app's own response would follow our 500
            _log.error(
                "commit failed for %s %s; answering 500 instead of %s",
                self.scope.get("method"),
                self.scope.get("path"),
                status,
            )
            await server_send(_START_500)
            await server_send({"type": "http.response.body", "body": _BODY_500})
            raise
        await self.server_send(start)


def _new_request(
    commit_on: Callable[[int], bool], scope: Scope, receive: Receive, send: Send
) -> _Request:
    """A fresh :class:`_Request`: a new, empty unit around the server's ``receive``/``send``."""
    request: _Request = _object_new(_Request)
    request.sessions = {}
    request.locks = None
    request.closed = request.disconnected = False
    request.stage = _NOT_STARTED
    request.commit_on = commit_on
    request.scope = scope
    request.server_receive = receive
    request.server_send = send
    # The context as the server (and the middlewares outside this one) made it, before
    # the scope was set in it: see _run_in().
    request.entry_context = copy_context()
    return request


_object_new = object.__new__

# What a request holds once its app call has returned, in place of the server's objects.
_NO_SCOPE: Scope = types.MappingProxyType({})  # type: ignore[assignment]
_NO_CONTEXT = Context()


async def _receive_after_return() -> Message:
    raise RuntimeError("receive() called after the ASGI app call returned")


def _send_after_return(message: Message) -> Awaitable[None]:
    raise RuntimeError(f"send({message.get('type')!r}) called after the ASGI app call returned")


class _Done:
    """An awaitable that is already finished: ``await _DONE`` returns None at once."""

    __slots__ = ()

    if TYPE_CHECKING:

        def __await__(self) -> Generator[Any, Any, None]: ...

    else:
        # A C function, not a Python method: awaiting runs no Python frame. It returns an
        # iterator that is already exhausted, which ends the await at once.
        __await__ = ().__iter__


_DONE = _Done()
_END = object()


def _drop(message: Message) -> Awaitable[None]:
    """A ``send`` that discards the message (the app's response after our 500)."""
    return _DONE


def _run_in(context: Context, awaitable: Awaitable[None]) -> Awaitable[None]:
    """Run ``awaitable`` with every step of it in ``context``; await what this returns.

    Used for the last message of a response. A server may create a callback while handling
    it (uvicorn starts its keep-alive timer inside that ``send``), and a callback keeps a
    copy of the current context until it is discarded. Run in the request's context, that
    copy would keep the request's scope object alive for the keep-alive timeout, and with
    it extra garbage collections on every busy server. The server's code has no use for
    the scope, so its part of that message runs in the context the middleware was called
    in.

    The first step runs here, at the call: a server's ``send`` usually finishes without
    waiting, and then there is nothing left to await. ``next()`` with a default also spares
    the StopIteration exception a ``send(None)`` would raise.
    """
    try:
        steps: Iterator[Any] = awaitable.__await__()
    except AttributeError:  # a generator-based coroutine is its own iterator
        steps = awaitable  # type: ignore[assignment]
    yielded = context.run(next, steps, _END)
    if yielded is _END:
        return _DONE
    return _resume_in(context, steps, yielded)


@types.coroutine
def _resume_in(context: Context, steps: Iterator[Any], yielded: Any) -> Generator[Any, Any, None]:
    """The rest of :func:`_run_in` for a ``send`` that had to wait (flow control)."""
    while True:
        try:
            yield yielded  # to the event loop: a future the server's code waits for
        except BaseException as exc:  # cancellation included: the server's code sees it
            try:
                yielded = context.run(steps.throw, exc)  # type: ignore[attr-defined]
            except StopIteration:
                return
        else:
            yielded = context.run(next, steps, _END)
        if yielded is _END:
            return


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
