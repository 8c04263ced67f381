"""The name of every task on the wire, written down once.

Producers (Ibutsu's API, its admin page, the beat schedule, the ``ibutsu-tasks`` command line)
enqueue tasks by these names; the worker registers each task under its name from here, so a
renamed or moved module can never rename a task. Every name upstream's worker registers is
here, with the architecture document's ``import_results`` and our own additions.

During a rolling update upstream's workers consume the shared queue (SHARED_QUEUE) beside
ours, and discard a name they do not register ("Received unregistered task ... discarded"):
what we send under one of the names in OURS goes to a queue only our workers consume
(OWN_QUEUE; the routes are in ``ibutsu_server.celery_utils``).
"""

from __future__ import annotations

_PREFIX = "ibutsu_server.tasks."

# importers
IMPORT_RESULTS = f"{_PREFIX}importers.import_results"  # (file_id): the architecture document's
RUN_JUNIT_IMPORT = f"{_PREFIX}importers.run_junit_import"  # (import_): the API's, for .xml
RUN_ARCHIVE_IMPORT = f"{_PREFIX}importers.run_archive_import"  # (import_): the API's, for .tar.gz
RECOVER_IMPORTS = f"{_PREFIX}importers.recover_imports"  # ours: imports nobody will finish

# db
CLEAR_IMPORT_FILE_CONTENT = f"{_PREFIX}db.clear_import_file_content"
PRUNE_OLD_FILES = f"{_PREFIX}db.prune_old_files"
PRUNE_OLD_RESULTS = f"{_PREFIX}db.prune_old_results"
PRUNE_OLD_RUNS = f"{_PREFIX}db.prune_old_runs"
PRUNE_OLD_IMPORT_FILES = f"{_PREFIX}db.prune_old_import_files"
SEED_USERS = f"{_PREFIX}db.seed_users"

# query
QUERY_TASK = f"{_PREFIX}query.query_task"  # the API's, for pages over 500 rows
QUERY = f"{_PREFIX}query.query"  # ours: structured filters, one project

# results
ADD_RESULT_START_TIME = f"{_PREFIX}results.add_result_start_time"

# runs
UPDATE_RUN = f"{_PREFIX}runs.update_run"
SYNC_ABORTED_RUNS = f"{_PREFIX}runs.sync_aborted_runs"

#: Every name upstream's worker (ibutsu-server 3.1.1) registers.
UPSTREAM = frozenset(
    {
        RUN_JUNIT_IMPORT,
        RUN_ARCHIVE_IMPORT,
        CLEAR_IMPORT_FILE_CONTENT,
        PRUNE_OLD_FILES,
        PRUNE_OLD_RESULTS,
        PRUNE_OLD_RUNS,
        PRUNE_OLD_IMPORT_FILES,
        SEED_USERS,
        QUERY_TASK,
        ADD_RESULT_START_TIME,
        UPDATE_RUN,
        SYNC_ABORTED_RUNS,
    }
)
#: The names only our worker registers: upstream's worker would discard them, so what we send
#: under them goes to OWN_QUEUE.
OURS = frozenset({IMPORT_RESULTS, RECOVER_IMPORTS, QUERY})
#: Every name the worker registers.
ALL = UPSTREAM | OURS
#: The names upstream's beat sends, on its own schedule (the architecture document's, with
#: ``prune_old_import_files`` daily): a slot of these is run once whichever beat sends it.
UPSTREAM_PERIODIC = frozenset(
    {
        PRUNE_OLD_FILES,
        PRUNE_OLD_RESULTS,
        PRUNE_OLD_RUNS,
        PRUNE_OLD_IMPORT_FILES,
        SYNC_ABORTED_RUNS,
    }
)

#: The queue Ibutsu's API, its admin page and upstream's beat send to (Celery's default),
#: consumed by every worker, upstream's and ours.
SHARED_QUEUE = "celery"
#: The queue of the names in OURS, consumed by our workers only.
OWN_QUEUE = "ibutsu-tasks"
