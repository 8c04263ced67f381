from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ibutsu_testing.fixtures import service_environ
from ibutsu_testing.services import running_worker, settings_for
from ibutsu_worker.cli import Operator

__all__ = ["operator", "service_environ"]


@pytest.fixture
def operator(service_environ: dict[str, str], tmp_path: Path) -> Iterator[Operator]:
    """The command line's Operator on a fresh database, with a real worker running."""
    operator = Operator(settings_for(service_environ))
    operator.upgrade()
    with running_worker("ibutsu_server:worker_app", service_environ, tmp_path / "worker.log"):
        yield operator
    operator.db.engine.dispose()
