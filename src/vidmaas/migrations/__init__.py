"""Alembic migrations, the same for PostgreSQL and SQLite."""
