"""on_commit(): callbacks that run once the scope's work is committed, and only then.

Every callback here checks, when it runs, that the row written with it is already visible
through the backend's witness engine (an independent connection): "after the commit" is
observed, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from sqla_context import (
    CommitError,
    ConfigurationError,
    Database,
    NoScopeError,
    on_commit,
    run_isolated,
    scope,
    testing,
)

from .conftest import Backend, Item, insert


class Boom(Exception):
    pass


class Witness:
    """Callbacks that record their label and whether their row was committed when they ran."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ran: list[str] = []
        self.uncommitted: list[str] = []  # labels whose row was not visible when they ran

    def sync(self, label: str) -> Callable[[], None]:
        def callback() -> None:
            self.ran.append(label)

        return callback

    def checked(self, label: str, row: str | None = None) -> Callable[[], Any]:
        async def callback() -> None:
            if row is not None and row not in await self.backend.names():
                self.uncommitted.append(label)
            self.ran.append(label)

        return callback

    async def write(self, db: Database, row: str, *, label: str | None = None) -> None:
        """Insert ``row`` in the scope's session for ``db`` and register a checked callback."""
        await insert(await db.session(), row)
        on_commit(self.checked(label or row, row))


async def assert_clean(backend: Backend, *databases: Database) -> None:
    for db in databases:
        assert db.engine.pool.checkedout() == 0, f"{db.name} leaked a connection"
    assert await backend.open_transactions(settle=True) == 0


# -- when they run ---------------------------------------------------------------------------


async def test_callbacks_run_after_the_commit_in_registration_order(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    pool_at_run: list[int] = []
    async with scope():
        await w.write(db, "a")
        on_commit(w.sync("sync"))
        await w.write(db, "b")
        on_commit(lambda: pool_at_run.append(db.engine.pool.checkedout()))
        assert w.ran == [], "nothing runs before the scope ends"
    assert w.ran == ["a", "sync", "b"]
    assert w.uncommitted == []
    assert pool_at_run == [0], "callbacks run once the connections are back in the pool"
    assert await backend.names() == ["a", "b"]
    await assert_clean(backend, db)


async def test_callbacks_run_after_the_after_commit_hooks_with_no_scope_active(
    backend: Backend,
) -> None:
    order: list[str] = []
    db = backend.database(after_commit=lambda s: order.append("db hook"))
    inner_rows: list[str] = []

    async def callback() -> None:
        order.append("callback")
        with pytest.raises(NoScopeError):  # the scope's sessions are not for callbacks
            await db.session()
        async with scope():  # a scope of its own works
            await insert(await db.session(), "from-callback")
        inner_rows.extend(await backend.names())

    async with scope(after_commit=lambda s: order.append("scope hook")):
        await insert(await db.session(), "x")
        on_commit(callback)
    # (the last "db hook" is the commit of the callback's own scope)
    assert order == ["db hook", "scope hook", "callback", "db hook"]
    assert inner_rows == ["from-callback", "x"]
    await assert_clean(backend, db)


async def test_functools_partial_and_decorated_function(sqlite: Backend) -> None:
    db = sqlite.database()
    seen: list[tuple[str, int]] = []

    @scope()
    async def job(n: int) -> None:
        await insert(await db.session(), f"job-{n}")
        on_commit(functools.partial(seen.append, ("job", n)))

    await job(1)
    await job(2)
    assert seen == [("job", 1), ("job", 2)]
    await assert_clean(sqlite, db)


async def test_a_scope_without_database_work_runs_its_callbacks(sqlite: Backend) -> None:
    ran: list[str] = []
    async with scope():
        on_commit(lambda: ran.append("x"))
    assert ran == ["x"]
    with contextlib.suppress(Boom):
        async with scope():
            on_commit(lambda: ran.append("y"))
            raise Boom
    assert ran == ["x"]


async def test_commit_always_runs_them_after_an_exception(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    with pytest.raises(Boom):
        async with scope(commit="always"):
            await w.write(db, "kept")
            raise Boom
    assert w.ran == ["kept"]
    assert w.uncommitted == []
    await assert_clean(backend, db)


# -- when they are dropped -------------------------------------------------------------------


async def test_a_rolled_back_scope_drops_them(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    with pytest.raises(Boom):
        async with scope():
            await w.write(db, "a")
            raise Boom
    async with scope(commit="never"):
        await w.write(db, "b")
    assert w.ran == []
    assert await backend.names() == []
    await assert_clean(backend, db)


async def test_a_cancelled_scope_drops_them(sqlite: Backend) -> None:
    db = sqlite.database()
    w = Witness(sqlite)
    registered = asyncio.Event()

    async def body() -> None:
        async with scope():
            await w.write(db, "a")
            registered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(registered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert w.ran == []
    assert await sqlite.names() == []
    await assert_clean(sqlite, db)


async def test_a_failed_commit_on_the_second_database_drops_all(backend: Backend) -> None:
    other = await backend.sibling()
    first, second = backend.database(name="first"), other.database(name="second")
    w = Witness(backend)
    with pytest.raises(CommitError) as info:
        async with scope():
            await w.write(first, "in-first")
            await other.doom(await second.session())
            on_commit(w.sync("after-doom"))
    assert info.value.committed == ["first"]
    assert w.ran == [], "the first database committed, but not every database did"
    assert await backend.names() == ["in-first"]
    assert await other.names() == []
    await assert_clean(backend, first)
    await assert_clean(other, second)


async def test_db_rollback_drops_what_was_registered_before_it(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "undone")
        await db.rollback()
        await w.write(db, "kept")
    assert w.ran == ["kept"]
    assert w.uncommitted == []
    assert await backend.names() == ["kept"]
    await assert_clean(backend, db)


async def test_close_session_without_commit_drops_them(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "undone")
        await db.close_session(commit=False)
    assert w.ran == []
    assert await backend.names() == []
    await assert_clean(backend, db)


async def test_a_failed_top_level_transaction_block_drops_them(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        with contextlib.suppress(Boom):
            async with db.transaction():
                await w.write(db, "undone")
                raise Boom
        await w.write(db, "kept")
    assert w.ran == ["kept"]
    assert await backend.names() == ["kept"]
    await assert_clean(backend, db)


# -- savepoints ------------------------------------------------------------------------------


async def test_savepoint_rules(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "outer")
        async with db.transaction():  # released: its callbacks stay
            await w.write(db, "released")
        with contextlib.suppress(Boom):
            async with db.transaction():  # rolled back: its callbacks go
                await w.write(db, "rolled-back")
                raise Boom
        async with db.transaction():
            await w.write(db, "level-1")
            with contextlib.suppress(Boom):
                async with db.transaction():
                    await w.write(db, "level-2-undone")
                    async with db.transaction():
                        await w.write(db, "level-3-undone")  # released into level 2, then lost
                    raise Boom
            await w.write(db, "level-1-after")
        with contextlib.suppress(Boom):
            async with db.transaction():
                await w.write(db, "outer-undone")
                async with db.transaction():
                    await w.write(db, "inner-released-then-outer-undone")
                raise Boom
        await w.write(db, "last")
    expected = ["outer", "released", "level-1", "level-1-after", "last"]
    assert w.ran == expected
    assert w.uncommitted == []
    assert await backend.names() == sorted(expected)
    await assert_clean(backend, db)


async def test_a_savepoint_whose_flush_failed_drops_its_callbacks(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "dup")
    async with scope():
        await w.write(db, "outer")
        async with db.transaction() as session:  # the block itself ends normally
            on_commit(w.sync("in-failed-savepoint"))
            session.add(Item(name="dup"))
            with pytest.raises(IntegrityError):
                await session.flush()
        with pytest.raises(IntegrityError):
            async with db.transaction() as session:  # the flush error leaves the block
                on_commit(w.sync("in-raising-savepoint"))
                session.add(Item(name="dup"))
                await session.flush()
        await w.write(db, "after")
    assert w.ran == ["dup", "outer", "after"]
    assert w.uncommitted == []
    assert await backend.names() == ["after", "dup", "outer"]
    await assert_clean(backend, db)


# -- early commits ---------------------------------------------------------------------------


async def test_early_commits_run_what_was_registered_so_far(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "a")
        await db.commit()
        assert w.ran == ["a"], "db.commit() committed the work: its callbacks ran"
        await w.write(db, "b")
        await db.close_session()
        assert w.ran == ["a", "b"]
        async with db.transaction():  # top level: commits at its end
            await w.write(db, "c")
        assert w.ran == ["a", "b", "c"]
        session = await db.session()
        await insert(session, "d")
        on_commit(w.checked("d", "d"))
        async with db.transaction(existing="commit"):  # commits "d" first
            assert w.ran == ["a", "b", "c", "d"]
            await w.write(db, "e")
        await w.write(db, "f")
    assert w.ran == ["a", "b", "c", "d", "e", "f"]
    assert w.uncommitted == []
    await assert_clean(backend, db)


async def test_committed_early_work_keeps_its_callbacks_when_the_scope_fails(
    backend: Backend,
) -> None:
    db = backend.database()
    w = Witness(backend)
    with pytest.raises(Boom):
        async with scope():
            await w.write(db, "committed")
            await db.close_session()  # e.g. before a slow external call
            await w.write(db, "lost")
            raise Boom
    assert w.ran == ["committed"]
    assert await backend.names() == ["committed"]
    await assert_clean(backend, db)


async def test_with_two_databases_they_wait_until_neither_has_uncommitted_work(
    backend: Backend,
) -> None:
    other = await backend.sibling()
    first, second = backend.database(name="first"), other.database(name="second")
    w = Witness(backend)
    async with scope():
        await insert(await second.session(), "s")
        await w.write(first, "f")
        await first.commit()
        assert w.ran == [], "second still has uncommitted work"
        await second.commit()
        assert w.ran == ["f"]
        await w.write(first, "g")
    assert w.ran == ["f", "g"]
    assert w.uncommitted == []
    assert await other.names() == ["s"]
    await assert_clean(backend, first)
    await assert_clean(other, second)


async def test_a_failed_db_commit_drops_them(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)
    async with scope():
        await w.write(db, "a")
        await backend.doom(await db.session())  # MariaDB: the connection is killed
        with pytest.raises(DBAPIError):
            await db.commit()
        await w.write(db, "b")
    assert w.ran == ["b"]
    assert await backend.names() == ["b"]
    await assert_clean(backend, db)


# -- failing callbacks -----------------------------------------------------------------------


async def test_a_failing_callback_is_logged_and_the_next_ones_run(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    w = Witness(backend)

    def broken() -> None:
        raise Boom("mail server down")

    async def broken_async() -> None:
        raise Boom("queue down")

    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with scope():  # no exception comes out: the data is committed
            await w.write(db, "a")
            on_commit(broken)
            on_commit(broken_async)
            on_commit(w.sync("after"))
    assert w.ran == ["a", "after"]
    failures = [r for r in caplog.records if "on_commit callback" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)
    assert "mail server down" in caplog.text
    assert "queue down" in caplog.text
    assert await backend.names() == ["a"]
    await assert_clean(backend, db)


async def test_raise_errors_raises_after_the_others_ran(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    w = Witness(backend)

    def broken(n: int) -> None:
        raise Boom(n)

    with caplog.at_level(logging.ERROR, logger="sqla_context"), pytest.raises(Boom) as info:
        async with scope():
            await w.write(db, "a")
            on_commit(functools.partial(broken, 1), raise_errors=True)
            on_commit(functools.partial(broken, 2), raise_errors=True)  # logged, not raised
            on_commit(w.sync("after"))
    assert info.value.args == (1,)
    assert w.ran == ["a", "after"]
    assert "Boom: 2" in caplog.text
    assert await backend.names() == ["a"], "the data stays committed"
    await assert_clean(backend, db)


async def test_raise_errors_from_db_commit(backend: Backend) -> None:
    db = backend.database()

    def broken() -> None:
        raise Boom

    async with scope():
        await insert(await db.session(), "a")
        on_commit(broken, raise_errors=True)
        with pytest.raises(Boom):
            await db.commit()
        await insert(await db.session(), "b")
    assert await backend.names() == ["a", "b"]
    await assert_clean(backend, db)


async def test_after_commit_hook_failure_still_runs_callbacks(backend: Backend) -> None:
    def failing_hook(session: Any) -> None:
        raise Boom("hook")

    db = backend.database(after_commit=failing_hook)
    w = Witness(backend)
    with pytest.raises(Boom, match="hook"):
        async with scope():
            await w.write(db, "a")
    assert w.ran == ["a"]
    await assert_clean(backend, db)


# -- scopes and errors -----------------------------------------------------------------------


async def test_outside_a_scope_it_raises(sqlite: Backend) -> None:
    with pytest.raises(NoScopeError, match="on_commit"):
        on_commit(lambda: None)
    with pytest.raises(ConfigurationError, match="callable"):
        async with scope():
            on_commit("not a function")  # type: ignore[arg-type]
    finished = asyncio.Event()

    async def late() -> None:
        await finished.wait()
        on_commit(lambda: None)

    async with scope():
        task = asyncio.create_task(late())
    finished.set()
    with pytest.raises(NoScopeError, match="already ended"):
        await task


async def test_joined_and_isolated_scopes(backend: Backend) -> None:
    db = backend.database()
    w = Witness(backend)

    async def isolated_work() -> None:
        await w.write(db, "isolated")

    with pytest.raises(Boom):
        async with scope():
            # Its own scope (first: SQLite would wait for the outer scope's write lock).
            await run_isolated(isolated_work)
            assert w.ran == ["isolated"], "ran at the end of its own scope"
            async with scope(nested="reuse"):  # joins: the outer scope decides
                await w.write(db, "joined")
            assert w.ran == ["isolated"]
            raise Boom
    assert w.ran == ["isolated"]
    assert await backend.names() == ["isolated"]
    await assert_clean(backend, db)


# -- random sequences against a model --------------------------------------------------------


class OnCommitMachine(RuleBasedStateMachine):
    """Builds one scope's program step by step; ``end`` runs it and checks the model.

    The model: callbacks wait in frames (the scope's, one per open savepoint); a released
    savepoint hands its frame to the enclosing one, a rolled-back one (raised, or a flush
    failed inside) drops it; an early commit runs everything pending, a rollback drops it;
    the scope's end runs what is left if it succeeds and drops it if it fails.
    """

    backend: Backend
    db: Database
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[tuple[str, Any]] = []
        self.frames: list[list[str]] = [[]]
        self.rows: list[list[str]] = [[]]  # rows written per frame, not yet committed
        self.committed: set[str] = {"dup"}
        self.tx_open = False  # the scope's session has a transaction
        self.expected: list[str] = []
        self.counter = 0
        self.run(self._reset())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _reset(self) -> None:
        async with self.backend.witness.begin() as conn:
            await conn.execute(text("DELETE FROM items"))
            await conn.execute(text("INSERT INTO items (name) VALUES ('dup')"))

    @rule(count=st.integers(1, 3))
    def register(self, count: int) -> None:
        for _ in range(count):
            self.counter += 1
            label = f"r{self.counter}"
            self.plan.append(("register", label))
            self.frames[-1].append(label)
            self.rows[-1].append(label)
        self.tx_open = True

    @precondition(lambda self: self.tx_open)  # so db.transaction() makes a savepoint
    @rule(count=st.integers(0, 2))
    def open_savepoint(self, count: int) -> None:
        self.plan.append(("open", None))
        self.frames.append([])
        self.rows.append([])
        if count:
            self.register(count)

    @precondition(lambda self: len(self.frames) > 1)
    @rule(how=st.sampled_from(["ok", "raise", "flush"]))
    def close_savepoint(self, how: str) -> None:
        self.plan.append(("close", how))
        frame, rows = self.frames.pop(), self.rows.pop()
        if how == "ok":
            self.frames[-1].extend(frame)
            self.rows[-1].extend(rows)

    @precondition(lambda self: len(self.frames) == 1)
    @rule(how=st.sampled_from(["commit", "close_session", "rollback"]))
    def early(self, how: str) -> None:
        self.plan.append(("early", how))
        if self.tx_open and how != "rollback":
            self.expected.extend(self.frames[0])
            self.committed.update(self.rows[0])
        # Callbacks are pending only while a transaction is open: none are left either way.
        self.frames, self.rows, self.tx_open = [[]], [[]], False

    @rule(ok=st.booleans())
    def end(self, ok: bool) -> None:
        while len(self.frames) > 1:
            self.close_savepoint("ok")
        if ok:
            self.expected.extend(self.frames[0])
            self.committed.update(self.rows[0])
        plan, self.plan = self.plan, []
        self.frames, self.rows, self.tx_open = [[]], [[]], False
        ran, uncommitted, names = self.run(self._execute(plan, ok))
        assert uncommitted == [], f"callbacks ran before their row was committed: {uncommitted}"
        assert ran == self.expected, f"plan {plan} ok={ok}"
        assert set(names) == self.committed
        self.expected = []

    def teardown(self) -> None:
        if self.plan or len(self.frames) > 1:
            self.end(True)

    async def _execute(self, plan: list[tuple[str, Any]], ok: bool) -> Any:
        db, w = self.db, Witness(self.backend)
        steps = iter(plan)

        async def body() -> str:
            for kind, arg in steps:
                if kind == "register":
                    await w.write(db, arg)
                elif kind == "open":
                    with contextlib.suppress(Boom, IntegrityError):
                        async with db.transaction() as session:
                            how = await body()
                            if how == "raise":
                                raise Boom
                            if how == "flush":
                                session.add(Item(name="dup"))
                                with contextlib.suppress(IntegrityError):
                                    await session.flush()
                elif kind == "close":
                    return str(arg)
                elif arg == "commit":
                    await db.commit()
                elif arg == "close_session":
                    await db.close_session()
                else:
                    await db.rollback()
            return "ok"

        with contextlib.suppress(Boom):
            async with scope():
                await body()
                if not ok:
                    raise Boom
        assert db.engine.pool.checkedout() == 0
        assert await self.backend.open_transactions(settle=True) == 0
        return w.ran, w.uncommitted, await self.backend.names()


@pytest.mark.timeout(300)
async def test_random_sequences_match_the_model(backend: Backend) -> None:
    loop = asyncio.get_running_loop()
    db = backend.database()
    machine = type("Machine", (OnCommitMachine,), {"backend": backend, "db": db, "loop": loop})
    config = settings(
        max_examples=60,
        stateful_step_count=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=config)


# -- sqla_context.testing --------------------------------------------------------------------


async def test_rollback_mode_runs_them_as_in_production(backend: Backend) -> None:
    db = backend.database()
    seen: list[list[str]] = []

    async def callback() -> None:  # reads through the isolation: sees the "committed" row
        async with scope():
            session = await db.session()
            seen.append(list(await session.scalars(text("SELECT name FROM items"))))

    async with testing.isolated(db):
        async with scope():
            await insert(await db.session(), "a")
            on_commit(callback)
        with contextlib.suppress(Boom):
            async with scope():
                on_commit(callback)
                raise Boom
    assert seen == [["a"]]
    assert await backend.names() == [], "rolled back at the end of the isolated block"
    await assert_clean(backend, db)


async def test_captured_on_commit_holds_them_back_until_run(backend: Backend) -> None:
    db = backend.database()
    ran: list[str] = []

    def broken() -> None:
        raise Boom("first")

    async with testing.isolated(db):
        with testing.captured_on_commit() as captured:
            async with scope():
                await insert(await db.session(), "a")
                on_commit(functools.partial(ran.append, "a"))
                with contextlib.suppress(Boom):
                    async with db.transaction():
                        on_commit(functools.partial(ran.append, "savepoint-undone"))
                        raise Boom
                on_commit(broken)
                on_commit(functools.partial(ran.append, "b"))
            with contextlib.suppress(Boom):
                async with scope():
                    on_commit(functools.partial(ran.append, "rolled-back"))
                    raise Boom
            assert ran == [], "captured, not run"
            assert len(captured) == 3
            first = captured.callbacks[0]
            assert isinstance(first, functools.partial)
            assert first.args == ("a",)
            assert captured.callbacks[1] is broken
            with pytest.raises(Boom, match="first"):  # raised, even without raise_errors
                await captured.run()
            assert ran == ["a", "b"], "the others ran before the failure was raised"
            assert len(captured) == 0
            await captured.run()  # nothing left: runs nothing twice
            assert ran == ["a", "b"]
        async with scope():  # the block has ended: callbacks run again
            on_commit(functools.partial(ran.append, "after"))
        assert ran == ["a", "b", "after"]
    await assert_clean(backend, db)


async def test_captures_nest_and_work_in_commit_mode(backend: Backend) -> None:
    db = backend.database()
    async with testing.isolated(db, mode="commit"):
        with testing.captured_on_commit() as outer:
            with testing.captured_on_commit() as inner:
                async with scope():
                    await insert(await db.session(), "a")
                    on_commit(print)
            async with scope():
                on_commit(print)
        assert (len(outer), len(inner)) == (1, 1)
        assert await backend.names() == ["a"]
    assert await backend.names() == []
