"""pytest fixtures for apps that use sqla_context. Opt in from your ``conftest.py``::

    pytest_plugins = ["sqla_context.pytest_plugin"]


    @pytest.fixture(scope="session")
    def sqla_databases():
        return [db, replica]  # every Database the app uses


    @pytest.fixture(scope="session")
    def sqla_metadata():
        return Base.metadata  # optional: tables created once per run, dropped at the end

    @pytest.fixture(scope="session")
    def sqla_is_test_database():
        return lambda name: name.startswith("ci_")  # optional: which databases may be used

Then request ``sqla_isolation`` in a test (or make it autouse in your conftest): the test's
database work is rolled back when it ends (see ``sqla_context.testing.isolated()``). Mark
a test ``@pytest.mark.sqla_commit`` to have its work really committed and the written
tables emptied afterwards. Under pytest-xdist each worker works in a database of its own,
created and dropped by the plugin.

The plugin is not registered as a ``pytest11`` entry point, so installing sqla-context does
not change the test runs of projects that do not ask for it. Its async fixture needs
pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
from sqlalchemy import MetaData

from ._database import Database
from .testing import (
    DEFAULT_LOCK_TIMEOUT,
    CapturedCallbacks,
    IsolationMode,
    RunDatabases,
    captured_on_commit,
    isolated,
    looks_like_test_database,
)

try:
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.pytest_plugin needs pytest-asyncio: pip install pytest-asyncio"
    ) from exc

__all__ = [
    "sqla_captured_on_commit",
    "sqla_databases",
    "sqla_is_test_database",
    "sqla_isolation",
    "sqla_lock_timeout",
    "sqla_metadata",
    "sqla_run_databases",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqla_commit: commit the test's database work for real and empty the written tables "
        "afterwards (sqla_context.testing commit mode)",
    )


@pytest.fixture(scope="session")
def sqla_databases() -> Sequence[Database]:
    """The Databases to isolate. Override this fixture (session scope) in your conftest.py."""
    raise pytest.UsageError(
        "sqla_context.pytest_plugin: define a session-scoped `sqla_databases` fixture in your "
        "conftest.py that returns the Database objects your app uses, e.g. `return [db]`."
    )


@pytest.fixture(scope="session")
def sqla_metadata() -> MetaData | None:
    """The schema to create once per run (``None``: create none). Override it to use it."""
    return None


@pytest.fixture(scope="session")
def sqla_is_test_database() -> Callable[[str], bool]:
    """The rule a server database's name must pass (``is_test_database=`` of the toolkit).

    The default accepts names that contain ``"test"``. Override it (session scope) to allow
    other names, e.g. ``return lambda name: name.startswith("ci_")``.
    """
    return looks_like_test_database


@pytest.fixture(scope="session")
def sqla_lock_timeout() -> float | None:
    """Seconds a connection may wait for a lock in an isolated test (``lock_timeout=``).

    Override it (session scope) to change the default of 10 s; ``None`` waits as long as the
    server allows.
    """
    return DEFAULT_LOCK_TIMEOUT


@pytest.fixture(scope="session")
def sqla_run_databases(
    sqla_databases: Sequence[Database],
    sqla_metadata: MetaData | None,
    sqla_is_test_database: Callable[[str], bool],
) -> Iterator[Sequence[Database]]:
    """Per-worker databases under pytest-xdist, and the schema, for the whole run.

    Under xdist each worker (``gw0``, ``gw1``, ...) gets a database of its own, created here
    and dropped at the end (SQLite: a file of its own). See
    ``sqla_context.testing.RunDatabases``.
    """
    run = RunDatabases(
        *sqla_databases,
        worker=os.environ.get("PYTEST_XDIST_WORKER"),
        metadata=sqla_metadata,
        is_test_database=sqla_is_test_database,
    )
    asyncio.run(run.setup())
    try:
        yield sqla_databases
    finally:
        asyncio.run(run.teardown())


@pytest_asyncio.fixture
async def sqla_isolation(
    request: pytest.FixtureRequest,
    sqla_run_databases: Sequence[Database],
    sqla_is_test_database: Callable[[str], bool],
    sqla_lock_timeout: float | None,
) -> AsyncIterator[IsolationMode]:
    """Isolate the test's work on ``sqla_databases``; yields the mode in use.

    It composes with ``isolated_in(client.portal, ...)`` for a ``TestClient`` (see
    ``sqla_context.testing.isolated_in()``). The engines are disposed when the test ends:
    pytest-asyncio gives each test its own event loop by default, and a pooled connection
    cannot move to another loop.
    """
    mode: IsolationMode = "commit" if request.node.get_closest_marker("sqla_commit") else "rollback"
    try:
        async with isolated(
            *sqla_run_databases,
            mode=mode,
            is_test_database=sqla_is_test_database,
            lock_timeout=sqla_lock_timeout,
        ):
            yield mode
    finally:
        for db in sqla_run_databases:
            await db.dispose()


@pytest.fixture
def sqla_captured_on_commit() -> Iterator[CapturedCallbacks]:
    """Hold back the ``on_commit()`` callbacks of the test (see ``testing.captured_on_commit``).

    Callbacks of work that commits during the test are collected, not run; assert on
    ``sqla_captured_on_commit.callbacks`` and run them with ``await ....run()``.
    """
    with captured_on_commit() as captured:
        yield captured
