"""db.transaction(): blocks, savepoints and the `existing=` rules."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import (
    ConfigurationError,
    NoScopeError,
    TransactionAlreadyOpenError,
    scope,
)

from .conftest import Backend, insert


class Boom(Exception):
    pass


async def test_block_commits_on_success(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        async with db.transaction() as session:
            assert session is await db.session()
            await insert(session, "a")
        assert await backend.names() == ["a"], "committed at the end of the block"
        assert not session.in_transaction()


async def test_block_rolls_back_and_reraises(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        with pytest.raises(Boom):
            async with db.transaction() as session:
                await insert(session, "a")
                raise Boom
        assert not session.in_transaction()
        await insert(session, "b")
    assert await backend.names() == ["b"], "the scope goes on after a failed block"


async def test_nest_uses_a_savepoint_and_commits_nothing_early(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "outer")
        async with db.transaction():
            await insert(session, "inner-ok")
        assert await backend.names() == [], "the default never commits earlier work"
        with pytest.raises(Boom):
            async with db.transaction():
                await insert(session, "inner-bad")
                raise Boom
        assert session.in_transaction(), "only the savepoint was rolled back"
    assert await backend.names() == ["inner-ok", "outer"]


async def test_nested_savepoints(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "a")
        async with db.transaction():
            await insert(session, "b")
            with pytest.raises(Boom):
                async with db.transaction():
                    await insert(session, "c")
                    raise Boom
            await insert(session, "d")
    assert await backend.names() == ["a", "b", "d"]


async def test_existing_commit_commits_first(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "earlier")
        with pytest.raises(Boom):
            async with db.transaction(existing="commit"):
                assert await backend.names() == ["earlier"]
                await insert(session, "block")
                raise Boom
    assert await backend.names() == ["earlier"]


async def test_existing_rollback_discards_first(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "earlier")
        async with db.transaction(existing="rollback"):
            await insert(session, "block")
        assert await backend.names() == ["block"]
    assert await backend.names() == ["block"]


async def test_existing_join_commits_everything_at_block_end(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "earlier")
        async with db.transaction(existing="join"):
            await insert(session, "block")
        assert await backend.names() == ["block", "earlier"]


async def test_existing_join_rolls_back_everything_on_error(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "earlier")
        with pytest.raises(Boom):
            async with db.transaction(existing="join"):
                await insert(session, "block")
                raise Boom
    assert await backend.names() == []


async def test_existing_raise_leaves_open_transaction_untouched(backend: Backend) -> None:
    db = backend.database(name="main")
    async with scope():
        session = await db.session()
        await insert(session, "earlier")
        with pytest.raises(TransactionAlreadyOpenError, match="'main'"):
            async with db.transaction(existing="raise"):
                pytest.fail("the block must not run")
        assert session.in_transaction()
        assert await backend.names() == []
    assert await backend.names() == ["earlier"]


async def test_existing_raise_without_open_transaction_runs(backend: Backend) -> None:
    db = backend.database()
    async with scope(), db.transaction(existing="raise") as session:
        await insert(session, "a")
    assert await backend.names() == ["a"]


async def test_decorator_runs_each_call_as_a_block(backend: Backend) -> None:
    db = backend.database()

    @db.transaction()
    async def add(name: str, *, fail: bool = False) -> str:
        await insert(await db.session(), name)
        if fail:
            raise Boom
        return name

    async with scope():
        assert await add("a") == "a"
        with pytest.raises(Boom):
            await add("b", fail=True)
        assert await add("c") == "c"
    assert await backend.names() == ["a", "c"]


async def test_hooks_run_for_block_commits_not_savepoints(backend: Backend) -> None:
    commits: list[AsyncSession] = []
    db = backend.database(after_commit=commits.append)
    async with scope():
        async with db.transaction() as session:
            await insert(session, "a")
        assert commits == [session]
        async with db.transaction(), db.transaction():  # outer block + savepoint
            await insert(session, "b")
        assert commits == [session, session], "the savepoint release is not a commit"


async def test_failed_block_commit_rolls_back_and_raises(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        with pytest.raises(DBAPIError):  # the driver's own error, unwrapped
            async with db.transaction() as session:
                await backend.doom(session)
        assert not session.in_transaction()
    assert await backend.names() == []


async def test_block_nested_before_any_statement_is_a_savepoint(backend: Backend) -> None:
    # On SQLite a savepoint before any write needs SQLAlchemy to send BEGIN (sqlite_begin).
    db = backend.database(sqlite_begin=True)
    async with scope():
        with pytest.raises(Boom):
            async with db.transaction():
                async with db.transaction() as session:  # no statement ran yet outside
                    await insert(session, "inner")
                assert await backend.names() == [], "the inner block must not commit"
                raise Boom
    assert await backend.names() == []


async def test_decorated_block_called_first_thing_in_a_block_nests(backend: Backend) -> None:
    db = backend.database(sqlite_begin=True)

    @db.transaction()
    async def add(name: str) -> None:
        await insert(await db.session(), name)

    async with scope():
        async with db.transaction():
            await add("a")
            assert await backend.names() == []
        assert await backend.names() == ["a"]


async def test_close_session_inside_block(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "outer")
        async with db.transaction():  # a savepoint
            await insert(session, "inner")
            await db.close_session()
    assert await backend.names() == ["inner", "outer"]


async def test_transaction_outside_scope(sqlite: Backend) -> None:
    db = sqlite.database()
    with pytest.raises(NoScopeError):
        async with db.transaction():
            pass


async def test_invalid_existing_value(sqlite: Backend) -> None:
    db = sqlite.database()
    with pytest.raises(ConfigurationError, match="'nest', 'commit', 'rollback', 'join', 'raise'"):
        db.transaction(existing="sometimes")  # type: ignore[arg-type]


async def test_block_object_cannot_be_entered_twice_at_once(sqlite: Backend) -> None:
    db = sqlite.database()
    block = db.transaction()
    async with scope(), block:
        with pytest.raises(RuntimeError, match="already in use"):
            async with block:
                pass


async def test_sqlite_without_sqlite_begin_commits_an_early_savepoint(sqlite: Backend) -> None:
    # Documents the driver behaviour that sqlite_begin=True exists for: with the default, a
    # SAVEPOINT sent before any write starts SQLite's transaction and its RELEASE commits.
    db = sqlite.database()
    async with scope():
        with pytest.raises(Boom):
            async with db.transaction():
                async with db.transaction() as session:
                    await insert(session, "escaped")
                raise Boom
    assert await sqlite.names() == ["escaped"]


def test_decorator_rejects_sync_functions(tmp_path: object) -> None:
    from sqla_context import Database

    db = Database("sqlite+aiosqlite://")
    with pytest.raises(TypeError, match="async functions only"):
        db.transaction()(lambda: None)  # type: ignore[arg-type]
