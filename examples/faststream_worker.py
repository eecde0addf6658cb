"""A FastStream consumer that places orders: SessionMiddleware gives every message a scope.

    .venv/bin/python examples/faststream_worker.py --selfcheck   # TestRabbitBroker: checks, exits
    .venv/bin/python examples/faststream_worker.py               # RabbitMQ on RABBIT_URL
    RABBIT_URL=amqp://user:secret@10.0.0.5:5672/ DATABASE_URL=postgresql+asyncpg://... \\
        .venv/bin/python examples/faststream_worker.py

Without ``--selfcheck`` the program runs the FastStream app on RabbitMQ (RABBIT_URL, default
amqp://guest:guest@127.0.0.1:5672/), publishes two orders once it has started, and consumes
until Ctrl-C; then it prints what the database holds. ``faststream run
examples.faststream_worker:app`` (repository root) runs the same app.

The database is ./faststream_worker.db (SQLite) unless DATABASE_URL says otherwise; the
example's tables are dropped and recreated when the program starts.

What the middleware guarantees (docs/faststream.md):

- the message's session is committed when the handler returns, before FastStream publishes
  the handler's result (``@publisher``: the shipping notice) and before it acks the message;
- a handler that raises is rolled back and the ack policy decides as usual: an unknown product
  raises ``LookupError``, the order row the handler had already written is gone, and the
  default ``REJECT_ON_ERROR`` rejects the message;
- a commit that fails nacks the message (RabbitMQ delivers it again) and is re-raised; nothing
  is published. Here a ``before_commit`` check refuses a negative stock. (Only ``--selfcheck``
  tries it: on a real queue the order would come back forever, as its stock never grows.)
"""

# No `from __future__ import annotations`: FastStream reads the handlers' annotations.

import asyncio
import logging
import os
import sys

from faststream import FastStream, Logger
from faststream.rabbit import RabbitBroker, RabbitQueue, TestRabbitBroker
from faststream.rabbit.annotations import RabbitMessage
from pydantic import BaseModel
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import CommitError, Database, scope
from sqla_context.faststream import SessionMiddleware

RABBIT_URL = os.environ.get("RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def stock_never_negative(session: AsyncSession) -> None:
    """Runs right before every commit, like a deferred constraint: raising aborts the commit."""
    oversold = await session.scalar(select(func.count()).where(Product.stock < 0))
    if oversold:
        raise ValueError("stock would go negative")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///faststream_worker.db")
db = Database(DATABASE_URL, before_commit=stock_never_negative)


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "faststream_products"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    stock: Mapped[int]


class Order(Base):
    __tablename__ = "faststream_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]


class NewOrder(BaseModel):
    product: str
    quantity: int


class Placed(BaseModel):
    id: int
    product: str
    quantity: int


broker = RabbitBroker(RABBIT_URL, middlewares=[SessionMiddleware])  # last: the innermost one
ORDERS = RabbitQueue("sqla_context_example_orders", auto_delete=True)
SHIPPING = RabbitQueue("sqla_context_example_shipping", auto_delete=True)

received: dict[str, RabbitMessage] = {}  # for --selfcheck: how each message was settled
notices: list[Placed] = []  # shipping notices received


async def take_from_stock(name: str, quantity: int) -> None:
    """A helper at any depth: it finds the message's session without a parameter."""
    product = await (await db.session()).get(Product, name)
    if product is None:
        raise LookupError(f"no product {name!r}")  # the handler fails: rolled back
    product.stock -= quantity  # checked at commit time by stock_never_negative()


@broker.subscriber(ORDERS)
@broker.publisher(SHIPPING)  # the return value, published only after the commit
async def place_order(order: NewOrder, message: RabbitMessage) -> Placed:
    received[order.product] = message
    session = await db.session()
    row = Order(product=order.product, quantity=order.quantity)
    session.add(row)
    await session.flush()  # the row is written now; only the commit makes it stay
    await take_from_stock(order.product, order.quantity)
    return Placed(id=row.id, product=row.product, quantity=row.quantity)


@broker.subscriber(SHIPPING)
async def ship(placed: Placed, logger: Logger) -> None:
    notices.append(placed)
    logger.info("shipping order #%s: %s x%s", placed.id, placed.product, placed.quantity)


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


async def send_demo_orders() -> None:
    await broker.publish(NewOrder(product="lamp", quantity=2), ORDERS)  # committed, acked
    await broker.publish(NewOrder(product="sofa", quantity=1), ORDERS)  # rolled back, rejected


async def report() -> None:
    orders, stock = await stored()
    print("database: orders", orders, "stock", stock)


app = FastStream(
    broker,
    on_startup=[create_schema],  # before the broker starts consuming
    after_startup=[send_demo_orders],
    after_shutdown=[report, db.dispose],  # after the last handler has finished
)


async def selfcheck() -> None:
    async with db:  # disposes the engine at the end
        await create_schema()
        async with TestRabbitBroker(broker) as test_broker:  # in memory: no RabbitMQ
            await test_broker.publish(NewOrder(product="lamp", quantity=2), ORDERS)
            print("lamp x2 -> handled")
            try:
                await test_broker.publish(NewOrder(product="sofa", quantity=1), ORDERS)
            except LookupError as exc:
                print("sofa x1 -> handler failed, rolled back:", exc)
            try:  # the stock check refuses the commit
                await test_broker.publish(NewOrder(product="desk", quantity=3), ORDERS)
            except CommitError as exc:
                print("desk x3 -> commit failed:", exc.__cause__)
        for product, message in received.items():
            assert message.committed is not None
            print(f"{product}: {message.committed.value}")
        print("shipping notices:", [(n.id, n.product) for n in notices])

        orders, stock = await stored()
        print("database: orders", orders, "stock", stock)
        print("connections checked out:", db.engine.pool.checkedout())
        settled = {p: m.committed.value for p, m in received.items() if m.committed is not None}
        assert settled == {"lamp": "ACKED", "sofa": "REJECTED", "desk": "NACKED"}, settled
        assert [(n.id, n.product) for n in notices] == [(1, "lamp")], notices
        assert orders == [("lamp", 2)], orders
        assert stock == {"desk": 1, "lamp": 3}, stock
        assert db.engine.pool.checkedout() == 0
    print("selfcheck passed")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "--selfcheck" in sys.argv[1:]:
        asyncio.run(selfcheck())
    else:
        print(f"FastStream worker on {RABBIT_URL} (queue {ORDERS.name!r}); Ctrl-C to stop")
        asyncio.run(app.run())
