"""SessionMiddleware on FastStream's RabbitBroker against a real RabbitMQ, on every backend.

Each test declares queues of its own (uuid names; auto-deleted, or deleted at the end, and
in any case expired by the server after a minute unused). Acknowledgements are observed
where FastStream makes them: ``RabbitMessage.ack/nack/reject`` are wrapped to record each
message's first settlement (the one that reaches RabbitMQ; later calls are no-ops), together
with the rows committed at that moment as another connection sees them. Commits are
recorded by the Database's ``after_commit`` hook, so ``order`` shows commits and
settlements in the sequence they happened. A redelivery is RabbitMQ's own:
``raw_message.redelivered``.

RabbitMQ is 127.0.0.1:5672, guest/guest (override with SQLA_CONTEXT_RABBIT_URL); when it
is unreachable the tests skip, or fail under SQLA_CONTEXT_REQUIRE_SERVERS=1. The rule for
early commits is also checked on a Redis stream (SQLA_CONTEXT_REDIS_URL, 127.0.0.1:6379) and
on NATS JetStream (SQLA_CONTEXT_NATS_URL, 127.0.0.1:4222), the same way, with their own
message classes' settlements recorded. A few extra tests use FastStream's in-memory
TestRabbitBroker.
"""

# No `from __future__ import annotations`: FastStream (fast_depends) reads the handlers'
# annotations.

import asyncio
import contextlib
import importlib
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import aio_pika
import nats
import pytest
from faststream import AckPolicy, Depends, StreamMessage
from faststream.exceptions import AckMessage, NackMessage, RejectMessage
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsMessage
from faststream.rabbit import RabbitBroker, RabbitQueue, TestRabbitBroker
from faststream.rabbit.annotations import RabbitMessage as Message
from faststream.rabbit.message import RabbitMessage
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.message import RedisStreamMessage
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_context import scope
from sqla_context.faststream import SessionMiddleware

from ..conftest import REQUIRE_SERVERS, Backend, insert
from .conftest import require

RABBIT_URL = os.environ.get("SQLA_CONTEXT_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("SQLA_CONTEXT_NATS_URL", "nats://127.0.0.1:4222")

#: Upper bound of every wait; never reached when a test passes.
TIMEOUT = 30.0

_rabbit_problem: list[str | None] = []  # probed once per run


@pytest.fixture
async def rabbit_url() -> str:
    if not _rabbit_problem:
        try:
            connection = await asyncio.wait_for(aio_pika.connect(RABBIT_URL), 10)
            await connection.close()
            _rabbit_problem.append(None)
        except Exception as exc:
            _rabbit_problem.append(
                f"RabbitMQ at {RABBIT_URL} is unreachable: {type(exc).__name__}: {exc}"
            )
    problem = _rabbit_problem[0]
    if problem is not None:
        if REQUIRE_SERVERS:
            pytest.fail(f"SQLA_CONTEXT_REQUIRE_SERVERS is set but {problem}")
        pytest.skip(problem)
    return RABBIT_URL


@pytest.fixture
async def nats_url() -> str:
    async def probe() -> None:
        client = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
        try:
            await client.jetstream().account_info()  # JetStream is enabled
        finally:
            await client.close()

    await require(f"NATS JetStream at {NATS_URL}", probe)
    return NATS_URL


def unique_queue(**options: Any) -> RabbitQueue:
    """A queue of this test's own, dropped by the server after a minute without consumers."""
    options.setdefault("auto_delete", True)
    return RabbitQueue(f"sqla-ctx-{uuid.uuid4().hex}", arguments={"x-expires": 60_000}, **options)


async def delete_queue(name: str) -> None:
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def within(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, TIMEOUT)


@dataclass(frozen=True)
class Settlement:
    kind: str  # "ack" | "nack" | "reject"
    body: bytes
    redelivered: bool
    committed: list[str]  # the rows committed right before the settlement was sent
    checked_out: int  # connections of the Database checked out at that moment


class Harness:
    """One backend's Database, RabbitMQ brokers with SessionMiddleware, and what happened.

    ``order`` lists "commit" (from the after_commit hook) and each message's first
    settlement ("ack", "nack", "reject"); ``settled`` yields the settlements as they happen.
    """

    def __init__(
        self,
        backend: Backend,
        monkeypatch: pytest.MonkeyPatch,
        message_class: type[StreamMessage[Any]] = RabbitMessage,
        redelivered: Callable[[Any], bool] = lambda message: message.raw_message.redelivered,
    ) -> None:
        self.backend = backend
        self.order: list[str] = []
        self.db = backend.database(after_commit=lambda _session: self.order.append("commit"))
        self.settled: asyncio.Queue[Settlement] = asyncio.Queue()
        self.redelivered = redelivered
        for kind in ("ack", "nack", "reject"):
            monkeypatch.setattr(message_class, kind, self._recording(message_class, kind))

    def _recording(self, message_class: type[StreamMessage[Any]], kind: str) -> Any:
        original = getattr(message_class, kind)
        harness = self

        async def settle(message: Any, *args: Any, **kwargs: Any) -> None:
            if message.committed is not None:  # already settled: FastStream makes it a no-op
                await original(message, *args, **kwargs)
                return
            # What holds right before the settlement goes to RabbitMQ. (Right after a nack
            # the redelivery may already be running in another task.)
            position = len(harness.order)
            harness.order.append(kind)
            checked_out = harness.db.engine.pool.checkedout()
            committed = await harness.backend.names()
            try:
                await original(message, *args, **kwargs)
            except BaseException:
                harness.order[position] = f"{kind} failed"
                raise
            harness.settled.put_nowait(
                Settlement(
                    kind,
                    message.body,
                    bool(harness.redelivered(message)),
                    committed,
                    checked_out,
                )
            )

        return settle

    def broker(self, **options: Any) -> RabbitBroker:
        options.setdefault("graceful_timeout", 10)
        return RabbitBroker(RABBIT_URL, middlewares=[SessionMiddleware], **options)

    async def next_settlement(self) -> Settlement:
        settlement: Settlement = await within(self.settled.get())
        return settlement


@pytest.fixture
def harness(backend: Backend, rabbit_url: str, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(backend, monkeypatch)


@pytest.fixture
def sqlite_harness(sqlite: Backend, rabbit_url: str, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(sqlite, monkeypatch)


async def assert_clean(harness: Harness, rows: list[str]) -> None:
    """Exactly ``rows`` are committed, no connection is checked out, no transaction is open."""
    assert await harness.backend.names() == rows
    assert harness.db.engine.pool.checkedout() == 0
    assert await harness.backend.open_transactions() == 0


def commits_early(harness: Harness) -> tuple[Callable[[str], Awaitable[None]], list[list[str]]]:
    """A handler that commits row A early, writes B, and fails on its first delivery.

    It is idempotent up to its early commit, as the rule asks: a delivery that finds A (left
    by an earlier one) does not write it again. ``seen`` gets the committed rows each
    delivery found.
    """
    seen: list[list[str]] = []

    async def handle(body: str) -> None:
        seen.append(await harness.backend.names())
        session = await harness.db.session()
        if f"{body}-A" not in seen[-1]:
            await insert(session, f"{body}-A")
            await harness.db.commit()  # final: no later failure undoes it
        await insert(session, f"{body}-B")
        if len(seen) == 1:
            raise RuntimeError("failed after the early commit")

    return handle, seen


async def assert_early_commit_rule(
    harness: Harness, seen: list[list[str]], *, redelivered: bool = True
) -> None:
    """The first delivery was nacked with A committed and B not; the next one finished."""
    first = await harness.next_settlement()
    # Under the default REJECT_ON_ERROR a failed handler is rejected: dropped with its work
    # half done. A partly committed message is nacked instead, and delivered again.
    assert (first.kind, first.committed, first.checked_out) == ("nack", ["a-A"], 0)
    second = await harness.next_settlement()
    assert (second.kind, second.committed, second.checked_out) == ("ack", ["a-A", "a-B"], 0)
    assert second.redelivered is redelivered
    assert seen == [[], ["a-A"]]  # the redelivery found A and did only B
    assert harness.order == ["commit", "nack", "commit", "ack"]
    await assert_clean(harness, ["a-A", "a-B"])


@contextlib.asynccontextmanager
async def running(broker: Any) -> AsyncIterator[Any]:
    await within(broker.start())
    try:
        yield broker
    finally:
        await within(broker.stop())


# -- the guarantees, on every backend --------------------------------------------------------


async def test_commits_when_the_handler_returns_then_acks(harness: Harness) -> None:
    broker, queue = harness.broker(), unique_queue()
    db = harness.db

    async def record(name: str) -> AsyncSession:  # deeper in the call stack
        session = await db.session()
        await insert(session, name)
        return session

    @broker.subscriber(queue)
    async def handle(body: str) -> None:
        assert await record(body) is await db.session()
        await record(f"{body}-2")

    async with running(broker):
        await broker.publish("a", queue)
        settlement = await harness.next_settlement()

    assert (settlement.kind, settlement.body, settlement.redelivered) == ("ack", b"a", False)
    # Acked only once the rows were committed (seen from another connection) and the
    # session was closed.
    assert settlement.committed == ["a", "a-2"]
    assert settlement.checked_out == 0
    assert harness.order == ["commit", "ack"]
    assert await harness.backend.names() == ["a", "a-2"]


async def test_rolls_back_when_the_handler_raises(harness: Harness) -> None:
    broker, queue = harness.broker(), unique_queue()

    @broker.subscriber(queue)  # the default policy: REJECT_ON_ERROR
    async def handle(body: str) -> None:
        await insert(await harness.db.session(), body)
        raise RuntimeError("handler bug")

    async with running(broker):
        await broker.publish("a", queue)
        settlement = await harness.next_settlement()

    assert (settlement.kind, settlement.committed, settlement.checked_out) == ("reject", [], 0)
    assert harness.order == ["reject"]
    assert await harness.backend.names() == []


@pytest.mark.parametrize(
    "policy",
    [AckPolicy.REJECT_ON_ERROR, AckPolicy.NACK_ON_ERROR, AckPolicy.ACK],
    ids=lambda policy: policy.value,
)
async def test_failed_commit_is_redelivered_then_committed_once(
    harness: Harness, policy: AckPolicy
) -> None:
    """Under every policy, ACK (which acks failed handlers) included: nacked, never lost."""
    broker, queue = harness.broker(), unique_queue()
    deliveries: list[bool] = []

    @broker.subscriber(queue, ack_policy=policy)
    async def handle(body: str, message: Message) -> None:
        deliveries.append(message.raw_message.redelivered)
        session = await harness.db.session()
        await insert(session, body)
        if len(deliveries) == 1:
            await harness.backend.doom(session)  # the COMMIT will fail

    async with running(broker):
        await broker.publish("a", queue)
        first = await harness.next_settlement()
        second = await harness.next_settlement()

    assert (first.kind, first.redelivered, first.committed, first.checked_out) == (
        "nack",
        False,
        [],
        0,
    )
    assert (second.kind, second.redelivered, second.committed) == ("ack", True, ["a"])
    assert deliveries == [False, True]
    assert harness.order == ["nack", "commit", "ack"]
    assert await harness.backend.names() == ["a"]


async def test_early_close_session_in_a_handler(harness: Harness) -> None:
    broker, queue = harness.broker(), unique_queue()
    db, seen = harness.db, {}

    @broker.subscriber(queue)
    async def handle(body: str) -> None:
        await insert(await db.session(), body)
        await db.close_session()  # committed now, connection back in the pool
        seen["checked_out"] = db.engine.pool.checkedout()
        seen["committed"] = await harness.backend.names()
        await insert(await db.session(), f"{body}-after")  # a fresh session

    async with running(broker):
        await broker.publish("a", queue)
        settlement = await harness.next_settlement()

    assert seen == {"checked_out": 0, "committed": ["a"]}
    assert (settlement.kind, settlement.committed, settlement.checked_out) == (
        "ack",
        ["a", "a-after"],
        0,
    )
    assert harness.order == ["commit", "commit", "ack"]


async def test_failed_early_close_is_redelivered(harness: Harness) -> None:
    """A CommitError from db.close_session() escaping the handler counts as a failed commit."""
    broker, queue = harness.broker(), unique_queue()
    deliveries: list[bool] = []

    @broker.subscriber(queue)  # REJECT_ON_ERROR would drop a failed handler's message
    async def handle(body: str, message: Message) -> None:
        deliveries.append(message.raw_message.redelivered)
        session = await harness.db.session()
        await insert(session, body)
        if len(deliveries) == 1:
            await harness.backend.doom(session)
        await harness.db.close_session()

    async with running(broker):
        await broker.publish("a", queue)
        first = await harness.next_settlement()
        second = await harness.next_settlement()

    assert (first.kind, first.committed) == ("nack", [])
    assert (second.kind, second.redelivered, second.committed) == ("ack", True, ["a"])
    assert await harness.backend.names() == ["a"]


async def test_broker_stopped_mid_transaction_leaks_nothing_and_loses_nothing(
    harness: Harness,
) -> None:
    backend, db = harness.backend, harness.db
    queue = unique_queue(auto_delete=False)  # the message must survive the first consumer
    inside = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    first = harness.broker(graceful_timeout=None)  # stop() cancels the handler at once

    @first.subscriber(queue)
    async def stuck(body: str) -> None:
        await insert(await db.session(), body)
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        inside.set()
        await asyncio.Event().wait()  # until the broker stops

    second = harness.broker()
    redelivered: list[bool] = []

    @second.subscriber(queue)
    async def finish(body: str, message: Message) -> None:
        redelivered.append(message.raw_message.redelivered)
        await insert(await db.session(), body)

    try:
        async with running(first):
            await first.publish("a", queue)
            await within(inside.wait())
            assert db.engine.pool.checkedout() == 1
            if backend.kind != "sqlite":
                assert await backend.open_transactions() == 1  # really mid-transaction
        # The handler was cancelled; its task ends once the rollback is done.
        await within(asyncio.wait(tasks))
        assert db.engine.pool.checkedout() == 0
        assert await backend.open_transactions() == 0
        assert await backend.names() == []
        # Neither committed nor acked. (FastStream 0.7 does not settle a cancelled handler's
        # message; 0.6 tries to reject it, which fails on the closed channel.)
        assert "commit" not in harness.order
        assert "ack" not in harness.order

        async with running(second):  # RabbitMQ requeued the unacked message
            settlement = await harness.next_settlement()
    finally:
        await delete_queue(queue.name)

    assert (settlement.kind, settlement.committed) == ("ack", ["a"])
    assert redelivered == [True]


async def test_failure_after_an_early_commit_is_redelivered(harness: Harness) -> None:
    """The rule for early commits: a partly committed message is never settled as failed."""
    broker, queue = harness.broker(), unique_queue()
    handle, seen = commits_early(harness)
    broker.subscriber(queue)(handle)  # the default policy: REJECT_ON_ERROR

    async with running(broker):
        await broker.publish("a", queue)
        await assert_early_commit_rule(harness, seen)


# -- behaviour that does not depend on the database (SQLite, real RabbitMQ) -------------------


async def test_each_message_runs_in_its_own_scope(sqlite_harness: Harness) -> None:
    """Never the scope active where the broker started (its tasks inherit that context)."""
    harness = sqlite_harness
    db = harness.db
    broker, queue = harness.broker(), unique_queue()
    sessions: list[tuple[AsyncSession, AsyncSession]] = []

    @broker.subscriber(queue)
    async def handle(body: str, injected: Annotated[AsyncSession, Depends(db.session)]) -> None:
        sessions.append((injected, await db.session()))
        await insert(injected, body)

    async with scope():
        outer = await db.session()
        async with running(broker):
            await broker.publish("a", queue)
            await broker.publish("b", queue)
            settlements = [await harness.next_settlement() for _ in range(2)]
        assert await db.session() is outer  # the outer scope is untouched

    assert [s.kind for s in settlements] == ["ack", "ack"]
    (first_injected, first), (second_injected, second) = sessions
    assert first_injected is first
    assert second_injected is second
    assert len({id(outer), id(first), id(second)}) == 3
    assert await harness.backend.names() == ["a", "b"]


async def test_ack_message_commits_nack_message_rolls_back(sqlite_harness: Harness) -> None:
    harness = sqlite_harness
    broker, queue = harness.broker(), unique_queue()
    deliveries: list[bool] = []

    @broker.subscriber(queue)
    async def handle(body: str, message: Message) -> None:
        deliveries.append(message.raw_message.redelivered)
        await insert(await harness.db.session(), f"{body}-{len(deliveries)}")
        if body == "ack":
            raise AckMessage()  # success: committed, then acked
        if len(deliveries) == 2:
            raise NackMessage()  # rolled back, then nacked: delivered again

    async with running(broker):
        await broker.publish("ack", queue)
        acked = await harness.next_settlement()
        await broker.publish("nack", queue)
        nacked = await harness.next_settlement()
        redelivered = await harness.next_settlement()

    assert (acked.kind, acked.committed) == ("ack", ["ack-1"])
    assert (nacked.kind, nacked.committed) == ("nack", ["ack-1"])
    assert (redelivered.kind, redelivered.redelivered) == ("ack", True)
    assert await harness.backend.names() == ["ack-1", "nack-3"]


async def test_reply_is_published_after_the_commit(sqlite_harness: Harness) -> None:
    harness = sqlite_harness
    broker, queue = harness.broker(), unique_queue()

    @broker.subscriber(queue)
    async def handle(body: str) -> str:
        await insert(await harness.db.session(), body)
        return "done"

    async with running(broker):
        async with scope():  # the reply passes the middleware on the caller's side untouched
            outer = await harness.db.session()
            reply = await within(broker.request("a", queue, timeout=TIMEOUT))
            committed = await harness.backend.names()
            assert await harness.db.session() is outer
        settlement = await harness.next_settlement()

    assert await reply.decode() == "done"
    assert committed == ["a"]  # visible as soon as the reply arrived
    assert settlement.kind == "ack"


async def test_ack_first_cannot_redeliver_and_says_so(
    sqlite_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """ACK_FIRST: RabbitMQ considers the message delivered before the handler runs."""
    harness = sqlite_harness
    broker, queue = harness.broker(), unique_queue()
    tasks: list[asyncio.Task[Any]] = []
    started = asyncio.Event()

    @broker.subscriber(queue, ack_policy=AckPolicy.ACK_FIRST)
    async def handle(body: str) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        session = await harness.db.session()
        await insert(session, body)
        await harness.backend.doom(session)

    with caplog.at_level(logging.ERROR, logger="sqla_context"):
        async with running(broker):
            await broker.publish("a", queue)
            await within(started.wait())
            await within(asyncio.wait(tasks))  # the task ends after the middleware is done

    assert harness.order == []  # no ack/nack call: the consumer runs with no_ack
    assert "will not be redelivered" in caplog.text
    assert await harness.backend.names() == []


async def test_reject_after_an_early_commit_is_the_handler_s_decision(
    sqlite_harness: Harness,
) -> None:
    harness = sqlite_harness
    broker, queue = harness.broker(), unique_queue()

    @broker.subscriber(queue)
    async def handle(body: str) -> None:
        await insert(await harness.db.session(), f"{body}-A")
        await harness.db.close_session()  # an early commit
        await insert(await harness.db.session(), f"{body}-B")
        raise RejectMessage()

    async with running(broker):
        await broker.publish("a", queue)
        settlement = await harness.next_settlement()

    assert (settlement.kind, settlement.committed) == ("reject", ["a-A"])
    assert harness.order == ["commit", "reject"]
    await assert_clean(harness, ["a-A"])


# -- the rule for early commits on FastStream's other brokers (SQLite) -------------------------


async def test_early_commit_rule_on_a_redis_stream(
    sqlite: Backend, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis streams settle nothing but an ack (XACK): a nacked message stays pending.

    A subscriber with ``min_idle_time`` claims it (XAUTOCLAIM) once it has been idle that
    long, and its delivery finishes the work.
    """
    harness = Harness(sqlite, monkeypatch, RedisStreamMessage, lambda _message: False)
    name = f"sqla-ctx-{uuid.uuid4().hex}"
    broker = RedisBroker(redis_url, middlewares=[SessionMiddleware], graceful_timeout=10)
    handle, seen = commits_early(harness)
    consumers: list[str] = []

    @broker.subscriber(stream=StreamSub(name, group=name, consumer="first", polling_interval=50))
    async def first(body: str) -> None:
        consumers.append("first")
        await handle(body)

    reclaimer = StreamSub(
        name, group=name, consumer="reclaimer", min_idle_time=200, polling_interval=50
    )

    @broker.subscriber(stream=reclaimer)
    async def reclaim(body: str) -> None:
        consumers.append("reclaimer")
        await handle(body)

    try:
        async with running(broker):
            await broker.publish("a", stream=name)
            await assert_early_commit_rule(harness, seen, redelivered=False)
            async with Redis.from_url(redis_url) as client:
                assert (await client.xpending(name, name))["pending"] == 0  # acked at last
    finally:
        async with Redis.from_url(redis_url) as client:
            await client.delete(name)
    assert consumers == ["first", "reclaimer"]


async def test_early_commit_rule_on_nats_jetstream(
    sqlite: Backend, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream: a nack is a NAK, redelivered at once; a reject would be a TERM (dropped)."""

    def redelivered(message: NatsMessage) -> bool:
        return bool(message.raw_message.metadata.num_delivered > 1)

    harness = Harness(sqlite, monkeypatch, NatsMessage, redelivered)
    name = f"sqla-ctx-{uuid.uuid4().hex}"
    broker = NatsBroker(nats_url, middlewares=[SessionMiddleware], graceful_timeout=10)
    handle, seen = commits_early(harness)
    stream = JStream(name, subjects=[name])
    # A pull consumer, as FastStream recommends; a short fetch timeout lets stop() be quick.
    broker.subscriber(name, stream=stream, durable=name, pull_sub=PullSub(timeout=0.2))(handle)

    try:
        async with running(broker):
            await broker.publish("a", name, stream=name)
            await assert_early_commit_rule(harness, seen)
    finally:
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().delete_stream(name)
        finally:
            await client.close()


# -- FastStream's in-memory TestRabbitBroker (no server) --------------------------------------


async def test_in_memory_test_broker(sqlite: Backend) -> None:
    db = sqlite.database()
    broker = RabbitBroker(middlewares=[SessionMiddleware])
    seen: list[AsyncSession] = []

    @broker.subscriber("orders")
    async def handle(body: str) -> None:
        seen.append(await db.session())
        await insert(await db.session(), body)
        if body == "bad":
            raise ValueError(body)

    class Boom(Exception):
        pass

    async with TestRabbitBroker(broker) as test_broker:
        with pytest.raises(ValueError, match="bad"):
            await test_broker.publish("bad", "orders")
        # The handler runs inline in the publisher's task, yet in a scope of its own:
        # its work is committed although the publisher's scope rolls back.
        with pytest.raises(Boom):
            async with scope():
                outer = await db.session()
                await test_broker.publish("ok", "orders")
                raise Boom

    assert seen[1] is not outer
    assert await sqlite.names() == ["ok"]


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faststream", None)  # makes `import faststream` fail
    monkeypatch.delitem(sys.modules, "sqla_context.faststream")
    with pytest.raises(ImportError, match=r"pip install 'sqla-context\[faststream\]'"):
        importlib.import_module("sqla_context.faststream")
