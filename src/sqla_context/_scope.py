"""The unit of work behind every scope: one session per Database, held in a ContextVar.

Every integration (``scope()``, the ASGI, aiohttp, FastStream and taskiq middlewares)
drives the same ``_Unit`` through the same steps::

    unit = _Unit()
    token = unit.enter()                             # the current scope in this context
    await unit.end(failed=..., close=False)          # optional: end the transactions early
    await unit.end(failed=...)                       # commit or roll back, close every session
    unit.exit(token)                                 # restore the context

Ending runs inline, in the task and context of the code that ends the unit, so that commit
hooks see what the scope's code sees. Only when a cancellation interrupts it does the rest
(rolling back and closing what is still open) move to a task of its own, which the
cancelled code waits for, bounded, before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from threading import get_ident
from typing import TYPE_CHECKING, Any, get_args, overload

from sqlalchemy.exc import IllegalStateChangeError
from sqlalchemy.ext.asyncio import AsyncSession

from ._aiosqlite import statement_idle
from ._retry import Retry, as_retry, call_retrying
from ._typing import CommitCallback, CommitMode, NestedMode, P, R, SessionHook
from .exceptions import CommitError, ConfigurationError, NestedScopeError, NoScopeError

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["on_commit", "run_isolated", "scope"]

_log = logging.getLogger("sqla_context")

#: How long ending a unit waits for work it cannot interrupt: a statement another task is
#: still running on a session, or the rest of the clean-up after a cancellation.
_FINISH_TIMEOUT = 30.0

# Holds the mutable unit, never the session itself: a task created inside the scope gets
# a *copy* of the context, and the copy must still point at the same unit.
_current: ContextVar[_Unit | None] = ContextVar("sqla_context.scope", default=None)

# Strong references to clean-ups running in the background, so that one whose waiter was
# cancelled is not garbage-collected half-way through a ROLLBACK.
_in_flight: set[asyncio.Task[None]] = set()

#: An ``on_commit()`` registration: the callback and its ``raise_errors``.
_Entry = tuple[CommitCallback, bool]

# Opened by sqla_context.testing.captured_on_commit(): while one is open, the callbacks of
# work that committed go to the innermost list instead of running. Process-wide, not a
# ContextVar, so that apps run in another thread (TestClient) are captured too.
_captures: list[list[_Entry]] = []

# Observation (sqla_context._observe): True while telemetry is instrumented; the DEBUG logs
# of logger ``sqla_context.scope`` switch it on too. Checked once per Database a unit opens
# a session for, never on the ``await db.session()`` path that finds the session.
_observing = False
_scope_log = logging.getLogger("sqla_context.scope")


def check_choice(option: str, value: object, choices: object) -> None:
    """Raise ConfigurationError unless ``value`` is one of the Literal ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigurationError(
            f"{option}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}"
        )


def check_hook(option: str, hook: object) -> None:
    """Raise ConfigurationError unless ``hook`` is None or callable."""
    if hook is not None and not callable(hook):
        raise ConfigurationError(f"{option} must be a callable or None, got {hook!r}")


class _Unit:
    """The sessions of one scope. Mutable, shared by every task that copied the context.

    ``failed`` is set by an integration that learns the work failed although the code
    around the unit goes on normally (a web framework turned the handler's exception into
    a response): the unit then rolls back whatever ``end()`` is told.
    """

    __slots__ = (
        "after_commit",
        "before_commit",
        "callbacks",
        "closed",
        "commit",
        "failed",
        "locks",
        "on_session",
        "owner",
        "pending",
        "routes",
        "sessions",
        "source",
        "thread",
        "watch",
        "wrote",
    )

    def __init__(
        self,
        commit: CommitMode = "auto",
        before_commit: SessionHook | None = None,
        after_commit: SessionHook | None = None,
        source: object = None,
    ) -> None:
        self.commit: CommitMode = commit
        self.before_commit = before_commit
        self.after_commit = after_commit
        self.sessions: dict[Database, AsyncSession] = {}
        # Created on demand, only while a Database's async before_session hook runs.
        self.locks: dict[Database, asyncio.Lock] | None = None
        # Called once a session is added (an integration that watches units with sessions).
        self.on_session: Callable[[], None] | None = None
        # The task that made the unit current (enter()): the one that ends it. For a unit
        # never entered, the task that opened its first session.
        self.owner: asyncio.Task[Any] | None = None
        # How many cancellations of the owner were pending when the first session was
        # opened (see cancel_lost()); None before.
        self.pending: int | None = None
        self.closed = False
        self.failed = False
        # on_commit() callbacks waiting for the commit: a list of frames, the scope's own
        # first, then one per savepoint block still open (see savepoint_begun()). None
        # until the first callback or savepoint: most units have neither.
        self.callbacks: list[list[_Entry]] | None = None
        # Read routing (sqla_context._replicas), created on first need: where each primary's
        # read_session() goes in this scope, and the primaries this scope wrote to.
        self.routes: dict[Database, Database] | None = None
        self.wrote: set[Database] | None = None
        # Sessions and connections belong to the event loop they were made in, and a thread
        # runs one loop at a time: the unit serves the thread it was made in. (The thread,
        # not the loop: get_ident() costs a fraction of get_running_loop() on Python 3.11,
        # and Database.session() checks it on every call; see benchmarks/README.md.)
        self.thread = get_ident()
        # What the unit serves (an ASGI scope, a job's message, a function), named only
        # when a log line or a span needs it (sqla_context._observe.unit_name).
        self.source = source
        # A sqla_context._observe.Watch once the unit opened a session while observed.
        self.watch: Any = None

    def add(self, db: Database, session: AsyncSession) -> AsyncSession:
        """Hold ``session`` as this unit's session for ``db``; tell ``on_session``."""
        self.sessions[db] = session
        if self.pending is None:
            if self.owner is None:
                self.owner = asyncio.current_task()
            if self.owner is not None:
                # The owner's count, also when a child task opens the first session: a
                # cancellation of the owner that a child's statement swallowed is seen.
                self.pending = self.owner.cancelling()
        if self.on_session is not None:
            self.on_session()
        if self.watch is not None or _observing or _scope_log.isEnabledFor(logging.DEBUG):
            from ._observe import session_added

            session_added(self, db)
        return session

    def cancel_lost(self) -> bool:
        """Whether the task is ending this unit normally although it was cancelled meanwhile.

        A cancellation requested after the unit's first session and never undone
        (``Task.uncancel()``, as ``asyncio.timeout()`` and TaskGroups do) means the
        ``CancelledError`` was swallowed on the way: measured with asyncmy, which can
        return normally from a statement that a cancellation interrupted. The unit must
        then not commit. (A scope opened after the cancellation, e.g. clean-up code in an
        ``except CancelledError:`` block, is measured from its own start.)
        """
        task = self.owner
        if self.pending is None or task is None:
            return False
        return asyncio.current_task() is task and task.cancelling() > self.pending

    def enter(self) -> Token[_Unit | None]:
        """Make this unit the current scope of the running context (its task owns it)."""
        self.owner = asyncio.current_task()
        return _current.set(self)

    @staticmethod
    def exit(token: Token[_Unit | None]) -> None:
        """Restore the context as it was before ``enter()``."""
        # ValueError: reset in another context than the one enter() ran in (a fixture whose
        # setup and teardown run in different tasks). The unit is closed by end() anyway,
        # so that context reads as having no open scope. (Not contextlib.suppress: this
        # runs on every request, and it costs an object.)
        try:  # noqa: SIM105
            _current.reset(token)
        except ValueError:
            pass

    def is_current(self) -> bool:
        """True while this unit is open and may be used from the running thread's loop."""
        return not self.closed and self.thread == get_ident()

    # -- on_commit() callbacks -------------------------------------------------------------

    def add_callback(self, entry: _Entry) -> None:
        """Register ``entry`` in the innermost open savepoint block (or the scope itself)."""
        if self.callbacks is None:
            self.callbacks = [[]]
        self.callbacks[-1].append(entry)

    def savepoint_begun(self) -> list[_Entry]:
        """Open a frame for the callbacks registered inside a savepoint block; return it."""
        if self.callbacks is None:
            self.callbacks = [[]]
        frame: list[_Entry] = []
        self.callbacks.append(frame)
        return frame

    def savepoint_ended(self, frame: list[_Entry], *, released: bool) -> None:
        """Close ``frame``: hand its callbacks to the enclosing level, or drop them.

        Frames opened inside it and not closed yet end with it. A frame that is gone (an
        early commit or rollback meanwhile ran or dropped every pending callback) is left
        alone: what was registered after that belongs to the transaction that followed.
        """
        frames = self.callbacks
        if frames is None:
            return
        for index in range(len(frames) - 1, 0, -1):
            if frames[index] is frame:  # identity: empty frames are all equal
                inner = [entry for f in frames[index:] for entry in f]
                del frames[index:]
                if released:
                    frames[-1].extend(inner)
                return

    def drop_callbacks(self) -> None:
        """Forget every pending callback: the work they were registered with is rolled back."""
        if self.callbacks is not None:
            self.callbacks = None

    def in_transaction(self) -> bool:
        """Whether any session of the unit has work that is not committed yet."""
        return any(session.in_transaction() for session in self.sessions.values())

    async def committed(self) -> None:
        """Run the pending callbacks, now that everything they were registered with is committed.

        Handed to the innermost capture instead, if one is open (sqla_context.testing).

        Raises:
            Exception: the first exception of a callback registered with ``raise_errors``.
        """
        frames, self.callbacks = self.callbacks, None
        entries = [entry for frame in frames for entry in frame] if frames else []
        if not entries:
            return
        if _captures:
            _captures[-1].extend(entries)
            return
        await run_callbacks(entries)

    # -- ending ----------------------------------------------------------------------------

    async def end(self, *, failed: bool, close: bool = True) -> None:
        """Commit (unless ``failed``, see ``commit``) or roll back every session.

        With ``close`` (the default) the sessions are then closed for good and the unit
        is closed: asking it for a session raises ScopeClosedError, and a session object
        kept from it raises if used again. Without ``close`` the transactions end and
        the connections go back to the pool, but the sessions stay in the unit, usable:
        work done with them afterwards is ended by the next ``end()``.

        Once every session is committed and its connection released, the ``on_commit()``
        callbacks run (outside the scope: the unit is no longer current while they run).
        A rollback, a failed commit or a cancellation drops them.

        Raises:
            CommitError: a commit failed; everything not committed was rolled back.
            Exception: an ``after_commit`` hook's, or a callback's registered with
                ``raise_errors``, once everything is committed and released.
        """
        commit = self.commit == "always" or (
            self.commit == "auto" and not failed and not self.failed
        )
        lost = commit and self.commit == "auto" and self.cancel_lost()
        if lost:
            _log.warning(
                "the task was cancelled but the cancellation did not reach the scope's end"
                " (swallowed, e.g. by a database driver): rolling back instead of committing"
            )
            commit = False
        sessions = list(self.sessions.items())
        if not sessions:  # nothing was opened: no I/O
            self.closed = self.closed or close
            if self.watch is not None:  # its sessions were closed early
                self.watch.ended(self, commit=commit, failed=failed, close=close, error=None)
            if self.callbacks is not None:  # registered, but no database work to commit
                if commit:
                    await self.committed()
                else:
                    self.callbacks = None
            return
        discard: set[AsyncSession] = set()  # sessions whose COMMIT failed or was cut short
        hook_failure: Exception | None = None
        error: BaseException | None = None
        try:
            if commit:
                hook_failure = await _commit_all(self, sessions, discard)
        except BaseException as exc:
            error = exc
            self.drop_callbacks()  # not everything was committed
            raise
        finally:
            if close:
                self.closed = True
                self.sessions.clear()
            try:
                await _release_all(sessions, close=close, discard=discard)
            finally:
                if self.watch is not None:  # after the release: the connections are back
                    self.watch.ended(self, commit=commit, failed=failed, close=close, error=error)
        if self.callbacks is not None:
            if commit:
                try:
                    await self.committed()
                except Exception:
                    if hook_failure is None:
                        raise
                    _log.error("on_commit callback failed", exc_info=True)
            else:
                self.callbacks = None
        if lost:
            raise asyncio.CancelledError("cancelled (the cancellation had been swallowed)")
        if hook_failure is not None:
            raise hook_failure


async def run_callbacks(entries: list[_Entry], *, raise_all: bool = False) -> None:
    """Call each callback in order, awaiting awaitables, with no scope active.

    A failing callback does not stop the next ones. Its exception is logged (ERROR, with
    the traceback), except the first one of a callback registered with ``raise_errors``
    (of any, with ``raise_all``), which is raised once all have run.
    """
    token = _current.set(None)  # they run after the scope's work: not inside the scope
    first: Exception | None = None
    try:
        for callback, raise_errors in entries:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                if (raise_errors or raise_all) and first is None:
                    first = exc
                    continue
                _log.error(
                    "on_commit callback %r failed (its work is committed); going on with the"
                    " next callback",
                    callback,
                    exc_info=True,
                )
    finally:
        _current.reset(token)
    if first is not None:
        raise first


def on_commit(callback: CommitCallback, /, *, raise_errors: bool = False) -> None:
    """Call ``callback()`` once the current scope's work is committed; never if it is not.

    Use it for side effects that must follow the data, never precede it: send the mail,
    enqueue the job, invalidate the cache. ``callback`` takes no arguments (use
    ``functools.partial`` or a lambda to pass some); it may be a plain function or an async
    one (an awaitable it returns is awaited). Callbacks run in the order they were
    registered, in the scope's task, after the commit hooks and once the connections are
    back in the pool, with no scope active: to use the database, open a scope of their own.

    When: at the end of the scope, once every database of the scope has committed. An
    earlier commit this library makes (``db.commit()``, ``db.close_session()``, a top-level
    ``db.transaction()`` block) runs the callbacks registered so far if it leaves no
    session of the scope with uncommitted work. They are dropped when the scope rolls back,
    when a commit fails, when ``db.rollback()`` (or another rollback by this library) rolls
    back work, and, for those registered inside a ``db.transaction()`` savepoint, when that
    savepoint is rolled back. See the "Hooks and callbacks" page of the docs.

    Args:
        callback: called with no arguments; sync or async.
        raise_errors: ``False`` (default): an exception of the callback is logged (ERROR,
            logger ``sqla_context``, with the traceback) and the next callback runs, since
            the data is committed whatever the callback does. ``True``: the exception is
            raised where the scope's work was committed (from the ``async with scope():``
            block's exit, ``db.commit()``, the middleware), after the other callbacks ran.

    Raises:
        ConfigurationError: ``callback`` is not callable.
        NoScopeError: no scope is active (a scope that has ended counts as none).
    """
    if not callable(callback):
        raise ConfigurationError(f"on_commit() needs a callable, got {callback!r}")
    unit = _current.get()
    if unit is None:
        raise NoScopeError(None, what="on_commit() needs an active scope; none is active.")
    if unit.closed:
        raise NoScopeError(
            None,
            what="on_commit() was called in a scope that has already ended (code that "
            "outlived its scope), so the callback would never run.",
        )
    unit.add_callback((callback, raise_errors))


async def call_hooks(session: AsyncSession, *hooks: SessionHook | None) -> None:
    """Call each hook that is set with ``session``, awaiting those that return awaitables."""
    for hook in hooks:
        if hook is not None:
            result = hook(session)
            if inspect.isawaitable(result):
                await result


async def commit_session(db: Database, unit: _Unit | None, session: AsyncSession) -> None:
    """Commit with the Database's and the scope's hooks around it (errors propagate as-is).

    Runs the scope's pending ``on_commit()`` callbacks afterwards if no session of the
    scope has uncommitted work left; drops them if the COMMIT itself failed. A read-only
    Database never commits: its transaction is rolled back instead, without hooks.
    """
    if db.read_only:
        await session.rollback()
        return
    discard: set[AsyncSession] = set()
    try:
        await _commit(db, session, unit.before_commit if unit else None, discard)
    except BaseException:
        if discard:  # the caller may go on with the session: keep it, drop its connection
            if unit is not None:
                unit.drop_callbacks()
            await _discard(db, session, keep=True)
        raise
    await call_hooks(session, db.after_commit, unit.after_commit if unit else None)
    if unit is not None and unit.callbacks is not None and not unit.in_transaction():
        await unit.committed()


async def _commit(
    db: Database, session: AsyncSession, before: SessionHook | None, discard: set[AsyncSession]
) -> None:
    """Run the before_commit hooks, wait for statements still running, then COMMIT.

    A COMMIT that failed or was interrupted leaves its connection in an unknown state:
    ``session`` is then added to ``discard``.
    """
    await call_hooks(session, db.before_commit, before)
    await _statements_done(session)
    try:
        await session.commit()
    except BaseException:
        discard.add(session)
        raise


async def _commit_all(
    unit: _Unit, sessions: list[tuple[Database, AsyncSession]], discard: set[AsyncSession]
) -> Exception | None:
    """Commit each session in turn, with the hooks; stop at the first failure.

    Returns the first exception of an ``after_commit`` hook (every session is committed
    then), for the caller to raise once it has released the sessions.
    """
    committed: list[str] = []
    hook_failure: Exception | None = None
    for index, (db, session) in enumerate(sessions):
        if not session.in_transaction() or db.read_only:  # read-only: rolled back below
            continue
        try:
            await _commit(db, session, unit.before_commit, discard)
        except Exception as exc:
            rest = [d.name for d, s in sessions[index + 1 :] if s.in_transaction()]
            rest += [d.name for d, s in sessions[:index] if d.read_only and s.in_transaction()]
            raise CommitError(db.name, committed, [db.name, *rest], exc) from exc
        committed.append(db.name)
        try:
            # A failing after_commit hook must not stop the other databases from
            # committing: it is raised once all are done.
            await call_hooks(session, db.after_commit, unit.after_commit)
        except Exception as exc:
            _log.error("after_commit hook failed for database %r", db.name, exc_info=True)
            hook_failure = hook_failure or exc
    return hook_failure


async def _release_all(
    sessions: list[tuple[Database, AsyncSession]], *, close: bool, discard: set[AsyncSession]
) -> None:
    """Roll back what is still open in ``sessions`` (and close them), whatever happens."""
    for index, (db, session) in enumerate(sessions):
        try:
            await _release(db, session, close=close, discard=session in discard)
        except asyncio.CancelledError:
            rest = sessions[index:]  # this one may be half-done: release it again
            await _wait_after_cancel(_release_rest(rest, close=close, discard=discard))
            raise


async def _release_rest(
    sessions: list[tuple[Database, AsyncSession]], *, close: bool, discard: set[AsyncSession]
) -> None:
    for db, session in sessions:
        await _release(db, session, close=close, discard=session in discard)


async def _release(db: Database, session: AsyncSession, *, close: bool, discard: bool) -> None:
    """End ``session``'s transaction (and close it); never leave its connection checked out.

    ``discard``: its COMMIT failed or was interrupted, so its connection is in an unknown
    state (SQLite even keeps a transaction open after a failed COMMIT, which the pool would
    hand to the next user). It is invalidated: closed, never returned to the pool.
    """
    later = False
    try:
        if discard:
            await _discard(db, session, keep=not close)
            return
        if not close and not session.in_transaction():
            return  # committed: its connection is back in the pool already
        connections = await _statements_done(session)
        try:
            if not close:
                await session.rollback()
            elif session.in_transaction() or type(session).close is not AsyncSession.close:
                await session.close()
            else:
                # No transaction, so no connection: closing does no I/O. Called directly:
                # AsyncSession.close()'s greenlet costs as much again (benchmarks/README.md).
                session.sync_session.close()
        except IllegalStateChangeError:
            # Another task is in the middle of an operation on this session that has no
            # connection yet (a checkout: code that gather()s over the scope's one session).
            # SQLAlchemy signals no end of it: close once it is over.
            _log.warning(
                "the session of database %r is still in use by another task (one session"
                " must not run two operations at once); closing it in the background",
                db.name,
                exc_info=True,
            )
            later = close
            _in_background(_close_later(db, session))
        except Exception:
            _log.warning(
                "ending the session of database %r failed; discarding its connection",
                db.name,
                exc_info=True,
            )
            await _invalidate(connections)
    finally:
        if close and not later:
            await db._release(session)


async def _discard(db: Database, session: AsyncSession, *, keep: bool) -> None:
    """Close ``session``'s connections for good (the server rolls back what they held).

    With ``keep`` the session stays usable (a failed ``db.commit()``: the caller may go
    on); otherwise it is closed for good too.
    """
    connections = _connections(session)
    try:
        if keep:
            await _invalidate(connections)
            await session.reset()
        else:
            await session.invalidate()
    except Exception:
        _log.warning("discarding the connection of database %r failed", db.name, exc_info=True)
        await _invalidate(connections)


def _connections(session: AsyncSession) -> list[Any]:
    """The ``Connection`` objects ``session`` holds now (empty if none; best effort).

    Taken before an operation that may fail half-way: a failed close can leave the
    session without its transaction but the connection still checked out.
    """
    found: list[Any] = []
    transaction = getattr(session.sync_session, "_transaction", None)
    while transaction is not None:
        for entry in getattr(transaction, "_connections", {}).values():
            if entry[0] not in found:
                found.append(entry[0])
        transaction = transaction._parent
    return found


async def _invalidate(connections: list[Any]) -> None:
    """Invalidate each of ``connections`` still open, so that the pool gets it back."""
    from sqlalchemy.util import greenlet_spawn

    for connection in connections:
        if not connection.closed and not connection.invalidated:
            try:
                await greenlet_spawn(connection.invalidate)
            except Exception:
                _log.error("could not discard a connection", exc_info=True)


async def _statements_done(session: AsyncSession) -> list[Any]:
    """Wait (bounded) until no statement is running on ``session``'s connections.

    One session must not run two operations at once, but code that ``gather()``s over the
    scope's session, or a task it started, may still be in a statement when the scope
    ends. Sending ROLLBACK or COMMIT meanwhile breaks the protocol (asyncpg refuses, and
    then the connection is never returned; asyncmy answers "Command Out of Sync" and the
    statement's task hangs for good). SQLAlchemy's async drivers run each statement under
    a lock on the connection: wait for it. If it stays held, the caller's ROLLBACK fails
    and the connection is discarded, which also ends the statement.

    Returns the session's connections (see ``_connections()``).
    """
    connections = _connections(session)
    for connection in connections:
        mutex = _statement_lock(connection)
        if mutex is not None and mutex.locked():
            if await _statement_ended(connection, mutex.acquire()):
                mutex.release()
        elif (idle := statement_idle(connection)) is not None and not idle.is_set():
            await _statement_ended(connection, idle.wait())  # aiosqlite, SQLAlchemy 2.0
    return connections


async def _statement_ended(connection: Any, ended: Awaitable[object]) -> bool:
    """Await ``ended`` up to ``_FINISH_TIMEOUT``; past that, discard ``connection``."""
    try:
        await asyncio.wait_for(ended, _FINISH_TIMEOUT)
    except TimeoutError:
        _log.error(
            "a statement on a scope's session ran %ss past the scope's end; "
            "discarding its connection",
            _FINISH_TIMEOUT,
        )
        await _invalidate([connection])
        return False
    return True


def _statement_lock(connection: Any) -> asyncio.Lock | None:
    """The lock the driver holds while a statement runs on ``connection`` (None: unknown).

    SQLAlchemy's adapters for asyncpg, asyncmy and aiosqlite take their ``_execute_mutex``;
    the psycopg adapter leaves that unused and relies on psycopg's own connection lock.
    """
    adapted = getattr(getattr(connection, "_dbapi_connection", None), "dbapi_connection", None)
    for lock in (
        getattr(getattr(adapted, "_connection", None), "lock", None),  # psycopg
        getattr(adapted, "_execute_mutex", None),
    ):
        if isinstance(lock, asyncio.Lock) and lock.locked():
            return lock
    return getattr(adapted, "_execute_mutex", None)


async def _close_later(db: Database, session: AsyncSession) -> None:
    """Close ``session`` once no other task is in an operation on it (up to ``_FINISH_TIMEOUT``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FINISH_TIMEOUT
    delay = 0.01
    try:
        while True:
            await asyncio.sleep(delay)
            connections = await _statements_done(session)
            try:
                await session.close()
                return
            except IllegalStateChangeError:
                if loop.time() < deadline:
                    delay = min(delay * 2, 0.5)
                    continue
                _log.error(
                    "the session of database %r stayed in use for %ss; discarding it",
                    db.name,
                    _FINISH_TIMEOUT,
                )
                await _invalidate(connections)
                return
            except Exception:
                _log.error("closing the session of database %r failed", db.name, exc_info=True)
                await _invalidate(connections)
                return
    finally:
        await db._release(session)


def _in_background(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coroutine`` in a task that is kept referenced until it is done."""
    task = asyncio.ensure_future(coroutine)
    _in_flight.add(task)
    task.add_done_callback(_in_flight.discard)
    return task


async def _wait_after_cancel(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in a task of its own and wait for it, bounded, despite cancellation.

    Called where a cancellation interrupted the clean-up: the connections should be back
    in the pool before the cancellation goes on, but another cancellation must not cut
    the ROLLBACK short again. Under anyio (level-triggered cancellation: every await in a
    cancelled scope is cancelled again at once) the wait is shielded, else it would turn
    into a busy loop.
    """
    task = _in_background(work)
    if await _outlast(task):
        _log_late_failure(task)
    else:
        _log.warning(
            "closing sessions took over %ss after a cancellation; finishing in the background",
            _FINISH_TIMEOUT,
        )
        task.add_done_callback(_log_late_failure)


async def _outlast(task: asyncio.Task[Any]) -> bool:
    """Wait for ``task`` at most ``_FINISH_TIMEOUT`` seconds, whatever cancels the waiter
    meanwhile (the caller re-raises its own cancellation after); whether it is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FINISH_TIMEOUT
    with _shielded():
        while not task.done() and (remaining := deadline - loop.time()) > 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=remaining)
    return task.done()


def _shielded() -> contextlib.AbstractContextManager[Any]:
    """An anyio shield where anyio may be cancelling this task, else nothing."""
    anyio = sys.modules.get("anyio")
    if anyio is None:
        return contextlib.nullcontext()
    return anyio.CancelScope(shield=True)  # type: ignore[no-any-return]


def _log_late_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("ending a cancelled scope failed", exc_info=exc)


class scope:  # noqa: N801 - reads as a function at the call site
    """Open a unit of work: one session per ``Database``, ended together.

    Use it as ``async with scope():`` or as a decorator on an ``async def`` (each call then
    runs in a scope of its own). Inside, ``await db.session()`` returns the scope's session
    for ``db``, created on first use. Tasks created inside the scope share it.

    At exit, every session is committed in turn (see ``commit``), then all are closed and
    their connections returned to the pool, even when the scope is cancelled. A session
    object kept past the scope's end raises if it is used again.

    Args:
        commit: ``"auto"`` (default) commits if the body succeeded and rolls back if it
            raised (cancellation included); ``"always"`` commits even after an exception;
            ``"never"`` always rolls back (read-only work, dry runs).
        nested: what to do when a scope is already active. ``"raise"`` (default) raises
            ``NestedScopeError``; ``"reuse"`` joins the active
            scope, whose owner commits and closes (this scope's options are then ignored);
            ``"new"`` opens an independent scope with its own sessions and connections.
        before_commit: called with each session right before this scope commits it (sync or
            async), in the scope's task and context. An exception aborts that commit like a
            failing COMMIT.
        after_commit: called with each session right after this scope committed it.
        retry: decorator only. A number of attempts or a ``Retry``: a
            call that fails with a serialization failure or a deadlock (see
            ``is_retryable()``) is rolled back and run again from the start
            in a fresh scope, after a jittered backoff. Retried units are outermost units:
            called inside an active scope, ``nested="raise"`` raises and ``nested="new"``
            runs (and retries) independently; ``nested="reuse"`` and ``commit="always"`` are
            refused. See docs/retries.md for what must not be retried.

    Raises:
        ConfigurationError: an option value is not one of the allowed ones, or a hook is
            not callable; ``retry=`` on ``async with`` (a block cannot be run again) or
            with ``nested="reuse"`` or ``commit="always"``.
        NestedScopeError: on entry, a scope is active and ``nested="raise"``.
        CommitError: at exit, a commit failed; see its attributes for what was committed.
        RetryError: ``retry=``: the last allowed attempt failed with a retryable error.

    Example::

        async with scope():
            session = await db.session()
            session.add(User(name="ada"))
        # committed and closed here
    """

    __slots__ = (
        "_after_commit",
        "_before_commit",
        "_commit",
        "_nested",
        "_retry",
        "_source",
        "_token",
        "_unit",
    )

    def __init__(
        self,
        *,
        commit: CommitMode = "auto",
        nested: NestedMode = "raise",
        before_commit: SessionHook | None = None,
        after_commit: SessionHook | None = None,
        retry: int | Retry | None = None,
    ) -> None:
        check_choice("commit", commit, CommitMode)
        check_choice("nested", nested, NestedMode)
        check_hook("before_commit", before_commit)
        check_hook("after_commit", after_commit)
        self._retry = _check_retry(as_retry("retry", retry), commit, nested)
        self._commit: CommitMode = commit
        self._nested: NestedMode = nested
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._unit: _Unit | None = None
        self._token: Token[_Unit | None] | None = None
        self._source: object = None

    async def __aenter__(self) -> None:
        if self._unit is not None:
            raise RuntimeError("this scope() object is already in use; create a new one per entry")
        if self._retry is not None:
            raise ConfigurationError(
                "retry= needs a function to run again: `async with scope(retry=...)` cannot "
                "re-run its block. Use @scope(retry=...) on the function, or "
                "run_isolated(fn, retry=...)."
            )
        active = _current.get()
        # A unit of another event loop (a thread's asyncio.run()) is not active here.
        if active is not None and active.is_current():
            if self._nested == "raise":
                raise NestedScopeError()
            if self._nested == "reuse":
                self._unit = active
                return
        self._unit = _Unit(self._commit, self._before_commit, self._after_commit, self._source)
        self._token = self._unit.enter()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        unit, token = self._unit, self._token
        self._unit = self._token = None
        if token is None:  # joined someone else's scope: its owner ends it
            return
        assert unit is not None
        try:
            await unit.end(failed=exc_type is not None)
        finally:
            unit.exit(token)

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate an async function so that every call runs in a fresh scope."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@scope() decorates async functions only; got {fn!r}")
        options = (self._commit, self._nested, self._before_commit, self._after_commit)
        policy = self._retry

        def open_unit() -> scope:
            commit, nested, before, after = options
            entered = scope(commit=commit, nested=nested, before_commit=before, after_commit=after)
            entered._source = fn  # names the unit in logs and spans
            return entered

        if policy is not None:

            @functools.wraps(fn)
            async def retried(*args: P.args, **kwargs: P.kwargs) -> R:
                if options[1] == "raise" and _active() is not None:
                    raise NestedScopeError(retry=True)
                return await call_retrying(policy, open_unit, fn, args, kwargs)

            return retried

        @functools.wraps(fn)
        async def in_scope(*args: P.args, **kwargs: P.kwargs) -> R:
            async with open_unit():
                return await fn(*args, **kwargs)

        return in_scope


def _active() -> _Unit | None:
    """The unit active in this context and this thread's event loop, if any."""
    active = _current.get()
    return active if active is not None and active.is_current() else None


def _check_retry(policy: Retry | None, commit: CommitMode, nested: NestedMode) -> Retry | None:
    if policy is None:
        return None
    if nested == "reuse":
        raise ConfigurationError(
            "scope(retry=..., nested='reuse') is not valid: a unit that joins an active scope "
            "cannot be re-run on its own (the scope's earlier work would not be). Put retry= "
            "on the outermost scope, or use nested='new' for an independent retried unit."
        )
    if commit == "always":
        raise ConfigurationError(
            "scope(retry=..., commit='always') is not valid: a failed attempt would be "
            "committed before it is run again. Use commit='auto' (default) or 'never'."
        )
    return policy


@overload
async def run_isolated(fn: Callable[[], Awaitable[R]], /, *, retry: int | Retry | None) -> R: ...


@overload
async def run_isolated(
    fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
) -> R: ...


async def run_isolated(fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
    """Run ``await fn(*args, **kwargs)`` in a fresh, independent scope and return its result.

    The call gets its own sessions and connections, committed when ``fn`` returns and
    rolled back if it raises, like ``scope(nested="new")``. This is the way to run
    database work concurrently: one ``AsyncSession`` must never run two queries at once,
    so ``asyncio.gather()`` over code that shares the scope's session fails, while ::

        users, orders = await asyncio.gather(run_isolated(load_users), run_isolated(load_orders))

    runs both queries at the same time, on two connections. Work done this way is
    committed independently of the calling scope (it does not see the caller's uncommitted
    changes, and the caller's rollback does not undo it).

    ``run_isolated(fn, retry=...)`` (a number of attempts or a ``Retry``)
    runs ``fn`` again, in a fresh scope, while it fails with a serialization failure or a
    deadlock; see ``scope(retry=...)``. The keyword ``retry`` always belongs to
    ``run_isolated``: give ``fn`` its arguments with ``functools.partial`` or a ``lambda``
    (``run_isolated(partial(transfer, a, b), retry=5)``).

    Raises:
        CommitError: committing ``fn``'s work failed.
        RetryError: ``retry=``: the last allowed attempt failed with a retryable error.
    """
    if "retry" in kwargs:
        policy = as_retry("retry", kwargs.pop("retry"))
        if policy is not None:
            return await call_retrying(
                policy, functools.partial(_isolated_unit, fn), fn, args, kwargs
            )
    async with _isolated_unit(fn):
        return await fn(*args, **kwargs)


def _isolated_unit(fn: Callable[..., Any]) -> scope:
    isolated = scope(nested="new")
    isolated._source = fn  # names the unit in logs and spans
    return isolated
