"""The demo shop (examples/demo_app.py) answers the README's curl lines, on every backend."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from sqla_context import scope

from .conftest import Backend

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo_app.py"


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
            created = await c.post("/users", json={"name": "linus"})
            assert created.status_code == 201
            assert created.json() == {"id": 3, "name": "linus"}, "the new id comes back"
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
    async with backend.witness.connect() as conn:
        tables = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    left = tables & {"demo_users", "demo_orders"}
    if backend.kind == "sqlite":  # the user's own file: the data stays
        assert left == {"demo_users", "demo_orders"}
    else:
        assert left == set(), "the demo left its tables on the server"
    assert await backend.open_transactions() == 0


def test_banner_lists_every_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    demo = load_demo(monkeypatch, f"sqlite+aiosqlite:///{tmp_path}/demo.db")
    shown = demo.banner("http://127.0.0.1:8000")
    calls = set()
    for line in shown.splitlines():
        if (
            curl := re.match(r" *curl -s (?:-X (\w+) )?http://127\.0\.0\.1:8000(\S+)", line)
        ) is None:
            continue
        method, path = curl[1] or "GET", curl[2]
        routes = [
            r
            for r in demo.app.routes
            if method in getattr(r, "methods", ()) and r.path_regex.match(path)
        ]
        assert len(routes) == 1, f"the banner's {method} {path} matches no single route"
        calls.add((method, routes[0].path))
    endpoints = {
        (method, route.path)
        for route in demo.app.routes
        if route.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
        for method in route.methods
        if method != "HEAD"
    }
    assert calls == endpoints, f"missing from the banner: {sorted(endpoints - calls)}"
    assert "8000/docs" in shown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> set[int]:
    """The pids of ``pid``'s processes, children and their children (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_to_run_py_demo_stops_the_server(tmp_path: Path) -> None:
    """`python3 run.py demo` stopped with SIGTERM leaves no server behind holding the port."""
    port = _free_port()
    pythonpath = os.pathsep.join(
        [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env = {
        **os.environ,
        "PORT": str(port),
        "RUN_PY_PYTHON": sys.executable,  # this environment: run.py installs nothing
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/demo.db",
        "PYTHONPATH": pythonpath,
    }
    env.pop("REPLICA_URL", None)
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "demo"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: cleaned up below whatever happens
    )
    try:
        deadline = time.monotonic() + 60
        while not _accepts(port):
            assert launcher.poll() is None, f"run.py demo exited with {launcher.returncode}"
            assert time.monotonic() < deadline, "the demo did not listen within 60 s"
            time.sleep(0.1)
        processes = {launcher.pid} | _descendants(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (left := [p for p in processes if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], f"processes of run.py demo outlived its SIGTERM: {left}"
        assert not _accepts(port), f"port {port} is still served after SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)


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
