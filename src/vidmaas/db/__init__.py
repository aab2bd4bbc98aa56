"""The database: models, engine and sessions, migrations, repositories."""
