"""``depends``: a hand-written FastAPI dependency with ``yield`` (the FastAPI tutorial's way).

``async with maker() as session, session.begin(): yield session``. With the default
``Depends`` scope (``"request"``) FastAPI runs the dependency's exit (COMMIT, close) after
the response has been sent; ``depends_function.py`` builds the same app with
``scope="function"``. Early release: ``await session.commit()`` (plain SQLAlchemy: the
connection goes back to the pool; the dependency's exit then has nothing left to commit).

No ``from __future__ import annotations`` here: FastAPI must resolve ``Session``, a local
of ``make_app``, from the evaluated annotation.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from ._common import DB_URL, ENGINE_OPTIONS, SESSION_OPTIONS, SLOW_S, new_app, read, write


def make_app(scope: Literal["request", "function"]) -> FastAPI:
    engine = create_async_engine(DB_URL, **ENGINE_OPTIONS)
    maker = async_sessionmaker(engine, **SESSION_OPTIONS)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with maker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    Session = Annotated[AsyncSession, Depends(get_session, scope=scope)]  # noqa: N806
    app = new_app(lifespan=lifespan)

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

    return app


app = make_app("request")
