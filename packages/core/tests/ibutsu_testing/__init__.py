"""Helpers for tests that talk to the real PostgreSQL, Redis and worker processes."""
