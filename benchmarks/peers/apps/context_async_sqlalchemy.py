"""``context-async-sqlalchemy``: its FastAPI middleware + ``await db_session(connection)``.

Set up as its "Getting started" shows for FastAPI: a ``DBConnect`` with an engine and a
session maker factory, ``add_fastapi_http_db_session_middleware(app)`` (a Starlette
``BaseHTTPMiddleware``: the commit runs when ``call_next`` has the response, before it is
sent) and ``connection.close()`` at shutdown. Early release: its documented
``await close_db_session(connection)`` (closes the session, which rolls back, and returns
the connection). ``context_async_sqlalchemy_asgi.py`` uses its pure-ASGI middleware instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from context_async_sqlalchemy import DBConnect, close_db_session, db_session
from context_async_sqlalchemy.fastapi_utils import add_fastapi_http_db_session_middleware
from fastapi import FastAPI
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from ._common import DB_URL, ENGINE_OPTIONS, SESSION_OPTIONS, SLOW_S, new_app, read, write


def create_engine(host: str) -> AsyncEngine:
    return _create_async_engine(make_url(DB_URL).set(host=host), **ENGINE_OPTIONS)


def create_session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, **SESSION_OPTIONS)


connection = DBConnect(
    host=make_url(DB_URL).host,
    engine_creator=create_engine,
    session_maker_creator=create_session_maker,
)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    await connection.close()


def add_routes(app: FastAPI) -> FastAPI:
    @app.get("/read")
    async def read_one() -> dict[str, Any]:
        return await read(await db_session(connection))

    @app.get("/write")
    async def write_one() -> dict[str, Any]:
        return await write(await db_session(connection))

    @app.get("/read_then_slow")
    async def read_then_slow() -> dict[str, Any]:
        row = await read(await db_session(connection))
        await asyncio.sleep(SLOW_S)
        return row

    @app.get("/read_close_then_slow")
    async def read_close_then_slow() -> dict[str, Any]:
        row = await read(await db_session(connection))
        await close_db_session(connection)
        await asyncio.sleep(SLOW_S)
        return row

    return app


app = add_routes(new_app(lifespan=lifespan))
add_fastapi_http_db_session_middleware(app)
