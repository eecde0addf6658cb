"""A tour of sqla_context's core, runnable as a script (no web framework needed).

    python3 run.py demo                                   # SQLite file ./quickstart.db
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test python3 run.py demo

Each step prints what it did and what the database holds afterwards.
"""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, run_isolated, scope

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///quickstart.db")
db = Database(DATABASE_URL)  # no connection yet: the engine is created on first use


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "qs_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class Order(Base):
    __tablename__ = "qs_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("qs_users.id"))
    item: Mapped[str] = mapped_column(String(50))


async def count(model: type[Base]) -> int:
    # Any coroutine, at any depth, gets the scope's session without a parameter.
    session = await db.session()
    return (await session.execute(select(func.count()).select_from(model))).scalar_one()


async def add_user(name: str) -> User:
    session = await db.session()
    user = User(name=name)
    session.add(user)
    await session.flush()
    return user


async def fetch_price(item: str) -> int:
    await asyncio.sleep(0.05)  # stands for a slow HTTP call
    return len(item) * 100


@scope()  # each call is one unit of work: committed on return, rolled back on error
async def place_order(user_name: str, item: str) -> int:
    user = await add_user(user_name)
    session = await db.session()
    session.add(Order(user_id=user.id, item=item))
    # Give the connection back before the slow call; the work so far is committed.
    await db.close_session()
    price = await fetch_price(item)
    return price


async def main() -> None:
    async with db.engine.begin() as conn:  # plain SQLAlchemy is still there
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    print(f"database: {db!r}")

    async with scope():
        await add_user("ada")
    async with scope():
        print("1. auto commit at scope exit      -> users:", await count(User))

    try:
        async with scope():
            await add_user("bob")
            raise RuntimeError("payment declined")
    except RuntimeError as exc:
        print(f"2. exception ({exc}) rolled back -> ", end="")
    async with scope():
        print("users:", await count(User))

    price = await place_order("cyd", "keyboard")
    async with scope():
        print(f"3. early close before a slow call -> orders: {await count(Order)}, price {price}")

    async with scope():
        await add_user("dan")
        try:
            async with db.transaction():  # a SAVEPOINT inside the scope's transaction
                await add_user("eve")
                raise ValueError("eve is not allowed")
        except ValueError:
            pass
        names = (await (await db.session()).scalars(select(User.name).order_by(User.id))).all()
    print("4. failed savepoint undone only    -> users:", ", ".join(names))

    users, orders = await asyncio.gather(run_isolated(count, User), run_isolated(count, Order))
    print(
        f"5. two queries at once (run_isolated, two connections) -> {users} users, {orders} orders"
    )

    await db.dispose()  # at shutdown
    print("done: every scope committed or rolled back, every connection returned")


if __name__ == "__main__":
    asyncio.run(main())
