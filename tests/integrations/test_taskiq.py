"""SessionMiddleware on a real taskiq worker: a Redis stream broker and an in-process Receiver.

Each test gets a stream and consumer group of its own (uuid names, deleted afterwards) and
runs taskiq's own ``Receiver.listen`` loop as an asyncio task in the test's event loop, so
it can read the pool directly. Acknowledgements are observed on Redis: a message still in
the group's pending list (XPENDING) was not acknowledged.

Redis is 127.0.0.1:6379 (override with SQLA_CONTEXT_REDIS_URL); when it is unreachable the
tests skip, or fail under SQLA_CONTEXT_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import pytest
from redis.asyncio import Redis
from taskiq import (
    AckableMessage,
    AcknowledgeType,
    Context,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)
from taskiq.exceptions import SendTaskError
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from sqla_context import CommitError, NoScopeError, scope
from sqla_context import taskiq as sqla_taskiq
from sqla_context.taskiq import SessionMiddleware

from ..conftest import Backend, assert_clean, insert

#: Upper bound of every wait; never reached when a test passes.
TIMEOUT = 30.0


class RecordingReceiver(Receiver):
    """taskiq's Receiver, reporting the end of each message's handling (and its error).

    The error is recorded instead of escaping the callback task, where asyncio would only
    log it as never retrieved. Everything taskiq decides (hooks, result, ack) happens inside
    ``super().callback`` and is unchanged.
    """

    def __init__(self, broker: Any, **options: Any) -> None:
        super().__init__(broker, run_startup=False, max_async_tasks=10, **options)
        self.finished: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def callback(self, message: bytes | AckableMessage, raise_err: bool = False) -> None:
        try:
            await super().callback(message, raise_err=raise_err)
        except BaseException as exc:
            self.finished.put_nowait(exc)
        else:
            self.finished.put_nowait(None)

    async def next_finished(self) -> BaseException | None:
        return await asyncio.wait_for(self.finished.get(), TIMEOUT)


class Worker:
    """A stream broker, its tasks and a running Receiver, for one test."""

    def __init__(self, broker: RedisStreamBroker, receiver: RecordingReceiver) -> None:
        self.broker = broker
        self.receiver = receiver

    async def pending(self) -> int:
        """Messages delivered to the consumer group and not acknowledged (XPENDING)."""
        async with Redis(connection_pool=self.broker.connection_pool) as conn:
            info = await conn.xpending(self.broker.queue_name, self.broker.consumer_group_name)
        return int(info["pending"])

    async def kiq(self, task_name: str, *args: Any) -> None:
        task = self.broker.find_task(task_name)
        assert task is not None
        await task.kiq(*args)


@contextlib.asynccontextmanager
async def worker(
    redis_url: str,
    register: Callable[[RedisStreamBroker], None],
    *,
    session_middleware: SessionMiddleware | None = None,
    idle_timeout: int = 300,
    **receiver_options: Any,
) -> AsyncIterator[Worker]:
    """Run a Receiver on a fresh stream; ``register(broker)`` defines the tasks first.

    ``idle_timeout`` (ms): an unacknowledged message is reclaimed soon. taskiq-redis before
    1.2.3 reclaims on every turn of its listen loop (``xread_block``), not only after a fetch:
    there a task still running after ``idle_timeout`` is delivered a second time meanwhile.
    """
    name = f"sqla-ctx-test-{uuid.uuid4().hex}"
    broker = RedisStreamBroker(
        redis_url,
        queue_name=name,
        consumer_group_name=name,
        xread_block=100,  # ms: the listen loop wakes up often, shutdown is quick
        idle_timeout=idle_timeout,
    )
    broker.add_middlewares(session_middleware or SessionMiddleware())
    register(broker)
    await broker.startup()  # creates the consumer group, reading from now on
    receiver = RecordingReceiver(broker, **receiver_options)
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    try:
        yield Worker(broker, receiver)
    finally:
        finish.set()
        try:
            await asyncio.wait_for(listening, TIMEOUT)
        finally:
            async with Redis(connection_pool=broker.connection_pool) as conn:
                await conn.delete(name, f"autoclaim:{name}:{name}")
            await broker.shutdown()


# -- on every backend -------------------------------------------------------------------------


async def test_commit_when_the_task_returns(backend: Backend, redis_url: str) -> None:
    db = backend.database()
    seen: list[bool] = []

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="add")
        async def add(name: str) -> None:
            await insert(await db.session(), name)
            seen.append(await db.session() is await db.session())

    async with worker(redis_url, register) as w:
        await w.kiq("add", "ada")
        assert await w.receiver.next_finished() is None
        assert await w.pending() == 0, "acknowledged after the commit"
    assert seen == [True]
    await assert_clean(backend, db, ["ada"])


async def test_rollback_when_the_task_raises(backend: Backend, redis_url: str) -> None:
    db = backend.database()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="fail")
        async def fail(name: str) -> None:
            await insert(await db.session(), name)
            raise RuntimeError("task bug")

    async with worker(redis_url, register) as w:
        await w.kiq("fail", "lost")
        assert await w.receiver.next_finished() is None  # taskiq handled the task's error
        # Nothing was committed, so taskiq acknowledging a failed task (its usual contract;
        # retries come from a retry middleware) loses nothing.
        assert await w.pending() == 0
    await assert_clean(backend, db, [])


async def test_failed_commit_is_not_acknowledged_and_is_redelivered(
    backend: Backend, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = backend.database()
    attempts: list[str] = []

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="doomed")
        async def doomed(name: str) -> None:
            attempts.append(name)
            session = await db.session()
            await insert(session, name)
            if len(attempts) == 1:
                await backend.doom(session)  # the first COMMIT fails at the server

        @broker.task(task_name="nudge")
        async def nudge() -> None:
            """A message for the listen loop: it reclaims idle pending ones after a fetch."""

    async with worker(redis_url, register) as w:
        await w.kiq("doomed", "once")
        error = await w.receiver.next_finished()
        assert isinstance(error, CommitError)
        assert await w.pending() == 1, "a failed commit must not be acknowledged"
        await assert_clean(backend, db, [])
        ours = [r for r in caplog.records if r.name.startswith("sqla_context")]
        errors = [r for r in ours if r.levelname == "ERROR"]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # logged once
        assert "commit failed for taskiq task doomed" in errors[0].getMessage()
        assert "'once'" not in errors[0].getMessage(), "no SQL parameters in the log"
        caplog.clear()

        # The broker redelivers the message once it has been idle for idle_timeout.
        await asyncio.sleep(0.4)  # the broker's clock, not a synchronisation
        await w.kiq("nudge")
        assert await w.receiver.next_finished() is None  # the nudge
        assert await w.receiver.next_finished() is None  # the redelivered message
        assert attempts == ["once", "once"]
        assert await w.pending() == 0
    await assert_clean(backend, db, ["once"])


async def test_close_session_inside_a_task_commits_early(backend: Backend, redis_url: str) -> None:
    db = backend.database()
    seen: dict[str, Any] = {}

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="early")
        async def early(name: str) -> None:
            await insert(await db.session(), name)
            await db.close_session()
            seen["checked_out"] = db.engine.pool.checkedout()
            seen["committed"] = await backend.names()
            await insert(await db.session(), f"{name}-after")  # a fresh session, same scope

    async with worker(redis_url, register) as w:
        await w.kiq("early", "early")
        assert await w.receiver.next_finished() is None
        assert await w.pending() == 0
    assert seen == {"checked_out": 0, "committed": ["early"]}
    await assert_clean(backend, db, ["early", "early-after"])


async def test_timeout_rolls_back_and_leaks_nothing(backend: Backend, redis_url: str) -> None:
    db = backend.database()
    parked = asyncio.Event()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="slow", timeout=0.5)
        async def slow(name: str) -> None:
            await insert(await db.session(), name)  # a transaction is open from here
            parked.set()
            await asyncio.Event().wait()  # until taskiq's timeout cancels the task

    # The task runs for its timeout (0.5 s), longer than the default idle_timeout: no
    # redelivery while it runs (see worker()), this test is about the timeout alone.
    async with worker(redis_url, register, idle_timeout=60_000) as w:
        await w.kiq("slow", "slow")
        await asyncio.wait_for(parked.wait(), TIMEOUT)
        assert await w.receiver.next_finished() is None
        await assert_clean(backend, db, [])
        assert await w.pending() == 0  # a failed task, acknowledged after its rollback


async def redeliver(w: Worker) -> None:
    """Let the broker reclaim the messages left pending, and wait for the nudge's handling.

    The broker hands out a pending message again once it has been idle for idle_timeout,
    checked when its listen loop fetches a message (the nudge).
    """
    await asyncio.sleep(0.4)  # the broker's clock, not a synchronisation
    await w.kiq("nudge")


def nudge_task(broker: RedisStreamBroker) -> None:
    @broker.task(task_name="nudge")
    async def nudge() -> None:
        """A message for the listen loop: it reclaims idle pending ones after a fetch."""


async def test_cancelled_task_is_rolled_back_and_not_acknowledged(
    backend: Backend, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """taskiq reports a cancellation as the task's error: it must not lead to an ack."""
    db = backend.database()
    parked = asyncio.Event()
    handling: list[asyncio.Task[Any]] = []

    def register(broker: RedisStreamBroker) -> None:
        nudge_task(broker)

        @broker.task(task_name="cancelled")
        async def cancelled(name: str) -> None:
            await insert(await db.session(), f"{name}-{len(handling) + 1}")
            if not handling:
                handling.append(asyncio.current_task())  # type: ignore[arg-type]
                parked.set()
                await asyncio.Event().wait()  # until the worker cancels the handling

    async with worker(redis_url, register) as w:
        await w.kiq("cancelled", "a")
        await asyncio.wait_for(parked.wait(), TIMEOUT)
        assert db.engine.pool.checkedout() == 1  # really mid-transaction
        handling[0].cancel()  # what a worker does to a handling it gives up on
        error = await w.receiver.next_finished()
        assert await w.pending() == 1, "a cancelled task must not be acknowledged"
        assert isinstance(error, asyncio.CancelledError)  # the handling ended cancelled
        await assert_clean(backend, db, [])
        assert "taskiq task cancelled (id" in caplog.text

        await redeliver(w)
        assert await w.receiver.next_finished() is None
        assert await w.receiver.next_finished() is None
        assert await w.pending() == 0
    await assert_clean(backend, db, ["a-2"])


async def test_failure_after_an_early_commit_is_delivered_again(
    backend: Backend, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The rule for early commits: a partly committed message is never acked as failed."""
    db = backend.database()
    attempts: list[list[str]] = []

    def register(broker: RedisStreamBroker) -> None:
        nudge_task(broker)

        @broker.task(task_name="early")
        async def early(name: str) -> None:
            attempts.append(await backend.names())  # what the earlier attempts left
            session = await db.session()
            if f"{name}-A" not in attempts[-1]:  # idempotent up to its early commit
                await insert(session, f"{name}-A")
                await db.commit()  # final: no later failure undoes it
            await insert(session, f"{name}-B")
            if len(attempts) == 1:
                raise RuntimeError("the slow call after the early commit failed")

    async with worker(redis_url, register) as w:
        await w.kiq("early", "x")
        error = await w.receiver.next_finished()
        assert await w.pending() == 1, "not acknowledged: the rest of its work must be done"
        assert isinstance(error, RuntimeError)  # re-raised by on_error, before the ack
        await assert_clean(backend, db, ["x-A"])  # A stays, B was rolled back
        assert "failed after committing part of its work" in caplog.text

        await redeliver(w)
        assert await w.receiver.next_finished() is None
        assert await w.receiver.next_finished() is None
        assert await w.pending() == 0
    assert attempts == [[], ["x-A"]]  # the second attempt found A and did only B
    await assert_clean(backend, db, ["x-A", "x-B"])


# -- ack configurations and failure paths (independent of the database) ----------------------


async def test_ack_after_commit_also_on_a_when_executed_worker(
    sqlite: Backend, redis_url: str
) -> None:
    db = sqlite.database()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="doomed")
        async def doomed() -> None:
            await sqlite.doom(await db.session())

    async with worker(redis_url, register, ack_type=AcknowledgeType.WHEN_EXECUTED) as w:
        await w.kiq("doomed")
        assert isinstance(await w.receiver.next_finished(), CommitError)
        assert await w.pending() == 1
    await assert_clean(sqlite, db, [])


async def test_explicit_when_received_label_is_kept(sqlite: Backend, redis_url: str) -> None:
    db = sqlite.database()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="doomed", ack_type="when_received")
        async def doomed() -> None:
            await sqlite.doom(await db.session())

    async with worker(redis_url, register) as w:
        await w.kiq("doomed")
        assert isinstance(await w.receiver.next_finished(), CommitError)
        assert await w.pending() == 0, "at-most-once, as the task asked"
    await assert_clean(sqlite, db, [])


async def test_ack_after_commit_false_leaves_the_labels_alone(
    sqlite: Backend, redis_url: str
) -> None:
    db = sqlite.database()
    middleware = SessionMiddleware(ack_after_commit=False)

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="doomed")
        async def doomed() -> None:
            await sqlite.doom(await db.session())

    async with worker(
        redis_url,
        register,
        session_middleware=middleware,
        ack_type=AcknowledgeType.WHEN_EXECUTED,
    ) as w:
        await w.kiq("doomed")
        assert isinstance(await w.receiver.next_finished(), CommitError)
        assert await w.pending() == 0, "acknowledged before post_execute, as configured"
    await assert_clean(sqlite, db, [])


@pytest.mark.parametrize(
    ("labels", "ack_after_commit", "worker_ack", "pending"),
    [
        # on_error re-raises before the when_executed ack too, labels untouched or not
        pytest.param({}, False, AcknowledgeType.WHEN_EXECUTED, 1, id="when_executed"),
        pytest.param({}, True, AcknowledgeType.WHEN_SAVED, 1, id="when_saved"),
        # acked before the task ran: at most once, as the task asked
        pytest.param({"ack_type": "when_received"}, True, None, 0, id="when_received"),
    ],
)
async def test_cancellation_under_each_ack_type(
    sqlite: Backend,
    redis_url: str,
    labels: dict[str, Any],
    ack_after_commit: bool,
    worker_ack: AcknowledgeType | None,
    pending: int,
) -> None:
    db = sqlite.database()
    parked = asyncio.Event()
    handling: list[asyncio.Task[Any]] = []

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="cancelled", **labels)
        async def cancelled() -> None:
            await insert(await db.session(), "lost")
            handling.append(asyncio.current_task())  # type: ignore[arg-type]
            parked.set()
            await asyncio.Event().wait()

    middleware = SessionMiddleware(ack_after_commit=ack_after_commit)
    async with worker(redis_url, register, session_middleware=middleware, ack_type=worker_ack) as w:
        await w.kiq("cancelled")
        await asyncio.wait_for(parked.wait(), TIMEOUT)
        handling[0].cancel()
        error = await w.receiver.next_finished()
        assert await w.pending() == pending
        assert isinstance(error, asyncio.CancelledError)
    await assert_clean(sqlite, db, [])


async def test_task_that_turns_its_cancellation_into_an_error_is_not_acknowledged(
    sqlite: Backend, redis_url: str
) -> None:
    """The handling was cancelled, whatever the task raised on its way out."""
    db = sqlite.database()
    parked = asyncio.Event()
    handling: list[asyncio.Task[Any]] = []

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="converts")
        async def converts() -> None:
            await insert(await db.session(), "lost")
            handling.append(asyncio.current_task())  # type: ignore[arg-type]
            parked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("interrupted") from None

    async with worker(redis_url, register) as w:
        await w.kiq("converts")
        await asyncio.wait_for(parked.wait(), TIMEOUT)
        handling[0].cancel()
        error = await w.receiver.next_finished()
        assert await w.pending() == 1
        assert isinstance(error, asyncio.CancelledError)
        assert isinstance(error.__cause__, RuntimeError)
    await assert_clean(sqlite, db, [])


async def test_reject_after_an_early_commit_is_the_task_s_own_decision(
    sqlite: Backend, redis_url: str
) -> None:
    db = sqlite.database()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="gives_up")
        async def gives_up(context: Annotated[Context, TaskiqDepends()]) -> None:
            await insert(await db.session(), "A")
            await db.close_session()  # an early commit
            await insert(await db.session(), "B")
            context.reject()

    async with worker(redis_url, register) as w:
        await w.kiq("gives_up")
        assert await w.receiver.next_finished() is None
        assert await w.pending() == 0, "Context.reject(): acknowledged as the task asked"
    await assert_clean(sqlite, db, ["A"])


async def test_failed_early_close_is_not_acknowledged(
    sqlite: Backend, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A CommitError from db.close_session() escaping the task is a failed commit."""
    db = sqlite.database()

    def register(broker: RedisStreamBroker) -> None:
        @broker.task(task_name="doomed")
        async def doomed() -> None:
            session = await db.session()
            await insert(session, "lost")
            await sqlite.doom(session)
            await db.close_session()  # raises CommitError

    async with worker(redis_url, register) as w:
        await w.kiq("doomed")
        error = await w.receiver.next_finished()
        assert await w.pending() == 1, "a failed commit must not be acknowledged"
        assert isinstance(error, CommitError)
    assert "commit failed for taskiq task doomed" in caplog.text
    await assert_clean(sqlite, db, [])


class Breaks(TaskiqMiddleware):
    """A middleware whose post_execute raises before SessionMiddleware's can run."""

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        raise RuntimeError("metrics backend down")


async def test_sessions_are_rolled_back_when_post_execute_is_skipped(
    sqlite: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite.database()
    broker = InMemoryBroker()
    # Added after SessionMiddleware: its post_execute runs first and stops the others.
    broker.add_middlewares(SessionMiddleware(), Breaks())

    @broker.task(task_name="add")
    async def add(name: str) -> None:
        await insert(await db.session(), name)

    receiver = RecordingReceiver(broker)
    message = broker.formatter.dumps(
        TaskiqMessage(task_id="1", task_name="add", labels={}, args=["x"], kwargs={})
    ).message
    acked: list[bool] = []

    async def ack() -> None:
        acked.append(True)

    # A task of its own, as the Receiver runs each message: the safety net is its end.
    await asyncio.create_task(receiver.callback(AckableMessage(data=message, ack=ack)))
    assert isinstance(await receiver.next_finished(), RuntimeError)
    await asyncio.sleep(0)  # the handling task's done callbacks run after our wake-up
    await asyncio.wait_for(asyncio.gather(*sqla_taskiq._orphans), TIMEOUT)
    assert acked == []
    assert "ended without SessionMiddleware.post_execute" in caplog.text
    await assert_clean(sqlite, db, [])
    await broker.shutdown()


# -- InMemoryBroker: contexts and scopes --------------------------------------------------------


async def test_in_memory_task_gets_its_own_scope_and_restores_the_caller_context(
    sqlite: Backend,
) -> None:
    db = sqlite.database()
    broker = InMemoryBroker(await_inplace=True)  # the task runs in the caller's own task
    broker.add_middlewares(SessionMiddleware())
    sessions: list[Any] = []

    @broker.task
    async def add(name: str) -> None:
        sessions.append(await db.session())
        await insert(sessions[-1], name)

    await broker.startup()
    await add.kiq("outside")
    with pytest.raises(NoScopeError):  # the task's scope did not leak into the caller
        await db.session()

    async with scope(commit="never"):
        mine = await db.session()
        await add.kiq("inside")  # committed by the task's own scope
        assert sessions[-1] is not mine
        assert await db.session() is mine
        assert await sqlite.names() == ["inside", "outside"]
    await broker.shutdown()
    await assert_clean(sqlite, db, ["inside", "outside"])


async def test_in_memory_failed_commit_is_raised_to_the_caller(
    sqlite: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "sqla_context")
    db = sqlite.database()
    broker = InMemoryBroker(await_inplace=True)
    broker.add_middlewares(SessionMiddleware())

    @broker.task
    async def doomed() -> None:
        await sqlite.doom(await db.session())

    await broker.startup()
    with pytest.raises(SendTaskError) as raised:  # how taskiq's kiq() wraps a kick failure
        await doomed.kiq()
    assert isinstance(raised.value.__cause__, CommitError)
    assert "commit failed for taskiq task" in caplog.text
    await broker.shutdown()
    await assert_clean(sqlite, db, [])
