"""Ibutsu's task tier.

The three Celery entry points resolve lazily, so ``celery -A ibutsu_server:flower_app`` loads
only the Flower role (no Flask, SQLAlchemy or database driver). Each role package provides its
app; this package only names where to find it, so core never depends on a role.
"""

from __future__ import annotations

import importlib
from typing import Any

# Entry point attribute -> module of the role package that defines ``app``.
ROLE_APPS = {
    "worker_app": "ibutsu_worker.process.app",
    "scheduler_app": "ibutsu_scheduler.app",
    "flower_app": "ibutsu_flower.app",
}

__all__ = list(ROLE_APPS)


def __getattr__(name: str) -> Any:
    module = ROLE_APPS.get(name)
    if module is None:
        raise AttributeError(f"module 'ibutsu_server' has no attribute {name!r}")
    try:
        return importlib.import_module(module).app
    except ModuleNotFoundError as exc:
        if exc.name != module and not module.startswith(f"{exc.name}."):
            raise
        raise AttributeError(
            f"ibutsu_server.{name} needs the {module.split('.')[0]} package, "
            "which this image or environment does not include"
        ) from exc
