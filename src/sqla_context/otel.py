"""OpenTelemetry spans and pool metrics for units of work (``pip install 'sqla-context[otel]'``).

Off until ``instrument()`` is called; ``import sqla_context`` never imports OpenTelemetry.
Once instrumented, each unit of work (a request, a job, a ``@scope()`` call,
``run_isolated``) that opens a session gets one span, started at its first session and
made current in that task, so that statement spans of
``opentelemetry-instrumentation-sqlalchemy`` become its children. Its children of ours:
the wait for a pooled connection, COMMIT, ROLLBACK and the savepoint commands. Pool
metrics follow the database client semantic conventions (``db.client.connection.*``).
No SQL parameter is ever recorded. See the "Observability" page of the docs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context, metrics, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.otel needs OpenTelemetry: pip install 'sqla-context[otel]'"
    ) from exc

from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from . import _observe
from ._scope import _current
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._database import Database
    from ._observe import Watch

__all__ = ["instrument", "uninstrument"]

_SYSTEMS = {"postgresql": "postgresql", "sqlite": "sqlite", "mssql": "microsoft.sql_server"}

#: The dialect methods wrapped in a span of their own, and the span's name.
_COMMANDS = (
    ("do_commit", "COMMIT"),
    ("do_rollback", "ROLLBACK"),
    ("do_savepoint", "SAVEPOINT"),
    ("do_release_savepoint", "RELEASE SAVEPOINT"),
    ("do_rollback_to_savepoint", "ROLLBACK TO SAVEPOINT"),
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqla-context")
    except PackageNotFoundError:  # pragma: no cover - a source tree
        return "0"


def db_attributes(db: Database, engine: AsyncEngine) -> dict[str, Any]:
    """The semantic-convention attributes of ``db``'s ``engine``: never a password or parameter."""
    dialect = engine.dialect
    system = _SYSTEMS.get(dialect.name, dialect.name)
    if dialect.name == "mysql":
        system = "mariadb" if getattr(dialect, "is_mariadb", False) else "mysql"
    url = engine.url
    attributes: dict[str, Any] = {"db.system.name": system, "sqla_context.database": db.name}
    if url.database:
        attributes["db.namespace"] = url.database
    if url.host:
        attributes["server.address"] = url.host
        port = url.port or getattr(dialect, "default_port", None)
        if port is None:
            port = {"postgresql": 5432, "mysql": 3306}.get(dialect.name)
        if port is not None:
            attributes["server.port"] = int(port)
    return attributes


class _Telemetry:
    """The instrumentation ``instrument()`` installs (one at a time)."""

    def __init__(
        self, databases: tuple[Database, ...], tracer_provider: Any, meter_provider: Any
    ) -> None:
        self.databases = databases
        self.tracer = trace.get_tracer("sqla_context", _version(), tracer_provider=tracer_provider)
        meter = metrics.get_meter("sqla_context", _version(), meter_provider=meter_provider)
        self.pending: dict[AsyncEngine, int] = {}
        self.wrapped: list[tuple[AsyncEngine, list[str]]] = []
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool",
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described by "
            "the state attribute",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._observe_max],
            unit="{connection}",
            description="The maximum number of open connections allowed",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_pending],
            unit="{request}",
            description="The number of current pending requests for an open connection",
        )

    # -- what _observe asks -----------------------------------------------------------------

    def watches(self, db: Database) -> bool:
        return not self.databases or db in self.databases

    def unit_started(self, watch: Watch, db: Database) -> None:
        if watch.span is not None:
            return
        engine = db.engine
        if engine not in _observe._trackers:  # instrument() with no Database listed
            _observe.track(db, engine)
        attributes = {**db_attributes(db, engine), "sqla_context.unit": watch.name}
        span = self.tracer.start_span(
            f"unit of work {watch.name}", kind=SpanKind.INTERNAL, attributes=attributes
        )
        watch.span = span
        # Current from here on in this task (and the tasks it creates later), so that the
        # statements' spans become children of the unit's.
        watch.token = context.attach(trace.set_span_in_context(span))
        watch.task = asyncio.current_task()

    def unit_ended(self, watch: Watch) -> None:
        span, watch.span = watch.span, None
        if span is None:
            return
        first = watch.databases[0]
        if first._engine is not None:  # MariaDB is told from MySQL once connected
            span.set_attribute(
                "db.system.name", db_attributes(first, first._engine)["db.system.name"]
            )
        span.set_attribute("sqla_context.outcome", watch.outcome or "")
        span.set_attribute("sqla_context.reason", watch.reason or "")
        span.set_attribute("sqla_context.connection.held_time", round(watch.held, 6))
        span.set_attribute("sqla_context.connection.idle_time", round(watch.idle, 6))
        if len(watch.databases) > 1:
            span.set_attribute("sqla_context.databases", [db.name for db in watch.databases])
        if watch.outcome == "commit failed":
            span.set_status(Status(StatusCode.ERROR, watch.reason))
        span.end()
        # A unit ends in the task that opened its first session unless that was a task it
        # created (or Starlette's BaseHTTPMiddleware ran the app in another task): that
        # task's context is not ours to reset, and it ends with the task.
        if watch.token is not None and asyncio.current_task() is watch.task:
            context.detach(watch.token)
        watch.token = watch.task = None

    def connection_returned(self, db: Database, held: float) -> None:
        self.use_time.record(held, {"db.client.connection.pool.name": db.name})

    # -- engines ----------------------------------------------------------------------------

    def wrap(self, db: Database, engine: AsyncEngine) -> None:
        """Measure the wait for a pooled connection; span COMMIT, ROLLBACK, savepoints."""
        sync = engine.sync_engine
        if "raw_connection" in vars(sync):
            return
        pool_attributes = {"db.client.connection.pool.name": db.name}
        original: Callable[[], Any] = sync.raw_connection
        pending = self.pending
        pending[engine] = 0

        def raw_connection() -> Any:
            # SQLAlchemy has no "checkout requested" event: the wait is the time this call
            # takes, which includes opening a new connection when the pool has room.
            unit = _current.get()
            parent = unit.watch.span if unit is not None and unit.watch is not None else None
            span = (
                self.tracer.start_span(
                    "wait for connection", kind=SpanKind.INTERNAL, attributes=pool_attributes
                )
                if parent is not None
                else None
            )
            pending[engine] += 1
            started = time.perf_counter()
            try:
                return original()
            except PoolTimeoutError:
                self.timeouts.add(1, pool_attributes)
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, "pool timeout"))
                raise
            finally:
                pending[engine] -= 1
                self.wait_time.record(time.perf_counter() - started, pool_attributes)
                if span is not None:
                    span.end()

        sync.raw_connection = raw_connection  # type: ignore[method-assign]
        names = ["raw_connection"]
        dialect = sync.dialect
        for method, span_name in _COMMANDS:
            setattr(
                dialect, method, self._spanning(db, engine, getattr(dialect, method), span_name)
            )
            names.append(method)
        self.wrapped.append((engine, names))

    def _spanning(
        self, db: Database, engine: AsyncEngine, method: Callable[..., Any], name: str
    ) -> Callable[..., Any]:
        def in_span(*args: Any, **kwargs: Any) -> Any:
            unit = _current.get()
            if unit is None or unit.watch is None or unit.watch.span is None:
                return method(*args, **kwargs)  # a pool reset, work outside units
            attributes = {**db_attributes(db, engine), "db.operation.name": name}
            with self.tracer.start_as_current_span(
                name, kind=SpanKind.CLIENT, attributes=attributes
            ):
                return method(*args, **kwargs)

        return in_span

    def unwrap(self) -> None:
        for engine, names in self.wrapped:
            sync = engine.sync_engine
            sync.__dict__.pop("raw_connection", None)
            for name in names[1:]:
                sync.dialect.__dict__.pop(name, None)
        self.wrapped.clear()

    # -- metrics ----------------------------------------------------------------------------

    def _pools(self) -> Iterable[tuple[AsyncEngine, Database, Any]]:
        if _observe.telemetry is not self:
            return
        for engine, tracker in list(_observe._trackers.items()):
            if self.watches(tracker.db):
                yield engine, tracker.db, engine.sync_engine.pool

    def _observe_count(self, _options: Any) -> Iterable[metrics.Observation]:
        for _engine, db, pool in self._pools():
            for state, method in (("used", "checkedout"), ("idle", "checkedin")):
                count = getattr(pool, method, None)
                if count is not None:
                    yield metrics.Observation(
                        count(),
                        {
                            "db.client.connection.pool.name": db.name,
                            "db.client.connection.state": state,
                        },
                    )

    def _observe_max(self, _options: Any) -> Iterable[metrics.Observation]:
        for _engine, db, pool in self._pools():
            size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", None)
            if size is not None and isinstance(overflow, int) and overflow >= 0:
                yield metrics.Observation(
                    size() + overflow, {"db.client.connection.pool.name": db.name}
                )

    def _observe_pending(self, _options: Any) -> Iterable[metrics.Observation]:
        for engine, db, _pool in self._pools():
            yield metrics.Observation(
                self.pending.get(engine, 0), {"db.client.connection.pool.name": db.name}
            )


def instrument(
    *databases: Database, tracer_provider: Any = None, meter_provider: Any = None
) -> None:
    """Turn on OpenTelemetry spans and pool metrics for ``databases`` (all if none given).

    Call once at start-up, after configuring OpenTelemetry. Each unit of work that opens
    a session gets a span ``unit of work <name>`` (``GET /items/{id}``, a task's name, a
    function's qualified name), current in the task that opened its first session, with
    child spans ``wait for connection``, ``COMMIT``, ``ROLLBACK``, ``SAVEPOINT``,
    ``RELEASE SAVEPOINT``, ``ROLLBACK TO SAVEPOINT``. Pool metrics are reported as
    ``db.client.connection.count`` (by ``db.client.connection.state``), ``.max``,
    ``.pending_requests``, ``.timeouts``, ``.wait_time`` and ``.use_time`` (seconds), with
    ``db.client.connection.pool.name`` set to the Database's name.

    Args:
        databases: the Databases to observe; none: every Database.
        tracer_provider: defaults to the global one.
        meter_provider: defaults to the global one.

    Raises:
        ConfigurationError: already instrumented (call ``uninstrument()`` first), or an
            argument is not a Database.
    """
    from ._database import Database

    if _observe.telemetry is not None:
        raise ConfigurationError(
            "sqla_context.otel is already instrumented; call uninstrument() first"
        )
    for db in databases:
        if not isinstance(db, Database):
            raise ConfigurationError(f"instrument() takes Database objects, got {db!r}")
    telemetry = _Telemetry(databases, tracer_provider, meter_provider)
    _observe.telemetry = telemetry
    _observe.set_observing(True)
    for db in databases:
        engine = db._engine
        if engine is not None:  # later engines: Database._install() tracks them
            _observe.track(db, engine)
    for engine, tracker in list(_observe._trackers.items()):
        if telemetry.watches(tracker.db):
            telemetry.wrap(tracker.db, engine)


def uninstrument() -> None:
    """Undo ``instrument()``: no more spans nor metrics; no-op if not instrumented."""
    telemetry = _observe.telemetry
    if not isinstance(telemetry, _Telemetry):
        return
    telemetry.unwrap()
    _observe.telemetry = None
    _observe.set_observing(False)
    for engine, tracker in list(_observe._trackers.items()):
        if tracker.db.hold_warning is None:
            _observe.untrack(engine)
