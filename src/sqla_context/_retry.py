"""Re-running a whole unit of work after a serialization failure or a deadlock.

A unit that lost a conflict with a concurrent transaction (SQLSTATE 40001 / 40P01 on
PostgreSQL, error 1213 on MySQL and MariaDB) did nothing wrong: the documented remedy is to
run the whole transaction again. ``call_retrying()`` does that for ``@scope(retry=...)``
and ``run_isolated(fn, retry=...)``: each attempt runs in a fresh unit, the failed one is
ended by the usual lifecycle (``_Unit.end(failed=True)``: rolled back, closed), then it
waits a jittered, exponentially growing delay and tries again, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from .exceptions import CommitError, ConfigurationError, RetryError, _describe, _unwrap_commit

__all__ = ["Retry", "is_retryable"]

_log = logging.getLogger("sqla_context.retry")

R = TypeVar("R")

#: PostgreSQL: serialization_failure, deadlock_detected.
_PG_CONFLICTS = frozenset({"40001", "40P01"})
#: PostgreSQL: lock_not_available (lock_timeout ran out, or NOWAIT).
_PG_LOCK_TIMEOUT = "55P03"
#: MySQL / MariaDB: ER_LOCK_DEADLOCK.
_MYSQL_DEADLOCK = 1213
#: MySQL / MariaDB: ER_LOCK_WAIT_TIMEOUT.
_MYSQL_LOCK_TIMEOUT = 1205

#: Set by ``sqla_context.testing.set_retry_testing()``: (testing, attempts cap or None).
_testing: tuple[bool, int | None] = (False, None)


@dataclass(frozen=True)
class Retry:
    """How to re-run a unit of work that lost a conflict with a concurrent transaction.

    Pass it (or just a number of attempts) as ``retry=`` to ``@scope()`` or
    ``run_isolated()``. A retried unit is run again from the start in a fresh scope (new
    sessions, new transactions) when it fails with an error ``is_retryable()`` accepts,
    or one ``on`` accepts. Before each new attempt it waits: with ``jitter`` (default) a
    random delay between 0 and ``min(max_backoff, backoff * 2 ** (n - 1))`` after the n-th
    failed attempt ("full jitter", which spreads competing retries apart best), without it
    exactly that bound.

    Args:
        attempts: how many times the unit may run in all (1: never retried). Default 5.
        backoff: seconds; the bound of the first delay, doubled after each failure.
        max_backoff: seconds; no delay is longer.
        jitter: draw each delay at random below its bound (default), or wait the bound.
        lock_timeouts: also retry a lock wait that timed out (MySQL/MariaDB error 1205,
            PostgreSQL SQLSTATE 55P03). Off by default: a lock held that long is more often
            a stuck transaction than a transient conflict.
        on: ``on(exc) -> bool``; an error it accepts is retried too (added to
            ``is_retryable()``, which still applies).
        on_retry: ``on_retry(attempt, exc, delay)`` is called (and awaited if it returns an
            awaitable) after attempt number ``attempt`` failed with ``exc`` and before
            waiting ``delay`` seconds for the next one: for metrics or tracing. An
            exception it raises stops the retrying and propagates.

    Raises:
        ConfigurationError: an argument is out of range or of the wrong type.
    """

    attempts: int = 5
    backoff: float = 0.02
    max_backoff: float = 1.0
    jitter: bool = True
    lock_timeouts: bool = False
    on: Callable[[BaseException], bool] | None = None
    on_retry: Callable[[int, BaseException, float], Awaitable[None] | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigurationError(f"Retry(attempts={self.attempts!r}): give an int >= 1")
        if self.attempts < 1:
            raise ConfigurationError(
                f"Retry(attempts={self.attempts!r}) is not valid: give the number of runs in "
                "all, >= 1 (1 runs the unit once and never retries it)"
            )
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(
                    f"Retry({name}={value!r}) is not valid: give a number of seconds >= 0"
                )
        if self.max_backoff < self.backoff:
            raise ConfigurationError(
                f"Retry(max_backoff={self.max_backoff!r}) is smaller than backoff="
                f"{self.backoff!r}: max_backoff caps the growing delay, so it must be >= backoff"
            )
        for name in ("jitter", "lock_timeouts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"Retry({name}=...) must be True or False")
        for name in ("on", "on_retry"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ConfigurationError(
                    f"Retry({name}=...) must be a callable or None, got {hook!r}"
                )

    def retries(self, exc: BaseException) -> bool:
        """True if a unit that failed with ``exc`` may be run again under this policy."""
        if isinstance(exc, CommitError) and exc.committed:
            return False  # another database kept its part: running again would repeat it
        return is_retryable(exc, lock_timeouts=self.lock_timeouts) or (
            self.on is not None and bool(self.on(exc))
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        if _testing[0]:
            return 0.0
        bound = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(0, bound) if self.jitter else bound


def as_retry(option: str, value: object) -> Retry | None:
    """``retry=`` as given (None, an int of attempts, a Retry) as a Retry or None."""
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Retry(attempts=value)
    raise ConfigurationError(
        f"{option}={value!r} is not valid: give a number of attempts, a sqla_context.Retry(...) "
        "or None"
    )


def is_retryable(exc: BaseException, *, lock_timeouts: bool = False) -> bool:
    """True if ``exc`` says the transaction lost a conflict and running it again may succeed.

    Recognises, wherever the error surfaced (a statement, an autoflush, the COMMIT wrapped in
    ``CommitError``), by following ``orig`` and ``__cause__``:

    - PostgreSQL (asyncpg, psycopg): SQLSTATE ``40001`` (serialization failure) and
      ``40P01`` (deadlock detected); with ``lock_timeouts``, ``55P03`` (lock not available);
    - MySQL and MariaDB (asyncmy, aiomysql, ...): error ``1213`` (deadlock); with
      ``lock_timeouts``, ``1205`` (lock wait timeout exceeded).

    Use it in your own ``Retry(on=...)`` predicate, or to decide about errors yourself.
    """
    return error_code(exc, lock_timeouts=lock_timeouts) is not None


def error_code(exc: BaseException, *, lock_timeouts: bool = False) -> str | None:
    """The retryable code in ``exc``'s chain ("SQLSTATE 40001", "MySQL error 1213"), or None."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(state, str) and (
            state in _PG_CONFLICTS or (lock_timeouts and state == _PG_LOCK_TIMEOUT)
        ):
            return f"SQLSTATE {state}"
        if isinstance(current, DBAPIError):
            # PEP 249 leaves codes to the driver; the MySQL drivers put the server's error
            # number first in args. Looked at only on what SQLAlchemy wrapped as a DBAPI error.
            args = getattr(current.orig, "args", ())
            number = args[0] if args else None
            if type(number) is int and (
                number == _MYSQL_DEADLOCK or (lock_timeouts and number == _MYSQL_LOCK_TIMEOUT)
            ):
                return f"MySQL error {number}"
        pending.append(current.__cause__)
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            pending.append(orig)
    return None


def effective_attempts(policy: Retry) -> int:
    """``policy.attempts``, capped while ``set_retry_testing(True, attempts=n)`` is on."""
    testing, cap = _testing
    return min(policy.attempts, cap) if testing and cap is not None else policy.attempts


async def call_retrying(
    policy: Retry,
    open_unit: Callable[[], AbstractAsyncContextManager[None]],
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    """Run ``fn(*args, **kwargs)`` inside ``open_unit()``, again in a fresh one while it fails.

    ``open_unit`` opens an outermost scope; its exit ends the unit (a failed attempt is
    rolled back and closed before the wait). Cancellation (a BaseException) is never
    retried: it propagates from the attempt or from the wait, with nothing left open.
    """
    attempts = effective_attempts(policy)
    name = getattr(fn, "__qualname__", repr(fn))
    attempt = 1
    while True:
        try:
            async with open_unit():
                return await fn(*args, **kwargs)
        except Exception as exc:
            if not policy.retries(exc):
                if isinstance(exc, CommitError) and exc.committed and is_retryable(exc):
                    _log.warning(
                        "%s: not retried: database(s) %s committed before %r failed",
                        name,
                        exc.committed,
                        exc.failed,
                    )
                raise
            code = error_code(exc, lock_timeouts=policy.lock_timeouts) or type(exc).__name__
            if attempt >= attempts:
                raise RetryError(attempt, exc, code) from exc
            delay = policy.delay(attempt)
            _log.warning(
                "%s: attempt %d/%d rolled back (%s: %s); retrying in %.3fs",
                name,
                attempt,
                attempts,
                code,
                _describe(_unwrap_commit(exc)),
                delay,
            )
            if policy.on_retry is not None:
                result = policy.on_retry(attempt, exc, delay)
                if inspect.isawaitable(result):
                    await result
            await asyncio.sleep(delay)
            attempt += 1


class _RetryTesting:
    """What ``set_retry_testing()`` returns: as a context manager, restores the old state."""

    __slots__ = ("_previous",)

    def __init__(self, previous: tuple[bool, int | None]) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        global _testing
        _testing = self._previous


def set_retry_testing(testing: bool, *, attempts: int | None = 1) -> _RetryTesting:
    """Switch retry testing mode on or off; see ``sqla_context.testing.set_retry_testing()``."""
    global _testing
    if attempts is not None and (type(attempts) is not int or attempts < 1):
        raise ConfigurationError(
            f"attempts={attempts!r} is not valid: give an int >= 1 (1 turns retries off), or "
            "None to keep each Retry's own attempts"
        )
    previous = _testing
    _testing = (bool(testing), attempts)
    return _RetryTesting(previous)
