"""The demo shop: a small FastAPI service that uses every feature of sqla_context.

    python3 run.py demo                                  # SQLite file ./demo.db, created and seeded
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test python3 run.py demo
    PORT=8001 REPLICA_URL=... python3 run.py demo        # other port, a real read replica

Every request runs in a scope (SessionMiddleware): handlers and helpers call
``await db.session()`` and never commit by hand unless they want to.

On SQLite the data stays in ./demo.db. On a server (PostgreSQL, MariaDB) the demo drops its
two tables (demo_users, demo_orders) when it shuts down, leaving the database as it found it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, on_commit, run_isolated
from sqla_context.asgi import SessionMiddleware

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///demo.db")
# A read-only replica (the same database unless REPLICA_URL says otherwise): writes through it
# fail, and its sessions never commit. db.read_session() reads from it until the request writes.
replica = Database(os.environ.get("REPLICA_URL", DATABASE_URL), name="replica", read_only=True)
db = Database(DATABASE_URL, name="primary", replicas=[replica])


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "demo_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class Order(Base):
    __tablename__ = "demo_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("demo_users.id"))
    item: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    price: Mapped[int | None] = mapped_column(default=None)


class NewUser(BaseModel):
    name: str


class NewOrder(BaseModel):
    user_id: int
    item: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with db, replica:  # both engines are disposed at shutdown
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with db.new_session(begin=True) as session:
            if not (await session.scalar(select(func.count()).select_from(User))):
                session.add_all([User(name="ada"), User(name="grace")])
        try:
            yield
        finally:
            if db.engine.dialect.name != "sqlite":  # a shared server: leave no tables behind
                async with db.engine.begin() as conn:
                    await conn.run_sync(Base.metadata.drop_all)


app = FastAPI(title="sqla-context demo shop", lifespan=lifespan)
app.add_middleware(SessionMiddleware)


# -- helpers anywhere in the call stack: no session parameter ------------------------------


async def get_user(user_id: int) -> User:
    user = await (await db.session()).get(User, user_id)
    if user is None:
        raise HTTPException(404, f"no user {user_id}")  # 404: the request is rolled back
    return user


OUTBOX: list[str] = []  # what a mail server would have received


async def send_welcome_mail(name: str) -> None:
    """A side effect: run by on_commit() only once the new user is committed."""
    OUTBOX.append(f"welcome, {name}")


async def payment_provider_price(item: str) -> int:
    await asyncio.sleep(0.2)  # a slow external call
    return 100 * len(item)


async def count(database: Database, model: type[Base]) -> int:
    session = await database.session()
    return (await session.scalar(select(func.count()).select_from(model))) or 0


# -- endpoints ------------------------------------------------------------------------------


@app.get("/users")
async def list_users() -> list[dict[str, object]]:
    """Reads go to the read-only replica (until the request writes: then to the primary)."""
    rows = await (await db.read_session()).scalars(select(User).order_by(User.id))
    return [{"id": u.id, "name": u.name} for u in rows]


@app.get("/users/{user_id}")
async def read_user(
    user_id: int, session: Annotated[AsyncSession, Depends(db.session)]
) -> dict[str, object]:
    """The FastAPI-dependency style: the same session object as `await db.session()`."""
    user = await get_user(user_id)
    assert session is await db.session()
    return {"id": user.id, "name": user.name}


@app.post("/users", status_code=201)
async def create_user(body: NewUser) -> JSONResponse:
    """Committed automatically before the 201 leaves; a duplicate name answers 409."""
    session = await db.session()
    user = User(name=body.name)
    session.add(user)
    try:
        await session.flush()  # sends the INSERT: the id is known from here on
    except IntegrityError:
        return JSONResponse({"detail": f"{body.name!r} exists"}, status_code=409)  # rolled back
    on_commit(functools.partial(send_welcome_mail, body.name))  # sent once committed
    return JSONResponse({"id": user.id, "name": user.name}, status_code=201)


@app.post("/users/bulk")
async def create_users(names: list[str]) -> dict[str, list[str]]:
    """Each name in a SAVEPOINT: duplicates are skipped, the rest commit together."""
    created, skipped = [], []
    for name in names:
        try:
            async with db.transaction() as session:  # existing="nest": a savepoint
                session.add(User(name=name))
                await session.flush()
            created.append(name)
        except IntegrityError:
            skipped.append(name)
    return {"created": created, "skipped": skipped}


@app.post("/orders", status_code=201)
async def place_order(body: NewOrder) -> dict[str, object]:
    """Commit the order, give the connection back during the slow call, then finish."""
    await get_user(body.user_id)
    session = await db.session()
    order = Order(user_id=body.user_id, item=body.item)
    session.add(order)
    await session.flush()
    order_id = order.id
    await db.close_session()  # commits the pending order and returns the connection
    price = await payment_provider_price(body.item)  # no connection held meanwhile
    session = await db.session()  # a fresh session
    paid = await session.get(Order, order_id)
    assert paid is not None
    paid.price, paid.status = price, "paid"
    return {"id": order_id, "item": body.item, "price": price, "status": "paid"}


@app.post("/orders/{order_id}/refund")
async def refund(order_id: int) -> dict[str, object]:
    """Raises after writing: the write is rolled back and the client gets a 500."""
    session = await db.session()
    order = await session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, f"no order {order_id}")
    order.status = "refunded"
    await session.flush()
    raise RuntimeError("refunds are not implemented; the status change is rolled back")


@app.post("/orders/{order_id}/audit")
async def audit(order_id: int) -> dict[str, object]:
    """An explicit block that commits now (existing='commit'), whatever follows."""
    async with db.transaction(existing="commit") as session:
        order = await session.get(Order, order_id)
        if order is None:
            raise HTTPException(404, f"no order {order_id}")
        order.status = f"{order.status}+audited"
    await db.commit()  # a no-op here: nothing is open any more
    return {"id": order_id, "status": order.status}


@app.get("/outbox")
async def outbox() -> list[str]:
    """The welcome mails sent so far: only for users whose creation was committed."""
    return OUTBOX


@app.get("/stats")
async def stats() -> dict[str, int]:
    """Two queries at the same time, each on its own connection."""
    users, orders = await asyncio.gather(
        run_isolated(count, replica, User), run_isolated(count, replica, Order)
    )
    return {"users": users, "orders": orders}


@app.get("/orders/export")
async def export_orders() -> StreamingResponse:
    """A streamed CSV: queries made while streaming get a fresh session of the scope."""

    async def rows() -> AsyncIterator[str]:
        yield "id,user_id,item,status,price\n"
        result = await (await replica.session()).stream_scalars(select(Order).order_by(Order.id))
        async for o in result:
            yield f"{o.id},{o.user_id},{o.item},{o.status},{o.price or ''}\n"

    return StreamingResponse(rows(), media_type="text/csv")


#: A request body for each endpoint that needs one (the banner's curl lines).
EXAMPLE_BODIES = {
    ("POST", "/users"): '{"name": "linus"}',
    ("POST", "/users/bulk"): '["x", "ada", "y"]',
    ("POST", "/orders"): '{"user_id": 1, "item": "book"}',
}


def banner(base: str) -> str:
    """What the demo prints at start: where it runs, and a curl line for every endpoint."""
    assert db.url is not None
    lines = [
        f"sqla-context demo shop on {base}",
        f"database: {db.url.render_as_string(hide_password=True)}",
        "try:",
    ]
    for route in app.routes:
        if not isinstance(route, APIRoute):  # /docs, /openapi.json: FastAPI's own
            continue
        path = route.path.replace("{user_id}", "1").replace("{order_id}", "1")
        for method in sorted(route.methods):
            lines.append(f"  # {method} {route.path}: {route.description.splitlines()[0]}")
            line = (
                f"  curl -s {base}{path}"
                if method == "GET"
                else f"  curl -s -X {method} {base}{path}"
            )
            if (body := EXAMPLE_BODIES.get((method, route.path))) is not None:
                line += f" -H 'content-type: application/json' -d '{body}'"
            lines.append(line)
    lines.append(f"  open {base}/docs for the API; Ctrl-C (or SIGTERM) stops the server")
    return "\n".join(lines)


def main() -> None:
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    print(banner(f"http://127.0.0.1:{port}"), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


if __name__ == "__main__":
    main()
