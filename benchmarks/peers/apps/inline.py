"""``inline``: the handler opens its session itself, no dependency, no middleware.

``async with maker() as session, session.begin():`` around the statement: COMMIT and close
before the response. For ``/read_close_then_slow`` the slow call simply follows the block.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from ._common import DB_URL, ENGINE_OPTIONS, SESSION_OPTIONS, SLOW_S, new_app, read, write

engine = create_async_engine(DB_URL, **ENGINE_OPTIONS)
maker = async_sessionmaker(engine, **SESSION_OPTIONS)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    await engine.dispose()


app = new_app(lifespan=lifespan)


@app.get("/read")
async def read_one() -> dict[str, Any]:
    async with maker() as session, session.begin():
        return await read(session)


@app.get("/write")
async def write_one() -> dict[str, Any]:
    async with maker() as session, session.begin():
        return await write(session)


@app.get("/read_then_slow")
async def read_then_slow() -> dict[str, Any]:
    async with maker() as session, session.begin():
        row = await read(session)
        await asyncio.sleep(SLOW_S)
    return row


@app.get("/read_close_then_slow")
async def read_close_then_slow() -> dict[str, Any]:
    async with maker() as session, session.begin():
        row = await read(session)
    await asyncio.sleep(SLOW_S)
    return row
