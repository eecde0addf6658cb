"""A small orders API on aiohttp: ``setup(app, db)`` runs every request in a scope.

    .venv/bin/python examples/aiohttp_app.py               # web.run_app on http://127.0.0.1:8080
    .venv/bin/python examples/aiohttp_app.py --selfcheck   # TestServer/TestClient, checks, exits
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test \\
        .venv/bin/python examples/aiohttp_app.py

The database is ./aiohttp_app.db (SQLite) unless DATABASE_URL says otherwise; the example's
tables are dropped and recreated at startup. PORT changes the port.

What the middleware guarantees (docs/aiohttp.md):

- the request's session is committed when the handler returns its response, before aiohttp
  writes a byte of it, if the status is < 400: ``POST /orders`` answers 201 only once the order
  and the stock change are committed;
- an error status (returned, or raised as ``web.HTTPException``) or any other exception rolls
  everything back: an unknown product raises ``HTTPNotFound``, and the order row the handler had
  already written is gone;
- a commit that fails is raised in place of the response, and aiohttp answers 500: here a
  ``before_commit`` check refuses to commit a negative stock, so overselling answers 500;
- the engine is disposed when the app cleans up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, scope
from sqla_context.aiohttp import setup


async def stock_never_negative(session: AsyncSession) -> None:
    """Runs right before every commit, like a deferred constraint: raising aborts the commit."""
    oversold = await session.scalar(select(func.count()).where(Product.stock < 0))
    if oversold:
        raise ValueError("stock would go negative")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///aiohttp_app.db")
db = Database(DATABASE_URL, before_commit=stock_never_negative)


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "aiohttp_products"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    stock: Mapped[int]


class Order(Base):
    __tablename__ = "aiohttp_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]


routes = web.RouteTableDef()


async def take_from_stock(name: str, quantity: int) -> None:
    """A helper at any depth: it finds the request's session without a parameter."""
    product = await (await db.session()).get(Product, name)
    if product is None:
        raise web.HTTPNotFound(text=f"no product {name!r}")  # 404: the request is rolled back
    product.stock -= quantity  # checked at commit time by stock_never_negative()


@routes.post("/orders")
async def place_order(request: web.Request) -> web.Response:
    data = await request.json()
    session = await db.session()
    order = Order(product=str(data["product"]), quantity=int(data["quantity"]))
    session.add(order)
    await session.flush()  # the row is written now; only the commit makes it stay
    await take_from_stock(order.product, order.quantity)
    body = {"id": order.id, "product": order.product, "quantity": order.quantity}
    return web.json_response(body, status=201)


@routes.get("/orders")
async def list_orders(request: web.Request) -> web.Response:
    orders = await (await db.session()).scalars(select(Order).order_by(Order.id))
    return web.json_response(
        [{"id": o.id, "product": o.product, "quantity": o.quantity} for o in orders]
    )


@routes.get("/products")
async def list_products(request: web.Request) -> web.Response:
    products = await (await db.session()).scalars(select(Product).order_by(Product.name))
    return web.json_response({p.name: p.stock for p in products})


async def create_schema(app: web.Application) -> None:
    """Drop and recreate the example's tables, then stock the shop (in a scope of its own)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with scope():  # committed at the end of the block
        (await db.session()).add_all([Product(name="lamp", stock=5), Product(name="desk", stock=1)])


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    app.on_startup.append(create_schema)
    setup(app, db)  # session_middleware() first in line + db disposed on cleanup
    return app


async def stored() -> tuple[list[tuple[str, int]], dict[str, int]]:
    """What the database holds, read in a scope of its own (not through the API)."""
    async with scope(commit="never"):
        session = await db.session()
        orders = await session.execute(select(Order.product, Order.quantity).order_by(Order.id))
        stock = await session.execute(select(Product.name, Product.stock).order_by(Product.name))
        return [(p, q) for p, q in orders], {name: count for name, count in stock}


async def selfcheck() -> None:
    # TestServer runs the app's on_startup (the tables) and, on the way out, its on_cleanup
    # (setup() disposes db there).
    async with TestServer(make_app(), host="127.0.0.1") as server, TestClient(server) as client:
        ok = await client.post("/orders", json={"product": "lamp", "quantity": 2})
        print("POST /orders lamp x2 ->", ok.status, await ok.json())
        unknown = await client.post("/orders", json={"product": "sofa", "quantity": 1})
        print("POST /orders sofa x1 ->", unknown.status, await unknown.text())
        # The stock check refused the commit: 500 instead of 201 (the ERROR lines on stderr).
        oversold = await client.post("/orders", json={"product": "desk", "quantity": 3})
        print("POST /orders desk x3 ->", oversold.status, oversold.reason)
        print("GET /orders ->", await (await client.get("/orders")).json())
        print("GET /products ->", await (await client.get("/products")).json())

        orders, stock = await stored()
        print("database: orders", orders, "stock", stock)
        print("connections checked out:", db.engine.pool.checkedout())
        assert (ok.status, unknown.status, oversold.status) == (201, 404, 500)
        assert orders == [("lamp", 2)], orders
        assert stock == {"desk": 1, "lamp": 3}, stock
        assert db.engine.pool.checkedout() == 0
    print("selfcheck passed")


def serve() -> None:
    port = int(os.environ.get("PORT", "8080"))
    base = f"http://127.0.0.1:{port}"
    assert db.url is not None
    print(f"aiohttp orders API on {base} (database {db.url.render_as_string(hide_password=True)})")
    json = "-H 'content-type: application/json'"
    print(f"""  curl -s -X POST {base}/orders {json} -d '{{"product": "lamp", "quantity": 2}}'""")
    print(f"""  curl -s -X POST {base}/orders {json} -d '{{"product": "desk", "quantity": 3}}'""")
    print(f"  curl -s {base}/orders; curl -s {base}/products     (Ctrl-C to stop)")
    web.run_app(make_app(), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "--selfcheck" in sys.argv[1:]:
        asyncio.run(selfcheck())
    else:
        serve()
