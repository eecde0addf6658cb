"""Lines users write, checked by `mypy --strict` in CI and never executed.

A typing regression in the public API fails CI here.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sqla_context import CommitError, Database, on_commit, pgbouncer_options, run_isolated, scope
from sqla_context.testing import CapturedCallbacks, captured_on_commit

db = Database("sqlite+aiosqlite:///app.db", engine_options={"echo": False})
engine: AsyncEngine = db.engine
maker: async_sessionmaker[AsyncSession] = db.sessionmaker
bouncer_url = "postgresql+asyncpg://app@pgbouncer:6432/shop"
bounced = Database(bouncer_url, engine_options=pgbouncer_options(bouncer_url, pool_pre_ping=True))
options: dict[str, Any] = pgbouncer_options("psycopg")


@scope()
async def job(user_id: int, *, dry_run: bool = False) -> str:
    session: AsyncSession = await db.session()
    await session.execute(text("select 1"))
    return str(user_id)


@scope(commit="never", nested="new")
async def report(*args: int) -> int:
    return sum(args)


@db.transaction(existing="join")
async def write(name: str) -> None:
    session = await db.session()
    await session.execute(text("select :n"), {"n": name})


async def main() -> None:
    name: str = await job(1, dry_run=True)
    total: int = await report(1, 2, 3)
    a, b = await asyncio.gather(run_isolated(job, 1), run_isolated(report, 1, 2))
    pair: tuple[str, int] = (a, b)
    async with scope(before_commit=lambda s: None):
        async with db.transaction() as session:
            s2: AsyncSession = session
        await db.commit()
        await db.rollback()
        await db.close_session(commit=False)
    async with db.new_session(begin=True) as independent:
        s3: AsyncSession = independent
    try:
        await write("x")
    except CommitError as exc:
        failed: str = exc.failed
        committed: list[str] = exc.committed
    await db.switch_url("sqlite+aiosqlite:///other.db")
    await db.dispose()
    del name, total, pair, s2, s3, failed, committed


def asgi_usage() -> None:
    from sqla_context.asgi import SessionMiddleware, dispose_at_shutdown

    async def app(scope: object, receive: object, send: object) -> None: ...

    wrapped = SessionMiddleware(app, commit_on=lambda status: status < 300, websocket="none")
    lifespan = dispose_at_shutdown(db)
    del wrapped, lifespan


@db.transaction()
async def transfer(amount: int) -> int:
    return amount


async def spawn() -> None:
    # Decorated functions return coroutines: tasks and asyncio.run() accept them.
    task: asyncio.Task[str] = asyncio.create_task(job(1))
    moved: asyncio.Task[int] = asyncio.create_task(transfer(5))
    await task
    await moved


def run_job_from_sync_code() -> str:
    return asyncio.run(job(2, dry_run=True))


def send_mail(to: str) -> None: ...


async def notify() -> None: ...


async def callbacks() -> None:
    async with scope():
        on_commit(functools.partial(send_mail, "ada@example.com"))
        on_commit(notify, raise_errors=True)
        on_commit(lambda: print("done"))
    with captured_on_commit() as captured:
        c: CapturedCallbacks = captured
        count: int = len(c)
        print(count, c.callbacks)
        await c.run()


async def observability() -> None:
    from sqla_context import otel

    watched = Database("sqlite+aiosqlite://", hold_warning=0.5)
    limit: float | None = watched.hold_warning
    otel.instrument(watched)
    otel.instrument()
    otel.uninstrument()
    del limit
