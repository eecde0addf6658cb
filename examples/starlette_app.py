"""A minimal Starlette app with SessionMiddleware.

    .venv/bin/python -m uvicorn examples.starlette_app:app      # from the repository root

POST /notes/{text} stores a note (committed before the 201 is sent); GET /notes lists them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sqla_context import Database
from sqla_context.asgi import SessionMiddleware

db = Database(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///starlette_notes.db"))
metadata = MetaData()
notes = Table(
    "starlette_notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", String(200), nullable=False),
)


async def list_notes(request: Request) -> JSONResponse:
    rows = await (await db.session()).execute(select(notes.c.text).order_by(notes.c.id))
    return JSONResponse(rows.scalars().all())


async def add_note(request: Request) -> JSONResponse:
    text = request.path_params["text"]
    if not text.strip():
        return JSONResponse({"detail": "empty"}, status_code=422)  # nothing to roll back
    await (await db.session()).execute(insert(notes).values(text=text))
    return JSONResponse({"stored": text}, status_code=201)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with db:  # disposed at shutdown
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield


app = Starlette(
    routes=[
        Route("/notes", list_notes, methods=["GET"]),
        Route("/notes/{text}", add_note, methods=["POST"]),
    ],
    lifespan=lifespan,
)
app.add_middleware(SessionMiddleware)
