"""Peer comparison: the same FastAPI app, one way of handling sessions per approach.

Run it with ``python3 run.py bench --peers [options]`` from the repository root: that makes
``.venv-peers/`` (sqla-context from this checkout, the peers, uvicorn with uvloop and
httptools, matplotlib, pyperf) and runs this script in it. See ``benchmarks/README.md``.

Each approach is an app module in ``apps/`` served by its own uvicorn process on 127.0.0.1;
the load comes from ``wrk`` (``wrk_report.lua`` prints its figures as JSON). Per round, all
servers of a loop variant start fresh, each endpoint is loaded approach after approach (the
order rotates from round to round, so that slow and fast phases of the machine hit every
approach alike), then the servers stop. In-process timings (no server, no socket) come from
pyperf (``inprocess.py``). The report goes to ``results.md``, ``results.png`` and
``results.json`` beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps import BY_KEY, ENDPOINTS, Approach
from report import GOOD_MS, plot, plot_scale, summarize, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1/test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


LOOPS = {
    "uvloop": ["--loop", "uvloop", "--http", "httptools"],
    "asyncio": ["--loop", "asyncio", "--http", "h11"],
}
#: Measured with asyncio + h11 by default (``/nodb`` only); ``--h11 all`` takes every approach.
H11_CORE = ["bare", "asgi-passthrough", "sqla-context"]
PEERS = [
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "h11",
    "SQLAlchemy",
    "asyncpg",
    "context-async-sqlalchemy",
    "fastapi-async-sqlalchemy",
    "advanced-alchemy",
    "sqla-context",
    "pyperf",
]


# -- processes ------------------------------------------------------------------------------

_started: list[subprocess.Popen[bytes]] = []


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server started by this script (its own process group), SIGKILL after 10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _started:
        _started.remove(proc)


def _stop_all(*_: object) -> None:
    for proc in list(_started):
        _stop(proc)
    if _:  # called as a signal handler
        raise SystemExit(130)


def _free_port() -> int:
    """A free port below the ephemeral range, where wrk's own connections never land.

    (Not ``uvicorn --fd`` with a socket made here: uvicorn takes such a socket for a Unix
    socket, leaves Nagle's algorithm on, and every response then waits ~40 ms.)
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((HOST, port))
            return port
    raise RuntimeError("no free port")


def _pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


@dataclass
class Server:
    approach: Approach
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (one worker: all of it)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_kib(self) -> int:
        """Resident memory of the server process and its children (workers)."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total


def start_server(
    approach: Approach, loop: str, env: dict[str, str], cpus: str | None, workers: int, tmp: Path
) -> Server:
    port = _free_port()
    log = tmp / f"{approach.key}-{loop}-{port}.log"
    cmd = [
        sys.executable, "-m", "uvicorn", f"{approach.module}:app", "--host", HOST,
        "--port", str(port), "--workers", str(workers), "--log-level", "warning",
        "--no-access-log", *LOOPS[loop],
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _pinned(cmd, cpus), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    _started.append(proc)
    return Server(approach, port, proc, log)


def wait_ready(server: Server, endpoints: list[str], timeout: float = 30.0) -> None:
    """Poll ``/nodb`` until it answers (at most ``timeout`` s), then check every endpoint."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.approach.key} exited:\n{server.log.read_text()[-3000:]}")
        try:
            if server.get("/nodb", timeout=1.0)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.approach.key} not ready after {timeout:.0f} s")
        time.sleep(0.05)
    for path in endpoints:
        status, body = server.get(path)
        if status != 200:
            raise RuntimeError(f"{server.approach.key} {path}: {status} {body[:200]!r}")


def wrk(url: str, args: argparse.Namespace, duration: int, connections: int) -> dict[str, Any]:
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={args.timeout}s",
        "--latency", "-s", str(HERE / "wrk_report.lua"), url,
    ]  # fmt: skip
    env = {**os.environ, "WRK_GOOD_US": str(GOOD_MS * 1000), "WRK_CONNECTIONS": str(connections)}
    out = subprocess.run(
        _pinned(cmd, args.wrk_cpu), capture_output=True, text=True, env=env,
        timeout=duration + 60, check=True,
    ).stdout  # fmt: skip
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    r: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    seconds = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / seconds
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    # Time-outs never reach the histogram (they are misses); non-2xx answers count as misses.
    good = max(0, r["raw_good"] - r["status"]) if r["raw_ok"] else None
    r["goodput"] = None if good is None else good / seconds
    return r


# -- the table ------------------------------------------------------------------------------


def create_table(url: str, table: str, drop: bool = False) -> None:
    from apps._common import ROWS, items_table
    from sqlalchemy import MetaData, insert
    from sqlalchemy.ext.asyncio import create_async_engine

    t = items_table(table, MetaData())

    async def run() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                if drop:
                    await conn.run_sync(t.drop, checkfirst=True)
                    return
                await conn.run_sync(t.create)
                rows = [{"id": i, "name": f"row {i}"} for i in range(1, ROWS + 1)]
                await conn.execute(insert(t), rows)
        finally:
            await engine.dispose()

    asyncio.run(run())


# -- runs -----------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[Approach]]]:
    """(loop, endpoint, approaches) in measuring order within a round."""
    chosen = [BY_KEY[k] for k in args.approaches]
    steps = []
    for loop in args.loops:
        for endpoint in args.endpoints:
            if loop == "asyncio" and endpoint != "/nodb":
                continue
            which = [a for a in chosen if a.db or endpoint == "/nodb"]
            if loop == "asyncio" and args.h11 == "core":
                which = [a for a in which if a.key in H11_CORE]
            if which and (loop != "asyncio" or args.h11 != "none"):
                steps.append((loop, endpoint, which))
    return steps


def run_rounds(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    steps = plan(args)
    for rnd in range(args.rounds):
        for loop in dict.fromkeys(s[0] for s in steps):
            loop_steps = [s for s in steps if s[0] == loop]
            needed = list(dict.fromkeys(a for s in loop_steps for a in s[2]))
            servers = {}
            try:
                for a in needed:
                    servers[a.key] = start_server(a, loop, env, args.server_cpu, 1, tmp)
                for a in needed:
                    paths = [e for _, e, which in loop_steps if a in which]
                    wait_ready(servers[a.key], paths)
                for _, endpoint, which in loop_steps:
                    shift = rnd % len(which)
                    for a in which[shift:] + which[:shift]:
                        url = servers[a.key].url(endpoint)
                        wrk(url, args, args.warmup, args.connections)
                        cpu = servers[a.key].cpu_seconds()
                        r = wrk(url, args, args.duration, args.connections)
                        cpu = servers[a.key].cpu_seconds() - cpu
                        r["cpu_us"] = cpu * 1e6 / max(r["requests"], 1)
                        r.update(round=rnd, loop=loop, endpoint=endpoint, approach=a.key)
                        results.append(r)
                        print(
                            f"round {rnd + 1}/{args.rounds} {loop:7} {endpoint:22} {a.key:30}"
                            f" {r['rps']:8.1f} req/s  p99 {r['p99_us'] / 1000:7.1f} ms"
                            f"  good {r['goodput'] or 0:8.1f}/s  errors {r['errors']}"
                            f"  CPU {r['cpu_us']:6.0f} us/req",
                            flush=True,
                        )
            finally:
                for server in servers.values():
                    _stop(server.proc)
    return results


def run_scale(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    """``/read`` at several client counts, pool sizes and worker counts (one server at a time)."""
    results = []
    for rnd in range(args.scale_rounds):
        for workers in (1, 2):
            for pool in (5, 20):
                shift = rnd % len(args.scale_approaches)
                order = args.scale_approaches[shift:] + args.scale_approaches[:shift]
                for key in order:
                    cpus = args.server_cpu if workers == 1 else None
                    server = start_server(
                        BY_KEY[key], "uvloop", {**env, "BENCH_POOL": str(pool)}, cpus, workers, tmp
                    )
                    try:
                        wait_ready(server, ["/read"])
                        for clients in (10, 50, 200, 500):
                            url = server.url("/read")
                            wrk(url, args, args.warmup, clients)
                            r = wrk(url, args, args.duration, clients)
                            r.update(
                                round=rnd, approach=key, workers=workers, pool=pool, clients=clients
                            )
                            results.append(r)
                            print(
                                f"scale {rnd + 1}/{args.scale_rounds} workers {workers} pool"
                                f" {pool:2} clients {clients:3} {key:30} {r['rps']:8.1f} req/s"
                                f"  good {r['goodput'] or 0:8.1f}/s  errors {r['errors']}",
                                flush=True,
                            )
                    finally:
                        _stop(server.proc)
    return results


def run_rss(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    """Resident memory of one server before and after ``--rss`` requests to ``/read``."""
    results = []
    for key in args.rss_approaches:
        server = start_server(BY_KEY[key], "uvloop", env, args.server_cpu, 1, tmp)
        try:
            wait_ready(server, ["/read"])
            wrk(server.url("/read"), args, 2, args.connections)
            before, done = server.rss_kib(), 0
            while done < args.rss:
                done += wrk(server.url("/read"), args, 10, args.connections)["requests"]
            after = server.rss_kib()
            results.append({"approach": key, "requests": done, "before": before, "after": after})
            print(f"rss {key:30} {before / 1024:.1f} -> {after / 1024:.1f} MiB after {done}")
        finally:
            _stop(server.proc)
    return results


def run_in_process(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """pyperf timings of one request through each app, called directly (``inprocess.py``)."""
    out = tmp / "inprocess.json"
    inherit = "BENCH_DB_URL,BENCH_TABLE,BENCH_POOL,BENCH_APPROACHES"
    cmd = [sys.executable, str(HERE / "inprocess.py"), "--quiet", "-o", str(out)]
    cmd += [f"--inherit-environ={inherit}"]
    # pyperf's defaults (20 worker processes, each importing its app) would take ~15 s per
    # benchmark here: fewer processes with longer values; --quick: one process, fixed loops.
    if args.quick:
        cmd += ["--processes", "1", "--values", "2", "--warmups", "1", "--loops", "64"]
    else:
        cmd += ["--processes", "3", "--values", "3", "--min-time", "0.2"]
    if args.server_cpu:
        cmd += [f"--affinity={args.server_cpu}"]
    keys = ",".join(a for a in args.approaches)
    subprocess.run(cmd, cwd=ROOT, env={**env, "BENCH_APPROACHES": keys}, check=True)
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(out))
    return {
        b.get_name(): {"median_us": b.median() * 1e6, "stdev_us": b.stdev() * 1e6}
        for b in suite.get_benchmarks()
    }


# -- environment ---------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for name in PEERS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    wrk = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wrk"], capture_output=True)
    found["wrk"] = wrk.stdout.decode() or "?"
    return found


def _machine(args: argparse.Namespace, pg_version: str) -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} x {model}",
        "platform": platform.platform(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "postgres": pg_version,
        "commit": commit,
        "pinning": f"servers on CPU {args.server_cpu}, wrk on CPU {args.wrk_cpu}"
        if args.server_cpu
        else "none",
    }


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, ~3 min")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load first")
    p.add_argument("--connections", type=int, default=50, help="wrk -c")
    p.add_argument("--timeout", type=int, default=2, help="wrk --timeout, seconds")
    p.add_argument("--pool", type=int, default=5, help="pool_size of every app")
    p.add_argument("--approaches", default=",".join(BY_KEY), help="comma-separated")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help="comma-separated; empty: none")
    p.add_argument("--loops", default="uvloop,asyncio", help="uvloop (+httptools), asyncio (+h11)")
    p.add_argument(
        "--h11", choices=["core", "all", "none"], default="core",
        help=f"/nodb with asyncio+h11 for: {', '.join(H11_CORE)} (core), every approach, none",
    )  # fmt: skip
    p.add_argument("--no-in-process", action="store_true", help="skip the pyperf timings")
    p.add_argument("--scale", action="store_true", help="also /read at 10-500 clients, ~5 min")
    p.add_argument("--scale-approaches", default="sqla-context,depends,inline")
    p.add_argument("--scale-rounds", type=int, default=1)
    p.add_argument("--rss", type=int, default=0, metavar="N", help="RSS growth over N requests")
    p.add_argument("--rss-approaches", default="sqla-context,depends")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk (taskset)")
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    for name in ("approaches", "endpoints", "loops", "scale_approaches", "rss_approaches"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    unknown = set(args.approaches + args.scale_approaches + args.rss_approaches) - set(BY_KEY)
    if unknown or set(args.endpoints) - set(ENDPOINTS) or set(args.loops) - set(LOOPS):
        p.error(f"unknown approach, endpoint or loop: {unknown or args.endpoints + args.loops}")
    pin = not args.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2
    args.server_cpu = str((os.cpu_count() or 1) - 1) if pin else None
    args.wrk_cpu = "0" if pin else None
    return args


@contextlib.contextmanager
def bench_table(url: str) -> Iterator[str]:
    table = f"bench_peers_{os.getpid()}"
    create_table(url, table)
    try:
        yield table
    finally:
        create_table(url, table, drop=True)


def _pg_version(url: str) -> str:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> str:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(text("select version()"))).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(run()).split(" on ")[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_all)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-peers-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out_dir"}}
    data["args"]["pool"] = args.pool
    try:
        with bench_table(args.pg_url) as table:
            env = {
                **os.environ, "BENCH_DB_URL": args.pg_url, "BENCH_TABLE": table,
                "BENCH_POOL": str(args.pool), "PYTHONDONTWRITEBYTECODE": "1",
            }  # fmt: skip
            started = time.monotonic()
            data["runs"] = run_rounds(args, env, tmp)
            if not args.no_in_process:
                data["in_process"] = run_in_process(args, env, tmp)
            if args.scale:
                data["scale"] = run_scale(args, env, tmp)
            if args.rss:
                data["rss"] = run_rss(args, env, tmp)
            data["seconds"] = round(time.monotonic() - started)
            data["machine"] = _machine(args, _pg_version(args.pg_url))
    finally:
        _stop_all()
    data["load_before"] = load_before
    data["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data["versions"] = _versions()
    data["summary"] = summarize(data["runs"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_report(data, args.out_dir)
    if data["summary"]:
        plot(data, args.out_dir)
    if args.scale:
        plot_scale(data, args.out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out_dir / 'results.md'} and results.png ({data['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
