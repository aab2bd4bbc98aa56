"""Migrations: the same files bring SQLite and PostgreSQL to the models' schema."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from vidmaas.db.engine import make_engine
from vidmaas.db.migrate import upgrade
from vidmaas.db.models import Base


async def test_the_migrated_schema_equals_the_models_on_both_databases(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            def diff(sync_conn: Any) -> list[Any]:
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": False})
                return list(compare_metadata(ctx, Base.metadata))
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()


async def test_migrating_twice_is_a_no_op(sqlite_url: str) -> None:
    await upgrade(sqlite_url)
    await upgrade(sqlite_url)
