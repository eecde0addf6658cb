"""``db.transaction()``: explicit transaction blocks and savepoints on the scope's session."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._scope import _current, check_choice, commit_session
from ._typing import ExistingMode, P, R
from .exceptions import TransactionAlreadyOpenError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

    from ._database import Database
    from ._scope import _Entry, _Unit


class TransactionBlock:
    """What ``db.transaction()`` returns: an async context manager and a decorator.

    Entering yields the scope's ``AsyncSession``. Made by ``Database.transaction()``, whose
    ``existing`` argument (what to do with a transaction already open) it carries.
    """

    __slots__ = ("_db", "_existing", "_frame", "_savepoint", "_session", "_unit")

    def __init__(self, db: Database, existing: ExistingMode) -> None:
        check_choice("existing", existing, ExistingMode)
        self._db = db
        self._existing: ExistingMode = existing
        self._session: AsyncSession | None = None
        self._savepoint: AsyncSessionTransaction | None = None
        self._unit: _Unit | None = None
        # The on_commit() callbacks registered inside this block's savepoint.
        self._frame: list[_Entry] | None = None

    async def __aenter__(self) -> AsyncSession:
        if self._session is not None:
            raise RuntimeError(
                "this transaction block is already in use; call db.transaction() again"
            )
        db = self._db
        session = await db.session()
        unit = _current.get()
        assert unit is not None  # db.session() raised otherwise
        self._savepoint = self._frame = None
        if session.in_transaction():
            existing = self._existing
            if existing == "raise":
                raise TransactionAlreadyOpenError(db.name)
            if existing == "nest":
                # Entered as a context manager, so that its exit can leave it to
                # SQLAlchemy to undo a savepoint that a failed flush deactivated.
                savepoint = session.begin_nested()
                await savepoint.__aenter__()
                self._savepoint = savepoint
                self._frame = unit.savepoint_begun()
            elif existing == "commit":
                await commit_session(db, unit, session)
                await session.begin()
            elif existing == "rollback":
                unit.drop_callbacks()
                await session.rollback()
                await session.begin()
            # "join": nothing to do; the block's exit commits the open transaction.
        else:
            # Begin now (no I/O yet), so that a block nested inside this one before any
            # statement ran sees the transaction and takes a savepoint instead of committing.
            await session.begin()
        self._session = session
        self._unit = unit
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        session, savepoint, unit, frame = self._session, self._savepoint, self._unit, self._frame
        self._session = self._savepoint = self._unit = self._frame = None
        assert session is not None
        assert unit is not None
        if savepoint is not None:
            assert frame is not None
            # A failed flush inside the block deactivated the savepoint even if the block
            # caught the error: it is rolled back below, and so are its callbacks.
            released = exc_type is None and savepoint.is_active
            # SQLAlchemy's own exit: RELEASE SAVEPOINT on success, ROLLBACK TO SAVEPOINT on
            # an exception, and the undo of a savepoint that a failed flush inside the
            # block deactivated (the caller caught the IntegrityError and went on); a
            # savepoint already ended inside the block (close_session()) is left alone.
            # The outer transaction goes on in every case.
            try:
                await savepoint.__aexit__(exc_type, exc, tb)
            except BaseException:
                unit.savepoint_ended(frame, released=False)
                raise
            unit.savepoint_ended(frame, released=released)
            return
        if exc_type is not None:
            unit.drop_callbacks()
            await session.rollback()
            return
        if session.in_transaction():
            try:
                await commit_session(self._db, unit, session)
            except BaseException:
                unit.drop_callbacks()
                await session.rollback()  # a failing hook left the transaction open
                raise

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        """Decorate an async function so that each call runs in its own transaction block."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@db.transaction() decorates async functions only; got {fn!r}")
        db, existing = self._db, self._existing

        @functools.wraps(fn)
        async def in_transaction(*args: P.args, **kwargs: P.kwargs) -> R:
            async with TransactionBlock(db, existing):
                return await fn(*args, **kwargs)

        return in_transaction
