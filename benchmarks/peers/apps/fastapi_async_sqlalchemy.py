"""``fastapi-async-sqlalchemy``: ``SQLAlchemyMiddleware`` + the ``db.session`` proxy.

As its README shows: ``app.add_middleware(SQLAlchemyMiddleware, db_url=..., engine_args=...)``,
here with ``commit_on_exit=True`` so that it commits like the others (its default leaves the
commit to the handler). A Starlette ``BaseHTTPMiddleware`` that creates a session for every
request (``/nodb`` too) and commits when ``call_next`` has the response, before it is sent.
Early release: the library has no call for it; ``await db.session.commit()`` (plain
SQLAlchemy) returns the connection to the pool.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

from ._common import DB_URL, ENGINE_OPTIONS, SLOW_S, new_app, read, write

app = new_app()
app.add_middleware(
    SQLAlchemyMiddleware, db_url=DB_URL, engine_args=ENGINE_OPTIONS, commit_on_exit=True
)


@app.get("/read")
async def read_one() -> dict[str, Any]:
    return await read(db.session)


@app.get("/write")
async def write_one() -> dict[str, Any]:
    return await write(db.session)


@app.get("/read_then_slow")
async def read_then_slow() -> dict[str, Any]:
    row = await read(db.session)
    await asyncio.sleep(SLOW_S)
    return row


@app.get("/read_close_then_slow")
async def read_close_then_slow() -> dict[str, Any]:
    row = await read(db.session)
    await db.session.commit()
    await asyncio.sleep(SLOW_S)
    return row
