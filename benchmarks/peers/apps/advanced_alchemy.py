"""``advanced-alchemy``: its FastAPI extension, ``Depends(alchemy.provide_session())``.

``AdvancedAlchemy(config=SQLAlchemyAsyncConfig(..., commit_mode="autocommit"), app=app)``
adds a pure-ASGI middleware that commits (2xx) or rolls back when the app call has returned,
i.e. after the response has been sent. Early release: the extension has no call for it;
``await session.commit()`` (plain SQLAlchemy) returns the connection to the pool.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from advanced_alchemy.extensions.fastapi import (
    AdvancedAlchemy,
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
)
from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from ._common import DB_URL, ENGINE_OPTIONS, SESSION_OPTIONS, SLOW_S, new_app, read, write

app = new_app()
alchemy = AdvancedAlchemy(
    config=SQLAlchemyAsyncConfig(
        connection_string=DB_URL,
        commit_mode="autocommit",
        engine_config=EngineConfig(**ENGINE_OPTIONS),
        session_config=AsyncSessionConfig(**SESSION_OPTIONS),
    ),
    app=app,
)
Session = Annotated[AsyncSession, Depends(alchemy.provide_session())]


@app.get("/read")
async def read_one(session: Session) -> dict[str, Any]:
    return await read(session)


@app.get("/write")
async def write_one(session: Session) -> dict[str, Any]:
    return await write(session)


@app.get("/read_then_slow")
async def read_then_slow(session: Session) -> dict[str, Any]:
    row = await read(session)
    await asyncio.sleep(SLOW_S)
    return row


@app.get("/read_close_then_slow")
async def read_close_then_slow(session: Session) -> dict[str, Any]:
    row = await read(session)
    await session.commit()
    await asyncio.sleep(SLOW_S)
    return row
