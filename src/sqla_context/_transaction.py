"""``db.transaction()``: explicit transaction blocks and savepoints on the scope's session."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from ._scope import _current, check_choice, commit_session
from ._typing import ExistingMode, P, R
from .exceptions import TransactionAlreadyOpenError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

    from ._database import Database


class TransactionBlock:
    """What ``db.transaction()`` returns: an async context manager and a decorator.

    Entering yields the scope's ``AsyncSession``. See :meth:`Database.transaction`.
    """

    __slots__ = ("_db", "_existing", "_kind", "_savepoint", "_session")

    def __init__(self, db: Database, existing: ExistingMode) -> None:
        check_choice("existing", existing, ExistingMode)
        self._db = db
        self._existing: ExistingMode = existing
        self._session: AsyncSession | None = None
        self._savepoint: AsyncSessionTransaction | None = None
        self._kind: Literal["top", "savepoint"] = "top"

    async def __aenter__(self) -> AsyncSession:
        if self._session is not None:
            raise RuntimeError(
                "this transaction block is already in use; call db.transaction() again"
            )
        db = self._db
        session = await db.session()
        self._kind, self._savepoint = "top", None
        if session.in_transaction():
            existing = self._existing
            if existing == "raise":
                raise TransactionAlreadyOpenError(db.name)
            if existing == "nest":
                self._kind, self._savepoint = "savepoint", await session.begin_nested()
            elif existing == "commit":
                await commit_session(db, _current.get(), session)
                await session.begin()
            elif existing == "rollback":
                await session.rollback()
                await session.begin()
            # "join": nothing to do; the block's exit commits the open transaction.
        else:
            # Begin now (no I/O yet), so that a block nested inside this one before any
            # statement ran sees the transaction and takes a savepoint instead of committing.
            await session.begin()
        self._session = session
        return session

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        session, savepoint = self._session, self._savepoint
        self._session = self._savepoint = None
        assert session is not None
        if savepoint is not None:
            if not savepoint.is_active:  # ended inside the block (e.g. close_session())
                return
            if exc_type is None:
                await savepoint.commit()  # RELEASE SAVEPOINT
            else:
                await savepoint.rollback()  # ROLLBACK TO SAVEPOINT; the outer one goes on
            return
        if exc_type is not None:
            await session.rollback()
            return
        if session.in_transaction():
            try:
                await commit_session(self._db, _current.get(), session)
            except BaseException:
                await session.rollback()  # a failing hook left the transaction open
                raise

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Decorate an async function so that each call runs in its own transaction block."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@db.transaction() decorates async functions only; got {fn!r}")
        db, existing = self._db, self._existing

        @functools.wraps(fn)
        async def in_transaction(*args: P.args, **kwargs: P.kwargs) -> R:
            async with TransactionBlock(db, existing):
                return await fn(*args, **kwargs)

        return in_transaction
