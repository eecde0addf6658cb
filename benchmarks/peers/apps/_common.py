"""What every app of the peer comparison shares: the table, the statements, the settings.

The runner (``benchmarks/peers/run.py``) creates and fills the table, and passes its
settings to the servers through the environment:

``BENCH_DB_URL``
    the database (default: local PostgreSQL through asyncpg).
``BENCH_TABLE``
    the table: ``id`` primary key, ``name``, ``hits`` (a counter), ``ROWS`` rows.
``BENCH_POOL``
    ``pool_size`` of every app's engine (default 5); ``max_overflow`` is always 0.

Endpoints (every app has ``/nodb``; the database apps all five):

``/nodb``                  no database: returns a constant.
``/read``                  selects row ``READ_ID`` by primary key.
``/write``                 ``UPDATE ... SET hits = hits + 1 WHERE id = <random 1..ROWS>
                           RETURNING hits``: one row lock held until the commit, spread over
                           ``ROWS`` rows so that requests rarely wait for each other, and the
                           table does not grow.
``/read_then_slow``        ``/read``, then a ``SLOW_S`` external call (``asyncio.sleep``) while
                           the session, its transaction and its connection are still held.
``/read_close_then_slow``  ``/read``, then the session is ended and its connection returned
                           to the pool (each approach the way its API offers), then the same
                           external call.
"""

from __future__ import annotations

import os
import random
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

DB_URL = os.environ.get("BENCH_DB_URL", "postgresql+asyncpg://postgres@127.0.0.1/test")
TABLE = os.environ.get("BENCH_TABLE", "bench_peers")
ROWS = 1000
READ_ID = 1
SLOW_S = 0.05
ENGINE_OPTIONS: dict[str, Any] = {
    "pool_size": int(os.environ.get("BENCH_POOL", "5")),
    "max_overflow": 0,
}
SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False}


def items_table(name: str, metadata: MetaData) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
        Column("hits", Integer, nullable=False, server_default="0"),
    )


items = items_table(TABLE, MetaData())
READ = select(items.c.id, items.c.name).where(items.c.id == READ_ID)


async def read(session: AsyncSession) -> dict[str, Any]:
    row = (await session.execute(READ)).one()
    return {"id": row.id, "name": row.name}


async def write(session: AsyncSession) -> dict[str, Any]:
    row_id = random.randint(1, ROWS)
    stmt = update(items).where(items.c.id == row_id).values(hits=items.c.hits + 1)
    hits = (await session.execute(stmt.returning(items.c.hits))).scalar_one()
    return {"id": row_id, "hits": hits}


def new_app(**options: Any) -> FastAPI:
    """A FastAPI app with ``/nodb`` (also the runner's readiness probe)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, **options)

    @app.get("/nodb")
    async def nodb() -> dict[str, bool]:
        return {"ok": True}

    return app
