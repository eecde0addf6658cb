"""The demo shop (examples/demo_app.py) answers the README's curl lines, on every backend."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from sqla_context import scope

from .conftest import Backend

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_app.py"


def load_demo(monkeypatch: pytest.MonkeyPatch, url: str) -> ModuleType:
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.delenv("REPLICA_URL", raising=False)
    spec = importlib.util.spec_from_file_location(f"demo_app_{id(url)}", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


async def test_demo_shop(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = load_demo(monkeypatch, backend.url)
    backend.databases += [demo.db, demo.replica]
    async with backend.witness.begin() as conn:  # a clean slate on the shared server database
        await conn.execute(text("DROP TABLE IF EXISTS demo_orders"))
        await conn.execute(text("DROP TABLE IF EXISTS demo_users"))

    transport = httpx.ASGITransport(app=demo.app, raise_app_exceptions=False)
    async with demo.app.router.lifespan_context(demo.app):  # creates and seeds the tables
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as c:
            assert (await c.get("/users")).json() == [
                {"id": 1, "name": "ada"},
                {"id": 2, "name": "grace"},
            ]
            assert (await c.post("/users", json={"name": "linus"})).status_code == 201
            assert (await c.post("/users", json={"name": "linus"})).status_code == 409
            # on_commit(): a mail for the committed user only, not for the rolled-back 409
            assert (await c.get("/outbox")).json() == ["welcome, linus"]
            order = (await c.post("/orders", json={"user_id": 1, "item": "book"})).json()
            assert order == {"id": 1, "item": "book", "price": 400, "status": "paid"}
            assert (await c.post("/orders", json={"user_id": 99, "item": "x"})).status_code == 404
            assert (await c.get("/stats")).json() == {"users": 3, "orders": 1}
            export = await c.get("/orders/export")
            assert export.text.splitlines() == ["id,user_id,item,status,price", "1,1,book,paid,400"]
            assert (await c.post("/orders/1/refund")).status_code == 500
            audited = await c.post("/orders/1/audit")
            assert audited.json() == {"id": 1, "status": "paid+audited"}
            bulk = await c.post("/users/bulk", json=["x", "ada", "y"])
            assert bulk.json() == {"created": ["x", "y"], "skipped": ["ada"]}
            assert (await c.get("/users/3")).json() == {"id": 3, "name": "linus"}
            assert (await c.get("/users/42")).status_code == 404

        async with backend.witness.connect() as conn:
            users = await conn.execute(text("SELECT name FROM demo_users ORDER BY id"))
            assert users.scalars().all() == ["ada", "grace", "linus", "x", "y"]
            orders = await conn.execute(text("SELECT status, price FROM demo_orders"))
            assert orders.all() == [("paid+audited", 400)], "the refund was rolled back"
        assert demo.db.engine.pool.checkedout() == 0
        assert demo.replica.read_only
        async with scope():  # the demo's replica refuses writes
            replica_session = await demo.replica.session()
            with pytest.raises(DBAPIError):
                await replica_session.execute(text("DELETE FROM demo_orders"))
    assert demo.db._engine is None, "the lifespan disposed the engines"


async def test_starlette_example(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", backend.url)
    path = DEMO.with_name("starlette_app.py")
    spec = importlib.util.spec_from_file_location("starlette_example", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    backend.databases.append(example.db)
    async with backend.witness.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS starlette_notes"))

    transport = httpx.ASGITransport(app=example.app)
    async with example.app.router.lifespan_context(example.app):
        async with httpx.AsyncClient(transport=transport, base_url="http://ex") as c:
            assert (await c.post("/notes/hello")).status_code == 201
            assert (await c.post("/notes/%20")).status_code == 422
            assert (await c.get("/notes")).json() == ["hello"]
        async with backend.witness.connect() as conn:
            rows = await conn.execute(text("SELECT text FROM starlette_notes"))
            assert rows.scalars().all() == ["hello"]
