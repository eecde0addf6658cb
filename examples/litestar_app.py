"""A small orders API on Litestar: SqlaContextPlugin runs every request in a scope.

    .venv/bin/python examples/litestar_app.py               # uvicorn on http://127.0.0.1:8000
    .venv/bin/python examples/litestar_app.py --selfcheck   # in-process requests, checks, exits
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test \\
        .venv/bin/python examples/litestar_app.py

The database is ./litestar_app.db (SQLite) unless DATABASE_URL says otherwise; the example's
tables are dropped and recreated at startup. PORT changes the port.

What the plugin guarantees (docs/litestar.md, docs/web.md):

- the request's session is committed right before the response headers are sent, if the status
  is < 400: ``POST /orders`` answers 201 only once the order and the stock change are committed;
- an error status or an exception rolls everything back: an unknown product answers 404 and the
  order row the handler had already written is gone;
- a commit that fails turns the response into a plain 500: here a ``before_commit`` check
  refuses to commit a negative stock, so overselling answers 500, never 201;
- ``session: NamedDependency[AsyncSession]`` is the same session ``await db.session()`` returns;
- the engine is disposed when the app shuts down.
"""

# No `from __future__ import annotations`: Litestar reads the handlers' annotations.

import asyncio
import logging
import os
import sys
from dataclasses import dataclass

import httpx
from litestar import Litestar, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import JSONBody
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, scope
from sqla_context.litestar import SqlaContextPlugin


async def stock_never_negative(session: AsyncSession) -> None:
    """Runs right before every commit, like a deferred constraint: raising aborts the commit."""
    oversold = await session.scalar(select(func.count()).where(Product.stock < 0))
    if oversold:
        raise ValueError("stock would go negative")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///litestar_app.db")
db = Database(DATABASE_URL, before_commit=stock_never_negative)


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "litestar_products"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    stock: Mapped[int]


class Order(Base):
    __tablename__ = "litestar_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]


@dataclass
class NewOrder:
    product: str
    quantity: int


async def take_from_stock(name: str, quantity: int) -> None:
    """A helper at any depth: it finds the request's session without a parameter."""
    product = await (await db.session()).get(Product, name)
    if product is None:
        raise NotFoundException(f"no product {name!r}")  # 404: the request is rolled back
    product.stock -= quantity  # checked at commit time by stock_never_negative()


@post("/orders", status_code=201)
async def place_order(data: JSONBody[NewOrder]) -> dict[str, object]:
    session = await db.session()
    order = Order(product=data.product, quantity=data.quantity)
    session.add(order)
    await session.flush()  # the row is written now; only the commit makes it stay
    await take_from_stock(data.product, data.quantity)
    return {"id": order.id, "product": order.product, "quantity": order.quantity}


@get("/orders")
async def list_orders(session: NamedDependency[AsyncSession]) -> list[dict[str, object]]:
    orders = await session.scalars(select(Order).order_by(Order.id))
    return [{"id": o.id, "product": o.product, "quantity": o.quantity} for o in orders]


@get("/products")
async def list_products(session: NamedDependency[AsyncSession]) -> dict[str, int]:
    products = await session.scalars(select(Product).order_by(Product.name))
    return {p.name: p.stock for p in products}


async def create_schema() -> None:
    """Drop and recreate the example's tables, then stock the shop (in a scope of its own)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with scope():  # committed at the end of the block
        (await db.session()).add_all([Product(name="lamp", stock=5), Product(name="desk", stock=1)])


app = Litestar(
    route_handlers=[place_order, list_orders, list_products],
    on_startup=[create_schema],
    plugins=[SqlaContextPlugin(db)],  # the scope per request, `session`, disposal at shutdown
    logging_config=None,  # leave logging to logging.basicConfig() below
)


async def stored() -> tuple[list[tuple[str, int]], dict[str, int]]:
    """What the database holds, read in a scope of its own (not through the API)."""
    async with scope(commit="never"):
        session = await db.session()
        orders = await session.execute(select(Order.product, Order.quantity).order_by(Order.id))
        stock = await session.execute(select(Product.name, Product.stock).order_by(Product.name))
        return [(p, q) for p, q in orders], {name: count for name, count in stock}


async def selfcheck() -> None:
    # The middleware re-raises a failed commit to the server after answering 500 (so that the
    # server logs it); raise_app_exceptions=False lets httpx hand us that 500 instead.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://shop")
    async with app.lifespan(), client:  # on_startup creates the tables; shutdown disposes
        ok = await client.post("/orders", json={"product": "lamp", "quantity": 2})
        print("POST /orders lamp x2 ->", ok.status_code, ok.json())
        unknown = await client.post("/orders", json={"product": "sofa", "quantity": 1})
        print("POST /orders sofa x1 ->", unknown.status_code, unknown.json()["detail"])
        oversold = await client.post("/orders", json={"product": "desk", "quantity": 3})
        # The stock check refused the commit: 500 instead of 201 (the ERROR lines on stderr).
        print("POST /orders desk x3 ->", oversold.status_code, oversold.text)
        print("GET /orders ->", (await client.get("/orders")).json())
        print("GET /products ->", (await client.get("/products")).json())

        orders, stock = await stored()
        print("database: orders", orders, "stock", stock)
        print("connections checked out:", db.engine.pool.checkedout())
        assert (ok.status_code, unknown.status_code, oversold.status_code) == (201, 404, 500)
        assert orders == [("lamp", 2)], orders
        assert stock == {"lamp": 3, "desk": 1}, stock
        assert db.engine.pool.checkedout() == 0
    print("selfcheck passed")


def serve() -> None:
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    base = f"http://127.0.0.1:{port}"
    assert db.url is not None
    print(f"Litestar orders API on {base} (database {db.url.render_as_string(hide_password=True)})")
    json = "-H 'content-type: application/json'"
    print(f"""  curl -s -X POST {base}/orders {json} -d '{{"product": "lamp", "quantity": 2}}'""")
    print(f"""  curl -s -X POST {base}/orders {json} -d '{{"product": "desk", "quantity": 3}}'""")
    print(f"  curl -s {base}/orders; curl -s {base}/products     (Ctrl-C to stop)")
    uvicorn.run(app, host="127.0.0.1", port=port)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "--selfcheck" in sys.argv[1:]:
        asyncio.run(selfcheck())
    else:
        serve()
