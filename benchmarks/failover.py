"""Failover, measured: failed requests after pg_terminate_backend and after a restart.

    .venv/bin/python benchmarks/failover.py [--repeat 3] [--driver asyncpg|psycopg]
                                            [--variants direct,direct-no-ping,pgbouncer]

Creates (idempotently) its own PostgreSQL 15 cluster "failover" on port 5434 (never touches
the main cluster), runs benchmarks/failover_app.py under uvicorn on a Unix socket, and drives
it with CLIENTS concurrent httpx clients, each sending requests one after another. While the
load runs it (a) terminates every server connection of the app's database with
pg_terminate_backend, and (b) restarts the cluster (``pg_ctlcluster 15 failover restart``,
fast shutdown). For each event it reports the failed requests and the time from the event
to the last failure. The "pgbouncer" variant puts a PgBouncer in transaction mode
(scripts/pgbouncer.sh, on a Unix socket only) between the app and the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VERSION, CLUSTER, PORT, DBNAME = "15", "failover", 5434, "failover"
CLIENTS = 20
BEFORE, AFTER = 2.0, 4.0  # seconds of load before and after each event
BOUNCER_DIR = Path(tempfile.gettempdir()) / "sqla-context-failover-pgbouncer"
BOUNCER_PORT = 6434  # only names the Unix socket (.s.PGSQL.6434): no TCP port is opened


def run(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def psql(sql: str) -> str:
    return run("psql", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-XAtqc", sql, DBNAME)


def ensure_cluster() -> None:
    """Create, start and prepare the throwaway cluster; a no-op when it is up."""
    clusters = run("pg_lsclusters", "-h")
    if not any(line.split()[:2] == [VERSION, CLUSTER] for line in clusters.splitlines()):
        run("pg_createcluster", VERSION, CLUSTER, "-p", str(PORT), "--", "--auth=trust")
    run("pg_ctlcluster", "--skip-systemctl-redirect", VERSION, CLUSTER, "start", check=False)
    for _ in range(100):
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(PORT)]).returncode == 0:
            break
        time.sleep(0.1)
    exists = run(
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        str(PORT),
        "-U",
        "postgres",
        "-XAtqc",
        f"SELECT 1 FROM pg_database WHERE datname = '{DBNAME}'",
        "postgres",
    )
    if not exists.strip():
        run("createdb", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", DBNAME)


def bouncer(action: str) -> None:
    env = {
        **os.environ,
        "SQLA_CONTEXT_PGBOUNCER_PORT": str(BOUNCER_PORT),
        "SQLA_CONTEXT_PGBOUNCER_LISTEN": "",
        "SQLA_CONTEXT_PGBOUNCER_UPSTREAM": f"127.0.0.1:{PORT}",
        "SQLA_CONTEXT_PGBOUNCER_POOL": "10",
        "SQLA_CONTEXT_PGBOUNCER_LOGIN_RETRY": os.environ.get("FAILOVER_LOGIN_RETRY", "0.1"),
        "SQLA_CONTEXT_PGBOUNCER_DIR": str(BOUNCER_DIR),
    }
    script = str(ROOT / "scripts" / "pgbouncer.sh")
    subprocess.run([script, action], check=True, env=env, capture_output=True)


def app_url(variant: str, driver: str) -> str:
    if variant == "pgbouncer":
        return f"postgresql+{driver}://postgres@/{DBNAME}?host={BOUNCER_DIR}&port={BOUNCER_PORT}"
    return f"postgresql+{driver}://postgres@127.0.0.1:{PORT}/{DBNAME}"


async def load(sock: str, stop: asyncio.Event, log: list[tuple[float, bool]]) -> None:
    transport = httpx.AsyncHTTPTransport(uds=sock)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:

        async def one_client() -> None:
            while not stop.is_set():
                try:
                    ok = (await client.get("http://app/read")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                log.append((time.monotonic(), ok))

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))


def _ready() -> bool:
    probe = ["pg_isready", "-q", "-t", "1", "-h", "127.0.0.1", "-p", str(PORT)]
    return subprocess.run(probe).returncode == 0


async def back_up() -> float:
    """The moment the server accepts connections again after having refused them."""
    while await asyncio.to_thread(_ready):  # noqa: ASYNC110 - polling a server, no event to await
        await asyncio.sleep(0.005)
    while not await asyncio.to_thread(_ready):  # noqa: ASYNC110 - polling a server
        await asyncio.sleep(0.005)
    return time.monotonic()


async def measure(sock: str, event: str) -> tuple[int, int, float | None, float | None]:
    """(requests, failed, seconds from the event to the last failure, and from the moment
    the server accepted connections again to the last failure) for one event."""
    log: list[tuple[float, bool]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(load(sock, stop, log))
    await asyncio.sleep(BEFORE)
    before = sum(not ok for _, ok in log)
    at = time.monotonic()
    if event == "terminate":
        await asyncio.to_thread(
            psql,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{DBNAME}' AND pid <> pg_backend_pid()",
        )
        up = at
    else:
        probe = asyncio.create_task(back_up())
        await asyncio.to_thread(
            run,
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            VERSION,
            CLUSTER,
            "restart",
            "-m",
            "fast",
        )
        up = await asyncio.wait_for(probe, 30)
    await asyncio.sleep(AFTER)
    stop.set()
    await task
    failures = [t for t, ok in log if not ok and t >= at]
    assert before == 0, f"{before} requests failed before the event"
    last = max(failures) - at if failures else None
    after_up = max(failures) - up if failures else None
    return len([t for t, _ in log if t >= at]), len(failures), last, after_up


async def variant_run(variant: str, driver: str, repeat: int) -> list[str]:
    if variant == "pgbouncer":
        bouncer("start")
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "FAILOVER_URL": app_url(variant, driver),
        "FAILOVER_PRE_PING": "0" if variant == "direct-no-ping" else "1",
        "FAILOVER_PGBOUNCER": "1" if variant == "pgbouncer" else "0",
    }
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/app.sock"
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the load
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.failover_app:app",
                "--uds",
                sock,
                "--log-level",
                "critical",
                "--no-access-log",
            ],
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,  # the app logs each failed commit
        )
        try:
            for _ in range(100):
                if Path(sock).exists():  # noqa: ASYNC240 - a stat, before the load
                    break
                await asyncio.sleep(0.1)
            for event in ("terminate", "restart"):
                for i in range(repeat):
                    total, failed, last, after_up = await measure(sock, event)
                    shown = "-" if last is None else f"{last:.2f} s"
                    since_up = (
                        "-" if after_up is None or event != "restart" else f"{after_up:+.2f} s"
                    )
                    line = (
                        f"| {variant} | {driver} | {event} | {i + 1} | {total} | {failed} | "
                        f"{shown} | {since_up} |"
                    )
                    print(line, flush=True)
                    lines.append(line)
        finally:
            server.terminate()
            server.wait(10)
            if variant == "pgbouncer":
                bouncer("stop")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--driver", default="asyncpg", choices=["asyncpg", "psycopg"])
    parser.add_argument("--variants", default="direct,direct-no-ping,pgbouncer")
    args = parser.parse_args()
    ensure_cluster()
    print(f"{CLIENTS} clients, {BEFORE:g} s of load before and {AFTER:g} s after each event")
    print(
        "| setup | driver | event | run | requests after | failed | last failure after the event"
        " | last failure after the server was up again |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        asyncio.run(variant_run(variant, args.driver, args.repeat))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
