"""``sqla-context``: ``SessionMiddleware`` + ``session = await db.session()``.

The middleware commits before the response starts; ``/read_close_then_slow`` ends the
session early with ``await db.close_session()`` (commit, close, connection back to the pool).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqla_context import Database
from sqla_context.asgi import SessionMiddleware, dispose_at_shutdown

from ._common import DB_URL, ENGINE_OPTIONS, SESSION_OPTIONS, SLOW_S, new_app, read, write

db = Database(DB_URL, engine_options=ENGINE_OPTIONS, session_options=SESSION_OPTIONS)
app = new_app(lifespan=dispose_at_shutdown(db))
app.add_middleware(SessionMiddleware)


@app.get("/read")
async def read_one() -> dict[str, Any]:
    return await read(await db.session())


@app.get("/write")
async def write_one() -> dict[str, Any]:
    return await write(await db.session())


@app.get("/read_then_slow")
async def read_then_slow() -> dict[str, Any]:
    row = await read(await db.session())
    await asyncio.sleep(SLOW_S)
    return row


@app.get("/read_close_then_slow")
async def read_close_then_slow() -> dict[str, Any]:
    row = await read(await db.session())
    await db.close_session()
    await asyncio.sleep(SLOW_S)
    return row
