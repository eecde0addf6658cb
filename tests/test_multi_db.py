"""Several Database objects in one scope: independent sessions, ordered commits, failures."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import CommitError, Database, NoScopeError, scope

from .conftest import Backend, insert


class Boom(Exception):
    pass


class CloseFails(AsyncSession):
    """A session whose close() does its work and then raises, like a broken pool hook."""

    async def close(self) -> None:
        await super().close()
        raise Boom("close failed")


async def test_each_database_gets_its_own_session(backend: Backend) -> None:
    other = await backend.sibling()
    primary, secondary = backend.database(name="primary"), other.database(name="secondary")
    async with scope():
        a, b = await primary.session(), await secondary.session()
        assert a is not b
        assert a.bind is primary.engine
        assert b.bind is secondary.engine
        await insert(a, "in-primary")
        await insert(b, "in-secondary")
    assert await backend.names() == ["in-primary"]
    assert await other.names() == ["in-secondary"]


async def test_two_handles_on_one_url_are_independent(backend: Backend) -> None:
    # Primary + "replica" pointing at the same server, as the demo does by default.
    primary, replica = backend.database(name="primary"), backend.database(name="replica")
    async with scope():
        await insert(await primary.session(), "p")
        assert await replica.session() is not await primary.session()
    assert await backend.names() == ["p"]


async def test_failure_rolls_back_every_database(backend: Backend) -> None:
    other = await backend.sibling()
    primary, secondary = backend.database(), other.database()
    with pytest.raises(Boom):
        async with scope():
            await insert(await primary.session(), "a")
            await insert(await secondary.session(), "b")
            raise Boom
    assert await backend.names() == []
    assert await other.names() == []


async def test_failed_commit_rolls_back_the_rest_and_names_them(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    second_be, third_be = await backend.sibling(), await backend.sibling()
    first = backend.database(name="first")
    second = second_be.database(name="second")
    third = third_be.database(name="third")
    with caplog.at_level(logging.ERROR, logger="sqla_context"), pytest.raises(CommitError) as info:
        async with scope():
            await insert(await first.session(), "from-first")
            await second_be.doom(await second.session())
            await insert(await third.session(), "from-third")
    error = info.value
    assert (error.failed, error.committed, error.rolled_back) == (
        "second",
        ["first"],
        ["second", "third"],
    )
    assert "Committed before the failure: ['first']" in str(error)
    assert "Commit failed for database 'second'" in str(error)
    assert await backend.names() == ["from-first"]
    assert await second_be.names() == []
    assert await third_be.names() == [], "third was rolled back"
    for db in (first, second, third):
        assert db.engine.pool.checkedout() == 0, f"{db.name} leaked a connection"
    with pytest.raises(NoScopeError):
        await first.session()


async def test_failing_close_does_not_skip_the_others(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    other = await backend.sibling()
    flaky = backend.database(name="flaky", session_options={"class_": CloseFails})
    healthy = other.database(name="healthy")
    with caplog.at_level(logging.WARNING, logger="sqla_context"):
        async with scope():
            await insert(await flaky.session(), "f")
            await insert(await healthy.session(), "h")
    assert "ending the session of database 'flaky' failed" in caplog.text
    assert await backend.names() == ["f"]
    assert await other.names() == ["h"]
    assert flaky.engine.pool.checkedout() == 0
    assert healthy.engine.pool.checkedout() == 0
    with pytest.raises(NoScopeError):
        await healthy.session()


async def test_databases_without_work_are_not_committed(backend: Backend) -> None:
    seen: list[str] = []
    used = backend.database(name="used", after_commit=lambda s: seen.append("used"))
    idle = backend.database(name="idle", after_commit=lambda s: seen.append("idle"))
    async with scope():
        await insert(await used.session(), "x")
        await idle.session()
    assert seen == ["used"]
    assert idle.engine.pool.checkedout() == 0


def test_database_is_hashable_and_distinct() -> None:
    a, b = Database("sqlite+aiosqlite://"), Database("sqlite+aiosqlite://")
    assert len({a, b}) == 2
