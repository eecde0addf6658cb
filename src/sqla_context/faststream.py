"""FastStream integration: a scope per consumed message, committed before the message is acked.

Needs FastStream 0.7.6 or later (what ``sqla-context[faststream]`` installs). Add the
middleware to a broker, or to a router for some subscribers only::

    broker = RabbitBroker(url, middlewares=[SessionMiddleware])

    @broker.subscriber("orders")
    async def handle(order: dict) -> None:
        session = await db.session()    # the message's session, at any depth
        ...

Where it sits in FastStream's flow
    For each message a subscriber enters, in this order, FastStream's acknowledgement
    middleware (absent under ``AckPolicy.MANUAL``, and under ``ACK_FIRST`` for RabbitMQ and
    Kafka, where the broker or client acks on delivery), its logging middleware, then the
    broker's middlewares in list order. ``consume_scope`` calls are nested the same way
    around the handler call, and the acknowledgement middleware acks, nacks or rejects in
    its ``__aexit__``, after every inner middleware has exited and after the handler's
    result was published (``reply_to``, ``@publisher``). This middleware does all its
    work in ``consume_scope``, not in ``after_processed``/``__aexit__``, which would run
    after that publish:

    1. it opens a fresh scope (a new unit of work in the ContextVar) right around the call
       of the handler and resets it on the way out. ``consume_scope`` and the handler are
       one chain of awaits (``HandlerItem.call``), so the ContextVar is set in the very task
       and context in which the handler, its dependencies and its helpers run;
    2. handler returned (or raised ``AckMessage``): every session is committed, then
       closed. Only then does the result travel on: it is published, and the
       acknowledgement middleware acks. **The commit precedes the ack.**
    3. handler raised anything else (``NackMessage``, ``RejectMessage``, ``SkipMessage``,
       a bug), or was cancelled: everything is rolled back and closed, and the exception
       goes on; the subscriber's ``ack_policy`` decides the message's fate as usual, unless
       the handler had committed part of its work early (see "Early commits").
    4. the commit failed (a ``CommitError`` at scope exit, or one that
       escaped the handler from ``db.close_session()``): the middleware nacks the message
       itself (``message.nack()``, which requeues on RabbitMQ, naks on NATS JetStream and
       seeks back on Kafka), then re-raises. FastStream's own ack/nack/reject that follows
       is a no-op on a settled message, so ``ack_policy`` cannot turn a failed commit into
       an ack (``AckPolicy.ACK`` acks on errors) or a drop (the default
       ``REJECT_ON_ERROR`` rejects without requeue). The message is delivered again.

Preconditions for ack-after-commit
    The message must not have been acked before the commit: not with
    ``AckPolicy.ACK_FIRST``, and not by the handler itself (``await message.ack()``). In
    those cases a failed commit is logged at ERROR as a lost message; nothing else can be
    done. Brokers without acknowledgements cannot redeliver at all: Redis pub/sub and
    lists (FastStream forces ``MANUAL`` there) lose a message whose commit failed. A Redis
    stream with a consumer group keeps it pending (no XACK), and delivers it again only to a
    subscriber that claims pending messages (``StreamSub(..., min_idle_time=...)``). Under
    ``AckPolicy.MANUAL`` nobody acks for you: commit before acking (``await db.commit()``,
    then ``await message.ack()``).

Early commits
    ``db.commit()``, ``db.close_session()`` and top-level ``db.transaction()`` blocks commit
    inside the handler, before it ends, and such a commit is final: nothing undoes it. The
    rule, the same as in ``sqla_context.taskiq``: **a message whose work is partly
    committed is never settled as failed.** If the handler raises an error after an early
    commit, the rest of its work is rolled back and the middleware nacks the message (as
    after a failed commit, step 4), whatever the ``ack_policy``: the default
    ``REJECT_ON_ERROR`` would drop the message (RabbitMQ: gone or dead-lettered; NATS
    JetStream: terminated) with its work half done. At least once then means: the handler
    runs again from its start, over what the earlier deliveries committed, until one
    succeeds; so a handler that commits early must be idempotent up to its last early commit
    (look for what it committed and go on from there). The handler's own decisions stand:
    ``NackMessage``, ``RejectMessage`` and ``SkipMessage``, and a message it settled itself
    (``await message.reject()``). A cancelled handler's message is not settled by FastStream
    at all, so the broker delivers it again anyway. Only commits made through sqla_context
    count (those that run the commit hooks), not a direct ``session.commit()``, nor
    independent work (``run_isolated()``, ``db.new_session()``, ``scope(nested="new")``); a
    read-only session ended early with ``db.close_session(commit=False)`` commits nothing.
    A handler that fails every time after an early commit is redelivered every time: bound
    it with the broker, as below.

Broker shutdown
    ``broker.stop()`` waits up to ``graceful_timeout`` for running handlers, then closes
    the channel, and aio-pika cancels the handlers still running. A cancelled handler's
    work is rolled back and its connection returned before its task ends; FastStream 0.7
    does not settle its message, which RabbitMQ therefore delivers again.

Delivery is at least once
    If the process dies (or the connection drops) between the commit and the ack, the
    message is delivered again although its work is committed; the same holds when
    publishing the handler's result fails after the commit. Handlers must be idempotent.
    A commit that fails every time (a constraint checked at COMMIT) is redelivered every
    time: bound it with the broker (a RabbitMQ quorum queue's ``x-delivery-limit`` with a
    dead-letter exchange, JetStream's ``max_deliver``).

One scope per message, always
    The middleware never joins a scope that is active where the message arrives: with a
    real broker that would be a scope that was open where the broker started (its consumer
    tasks inherit that context), and with FastStream's in-memory ``TestBroker`` the
    publisher's scope; in production a consumer never shares the publisher's transaction,
    so neither does the test. A reply received through ``broker.request()`` passes
    through untouched (it is the caller's message, not a unit of work).

Order with other middlewares
    Put ``SessionMiddleware`` last in ``middlewares=[...]``: it is then the innermost
    middleware and sees the handler's exception before, say, an ``ExceptionMiddleware``
    turns it into a normal return (which would commit).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

try:
    import faststream
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.faststream needs FastStream: pip install 'sqla-context[faststream]'"
    ) from exc
try:  # AckPolicy and middlewares that get the context came with FastStream 0.6
    from faststream import AckPolicy, BaseMiddleware, SourceType, StreamMessage
    from faststream.exceptions import AckMessage, HandlerException
    from faststream.message import AckStatus
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.faststream needs FastStream 0.7.6 or later, found "
        f"{getattr(faststream, '__version__', 'an older one')}: "
        "pip install -U 'sqla-context[faststream]'"
    ) from exc

from ._scope import _Unit
from .exceptions import CommitError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["SessionMiddleware"]

_log = logging.getLogger("sqla_context")


class SessionMiddleware(BaseMiddleware):
    """FastStream broker middleware: each consumed message's handler runs in its own scope.

    ``await db.session()`` works anywhere in the handler and what it calls; FastStream's
    ``Depends(db.session)`` gives the same session. The sessions are committed when the
    handler returns (or raises ``AckMessage``), rolled back when it raises anything else
    or is cancelled, and always closed, all before FastStream publishes the handler's
    result and acks the message. If the commit fails, the message is nacked (redelivered)
    and the error re-raised; so is a message whose handler raised an error after
    committing part of its work early (``db.commit()``, ``db.close_session()``). See the
    module docstring for the ack policies and brokers under which that holds.

    Pass the class itself; FastStream makes one instance per message (its constructor takes
    FastStream's ``msg`` and ``context``, never your code)::

        broker = RabbitBroker(url, middlewares=[SessionMiddleware])
        router = RabbitRouter(middlewares=[SessionMiddleware])   # or for some subscribers
    """

    # FastStream makes one instance per message: the flag is that message's.
    __slots__ = ("_committed",)

    async def consume_scope(
        self,
        call_next: Callable[[StreamMessage[Any]], Awaitable[Any]],
        msg: StreamMessage[Any],
    ) -> Any:
        if msg.source_type is SourceType.RESPONSE:  # a broker.request() reply, caller side
            return await call_next(msg)
        self._committed = False  # set by every commit in the scope, early ones included
        unit = _Unit(after_commit=self._saw_commit, source=msg)
        token = unit.enter()  # this task runs the handler: call_next awaits it here
        try:
            try:
                result = await call_next(msg)
            except AckMessage:
                # The handler asked for an ack: that is success, so commit first.
                await self._commit(unit, msg)
                raise
            except BaseException as exc:
                await unit.end(failed=True)
                if isinstance(exc, CommitError):  # from db.close_session() in the handler
                    await self._redeliver(msg, "commit failed", exc)
                elif self._committed and _is_error(exc):
                    await self._redeliver(msg, "handler failed after an early commit", exc)
                raise
            await self._commit(unit, msg)
            return result
        finally:
            unit.exit(token)

    def _saw_commit(self, _session: AsyncSession) -> None:
        self._committed = True

    async def _commit(self, unit: _Unit, msg: StreamMessage[Any]) -> None:
        try:
            await unit.end(failed=False)
        except CommitError as exc:
            await self._redeliver(msg, "commit failed", exc)
            raise
        # Any other error here is an after_commit hook's: the data is committed, and the
        # ack policy treats the error as a handler's. A cancellation during the commit
        # leaves the message unacked (FastStream 0.7 does not settle a cancelled handler's
        # message), so it comes again: at least once.

    async def _redeliver(self, msg: StreamMessage[Any], what: str, error: BaseException) -> None:
        """Nack ``msg`` after ``what`` happened, so that the broker delivers it again."""
        if msg.committed is AckStatus.NACKED:  # the handler nacked it: it comes again anyway
            _log.warning("%s for message %s, already nacked", what, msg.message_id)
            return
        if msg.committed is not None or self._ack_policy() is AckPolicy.ACK_FIRST:
            state = msg.committed.value if msg.committed is not None else "ACKED on delivery"
            _log.error(
                "%s for message %s, which was already %s (ack_policy=ACK_FIRST or settled "
                "by the handler): it will not be redelivered: %s",
                what,
                msg.message_id,
                state,
                error,
            )
            return
        try:
            await msg.nack()
        except Exception:
            _log.exception(
                "%s for message %s and nacking it failed too; it is redelivered only if the "
                "broker sees no ack (e.g. when the connection closes)",
                what,
                msg.message_id,
            )
        else:
            _log.warning("%s for message %s: nacked for redelivery", what, msg.message_id)

    def _ack_policy(self) -> AckPolicy | None:
        subscriber = self.context.get_local("handler_")
        policy = getattr(subscriber, "ack_policy", None)
        return policy if isinstance(policy, AckPolicy) else None


def _is_error(exc: BaseException) -> bool:
    """An error of the handler, not one of its decisions nor a cancellation.

    ``NackMessage``, ``RejectMessage`` and ``SkipMessage`` settle the message as the handler
    asked; a cancelled handler's message is left unsettled by FastStream, so it comes again.
    """
    return isinstance(exc, Exception) and not isinstance(exc, HandlerException)
