"""Type aliases shared by the package; no runtime logic lives here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeAlias, TypeVar

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from ._database import Database

P = ParamSpec("P")
R = TypeVar("R")

#: What a scope does with open transactions when it ends.
CommitMode: TypeAlias = Literal["auto", "always", "never"]
#: What ``scope()`` does when another scope is already active.
NestedMode: TypeAlias = Literal["raise", "reuse", "new"]
#: What ``db.transaction()`` does when the session already has an open transaction.
ExistingMode: TypeAlias = Literal["nest", "commit", "rollback", "join", "raise"]

#: ``before_commit`` / ``after_commit`` callback: sync or async, receives the session.
SessionHook: TypeAlias = "Callable[[AsyncSession], Awaitable[None] | None]"
#: ``on_commit()`` callback: called with no arguments; an awaitable it returns is awaited.
CommitCallback: TypeAlias = "Callable[[], object]"
#: ``before_session`` callback: async, receives the Database about to open a session.
BeforeSessionHook: TypeAlias = "Callable[[Database], Awaitable[None]]"
#: ``engine_factory``: builds the engine when it is first needed.
EngineFactory: TypeAlias = "Callable[[], AsyncEngine]"
#: ``read_from_primary`` callback: sync, receives the primary Database; True sends the
#: scope's reads to the primary (e.g. for a few seconds after this user's last write).
ReadFromPrimaryHook: TypeAlias = "Callable[[Database], bool]"
