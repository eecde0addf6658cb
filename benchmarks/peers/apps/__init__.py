"""The approaches of the peer comparison: one app module each in this package.

Every module exposes ``app``, a FastAPI app with ``/nodb`` and, for the database
approaches, ``/read``, ``/write``, ``/read_then_slow`` and ``/read_close_then_slow`` on
the same table (``_common.py``). This file only describes them (no imports of the apps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Approach:
    key: str
    what: str
    db: bool = True
    release: str = ""  # how /read_close_then_slow returns the connection early

    @property
    def module(self) -> str:
        return "benchmarks.peers.apps." + self.key.replace("-", "_")


APPROACHES = [
    Approach("bare", "FastAPI, no middleware, no database", db=False),
    Approach("asgi-passthrough", "pure-ASGI middleware that only wraps send", db=False),
    Approach("depends", "hand-written Depends + yield", release="session.commit()"),
    Approach("depends-function", 'Depends(..., scope="function")', release="session.commit()"),
    Approach("inline", "async with maker() in the handler", release="end of the block"),
    Approach(
        "context-async-sqlalchemy",
        "its FastAPI middleware (BaseHTTPMiddleware)",
        release="close_db_session()",
    ),
    Approach(
        "context-async-sqlalchemy-asgi",
        "its pure-ASGI middleware",
        release="close_db_session()",
    ),
    Approach(
        "fastapi-async-sqlalchemy",
        "SQLAlchemyMiddleware, commit_on_exit=True",
        release="db.session.commit() (no API)",
    ),
    Approach(
        "advanced-alchemy",
        "FastAPI extension, autocommit",
        release="session.commit() (no API)",
    ),
    Approach("sqla-context", "SessionMiddleware + db.session()", release="db.close_session()"),
]
BY_KEY = {a.key: a for a in APPROACHES}
REFERENCE = "sqla-context"
ENDPOINTS = ["/nodb", "/read", "/write", "/read_then_slow", "/read_close_then_slow"]
