"""A cron-style job and a periodic loop: ``@scope()`` makes every run one unit of work.

    .venv/bin/python examples/cli_job.py --once          # one run, as cron would start it
    .venv/bin/python examples/cli_job.py --every 60      # a run every 60 s until Ctrl-C
    .venv/bin/python examples/cli_job.py --selfcheck     # both, with a failing run; checks, exits
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test \\
        .venv/bin/python examples/cli_job.py --once

The job expires pending orders older than ``--max-age`` minutes: each one's payment hold is
released at the payment provider, its status becomes "expired". One run is one scope: its
changes are committed when the decorated function returns, and rolled back entirely if it
raises (the provider is down, say) or is cancelled (Ctrl-C, a scheduler's timeout), so the next
run finds every stale order still pending and tries again. Releasing a hold twice is harmless at
the provider (an idempotency key), which makes the retry safe.

The database is ./cli_job.db (SQLite) unless DATABASE_URL says otherwise; the example's tables
are dropped, recreated and filled with sample orders when the program starts.

The same job under a scheduler (neither is a dependency of this project): every call of a
``@scope()`` function opens a scope of its own, so nothing more is needed than calling it.

    # APScheduler 3.x
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    async def main() -> None:
        scheduler = AsyncIOScheduler()
        scheduler.add_job(expire_stale_orders, "interval", minutes=5, args=[timedelta(hours=1)])
        scheduler.start()
        try:
            await asyncio.Event().wait()            # until Ctrl-C
        finally:
            scheduler.shutdown()
            await db.dispose()

    # arq: job functions take the worker's ctx first
    from arq import cron

    async def expire_job(ctx: dict) -> int:
        return len(await expire_stale_orders(timedelta(hours=1)))

    async def shutdown(ctx: dict) -> None:
        await db.dispose()

    class WorkerSettings:
        cron_jobs = [cron(expire_job, minute={0, 15, 30, 45})]
        on_shutdown = shutdown

    # crontab: the --once mode, which exits 1 when the run failed (cron mails the output)
    */15 * * * *  cd /srv/shop && .venv/bin/python examples/cli_job.py --once
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, scope

log = logging.getLogger("cli_job")

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///cli_job.db")
db = Database(DATABASE_URL)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "cli_job_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PaymentProvider:
    """Stands for an HTTP API; ``outages`` makes its next calls fail, as real ones sometimes do."""

    def __init__(self, outages: int = 0) -> None:
        self.outages = outages
        self.released: list[int] = []

    async def release_hold(self, order_id: int) -> None:
        await asyncio.sleep(0)  # the network call
        if self.outages:
            self.outages -= 1
            raise ConnectionError("payment provider unavailable")
        self.released.append(order_id)


payments = PaymentProvider()


def utcnow() -> datetime:
    return datetime.now(UTC)


@scope()  # every call is one unit of work: committed on return, rolled back if it raises
async def expire_stale_orders(max_age: timedelta) -> list[int]:
    """Expire the pending orders placed more than ``max_age`` ago; return their ids."""
    session = await db.session()
    stale = await session.scalars(
        select(Order)
        .where(Order.status == "pending", Order.placed_at < utcnow() - max_age)
        .order_by(Order.id)
    )
    expired = []
    for order in stale:
        order.status = "expired"
        await payments.release_hold(order.id)  # raises: every change of this run is undone
        expired.append(order.id)
    return expired


async def run_every(seconds: float, max_age: timedelta, runs: int | None = None) -> None:
    """The plain-asyncio scheduler: call the job every ``seconds``; a failed run is retried."""
    loop = asyncio.get_running_loop()
    number = 0
    while runs is None or number < runs:
        number += 1
        started = loop.time()
        try:
            expired = await expire_stale_orders(max_age)
        except Exception as exc:  # the run's scope was rolled back; the next run retries
            log.warning("run %d failed and was rolled back", number, exc_info=True)
            print(f"run {number}: failed ({exc}), rolled back")
        else:
            print(f"run {number}: expired {expired}" if expired else f"run {number}: nothing to do")
        if runs is None or number < runs:
            await asyncio.sleep(max(0.0, seconds - (loop.time() - started)))


async def create_schema() -> None:
    """Drop and recreate the example's table and place four orders of different ages."""
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    now = utcnow()
    ages = {"lamp": 180, "desk": 90, "sofa": 10, "rug": 0}  # minutes
    async with scope():  # committed at the end of the block
        (await db.session()).add_all(
            Order(product=p, placed_at=now - timedelta(minutes=m)) for p, m in ages.items()
        )


async def statuses() -> dict[int, str]:
    async with scope(commit="never"):  # read only
        rows = await (await db.session()).execute(select(Order.id, Order.status).order_by(Order.id))
        return {order_id: status for order_id, status in rows}


async def selfcheck() -> None:
    await create_schema()
    print("orders:", await statuses())

    expired = await expire_stale_orders(timedelta(hours=1))  # what --once does
    print("single run, max age 60 min: expired", expired)

    # The periodic loop, with orders older than 5 minutes now stale and an outage for the
    # first run: it is rolled back (sofa stays pending) and the next run does the work.
    payments.outages = 1
    print("every 0.05 s, max age 5 min, the provider down for one call:")
    await run_every(0.05, timedelta(minutes=5), runs=3)

    final = await statuses()
    print("database:", final)
    print("holds released:", payments.released)
    print("connections checked out:", db.engine.pool.checkedout())
    assert expired == [1, 2], expired
    assert final == {1: "expired", 2: "expired", 3: "expired", 4: "pending"}, final
    assert payments.released == [1, 2, 3], payments.released
    assert db.engine.pool.checkedout() == 0
    print("selfcheck passed")


async def main(args: argparse.Namespace) -> int:
    async with db:  # disposes the engine when the program ends (also on Ctrl-C)
        if args.selfcheck:
            await selfcheck()
            return 0
        await create_schema()
        max_age = timedelta(minutes=args.max_age)
        if args.once:
            try:
                expired = await expire_stale_orders(max_age)
            except Exception:
                log.exception("the run failed; its changes were rolled back")
                return 1
            print("expired", expired, "->", await statuses())
            return 0
        print(f"expiring orders older than {args.max_age} min every {args.every} s; Ctrl-C to stop")
        await run_every(args.every, max_age)
        return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Expire stale pending orders.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one run, then exit (cron)")
    mode.add_argument("--every", type=float, default=60.0, help="seconds between runs")
    mode.add_argument("--selfcheck", action="store_true", help="run the checks and exit")
    parser.add_argument("--max-age", type=float, default=60.0, help="minutes (default 60)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
