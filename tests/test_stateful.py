"""Random sequences of operations inside scopes, checked against a model of the committed rows.

A hypothesis ``RuleBasedStateMachine`` drives one scope at a time. The scope runs in a
task of its own (the *driver*) that executes commands sent to it: inserts, selects, ORM
flushes (some violating the primary key), child tasks, ``db.transaction()`` blocks with
each ``existing=`` mode, nested, left normally or by raising, ``db.commit()``,
``db.rollback()``, ``db.close_session()``. A scope ends by returning, by raising, or by
being cancelled while it waits or while a statement is in flight.

The model is the intended semantics (docs/concepts.md, docs/howto.md):

- a top-level ``db.transaction()`` block commits at its end and rolls back if it raises;
- a savepoint block (``existing="nest"`` inside an open transaction) that raises, or in
  which a flush failed and the caller caught the error, undoes only its own work: the
  outer transaction stays usable and the scope commits the rest;
- a scope that fails (exception, cancellation) commits nothing that ``db.commit()``,
  ``close_session()`` or a top-level block had not already committed.

After every scope the committed rows, read through the backend's witness engine, must
equal the model, no connection may be checked out and no transaction may be open on the
server. Every ``select`` also compares what the session sees with the model.

The machine runs in a worker thread (hypothesis is synchronous) and sends each step to
the test's event loop, so the backend fixture's engines stay on their own loop.

Settings come from the hypothesis profile ``sqla-context`` (registered below): a fixed
budget of examples (``EXAMPLES``) and ``derandomize=True``, so that CI runs the same
sequences every time and a failure reproduces. To look further:

- ``SQLA_CONTEXT_STATEFUL_EXAMPLES=500`` runs more examples per backend;
- ``SQLA_CONTEXT_STATEFUL_RANDOM=1`` draws new sequences on every run (no derandomize);
- ``SQLA_CONTEXT_STATEFUL_SHRINK=1`` lets hypothesis shrink a failure (slow).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from sqla_context import CommitError, Database, TransactionAlreadyOpenError, run_isolated, scope

from .conftest import Backend, Item

#: Bound of every single step; a step that takes longer is a hang, reported as a failure.
STEP_TIMEOUT = 15.0

#: Examples per backend in CI: about 3 s per server backend, 2 s on SQLite.
EXAMPLES = int(os.environ.get("SQLA_CONTEXT_STATEFUL_EXAMPLES", "15"))
RANDOM = os.environ.get("SQLA_CONTEXT_STATEFUL_RANDOM", "") not in ("", "0")
SHRINK = os.environ.get("SQLA_CONTEXT_STATEFUL_SHRINK", "") not in ("", "0")

settings.register_profile(
    "sqla-context",
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,  # real databases: step times vary with the machine's load
    derandomize=not RANDOM,
    database=None,  # no example database: a run depends on nothing left by an earlier one
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)

# "nest" twice: savepoints are where the interesting failures are.
MODES = ("nest", "nest", "commit", "rollback", "join", "raise")


class Boom(Exception):
    """The Python exception a block or a scope body raises."""


# -- the driver: one scope, running commands in a task of its own ----------------------------


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Command:
    kind: str
    args: tuple[Any, ...] = ()
    reply: asyncio.Future[Any] = field(default_factory=_future)


class _Leave(Exception):
    """Raised out of a block's body to leave it (``ok`` False: the block raises Boom)."""

    def __init__(self, command: Command, *, ok: bool) -> None:
        self.command, self.ok = command, ok


class Driver:
    """Runs ``async with scope():`` in a task and executes the commands it is sent."""

    def __init__(self, db: Database, doom: Any) -> None:
        self.db = db
        self.doom = doom
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        # Set to hold the scope's final commit in its before_commit hook (to cancel it
        # there); ``committing`` is set once it is held.
        self.hold_commit = False
        self.committing = asyncio.Event()
        self.task = asyncio.create_task(self._main())

    async def send(self, kind: str, *args: Any) -> Any:
        command = Command(kind, args)
        self.commands.put_nowait(command)
        return await asyncio.wait_for(asyncio.shield(command.reply), STEP_TIMEOUT)

    def post(self, kind: str, *args: Any) -> Command:
        """Send without waiting for the reply (to cancel the scope while it runs)."""
        command = Command(kind, args)
        self.commands.put_nowait(command)
        return command

    async def _main(self) -> None:
        async with scope(before_commit=self._before_commit):
            await self._serve(depth=0)

    async def _before_commit(self, session: Any) -> None:
        if self.hold_commit:
            self.committing.set()
            await asyncio.Event().wait()  # until the scope's task is cancelled

    async def _serve(self, depth: int) -> None:
        while True:
            command = await self.commands.get()
            if command.kind == "exit_ok":
                assert depth == 0
                command.reply.set_result(None)
                return
            if command.kind == "exit_raise":
                command.reply.set_result(None)
                raise Boom("scope body raised")
            if command.kind == "leave_ok":
                raise _Leave(command, ok=True)
            if command.kind == "leave_raise":
                raise _Leave(command, ok=False)
            if command.kind == "enter":
                await self._block(command, depth)
                continue
            try:
                result = await self._run(command)
            except Exception as exc:
                command.reply.set_result(exc)
            else:
                command.reply.set_result(result)
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                # The statement swallowed the cancellation (asyncmy can return normally
                # from a statement a cancellation interrupted). An app would go on to its
                # end: at the top level, do that, and the scope must roll back and raise
                # CancelledError; inside a block, stand for the driver and raise it.
                if depth == 0:
                    return
                raise asyncio.CancelledError

    async def _block(self, command: Command, depth: int) -> None:
        (mode,) = command.args
        leave: _Leave | None = None
        entered = False
        try:
            async with self.db.transaction(existing=mode):
                entered = True
                command.reply.set_result(None)
                try:
                    await self._serve(depth + 1)  # ends only by raising
                except _Leave as exc:
                    leave = exc
                if not leave.ok:
                    raise Boom("block raised")
        except Boom:
            if leave is None:  # the scope body raised inside this block: let it through
                raise
            leave.command.reply.set_result(None)
        except Exception as exc:
            if not entered:
                command.reply.set_result(exc)
            elif leave is not None:
                leave.command.reply.set_result(exc)  # the block's exit failed
            else:
                raise
        else:
            assert leave is not None
            leave.command.reply.set_result(None)

    async def _run(self, command: Command) -> Any:
        db = self.db
        args = command.args
        if command.kind == "insert":
            session = await db.session()
            await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": args[0]})
            return None
        if command.kind == "select":
            session = await db.session()
            rows = await session.execute(text("SELECT name FROM items ORDER BY name"))
            return [r[0] for r in rows]
        if command.kind == "flush":
            session = await db.session()
            item = Item(name=args[0])
            session.add(item)
            await session.flush()
            session.expunge(item)  # keep the identity map empty: a duplicate reaches the server
            return None
        if command.kind == "flush_duplicate":
            session = await db.session()
            session.add(Item(name=args[0]))
            try:
                await session.flush()
            except IntegrityError:
                if args[1]:  # outside a savepoint the transaction is lost: roll it back
                    await db.rollback()
                return "integrity-error"
            return "no-error"
        if command.kind == "child":

            async def child(name: str) -> list[str]:
                session = await db.session()  # the scope's session, seen from a child task
                await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
                rows = await session.execute(text("SELECT name FROM items ORDER BY name"))
                return [r[0] for r in rows]

            return await asyncio.create_task(child(args[0]))
        if command.kind == "isolated":

            async def write(name: str) -> None:
                session = await db.session()  # the isolated scope's own session
                await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})

            await run_isolated(write, args[0])
            return None
        if command.kind == "doom":
            await self.doom(await db.session())
            return None
        if command.kind == "hold_commit":
            self.hold_commit = True
            return None
        if command.kind == "commit":
            await db.commit()
            return None
        if command.kind == "rollback":
            await db.rollback()
            return None
        if command.kind == "close_session":
            await db.close_session()
            return None
        if command.kind == "idle":
            return None
        raise AssertionError(command.kind)


# -- the model ---------------------------------------------------------------------------------


@dataclass
class Frame:
    kind: str  # "top": a transaction block; "savepoint": a nested one
    names: list[str] = field(default_factory=list)  # savepoint: rows written inside it
    spoiled: bool = False  # savepoint: a flush failed in it (its work is already undone)


class Model:
    def __init__(self) -> None:
        self.committed: set[str] = set()
        self.reset_scope()

    def reset_scope(self) -> None:
        self.open = False  # the session has an open transaction
        self.outer: list[str] = []  # uncommitted rows of that transaction, outside savepoints
        self.frames: list[Frame] = []

    @property
    def savepoints(self) -> list[Frame]:
        return [f for f in self.frames if f.kind == "savepoint"]

    def visible(self) -> list[str]:
        live = set(self.committed) | set(self.outer)
        for frame in self.savepoints:
            live |= set(frame.names)
        return sorted(live)

    def write(self, name: str) -> None:
        self.open = True
        savepoints = self.savepoints
        (savepoints[-1].names if savepoints else self.outer).append(name)

    def commit(self) -> None:
        assert not self.savepoints
        self.committed |= set(self.outer)
        self.outer, self.open = [], False

    def rollback(self) -> None:
        assert not self.savepoints
        self.outer, self.open = [], False


# -- the state machine -------------------------------------------------------------------------


class ScopeMachine(RuleBasedStateMachine):
    backend: Backend
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.counter = 0
        self.run(self._clean())
        self.db = self.backend.database(sqlite_begin=True)
        self.driver: Driver | None = None
        self.start_scope()

    # plumbing

    def run(self, coroutine: Awaitable[Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        try:
            return future.result(STEP_TIMEOUT * 2)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError("a step did not finish in time (a hang)") from None

    async def _clean(self) -> None:
        async with self.backend.witness.begin() as conn:
            await conn.execute(text("DELETE FROM items"))

    def start_scope(self) -> None:
        async def start() -> Driver:
            return Driver(self.db, self.backend.doom)

        self.driver = self.run(start())
        self.model.reset_scope()

    def send(self, kind: str, *args: Any) -> Any:
        assert self.driver is not None
        return self.run(self.driver.send(kind, *args))

    def fresh_name(self) -> str:
        self.counter += 1
        return f"row-{self.counter:03d}"

    def check_ended(self) -> None:
        async def check() -> tuple[list[str], int, int]:
            return (
                await self.backend.names(),
                self.db.engine.pool.checkedout(),
                await self.backend.open_transactions(settle=True),
            )

        names, checked_out, open_transactions = self.run(check())
        assert names == sorted(self.model.committed), "committed rows differ from the model"
        assert checked_out == 0, "a connection is still checked out after the scope"
        assert open_transactions == 0, "a transaction is still open on the server"

    def teardown(self) -> None:
        try:
            if self.driver is not None and not self.driver.task.done():
                self.end_ok_unwinding()
        finally:

            async def dispose() -> None:
                if self.driver is not None and not self.driver.task.done():
                    self.driver.task.cancel()
                    await asyncio.gather(self.driver.task, return_exceptions=True)
                await self.db.dispose()

            self.run(dispose())

    @property
    def innermost_spoiled(self) -> bool:
        return bool(self.model.frames) and self.model.frames[-1].spoiled

    # session use

    @precondition(lambda self: not self.innermost_spoiled)
    @rule(how=st.sampled_from(["insert", "flush", "child"]))
    def write(self, how: str) -> None:
        """Insert a new row: a text INSERT, an ORM add + flush, or from a child task."""
        name = self.fresh_name()
        result = self.send(how, name)
        self.model.write(name)
        if how == "child":  # the child also read the table back, after its insert
            visible = self.model.visible()
            assert result == visible, f"the child task sees {result}, the model {visible}"
        else:
            assert result is None, result

    @precondition(lambda self: not self.innermost_spoiled)
    @rule()
    def select(self) -> None:
        seen = self.send("select")
        visible = self.model.visible()
        assert seen == visible, f"the session sees {seen}, the model {visible}"
        self.model.open = True

    @precondition(lambda self: not self.innermost_spoiled)
    @rule(pick=st.integers(0, 10_000))
    def flush_duplicate(self, pick: int) -> None:
        """Add a row whose primary key exists; the flush fails and the caller goes on."""
        visible = self.model.visible()
        if not visible:
            return
        name = visible[pick % len(visible)]
        in_savepoint = bool(self.model.savepoints)
        result = self.send("flush_duplicate", name, not in_savepoint)
        assert result == "integrity-error", result
        if in_savepoint:
            # Only the savepoint's work is undone; what follows is leaving the block.
            frame = self.model.frames[-1]
            assert frame.kind == "savepoint"
            frame.names.clear()
            frame.spoiled = True
        else:
            self.model.rollback()  # the caller rolled back: the transaction was lost

    @precondition(lambda self: not self.innermost_spoiled and len(self.model.frames) < 4)
    @rule(ok=st.booleans(), pick=st.integers(0, 10_000))
    def failed_flush_in_savepoint(self, ok: bool, pick: int) -> None:
        """The documented savepoint pattern, as one step (random steps rarely compose it).

        Inside an open transaction: a ``db.transaction()`` block (a SAVEPOINT) writes a row,
        a flush in it fails on a duplicate key, the caller catches the IntegrityError, and
        the block is left normally or by raising. Only the block's row may be undone.
        """
        if not self.model.open:
            self.write("insert")
        self.enter_block("nest")
        assert self.model.frames[-1].kind == "savepoint"
        self.write("insert")
        self.flush_duplicate(pick)
        self.leave_block(ok=ok)

    @precondition(lambda self: not self.model.open)
    @rule()
    def isolated_write(self) -> None:
        """``run_isolated()`` writes and commits on a connection of its own, at once.

        Only while the scope has no open transaction: SQLite allows one writer (the
        isolated COMMIT would wait for the scope's lock), and MariaDB's REPEATABLE READ
        snapshot would hide the row from the scope's open transaction.
        """
        name = self.fresh_name()
        assert self.send("isolated", name) is None
        self.model.committed.add(name)

    # explicit transaction control

    @precondition(lambda self: not self.model.savepoints)
    @rule(kind=st.sampled_from(["commit", "rollback", "close_session"]))
    def end_transaction(self, kind: str) -> None:
        """``db.commit()``, ``db.rollback()`` or ``db.close_session()`` (outside blocks)."""
        if kind == "close_session" and self.model.frames:
            kind = "commit"
        assert self.send(kind) is None
        if kind == "rollback":
            self.model.rollback()
        else:
            self.model.commit()

    # transaction blocks

    @precondition(lambda self: not self.innermost_spoiled and len(self.model.frames) < 4)
    @rule(mode=st.sampled_from(MODES))
    def enter_block(self, mode: str) -> None:
        model = self.model
        if model.open and mode in ("commit", "rollback", "join") and model.savepoints:
            mode = "nest"  # ending the outer transaction under a savepoint is left undefined
        result = self.send("enter", mode)
        if not model.open:
            assert result is None, result
            model.frames.append(Frame("top"))
            model.open = True
        elif mode == "raise":
            assert isinstance(result, TransactionAlreadyOpenError), result
        else:
            assert result is None, result
            if mode == "nest":
                model.frames.append(Frame("savepoint"))
            else:
                if mode == "commit":
                    model.commit()
                elif mode == "rollback":
                    model.rollback()
                model.frames.append(Frame("top"))
                model.open = True

    @precondition(lambda self: bool(self.model.frames))
    @rule(ok=st.booleans())
    def leave_block(self, ok: bool) -> None:
        """Leave the innermost block normally, or by raising Boom out of it."""
        result = self.send("leave_ok" if ok else "leave_raise")
        assert result is None, f"leaving the block ({ok=}) raised {result!r}"
        self._left(ok=ok)

    def _left(self, *, ok: bool) -> None:
        model = self.model
        frame = model.frames.pop()
        if frame.kind == "savepoint":
            if ok:
                savepoints = model.savepoints
                (savepoints[-1].names if savepoints else model.outer).extend(frame.names)
            return
        if ok:
            model.commit()
        else:
            model.rollback()

    # the end of the scope

    @rule(
        how=st.sampled_from(["ok", "raise", "cancel"]),
        during=st.sampled_from(["idle", "insert", "select", "child", "nest"]),
        turns=st.integers(0, 12),
    )
    def end_scope(self, how: str, during: str, turns: int) -> None:
        """End the scope: return (after leaving its blocks), raise, or cancel its task.

        A cancellation lands while the scope waits for its next command, or ``turns``
        loop turns after a statement was sent to it (possibly while it is in flight).
        """
        if how == "ok":
            self.end_ok_unwinding()
            return
        if how == "raise":
            assert self.send("exit_raise") is None
            self._await_end(expect=Boom)
        else:
            self._cancel(during, turns)
            self._await_end(expect=asyncio.CancelledError)
        self.check_ended()
        self.start_scope()

    @rule()
    def end_scope_commit_fails(self) -> None:
        """The scope's COMMIT fails at the server (``Backend.doom``): CommitError, and
        nothing of its open transaction is committed; earlier commits stay."""
        while self.model.frames:
            self.leave_block(ok=True)
        assert self.send("doom") is None
        assert self.send("exit_ok") is None
        self._await_end(expect=CommitError)
        self.model.rollback()
        self.check_ended()
        self.start_scope()

    @rule()
    def end_scope_cancelled_while_committing(self) -> None:
        """The scope is cancelled in its before_commit hook: the COMMIT is never sent, its
        open transaction is rolled back (docs/concepts.md, "Cancellation")."""
        while self.model.frames:
            self.leave_block(ok=True)
        if not self.model.open:  # make sure there is something to commit
            self.write("insert")
        assert self.send("hold_commit") is None
        driver = self.driver
        assert driver is not None
        assert self.send("exit_ok") is None

        async def cancel() -> None:
            await asyncio.wait_for(driver.committing.wait(), STEP_TIMEOUT)
            driver.task.cancel()

        self.run(cancel())
        self._await_end(expect=asyncio.CancelledError)
        self.model.rollback()
        self.check_ended()
        self.start_scope()

    def end_ok(self) -> None:
        assert self.send("exit_ok") is None
        self._await_end(expect=None)
        self.model.commit()
        self.check_ended()
        self.start_scope()

    def end_ok_unwinding(self) -> None:
        while self.model.frames:
            self.leave_block(ok=True)
        self.end_ok()

    def _cancel(self, during: str, turns: int) -> None:
        if self.innermost_spoiled:
            during = "idle"
        driver = self.driver
        assert driver is not None

        async def cancel() -> None:
            if during == "nest":
                driver.post("enter", "nest")
            elif during in ("insert", "child"):
                driver.post(during, self.fresh_name())
            elif during == "select":
                driver.post("select")
            for _ in range(turns):
                await asyncio.sleep(0)
            driver.task.cancel()

        self.run(cancel())

    def _await_end(self, expect: type[BaseException] | None) -> None:
        driver = self.driver
        assert driver is not None
        self.driver = None

        async def wait() -> BaseException | None:
            done, _ = await asyncio.wait({driver.task}, timeout=STEP_TIMEOUT)
            if not done:
                raise AssertionError("the scope did not end in time (a hang)")
            if driver.task.cancelled():
                return asyncio.CancelledError()
            return driver.task.exception()

        outcome = self.run(wait())
        if expect is None:
            assert outcome is None, f"the scope's exit raised {outcome!r}"
        else:
            assert isinstance(outcome, expect), f"expected {expect.__name__}, got {outcome!r}"

    @invariant()
    def driver_alive(self) -> None:
        if self.driver is not None:
            assert not self.driver.task.done(), "the scope's task ended on its own"


# Every backend: SQLite (a file), PostgreSQL through both drivers, MariaDB.
@pytest.mark.timeout(max(120, EXAMPLES * 10))
async def test_random_scopes_match_the_model(backend: Backend) -> None:
    loop = asyncio.get_running_loop()
    machine = type("Machine", (ScopeMachine,), {"backend": backend, "loop": loop})
    config = settings.get_profile("sqla-context")
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=config)
