"""aiohttp server integration: a scope per request, committed before the response is sent.

::

    app = web.Application()
    setup(app, db)           # session_middleware() first in line + engines disposed on cleanup

    # or by hand:
    app = web.Application(middlewares=[session_middleware()])
    dispose_on_cleanup(app, db)

When the commit happens
    aiohttp hands the handler's response to the middleware before writing any of it, so
    the middleware commits right there (or rolls back, see ``commit_on``) and returns the
    response only afterwards. A ``web.HTTPException`` raised by the handler counts as the
    response it stands for: a raised ``HTTPFound`` (302) commits, a raised ``HTTPNotFound``
    (404) rolls back. Any other exception, and a cancellation, roll back.

    If the commit fails, the error is logged at ERROR on the ``sqla_context`` logger and
    raised instead of returning the handler's response. aiohttp answers an exception from
    the handler chain with ``500 Internal Server Error`` (and logs it, with its traceback),
    and middlewares outside this one see the exception, as they would see any handler
    error: an error-page middleware renders its 500, an error tracker records it. A request
    whose data was not committed is never answered with the handler's status.

A handler that raised
    A handler's exception that a middleware turns into a response is rolled back whatever
    the status of that response (a 302 to a "sold out" page, or a 200), like the exception
    itself (a raised ``web.HTTPException`` counts as its own status). An error-page
    middleware *outside* ``session_middleware()`` is seen by it as the exception. One
    inside it (``setup()`` puts the session middleware first) is covered by the marker
    ``setup()`` installs last in ``app.middlewares``, next to the handler, which notes the
    handler's exception before any other middleware handles it.

Responses the handler has already started
    A ``StreamResponse`` the handler prepared itself (``await response.prepare(request)``)
    has sent its status line and headers before the middleware sees it. Its work is
    committed when the handler returns (per ``commit_on(status)``); a failure is logged at
    ERROR and raised, and aiohttp then closes the connection without finishing the body (a
    chunked body lacks its last chunk, so the client sees an incomplete response rather
    than a clean end), unless the handler already called ``write_eof()``. To commit before
    the status goes out, call ``await db.commit()`` (or ``db.close_session()``) before
    ``prepare()``.

Client disconnects
    A response that the handler returns (or raises) after its client hung up is never
    sent: the middleware rolls back instead of committing. ``web.run_app`` does not cancel a handler
    whose client left (``handler_cancellation=False``, the default), so the handler runs to
    its end first; with ``handler_cancellation=True`` (and in ``aiohttp.test_utils.
    TestServer``) the handler is cancelled at once, and the middleware rolls back and
    returns the connection before the cancellation goes on.

WebSockets
    By default (``websocket="none"``) a WebSocket upgrade request gets no scope, because a
    scope held for the life of a connection would hold a database connection for hours.
    Open a short scope per message instead (``async with scope():`` inside the receive
    loop). ``websocket="connection"`` opens one scope for the whole connection, committed
    when the handler returns, for short-lived sockets. That commit runs to its end even if
    the client closes the connection meanwhile (a client does so right after the closing
    handshake), which with ``handler_cancellation=True`` cancels the handler's task; the
    cancellation goes on once the commit is done.

Already inside a scope
    If the request runs inside an active scope (a test that opened ``scope()`` and started
    the test server inside it), the middleware joins it: it neither commits nor closes what
    that scope owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Literal

try:
    from aiohttp import hdrs, web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.aiohttp needs aiohttp: pip install 'sqla-context[aiohttp]'"
    ) from exc

from ._scope import _FINISH_TIMEOUT, _current, _in_background, _outlast, _Unit, check_choice
from .exceptions import _describe

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware  # aiohttp >= 3.9

    from ._database import Database

__all__ = ["dispose_on_cleanup", "session_middleware", "setup"]

WebSocketMode = Literal["none", "connection"]

_log = logging.getLogger("sqla_context")


def _is_success(status: int) -> bool:
    return status < 400


# The unit of the request session_middleware() owns, for the failure marker setup() puts
# next to the handler (a joined scope is not the request's to fail).
_request_unit: ContextVar[_Unit | None] = ContextVar("sqla_context.aiohttp.unit", default=None)


def _is_websocket(request: web.BaseRequest) -> bool:
    # The test WebSocketResponse.prepare() applies; an ASGI server routes on the same header.
    return request.headers.get(hdrs.UPGRADE, "").strip().lower() == "websocket"


async def _end(unit: _Unit, request: web.BaseRequest, status: int, *, commit: bool) -> None:
    """End ``unit`` for a response not sent yet; log a failed commit with the request."""
    # A client that has gone will never get this response, nor learn the outcome: roll back.
    gone = request.transport is None
    try:
        await unit.end(failed=gone or not commit)
    except Exception as exc:
        _log.error(
            "commit failed for %s %s; answering 500 instead of %s: %s",
            request.method,
            request.path,
            status,
            _describe(exc),
        )
        raise


async def _end_started(
    unit: _Unit, request: web.BaseRequest, response: web.StreamResponse, *, commit: bool
) -> None:
    """End ``unit`` for a response whose status line has already been sent."""
    try:
        await unit.end(failed=not commit)
    except Exception as exc:
        _log.error(
            "commit failed for %s %s after its %s response had started; the client has "
            "its status, aiohttp drops the connection before the body is complete: %s",
            request.method,
            request.path,
            response.status,
            _describe(exc),
        )
        raise


async def _end_websocket(
    unit: _Unit, request: web.BaseRequest, response: web.WebSocketResponse
) -> None:
    """Commit the unit of a WebSocket handler that returned, despite a cancellation meanwhile.

    The handler returning decided the outcome. A client closes the connection as soon as
    the closing handshake is over, possibly before this commit is; with
    ``handler_cancellation=True`` aiohttp then cancels this task, which must not roll back
    a conversation that ended cleanly. The commit runs in a task of its own, waited for
    (bounded) before the cancellation goes on.
    """
    ending = _in_background(_end_started(unit, request, response, commit=True))
    try:
        await asyncio.shield(ending)
    except asyncio.CancelledError:
        if not await _outlast(ending):
            _log.warning(
                "the commit of WebSocket %s took over %ss after the handler was cancelled;"
                " finishing in the background",
                request.path,
                _FINISH_TIMEOUT,
            )
            ending.add_done_callback(_retrieve)
        elif not ending.cancelled():
            ending.exception()  # _end_started logged a failure; the cancellation goes on
        raise


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # logged where it was raised


def session_middleware(
    *,
    commit_on: Callable[[int], bool] = _is_success,
    websocket: WebSocketMode = "none",
) -> Middleware:
    """Build an aiohttp middleware that runs every request in a ``scope()``.

    ``await db.session()`` then works anywhere in the request's handler, in the middlewares
    listed after this one and in helpers at any depth. The sessions are committed before
    the response is sent if ``commit_on(status)`` is true (default: status < 400), rolled
    back otherwise, when the handler raises (a raised ``web.HTTPException`` counts as its
    status) and when the client has gone, and always closed. See the module docstring for
    responses the handler prepared itself, disconnects and WebSockets.

    Args:
        commit_on: decides from the response status whether to commit.
        websocket: ``"none"`` (default): no scope for WebSocket upgrade requests;
            ``"connection"``: one scope for the whole connection.

    When the commit fails, the middleware raises ``CommitError`` in place
    of the handler's response, and aiohttp answers it with a 500.

    Raises:
        ConfigurationError: ``websocket`` is not ``"none"`` or ``"connection"``.

    Example::

        app = web.Application(middlewares=[session_middleware()])
        dispose_on_cleanup(app, db)
    """
    check_choice("websocket", websocket, WebSocketMode)

    @web.middleware
    async def sqla_context_scope(request: web.Request, handler: Handler) -> web.StreamResponse:
        if websocket == "none" and _is_websocket(request):
            return await handler(request)
        active = _current.get()
        if active is not None and active.is_current():  # its owner commits and closes
            return await handler(request)

        unit = _Unit(source=request)
        token = unit.enter()
        owned = _request_unit.set(unit)
        handed_off = False  # to a task that outlives a cancellation of this one
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # Raised, not returned, but aiohttp sends it as the response all the same.
                await _end(unit, request, exc.status, commit=commit_on(exc.status))
                raise
            except BaseException:
                await unit.end(failed=True)
                raise
            if isinstance(response, web.WebSocketResponse) and response.prepared:
                # A socket has no status to judge: a handler that returns has succeeded.
                handed_off = True
                await _end_websocket(unit, request, response)
            elif response.prepared:
                await _end_started(unit, request, response, commit=commit_on(response.status))
            else:  # nothing sent yet (aiohttp sends it after we return)
                await _end(unit, request, response.status, commit=commit_on(response.status))
            return response
        finally:
            if not unit.closed and not handed_off:  # commit_on() raised: nothing decided
                await unit.end(failed=True)
            _request_unit.reset(owned)
            unit.exit(token)
            unit.source = None  # a context kept past the request must not hold the request

    return sqla_context_scope


def _failure_marker(commit_on: Callable[[int], bool]) -> Middleware:
    """The innermost middleware ``setup()`` installs: notes that the handler raised.

    A middleware between it and ``session_middleware()`` may turn the exception into a
    response with any status; the request's unit is marked failed first, so it rolls
    back. A raised ``web.HTTPException`` counts as its own status, as in the middleware.
    """

    @web.middleware
    async def sqla_context_failures(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if not commit_on(exc.status):
                _mark_failed()
            raise
        except BaseException:
            _mark_failed()
            raise

    return sqla_context_failures


def _mark_failed() -> None:
    unit = _request_unit.get()
    if unit is not None:
        unit.failed = True


def dispose_on_cleanup(app: web.Application, *databases: Database) -> None:
    """Dispose ``databases`` when ``app`` cleans up (appends an ``on_cleanup`` handler).

    aiohttp runs ``on_cleanup`` handlers at shutdown, after the last request; a failing
    ``dispose()`` is logged at WARNING and does not stop the others.
    """

    async def dispose(app: web.Application) -> None:
        for db in databases:
            try:
                await db.dispose()
            except Exception:
                _log.warning("disposing %r failed", db, exc_info=True)

    app.on_cleanup.append(dispose)


def setup(
    app: web.Application,
    *databases: Database,
    commit_on: Callable[[int], bool] = _is_success,
    websocket: WebSocketMode = "none",
) -> None:
    """Install ``session_middleware()`` on ``app`` and dispose ``databases`` on cleanup.

    The middleware goes *first* in ``app.middlewares``, so every other middleware (one that
    loads the current user, say) runs inside the request's scope too. A marker goes *last*,
    next to the handler, so that a handler's exception that an error-page middleware turns
    into a response rolls back whatever that response's status (see the module docstring);
    it is moved back to the end when the app starts, after middlewares appended later.
    Call ``setup()`` before
    the app starts (aiohttp freezes the middleware list then). Build the list yourself with
    ``session_middleware()`` for another order.

    Args:
        app: the application.
        databases: disposed when the app cleans up (see ``dispose_on_cleanup()``).
        commit_on: passed to ``session_middleware()``.
        websocket: passed to ``session_middleware()``.

    Raises:
        ConfigurationError: ``websocket`` is not ``"none"`` or ``"connection"``.
    """
    app.middlewares.insert(0, session_middleware(commit_on=commit_on, websocket=websocket))
    marker = _failure_marker(commit_on)
    app.middlewares.append(marker)

    async def keep_marker_last(app: web.Application) -> None:
        # Runs before aiohttp freezes the list: middlewares appended after setup() go inside.
        middlewares = app.middlewares
        if not middlewares.frozen and middlewares[-1] is not marker and marker in middlewares:
            middlewares.remove(marker)
            middlewares.append(marker)

    app.on_startup.append(keep_marker_last)
    dispose_on_cleanup(app, *databases)
