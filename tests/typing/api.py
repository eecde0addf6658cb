"""Lines users write, checked by `mypy --strict` in CI and never executed.

A typing regression in the public API fails CI here.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sqla_context import (
    CommitError,
    Database,
    ReadOnlyError,
    Retry,
    RetryError,
    is_retryable,
    on_commit,
    pgbouncer_options,
    run_isolated,
    scope,
)
from sqla_context.testing import CapturedCallbacks, captured_on_commit, set_retry_testing

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


@scope(retry=5)
async def move_funds(source: int, target: int, amount: int = 0) -> bool:
    return source != target


@scope(nested="new", retry=Retry(attempts=3, backoff=0.05, on_retry=lambda a, e, d: None))
async def book(seat: str) -> str:
    return seat


async def main() -> None:
    done: bool = await move_funds(1, 2, amount=3)
    seat: str = await book("12A")
    moved: bool = await run_isolated(functools.partial(move_funds, 1, 2), retry=Retry(attempts=2))
    again: bool = await run_isolated(lambda: move_funds(1, 2), retry=3)
    plain: bool = await run_isolated(move_funds, 1, 2, amount=1)
    try:
        await move_funds(1, 2)
    except RetryError as exc:
        attempts: int = exc.attempts
        last: BaseException = exc.last
        flag: bool = is_retryable(last, lock_timeouts=True)
        del attempts, flag
    with set_retry_testing(True, attempts=None):
        pass
    set_retry_testing(False)
    del done, seat, moved, again, plain
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


replica = Database("sqlite+aiosqlite:///replica.db", read_only=True)
routed = Database(
    "sqlite+aiosqlite:///app.db",
    replicas=[replica],
    read_from_primary=lambda db: db.scope_wrote(),
    replica_retry=2.5,
)
replicas: tuple[Database, ...] = routed.replicas
read_only: bool = replica.read_only


@scope()
async def routed_job() -> bool:
    reader: AsyncSession = await routed.read_session()
    await reader.execute(text("select 1"))
    try:
        await replica.commit()
    except ReadOnlyError as exc:
        raise RuntimeError(str(exc)) from exc
    return routed.scope_wrote()


async def observability() -> None:
    from sqla_context import otel

    watched = Database("sqlite+aiosqlite://", hold_warning=0.5)
    limit: float | None = watched.hold_warning
    otel.instrument(watched)
    otel.instrument()
    otel.uninstrument()
    del limit
