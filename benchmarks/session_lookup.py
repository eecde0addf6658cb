"""What does ``await db.session()`` cost once the scope holds the session? (pyperf)

``Database.session()`` reads the scope's unit of work from a ``ContextVar``, checks that the
unit belongs to the running thread and looks the session up in a dict; on this path it takes
no lock and does no I/O. Next to it, in one run, the floor it is built on:

- ``await trivial coroutine``: ``await f()`` with ``async def f(): return 1``;
- ``await ContextVar.get()``: a coroutine that only reads a ``ContextVar`` (the floor of any
  context-based lookup that is awaited);
- ``... + dict lookup``: and looks a key up in a dict held by the value read (one session
  per ``Database``);
- ``... + thread check``: and compares the value's thread with ``threading.get_ident()``
  (the guard that raises ``EventLoopError`` for a scope used from another loop).

Then ``await db.session() (held)``, creating a bare ``AsyncSession`` (``db.sessionmaker()``)
and a whole ``async with scope(): await db.session()``. The summary divides each median by
the trivial await's. pyperf's options apply (``--fast``, ``--rigorous``, ``-o FILE``,
``--affinity``); run with ``PYTHONPATH=src`` to measure the source tree.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from contextvars import ContextVar
from pathlib import Path
from threading import get_ident
from typing import Any

import pyperf

from sqla_context import Database, scope


class _Unit:  # the shape Database.session() reads
    def __init__(self, key: object, value: object) -> None:
        self.sessions = {key: value}
        self.thread = get_ident()


_var: ContextVar[_Unit | None] = ContextVar("_var", default=None)
_KEY = object()


async def trivial() -> Any:
    return 1


async def contextvar_only() -> Any:
    return _var.get()


async def contextvar_dict() -> Any:
    unit = _var.get()
    assert unit is not None
    return unit.sessions.get(_KEY)


async def contextvar_dict_thread() -> Any:
    unit = _var.get()
    assert unit is not None
    session = unit.sessions.get(_KEY)
    if session is not None and unit.thread == get_ident():
        return session
    raise AssertionError


_loop = asyncio.new_event_loop()
_db = Database(f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}")


def time_await(loops: int, name: str) -> float:
    function = {
        "trivial": trivial,
        "contextvar": contextvar_only,
        "dict": contextvar_dict,
        "thread": contextvar_dict_thread,
        "session": _db.session,
    }[name]

    async def run() -> float:
        async with scope():
            _var.set(_Unit(_KEY, await _db.session()))
            started = time.perf_counter()
            for _ in range(loops):
                await function()
            return time.perf_counter() - started

    return _loop.run_until_complete(run())


def time_sessionmaker(loops: int) -> float:
    maker = _db.sessionmaker
    sessions = []
    started = time.perf_counter()
    for _ in range(loops):
        sessions.append(maker())
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.sync_session.close()
    return elapsed


def time_new_scope(loops: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        for _ in range(loops):
            async with scope():
                await _db.session()
        return time.perf_counter() - started

    return _loop.run_until_complete(run())


def main() -> None:
    if "PYTHONPATH" in os.environ and "--worker" not in sys.argv:
        sys.argv[1:1] = ["--inherit-environ", "PYTHONPATH"]  # the workers measure the same tree
    runner = pyperf.Runner()
    cases = [
        ("await trivial coroutine", time_await, "trivial"),
        ("await ContextVar.get()", time_await, "contextvar"),
        ("... + dict lookup", time_await, "dict"),
        ("... + thread check", time_await, "thread"),
        ("await db.session() (held)", time_await, "session"),
        ("db.sessionmaker()", time_sessionmaker),
        ("first db.session() in new scope", time_new_scope),
    ]
    results = {case[0]: runner.bench_time_func(*case) for case in cases}
    if runner.args.worker or None in results.values():
        return
    base = results["await trivial coroutine"].median()
    print("\nmedian per call, and x the trivial await:")
    for name, bench in results.items():
        print(f"  {name:34} {bench.median() * 1e9:10.1f} ns  {bench.median() / base:6.2f}x")


if __name__ == "__main__":
    main()
