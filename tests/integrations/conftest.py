"""Fixtures shared by the integration tests: the brokers' servers, probed before use."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from ..conftest import REQUIRE_SERVERS

REDIS_URL = os.environ.get("SQLA_CONTEXT_REDIS_URL", "redis://127.0.0.1:6379/0")


async def require(name: str, probe: Callable[[], Awaitable[None]]) -> None:
    """Skip (or fail under SQLA_CONTEXT_REQUIRE_SERVERS) unless ``probe()`` succeeds in 10 s."""
    try:
        await asyncio.wait_for(probe(), 10)
    except Exception as exc:
        problem = f"{name} is unreachable: {type(exc).__name__}: {exc}"
        if REQUIRE_SERVERS:
            pytest.fail(f"SQLA_CONTEXT_REQUIRE_SERVERS is set but {problem}")
        pytest.skip(problem)


@pytest.fixture
async def redis_url() -> str:
    """REDIS_URL (SQLA_CONTEXT_REDIS_URL, default 127.0.0.1:6379/0), once it answers PING."""
    from redis.asyncio import Redis

    async def probe() -> None:
        async with Redis.from_url(REDIS_URL) as client:
            await client.ping()

    await require(f"Redis at {REDIS_URL}", probe)
    return REDIS_URL
