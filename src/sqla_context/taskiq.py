"""taskiq integration: every task execution runs in a scope of its own.

::

    broker.add_middlewares(SessionMiddleware())   # add it last: it is then the innermost one

Task functions (and the taskiq dependencies they use) call ``await db.session()``. The
scope is committed when the task function returns, rolled back when it raises, and closed
either way; the message is acknowledged only after the commit succeeded.

Where the hooks run
    taskiq's ``Receiver.callback`` handles one message in one asyncio task: it awaits every
    middleware's ``pre_execute``, then the task coroutine itself (awaited directly, under
    ``anyio.fail_after`` when the task has a ``timeout`` label, not in a task of its own),
    then ``on_error`` (only if the task raised), then ``post_execute``, then stores the
    result and calls ``post_save``. All of that shares one ``contextvars.Context``, so
    ``pre_execute`` can open the scope by setting the ContextVar and ``post_execute`` can
    end it and reset the ContextVar. (Sync tasks run in an executor thread with a copy of
    that context; they cannot await ``db.session()`` and get nothing from this middleware.)

When the message is acknowledged
    For a broker with acknowledgements (``AckableMessage``: Redis streams, RabbitMQ, NATS
    JetStream...), taskiq acknowledges at one of these points, chosen by the worker's
    ``--ack-type`` (default ``when_saved``) or by the task's ``ack_type`` label (taskiq
    0.12.5 and later, the version this integration requires)::

        pre_execute -> [when_received] -> task -> on_error -> [when_executed]
                    -> post_execute -> store result -> post_save -> [when_saved]

    A cancelled task, and one that fails after an early commit, never get there: ``on_error``
    re-raises, which ends the handling before both the ``when_executed`` and ``when_saved``
    acks (see below).

    taskiq has no hook between a successful task function and the ``when_executed`` ack,
    so the commit happens in ``post_execute`` and the ack must come at ``when_saved``.
    ``pre_execute`` therefore sets the message's ``ack_type`` label to ``when_saved`` when
    it is absent or ``when_executed`` (the receiver reads the label after ``pre_execute``).
    An explicit ``when_received`` label (at-most-once delivery: the ack precedes the work)
    and ``manual`` (the task acks itself) are left alone: those tasks get no
    ack-after-commit guarantee. ``SessionMiddleware(ack_after_commit=False)`` leaves every
    label alone.

When the commit fails
    ``post_execute`` logs the failure at ERROR and re-raises it. That aborts taskiq's
    handling of the message before the result is stored and before the ``when_saved`` ack:
    the message stays unacknowledged and the broker redelivers it (Redis streams: it stays
    in the consumer group's pending list and is reclaimed after ``idle_timeout``). No
    result is stored for that execution and ``post_save`` hooks do not run. A
    ``CommitError`` that escapes the task function (``db.close_session()`` failed) is a
    failed commit too: ``on_error`` logs and re-raises it, before any ack. Brokers
    without acknowledgements (``ListQueueBroker``, ``PubSubBroker``, ``InMemoryBroker``)
    removed the message when it was received: nothing can redeliver it, so the failure is
    only logged (``InMemoryBroker`` also raises it: from ``kiq()`` as the ``__cause__`` of a
    ``SendTaskError`` with ``await_inplace=True``, from ``wait_all()`` otherwise). Design
    tasks to be idempotent: redelivery runs them again.

When the task raises
    ``on_error`` rolls the scope back and closes it right away, before a ``when_executed``
    ack and, when this middleware was added last, before the other middlewares' ``on_error``
    (a retry middleware may re-send the task). What happens to the message next depends on
    what ended the task:

    - An error (any ``Exception``: a bug, ``NoResultError``, ``Context.requeue()``,
      ``Context.reject()``, the ``TimeoutError`` of an expired ``timeout`` label; not a
      ``CommitError``, see above) and nothing committed before it: taskiq acknowledges the
      message as it does for every failed task (its retries come from a retry middleware,
      not from redelivery). That is sound, since nothing of the failed attempt was
      committed. A timeout counts as the task's own failure: it ran past the time its label
      allows, and would most likely do so again if the broker delivered it again.
    - A cancellation: an ``asyncio.CancelledError`` (the handling task was cancelled, say by
      ``asyncio.run()`` ending with tasks still running, or by an application that embeds
      the worker and shuts down), a pending cancellation request on the handling task
      whatever the task raised, or ``KeyboardInterrupt``/``SystemExit``. taskiq catches
      ``BaseException`` around the task and would report it as an error, then acknowledge
      the message: it would be lost with its work undone. ``on_error`` re-raises the
      cancellation instead once the rollback is done, which ends taskiq's handling of the
      message before the ``when_executed`` and ``when_saved`` acks (whatever the
      ``ack_type`` and ``ack_after_commit``), before the other middlewares' ``on_error``
      and ``post_execute``, and before a result is stored. The message stays
      unacknowledged and the broker delivers it again (Redis streams: after
      ``idle_timeout``). A message acknowledged ``when_received`` was acked before the task
      ran (at most once by definition): nothing can bring it back. Under ``manual`` it is
      whatever the task did.
    - An error after an early commit: see below.

Early commits
    ``db.commit()``, ``db.close_session()`` and top-level ``db.transaction()`` blocks commit
    before the task ends, and such a commit is final: nothing undoes it. The rule, the same
    as in ``sqla_context.faststream``: **a message whose work is partly committed is
    never acknowledged as failed.** If the task raises after an early commit, the rest of
    its work is rolled back and ``on_error`` re-raises the error (logged at ERROR), so that
    the message is not acknowledged and the broker delivers it again, as after a failed
    commit. At least once then means: the task runs again from its start, over what the
    earlier attempts committed, until one attempt succeeds. A task that commits early must
    therefore be idempotent up to its last early commit (look for what it committed and go
    on from there). Exceptions: ``Context.requeue()`` (its copy of the message carries the
    work) and ``Context.reject()`` are the task's own decision and acknowledged as usual.
    Only commits made through sqla_context count (those that run the commit hooks), not a
    direct ``session.commit()``, nor independent work (``run_isolated()``,
    ``db.new_session()``, ``scope(nested="new")``). End read-only work early with
    ``db.close_session(commit=False)``: that commits nothing. A retry middleware does not
    see these errors (its ``on_error`` runs after this one's), and nothing bounds the
    redeliveries: a task that fails every time after an early commit comes back every
    ``idle_timeout``.

Safety net
    If the task's handling ends without reaching this middleware's ``post_execute`` (a
    middleware whose ``post_execute`` runs earlier raised, or the worker cancelled the
    handling between hooks), sessions still open are rolled back and closed when the
    handling task finishes, and a warning is logged. Adding this middleware last makes its
    ``post_execute`` the first to run, so that this does not happen.

Every task execution gets a new scope, even when the message is handled in a context that
already has one (``InMemoryBroker`` runs the task in a copy of the context of the code that
called ``kiq()``): a task is an independent unit of work, like ``scope(nested="new")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

try:
    from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult
    from taskiq.exceptions import NoResultError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.taskiq needs taskiq: pip install 'sqla-context[taskiq]'"
    ) from exc
try:  # Context.reject() raises it (taskiq 0.11 and later)
    from taskiq.exceptions import TaskRejectedError
except ImportError:  # pragma: no cover - depends on the taskiq version
    TaskRejectedError = NoResultError  # type: ignore[misc,assignment]

from ._scope import _Unit
from .exceptions import CommitError, _describe

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["SessionMiddleware"]

_log = logging.getLogger("sqla_context")

#: The taskiq label that chooses, per message, when the receiver acknowledges it.
_ACK_LABEL = "ack_type"
#: ``ack_type`` values after which the commit could come too late.
_MOVED_TO_WHEN_SAVED = frozenset({"when_executed"})
#: Errors by which the task itself settled its message: ``Context.requeue()`` (it sent a
#: copy, then raises NoResultError) and ``Context.reject()``.
_SETTLED_BY_THE_TASK = (NoResultError, TaskRejectedError)


class _Execution:
    """One task execution's scope, and what is needed to end it and restore the context."""

    __slots__ = (
        "committed",
        "done_callback",
        "finished",
        "state_token",
        "task",
        "token",
        "unit",
    )

    def __init__(self, message: TaskiqMessage) -> None:
        #: Set by the first commit in the scope (db.commit(), db.close_session(), ...).
        self.committed = False
        self.unit = _Unit(after_commit=self._saw_commit, source=message)
        self.token = self.unit.enter()
        self.state_token: Token[_Execution | None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.done_callback: Any = None
        self.finished = False

    def _saw_commit(self, _session: AsyncSession) -> None:
        self.committed = True

    def finish(self) -> None:
        """Mark the execution ended and restore the context it was opened in."""
        self.finished = True
        if self.task is not None:
            self.task.remove_done_callback(self.done_callback)
        _Unit.exit(self.token)
        if self.state_token is not None:
            with contextlib.suppress(ValueError):
                _execution.reset(self.state_token)


_execution: ContextVar[_Execution | None] = ContextVar("sqla_context.taskiq", default=None)

# Strong references to roll-backs started by the safety net, until they are done.
_orphans: set[asyncio.Task[None]] = set()


def _ack_name(value: object) -> str | None:
    """An ``ack_type`` label value (string or ``AcknowledgeType``) as its lower-case name."""
    value = getattr(value, "value", value)
    if not isinstance(value, str):
        return None
    return value.lower().removeprefix("acknowledgetype.")


class SessionMiddleware(TaskiqMiddleware):
    """taskiq middleware that runs every task execution in its own ``scope()``.

    Inside a task, ``await db.session()`` returns the execution's session. When the task
    function returns, the sessions are committed (in ``post_execute``), before the message
    is acknowledged; when it raises, they are rolled back (in ``on_error``). They are closed
    either way. If the commit fails, the error is logged and re-raised, so taskiq neither
    stores a result nor acknowledges the message, and a broker with acknowledgements
    redelivers it. The same goes for a task that was cancelled, and for one that raised after
    committing part of its work early (``db.commit()``, ``db.close_session()``): ``on_error``
    re-raises, before taskiq's ack. See the module docstring for the exact ordering and its
    preconditions.

    Args:
        ack_after_commit: ``True`` (default): set the message's ``ack_type`` label to
            ``when_saved`` when it is absent or ``when_executed``, so that the receiver
            acknowledges after the commit whatever the worker's ``--ack-type``. Explicit
            ``when_received`` and ``manual`` labels are kept. ``False``: leave the labels
            alone (the ack then follows the commit only under ``when_saved``).

    Example::

        broker = RedisStreamBroker("redis://localhost:6379")
        broker.add_middlewares(SessionMiddleware())

        @broker.task
        async def add_user(name: str) -> None:
            session = await db.session()
            session.add(User(name=name))   # committed before the message is acknowledged
    """

    def __init__(self, *, ack_after_commit: bool = True) -> None:
        super().__init__()
        self.ack_after_commit = ack_after_commit

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Open the execution's scope (in the context the task function will run in)."""
        if self.ack_after_commit:
            label = message.labels.get(_ACK_LABEL)
            if label is None or _ack_name(label) in _MOVED_TO_WHEN_SAVED:
                message.labels[_ACK_LABEL] = "when_saved"
        execution = _Execution(message)
        execution.state_token = _execution.set(execution)
        task = asyncio.current_task()
        if task is not None:
            execution.task = task
            execution.done_callback = functools.partial(_abandoned, execution, message.task_name)
            task.add_done_callback(execution.done_callback)
        return message

    async def on_error(
        self,
        message: TaskiqMessage,
        result: TaskiqResult[Any],
        exception: BaseException,
    ) -> None:
        """Roll back and close the execution's sessions as soon as the task has failed.

        Raises:
            asyncio.CancelledError: the task was cancelled (also raised for a task that
                raised something else while a cancellation of its handling was pending;
                ``KeyboardInterrupt`` and ``SystemExit`` are re-raised as they are).
                Re-raised on purpose, after the rollback: it stops taskiq before it
                acknowledges the message.
            Exception: the task's own error, when the task had committed part of its work
                (``db.commit()``, ``db.close_session()``...) before it raised, or when it is a
                ``CommitError`` (``db.close_session()`` failed): the
                message must come again, not be acknowledged.
        """
        execution = _execution.get()
        if execution is None or execution.finished:
            return
        cancelled = _cancelled(exception)
        # A CommitError that escaped the task (from db.close_session()) is a failed commit,
        # as in post_execute: the message must come again.
        commit_failed = isinstance(exception, CommitError)
        partly_committed = execution.committed and not isinstance(exception, _SETTLED_BY_THE_TASK)
        if not (cancelled or commit_failed or partly_committed):
            await execution.unit.end(failed=True)  # post_execute restores the context
            return
        # taskiq's handling of the message must end here, before its ack: restore the
        # context now, post_execute will not run.
        try:
            await execution.unit.end(failed=True)
        finally:
            execution.finish()
        if cancelled:
            _log.warning(
                "taskiq task %s (id %s) was cancelled: rolled back, the message is not "
                "acknowledged",
                message.task_name,
                message.task_id,
            )
            if isinstance(exception, Exception):
                raise asyncio.CancelledError() from exception
            raise exception
        _log.error(
            "%s for taskiq task %s (id %s); the message is not acknowledged, so that it is "
            "delivered again",
            "commit failed" if commit_failed else "failed after committing part of its work",
            message.task_name,
            message.task_id,
        )
        raise exception

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """Commit (or roll back) and close the execution's sessions; restore the context.

        Raises:
            CommitError: the commit failed. Re-raised on purpose: it stops taskiq before it
                stores the result and acknowledges the message.
        """
        execution = _execution.get()
        if execution is None or execution.finished:
            return
        try:
            await execution.unit.end(failed=result.is_err)
        except Exception as exc:
            _log.error(
                "commit failed for taskiq task %s (id %s); the message is not acknowledged: %s",
                message.task_name,
                message.task_id,
                _describe(exc),
            )
            raise
        finally:
            execution.finish()


def _cancelled(exception: BaseException) -> bool:
    """Whether the task ended because its handling was cancelled, not by an error of its own.

    A ``timeout`` label's expiry is not a cancellation: anyio turns it into a TimeoutError
    and withdraws its cancellation request (``Task.uncancel()``).
    """
    if not isinstance(exception, Exception):  # CancelledError, KeyboardInterrupt, SystemExit
        return True
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _abandoned(execution: _Execution, task_name: str, _task: asyncio.Task[Any]) -> None:
    """Done callback of the task that handled the message: roll back what post_execute missed."""
    if execution.finished:
        return
    execution.finished = True
    unit = execution.unit
    if not unit.sessions:
        unit.closed = True
        return
    _log.warning(
        "taskiq task %s ended without SessionMiddleware.post_execute (another middleware "
        "raised, or the handling was cancelled); rolling its sessions back",
        task_name,
    )
    orphan = asyncio.ensure_future(unit.end(failed=True))
    _orphans.add(orphan)
    orphan.add_done_callback(_orphan_done)


def _orphan_done(task: asyncio.Task[None]) -> None:
    _orphans.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("rolling back an abandoned taskiq task failed", exc_info=exc)
