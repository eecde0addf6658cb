"""The app benchmarks/failover.py runs under uvicorn: one query per request.

Configured by environment variables (set by failover.py): FAILOVER_URL, FAILOVER_PRE_PING
("1"/"0"), FAILOVER_PGBOUNCER ("1": pgbouncer_options()).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from sqla_context import Database, pgbouncer_options
from sqla_context.asgi import SessionMiddleware, dispose_at_shutdown

URL = os.environ["FAILOVER_URL"]
options: dict[str, Any] = {
    "pool_size": 10,
    "pool_pre_ping": os.environ.get("FAILOVER_PRE_PING", "1") == "1",
    # Give up on a connection attempt after 2 s (asyncpg's default is 60 s), and on a
    # statement after 5 s: a server that hangs instead of refusing fails requests fast.
    "connect_args": {"timeout": 2, "command_timeout": 5}
    if "asyncpg" in URL
    else {"connect_timeout": 2},
}
if os.environ.get("FAILOVER_PGBOUNCER") == "1":
    options = pgbouncer_options(URL, **options)
db = Database(URL, engine_options=options)

app = FastAPI(lifespan=dispose_at_shutdown(db))
app.add_middleware(SessionMiddleware)


@app.get("/read")
async def read() -> dict[str, int]:
    session = await db.session()
    return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}
