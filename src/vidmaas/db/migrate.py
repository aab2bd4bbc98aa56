"""Running the Alembic migrations from code.

Guarantees: ``upgrade(url)`` brings any empty or older database to the newest
revision with the same migration files on PostgreSQL and SQLite; running it twice is
a no-op. It is what ``vidmaas migrate`` and ``vidmaas up`` call.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from alembic import command
from alembic.config import Config

from vidmaas.db.engine import normalize_url


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("vidmaas").joinpath("migrations")))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade_sync(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate in a worker thread (Alembic's env runs its own event loop)."""
    await asyncio.to_thread(upgrade_sync, url, revision)
