"""Regression tests for defects found by outside review (wave 2 hardening).

Each test failed before its fix; each checks the database through the backend's own
witness connection, and the backend's teardown checks that no connection is left checked
out and no server transaction open.
"""

import asyncio
import contextvars
import gc
import threading
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sqla_context import Database, EventLoopError, scope
from sqla_context.asgi import SessionMiddleware

from .conftest import Backend, Item, insert

TIMEOUT = 10


# -- 1. a savepoint undoes a failed flush --------------------------------------------------


async def test_savepoint_undoes_a_failed_flush_and_the_scope_commits_the_rest(
    backend: Backend,
) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        session.add(Item(name="first"))
        await session.flush()
        with pytest.raises(IntegrityError):
            async with db.transaction():
                session.add(Item(name="first"))  # duplicate key: the flush fails
                await session.flush()
        # Caught: the outer transaction goes on, as with plain begin_nested().
        session.add(Item(name="second"))
        await session.flush()
    assert await backend.names() == ["first", "second"]


async def test_savepoint_whose_failed_flush_was_caught_inside_the_block(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "outer")
        async with db.transaction():
            session.add(Item(name="outer"))
            with pytest.raises(IntegrityError):
                await session.flush()
        await insert(session, "after")
    assert await backend.names() == ["after", "outer"]


# -- 2. a session captured before the response stays valid afterwards -----------------------


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_depends_session_used_in_a_background_task_is_committed(backend: Backend) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)
    captured: list[AsyncSession] = []

    async def later(session: AsyncSession) -> None:
        await insert(session, "from-background")

    @app.post("/items", status_code=201)
    async def create(
        session: Annotated[AsyncSession, Depends(db.session)], tasks: BackgroundTasks
    ) -> dict[str, str]:
        await insert(session, "from-handler")
        captured.append(session)
        tasks.add_task(later, session)
        return {"ok": "yes"}

    async with _client(app) as client:
        assert (await client.post("/items")).status_code == 201
    assert await backend.names() == ["from-background", "from-handler"]
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0
    # Once the request is over, the session is ended for good: using it again is loud.
    with pytest.raises(InvalidRequestError, match="permanently closed"):
        await captured[0].execute(text("SELECT 1"))


async def test_depends_session_used_in_a_streaming_body_is_committed(backend: Backend) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    @app.get("/stream")
    async def stream(session: Annotated[AsyncSession, Depends(db.session)]) -> StreamingResponse:
        await insert(session, "before-start")

        async def body() -> Any:
            await insert(session, "while-streaming")
            yield b"done"

        return StreamingResponse(body())

    async with _client(app) as client:
        assert (await client.get("/stream")).text == "done"
    assert await backend.names() == ["before-start", "while-streaming"]
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions() == 0


async def test_session_kept_past_its_scope_raises_instead_of_writing(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "inside")
    with pytest.raises(InvalidRequestError, match="permanently closed"):
        await insert(session, "outside")
    assert await backend.names() == ["inside"]
    assert await backend.open_transactions() == 0


# -- 3. a statement still running at scope exit: no leak, no hang ---------------------------


@pytest.mark.parametrize("commit", ["auto", "never"])
async def test_gather_over_the_scope_session_leaks_nothing(backend: Backend, commit: str) -> None:
    if backend.kind == "sqlite":
        pytest.skip("needs a server-side sleep; SQLite runs statements in a driver thread")
    sleep = "SELECT pg_sleep(0.5)" if backend.kind == "postgresql" else "SELECT SLEEP(0.5)"
    db = backend.database()
    started = asyncio.Event()
    slow_task: list[asyncio.Task[Any]] = []

    async def slow() -> None:
        session = await db.session()
        started.set()
        await session.execute(text(sleep))

    async def fail() -> None:
        await started.wait()
        await asyncio.sleep(0.05)  # the other call is now inside its statement
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        async with scope(commit=commit):  # type: ignore[arg-type]
            await insert(await db.session(), "lost")
            task = asyncio.ensure_future(slow())
            slow_task.append(task)
            await asyncio.gather(task, fail())
    # The statement's task ends (no hang), and the connection is back in the pool.
    await asyncio.wait_for(asyncio.gather(slow_task[0], return_exceptions=True), TIMEOUT)
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions(settle=True) == 0
    assert await backend.names() == []


async def test_child_task_mid_statement_at_scope_exit(backend: Backend) -> None:
    if backend.kind == "sqlite":
        pytest.skip("needs a server-side sleep; SQLite runs statements in a driver thread")
    sleep = "SELECT pg_sleep(0.3)" if backend.kind == "postgresql" else "SELECT SLEEP(0.3)"
    db = backend.database()
    started = asyncio.Event()

    async def child() -> None:
        session = await db.session()
        started.set()
        await session.execute(text(sleep))

    async with scope():
        await insert(await db.session(), "kept")
        task = asyncio.create_task(child())
        await started.wait()
        await asyncio.sleep(0.05)
    # The scope waited for the child's statement, then committed and closed.
    await asyncio.wait_for(task, TIMEOUT)
    assert db.engine.pool.checkedout() == 0
    assert await backend.open_transactions(settle=True) == 0
    assert await backend.names() == ["kept"]


# -- 6. switch_url() to the URL in use keeps an engine_factory engine -----------------------


async def test_switch_url_to_the_url_in_use_keeps_the_factory_engine(backend: Backend) -> None:
    built = create_async_engine(backend.url, pool_size=2, max_overflow=0)
    db = Database(engine_factory=lambda: built)
    backend.databases.append(db)
    assert db.engine is built
    await db.switch_url(backend.url)
    assert db.engine is built, "the factory's engine, listeners and pool settings are kept"
    async with scope():
        await insert(await db.session(), "same")
    assert await backend.names() == ["same"]


# -- 7. event loops ---------------------------------------------------------------------------


async def test_scope_session_used_from_another_event_loop_fails_clearly(backend: Backend) -> None:
    db = backend.database()

    async def in_thread_loop() -> None:
        await db.session()

    async with scope():
        await insert(await db.session(), "kept")
        with pytest.raises(EventLoopError, match="another event loop"):
            await asyncio.to_thread(asyncio.run, in_thread_loop())
    assert await backend.names() == ["kept"]
    assert await backend.open_transactions() == 0


# The first loop's idle connections cannot be closed from the second loop: they are
# dropped, and collected here (with the driver's ResourceWarning) rather than in a later test.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_database_reused_from_a_second_asyncio_run(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/loops.db"
    db = Database(url)

    async def write(name: str) -> list[str]:
        async with scope():
            session = await db.session()
            await session.execute(text("CREATE TABLE IF NOT EXISTS t (name VARCHAR(10))"))
            await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": name})
        async with scope():
            rows = await (await db.session()).execute(text("SELECT name FROM t ORDER BY name"))
            return [r[0] for r in rows]

    assert asyncio.run(write("first")) == ["first"]
    assert asyncio.run(write("second")) == ["first", "second"]  # a fresh pool, no error
    asyncio.run(db.dispose())
    gc.collect()


async def test_database_in_use_by_a_loop_in_another_thread_fails_clearly(sqlite: Backend) -> None:
    db = sqlite.database()
    async with scope():
        await insert(await db.session(), "here")
    outcome: list[BaseException | None] = []

    def other_thread() -> None:
        async def use() -> None:
            async with scope():
                await db.session()

        try:
            asyncio.run(use())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    await asyncio.to_thread(thread.join, TIMEOUT)
    assert isinstance(outcome[0], EventLoopError)
    assert await sqlite.names() == ["here"]


# -- 8. commit hooks run in the scope's own task and context --------------------------------

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


async def test_commit_hooks_at_scope_exit_see_the_scope(backend: Backend) -> None:
    db = backend.database()
    in_hook: list[AsyncSession] = []

    async def before_commit(session: AsyncSession) -> None:
        in_hook.append(await db.session())  # the scope is still open in its hooks
        _seen.set("set-by-hook")

    async with scope(before_commit=before_commit):
        session = await db.session()
        await insert(session, "hooked")
    assert in_hook == [session]
    assert _seen.get() == "set-by-hook", "the hook ran in the scope's own context"
    assert await backend.names() == ["hooked"]


# -- 12. a handler that raised is rolled back whatever status answers it --------------------


class OutOfStock(Exception):
    pass


@pytest.mark.parametrize("status", [302, 200])
async def test_exception_handler_answering_success_does_not_commit(
    backend: Backend, status: int
) -> None:
    db = backend.database()
    app = FastAPI()
    app.add_middleware(SessionMiddleware)

    async def out_of_stock(request: Any, exc: Exception) -> Any:
        if status == 302:
            return RedirectResponse("/sold-out", status_code=302)
        return JSONResponse({"sold_out": True})

    app.add_exception_handler(OutOfStock, out_of_stock)

    @app.post("/buy")
    async def buy() -> None:
        await insert(await db.session(), "half-done")
        raise OutOfStock

    @app.post("/ok")
    async def ok() -> None:
        await insert(await db.session(), "done")

    async with _client(app) as client:
        assert (await client.post("/buy")).status_code == status
        assert (await client.post("/ok")).status_code == 200
    assert await backend.names() == ["done"]
    assert db.engine.pool.checkedout() == 0
