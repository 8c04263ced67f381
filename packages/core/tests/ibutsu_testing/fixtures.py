"""pytest fixtures shared by every package's tests (imported by their conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ibutsu_testing.services import clear_redis_prefix, postgres_database, service_env


@pytest.fixture()
def service_environ() -> Iterator[dict[str, str]]:
    """Worker environment on a fresh PostgreSQL database and a Redis namespace of its own."""
    prefix = f"ibutsu-test-{uuid.uuid4().hex[:8]}:"
    with postgres_database() as name:
        yield service_env(name, prefix)
    clear_redis_prefix(prefix)
