"""Where pool children write their metrics; set up before prometheus_client is imported."""

from __future__ import annotations

import os
import shutil
import tempfile

MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> str:
    """Point prometheus_client at an empty folder for this worker (the operator's
    PROMETHEUS_MULTIPROC_DIR, or a new temporary one). prometheus_client picks its storage
    when first imported, so this runs before anything imports it."""
    directory = os.environ.get(MULTIPROC_VAR) or tempfile.mkdtemp(prefix="ibutsu-metrics-")
    # Files left by an earlier worker in the same folder would be summed into ours.
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_VAR] = directory
    return directory
