"""The worker package's two halves stay apart: the domain (importing, summaries, pruning,
querying, projects, submission) never imports the worker process's machinery
(``ibutsu_worker.process``); tasks reach it only for the metrics they count."""

from __future__ import annotations

import ast
from pathlib import Path

import ibutsu_worker

PACKAGE = Path(ibutsu_worker.__file__).parent
# Not domain: the process's own folder, the command line and the demo, which start workers.
OUTSIDE_THE_DOMAIN = ("process/", "cli.py", "demo.py")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def process_imports(relative: str) -> set[str]:
    return {
        name
        for name in imported_modules(PACKAGE / relative)
        if name.startswith("ibutsu_worker.process")
    }


def modules() -> list[str]:
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py"))


def test_the_domain_never_imports_the_process_machinery() -> None:
    domain = [
        name
        for name in modules()
        if not name.startswith(OUTSIDE_THE_DOMAIN) and not name.startswith("tasks/")
    ]
    assert "importing/job.py" in domain and "submission.py" in domain  # the walk found them
    assert {name: process_imports(name) for name in domain if process_imports(name)} == {}


def test_tasks_reach_the_process_only_for_its_metrics() -> None:
    tasks = [name for name in modules() if name.startswith("tasks/")]
    assert "tasks/imports.py" in tasks
    for name in tasks:
        assert process_imports(name) <= {
            "ibutsu_worker.process",
            "ibutsu_worker.process.metrics",
        }, name
