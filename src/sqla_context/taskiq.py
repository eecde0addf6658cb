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
    ``--ack-type`` (default ``when_saved``) or, in taskiq versions with per-task acks
    (0.13 has them), by the task's ``ack_type`` label::

        pre_execute -> [when_received] -> task -> on_error -> [when_executed]
                    -> post_execute -> store result -> post_save -> [when_saved]

    taskiq has no hook between a successful task function and the ``when_executed`` ack,
    so the commit happens in ``post_execute`` and the ack must come at ``when_saved``.
    ``pre_execute`` therefore sets the message's ``ack_type`` label to ``when_saved`` when
    it is absent or ``when_executed`` (the receiver reads the label after ``pre_execute``).
    An explicit ``when_received`` label (at-most-once delivery: the ack precedes the work)
    and ``manual`` (the task acks itself) are left alone: those tasks get no
    ack-after-commit guarantee. ``SessionMiddleware(ack_after_commit=False)`` leaves every
    label alone. taskiq versions without per-task ``ack_type`` labels ignore the label: there
    the guarantee holds only for workers run with ``--ack-type when_saved`` (the default).

When the commit fails
    ``post_execute`` logs the failure at ERROR and re-raises it. That aborts taskiq's
    handling of the message before the result is stored and before the ``when_saved`` ack:
    the message stays unacknowledged and the broker redelivers it (Redis streams: it stays
    in the consumer group's pending list and is reclaimed after ``idle_timeout``). No
    result is stored for that execution and ``post_save`` hooks do not run. Brokers
    without acknowledgements (``ListQueueBroker``, ``PubSubBroker``, ``InMemoryBroker``)
    removed the message when it was received: nothing can redeliver it, so the failure is
    only logged (``InMemoryBroker`` also raises it: from ``kiq()`` as the ``__cause__`` of a
    ``SendTaskError`` with ``await_inplace=True``, from ``wait_all()`` otherwise). Design
    tasks to be idempotent: redelivery runs them again.

When the task raises
    ``on_error`` rolls the scope back and closes it right away, before a ``when_executed``
    ack and, when this middleware was added last, before the other middlewares' ``on_error``
    (a retry middleware may re-send the task). This includes a ``timeout`` label expiring,
    a cancelled task (taskiq reports the cancellation as the task's error),
    ``NoResultError``, ``Context.requeue()`` and ``Context.reject()``. Afterwards taskiq
    acknowledges the message as it does for every failed task (its retries come from a
    retry middleware, not from redelivery): that is sound, since nothing of the failed
    attempt was committed.

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
from typing import Any

try:
    from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.taskiq needs taskiq: pip install 'sqla-context[taskiq]'"
    ) from exc

from ._scope import _Unit

__all__ = ["SessionMiddleware"]

_log = logging.getLogger("sqla_context")

#: The taskiq label that chooses, per message, when the receiver acknowledges it.
_ACK_LABEL = "ack_type"
#: ``ack_type`` values after which the commit could come too late.
_MOVED_TO_WHEN_SAVED = frozenset({"when_executed"})


class _Execution:
    """One task execution's scope, and what is needed to end it and restore the context."""

    __slots__ = ("done_callback", "finished", "state_token", "task", "token", "unit")

    def __init__(self, unit: _Unit, token: Token[_Unit | None]) -> None:
        self.unit = unit
        self.token = token
        self.state_token: Token[_Execution | None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.done_callback: Any = None
        self.finished = False


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
    """taskiq middleware that runs every task execution in its own :func:`~sqla_context.scope`.

    Inside a task, ``await db.session()`` returns the execution's session. When the task
    function returns, the sessions are committed (in ``post_execute``), before the message
    is acknowledged; when it raises, they are rolled back (in ``on_error``). They are closed
    either way. If the commit fails, the error is logged and re-raised, so taskiq neither
    stores a result nor acknowledges the message, and a broker with acknowledgements
    redelivers it. See the module docstring for the exact ordering and its preconditions.

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
        unit = _Unit()
        execution = _Execution(unit, unit.enter())
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
        """Roll back and close the execution's sessions as soon as the task has failed."""
        execution = _execution.get()
        if execution is not None and not execution.finished:
            await execution.unit.end(failed=True)

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """Commit (or roll back) and close the execution's sessions; restore the context.

        Raises:
            CommitError: the commit failed. Re-raised on purpose: it stops taskiq before it
                stores the result and acknowledges the message.
        """
        execution = _execution.get()
        if execution is None or execution.finished:
            return
        execution.finished = True
        if execution.task is not None:
            execution.task.remove_done_callback(execution.done_callback)
        try:
            await execution.unit.end(failed=result.is_err)
        except Exception:
            _log.error(
                "commit failed for taskiq task %s (id %s); the message is not acknowledged",
                message.task_name,
                message.task_id,
            )
            raise
        finally:
            _Unit.exit(execution.token)
            if execution.state_token is not None:
                with contextlib.suppress(ValueError):
                    _execution.reset(execution.state_token)


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
