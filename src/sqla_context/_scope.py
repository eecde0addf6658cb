"""The unit of work behind ``scope()``: one session per Database, held in a ContextVar."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, get_args

from sqlalchemy.exc import IllegalStateChangeError

from ._typing import CommitMode, NestedMode, P, R, SessionHook
from .exceptions import CommitError, ConfigurationError, NestedScopeError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._database import Database

__all__ = ["run_isolated", "scope"]

_log = logging.getLogger("sqla_context")

#: How long a cancelled scope keeps waiting for its rollback/close before it re-raises
#: the cancellation and lets them finish in the background.
_FINISH_TIMEOUT = 30.0

# Holds the mutable unit, never the session itself: a task created inside the scope gets
# a *copy* of the context, and the copy must still point at the same unit.
_current: ContextVar[_Unit | None] = ContextVar("sqla_context.scope", default=None)

# Strong references to finishing tasks, so that one whose waiter was cancelled is not
# garbage-collected half-way through a ROLLBACK.
_in_flight: set[asyncio.Task[None]] = set()


def check_choice(option: str, value: object, choices: object) -> None:
    """Raise ConfigurationError unless ``value`` is one of the Literal ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigurationError(
            f"{option}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}"
        )


class _Unit:
    """The sessions of one scope. Mutable, shared by every task that copied the context."""

    __slots__ = ("after_commit", "before_commit", "closed", "commit", "locks", "sessions")

    def __init__(
        self,
        commit: CommitMode = "auto",
        before_commit: SessionHook | None = None,
        after_commit: SessionHook | None = None,
    ) -> None:
        self.commit: CommitMode = commit
        self.before_commit = before_commit
        self.after_commit = after_commit
        self.sessions: dict[Database, AsyncSession] = {}
        # Created on demand, only while a Database's async before_session hook runs.
        self.locks: dict[Database, asyncio.Lock] | None = None
        self.closed = False


async def call_hooks(session: AsyncSession, *hooks: SessionHook | None) -> None:
    """Call each hook that is set with ``session``, awaiting those that return awaitables."""
    for hook in hooks:
        if hook is not None:
            result = hook(session)
            if inspect.isawaitable(result):
                await result


async def commit_session(db: Database, unit: _Unit | None, session: AsyncSession) -> None:
    """Commit with the Database's and the scope's hooks around it (errors propagate as-is)."""
    scope_before, scope_after = (unit.before_commit, unit.after_commit) if unit else (None, None)
    await call_hooks(session, db.before_commit, scope_before)
    await _commit_or_discard(session)
    await call_hooks(session, db.after_commit, scope_after)


async def _commit_or_discard(session: AsyncSession) -> None:
    """``session.commit()``; if the COMMIT fails, discard the session's connections.

    After a failed COMMIT, SQLite keeps the transaction open (a deferred foreign key
    violation, for one), and the pool does not roll back a connection whose transaction
    SQLAlchemy saw end: returned to the pool, it would hand the failed writes to the next
    user. Invalidating closes the connection instead, and the session stays usable.
    """
    try:
        await session.commit()
    except BaseException:
        try:
            await session.invalidate()
        except Exception:
            _log.warning("discarding a connection after a failed commit failed", exc_info=True)
        raise


async def _finish(
    unit: _Unit, sessions: list[tuple[Database, AsyncSession]], *, commit: bool
) -> None:
    """Commit (or not) each of ``sessions`` in turn, then close them all."""
    committed: list[str] = []
    commit_failure: CommitError | None = None
    hook_failure: BaseException | None = None
    try:
        if commit:
            for index, (db, session) in enumerate(sessions):
                if not session.in_transaction():
                    continue
                try:
                    await call_hooks(session, db.before_commit, unit.before_commit)
                    await _commit_or_discard(session)
                except Exception as exc:
                    rest = [d.name for d, s in sessions[index + 1 :] if s.in_transaction()]
                    commit_failure = CommitError(db.name, committed, [db.name, *rest], exc)
                    commit_failure.__cause__ = exc
                    _log.error("%s", commit_failure)
                    break
                committed.append(db.name)
                try:
                    # Unlike commit_session(), a failing after_commit hook must not stop the
                    # other databases from committing: it is reported once all are done.
                    await call_hooks(session, db.after_commit, unit.after_commit)
                except Exception as exc:
                    _log.error("after_commit hook failed for database %r", db.name, exc_info=True)
                    hook_failure = hook_failure or exc
    finally:
        # Closing rolls back whatever was not committed and returns the connection. A failing
        # close never stops the others from closing; it is retried in the background.
        for db, session in sessions:
            later = False
            try:
                await session.close()
            except IllegalStateChangeError:
                # Another task is still in an operation on this session (code that gather()s
                # over the scope's one session): close it once that is over.
                _log.warning(
                    "the session of database %r is still in use by another task (one session"
                    " must not run two operations at once); closing it in the background",
                    db.name,
                    exc_info=True,
                )
                later = True
                _in_background(_close_later(db, session))
            except Exception:
                _log.warning("closing the session of database %r failed", db.name, exc_info=True)
            finally:
                if not later:
                    await db._release(session)
    if commit_failure is not None:
        raise commit_failure
    if hook_failure is not None:
        raise hook_failure


async def _close_later(db: Database, session: AsyncSession) -> None:
    """Close ``session`` once no other task is in an operation on it (up to ``_FINISH_TIMEOUT``).

    ``close()`` refuses while another task is still in an operation on the session (code
    that ``gather()``s over the scope's one session: the first error ends the gather, not
    the other calls). SQLAlchemy signals no end of that operation, so this retries, backing
    off, and the connection goes back to the pool once the stray operation is over.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FINISH_TIMEOUT
    delay = 0.01
    try:
        while True:
            await asyncio.sleep(delay)
            try:
                await session.close()
                return
            except IllegalStateChangeError:
                if loop.time() < deadline:
                    delay = min(delay * 2, 0.5)
                    continue
                _log.error(
                    "the session of database %r stayed in use for %ss; not closed",
                    db.name,
                    _FINISH_TIMEOUT,
                    exc_info=True,
                )
                return
            except Exception:
                _log.error("closing the session of database %r failed", db.name, exc_info=True)
                return
    finally:
        await db._release(session)


def _in_background(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coroutine`` in a task that is kept referenced until it is done."""
    task = asyncio.ensure_future(coroutine)
    _in_flight.add(task)
    task.add_done_callback(_in_flight.discard)
    return task


async def settle(unit: _Unit, *, failed: bool, keep_open: bool = False) -> None:
    """End ``unit``: commit or roll back and close its sessions, surviving cancellation.

    With ``keep_open`` the sessions are ended but the unit stays usable: a later
    ``db.session()`` opens a fresh session in it (the ASGI middleware commits at the
    response start this way, and work done while the body streams gets new sessions).

    The work runs in a task of its own awaited through ``shield``: a cancellation that
    arrives meanwhile stops only our wait, never a half-done COMMIT/ROLLBACK/close. We then
    keep waiting (bounded by ``_FINISH_TIMEOUT``) so that the connections are back in the
    pool before the cancellation propagates, and re-raise it.
    """
    if not keep_open:
        unit.closed = True
    if not unit.sessions:  # nothing was opened: no task, no I/O
        return
    # Detach the sessions before any await, so nobody can fetch one that is being closed.
    sessions = list(unit.sessions.items())
    unit.sessions.clear()
    commit = unit.commit == "always" or (unit.commit == "auto" and not failed)
    task = _in_background(_finish(unit, sessions, commit=commit))
    try:
        await asyncio.shield(task)
        return
    except asyncio.CancelledError as cancel:
        if task.done():
            raise
        interrupted = cancel
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FINISH_TIMEOUT
    while not task.done() and (remaining := deadline - loop.time()) > 0:
        # Under level-triggered cancellation (anyio) every wait is cancelled again: keep waiting.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=remaining)
    if not task.done():
        _log.warning(
            "closing sessions took over %ss after a cancellation; finishing in the background",
            _FINISH_TIMEOUT,
        )
        task.add_done_callback(_log_late_failure)
    elif not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("ending a cancelled scope failed", exc_info=exc)
    raise interrupted


def _log_late_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("ending a cancelled scope failed", exc_info=exc)


class scope:  # noqa: N801 - reads as a function at the call site
    """Open a unit of work: one session per :class:`Database`, ended together.

    Use it as ``async with scope():`` or as a decorator on an ``async def`` (each call then
    runs in a scope of its own). Inside, ``await db.session()`` returns the scope's session
    for ``db``, created on first use. Tasks created inside the scope share it.

    At exit, every session is committed in turn (see ``commit``), then all are closed and
    their connections returned to the pool, even when the scope is cancelled.

    Args:
        commit: ``"auto"`` (default) commits if the body succeeded and rolls back if it
            raised (cancellation included); ``"always"`` commits even after an exception;
            ``"never"`` always rolls back (read-only work, dry runs).
        nested: what to do when a scope is already active. ``"raise"`` (default) raises
            :class:`~sqla_context.exceptions.NestedScopeError`; ``"reuse"`` joins the active
            scope, whose owner commits and closes (this scope's options are then ignored);
            ``"new"`` opens an independent scope with its own sessions and connections.
        before_commit: called with each session right before this scope commits it (sync or
            async). An exception aborts that commit like a failing COMMIT.
        after_commit: called with each session right after this scope committed it.

    Raises:
        ConfigurationError: an option value is not one of the allowed ones.
        NestedScopeError: on entry, a scope is active and ``nested="raise"``.
        CommitError: at exit, a commit failed; see its attributes for what was committed.

    Example::

        async with scope():
            session = await db.session()
            session.add(User(name="ada"))
        # committed and closed here
    """

    __slots__ = ("_after_commit", "_before_commit", "_commit", "_nested", "_token", "_unit")

    def __init__(
        self,
        *,
        commit: CommitMode = "auto",
        nested: NestedMode = "raise",
        before_commit: SessionHook | None = None,
        after_commit: SessionHook | None = None,
    ) -> None:
        check_choice("commit", commit, CommitMode)
        check_choice("nested", nested, NestedMode)
        self._commit: CommitMode = commit
        self._nested: NestedMode = nested
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._unit: _Unit | None = None
        self._token: Token[_Unit | None] | None = None

    async def __aenter__(self) -> None:
        if self._unit is not None:
            raise RuntimeError("this scope() object is already in use; create a new one per entry")
        active = _current.get()
        if active is not None and not active.closed:
            if self._nested == "raise":
                raise NestedScopeError()
            if self._nested == "reuse":
                self._unit = active
                return
        self._unit = _Unit(self._commit, self._before_commit, self._after_commit)
        self._token = _current.set(self._unit)

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        unit, token = self._unit, self._token
        self._unit = self._token = None
        if token is None:  # joined someone else's scope: its owner ends it
            return
        assert unit is not None
        try:
            await settle(unit, failed=exc_type is not None)
        finally:
            # ValueError: exited in another context than it was entered in (e.g. a fixture
            # whose setup and teardown run in different tasks). The unit is closed anyway,
            # so that context now reads as having no scope.
            with contextlib.suppress(ValueError):
                _current.reset(token)

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Decorate an async function so that every call runs in a fresh scope."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@scope() decorates async functions only; got {fn!r}")
        options = (self._commit, self._nested, self._before_commit, self._after_commit)

        @functools.wraps(fn)
        async def in_scope(*args: P.args, **kwargs: P.kwargs) -> R:
            commit, nested, before, after = options
            async with scope(
                commit=commit, nested=nested, before_commit=before, after_commit=after
            ):
                return await fn(*args, **kwargs)

        return in_scope


async def run_isolated(fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``await fn(*args, **kwargs)`` in a fresh, independent scope and return its result.

    The call gets its own sessions and connections, committed when ``fn`` returns and
    rolled back if it raises, like ``scope(nested="new")``. This is the way to run
    database work concurrently: one ``AsyncSession`` must never run two queries at once,
    so ``asyncio.gather()`` over code that shares the scope's session fails, while ::

        users, orders = await asyncio.gather(run_isolated(load_users), run_isolated(load_orders))

    runs both queries at the same time, on two connections. Work done this way is
    committed independently of the calling scope (it does not see the caller's uncommitted
    changes, and the caller's rollback does not undo it).

    Raises:
        CommitError: committing ``fn``'s work failed.
    """
    async with scope(nested="new"):
        return await fn(*args, **kwargs)
