"""Where pool children write their metrics; set up before prometheus_client is imported."""

from __future__ import annotations

import os
import tempfile

MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> str:
    """Point prometheus_client at a new, empty folder of this worker's own: inside the
    operator's PROMETHEUS_MULTIPROC_DIR when set, else in the system's temporary folder.

    A folder of its own, because files left by another worker would be summed into ours; and
    new, because nothing that was already there is ever deleted. prometheus_client picks its
    storage when first imported, so this runs before anything imports it."""
    parent = os.environ.get(MULTIPROC_VAR) or None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="ibutsu-metrics-", dir=parent)
    os.environ[MULTIPROC_VAR] = directory
    return directory
