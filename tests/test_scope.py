"""scope(): commit modes, nesting, decorator, hooks, manual control, closed scopes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import (
    CommitError,
    ConfigurationError,
    NestedScopeError,
    NoScopeError,
    ScopeClosedError,
    SqlaContextError,
    scope,
)

from .conftest import Backend, Item, insert


class Boom(Exception):
    pass


async def test_success_commits_and_returns_connection(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        assert db.engine.pool.checkedout() == 0, "session creation must not connect"
        await insert(session, "a")
        assert db.engine.pool.checkedout() == 1
        assert await backend.names() == [], "not committed before the scope ends"
    assert await backend.names() == ["a"]
    assert db.engine.pool.checkedout() == 0


async def test_exception_rolls_back_and_propagates(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(Boom):
        async with scope():
            await insert(await db.session(), "a")
            raise Boom
    assert await backend.names() == []
    assert db.engine.pool.checkedout() == 0


async def test_same_session_at_any_depth(sqlite: Backend) -> None:
    db = sqlite.database()

    async def deep(n: int) -> AsyncSession:
        return await db.session() if n == 0 else await deep(n - 1)

    async with scope():
        top = await db.session()
        assert await deep(10) is top
        assert await asyncio.create_task(deep(3)) is top, "child tasks share the scope"


async def test_separate_scopes_get_separate_sessions(sqlite: Backend) -> None:
    db = sqlite.database()
    async with scope():
        first = await db.session()
    async with scope():
        assert await db.session() is not first


async def test_commit_always_commits_after_exception(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(Boom):
        async with scope(commit="always"):
            await insert(await db.session(), "kept")
            raise Boom
    assert await backend.names() == ["kept"]


async def test_commit_never_rolls_back_success(backend: Backend) -> None:
    db = backend.database()
    async with scope(commit="never"):
        await insert(await db.session(), "dropped")
    assert await backend.names() == []


async def test_orm_changes_are_flushed_and_committed(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        item = Item(name="orm")
        session.add(item)
        await db.commit()
        # A change after the early commit is only pending in the session; the scope must
        # still flush and commit it.
        item.name = "renamed"
        assert session.dirty
    assert await backend.names() == ["renamed"]


async def test_nested_scope_is_an_error_by_default(sqlite: Backend) -> None:
    db = sqlite.database()
    async with scope():
        await insert(await db.session(), "outer")
        with pytest.raises(NestedScopeError, match="nested='reuse'"):
            async with scope():
                pass
    assert await sqlite.names() == ["outer"], "the outer scope is unaffected"


async def test_nested_reuse_joins_and_leaves_ending_to_owner(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        outer = await db.session()
        await insert(outer, "a")
        async with scope(nested="reuse", commit="never"):
            assert await db.session() is outer
            await insert(await db.session(), "b")
        assert outer.in_transaction(), "the joined scope must not end the owner's transaction"
        assert await backend.names() == []
    assert await backend.names() == ["a", "b"]


async def test_nested_new_is_independent(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(Boom):
        async with scope():
            outer = await db.session()
            # Only a read here: SQLite allows a single writer at a time.
            await outer.execute(text("SELECT count(*) FROM items"))
            async with scope(nested="new"):
                inner = await db.session()
                assert inner is not outer
                await insert(inner, "inner")
            assert await backend.names() == ["inner"], "inner committed on its own"
            assert await db.session() is outer, "the outer scope is current again"
            await insert(outer, "outer")
            raise Boom
    assert await backend.names() == ["inner"]


async def test_decorator_runs_each_call_in_a_fresh_scope(backend: Backend) -> None:
    db = backend.database()
    seen: list[AsyncSession] = []

    @scope()
    async def job(name: str, *, fail: bool = False) -> str:
        session = await db.session()
        seen.append(session)
        await insert(session, name)
        if fail:
            raise Boom
        return name.upper()

    assert job.__name__ == "job"
    results = await asyncio.gather(job("a"), job("b"))
    assert results == ["A", "B"]
    with pytest.raises(Boom):
        await job("c", fail=True)
    assert len({id(s) for s in seen}) == 3
    assert await backend.names() == ["a", "b"]


async def test_decorator_rejects_sync_functions() -> None:
    def sync() -> None: ...

    with pytest.raises(TypeError, match="async functions only"):
        scope()(sync)  # type: ignore[arg-type]


async def test_scope_object_cannot_be_entered_twice_at_once(sqlite: Backend) -> None:
    s = scope()
    async with s:
        with pytest.raises(RuntimeError, match="already in use"):
            async with s:
                pass
    async with s:  # reusable once it has exited
        pass


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"commit": "sometimes"}, "'auto', 'always', 'never'"),
        ({"nested": "maybe"}, "'raise', 'reuse', 'new'"),
    ],
)
def test_invalid_options_name_the_allowed_values(kwargs: dict[str, str], allowed: str) -> None:
    with pytest.raises(ConfigurationError, match=allowed) as info:
        scope(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


async def test_session_outside_scope_says_how_to_fix(sqlite: Backend) -> None:
    db = sqlite.database(name="main")
    with pytest.raises(NoScopeError) as info:
        await db.session()
    message = str(info.value)
    assert "'main'" in message
    assert "SessionMiddleware" in message
    assert "scope()" in message
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, SqlaContextError)


async def test_manual_calls_outside_a_scope_do_nothing(sqlite: Backend) -> None:
    db = sqlite.database()
    await db.commit()
    await db.rollback()
    await db.close_session()
    assert db.engine.pool.checkedin() + db.engine.pool.checkedout() == 0, "never connected"


async def test_early_commit_is_visible_before_scope_exit(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(Boom):
        async with scope():
            session = await db.session()
            await insert(session, "early")
            await db.commit()
            assert await backend.names() == ["early"]
            await insert(session, "late")
            raise Boom
    assert await backend.names() == ["early"], "only the work after the commit is rolled back"


async def test_commit_without_transaction_is_a_noop(backend: Backend) -> None:
    db = backend.database()
    calls: list[str] = []
    async with scope(before_commit=lambda s: calls.append("before")):
        await db.session()
        await db.commit()
        assert db.engine.pool.checkedout() == 0
    assert calls == [], "no commit happened, so no hook ran"


async def test_early_rollback(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await insert(session, "undone")
        await db.rollback()
        await insert(session, "kept")
    assert await backend.names() == ["kept"]


async def test_close_session_commits_and_returns_connection(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        first = await db.session()
        await insert(first, "before-call")
        await db.close_session()
        assert db.engine.pool.checkedout() == 0, "connection returned before the slow call"
        assert await backend.names() == ["before-call"]
        second = await db.session()
        assert second is not first, "a fresh session after close_session()"
        await insert(second, "after-call")
    assert await backend.names() == ["after-call", "before-call"]


async def test_close_session_discards_with_commit_false(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        await insert(await db.session(), "discarded")
        await db.close_session(commit=False)
        assert db.engine.pool.checkedout() == 0
    assert await backend.names() == []


async def test_close_session_rolls_back_under_commit_never(backend: Backend) -> None:
    db = backend.database()
    async with scope(commit="never"):
        await insert(await db.session(), "x")
        await db.close_session()
    assert await backend.names() == []
    async with scope(commit="never"):
        await insert(await db.session(), "forced")
        await db.close_session(commit=True)
    assert await backend.names() == ["forced"]


async def test_close_session_commit_failure_raises_and_closes(backend: Backend) -> None:
    db = backend.database()
    async with scope():
        session = await db.session()
        await backend.doom(session)
        with pytest.raises(CommitError) as info:
            await db.close_session()
        assert info.value.failed == db.name
        assert db.engine.pool.checkedout() == 0
        assert await db.session() is not session
    assert await backend.names() == []


async def test_hooks_run_around_commits(backend: Backend) -> None:
    events: list[str] = []

    async def db_before(session: AsyncSession) -> None:
        events.append("db-before")

    db = backend.database(before_commit=db_before, after_commit=lambda s: events.append("db-after"))

    async def scope_after(session: AsyncSession) -> None:
        assert await backend.names() == ["h"], "after_commit sees committed data"
        events.append("scope-after")

    async with scope(
        before_commit=lambda s: events.append("scope-before"), after_commit=scope_after
    ):
        await insert(await db.session(), "h")
    assert events == ["db-before", "scope-before", "db-after", "scope-after"]


async def test_failing_before_commit_hook_rolls_back(backend: Backend) -> None:
    def refuse(session: AsyncSession) -> None:
        raise Boom("no")

    db = backend.database(before_commit=refuse)
    with pytest.raises(CommitError) as info:
        async with scope():
            await insert(await db.session(), "x")
    assert isinstance(info.value.__cause__, Boom)
    assert await backend.names() == []


async def test_failing_after_commit_hook_raises_but_data_is_committed(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(session: AsyncSession) -> None:
        raise Boom("after")

    db = backend.database(after_commit=explode)
    with caplog.at_level(logging.ERROR, logger="sqla_context"), pytest.raises(Boom):
        async with scope():
            await insert(await db.session(), "x")
    assert await backend.names() == ["x"]
    assert "after_commit hook failed" in caplog.text


async def test_commit_failure_at_exit_raises_commit_error(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database(name="main")
    with caplog.at_level(logging.ERROR, logger="sqla_context"), pytest.raises(CommitError) as info:
        async with scope():
            session = await db.session()
            await insert(session, "lost")
            await backend.doom(session)
    assert info.value.failed == "main"
    assert info.value.committed == []
    assert info.value.rolled_back == ["main"]
    assert info.value.__cause__ is not None
    assert "Commit failed for database 'main'" in str(info.value)
    # The caller gets the error: scope() itself logs nothing (logged once, by who handles it).
    assert caplog.text == ""
    # No SQL parameters and no server detail line (it quotes the row) in the message.
    assert "[parameters" not in str(info.value)
    assert "DETAIL" not in str(info.value)
    assert "999" not in str(info.value)
    assert await backend.names() == []


async def test_task_outliving_its_scope_gets_scope_closed_error(backend: Backend) -> None:
    db = backend.database()
    release = asyncio.Event()

    async def background() -> AsyncSession:
        await release.wait()
        return await db.session()

    async with scope():
        await insert(await db.session(), "a")
        task = asyncio.create_task(background())
    release.set()
    with pytest.raises(ScopeClosedError, match="already closed") as info:
        await task
    assert isinstance(info.value, SqlaContextError)
    assert await backend.names() == ["a"]


async def test_generator_resumed_after_scope_sees_no_scope(sqlite: Backend) -> None:
    db = sqlite.database()

    async def rows() -> object:
        yield await db.session()
        yield await db.session()

    async with scope():
        gen = rows().__aiter__()
        first = await gen.__anext__()
    # The generator runs in the caller's context; the scope there has ended.
    with pytest.raises(NoScopeError):
        await gen.__anext__()
    assert first is not None


async def test_context_copy_after_exit_raises_scope_closed(sqlite: Backend) -> None:
    import contextvars

    db = sqlite.database()
    async with scope():
        await db.session()
        ctx = contextvars.copy_context()
    # A task started from the copied context, as a framework's background task would be.
    task = ctx.run(asyncio.ensure_future, db.session())
    with pytest.raises(ScopeClosedError):
        await task


async def test_connection_of_a_failed_commit_is_not_reused_dirty(backend: Backend) -> None:
    # SQLite keeps the transaction open after a failed COMMIT; the pool must not hand that
    # connection, with its failed writes still pending, to the next scope.
    db = backend.database(engine_options={"pool_size": 1, "max_overflow": 0})
    with pytest.raises(CommitError):
        async with scope():
            await backend.doom(await db.session())
    async with scope():
        await insert(await db.session(), "next")
    assert await backend.names() == ["next"]
    async with scope():
        session = await db.session()
        await backend.doom(session)
        with pytest.raises(DBAPIError):  # the driver's error, as session.commit() raises it
            await db.commit()
        await insert(session, "after-direct-commit-failure")
    assert await backend.names() == ["after-direct-commit-failure", "next"]


async def test_session_still_in_use_at_exit_is_closed_once_free(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # gather() over the scope's one session (a user error): the first failure ends the
    # gather while another call is still checking out a connection, so the scope's close()
    # is refused. The connection must still go back to the pool once that call is over.
    from sqla_context._scope import _in_flight

    db = backend.database()

    async def query() -> None:
        await (await db.session()).execute(text("SELECT 1"))

    calls: list[asyncio.Future[None]] = []
    with caplog.at_level(logging.WARNING, logger="sqla_context"):
        with pytest.raises(InvalidRequestError, match="concurrent operations"):
            async with scope():
                calls.extend(asyncio.ensure_future(query()) for _ in range(3))
                await asyncio.gather(*calls)
        assert "still in use by another task" in caplog.text
        closing = list(_in_flight)
        assert closing, "the close was not retried"
        await asyncio.wait_for(asyncio.gather(*closing, *calls, return_exceptions=True), 10)
    assert db.engine.pool.checkedout() == 0
    assert "not closed" not in caplog.text
