"""Watching units of work and their connections: DEBUG logs, held connections, telemetry.

Nothing here runs unless asked for. A unit gets a ``Watch`` when it opens its first
session while telemetry is instrumented (``sqla_context.otel``) or logger
``sqla_context.scope`` is enabled for DEBUG; a unit that opens no session is never watched.
An engine gets a ``_Tracker`` (pool and cursor listeners) only when its Database has
``hold_warning`` set or telemetry is instrumented for it.

Loggers:

``sqla_context.scope`` (DEBUG)
    one line per unit start (its first session on a database), per early close
    (``db.close_session()``), and per end: committed or rolled back, and why.
``sqla_context.held`` (WARNING)
    a connection held longer than its Database's ``hold_warning``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event

from . import _scope
from ._scope import _current, _scope_log
from .exceptions import CommitError, _describe

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._database import Database
    from ._scope import _Unit

_held_log = logging.getLogger("sqla_context.held")

#: The key of a checked-out connection's ``_Hold`` in its pool record's ``info``.
_HOLD = "sqla_context.hold"


class Telemetry(Protocol):
    """What ``sqla_context.otel`` does when told of units and connections."""

    def unit_started(self, watch: Watch, db: Database) -> None: ...

    def unit_ended(self, watch: Watch) -> None: ...

    def connection_returned(self, db: Database, held: float) -> None: ...

    def watches(self, db: Database) -> bool: ...

    def wrap(self, db: Database, engine: AsyncEngine) -> None: ...


#: Set by sqla_context.otel.instrument(), None otherwise.
telemetry: Telemetry | None = None


# -- naming a unit ---------------------------------------------------------------------------


def unit_name(source: object) -> str:
    """What a unit serves, for humans: ``GET /items/{id}``, a task's name, a function's."""
    if source is None:
        return "scope"
    if isinstance(source, MutableMapping):  # an ASGI scope
        return _asgi_name(source)
    if isinstance(source, str):
        return source
    qualname = getattr(source, "__qualname__", None)
    if isinstance(qualname, str):  # @scope() / run_isolated(fn)
        module = getattr(source, "__module__", None)
        return f"{module}.{qualname}" if module else qualname
    task_name = getattr(source, "task_name", None)
    if isinstance(task_name, str):  # a taskiq message
        return f"task {task_name}"
    method, path = getattr(source, "method", None), getattr(source, "path", None)
    if isinstance(method, str) and isinstance(path, str):  # an aiohttp request
        return f"{method} {_aiohttp_route(source) or path}"
    if hasattr(source, "message_id"):  # a FastStream message
        return _faststream_name(source)
    return type(source).__name__


def _asgi_name(scope: MutableMapping[str, Any]) -> str:
    # Starlette/FastAPI put the matched route in the scope: its template names the
    # endpoint without the ids in the path (low cardinality, no personal data).
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        path = scope.get("path_template")  # Litestar
    if not isinstance(path, str):
        path = scope.get("path", "")
    if scope.get("type") == "websocket":
        return f"WEBSOCKET {path}"
    return f"{scope.get('method', 'GET')} {path}"


def _aiohttp_route(request: Any) -> str | None:
    try:
        resource = request.match_info.route.resource
        return resource.canonical if resource is not None else None
    except Exception:
        return None


def _faststream_name(message: Any) -> str:
    raw = getattr(message, "raw_message", None)
    for source in (raw, message):
        for attribute in ("subject", "routing_key", "channel", "queue", "topic", "stream"):
            value = getattr(source, attribute, None)
            if isinstance(value, str) and value:
                return f"message {value}"
        if isinstance(source, dict):
            value = source.get("channel") or source.get("subject")
            if isinstance(value, (str, bytes)) and value:
                return f"message {value.decode() if isinstance(value, bytes) else value}"
    return f"message {getattr(message, 'message_id', '')}"


# -- units -----------------------------------------------------------------------------------


def session_added(unit: _Unit, db: Database) -> None:
    """A watched unit (or one about to be) opened a session on ``db``."""
    watch = unit.watch
    if watch is None:
        watch = unit.watch = Watch(unit)
    watch.add(db)


class Watch:
    """What is known of one unit while it runs, for its log lines and its span.

    ``held``/``idle``: seconds its connections were checked out, and of those, seconds no
    statement ran (tracked engines only: ``hold_warning`` set or telemetry instrumented).
    """

    __slots__ = (
        "databases",
        "held",
        "idle",
        "name",
        "outcome",
        "reason",
        "response",
        "span",
        "task",
        "token",
    )

    def __init__(self, unit: _Unit) -> None:
        self.name = unit_name(unit.source)
        self.databases: list[Database] = []
        self.held = 0.0
        self.idle = 0.0
        self.outcome: str | None = None  # "committed", "rolled back", "commit failed"
        self.reason: str | None = None
        self.response: str | None = None  # set by the ASGI middleware
        self.span: Any = None
        self.token: Any = None
        self.task: asyncio.Task[Any] | None = None

    def add(self, db: Database) -> None:
        if db in self.databases:  # a session closed early, then opened again
            return
        self.databases.append(db)
        if _scope_log.isEnabledFor(logging.DEBUG):
            _scope_log.debug("unit %s: started on database %r", self.name, db.name)
        if telemetry is not None and telemetry.watches(db):
            telemetry.unit_started(self, db)

    def note_response(self, status: int, *, disconnected: bool) -> None:
        """The ASGI middleware decides at the response start: record what it decided from."""
        self.response = "the client disconnected" if disconnected else f"status {status}"

    def closed_early(self, db: Database, *, commit: bool, error: BaseException | None) -> None:
        """``db.close_session()`` ended ``db``'s session before the unit's end."""
        if _scope_log.isEnabledFor(logging.DEBUG):
            what = "commit failed" if error else "committed" if commit else "rolled back"
            _scope_log.debug(
                "unit %s: closed early (db.close_session()) on database %r: %s",
                self.name,
                db.name,
                what,
            )

    def ended(
        self, unit: _Unit, *, commit: bool, failed: bool, close: bool, error: BaseException | None
    ) -> None:
        """``unit.end()`` ran (``close=False``: the transactions only)."""
        if self.outcome is None or close is False or error is not None or not commit:
            outcome, reason = _decision(unit, commit=commit, failed=failed, error=error)
            if self.response is not None:
                reason = f"{reason}; {self.response}"
            if self.outcome is None or self.outcome == "committed":
                self.outcome, self.reason = outcome, reason
        if _scope_log.isEnabledFor(logging.DEBUG):
            _scope_log.debug(
                "unit %s: %s (%s) on %s%s",
                self.name,
                self.outcome,
                self.reason,
                ", ".join(repr(db.name) for db in self.databases) or "no database",
                "; sessions closed" if close else "; sessions kept for work after the response",
            )
        if close and telemetry is not None and self.span is not None:
            telemetry.unit_ended(self)


def _decision(
    unit: _Unit, *, commit: bool, failed: bool, error: BaseException | None
) -> tuple[str, str]:
    """The unit's outcome and why, in words."""
    if error is not None:
        if isinstance(error, CommitError):
            return "commit failed", _describe(error.__cause__ or error)
        return "rolled back", f"interrupted by {type(error).__name__}"
    handling = sys.exc_info()[1]
    raised = f"{type(handling).__name__} raised" if handling is not None else None
    if commit:
        if unit.commit == "always" and (failed or unit.failed):
            return "committed", f"commit='always' despite {raised or 'a failure'}"
        return "committed", "success"
    if unit.commit == "never":
        return "rolled back", "commit='never'"
    if unit.failed:
        return "rolled back", "the app answered an exception it handled"
    if raised is not None:
        return "rolled back", raised
    return "rolled back", "failed"


# -- connections -----------------------------------------------------------------------------


class _Hold:
    """One checkout of a connection: when, how long statements ran, the first one's stack."""

    __slots__ = ("busy", "checked_out", "running", "stack", "unit")

    def __init__(self, now: float) -> None:
        self.checked_out = now
        self.busy = 0.0
        self.running: float | None = None  # when the statement running now began
        self.stack: list[traceback.FrameSummary] | None = None
        self.unit: _Unit | None = _current.get()


class _Tracker:
    """Pool and cursor listeners on one engine of ``db``: checkout to checkin, busy time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def checkout(self, _dbapi: Any, record: Any, _proxy: Any) -> None:
        record.info[_HOLD] = _Hold(time.perf_counter())

    def before_execute(self, conn: Any, *_: Any) -> None:
        hold = conn.info.get(_HOLD)
        if hold is None:
            return
        hold.running = time.perf_counter()
        if hold.stack is None and self.db.hold_warning is not None:
            hold.stack = _user_stack()

    def after_execute(self, conn: Any, *_: Any) -> None:
        hold = conn.info.get(_HOLD)
        if hold is not None and hold.running is not None:
            hold.busy += time.perf_counter() - hold.running
            hold.running = None

    def handle_error(self, context: Any) -> None:
        if context.connection is not None and not context.connection.closed:
            self.after_execute(context.connection)

    def checkin(self, _dbapi: Any, record: Any) -> None:
        hold = record.info.pop(_HOLD, None) if record is not None else None
        if hold is None:
            return
        now = time.perf_counter()
        if hold.running is not None:  # a statement was cut short (cancelled, invalidated)
            hold.busy += now - hold.running
        held = now - hold.checked_out
        idle = max(held - hold.busy, 0.0)
        unit = hold.unit
        watch = unit.watch if unit is not None else None
        if watch is not None:
            watch.held += held
            watch.idle += idle
        if telemetry is not None and telemetry.watches(self.db):
            telemetry.connection_returned(self.db, held)
        threshold = self.db.hold_warning
        if threshold is not None and held > threshold:
            _warn_held(self.db, unit, hold, held, idle)


def _warn_held(db: Database, unit: _Unit | None, hold: _Hold, held: float, idle: float) -> None:
    name = unit_name(unit.source) if unit is not None else "no scope"
    where = "".join(traceback.format_list(hold.stack)) if hold.stack else "  (no statement ran)\n"
    advice = (
        " Most of that time no statement ran: end the database work before slow non-database"
        " work (`await db.close_session()`), or move that work out of the unit."
        if idle > held / 2
        else ""
    )
    _held_log.warning(
        "unit %s held a connection of database %r for %.0f ms, %.0f ms of it idle (no"
        " statement running, e.g. awaiting something else in a transaction).%s First"
        " statement at:\n%s",
        name,
        db.name,
        held * 1000,
        idle * 1000,
        advice,
        where.rstrip("\n"),
    )


#: Frames of these packages are not the user's: left out of a first statement's stack.
_INFRASTRUCTURE = tuple(
    f"{sep}{name}{sep}"
    for sep in ("/", "\\")
    for name in (
        "sqlalchemy",
        "sqla_context",
        "greenlet",
        "asyncio",
        "starlette",
        "fastapi",
        "anyio",
        "httpx",
        "uvicorn",
        "aiohttp",
        "litestar",
        "taskiq",
        "faststream",
        "opentelemetry",
        "_pytest",
        "pluggy",
        "pytest_asyncio",
        "contextlib.py",
    )
)


def _user_stack(limit: int = 4) -> list[traceback.FrameSummary]:
    """The innermost ``limit`` frames of the code that ran the statement, library frames left out.

    Statements run in a greenlet that SQLAlchemy's async layer switches to; the code that
    awaited them is in the greenlet that waits for it (its parent).
    """
    frame = sys._getframe(1)
    greenlet = sys.modules.get("greenlet")
    if greenlet is not None:
        parent = greenlet.getcurrent().parent
        if parent is not None and parent.gr_frame is not None:
            frame = parent.gr_frame
    stack = traceback.extract_stack(frame, limit=60)
    mine = [f for f in stack if not any(part in f.filename for part in _INFRASTRUCTURE)]
    return mine[-limit:]


_trackers: weakref.WeakKeyDictionary[AsyncEngine, _Tracker] = weakref.WeakKeyDictionary()


def track(db: Database, engine: AsyncEngine) -> None:
    """Install the connection listeners on ``engine`` (a ``db`` engine), once."""
    if engine in _trackers:
        return
    tracker = _trackers[engine] = _Tracker(db)
    for name, listener in _listeners(tracker):
        event.listen(engine.sync_engine, name, listener)
    if telemetry is not None and telemetry.watches(db):
        telemetry.wrap(db, engine)


def untrack(engine: AsyncEngine) -> None:
    """Remove what ``track()`` installed on ``engine``."""
    tracker = _trackers.pop(engine, None)
    if tracker is None:
        return
    for name, listener in _listeners(tracker):
        event.remove(engine.sync_engine, name, listener)


def _listeners(tracker: _Tracker) -> tuple[tuple[str, Callable[..., Any]], ...]:
    """The engine events ``tracker`` listens to, with its listener for each."""
    return (
        ("checkout", tracker.checkout),
        ("checkin", tracker.checkin),
        ("before_cursor_execute", tracker.before_execute),
        ("after_cursor_execute", tracker.after_execute),
        ("handle_error", tracker.handle_error),
    )


def set_observing(on: bool) -> None:
    """Switch the per-unit hook on (telemetry instrumented) or back to logs only."""
    _scope.__dict__["_observing"] = on
