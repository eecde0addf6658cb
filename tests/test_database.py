"""Database: lazy engine, options, names, switch_url(), dispose(), new_session()."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import sqla_context
from sqla_context import CommitError, ConfigurationError, Database, scope

from .conftest import Backend, insert


class Boom(Exception):
    pass


def same_database_other_url(url: str) -> str:
    """A URL that differs from ``url`` but reaches the same database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return url + "?timeout=10"
    if parsed.port is not None:
        return url.replace(f":{parsed.port}/", "/", 1)
    default_port = 5432 if parsed.get_backend_name() == "postgresql" else 3306
    return parsed.set(port=default_port).render_as_string(hide_password=False)


def disposals(engine: AsyncEngine) -> list[object]:
    seen: list[object] = []
    event.listen(engine.sync_engine, "engine_disposed", seen.append)
    return seen


def test_version_is_exposed() -> None:
    from importlib.metadata import version

    assert sqla_context.__version__ == version("sqla-context")


def test_public_names_are_documented() -> None:
    for name in sqla_context.__all__:
        obj = getattr(sqla_context, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    for name in (
        "session",
        "commit",
        "rollback",
        "close_session",
        "transaction",
        "new_session",
        "switch_url",
        "dispose",
        "engine",
        "sessionmaker",
        "url",
        "name",
    ):
        assert getattr(Database, name).__doc__, f"Database.{name} has no docstring"


def test_construction_does_no_io() -> None:
    db = Database("postgresql+asyncpg://user:secret@db.invalid:1/app")
    assert db.engine.pool.checkedin() + db.engine.pool.checkedout() == 0  # never connected
    assert db.url == make_url("postgresql+asyncpg://user:secret@db.invalid:1/app")


def test_repr_and_name_hide_the_password() -> None:
    db = Database("postgresql+asyncpg://user:secret@localhost/app")
    assert "secret" not in repr(db)
    assert "secret" not in db.name
    assert repr(db) == "Database('postgresql+asyncpg://user:***@localhost/app')"
    assert Database("sqlite+aiosqlite://", name="cache").name == "cache"


def test_url_and_factory_are_exclusive() -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        Database()
    with pytest.raises(ConfigurationError, match="exactly one"):
        Database(
            "sqlite+aiosqlite://", engine_factory=lambda: create_async_engine("sqlite+aiosqlite://")
        )


def test_bad_url_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="cannot parse"):
        Database("not a url")
    with pytest.raises(ConfigurationError, match="cannot parse"):
        Database("postgresql+asyncpg://user@host:port/db")  # a malformed port


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("postgresql+nosuchdriver://h/db", {}, "has no dialect or driver"),
        ("mysql+aiomysql://h/db", {}, r"not installed: pip install aiomysql"),
        ("sqlite:///file.db", {}, "not an async driver"),
        ("sqlite+aiosqlite://", {"pool_szie": 3}, "invalid engine_options.*pool_szie"),
    ],
    ids=["unknown-driver", "missing-driver", "sync-driver", "misspelt-option"],
)
def test_configuration_errors_fail_at_construction(
    url: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Database(url, engine_options=options)


def test_hooks_must_be_callable() -> None:
    for option in ("before_session", "before_commit", "after_commit", "engine_factory"):
        with pytest.raises(ConfigurationError, match=f"{option} must be"):
            if option == "engine_factory":
                Database(engine_factory="not callable")  # type: ignore[arg-type]
            else:
                Database("sqlite+aiosqlite://", **{option: "not callable"})  # type: ignore[arg-type]


def test_session_options_are_checked_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="session_options") as info:
        Database("sqlite+aiosqlite://", session_options={"expire_on_comit": False})
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigurationError, match="bind"):
        Database("sqlite+aiosqlite://", session_options={"bind": None})


async def test_expire_on_commit_defaults_to_false(sqlite: Backend) -> None:
    db = sqlite.database()
    assert db.sessionmaker.kw["expire_on_commit"] is False
    async with scope():
        assert (await db.session()).sync_session.expire_on_commit is False
    other = sqlite.database(session_options={"expire_on_commit": True})
    assert other.sessionmaker.kw["expire_on_commit"] is True


async def test_engine_is_made_once_and_options_are_applied(backend: Backend) -> None:
    db = backend.database(engine_options={"pool_size": 3, "max_overflow": 0})
    engine = db.engine
    assert engine is db.engine, "one engine, created once"
    assert engine.pool.size() == 3  # type: ignore[attr-defined]
    assert db.sessionmaker.kw["bind"] is engine


async def test_engine_factory(backend: Backend) -> None:
    calls: list[int] = []

    def make() -> AsyncEngine:
        calls.append(1)
        return create_async_engine(backend.url)

    db = Database(engine_factory=make)
    backend.databases.append(db)
    assert db.url is None
    assert "engine_factory" in db.name
    assert calls == []
    async with scope():
        await insert(await db.session(), "f")
    assert calls == [1]
    assert db.url == make_url(backend.url)
    assert await backend.names() == ["f"]


def test_engine_factory_must_return_an_async_engine() -> None:
    db = Database(engine_factory=lambda: "nope")  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        db.engine  # noqa: B018


async def test_dispose_is_idempotent_and_engine_comes_back(backend: Backend) -> None:
    db = backend.database()
    first = db.engine
    gone = disposals(first)
    await db.dispose()
    await db.dispose()
    assert len(gone) == 1
    async with scope():
        await insert(await db.session(), "after-dispose")
    assert db.engine is not first
    assert await backend.names() == ["after-dispose"]


async def test_switch_url_keeps_open_sessions_on_the_old_engine(backend: Backend) -> None:
    db = backend.database()
    old = db.engine
    gone = disposals(old)
    async with scope():
        old_session = await db.session()
        await insert(old_session, "old")
        await db.switch_url(same_database_other_url(backend.url))
        assert db.engine is not old
        assert gone == [], "the old engine still serves an open session"
        async with scope(nested="new"):
            new_session = await db.session()
            assert new_session.bind is db.engine
            await new_session.execute(text("SELECT 1"))
        await insert(old_session, "still-old")
        assert old_session.bind is old
    assert len(gone) == 1, "disposed once its last session closed"
    assert await backend.names() == ["old", "still-old"]


async def test_switch_url_without_open_sessions_disposes_at_once(sqlite: Backend) -> None:
    db = sqlite.database()
    old = db.engine
    gone = disposals(old)
    await db.switch_url(same_database_other_url(sqlite.url))
    assert len(gone) == 1


async def test_switch_to_the_same_url_is_a_noop(sqlite: Backend) -> None:
    db = sqlite.database()
    engine = db.engine
    await db.switch_url(sqlite.url)
    assert db.engine is engine


async def test_switch_url_moves_writes_to_the_new_database(tmp_path: Path) -> None:
    first, second = (f"sqlite+aiosqlite:///{tmp_path}/{n}.db" for n in ("first", "second"))
    db = Database(first)
    try:
        for url in (first, second):
            await db.switch_url(url)
            async with scope():
                session = await db.session()
                await session.execute(text("CREATE TABLE t (url VARCHAR(200))"))
                await session.execute(text("INSERT INTO t VALUES (:u)"), {"u": url})
        for url in (first, second):
            witness = create_async_engine(url)
            async with witness.connect() as conn:
                assert (await conn.execute(text("SELECT url FROM t"))).scalars().all() == [url]
            await witness.dispose()
    finally:
        await db.dispose()


async def test_before_session_hook_can_switch_url(backend: Backend) -> None:
    asked: list[Database] = []

    async def discover_primary(db: Database) -> None:
        asked.append(db)
        await db.switch_url(backend.url)  # e.g. the answer of a discovery service

    db = backend.database(before_session=discover_primary)
    async with scope():
        session = await db.session()
        assert await db.session() is session, "the hook runs once per scope session"
        await insert(session, "a")
    async with db.new_session() as independent:
        await independent.execute(text("SELECT 1"))
    assert asked == [db, db]
    assert await backend.names() == ["a"]


async def test_failing_before_session_hook_propagates_and_retries(sqlite: Backend) -> None:
    attempts: list[int] = []

    async def flaky(db: Database) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise Boom("discovery down")

    db = sqlite.database(before_session=flaky)
    async with scope():
        with pytest.raises(Boom):
            await db.session()
        session = await db.session()
        assert session is await db.session()
    assert len(attempts) == 2


async def test_new_session_begin_commits_or_rolls_back(backend: Backend) -> None:
    db = backend.database()
    async with db.new_session(begin=True) as session:
        assert isinstance(session, AsyncSession)
        await insert(session, "a")
    with pytest.raises(Boom):
        async with db.new_session(begin=True) as session:
            await insert(session, "b")
            raise Boom
    assert await backend.names() == ["a"]
    assert db.engine.pool.checkedout() == 0


async def test_new_session_without_begin_rolls_back_what_you_did_not_commit(
    backend: Backend,
) -> None:
    db = backend.database()
    async with db.new_session() as session:
        await insert(session, "committed")
        await session.commit()
        await insert(session, "forgotten")
    assert await backend.names() == ["committed"]


async def test_new_session_is_independent_of_the_scope(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(Boom):
        async with scope():
            scoped = await db.session()
            await scoped.execute(text("SELECT 1"))
            async with db.new_session(begin=True) as independent:
                assert independent is not scoped
                await insert(independent, "independent")
            assert await db.session() is scoped
            raise Boom
    assert await backend.names() == ["independent"]


async def test_new_session_commit_failure(backend: Backend) -> None:
    db = backend.database()
    with pytest.raises(CommitError):
        async with db.new_session(begin=True) as session:
            await backend.doom(session)
    assert db.engine.pool.checkedout() == 0
    assert await backend.names() == []
