"""The ways the docs show to get a session in a web app, in every place users put them.

Styles (docs/web.md, docs/howto.md, docs/concepts.md, docs/troubleshooting.md): ``await
db.session()`` in the code itself, ``Annotated[AsyncSession, Depends(db.session)]``, a
dependency of one's own with ``yield``, an ``async with db.transaction()`` block, a helper
decorated with ``@db.transaction()``, an early ``await db.commit()`` or ``await
db.close_session()`` before slow work, ``run_isolated()`` and ``db.new_session(begin=True)``.

Places: the handler, a dependency, a ``BackgroundTask``, a ``StreamingResponse`` body, and a
child task awaited inside the handler (``asyncio.create_task``, ``asyncio.TaskGroup``).

Each case sends a request that succeeds and one that fails after the work: an error status
(409) where the handler still decides the status, an exception where the response has
already started (the background task, the stream). The documented outcome (docs/web.md,
docs/concepts.md): work on the request's own session follows the request, committed on
success and rolled back on failure, also after the response; work a style commits itself
(a top-level ``db.transaction()`` block, ``db.commit()``, ``close_session()``,
``run_isolated()``, ``new_session(begin=True)``) stays committed whatever happens next.

The whole matrix runs on SQLite, in one app; the handler place, where only the database
differs, runs on every backend. Every case is checked through an independent connection (the
rows), the pool (no connection checked out after each case) and the server (no transaction
left open).
"""

# No `from __future__ import annotations`: FastAPI must evaluate the Depends(db.session)
# annotations that refer to a local `db`.

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import httpx
from fastapi import BackgroundTasks, Depends, FastAPI, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import Database, run_isolated
from sqla_context.asgi import SessionMiddleware

from ..conftest import Backend, insert

# Styles that commit their work themselves: it stays whatever the request does next.
COMMITS_ITSELF = {
    "transaction-block",
    "transaction-decorator",
    "commit-early",
    "close-early",
    "run-isolated",
    "new-session",
}
STYLES = [
    "session",
    "depends",
    "yield-dependency",
    "transaction-block",
    "transaction-decorator",
    "commit-early",
    "close-early",
    "run-isolated",
    "new-session",
]
PLACES = ["handler", "dependency", "background", "stream", "child-task", "task-group"]
AFTER_THE_RESPONSE = {"background", "stream"}


class Bug(Exception):
    """The failure that follows the work in a failing request."""


Work = Callable[[str], Awaitable[None]]


def make_work(db: Database, style: str, session: AsyncSession | None) -> Work:
    """The style's way of writing row ``name``; ``session`` is the one a dependency gave."""

    @db.transaction()
    async def decorated(name: str) -> None:
        await insert(await db.session(), name)

    async def on_scope_session(name: str) -> None:
        await insert(await db.session(), name)

    async def work(name: str) -> None:
        if style in ("depends", "yield-dependency"):
            assert session is not None
            await insert(session, name)
        elif style == "session":
            await insert(await db.session(), name)
        elif style == "transaction-block":
            async with db.transaction() as block_session:
                await insert(block_session, name)
        elif style == "transaction-decorator":
            await decorated(name)
        elif style == "commit-early":
            await insert(await db.session(), name)
            await db.commit()
        elif style == "close-early":
            await insert(await db.session(), name)
            await db.close_session()
            assert db.engine.pool.checkedout() == 0, "close_session() returned the connection"
        elif style == "run-isolated":
            await run_isolated(on_scope_session, name)
        else:
            assert style == "new-session"
            async with db.new_session(begin=True) as own:
                await insert(own, name)

    return work


def make_app(db: Database) -> FastAPI:
    """POST /{style}/{place}/{outcome} writes row "style.place.outcome" as the style does."""
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    async def own_session() -> AsyncIterator[AsyncSession]:  # a dependency with yield
        yield await db.session()

    Session = Annotated[AsyncSession, Depends(db.session)]  # noqa: N806
    OwnSession = Annotated[AsyncSession, Depends(own_session)]  # noqa: N806

    def work_for(style: str, session: AsyncSession, own: AsyncSession) -> Work:
        return make_work(db, style, own if style == "yield-dependency" else session)

    async def run(work: Work, name: str, fail: bool, place: str) -> None:
        await work(name)
        if fail and place in AFTER_THE_RESPONSE:
            raise Bug(name)

    async def in_dependency(
        style: str, place: str, outcome: str, session: Session, own: OwnSession
    ) -> None:
        if place == "dependency":
            name = f"{style}.{place}.{outcome}"
            await run(work_for(style, session, own), name, outcome == "fail", place)

    @app.post("/{style}/{place}/{outcome}")
    async def handler(
        style: str,
        place: str,
        outcome: str,
        session: Session,
        own: OwnSession,
        tasks: BackgroundTasks,
        _: Annotated[None, Depends(in_dependency)],
    ) -> Response:
        work, name, fail = (
            work_for(style, session, own),
            f"{style}.{place}.{outcome}",
            outcome == "fail",
        )
        if place == "handler":
            await run(work, name, fail, place)
        elif place == "child-task":
            await asyncio.create_task(run(work, name, fail, place))
        elif place == "task-group":
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
                group.create_task(run(work, name, fail, place))
        elif place == "background":
            tasks.add_task(run, work, name, fail, place)
        elif place == "stream":

            async def body() -> AsyncIterator[bytes]:
                yield b"start;"
                await run(work, name, fail, place)
                yield b"end"

            return StreamingResponse(body(), media_type="text/plain")
        status = 409 if fail and place not in AFTER_THE_RESPONSE else 200
        return Response("done", status_code=status)

    return app


async def test_documented_patterns(backend: Backend) -> None:
    # On servers only the handler: the places differ in the middleware, not in the database.
    places = PLACES if backend.kind == "sqlite" else ["handler"]
    db = backend.database()
    statuses: dict[str, tuple[int, int]] = {}
    leaks: dict[str, int] = {}
    transport = httpx.ASGITransport(app=make_app(db), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for style in STYLES:
            for place in places:
                case = f"{style}.{place}"
                ok = await client.post(f"/{style}/{place}/ok")
                failed = await client.post(f"/{style}/{place}/fail")
                statuses[case] = (ok.status_code, failed.status_code)
                leaks[case] = db.engine.pool.checkedout()
    expected_statuses, expected_rows = {}, []
    for style in STYLES:
        for place in places:
            case = f"{style}.{place}"
            after_the_response = place in AFTER_THE_RESPONSE
            expected_statuses[case] = (200, 200 if after_the_response else 409)
            expected_rows.append(f"{case}.ok")
            if style in COMMITS_ITSELF:  # committed by the style before the failure
                expected_rows.append(f"{case}.fail")
    assert statuses == expected_statuses
    assert await backend.names() == sorted(expected_rows)
    assert leaks == dict.fromkeys(statuses, 0), "no connection left checked out"
    assert await backend.open_transactions() == 0
