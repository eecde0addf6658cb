"""Micro-benchmark: what does ``await db.session()`` cost once the scope holds the session?

``Database.session()`` reads the scope's unit of work from a ``ContextVar`` and returns the
session stored in it; on this path it takes no lock and does no I/O. This script puts that
cost next to the operations it is made of, or could be compared with, in ONE run:

``for-loop, empty body``
    The bare ``for _ in range(n)`` loop. Every row below includes this overhead once per
    call; it is shown so that the other rows can be read net of it.
``ContextVar.get()``
    A bare, synchronous ``var.get()`` on a ``ContextVar`` holding a value: the floor of
    any context-based lookup.
``await trivial coroutine``
    ``await f()`` where ``async def f(): return 1``, looped inside a coroutine: the fair
    baseline for any ``async def`` call, whatever its body.
``await db.session() (held)``
    ``await db.session()`` inside ``async with scope():`` after a first call created the
    session, looped inside a coroutine. Compare it with the trivial await: the difference
    is the lookup itself (``ContextVar.get()``, an attribute read, a dict lookup, two checks).
``db.sessionmaker()``
    Creating a bare ``AsyncSession`` (no I/O, no connection). The sessions are kept in a
    list while timing, in batches of 1000, so only creation is measured; each batch is
    closed outside the timed region.
``first db.session() in new scope``
    Extra information: ``async with scope(): await db.session()`` from scratch, i.e. scope
    enter + session creation + scope exit (closing the unused session, returning nothing
    to the pool since no connection was ever checked out).

Method: ``time.perf_counter_ns`` around a loop of ``n`` calls, with the garbage collector
disabled during the timed loop (as ``timeit`` does). ``n`` is calibrated per row so that
one repeat takes about ``--target`` seconds (0.2 s by default); each row is repeated
``--repeats`` times (7 by default). The table shows the MEDIAN nanoseconds per call, the
min-max spread over the repeats, and ratios to ``ContextVar.get()`` and to the trivial
await (both medians, loop overhead included on both sides). The "machine noise" line gives
the largest (max - min) / median over all rows: differences smaller than that between two
runs, or between two rows, are not meaningful. ``--quick`` is a smoke run (tiny ``n``, 3
repeats); its numbers are not to be quoted.

The database is SQLite through aiosqlite, in a temporary directory; no query is run, since
creating a session does no I/O. Run with ``PYTHONPATH=src`` to measure the source tree
rather than the copy installed in the virtual environment; the path of the imported
package is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncSession

import sqla_context
from sqla_context import Database, scope

#: A timer runs ``n`` calls and returns the elapsed nanoseconds; sync or async.
Timer = Callable[[int], int | Awaitable[int]]


@dataclass(frozen=True)
class Row:
    name: str
    n: int
    per_call_ns: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.per_call_ns)

    @property
    def low(self) -> float:
        return min(self.per_call_ns)

    @property
    def high(self) -> float:
        return max(self.per_call_ns)

    @property
    def noise(self) -> float:
        """Spread between repeats, relative to the median."""
        return (self.high - self.low) / self.median


async def _run_timer(timer: Timer, n: int) -> int:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        result = timer(n)
        return await result if inspect.isawaitable(result) else result
    finally:
        if enabled:
            gc.enable()


async def measure(name: str, timer: Timer, *, target_s: float, repeats: int) -> Row:
    """Calibrate ``n`` so that one repeat lasts about ``target_s``, then time ``repeats``."""
    target_ns = target_s * 1e9
    n = 1
    while True:  # like timeit.autorange: grow n until a run lasts at least a tenth of target
        elapsed = await _run_timer(timer, n)
        if elapsed >= target_ns / 10:
            break
        n *= 10 if elapsed < target_ns / 100 else 2
    n = max(1, round(n * target_ns / max(elapsed, 1)))
    samples = [await _run_timer(timer, n) / n for _ in range(repeats)]
    return Row(name, n, samples)


# -- the timed loops ----------------------------------------------------------------------


def empty_loop(n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        pass
    return time.perf_counter_ns() - start


_var: ContextVar[int] = ContextVar("bench_var")


def contextvar_get(n: int) -> int:
    get = _var.get
    start = time.perf_counter_ns()
    for _ in range(n):
        get()
    return time.perf_counter_ns() - start


async def _constant() -> int:
    return 1


async def trivial_await(n: int) -> int:
    func = _constant
    start = time.perf_counter_ns()
    for _ in range(n):
        await func()
    return time.perf_counter_ns() - start


def held_session(db: Database) -> Timer:
    async def timer(n: int) -> int:
        get_session = db.session
        first = await get_session()  # the scope now holds the session
        start = time.perf_counter_ns()
        for _ in range(n):
            await get_session()
        elapsed = time.perf_counter_ns() - start
        assert await get_session() is first
        return elapsed

    async def in_scope(n: int) -> int:
        async with scope():
            return await timer(n)

    return in_scope


#: Sessions created per timed batch by the ``db.sessionmaker()`` row.
_SESSION_BATCH = 1000


def create_session(db: Database) -> Timer:
    async def timer(n: int) -> int:
        maker = db.sessionmaker  # engine created before timing (lazily, on first access)
        elapsed = 0
        done = 0
        while done < n:  # in batches, so that memory use stays flat however large n is
            batch = min(_SESSION_BATCH, n - done)
            sessions: list[AsyncSession] = []
            append = sessions.append
            start = time.perf_counter_ns()
            for _ in range(batch):
                append(maker())
            elapsed += time.perf_counter_ns() - start
            for session in sessions:  # outside the timed region
                await session.close()
            done += batch
        return elapsed

    return timer


def first_session_in_scope(db: Database) -> Timer:
    async def timer(n: int) -> int:
        get_session = db.session
        start = time.perf_counter_ns()
        for _ in range(n):
            async with scope():
                await get_session()
        return time.perf_counter_ns() - start

    return timer


# -- report -------------------------------------------------------------------------------


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def print_report(rows: list[Row], *, repeats: int, target_s: float, quick: bool) -> None:
    by_name = {row.name: row for row in rows}
    base_var = by_name["ContextVar.get()"].median
    base_await = by_name["await trivial coroutine"].median
    headers = ("case", "n/repeat", "median ns", "min-max ns", "x ContextVar.get", "x trivial await")
    table = [
        (
            row.name,
            f"{row.n:,}",
            f"{row.median:,.1f}",
            f"{row.low:,.1f}-{row.high:,.1f}",
            _ratio(row.median, base_var),
            _ratio(row.median, base_await),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (headers, *table)) for i in range(len(headers))]

    def fmt(line: tuple[str, ...]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    print(fmt(headers))
    print("  ".join("-" * width for width in widths))
    for line in table:
        print(fmt(line))
    print()
    worst = max(rows, key=lambda row: row.noise)
    print(
        f"machine noise: spread between repeats (max-min)/median is at most "
        f"{worst.noise:.1%} (row {worst.name!r}); median over rows "
        f"{statistics.median(row.noise for row in rows):.1%}"
    )
    mode = "QUICK smoke run, do not quote these numbers" if quick else "full run"
    print(f"{mode}: {repeats} repeats of ~{target_s:g} s per row; GC disabled while timing")


def print_environment() -> None:
    print(f"Python      {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"SQLAlchemy  {sqlalchemy.__version__}")
    print(f"sqla_context {sqla_context.__version__} from {Path(sqla_context.__file__).parent}")
    print(f"platform    {platform.platform()}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_text = f", load average {load[0]:.2f}" if load is not None else ""
    print(f"CPUs        {os.cpu_count()}{load_text}")
    print()


async def run(*, target_s: float, repeats: int, quick: bool) -> None:
    token = _var.set(42)
    try:
        with tempfile.TemporaryDirectory(prefix="sqla_context_bench_") as tmp:
            db = Database(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
            try:
                cases: list[tuple[str, Timer]] = [
                    ("for-loop, empty body", empty_loop),
                    ("ContextVar.get()", contextvar_get),
                    ("await trivial coroutine", trivial_await),
                    ("await db.session() (held)", held_session(db)),
                    ("db.sessionmaker()", create_session(db)),
                    ("first db.session() in new scope", first_session_in_scope(db)),
                ]
                rows = []
                for name, timer in cases:
                    rows.append(await measure(name, timer, target_s=target_s, repeats=repeats))
            finally:
                await db.dispose()
    finally:
        _var.reset(token)
    print_report(rows, repeats=repeats, target_s=target_s, quick=quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (few iterations)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per row (default 7)")
    parser.add_argument(
        "--target", type=float, default=None, help="seconds per repeat (default 0.2)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    target_s = args.target or (0.002 if args.quick else 0.2)
    print_environment()
    asyncio.run(run(target_s=target_s, repeats=repeats, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
