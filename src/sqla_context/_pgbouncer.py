"""Engine options for PostgreSQL behind PgBouncer in transaction-pooling mode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from .exceptions import ConfigurationError

__all__ = ["pgbouncer_options"]

# What each async PostgreSQL driver must not do when consecutive transactions of one client
# connection may run on different server connections: keep prepared statements (or their
# names) from one transaction to the next.
_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    # asyncpg's statement cache off makes it use the unnamed prepared statement, re-parsed in
    # the same round trip as its execution; SQLAlchemy's own cache off stops it from reusing
    # a statement prepared in an earlier transaction. Unique statement names are not needed
    # then, and would leave one named statement behind on a server connection per
    # transaction (its Close is sent with the next statement, on another server connection).
    "asyncpg": {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    # psycopg prepares a query server-side after 5 executions on a connection; None: never.
    "psycopg": {"prepare_threshold": None},
}
_DRIVERS = {"asyncpg": "asyncpg", "psycopg": "psycopg", "psycopg_async": "psycopg"}


def pgbouncer_options(url_or_driver: str | URL, /, **engine_options: Any) -> dict[str, Any]:
    """Engine options for a PostgreSQL URL that points at PgBouncer in transaction mode.

    In transaction pooling, PgBouncer gives each transaction whichever server connection is
    free, so a driver must not rely on anything a previous transaction left on "its"
    connection. The prepared statements both async drivers keep by default do exactly
    that and fail with ``prepared statement "..." does not exist`` or ``... already
    exists``. This returns the options that switch them off, for the driver named in the
    URL:

    - ``postgresql+asyncpg://``: ``connect_args={"statement_cache_size": 0,
      "prepared_statement_cache_size": 0}`` (asyncpg's and SQLAlchemy's statement caches);
    - ``postgresql+psycopg://``: ``connect_args={"prepare_threshold": None}``.

    Everything else stays SQLAlchemy's default, including its connection pool, which stays
    useful in front of PgBouncer (see ``docs/pgbouncer.md``). Pass your own engine options
    as keyword arguments to get one dict; your ``connect_args`` are merged over the
    preset's::

        url = "postgresql+asyncpg://app@pgbouncer:6432/shop"
        db = Database(url, engine_options=pgbouncer_options(url, pool_pre_ping=True))
        engine = create_async_engine(url, **pgbouncer_options(url))  # plain SQLAlchemy

    Not needed with PgBouncer in session mode, nor with PgBouncer 1.21+ configured with
    ``max_prepared_statements`` (which tracks protocol-level prepared statements itself).

    Args:
        url_or_driver: the database URL (string or ``sqlalchemy.URL``), or a driver name:
            ``"asyncpg"`` or ``"psycopg"``.
        **engine_options: further ``create_async_engine`` options, returned alongside.

    Raises:
        ConfigurationError: the URL cannot be parsed, is not a PostgreSQL URL, or names a
            driver other than asyncpg or psycopg; ``connect_args`` is not a mapping.
    """
    driver = _driver(url_or_driver)
    extra = engine_options.get("connect_args", {})
    if not isinstance(extra, Mapping):
        raise ConfigurationError(f"connect_args must be a mapping, got {extra!r}")
    return {**engine_options, "connect_args": {**_CONNECT_ARGS[driver], **extra}}


def _driver(url_or_driver: str | URL) -> str:
    if isinstance(url_or_driver, str) and "://" not in url_or_driver:
        name = url_or_driver
        if name not in _DRIVERS:
            raise ConfigurationError(
                f"pgbouncer_options() knows the drivers 'asyncpg' and 'psycopg', not {name!r}"
            )
        return _DRIVERS[name]
    try:
        url = make_url(url_or_driver)
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"cannot parse the database URL: {exc}") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"PgBouncer pools PostgreSQL connections; {shown!r} is not a PostgreSQL URL"
        )
    driver = url.drivername.partition("+")[2]
    if driver not in _DRIVERS:
        raise ConfigurationError(
            f"pgbouncer_options() supports the async drivers asyncpg and psycopg; {shown!r} "
            "names "
            + (f"{driver!r}" if driver else "no driver")
            + ": use 'postgresql+asyncpg://' or 'postgresql+psycopg://'"
        )
    return _DRIVERS[driver]
