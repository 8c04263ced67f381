"""The wire names, pinned: the one place tests spell them out. Producers (Ibutsu's API, its
admin page, beat, the architecture document) send exactly these strings."""

from __future__ import annotations

from ibutsu_server import task_names


def test_the_wire_names_producers_send() -> None:
    assert {
        "ibutsu_server.tasks.importers.run_junit_import",
        "ibutsu_server.tasks.importers.run_archive_import",
        "ibutsu_server.tasks.db.clear_import_file_content",
        "ibutsu_server.tasks.db.prune_old_files",
        "ibutsu_server.tasks.db.prune_old_results",
        "ibutsu_server.tasks.db.prune_old_runs",
        "ibutsu_server.tasks.db.prune_old_import_files",
        "ibutsu_server.tasks.db.seed_users",
        "ibutsu_server.tasks.query.query_task",
        "ibutsu_server.tasks.results.add_result_start_time",
        "ibutsu_server.tasks.runs.update_run",
        "ibutsu_server.tasks.runs.sync_aborted_runs",
    } == task_names.UPSTREAM
    assert (
        task_names.UPSTREAM
        | {
            "ibutsu_server.tasks.importers.import_results",  # the architecture document's
            "ibutsu_server.tasks.query.query",  # ours
            "ibutsu_server.tasks.importers.recover_imports",  # ours
        }
        == task_names.ALL
    )


def test_ours_are_the_names_upstream_does_not_register() -> None:
    assert {
        "ibutsu_server.tasks.importers.import_results",
        "ibutsu_server.tasks.query.query",
        "ibutsu_server.tasks.importers.recover_imports",
    } == task_names.OURS
    assert (task_names.SHARED_QUEUE, task_names.OWN_QUEUE) == ("celery", "ibutsu-tasks")
