"""The database layer: models, engine and sessions, migrations."""
