"""Lines users write, checked by `mypy --strict` in CI and never executed.

A typing regression in the public API fails CI here.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sqla_context import CommitError, Database, ReadOnlyError, run_isolated, scope

db = Database("sqlite+aiosqlite:///app.db", engine_options={"echo": False})
engine: AsyncEngine = db.engine
maker: async_sessionmaker[AsyncSession] = db.sessionmaker


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
