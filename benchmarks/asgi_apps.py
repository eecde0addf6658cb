"""The FastAPI applications measured by ``asgi_overhead.py``, one module attribute per variant.

Each is served by its own uvicorn process, e.g.
``python -m uvicorn benchmarks.asgi_apps:ping_plain`` (from the repository root, with
``PYTHONPATH=src``). Every app has the same ``GET /ping`` route (the readiness probe, and
the measured endpoint of the no-database pair); the database apps add ``GET /read``.

``ping_plain``
    FastAPI, no middleware. ``GET /ping`` returns ``{"ping": "pong"}``.
``ping_mw``
    The same app with ``app.add_middleware(SessionMiddleware)``. No route opens a session,
    so this measures only what the middleware itself adds to a request.
``ping_pass`` / ``ping_minimal``
    References for the ``ping`` pair: the least a middleware of this kind costs. ``ping_pass``
    adds a pure-ASGI middleware that only awaits the app; ``ping_minimal`` one that sets a
    context variable for the request and passes every message through an ``async def send``
    wrapper (the two things any middleware that gives each request a scope and acts before
    the response starts must do), and nothing else.
``read_ctx``
    FastAPI + ``SessionMiddleware``. ``GET /read`` takes ``session = await db.session()``
    and selects one row by primary key; the middleware commits before the response starts.
``read_dep``
    FastAPI, no middleware. ``GET /read`` gets a session from a hand-written dependency,
    ``async with maker() as s, s.begin(): yield s`` (commit at the end), and runs the same
    query. FastAPI runs the dependency's exit (the COMMIT and the close) after the response
    has been sent (default ``Depends`` scope "request").
``read_inline``
    Reference, no middleware, no dependency: the handler itself runs
    ``async with maker() as s, s.begin():`` around the same query (commit before the
    response, like ``read_ctx``). It separates the cost of FastAPI's dependency machinery
    from the cost of the session handling.

Every app also has ``GET /_gc``: the number of garbage collections per generation and the
seconds spent in them since the process started (counted by a ``gc.callbacks`` hook, which
costs nothing between collections). ``asgi_overhead.py`` reads it before and after each run.

Both database apps use the URL in ``BENCH_DB_URL`` (default: local PostgreSQL through
asyncpg), the table named in ``BENCH_TABLE`` (created and filled by ``asgi_overhead.py``),
the same engine options (``pool_size=10``, ``max_overflow=0``) and the same session options
(``expire_on_commit=False``, the ``Database`` default). Engines are created lazily (no I/O
at import) and disposed at shutdown through the lifespan.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from sqla_context import Database
from sqla_context.asgi import SessionMiddleware, dispose_at_shutdown

__all__ = [
    "ENGINE_OPTIONS",
    "items_table",
    "ping_minimal",
    "ping_mw",
    "ping_pass",
    "ping_plain",
    "read_ctx",
    "read_dep",
    "read_inline",
]

DB_URL = os.environ.get("BENCH_DB_URL", "postgresql+asyncpg://postgres@127.0.0.1/test")
TABLE = os.environ.get("BENCH_TABLE", "bench_items")
#: The row every ``GET /read`` selects (the table holds rows 1..N, N >= this).
ROW_ID = 1
#: Identical for all the database variants.
ENGINE_OPTIONS: dict[str, Any] = {"pool_size": 10, "max_overflow": 0}
SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False}


def items_table(name: str, metadata: MetaData) -> Table:
    """The benchmark table: ``id`` primary key, ``name``; ``asgi_overhead.py`` fills it."""
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
    )


items = items_table(TABLE, MetaData())
_QUERY = select(items.c.id, items.c.name).where(items.c.id == ROW_ID)


class _GcStats:
    """Collections per generation and the seconds spent in them, for ``GET /_gc``."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._started


_gc_stats = _GcStats()
gc.callbacks.append(_gc_stats)


def _app(**options: Any) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, **options)

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ping": "pong"}

    @app.get("/_gc")
    async def gc_stats() -> dict[str, Any]:
        return {"collections": _gc_stats.collections, "seconds": _gc_stats.seconds}

    return app


async def _read(session: AsyncSession) -> dict[str, Any]:
    row = (await session.execute(_QUERY)).one()
    return {"id": row.id, "name": row.name}


# -- no database --------------------------------------------------------------------------

ping_plain = _app()

ping_mw = _app()
ping_mw.add_middleware(SessionMiddleware)


class _PassThrough:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


_request_var: ContextVar[object] = ContextVar("bench_request", default=None)


class _Minimal:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        token = _request_var.set(object())

        async def forward(message: Any) -> None:
            await send(message)

        try:
            await self.app(scope, receive, forward)
        finally:
            _request_var.reset(token)


ping_pass = _app()
ping_pass.add_middleware(_PassThrough)

ping_minimal = _app()
ping_minimal.add_middleware(_Minimal)


# -- one-row read: sqla_context ------------------------------------------------------------

db = Database(DB_URL, engine_options=ENGINE_OPTIONS, session_options=SESSION_OPTIONS)

read_ctx = _app(lifespan=dispose_at_shutdown(db))
read_ctx.add_middleware(SessionMiddleware)


@read_ctx.get("/read")
async def read_with_context() -> dict[str, Any]:
    session = await db.session()
    return await _read(session)


# -- one-row read: hand-written dependency -------------------------------------------------

engine = create_async_engine(DB_URL, **ENGINE_OPTIONS)
maker = async_sessionmaker(engine, **SESSION_OPTIONS)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with maker() as session, session.begin():
        yield session


@asynccontextmanager
async def _dispose_engine(_: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await engine.dispose()


read_dep = _app(lifespan=_dispose_engine)


@read_dep.get("/read")
async def read_with_dependency(
    session: Annotated[AsyncSession, Depends(get_session)],
) -> dict[str, Any]:
    return await _read(session)


# -- one-row read: hand-written, inside the handler (reference) ---------------------------

read_inline = _app(lifespan=_dispose_engine)


@read_inline.get("/read")
async def read_inline_session() -> dict[str, Any]:
    async with maker() as session, session.begin():
        return await _read(session)
