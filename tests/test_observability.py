"""Observability: OpenTelemetry spans and pool metrics, the held-connection detector, logs.

Spans and metrics are read from the OpenTelemetry SDK's in-memory exporters; every test
also checks the database through the backend's witness (rows, no connection checked out,
no transaction left open).
"""

# No `from __future__ import annotations`: FastAPI must evaluate the handlers' annotations.

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="pip install 'sqla-context[otel]'")

from fastapi import FastAPI
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from sqlalchemy import event, text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from sqla_context import (
    ConfigurationError,
    Database,
    otel,
    run_isolated,
    scope,
)
from sqla_context.asgi import SessionMiddleware

from .conftest import Backend, insert


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider, InMemoryMetricReader, Any]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield exporter, tracer_provider, reader, meter_provider
    otel.uninstrument()


def tree(finished: list[ReadableSpan]) -> list[str]:
    """The spans as an indented tree, children in start order."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in finished}
    for s in finished:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            lines.append("  " * depth + s.name)
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return lines


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_span_tree_of_a_request_that_reads_writes_in_a_savepoint_and_commits(
    backend: Backend, spans: Any
) -> None:
    if backend.kind == "sqlite":
        pytest.skip("the span tree is checked on server databases")
    exporter, tracer_provider, _reader, meter_provider = spans
    db = backend.database()
    otel.instrument(db, tracer_provider=tracer_provider, meter_provider=meter_provider)
    # Composes with the statement spans of opentelemetry-instrumentation-sqlalchemy (whose
    # version check does not know SQLAlchemy 2.1 yet, hence skip_dep_check).
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(
        engine=db.engine.sync_engine, tracer_provider=tracer_provider, skip_dep_check=True
    )
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, int]:
        session = await db.session()
        count = (await session.execute(text("SELECT count(*) FROM items"))).scalar_one()
        async with db.transaction():  # a savepoint: the transaction is open
            await insert(session, name)
        return {"before": count}

    try:
        async with client(app) as c:
            response = await c.post("/items/secret-name")
    finally:
        instrumentor.uninstrument()
    assert response.status_code == 200
    finished = exporter.get_finished_spans()
    printed = "\n".join(tree(list(finished)))
    print(printed)
    lines = [line for line in printed.splitlines() if line.strip() != "ROLLBACK"]
    system = "mariadb" if backend.kind == "mariadb" else "postgresql"
    assert lines[0] == "unit of work POST /items/{name}"
    body = [line.strip() for line in lines[1:]]
    # (The instrumentation's own "connect" span may wrap the wait for the connection.)
    assert body.index("wait for connection") < body.index("SAVEPOINT")
    assert body.index("SAVEPOINT") < body.index("RELEASE SAVEPOINT") < body.index("COMMIT")
    assert any(line.startswith("SELECT") for line in body)
    assert any(line.startswith("INSERT") for line in body)
    assert all(line.startswith("  ") for line in lines[1:])  # all children of the unit
    unit = next(s for s in finished if s.name.startswith("unit of work"))
    attributes = dict(unit.attributes or {})
    assert attributes["db.system.name"] == system
    assert attributes["db.namespace"] == db.url.database  # type: ignore[union-attr]
    assert attributes["server.address"] == "127.0.0.1"
    assert isinstance(attributes["server.port"], int)
    assert attributes["sqla_context.database"] == db.name
    assert attributes["sqla_context.outcome"] == "committed"
    assert attributes["sqla_context.connection.held_time"] > 0
    # Never SQL parameters: the inserted value appears in no attribute of any span.
    assert not any("secret-name" in str(s.attributes) for s in finished)
    assert await backend.names() == ["secret-name"]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await backend.open_transactions() == 0


async def test_pool_exhaustion_metrics(backend: Backend, spans: Any) -> None:
    if backend.kind == "sqlite":
        pytest.skip("pool metrics are checked on server databases")
    _exporter, tracer_provider, reader, meter_provider = spans
    db = backend.database(
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3}, name="orders"
    )
    otel.instrument(db, tracer_provider=tracer_provider, meter_provider=meter_provider)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        await (await db.session()).execute(text("SELECT 1"))
        holding.set()
        await release.wait()

    async def starve() -> None:
        await holding.wait()
        await (await db.session()).execute(text("SELECT 1"))

    holder = asyncio.ensure_future(run_isolated(hold))
    with pytest.raises(PoolTimeout):
        await run_isolated(starve)
    data = _metrics(reader)  # while the first unit still holds its connection
    release.set()
    await holder
    after = _metrics(reader)
    pool = {"db.client.connection.pool.name": "orders"}
    assert data["db.client.connection.timeouts"][_key(pool)] == 1
    assert data["db.client.connection.max"][_key(pool)] == 1
    assert data["db.client.connection.count"][_key({**pool, "state": "used"})] == 1
    assert data["db.client.connection.count"][_key({**pool, "state": "idle"})] == 0
    assert data["db.client.connection.pending_requests"][_key(pool)] == 0
    waits = after["db.client.connection.wait_time"][_key(pool)]
    assert waits.count == 2
    assert waits.max >= 0.3
    assert after["db.client.connection.use_time"][_key(pool)].count == 1
    assert after["db.client.connection.count"][_key({**pool, "state": "used"})] == 0
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await backend.open_transactions() == 0


def _key(attributes: dict[str, Any]) -> frozenset[tuple[str, Any]]:
    return frozenset(
        (k if k != "state" else "db.client.connection.state", v) for k, v in attributes.items()
    )


def _metrics(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[Any], Any]]:
    found: dict[str, dict[frozenset[Any], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope_metrics in resource.scope_metrics:
            for metric in scope_metrics.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    key = frozenset(dict(point.attributes or {}).items())
                    points[key] = getattr(point, "value", point)
    return found


# -- the held-connection detector ------------------------------------------------------------


def held_app(db: Database, *, close_first: bool) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/orders/{name}")
    async def create(name: str) -> dict[str, str]:
        session = await db.session()
        await insert(session, name)
        if close_first:
            await db.close_session()
        await asyncio.sleep(0.2)  # the "external call"
        return {"name": name}

    return app


@pytest.mark.parametrize("close_first", [False, True], ids=["holding", "closed-first"])
async def test_held_connection_warning(
    backend: Backend, caplog: pytest.LogCaptureFixture, close_first: bool
) -> None:
    db = backend.database(hold_warning=0.15)
    caplog.set_level(logging.WARNING, logger="sqla_context.held")
    async with client(held_app(db, close_first=close_first)) as c:
        response = await c.post("/orders/a")
    assert response.status_code == 200
    warnings = [r for r in caplog.records if r.name == "sqla_context.held"]
    assert await backend.names() == ["a"]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await backend.open_transactions() == 0
    if close_first:
        assert warnings == []
        return
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    record = warnings[0]
    print(record.getMessage())
    assert record.levelno == logging.WARNING
    held_ms, idle_ms = record.args[2], record.args[3]  # type: ignore[index]
    assert held_ms >= 200
    assert idle_ms >= 190
    message = record.getMessage()
    assert message.startswith("unit POST /orders/{name} held a connection")
    assert "close_session()" in message
    assert "test_observability.py" in message
    assert "insert(session, name)" in message


def test_hold_warning_is_validated() -> None:
    for bad in (0, -1, "1", True):
        with pytest.raises(ConfigurationError, match="hold_warning"):
            Database("sqlite+aiosqlite://", hold_warning=bad)  # type: ignore[arg-type]
    assert Database("sqlite+aiosqlite://", hold_warning=0.5).hold_warning == 0.5


async def test_idle_figure_is_on_the_unit_span(sqlite: Backend, spans: Any) -> None:
    exporter, tracer_provider, _reader, meter_provider = spans
    db = sqlite.database()
    otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)

    @scope()
    async def job() -> None:
        await insert(await db.session(), "x")
        await asyncio.sleep(0.1)

    await job()
    (unit,) = [s for s in exporter.get_finished_spans() if s.name.startswith("unit of work")]
    attributes = dict(unit.attributes or {})
    assert unit.name.endswith("test_idle_figure_is_on_the_unit_span.<locals>.job")
    assert attributes["db.system.name"] == "sqlite"
    assert attributes["sqla_context.connection.idle_time"] >= 0.09
    assert await sqlite.names() == ["x"]


async def test_instrument_twice_raises(spans: Any) -> None:
    otel.instrument()
    with pytest.raises(ConfigurationError, match="already instrumented"):
        otel.instrument()
    otel.uninstrument()
    otel.uninstrument()  # no-op


async def test_uninstrument_removes_the_engine_listeners(spans: Any, sqlite: Backend) -> None:
    """After uninstrument() an engine carries no listener of ours (a Database without
    hold_warning); instrumenting again installs them once, not twice."""
    from sqla_context import _observe

    _, tracer_provider, _, meter_provider = spans
    db = sqlite.database(name="tracked", hold_warning=None)
    sync = db.engine.sync_engine
    for _attempt in range(2):
        otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        async with scope():  # an engine made before instrument() is tracked at its first unit
            await insert(await db.session(), f"x{_attempt}")
        tracker = _observe._trackers[db.engine]
        listeners = _observe._listeners(tracker)
        assert all(event.contains(sync, name, fn) for name, fn in listeners)
        otel.uninstrument()
        assert db.engine not in _observe._trackers
        assert not any(event.contains(sync, name, fn) for name, fn in listeners)
    assert await sqlite.names() == ["x0", "x1"]


# -- logs ------------------------------------------------------------------------------------


async def test_debug_lines_say_what_was_decided_and_why(
    sqlite: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite.database(name="main")
    caplog.set_level(logging.DEBUG, logger="sqla_context.scope")
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/ok/{name}")
    async def ok(name: str) -> dict[str, str]:
        await insert(await db.session(), name)
        return {}

    @app.post("/missing/{name}")
    async def missing(name: str) -> Any:
        from fastapi.responses import JSONResponse

        await insert(await db.session(), name)
        return JSONResponse({}, status_code=404)

    @app.post("/early/{name}")
    async def early(name: str) -> dict[str, str]:
        await insert(await db.session(), name)
        await db.close_session()
        return {}

    @app.get("/nodb")
    async def nodb() -> dict[str, str]:
        return {}

    async with client(app) as c:
        for path in ("/ok/a", "/missing/b", "/early/c", "/nodb"):
            await c.request("GET" if path == "/nodb" else "POST", path)
    lines = [r.getMessage() for r in caplog.records if r.name == "sqla_context.scope"]
    print("\n".join(lines))
    assert lines == [
        "unit POST /ok/{name}: started on database 'main'",
        "unit POST /ok/{name}: committed (success; status 200) on 'main';"
        " sessions kept for work after the response",
        "unit POST /ok/{name}: committed (success; status 200) on 'main'; sessions closed",
        "unit POST /missing/{name}: started on database 'main'",
        "unit POST /missing/{name}: rolled back (failed; status 404) on 'main';"
        " sessions kept for work after the response",
        "unit POST /missing/{name}: rolled back (failed; status 404) on 'main'; sessions closed",
        "unit POST /early/{name}: started on database 'main'",
        "unit POST /early/{name}: closed early (db.close_session()) on database 'main': committed",
    ]
    assert await sqlite.names() == ["a", "c"]


async def test_a_failed_commit_is_logged_once_without_parameters(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.post("/doomed")
    async def doomed() -> dict[str, str]:
        session = await db.session()
        await session.execute(
            text("INSERT INTO items (name) VALUES (:name)"), {"name": "personal-data"}
        )
        await backend.doom(session)
        return {}

    caplog.set_level(logging.DEBUG, logger="sqla_context")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.post("/doomed")
    assert response.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "commit failed for POST /doomed" in errors[0].getMessage()
    assert errors[0].exc_info is None  # the traceback is the server's to log (re-raised)
    assert not any("personal-data" in r.getMessage() for r in caplog.records)
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await backend.open_transactions() == 0
