"""HTTP benchmark: what does ``SessionMiddleware`` cost a real server, under load from wrk?

Each variant (an app of ``benchmarks/asgi_apps.py``) runs in its own uvicorn process on
127.0.0.1 (one worker, ``--log-level warning --no-access-log``); the load comes from
``wrk``, an external load generator, so the client costs the server process nothing. The
variants are compared in pairs, A against B, both servers up during the whole pair:

``ping``
    A = ``ping_plain`` (FastAPI, no middleware), B = ``ping_mw`` (the same app with
    ``SessionMiddleware``), ``GET /ping`` (no database). Target: B/A >= 0.98.
``pg`` / ``sqlite``
    A = ``read_dep`` (hand-written ``Depends(get_session)`` doing
    ``async with maker() as s, s.begin(): yield s``), B = ``read_ctx``
    (``SessionMiddleware`` + ``await db.session()``), ``GET /read`` selecting one row by
    primary key; same URL, same pool (``pool_size=10, max_overflow=0``). Target: B/A >= 1.
``pg-inline``
    Reference, no target: A = ``read_inline`` (the handler opens the session itself with
    ``async with maker() as s, s.begin():``, no dependency), B = ``read_ctx``, PostgreSQL.
    It shows how much of the ``pg`` difference is FastAPI's dependency machinery.
``aa``
    Control: A and B are two processes of the same ``ping_plain`` app. Their ratio shows
    how far from 1.00 two identical servers land on this machine, i.e. the smallest
    difference the other pairs can resolve.

Method: per pair, ``--rounds`` rounds. Every round starts fresh server processes for both
variants, checks them (the measured path must answer 200 with the expected body) and gives
each one unrecorded warm-up run: how fast a given process runs depends a little on luck
(memory layout, hash seeds), which one process per variant would carry into every round
(``--same-process`` does that, for comparison). Then both variants are loaded AT THE SAME
TIME, each by its own ``wrk -t1 -c32 -d<duration>s`` (configurable): the two servers share
the server CPU, so whatever else the machine does during the round slows both alike, and
the ratio of their requests/s is the ratio of their CPU cost per request. On a shared
machine this resolves differences of about 1 % (see the ``aa`` control), where loading one
variant after the other (``--one-at-a-time``: one run per variant, the order alternating
between rounds, A B, B A, ...) gave per-round ratios 10-20 % apart. The report gives, per
variant, the MEDIAN requests/s over the rounds, the min-max, the spread (max - min) /
median and the median p50/p99 latency; per pair, the ratio of the medians B/A, and the
median and min-max of the per-round ratios B_i/A_i (the two variants of a round are a
paired sample: the per-round median is the steadier of the two statistics when the machine
speed changes between rounds). A target counts as met only if both the ratio of the medians
and the per-round median reach it. Any non-2xx answer or socket error is counted and
shown. (Side by side, each server gets about half of its CPU: the absolute requests/s are
about half of what one server alone serves, and "CPU busy" reads about 50 %.)

CPU placement: on Linux with ``taskset`` and at least 2 CPUs, every uvicorn process is
pinned to the last CPU and wrk to the first (``--no-pin`` disables this). Other processes
(the PostgreSQL server, other jobs) are not pinned and may use either CPU.

Two measurements explain the ``ping`` ratio. Before the pairs, the apps are called in
process (no server, no socket, pinned to the server CPU, each call in a task of its own as
a server runs it): a bare ASGI app with and without ``SessionMiddleware``, and
``ping_plain`` / ``ping_mw``, in 20-request batches that alternate A and B (2,000 pairs of
batches); the median over the pairs of the time difference is the middleware's CPU per
request in a hot loop, a lower bound. With
``--py-spy PATH`` the ``ping_mw`` server is sampled by py-spy under the same load after
the pairs, and the share of samples whose innermost code is the middleware's own is
converted into microseconds with the server's measured CPU per request. The server CPU
per request (``CPU us/req``) comes from ``/proc/<pid>/stat`` (user + system, all threads);
``GC gen0/1/2 per run`` and ``GC time`` (share of the run spent collecting) from the apps'
``GET /_gc``, read before and after each run.

Databases: for ``pg`` a table of its own (``bench_asgi_items_<pid>``, 100 rows) is created
at ``--pg-url`` and dropped at the end; for ``sqlite`` a database file in a temporary
directory. Every process started here (servers in their own process group, wrk) is ended
at the end, on error and on Ctrl-C/SIGTERM too. Run from the repository root with
``PYTHONPATH=src`` to measure the source tree; the servers inherit the environment.
``--quick`` is a smoke run (short runs, 3 rounds); its numbers are not to be quoted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from sqlalchemy import MetaData, Table, insert
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1/test"
#: Rows in the benchmark table; ``GET /read`` selects ``asgi_apps.ROW_ID``.
ROWS = 100
#: Seconds allowed for a server to answer its first ``GET /ping``.
STARTUP_TIMEOUT = 30.0
#: Seconds allowed for a server to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: wrk prints one line starting with this marker, followed by JSON (see ``_WRK_SCRIPT``).
MARKER = "WRKJSON "
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    "MARKER", summary.requests, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
""".replace("MARKER", MARKER)


@dataclass(frozen=True)
class Pair:
    key: str
    title: str
    path: str
    expect: bytes  # must occur in the body of the check request
    a: tuple[str, str]  # (app attribute in asgi_apps, label)
    b: tuple[str, str]
    target: float | None  # B/A of the medians must be >= this
    database: str | None  # "pg", "sqlite" or None


PAIRS: dict[str, Pair] = {
    pair.key: pair
    for pair in (
        Pair(
            "ping",
            "GET /ping, no database",
            "/ping",
            b'"pong"',
            ("ping_plain", "FastAPI, no middleware"),
            ("ping_mw", "FastAPI + SessionMiddleware"),
            0.98,
            None,
        ),
        Pair(
            "floor-pass",
            "GET /ping, reference: a middleware that only awaits the app",
            "/ping",
            b'"pong"',
            ("ping_plain", "FastAPI, no middleware"),
            ("ping_pass", "FastAPI + pass-through middleware"),
            None,
            None,
        ),
        Pair(
            "floor-minimal",
            "GET /ping, reference: context variable + async send wrapper, nothing else",
            "/ping",
            b'"pong"',
            ("ping_plain", "FastAPI, no middleware"),
            ("ping_minimal", "FastAPI + minimal scope middleware"),
            None,
            None,
        ),
        Pair(
            "pg",
            "GET /read, one row, PostgreSQL (asyncpg)",
            "/read",
            b'"name":"item-1"',
            ("read_dep", "Depends(get_session), hand-written"),
            ("read_ctx", "SessionMiddleware + db.session()"),
            1.0,
            "pg",
        ),
        Pair(
            "sqlite",
            "GET /read, one row, SQLite (aiosqlite)",
            "/read",
            b'"name":"item-1"',
            ("read_dep", "Depends(get_session), hand-written"),
            ("read_ctx", "SessionMiddleware + db.session()"),
            1.0,
            "sqlite",
        ),
        Pair(
            "pg-inline",
            "GET /read, PostgreSQL, reference: session opened inside the handler",
            "/read",
            b'"name":"item-1"',
            ("read_inline", "async with maker() in the handler"),
            ("read_ctx", "SessionMiddleware + db.session()"),
            None,
            "pg",
        ),
        Pair(
            "aa",
            "A/A control: GET /ping, two identical servers",
            "/ping",
            b'"pong"',
            ("ping_plain", "FastAPI, no middleware (1st)"),
            ("ping_plain", "FastAPI, no middleware (2nd)"),
            None,
            None,
        ),
    )
}


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    rounds: int
    connections: int
    threads: int
    pin: bool
    quick: bool
    fresh: bool
    side_by_side: bool


@dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: float | None  # CPU seconds the server process used during the run (Linux only)
    gc_collections: tuple[int, int, int]  # garbage collections in the server, per generation
    gc_s: float  # seconds the server spent in them

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us_per_request(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.requests * 1e6

    @property
    def cpu_busy(self) -> float | None:
        """Share of one CPU the server used during the run (1.0: the worker was saturated)."""
        return None if self.cpu_s is None else self.cpu_s / self.seconds

    @property
    def gc_share(self) -> float:
        """Share of the run's wall time the server spent collecting garbage."""
        return self.gc_s / self.seconds


@dataclass
class Variant:
    app: str
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [run.rps for run in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        """(max - min) / median of the requests/s over the rounds."""
        return (max(self.rates) - min(self.rates)) / self.median

    @property
    def cpu_us_per_request(self) -> float | None:
        """Median over the rounds of the server's CPU microseconds per request."""
        return _median_or_none([run.cpu_us_per_request for run in self.runs])

    @property
    def cpu_busy(self) -> float | None:
        """Median over the rounds of the share of one CPU the server used."""
        return _median_or_none([run.cpu_busy for run in self.runs])

    def gc_per_run(self, generation: int) -> float:
        """Median over the rounds of the collections of ``generation`` during one run."""
        return statistics.median(run.gc_collections[generation] for run in self.runs)

    @property
    def gc_share(self) -> float:
        return statistics.median(run.gc_share for run in self.runs)


def _median_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


@dataclass(frozen=True)
class Result:
    pair: Pair
    a: Variant
    b: Variant

    @property
    def ratio(self) -> float:
        return self.b.median / self.a.median

    @property
    def paired(self) -> list[float]:
        return [b / a for a, b in zip(self.a.rates, self.b.rates, strict=True)]

    @property
    def cpu_ratio(self) -> float | None:
        """B/A of the medians of server CPU per request (below 1: B needs less CPU)."""
        a, b = self.a.cpu_us_per_request, self.b.cpu_us_per_request
        return None if a is None or b is None else b / a


# -- processes ------------------------------------------------------------------------------


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Unwind through every ``finally`` (which stop the servers), then exit 128 + signum."""
    raise SystemExit(128 + signum)


def _cpus(pin: bool) -> tuple[str, str] | None:
    """(server CPU, wrk CPU) for taskset, or None when not pinning."""
    if not pin or shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return str(available[-1]), str(available[0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """One uvicorn process serving ``benchmarks.asgi_apps:<app>``, in its own process group."""

    def __init__(self, app: str, env: dict[str, str], cpu: str | None, log_dir: Path) -> None:
        self.app = app
        self.port = _free_port()
        self.log_path = log_dir / f"uvicorn-{app}-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            f"benchmarks.asgi_apps:{app}",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "on",
        ]
        if cpu is not None:
            command = ["taskset", "-c", cpu, *command]
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it and its children
        )

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (all threads); Linux only."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text(encoding="ascii")
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"uvicorn for {self.app} exited with {self.process.returncode}:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError):
                if _get(self.port, "/ping", timeout=1.0)[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"uvicorn for {self.app} not ready after {STARTUP_TIMEOUT} s")

    def gc_stats(self) -> tuple[tuple[int, int, int], float]:
        """(collections per generation, seconds in them) so far, from ``GET /_gc``."""
        status, body = _get(self.port, "/_gc")
        if status != 200:
            raise RuntimeError(f"{self.app} GET /_gc: {status} {body[:200]!r}")
        data = json.loads(body)
        gen0, gen1, gen2 = data["collections"]
        return (gen0, gen1, gen2), float(data["seconds"])

    def check(self, path: str, expect: bytes) -> None:
        status, body = _get(self.port, path)
        if status != 200 or expect not in body:
            raise RuntimeError(f"{self.app} GET {path}: {status} {body[:200]!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT)
        self._log.close()


@contextlib.contextmanager
def servers(
    apps: Sequence[str], env: dict[str, str], cpu: str | None, log_dir: Path
) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for app in apps:
            started.append(Server(app, env, cpu, log_dir))
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


def wrk(
    server: Server, path: str, settings: Settings, seconds: float, script: Path, cpu: str | None
) -> Run:
    url = server.url(path)
    command = [
        "wrk",
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    if cpu is not None:
        command = ["taskset", "-c", cpu, *command]
    gc_before, gc_s_before = server.gc_stats()
    cpu_before = server.cpu_seconds()
    # subprocess.run kills wrk if the timeout expires or anything interrupts the wait.
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    cpu_after = server.cpu_seconds()
    gc_after, gc_s_after = server.gc_stats()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"no summary from wrk:\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len(MARKER) :])
    errors = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
    if data["requests"] == 0:
        raise RuntimeError(f"wrk completed no request against {url}:\n{done.stdout}")
    return Run(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_s=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        gc_collections=(
            gc_after[0] - gc_before[0],
            gc_after[1] - gc_before[1],
            gc_after[2] - gc_before[2],
        ),
        gc_s=gc_s_after - gc_s_before,
    )


# -- databases ------------------------------------------------------------------------------


async def _create_table(url: str, table: Table) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.drop, checkfirst=True)
            await conn.run_sync(table.create)
            rows = [{"id": i, "name": f"item-{i}"} for i in range(1, ROWS + 1)]
            await conn.execute(insert(table), rows)
    finally:
        await engine.dispose()


async def _drop_table(url: str, table: Table) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.drop, checkfirst=True)
    finally:
        await engine.dispose()


@contextlib.contextmanager
def database(kind: str, pg_url: str, tmp: Path, name: str) -> Iterator[str]:
    """Create the benchmark table, yield the URL for the servers, drop the table at the end."""
    url = pg_url if kind == "pg" else f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    from benchmarks.asgi_apps import items_table  # ROOT is on sys.path (see main)

    table = items_table(name, MetaData())
    asyncio.run(_create_table(url, table))
    try:
        yield url
    finally:
        asyncio.run(_drop_table(url, table))


# -- the measurement ------------------------------------------------------------------------


@contextlib.contextmanager
def _ready_servers(
    pair: Pair,
    a: Variant,
    b: Variant,
    env: dict[str, str],
    settings: Settings,
    tmp: Path,
    script: Path,
) -> Iterator[tuple[Server, Server]]:
    """Both servers of ``pair`` started, checked and warmed up (warm-up not recorded)."""
    cpus = _cpus(settings.pin)
    server_cpu, wrk_cpu = cpus if cpus is not None else (None, None)
    with servers([a.app, b.app], env, server_cpu, tmp) as (server_a, server_b):
        for server in (server_a, server_b):
            server.check(pair.path, pair.expect)
        for variant, server in ((a, server_a), (b, server_b)):
            print(f"  warm-up {variant.app} ({settings.warmup:g} s)", flush=True)
            wrk(server, pair.path, settings, settings.warmup, script, wrk_cpu)
        yield server_a, server_b
        for server in (server_a, server_b):  # still healthy after the load
            server.check(pair.path, pair.expect)


def _measure_round(
    index: int,
    pair: Pair,
    targets: tuple[tuple[Variant, Server], ...],
    a: Variant,
    settings: Settings,
    script: Path,
) -> None:
    """One run per variant of ``targets``, appended to that variant's runs.

    With ``settings.side_by_side`` (the default) both variants are loaded at the same time,
    by two wrk processes: the two servers share the server CPU, so whatever the machine does
    during the round slows both alike, and their requests/s ratio is their CPU-per-request
    ratio. Otherwise one after the other, the order alternating between rounds (A B, B A).
    """
    cpus = _cpus(settings.pin)
    wrk_cpu = cpus[1] if cpus is not None else None
    ordered = targets if index % 2 == 0 else targets[::-1]
    if settings.side_by_side:
        with ThreadPoolExecutor(len(ordered)) as pool:
            futures = [
                pool.submit(wrk, server, pair.path, settings, settings.duration, script, wrk_cpu)
                for _, server in ordered
            ]
            runs = [future.result() for future in futures]
    else:
        runs = []
        for _, server in ordered:
            runs.append(wrk(server, pair.path, settings, settings.duration, script, wrk_cpu))
    for (variant, _), run in zip(ordered, runs, strict=True):
        variant.runs.append(run)
        side = "A" if variant is a else "B"
        print(
            f"  round {index + 1}/{settings.rounds} {side} {variant.app:<11}"
            f" {run.rps:>10,.1f} req/s  p50 {run.p50_ms:.2f} ms"
            f"  GC {'/'.join(map(str, run.gc_collections))}"
            + (f"  ERRORS {run.errors}" if run.errors else ""),
            flush=True,
        )


def measure_pair(
    pair: Pair, env: dict[str, str], settings: Settings, tmp: Path, script: Path
) -> Result:
    a, b = Variant(*pair.a), Variant(*pair.b)
    if settings.fresh:
        # New server processes for every round: how fast one process runs depends a little
        # on luck (memory layout, hash seeds), and one process per variant would measure
        # that luck in every round (the A/A pair shows how much).
        for index in range(settings.rounds):
            with _ready_servers(pair, a, b, env, settings, tmp, script) as (server_a, server_b):
                _measure_round(index, pair, ((a, server_a), (b, server_b)), a, settings, script)
    else:
        with _ready_servers(pair, a, b, env, settings, tmp, script) as (server_a, server_b):
            for index in range(settings.rounds):
                _measure_round(index, pair, ((a, server_a), (b, server_b)), a, settings, script)
    return Result(pair, a, b)


# -- in process: the middleware's own CPU cost -----------------------------------------------

_HTTP_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/ping",
    "raw_path": b"/ping",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1")],
    "client": (HOST, 50000),
    "server": (HOST, 8000),
}
_START: dict[str, Any] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
}
_BODY: dict[str, Any] = {"type": "http.response.body", "body": b'{"ping":"pong"}'}


async def _bare_app(scope: Any, receive: Any, send: Any) -> None:
    """The smallest ASGI app that answers: one start and one body message."""
    await send(_START)
    await send(_BODY)


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    pass


@dataclass(frozen=True)
class Direct:
    """One in-process comparison: seconds per batch of A and of B, batch pairs in order."""

    name: str
    batch: int  # requests per batch
    a_seconds: list[float]
    b_seconds: list[float]

    @property
    def throughput_ratios(self) -> list[float]:
        """B's requests/s over A's, per batch pair (below 1: B is slower)."""
        return [a / b for a, b in zip(self.a_seconds, self.b_seconds, strict=True)]

    @property
    def throughput_ratio(self) -> float:
        return statistics.median(self.throughput_ratios)

    @property
    def cost_us(self) -> float:
        """Median over the batch pairs of what B adds per request, in microseconds."""
        pairs = zip(self.a_seconds, self.b_seconds, strict=True)
        return statistics.median((b - a) / self.batch * 1e6 for a, b in pairs)


async def _batch(app: Any, n: int) -> float:
    """Seconds for ``n`` calls of ``app`` with a GET /ping scope, each in a task of its own
    (as a server runs each request)."""
    start = time.perf_counter()
    for _ in range(n):
        # A new scope each time: Starlette writes into it.
        await asyncio.create_task(app(dict(_HTTP_SCOPE), _receive, _send))
    return time.perf_counter() - start


async def _compare(name: str, a: Any, b: Any, batch: int, pairs: int) -> Direct:
    """Alternate small batches of A and B (the order flipped every pair), kept in pairs: a
    change of machine speed hits both batches of a pair alike."""
    for _ in range(20):  # warm-up; Starlette builds its middleware stack on the first call
        await _batch(a, batch)
        await _batch(b, batch)
    a_seconds: list[float] = []
    b_seconds: list[float] = []
    for index in range(pairs):
        if index % 2:
            b_seconds.append(await _batch(b, batch))
            a_seconds.append(await _batch(a, batch))
        else:
            a_seconds.append(await _batch(a, batch))
            b_seconds.append(await _batch(b, batch))
    return Direct(name, batch, a_seconds, b_seconds)


async def _measure_in_process(batch: int, pairs: int) -> list[Direct]:
    from benchmarks.asgi_apps import ping_mw, ping_plain

    from sqla_context.asgi import SessionMiddleware

    return [
        await _compare("bare ASGI app", _bare_app, SessionMiddleware(_bare_app), batch, pairs),
        await _compare("FastAPI (ping_plain, ping_mw)", ping_plain, ping_mw, batch, pairs),
    ]


def measure_in_process(settings: Settings) -> list[Direct]:
    """Time the apps called directly (no server, no socket), pinned like the servers."""
    cpus = _cpus(settings.pin)
    previous = os.sched_getaffinity(0) if cpus is not None else None
    if cpus is not None:
        os.sched_setaffinity(0, {int(cpus[0])})
    try:
        pairs = 200 if settings.quick else 2_000
        return asyncio.run(_measure_in_process(20, pairs))
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def print_in_process(rows: list[Direct]) -> None:
    print(
        f"in process (apps called directly, no server or socket; {len(rows[0].a_seconds)} pairs"
        f" of {rows[0].batch}-request batches, A then B or B then A; medians over the pairs):"
    )
    headers = ("A: app, B: app + SessionMiddleware", "B adds us/req", "req/s B/A", "IQR B/A")
    table = []
    for row in rows:
        quartiles = statistics.quantiles(row.throughput_ratios, n=4)
        table.append(
            (
                row.name,
                f"{row.cost_us:.2f}",
                f"{row.throughput_ratio:.3f}",
                f"{quartiles[0]:.3f}-{quartiles[2]:.3f}",
            )
        )
    _print_table(headers, table, left=1)
    print()


# -- sampling profile of the middleware under load --------------------------------------------


@dataclass(frozen=True)
class Profile:
    samples: int
    own: int  # samples whose innermost code is SessionMiddleware's own
    by_line: list[tuple[str, int]]
    run: Run

    @property
    def share(self) -> float:
        return self.own / self.samples


def _own_line(frames: list[str]) -> str | None:
    """The sqla_context line a sample is charged to, or None if it is not the middleware's own.

    A sample is the middleware's own when its innermost frame is in ``sqla_context`` (C
    functions such as ``ContextVar.set`` are charged by py-spy to the calling line), or is
    ``contextlib`` code called directly from such a frame (``contextlib.suppress``).
    """
    last = max((i for i, frame in enumerate(frames) if "sqla_context/" in frame), default=None)
    if last is None:
        return None
    rest = frames[last + 1 :]
    if rest and "contextlib.py" not in rest[0]:
        return None  # inside the wrapped app or the server's send: not ours
    return frames[last].rsplit("sqla_context/", 1)[1].rstrip(")")


def _parse_py_spy(raw: Path) -> tuple[int, Counter[str]]:
    samples = 0
    own: Counter[str] = Counter()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples += int(count)
        where = _own_line(stack.split(";"))
        if where is not None:
            own[where] += int(count)
    return samples, own


def profile_middleware(py_spy: str, settings: Settings, tmp: Path, script: Path) -> Profile | None:
    """Sample the ``ping_mw`` server with py-spy while wrk loads it, as in the ``ping`` pair."""
    cpus = _cpus(settings.pin)
    server_cpu, wrk_cpu = cpus if cpus is not None else (None, None)
    seconds = max(2, round(settings.duration * 2))
    raw = tmp / "ping_mw.py-spy.txt"
    command = [py_spy, "record", "--pid", "PID", "--duration", str(seconds), "--rate", "250"]
    command += ["--format", "raw", "--output", str(raw), "--nonblocking"]
    if wrk_cpu is not None:  # py-spy runs next to wrk, not on the server's CPU
        command = ["taskset", "-c", wrk_cpu, *command]
    print(f"profile: py-spy on ping_mw for {seconds} s under load", flush=True)
    with servers(["ping_mw"], dict(os.environ), server_cpu, tmp) as (server,):
        wrk(server, "/ping", settings, settings.warmup, script, wrk_cpu)  # warm-up
        command[command.index("PID")] = str(server.process.pid)
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            run = wrk(server, "/ping", settings, seconds + 2, script, wrk_cpu)
            _, err = spy.communicate(timeout=seconds + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace').strip()[-500:]}")
        return None
    samples, own = _parse_py_spy(raw)
    if samples == 0:
        print("py-spy recorded no sample")
        return None
    return Profile(samples, sum(own.values()), own.most_common(6), run)


def print_profile(profile: Profile) -> None:
    cpu = profile.run.cpu_us_per_request
    cost = "" if cpu is None else f" = {profile.share * cpu:.1f} us of the {cpu:.1f} us CPU/req"
    print(
        f"py-spy, ping_mw server under the same load ({profile.samples} samples, "
        f"{profile.run.rps:,.0f} req/s): SessionMiddleware's own code (frames of sqla_context, "
        f"and contextlib called from them) in {profile.own} samples, {profile.share:.1%}{cost}"
    )
    lines = ", ".join(f"{where} {count / profile.samples:.1%}" for where, count in profile.by_line)
    print(f"  by line: {lines}")
    print()


# -- report ---------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    words = (done.stdout or done.stderr).split()
    return words[1] if len(words) > 1 else "?"


def print_environment(settings: Settings) -> None:
    import sqla_context

    load = os.getloadavg()
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    cpus = _cpus(settings.pin)
    placement = (
        f"uvicorn pinned to CPU {cpus[0]}, wrk to CPU {cpus[1]}" if cpus else "no CPU pinning"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"uvicorn {_version('uvicorn')} ({loop} loop, {parser}), "
        f"fastapi {_version('fastapi')}, starlette {_version('starlette')}, "
        f"SQLAlchemy {_version('sqlalchemy')}, asyncpg {_version('asyncpg')}, "
        f"aiosqlite {_version('aiosqlite')}, wrk {_wrk_version()}"
    )
    print(f"sqla_context {sqla_context.__version__} from {Path(sqla_context.__file__).parent}")
    print(
        f"load: wrk -t{settings.threads} -c{settings.connections}, "
        f"{settings.rounds} {'side-by-side' if settings.side_by_side else 'interleaved'} "
        f"rounds of {settings.duration:g} s per variant "
        f"after a {settings.warmup:g} s warm-up each; 1 uvicorn worker per variant, "
        f"{'new processes every round' if settings.fresh else 'the same process for all rounds'}"
        f"; {placement}"
    )
    print()


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def print_report(results: list[Result], direct: list[Direct], settings: Settings) -> None:
    headers = (
        "pair",
        "variant",
        "median req/s",
        "min-max req/s",
        "spread",
        "p50 ms",
        "p99 ms",
        "CPU us/req",
        "CPU busy",
        "GC gen0/1/2 per run",
        "GC time",
        "errors",
    )
    table: list[tuple[str, ...]] = []
    for result in results:
        for side, variant in (("A", result.a), ("B", result.b)):
            table.append(
                (
                    result.pair.key if side == "A" else "",
                    f"{side} {variant.app}: {variant.label}",
                    f"{variant.median:,.1f}",
                    f"{min(variant.rates):,.0f}-{max(variant.rates):,.0f}",
                    f"{variant.spread:.1%}",
                    f"{statistics.median(run.p50_ms for run in variant.runs):.2f}",
                    f"{statistics.median(run.p99_ms for run in variant.runs):.2f}",
                    _maybe(variant.cpu_us_per_request, "{:.1f}"),
                    _maybe(variant.cpu_busy, "{:.0%}"),
                    "/".join(f"{variant.gc_per_run(gen):g}" for gen in range(3)),
                    f"{variant.gc_share:.2%}",
                    str(sum(run.errors for run in variant.runs)),
                )
            )
    _print_table(headers, table, left=2)
    print()
    ratio_headers = (
        "pair",
        "req/s B/A",
        "per-round B/A median",
        "min-max",
        "CPU/req B/A",
        "target (req/s)",
        "verdict",
    )
    ratios: list[tuple[str, ...]] = []
    for result in results:
        target = result.pair.target
        # Both statistics must meet the target: the ratio of the medians (as the target is
        # worded) and the median of the per-round ratios (the rounds are paired samples).
        worse = min(result.ratio, statistics.median(result.paired))
        if target is None:
            verdict = "no target (reference)"
        elif worse >= target:
            verdict = "met"
        else:
            verdict = f"MISSED by {target - worse:.3f}"
        ratios.append(
            (
                result.pair.key,
                f"{result.ratio:.3f}",
                f"{statistics.median(result.paired):.3f}",
                f"{min(result.paired):.3f}-{max(result.paired):.3f}",
                _maybe(result.cpu_ratio, "{:.3f}"),
                f">= {target:.2f}" if target is not None else "-",
                verdict,
            )
        )
    _print_table(ratio_headers, ratios, left=1)
    print()
    ping = next((result for result in results if result.pair.key == "ping"), None)
    server_cpu = ping.a.cpu_us_per_request if ping is not None else None
    if direct and server_cpu is not None:
        cost = direct[-1].cost_us  # FastAPI with and without the middleware
        print(
            f"ping: the middleware's in-process cost ({cost:.2f} us/req) is "
            f"{cost / server_cpu:.1%} of the plain server's CPU per request "
            f"({server_cpu:.1f} us); a CPU-bound worker would serve "
            f"B/A = {server_cpu / (server_cpu + cost):.3f}"
        )
    worst = max((v for r in results for v in (r.a, r.b)), key=lambda v: v.spread)
    spreads = [v.spread for r in results for v in (r.a, r.b)]
    print(
        f"machine noise: spread (max-min)/median of a variant over its rounds is at most "
        f"{worst.spread:.1%} ({worst.app}); median over variants {statistics.median(spreads):.1%}"
    )
    busy = [run.cpu_busy for r in results for v in (r.a, r.b) for run in v.runs]
    known = [value for value in busy if value is not None]
    if known:
        print(
            f"server CPU busy per run: min {min(known):.0%}, median {statistics.median(known):.0%}"
            + (
                " (side by side: the two servers of a pair share one CPU, ~50 % each)"
                if settings.side_by_side
                else " (a run well below 100 % was starved of CPU by other processes)"
            )
        )
    mode = "QUICK smoke run, do not quote these numbers" if settings.quick else "full run"
    print(f"{mode}; load average at the end {os.getloadavg()[0]:.2f}")


def _print_table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], *, left: int) -> None:
    """Print ``rows`` aligned: the first ``left`` columns left-justified, the rest right."""
    widths = [max(len(line[i]) for line in (headers, *rows)) for i in range(len(headers))]

    def fmt(line: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(fmt(headers))
    print("  ".join("-" * width for width in widths))
    for line in rows:
        print(fmt(line))


# -- main -----------------------------------------------------------------------------------


def run(
    keys: list[str], settings: Settings, pg_url: str, py_spy: str | None
) -> tuple[list[Result], Profile | None]:
    results: list[Result] = []
    profile: Profile | None = None
    table = f"bench_asgi_items_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="sqla_context_asgi_bench_") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "summary.lua"
        script.write_text(_WRK_SCRIPT, encoding="utf-8")
        base_env = dict(os.environ, BENCH_TABLE=table)
        for key in keys:
            pair = PAIRS[key]
            print(f"{pair.key}: {pair.title}", flush=True)
            if pair.database is None:
                results.append(measure_pair(pair, base_env, settings, tmp, script))
                continue
            with database(pair.database, pg_url, tmp, table) as url:
                env = dict(base_env, BENCH_DB_URL=url)
                results.append(measure_pair(pair, env, settings, tmp, script))
        if py_spy is not None:
            profile = profile_middleware(py_spy, settings, tmp, script)
    return results, profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, 3 rounds")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per variant (default 5)")
    parser.add_argument("--rounds", type=int, help="rounds per pair (default 7)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument(
        "--pairs",
        default="ping,floor-pass,floor-minimal,pg,sqlite,pg-inline,aa",
        help=f"comma-separated pairs to run, among {', '.join(PAIRS)} (default: all)",
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL URL for 'pg'")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="keep one server process per variant for all rounds (default: new ones per round)",
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="load one variant after the other (default: both at the same time, sharing a CPU)",
    )
    parser.add_argument(
        "--no-in-process", action="store_true", help="skip the in-process timing of the apps"
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy executable: after the pairs, sample the ping_mw server under load",
    )
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.pairs.split(",") if key.strip()]
    unknown = [key for key in keys if key not in PAIRS]
    if unknown or not keys:
        parser.error(f"unknown pairs {unknown}; choose among {', '.join(PAIRS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk not found (Debian/Ubuntu: apt-get install wrk)")
    settings = Settings(
        duration=args.duration or (2.0 if args.quick else 10.0),
        warmup=args.warmup or (1.0 if args.quick else 5.0),
        rounds=args.rounds or (3 if args.quick else 7),
        connections=args.connections,
        threads=args.threads,
        pin=not args.no_pin,
        quick=args.quick,
        fresh=not args.same_process,
        side_by_side=not args.one_at_a_time,
    )
    if str(ROOT) not in sys.path:  # for ``benchmarks.asgi_apps``, also when run by path
        sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, _on_sigterm)
    print_environment(settings)
    direct = [] if args.no_in_process else measure_in_process(settings)
    if direct:
        print_in_process(direct)
    results, profile = run(keys, settings, args.pg_url, args.py_spy)
    print()
    if direct:
        print_in_process(direct)
    if profile is not None:
        print_profile(profile)
    print_report(results, direct, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
