"""taskiq tasks that place orders: SessionMiddleware runs every task execution in a scope.

    .venv/bin/python examples/taskiq_worker.py --selfcheck   # InMemoryBroker: checks, exits
    .venv/bin/python examples/taskiq_worker.py               # Redis stream broker + worker
    REDIS_URL=redis://10.0.0.5:6379/0 DATABASE_URL=postgresql+asyncpg://... \\
        .venv/bin/python examples/taskiq_worker.py

Without ``--selfcheck`` the broker is a ``RedisStreamBroker`` on REDIS_URL (default
redis://127.0.0.1:6379/0): the program starts a worker in-process, sends two orders, prints
their results and keeps working until Ctrl-C. Once it has created the tables, separate worker
processes can serve the same tasks: ``taskiq worker examples.taskiq_worker:broker``, started in
the same directory (the repository root, so that ``examples`` is importable).

The database is ./taskiq_worker.db (SQLite) unless DATABASE_URL says otherwise; the example's
tables are dropped and recreated when the program starts.

What the middleware guarantees (docs/taskiq.md):

- the task's session is committed when the task function returns, before taskiq stores the
  result and before it acknowledges the message (the ``ack_type`` label is moved to
  ``when_saved``);
- a task that raises is rolled back: an unknown product raises ``LookupError`` and the order
  row the task had already written is gone; taskiq stores the error and acks the message;
- a commit that fails is logged and re-raised: no result is stored and the message is not
  acknowledged, so a broker with acknowledgements (Redis streams) delivers it again. Here a
  ``before_commit`` check refuses a negative stock. ``InMemoryBroker`` has no acknowledgements;
  with ``await_inplace=True`` the failure comes out of ``kiq()`` as a ``SendTaskError`` whose
  ``__cause__`` is the ``CommitError``.
"""

# No `from __future__ import annotations`: taskiq reads the tasks' annotations.

import asyncio
import contextlib
import logging
import os
import sys

from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from taskiq import AsyncBroker, InMemoryBroker, TaskiqEvents, TaskiqState
from taskiq.exceptions import SendTaskError

from sqla_context import CommitError, Database, scope
from sqla_context.taskiq import SessionMiddleware

SELFCHECK = "--selfcheck" in sys.argv[1:]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = "sqla_context_example_orders"


async def stock_never_negative(session: AsyncSession) -> None:
    """Runs right before every commit, like a deferred constraint: raising aborts the commit."""
    oversold = await session.scalar(select(func.count()).where(Product.stock < 0))
    if oversold:
        raise ValueError("stock would go negative")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///taskiq_worker.db")
db = Database(DATABASE_URL, before_commit=stock_never_negative)


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "taskiq_products"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    stock: Mapped[int]


class Order(Base):
    __tablename__ = "taskiq_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]


def make_broker() -> AsyncBroker:
    if SELFCHECK:
        # Runs each task inside kiq(), in this process; it has no acknowledgements.
        return InMemoryBroker(await_inplace=True)
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    broker = RedisStreamBroker(REDIS_URL, queue_name=STREAM, consumer_group_name=STREAM)
    return broker.with_result_backend(RedisAsyncResultBackend(REDIS_URL, result_ex_time=3600))


broker = make_broker()
broker.add_middlewares(SessionMiddleware())  # add it last: it is then the innermost middleware


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def dispose_engine(state: TaskiqState) -> None:
    await db.dispose()


async def take_from_stock(name: str, quantity: int) -> None:
    """A helper at any depth: it finds the task's session without a parameter."""
    product = await (await db.session()).get(Product, name)
    if product is None:
        raise LookupError(f"no product {name!r}")  # the task fails: rolled back
    product.stock -= quantity  # checked at commit time by stock_never_negative()


@broker.task(task_name="place_order")  # a fixed name: the same for the script and `taskiq worker`
async def place_order(product: str, quantity: int) -> int:
    session = await db.session()
    order = Order(product=product, quantity=quantity)
    session.add(order)
    await session.flush()  # the row is written now; only the commit makes it stay
    await take_from_stock(product, quantity)
    return order.id  # committed before the result is stored and the message acknowledged


async def create_schema() -> None:
    """Drop and recreate the example's tables, then stock the shop (in a scope of its own)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with scope():  # committed at the end of the block
        (await db.session()).add_all([Product(name="lamp", stock=5), Product(name="desk", stock=1)])


async def stored() -> tuple[list[tuple[str, int]], dict[str, int]]:
    """What the database holds, read in a scope of its own."""
    async with scope(commit="never"):
        session = await db.session()
        orders = await session.execute(select(Order.product, Order.quantity).order_by(Order.id))
        stock = await session.execute(select(Product.name, Product.stock).order_by(Product.name))
        return [(p, q) for p, q in orders], {name: count for name, count in stock}


async def order_and_wait(product: str, quantity: int) -> str:
    """Send place_order, wait for its result and describe it."""
    task = await place_order.kiq(product, quantity)
    result = await task.wait_result(timeout=30)
    if result.is_err:  # (taskiq logs "Cannot parse return type" for it: its return value is None)
        return f"failed, rolled back: {type(result.error).__name__}: {result.error}"
    return f"order #{result.return_value}"


async def selfcheck() -> None:
    await create_schema()
    await broker.startup()
    try:
        print("place_order(lamp, 2) ->", await order_and_wait("lamp", 2))
        print("place_order(sofa, 1) ->", await order_and_wait("sofa", 1))
        try:
            await place_order.kiq("desk", 3)  # the stock check refuses the commit
        except SendTaskError as exc:
            failure = exc.__cause__
            assert isinstance(failure, CommitError), repr(failure)
            print("place_order(desk, 3) -> commit failed, no result stored:", failure.__cause__)
        else:
            raise AssertionError("the failed commit did not surface")

        orders, stock = await stored()
        print("database: orders", orders, "stock", stock)
        print("connections checked out:", db.engine.pool.checkedout())
        assert orders == [("lamp", 2)], orders
        assert stock == {"desk": 1, "lamp": 3}, stock
        assert db.engine.pool.checkedout() == 0
    finally:
        await broker.shutdown()  # WORKER_SHUTDOWN: dispose_engine()
    print("selfcheck passed")


async def work() -> None:
    from taskiq.api import run_receiver_task

    await create_schema()
    await broker.startup()
    worker = asyncio.create_task(run_receiver_task(broker))  # what `taskiq worker` runs
    try:
        print("place_order(lamp, 2) ->", await order_and_wait("lamp", 2))
        print("place_order(sofa, 1) ->", await order_and_wait("sofa", 1))
        orders, stock = await stored()
        print("database: orders", orders, "stock", stock)
        print(f"worker on {REDIS_URL}, stream {STREAM!r}; Ctrl-C to stop")
        await worker
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await broker.shutdown()  # WORKER_SHUTDOWN: dispose_engine()
        await db.dispose()  # idempotent; also covers a failure before the worker started


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if SELFCHECK:
        asyncio.run(selfcheck())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(work())
