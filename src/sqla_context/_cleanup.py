"""Commit mode of ``sqla_context.testing.isolated()``: record the tables written, empty them.

A table is recorded with its schema, from the statement object SQLAlchemy compiled (Core and
ORM ``insert()``/``update()``/``delete()``, after ``schema_translate_map``); only raw SQL
(``text()``, ``exec_driver_sql()``) is parsed, and then the name is kept exactly as written,
schema and quotes included. So ``INSERT INTO s.items`` empties ``s.items``, never the
``items`` of another schema.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Alias, Delete, Insert, Update, event
from sqlalchemy.exc import DBAPIError

from ._isolation import CheckoutWatch, IsolationError, _is_lock_timeout, leak_error

if TYPE_CHECKING:
    from sqlalchemy.engine import ExecutionContext
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._database import Database

_IDENT = r'(?:`[^`]+`|"[^"]+"|\[[^\]]+\]|\w+)'
_WRITE = re.compile(
    r"^\s*(?:insert\s+(?:(?:low_priority|delayed|high_priority|ignore)\s+)*into"
    r"|replace\s+(?:(?:low_priority|delayed)\s+)*into"
    r"|update(?:\s+(?:low_priority|ignore|only))*"
    r"|delete\s+(?:(?:low_priority|quick|ignore)\s+)*from(?:\s+only)?)"
    rf"\s+({_IDENT}(?:\s*\.\s*{_IDENT})?)",
    re.IGNORECASE,
)


def written_table(context: ExecutionContext | None, statement: str) -> str | None:
    """The table a statement writes to, as SQL text (schema-qualified when it has one)."""
    compiled = getattr(context, "compiled", None)
    dml = getattr(compiled, "statement", None)
    if context is not None and isinstance(dml, (Insert, Update, Delete)):
        table: Any = dml.table
        while isinstance(table, Alias):
            table = table.element
        name = getattr(table, "name", None)
        if isinstance(name, str):
            schema = getattr(table, "schema", None)
            translate = context.execution_options.get("schema_translate_map") or {}
            schema = translate.get(schema, schema)
            preparer = context.dialect.identifier_preparer
            quoted = preparer.quote(name)
            return f"{preparer.quote_schema(schema)}.{quoted}" if schema else quoted
    match = _WRITE.match(statement)
    if match is None:
        return None
    return re.sub(r"\s*\.\s*", ".", match[1])  # as written: quoting decides case folding


@contextlib.asynccontextmanager
async def truncated_after(db: Database, lock_timeout: float | None) -> AsyncIterator[None]:
    """Commit mode for ``db``: empty the tables written in the block when it ends."""
    written: dict[str, None] = {}  # insertion-ordered set

    def record(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        table = written_table(context, statement)
        if table is not None:
            written[table] = None

    engine = db.engine
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    leaked = 0
    try:
        with CheckoutWatch(engine).watching() as watch:
            yield
        leaked = len(watch.out)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        if written:
            try:
                await _empty(db, list(written), lock_timeout)
            except Exception as exc:
                if leaked:
                    raise leak_error(
                        db,
                        leaked,
                        0,
                        f" The tables written ({', '.join(written)}) were NOT emptied: the "
                        "leaked connection still holds locks on them.",
                    ) from exc
                raise
    if leaked:
        raise leak_error(db, leaked, 0)


async def _empty(db: Database, tables: list[str], lock_timeout: float | None) -> None:
    async with db.engine.connect() as conn:
        try:
            await _empty_with(conn, tables, lock_timeout)
        except DBAPIError as exc:
            if _is_lock_timeout(conn.dialect.name, exc.orig):
                raise IsolationError(
                    f"{db!r}: emptying the tables written in commit mode "
                    f"({', '.join(tables)}) waited more than {lock_timeout:g} s for a lock. "
                    "A connection that is still open holds it: close every connection and "
                    "session the test opened, or end the transaction that holds the lock."
                ) from exc
            raise
        finally:
            if conn.dialect.name in ("mysql", "mariadb"):
                await conn.invalidate()  # it carries session settings: not back to the pool


async def _empty_with(conn: AsyncConnection, tables: list[str], lock_timeout: float | None) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        if lock_timeout is not None:
            ms = max(1, int(lock_timeout * 1000))
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{ms}ms'")
        for table in tables:
            await conn.exec_driver_sql(f"TRUNCATE {table} RESTART IDENTITY CASCADE")
    elif name in ("mysql", "mariadb"):
        if lock_timeout is not None:  # TRUNCATE waits on metadata locks
            seconds = max(1, round(lock_timeout))
            await conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {seconds}")
            await conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {seconds}")
        await conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        try:
            for table in tables:
                await conn.exec_driver_sql(f"TRUNCATE TABLE {table}")
        finally:
            await conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    else:
        for table in tables:
            await conn.exec_driver_sql(f"DELETE FROM {table}")
    await conn.commit()
