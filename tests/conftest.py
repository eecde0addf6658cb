"""The backend matrix: every test that takes ``backend`` runs on each real database.

SQLite (a file in the test's tmp dir) always runs. PostgreSQL (asyncpg and psycopg 3) and
MariaDB (asyncmy) run when reachable; otherwise they skip with the reason, unless
SQLA_CONTEXT_REQUIRE_SERVERS=1 (set by .ci/run), which turns an unreachable server into a
failure. Override the server URLs with SQLA_CONTEXT_PG_URL / _PSYCOPG_URL / _MARIADB_URL.
SQLA_CONTEXT_BACKENDS (comma-separated ids, e.g. ``sqlite,pg-asyncpg``) selects some of them.

With SQLA_CONTEXT_PGBOUNCER=1 two more backends run: ``pgbouncer-asyncpg`` and
``pgbouncer-psycopg``, PostgreSQL through PgBouncer in transaction mode
(``scripts/pgbouncer.sh start``; URL SQLA_CONTEXT_PGBOUNCER_URL) with
``sqla_context.pgbouncer_options``. Their databases are created and dropped, and their
witness reads, through a direct connection to the PostgreSQL behind it (SQLA_CONTEXT_PG_URL's
server), so the checks do not depend on PgBouncer. Select them with ``-k pgbouncer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, String, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_context import Database, pgbouncer_options

REQUIRE_SERVERS = os.environ.get("SQLA_CONTEXT_REQUIRE_SERVERS", "") not in ("", "0")

PG_URL = os.environ.get("SQLA_CONTEXT_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PSYCOPG_URL = os.environ.get(
    "SQLA_CONTEXT_PSYCOPG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get("SQLA_CONTEXT_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306/test")

BACKENDS = [
    pytest.param(("sqlite", "sqlite+aiosqlite:///{tmp}/test.db", "aiosqlite"), id="sqlite"),
    pytest.param(("postgresql", PG_URL, "asyncpg"), id="pg-asyncpg"),
    pytest.param(("postgresql", PSYCOPG_URL, "psycopg"), id="pg-psycopg"),
    pytest.param(("mariadb", MARIADB_URL, "asyncmy"), id="mariadb"),
]

PGBOUNCER_URL = os.environ.get(
    "SQLA_CONTEXT_PGBOUNCER_URL", "postgresql+asyncpg://postgres@127.0.0.1:6432/test"
)
WITH_PGBOUNCER = os.environ.get("SQLA_CONTEXT_PGBOUNCER", "") not in ("", "0")


def pgbouncer_url(driver: str) -> str:
    """SQLA_CONTEXT_PGBOUNCER_URL with ``driver``."""
    return make_url(PGBOUNCER_URL).set(drivername=f"postgresql+{driver}").render_as_string(False)


def direct_url(url: str) -> str:
    """``url`` (a PgBouncer URL) pointed at the PostgreSQL server of SQLA_CONTEXT_PG_URL."""
    pg = make_url(PG_URL)
    return make_url(url).set(host=pg.host, port=pg.port).render_as_string(False)


PGBOUNCER_BACKENDS = [
    pytest.param(("pgbouncer", pgbouncer_url(driver), driver), id=f"pgbouncer-{driver}")
    for driver in ("asyncpg", "psycopg")
]
if WITH_PGBOUNCER:
    BACKENDS += PGBOUNCER_BACKENDS

# SQLA_CONTEXT_BACKENDS=sqlite,pg-asyncpg keeps only those backends (run.py matrix: the
# Python and lowest-version legs run on two backends to stay short).
_ONLY = [name.strip() for name in os.environ.get("SQLA_CONTEXT_BACKENDS", "").split(",")]
if _ONLY != [""]:
    _known = [param.id for param in BACKENDS + PGBOUNCER_BACKENDS]
    if unknown := [name for name in _ONLY if name not in _known]:
        raise pytest.UsageError(f"SQLA_CONTEXT_BACKENDS: unknown {unknown}; known: {_known}")
    BACKENDS = [param for param in BACKENDS if param.id in _ONLY]
    # tests/test_pgbouncer.py parametrizes with these directly: keep them out too, unless named.
    PGBOUNCER_BACKENDS[:] = [param for param in PGBOUNCER_BACKENDS if param.id in _ONLY]

_PGBOUNCER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pgbouncer.sh"


def _start_pgbouncer() -> None:
    """Start the test PgBouncer (idempotent) if the URL is the script's default one."""
    if "SQLA_CONTEXT_PGBOUNCER_URL" in os.environ or shutil.which("pgbouncer") is None:
        return
    subprocess.run([str(_PGBOUNCER_SCRIPT), "start"], check=False, capture_output=True)


_unreachable: dict[str, str] = {}  # url -> reason, so a dead server costs one timeout per run


# Server-side ids (PG backend pids, MariaDB thread ids) of every connection this process
# opened: open_transactions() looks only at these, so other processes using the same
# database (a parallel test run, a developer's psql) cannot make a test fail.
_server_ids: set[int] = set()
# PostgreSQL backend pids are OS pids, reused once the machine's pids wrap around
# (pid_max is often 32768): a pid recorded here may belong to another process's backend
# later. Its start time (microseconds since the epoch) tells ours apart.
_pg_backend_starts: dict[int, int] = {}
_PG_START = "(extract(epoch FROM backend_start) * 1000000)::bigint"


@event.listens_for(Engine, "connect")
def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    module = type(dbapi_connection).__module__
    cursor = dbapi_connection.cursor()
    if "sqlite" in module:
        # SQLite enforces foreign keys (so deferred ones, checked at COMMIT) only when asked.
        cursor.execute("PRAGMA foreign_keys=ON")
    elif "postgresql" in module:
        cursor.execute(
            f"SELECT pid, {_PG_START} FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        pid, started = cursor.fetchone()
        _server_ids.add(int(pid))
        _pg_backend_starts[int(pid)] = int(started)
        # End the transaction the query began: psycopg refuses to set the isolation level
        # (engine_options={"isolation_level": ...}) on a connection inside a transaction.
        dbapi_connection.rollback()
    else:
        cursor.execute("SELECT connection_id()")
        _server_ids.add(int(cursor.fetchone()[0]))
    cursor.close()


async def _why_unusable(url: str, driver: str, **engine_options: Any) -> str | None:
    if importlib.util.find_spec(driver) is None:
        return f"driver {driver!r} is not installed (pip install 'sqla-context[test]')"
    if url in _unreachable:
        return _unreachable[url]
    if url.startswith("sqlite"):
        return None
    engine = create_async_engine(url, **engine_options)

    async def probe() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))

    try:
        await asyncio.wait_for(probe(), 10)
    except Exception as exc:
        _unreachable[url] = f"{url} is unreachable: {type(exc).__name__}: {exc}"
        return _unreachable[url]
    finally:
        await engine.dispose()
    return None


class Backend:
    """One real database for one test: tables, an independent witness engine, helpers.

    Assertions read through ``witness`` (its own engine and pool), never through the
    session under test. Databases made with :meth:`database` are checked at teardown: no
    connection may still be checked out.
    """

    def __init__(self, kind: str, url: str, driver: str, *, pgbouncer: bool = False) -> None:
        self.kind = kind  # "sqlite" | "postgresql" | "mariadb"
        self.url = url
        self.driver = driver
        # Through PgBouncer (transaction mode): Databases get pgbouncer_options(); the
        # witness connects to PostgreSQL directly.
        self.pgbouncer = pgbouncer
        self.engine_options: dict[str, Any] = pgbouncer_options(url) if pgbouncer else {}
        self.witness: AsyncEngine = create_async_engine(direct_url(url) if pgbouncer else url)
        self.databases: list[Database] = []
        self.siblings: list[Backend] = []

    def database(self, *, preset: bool = True, **options: Any) -> Database:
        """A Database on this backend, checked at teardown; ``preset=False``: no
        pgbouncer_options() on a PgBouncer backend."""
        if self.engine_options and preset:
            options["engine_options"] = {**self.engine_options, **options.get("engine_options", {})}
        db = Database(self.url, **options)
        self.databases.append(db)
        return db

    async def setup(self) -> None:
        deferred = "" if self.kind == "mariadb" else " DEFERRABLE INITIALLY DEFERRED"
        async with self.witness.begin() as conn:
            for table in ("children", "parents", "items"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            await conn.execute(text("CREATE TABLE items (name VARCHAR(100) PRIMARY KEY)"))
            await conn.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
            await conn.execute(
                text(
                    "CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER "
                    f"REFERENCES parents (id){deferred})"
                )
            )

    async def sibling(self) -> Backend:
        """Another database of the same kind (same server, or another SQLite file), set up."""
        url = make_url(self.url)
        name = f"{url.database.removesuffix('.db')}_sibling{len(self.siblings) + 1}"
        if self.kind == "sqlite":
            other = url.set(database=f"{name}.db")
        else:
            await _create_database(self.witness, name)
            other = url.set(database=name)
        be = Backend(
            self.kind,
            other.render_as_string(hide_password=False),
            self.driver,
            pgbouncer=self.pgbouncer,
        )
        await be.setup()
        self.siblings.append(be)
        return be

    async def teardown(self) -> None:
        for sibling in self.siblings:
            await sibling.teardown()
        try:
            leaks = {
                db.name: db.engine.pool.checkedout()
                for db in self.databases
                if db._engine is not None
            }
            for db in self.databases:
                await db.dispose()
            assert not any(leaks.values()), f"connections still checked out: {leaks}"
            assert await self.open_transactions(settle=True) == 0, "a transaction was left open"
        finally:
            await self.witness.dispose()

    async def names(self) -> list[str]:
        """The committed rows of ``items``, sorted, as seen from another connection."""
        async with self.witness.connect() as conn:
            rows = await conn.execute(text("SELECT name FROM items ORDER BY name"))
            return [r[0] for r in rows]

    async def open_transactions(self, *, settle: bool = False) -> int:
        """Transactions left open on the server by this process's other connections.

        PostgreSQL: sessions ``idle in transaction``; MariaDB: InnoDB transactions. Always 0
        on SQLite, where the pool's checked-out count is the check.

        With ``settle``, a non-zero count is read again for up to 2 s: a server finishes the
        clean-up of a connection that was just closed (``dispose()``) asynchronously, while a
        leaked transaction stays open.
        """
        count = await self._open_transactions()
        deadline = asyncio.get_running_loop().time() + 2
        while settle and count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            count = await self._open_transactions()
        return count

    async def _open_transactions(self) -> int:
        if self.kind == "sqlite" or not (_server_ids or self.pgbouncer):
            return 0
        async with self.witness.connect() as conn:
            if self.pgbouncer:
                # PgBouncer's server connections change hands between transactions, so the
                # pids seen at connect time are not the ones to watch. The database is this
                # process's own: any of its sessions left idle in a transaction is ours.
                sql = (
                    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database() AND state LIKE 'idle in transaction%'"
                )
                return int((await conn.execute(text(sql))).scalar_one())
            if self.kind == "postgresql":
                ids = ", ".join(map(str, sorted(_server_ids)))
                sql = (
                    f"SELECT pid, {_PG_START} FROM pg_stat_activity WHERE pid <> "
                    f"pg_backend_pid() AND state LIKE 'idle in transaction%' AND pid IN ({ids})"
                )
                rows = (await conn.execute(text(sql))).all()
                return sum(_pg_backend_starts.get(pid) == started for pid, started in rows)
            # MariaDB serves information_schema.innodb_trx from a cache refreshed at most
            # every 100 ms, so it can show a finished transaction or miss a new one. The
            # InnoDB status report lists the live transactions.
            own = int((await conn.execute(text("SELECT connection_id()"))).scalar_one())
            status = (await conn.execute(text("SHOW ENGINE INNODB STATUS"))).one()[2]
        count = 0
        for raw in status.split("\n---TRANSACTION ")[1:]:
            entry = raw.split("\n--------", 1)[0]  # the last one runs into the next section
            owner = re.search(r"thread id (\d+)", entry)
            if "ACTIVE" in entry.partition("\n")[0] and owner:
                thread = int(owner[1])
                count += thread in _server_ids and thread != own
        return count

    async def doom(self, session: AsyncSession) -> None:
        """Make the next COMMIT of ``session`` fail at the server, after a successful write.

        PostgreSQL and SQLite: a row violating a deferred foreign key (checked at COMMIT).
        MariaDB has no deferred constraints: its connection is killed from outside.
        """
        if self.kind == "mariadb":
            await session.execute(text("INSERT INTO items (name) VALUES ('doomed')"))
            conn_id = (await session.execute(text("SELECT connection_id()"))).scalar_one()
            async with self.witness.connect() as conn:
                await conn.execute(text(f"KILL {int(conn_id)}"))
        else:
            await session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))


_created: set[str] = set()
_started: set[str] = set()  # PgBouncer URLs we tried to start the test PgBouncer for


async def _create_database(witness: AsyncEngine, name: str) -> None:
    if f"{witness.url}/{name}" in _created:
        return
    async with witness.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if witness.dialect.name == "postgresql":
            query = text("SELECT 1 FROM pg_database WHERE datname = :n")
            if (await conn.execute(query, {"n": name})).first() is None:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        else:
            await conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
    _created.add(f"{witness.url}/{name}")


class Base(DeclarativeBase):
    pass


class Item(Base):
    """The ORM view of the ``items`` table every Backend creates."""

    __tablename__ = "items"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)


async def assert_clean(
    backend: Backend, db: Database, rows: list[str], *, settle: bool = False
) -> None:
    """Exactly ``rows`` are committed, no connection is checked out, no transaction is open
    (``settle``: see ``Backend.open_transactions``)."""
    assert await backend.names() == rows
    assert db.engine.pool.checkedout() == 0, "a connection is still checked out"
    assert await backend.open_transactions(settle=settle) == 0, "a transaction is left open"


async def end_stranded_aiosqlite_closes(grace: float = 0.1) -> None:
    """End SQLAlchemy's graceful closes of aiosqlite connections that can never finish.

    Not our code, and not only with sqla-context: with plain SQLAlchemy 2.1 and aiosqlite
    0.22, a statement cancelled mid-run invalidates its connection, and the
    terminate's graceful close (``_terminate_graceful_close``) can be left waiting for a
    worker thread that its force-close has already stopped. ``asyncio.run()`` then hangs at
    exit: it cancels the task once, and aiosqlite's ``close()`` awaits again in its
    ``finally``. Seen about once in ten runs of a test that cancels a SQLite statement
    mid-run. Each such task is given ``grace`` seconds, then cancelled until it ends.
    """
    stranded = [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().__qualname__.endswith("._terminate_graceful_close")
    ]
    if not stranded:
        return
    await asyncio.wait(stranded, timeout=grace)
    for task in stranded:
        for _ in range(3):  # once for the statement's future, once for the finally's
            if task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=grace)
        assert task.done(), f"{task!r} did not end when cancelled"


async def insert(session: AsyncSession, name: str) -> None:
    await session.execute(text("INSERT INTO items (name) VALUES (:name)"), {"name": name})


# Each test process works in databases of its own on the servers, named after its pid, so
# that two runs at once (a developer and CI, parallel workers) never share tables.
RUN_PREFIX = "test_sqla_ctx_"
RUN_DATABASE = f"{RUN_PREFIX}{os.getpid()}"


_run_urls: dict[str, str] = {}


async def _run_url(url: str) -> str:
    """``url`` moved to this process's own database (created on first use)."""
    if url in _run_urls:
        return _run_urls[url]
    admin = create_async_engine(url)
    try:
        await _drop_stale_databases(admin)
        await _create_database(admin, RUN_DATABASE)
    finally:
        await admin.dispose()
    _run_urls[url] = make_url(url).set(database=RUN_DATABASE).render_as_string(False)
    return _run_urls[url]


async def _list_run_databases(conn: Any, dialect: str) -> list[str]:
    sql = "SELECT datname FROM pg_database" if dialect == "postgresql" else "SHOW DATABASES"
    names = (await conn.execute(text(sql))).scalars().all()
    return [n for n in names if n.startswith(RUN_PREFIX)]


async def _drop_databases(admin: AsyncEngine, keep_pid_alive: bool) -> None:
    async with admin.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for name in await _list_run_databases(conn, admin.dialect.name):
            pid = name.removeprefix(RUN_PREFIX).split("_")[0]
            if keep_pid_alive and (not pid.isdigit() or _alive(int(pid))):
                continue
            if not keep_pid_alive and pid != str(os.getpid()):
                continue
            if admin.dialect.name == "postgresql":
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                # MariaDB's DROP DATABASE waits for every open transaction on its tables.
                users = "SELECT id FROM information_schema.processlist WHERE db = :n"
                for (thread,) in (await conn.execute(text(users), {"n": name})).all():
                    with contextlib.suppress(Exception):  # it may have gone meanwhile
                        await conn.execute(text(f"KILL {int(thread)}"))
                await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_swept: set[str] = set()


async def _drop_stale_databases(admin: AsyncEngine) -> None:
    """Drop databases left by test processes that died without cleaning up."""
    key = str(admin.url)
    if key not in _swept:
        _swept.add(key)
        await _drop_databases(admin, keep_pid_alive=True)


_server_urls: set[str] = set()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    async def drop_ours() -> None:
        for url in _server_urls:
            admin = create_async_engine(url)
            try:
                await asyncio.wait_for(_drop_databases(admin, keep_pid_alive=False), 60)
            except Exception as exc:  # a server that went away: nothing to clean
                print(f"could not drop test databases on {url}: {exc}")
            finally:
                await admin.dispose()

    if _server_urls:
        asyncio.run(drop_ours())


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind, url_template, driver = request.param
    url = url_template.format(tmp=tmp_path)
    via_pgbouncer = kind == "pgbouncer"
    if via_pgbouncer:
        kind = "postgresql"
        problem = await _why_unusable(url, driver, **pgbouncer_options(url))
        if problem is not None and url not in _started:
            _started.add(url)
            _unreachable.pop(url, None)
            await asyncio.to_thread(_start_pgbouncer)
            problem = await _why_unusable(url, driver, **pgbouncer_options(url))
        if problem is not None:
            problem += " (start it with scripts/pgbouncer.sh start)"
    else:
        problem = await _why_unusable(url, driver)
    if problem is not None:
        if REQUIRE_SERVERS:
            pytest.fail(f"SQLA_CONTEXT_REQUIRE_SERVERS is set but {problem}")
        pytest.skip(problem)
    if via_pgbouncer:
        # The run database is created (and dropped at the end) on the server itself;
        # PgBouncer's wildcard entry then reaches it by name.
        admin = direct_url(url)
        _server_urls.add(admin)
        run_db = make_url(await _run_url(admin)).database
        url = make_url(url).set(database=run_db).render_as_string(False)
    elif kind != "sqlite":
        _server_urls.add(url)
        url = await _run_url(url)
    be = Backend(kind, url, driver, pgbouncer=via_pgbouncer)
    await be.setup()
    try:
        yield be
    finally:
        await be.teardown()


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    """SQLite only, for behaviour that does not depend on the database."""
    be = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path}/test.db", "aiosqlite")
    await be.setup()
    try:
        yield be
    finally:
        await be.teardown()
