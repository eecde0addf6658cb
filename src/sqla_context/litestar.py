"""Litestar integration: one plugin for the scope per request, the session dependency and disposal.

    app = Litestar(route_handlers=[...], plugins=[SqlaContextPlugin(db)])

    @get("/users/{user_id:int}")
    async def read_user(user_id: int, session: NamedDependency[AsyncSession]) -> User: ...

The plugin installs ``sqla_context.asgi.SessionMiddleware`` first among the app's
middleware (Litestar's own exception handling still wraps it, so a failed commit reaches
the server as a ``LitestarException`` caused by the ``CommitError``), so Litestar requests
get the ASGI guarantees: the request's sessions are
committed before the response headers are sent (status < 400, or ``commit_on``), rolled back
on an error status or an exception, and a failed commit turns the response into a 500. It
provides the first database's scope session as the dependency ``session`` (declare it as
``NamedDependency[AsyncSession]``, from ``litestar.di`` (Litestar 2.23+); it is the same object
``await db.session()`` returns anywhere else in the request), and disposes every database
on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

try:
    from litestar.config.app import AppConfig
    from litestar.di import Provide
    from litestar.middleware import DefineMiddleware
    from litestar.plugins import InitPluginProtocol
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sqla_context.litestar needs Litestar: pip install 'sqla-context[litestar]'"
    ) from exc
from sqlalchemy.ext.asyncio import AsyncSession

from ._scope import check_choice
from .asgi import SessionMiddleware, WebSocketMode, _is_success

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["SqlaContextPlugin"]

_log = logging.getLogger("sqla_context")


class SqlaContextPlugin(InitPluginProtocol):
    """Run every Litestar request in a scope; provide ``session``; dispose at shutdown.

    Args:
        *databases: the app's databases; the first one provides the ``session`` dependency.
            All of them are disposed on shutdown.
        commit_on: decides from the response status whether to commit (default: < 400).
        websocket: as for ``SessionMiddleware``: ``"none"`` (default)
            opens no scope for WebSocket connections, ``"connection"`` one per connection.
        dependency_key: the name of the session dependency (``None``: provide none).

    Raises:
        ConfigurationError: no database was given, or ``websocket`` is not allowed.
    """

    __slots__ = ("commit_on", "databases", "dependency_key", "websocket")

    def __init__(
        self,
        *databases: Database,
        commit_on: Callable[[int], bool] = _is_success,
        websocket: WebSocketMode = "none",
        dependency_key: str | None = "session",
    ) -> None:
        from .exceptions import ConfigurationError

        if not databases:
            raise ConfigurationError("SqlaContextPlugin() needs at least one Database")
        check_choice("websocket", websocket, WebSocketMode)
        if not callable(commit_on):
            raise ConfigurationError(
                f"commit_on must be a callable taking the status code, got {commit_on!r}"
            )
        self.databases = databases
        self.commit_on = commit_on
        self.websocket: WebSocketMode = websocket
        self.dependency_key = dependency_key

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Install the middleware (first of the app's), the dependency and the shutdown hook."""
        middleware = DefineMiddleware(
            SessionMiddleware,  # type: ignore[arg-type]  # Litestar types ASGI scopes as TypedDicts
            commit_on=self.commit_on,
            websocket=self.websocket,
        )
        app_config.middleware.insert(0, middleware)
        if self.dependency_key is not None:
            app_config.dependencies[self.dependency_key] = Provide(self.databases[0].session)
            app_config.signature_namespace.setdefault("AsyncSession", AsyncSession)
        app_config.on_shutdown.append(self._dispose)
        return app_config

    async def _dispose(self) -> None:
        # Every database is disposed even if another fails; the first failure is re-raised.
        failure: Exception | None = None
        for db in self.databases:
            try:
                await db.dispose()
            except Exception as exc:
                _log.warning("disposing %r failed", db, exc_info=True)
                failure = failure or exc
        if failure is not None:
            raise failure
