"""In-process timings with pyperf: CPU time of one request through each app, no server.

What each approach costs the CPU per request, without sockets, HTTP parsing or a load
generator: ``GET /nodb`` (the middleware alone) and ``GET /read`` (session handling and one
query). The time is the event-loop thread's CPU time (``time.thread_time``): waiting for
PostgreSQL, and being descheduled by other processes, do not count; asyncpg and SQLAlchemy's
greenlets run in that thread, so their work does. Each request runs in a task of its own (as
a server runs it) on one event loop per pyperf worker process, one request at a time.

Started by ``run.py`` with the table and the list of approaches in the environment
(``BENCH_TABLE``, ``BENCH_APPROACHES``, ...; pyperf's workers need ``--inherit-environ`` for
them); pyperf's own options apply (``--processes``, ``--values``, ``-o``, ``--affinity``).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyperf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NO_DB = {"bare", "asgi-passthrough"}
_loop = asyncio.new_event_loop()


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip


class _Receive:
    """A server's ``receive`` for a GET: the (empty) body, then nothing until the client goes.

    As uvicorn does: after the body, ``receive()`` waits for a disconnect (here: forever,
    until the waiting task is cancelled).
    """

    def __init__(self) -> None:
        self.body_sent = False

    async def __call__(self) -> dict[str, Any]:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")


async def _requests(app: Any, path: str, loops: int) -> float:
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = _scope(path)
    started = time.thread_time()
    for _ in range(loops):
        await asyncio.create_task(app(dict(scope), _Receive(), send))
    elapsed = time.thread_time() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"{path}: statuses {set(statuses)}")
    return elapsed


def time_request(loops: int, key: str, path: str) -> float:
    module = importlib.import_module("benchmarks.peers.apps." + key.replace("-", "_"))
    return _loop.run_until_complete(_requests(module.app, path, loops))


def main() -> None:
    runner = pyperf.Runner()
    keys = [k for k in os.environ.get("BENCH_APPROACHES", "").split(",") if k]
    for path in ("/nodb", "/read"):
        for key in keys:
            if path == "/nodb" or key not in NO_DB:
                runner.bench_time_func(f"{path} {key}", time_request, key, path)


if __name__ == "__main__":
    main()
